"""Sphinx configuration of the dgdlens documentation (``make docs``).

Built offline: no intersphinx inventories are fetched, the tutorials are MyST-Markdown notebooks
executed by myst-nb (outputs cached in ``docs/.jupyter_cache``, so an unchanged tutorial is not re-run),
and the CLI reference is rendered from the argparse parser by ``_ext/cli_reference.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))

import dgdlens  # noqa: E402

project = "dgdlens"
author = "dgdlens developers"
copyright = "dgdlens developers"  # noqa: A001
release = dgdlens.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",   # MathJax 3 served from _static/mathjax (sets mathjax_path): no CDN
    "sphinx.ext.viewcode",
    "myst_nb",
    "sphinx_design",
    "cli_reference",
]

# ----------------------------------------------------------------------------------------- sources
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", ".jupyter_cache", "jupyter_execute", "**.ipynb_checkpoints", "README.md", "cli_generated.md",
                    "_ext", "check_links.py"]
templates_path = ["_templates"]

# -------------------------------------------------------------------------------------- API (autodoc)
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "none"           # types are written in the numpydoc docstrings
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False   # torch.nn.Module's own docstrings are not ours to show
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True             # "Attributes" as a field list: no duplicate attribute targets
napoleon_use_param = True
napoleon_preprocess_types = False

# No intersphinx: the build must not touch the network.

# ---------------------------------------------------------------------------------- notebooks (myst-nb)
nb_execution_mode = os.environ.get("DGDLENS_DOCS_EXECUTE", "cache")   # "off" for a quick layout pass
nb_execution_cache_path = str(HERE / ".jupyter_cache")
# per cell; the multiome tutorial's training cell took 250 s on a loaded 2-core machine
nb_execution_timeout = 600
nb_execution_raise_on_error = True   # a tutorial that fails breaks the build
nb_execution_show_tb = True
nb_merge_streams = True
nb_kernel_rgx_aliases = {".*": "python3"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_footnote_transition = False

# ----------------------------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = f"dgdlens {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
html_show_sourcelink = False
html_last_updated_fmt = None

# Warnings are errors in `make docs` (-W); nothing here is suppressed except the one below:
# myst-nb notes that "mime type ... not supported" for widget outputs; tutorials produce none.
suppress_warnings = ["mystnb.unknown_mime_type"]
