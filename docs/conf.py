"""Sphinx configuration of the opr docs site (MyST markdown pages + autodoc API reference).

Build (warnings are errors, as CI runs it): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "opr"
author = "opr contributors"
copyright = "2026, opr contributors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# docs/results/ holds run records and generated reports (report.md files among them): data, not pages.
exclude_patterns = ["_build", "results/**", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Optional packages that a CPU install does not have; the modules that import them still document.
autodoc_mock_imports = ["vllm", "wandb", "trl", "submitit"]
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "opr"
