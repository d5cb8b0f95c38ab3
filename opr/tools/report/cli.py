"""The command line: ``python -m opr.tools.report`` (installed as ``opr-report``) PATH [PATH ...] [--out DIR]
[--reference METHOD ...] [--power]."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from opr.tools.report.build import DEFAULT_REFERENCES, build_report


def main(argv: Sequence[str] | None = None) -> int:
    """Build the report of the runs under the given paths; 0 when some cell has a complete run, 1 when none has,
    2 when an input does not exist or holds no run."""
    from opr.tools import report  # the package's docstring is the command's description

    ap = argparse.ArgumentParser(prog="python -m opr.tools.report", description=report.__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths", nargs="+", type=Path, help="run directories, sweep directories or results.json files"
    )
    ap.add_argument("--out", type=Path, default=Path("report"), help="output directory (default: report)")
    ap.add_argument(
        "--reference",
        action="append",
        metavar="METHOD",
        help="compare every cell with this method's matching cell by paired differences; repeatable "
        f"(default: {' and '.join(DEFAULT_REFERENCES)})",
    )
    ap.add_argument(
        "--power",
        action="store_true",
        help="per paired difference also the sign-flip permutation p-value and the smallest difference the design "
        "detects with 80%% power at alpha 0.05 (paired t)",
    )
    args = ap.parse_args(argv)
    try:
        md, collected = build_report(args.paths, args.out, args.reference or DEFAULT_REFERENCES, args.power)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(md)
    print(f"wrote {os.path.join(args.out, 'report.md')}, report.csv, paired.csv and plots", file=sys.stderr)
    return 0 if collected.summaries else 1
