"""Sphinx configuration of the captum-interactions API reference.

Build (warnings are errors): python -m sphinx -W -b html docs docs/_build/html
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import captum_interactions  # noqa: E402

project = "captum-interactions"
author = "captum-interactions contributors"
copyright = "captum-interactions contributors"
release = captum_interactions.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Captum-style "Args:" / "Returns:" docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings give the types, in Captum's style
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

templates_path = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Second- and higher-order explanations for PyTorch"}

# Formulas render offline: MathJax comes from the jupyter-server-mathjax package (the
# `docs` extra) and is copied into the built pages, instead of being loaded from a CDN.
# That package ships MathJax 2.7 with the STIX-Web fonts only (no TeX fonts): the
# configuration below is MathJax 2's and, as Jupyter's own, selects STIX-Web, or MathJax
# would look for the missing TeX fonts and show "[Math Processing Error]".
import importlib.util  # noqa: E402

_mathjax_package = importlib.util.find_spec("jupyter_server_mathjax")  # located, not imported
if _mathjax_package is None:
    raise ImportError(
        "the docs need the jupyter-server-mathjax package (a local MathJax): "
        'pip install -e ".[docs]"'
    )
MATHJAX_SOURCE = os.path.join(os.path.dirname(_mathjax_package.origin), "static")
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax2_config = {
    "showMathMenu": False,
    "messageStyle": "none",
    "HTML-CSS": {
        "availableFonts": [],
        "preferredFont": None,
        "webFont": "STIX-Web",
        "imageFont": None,
    },
}


# The package's docstrings write shapes as the "Design and math" page does, "(N, *F, *F)", and
# absolute values as "|i|"; in reStructuredText a bare "*" opens emphasis and
# "|x|" is a substitution. Escape both outside math, so the docstrings stay
# readable as plain text and the build has no warnings.
import re  # noqa: E402

_SHAPE_STAR = re.compile(r"(?<=[(\s,])\*(?=[A-Z](?:\b|_))(?![A-Z]\*)")
_BARS = re.compile(r"(?<![{\\`|])\|(\w+)\|(?![`_])")


_NAMES_ONLY = re.compile(r"^[\w, ]+,$")
_NAMES_THEN_TEXT = re.compile(r"^[\w, ]+:\s")


def _escape_docstring(app, what, name, obj, options, lines):
    # "Args:" entries that share one description over two lines ("a, b,\n c: as in
    # ...") are joined, or napoleon reads the first line as a parameter of its own
    index = 0
    while index + 1 < len(lines):
        if _NAMES_ONLY.match(lines[index].strip()) and _NAMES_THEN_TEXT.match(
            lines[index + 1].strip()
        ):
            lines[index] = lines[index].rstrip() + " " + lines[index + 1].strip()
            del lines[index + 1]
        index += 1
    in_math = False
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            in_math = True
            continue
        if in_math:
            if stripped and not line.startswith(" " * 4) and not line.startswith("\t"):
                in_math = False
            elif stripped:
                continue
        if ":math:" in line:
            continue
        line = _SHAPE_STAR.sub(r"\\*", line)
        lines[index] = _BARS.sub(r"\\|\1\\|", line)


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        from sphinx.util.fileutil import copy_asset

        copy_asset(MATHJAX_SOURCE, os.path.join(app.outdir, "_static", "mathjax"))


def setup(app):
    # before napoleon (priority 500) turns "Args:" into field lists
    app.connect("autodoc-process-docstring", _escape_docstring, priority=100)
    app.connect("build-finished", _copy_mathjax)
