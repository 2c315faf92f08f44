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
# Types in the signatures: a "Parameters" list drawn from annotations would also list the
# constructor parameters of classes the library makes for you (their types are internal);
# reference.rst shows those classes without a signature (``.. autoclass:: Channel()``).
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# A typed dict's keys (the shape of status(), the options of open_pool), listed like
# parameters: "name (type) - meaning".
napoleon_custom_sections = [("Keys", "params_style")]
exclude_patterns = ["_build"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
suppress_warnings = ["myst.header"]  # a results page may skip heading levels
html_theme = "alabaster"
