"""Sphinx configuration of the paddle_ema docs site: ``tox -e docs`` builds it with warnings as errors.

Why Sphinx (autodoc + napoleon, pages in Markdown through MyST) rather than MkDocs: Paddle's own docs
and optax, the projects our readers come from, are built with Sphinx; and autodoc renders each
signature from ``inspect.signature`` of the live object, so the keyword-only ``*`` stays and
annotations print as types (``decay: float = 0.999``), not as the quoted strings that
``from __future__ import annotations`` leaves in ``__annotations__``. Napoleon reads the Google-style
docstrings the code already has.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The working tree's paddle_ema, whatever the running env has installed.
sys.path.insert(0, str(ROOT))

import paddle_ema  # noqa: E402

project = "paddle_ema"
author = "paddle_ema authors"
copyright = "paddle_ema authors, Apache-2.0"
release = paddle_ema.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
# Links between pages are written as relative .md links, which work on GitHub too; MyST resolves
# them to the built pages. Headings get anchors for #section links.
myst_heading_anchors = 3

# Signatures: ``(model: Layer, decay: float = 0.999, *, warmup: str | None = None, ...)``.
autodoc_typehints = "signature"
python_use_unqualified_type_names = True
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"paddle_ema {release}"

# Pages link to a few files outside docs/ by their path in the repository, which GitHub resolves.
# The site carries those files as pages of its own (benchmark-results.md includes RESULTS.md; it is
# not copied), so the build points such links at them instead.
_OUTSIDE_DOCS = {"../benchmarks/results/RESULTS.md": "benchmark-results.md"}


def _link_pages_inside(app, docname, source):
    for path, page in _OUTSIDE_DOCS.items():
        source[0] = source[0].replace(f"]({path})", f"]({page})")


def setup(app):
    app.connect("source-read", _link_pages_inside)
