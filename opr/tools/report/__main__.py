"""``python -m opr.tools.report``: see :mod:`opr.tools.report`."""

import sys

from opr.tools.report.cli import main

sys.exit(main())
