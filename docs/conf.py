"""Sphinx configuration for skproduct's documentation."""

import skproduct

project = "skproduct"
author = "the skproduct developers"
copyright = "2026, the skproduct developers"
release = skproduct.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "numpydoc",
]
autosummary_generate = True
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
exclude_patterns = ["_build"]
html_theme = "pydata_sphinx_theme"
html_title = "skproduct"
html_theme_options = {"navigation_with_keys": False}
