"""Sphinx configuration. Build with `nox -s docs` (warnings are errors)."""

from __future__ import annotations

project = "trio_securechannel"
author = "trio_securechannel developers"
copyright = "2026, trio_securechannel developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
    "myst_parser",  # benchmarks.md is Markdown, like the CHANGELOG
]
# No intersphinx: CI reaches only the package registries, not trio's docs site.
default_role = "py:obj"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
suppress_warnings = ["myst.header"]  # a results page may skip heading levels
html_theme = "alabaster"
