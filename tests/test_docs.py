"""The code blocks of docs/quickstart.rst and README.md run as written; no page refers to
a file outside the repository; the PyPI long description renders; docstrings open with
a one-line summary."""
import glob
import importlib.util
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


QUICKSTART = os.path.join(ROOT, "docs", "quickstart.rst")


def _quickstart_snippets():
    """The ``.. code-block:: python`` bodies of docs/quickstart.rst."""
    if not os.path.exists(QUICKSTART):
        return []
    snippets, current, title, previous = [], None, "", ""
    for line in open(QUICKSTART, encoding="utf-8").read().splitlines():
        if line and set(line) == {"-"}:
            title = previous
        previous = line
        if line.startswith(".. code-block:: python"):
            current = []
            snippets.append(pytest.param(current, id=title.replace(" ", "_")))
        elif current is not None:
            if line and not line.startswith("   "):
                current = None
            else:
                current.append(line[3:])
    return [pytest.param("\n".join(p.values[0]), id=p.id) for p in snippets]


@pytest.mark.parametrize("snippet", _quickstart_snippets())
def test_docs_quickstart_snippet_runs(snippet, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # a snippet may save a figure
    exec(compile(snippet, QUICKSTART, "exec"), {"__name__": "__quickstart__"})


def test_docs_quickstart_found():
    assert len(_quickstart_snippets()) >= 6


README = os.path.join(ROOT, "README.md")


def _readme_snippets():
    """The ```python blocks of README.md."""
    if not os.path.exists(README):
        return []
    blocks, current = [], None
    for line in open(README, encoding="utf-8").read().splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize("snippet", _readme_snippets())
def test_readme_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, README, "exec"), {"__name__": "__readme__"})


def test_readme_snippets_found():
    assert len(_readme_snippets()) >= 7


# --- nothing refers to a file outside the repository ------------------------------------

# user-facing text: README, the Sphinx sources, the package (docstrings), examples,
# packaging files and the tutorials
_SCANNED_GLOBS = (
    "README.md",
    "setup.cfg",
    "setup.py",
    "docs/*.rst",
    "docs/conf.py",
    "captum_interactions/**/*.py",
    "examples/*.py",
    "tutorials/*.ipynb",
    "benchmarks/*.py",
)
# the design notes the project was built from are not shipped: users have no such file
_OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md|/work/")
_MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""")
_RST_LINK = re.compile(r"`[^`<]*<([^>`]+)>`__?")
_RST_PATH_DIRECTIVE = re.compile(r"^\s*\.\. (?:image|figure|literalinclude|include)::\s*(\S+)", re.M)


def _scanned_files():
    files = set()
    for pattern in _SCANNED_GLOBS:
        files.update(glob.glob(os.path.join(ROOT, pattern), recursive=True))
    return sorted(files)


def _relative_targets(path, text):
    """Link and image targets of a README/.rst file that are paths, not URLs or anchors."""
    found = _MARKDOWN_LINK.findall(text) + _HTML_SRC.findall(text)
    if path.endswith(".rst"):
        found += _RST_LINK.findall(text) + _RST_PATH_DIRECTIVE.findall(text)
    return [
        target.split("#")[0]
        for target in found
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")
    ]


def test_scanned_files_found():
    names = {os.path.relpath(p, ROOT) for p in _scanned_files()}
    assert {"README.md", "docs/design.rst", "captum_interactions/__init__.py"} <= names


def test_nothing_refers_outside_the_repository():
    problems = []
    for path in _scanned_files():
        text = open(path, encoding="utf-8").read()
        name = os.path.relpath(path, ROOT)
        for match in _OUTSIDE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{name}:{line}: refers to {match.group(0)!r}")
        if not path.endswith((".md", ".rst")):
            continue
        for target in _relative_targets(path, text):
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            if os.path.commonpath([resolved, ROOT]) != ROOT:
                problems.append(f"{name}: link {target!r} leaves the repository")
            elif not os.path.exists(resolved):
                problems.append(f"{name}: link {target!r} points to a missing file")
    assert not problems, "\n".join(problems)


def test_link_checker_catches_bad_links(tmp_path):
    # the checker itself: an escaping link and a missing file are both seen
    text = "[a](../shared/x.md) [b](docs/missing.rst) [c](https://captum.ai) [d](#install)"
    targets = _relative_targets(str(tmp_path / "README.md"), text)
    assert targets == ["../shared/x.md", "docs/missing.rst"]
    rst = "`x <../outside.rst>`_ and\n.. image:: images/none.png\n"
    assert _relative_targets(str(tmp_path / "p.rst"), rst) == ["../outside.rst", "images/none.png"]


# --- the PyPI long description and the license ------------------------------------------


def _long_description():
    spec = importlib.util.spec_from_file_location("_setup_for_test", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines long_description(); setup() runs only as a script
    return module.long_description()


def test_pypi_long_description_has_no_repository_files():
    text = _long_description()
    assert "<img" not in text
    assert not [t for t in _MARKDOWN_LINK.findall(text) if not re.match(r"^[a-z]+://", t)]
    assert "## Install" in text and "## Quickstart" in text


def test_pypi_long_description_renders():
    from readme_renderer.markdown import render

    html = render(_long_description(), variant="GFM")
    assert html is not None
    assert re.search(r"<h2[^>]*>Install<", html) and re.search(r"<h2[^>]*>Quickstart<", html)
    assert "<img" not in html and "docs/images" not in html


def test_license_is_shipped_with_the_metadata():
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"), encoding="utf-8")
    assert config["metadata"]["license"] == "BSD-3-Clause"
    assert config["metadata"]["license_files"].split() == ["LICENSE"]
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the captum_interactions authors" in text


# --- docstrings open with a one-line summary, as Captum's do ------------------------------


def _public_api_docstrings():
    """(name, docstring) of every public class, function and method of the package's
    exported names whose code lives in ``captum_interactions._core`` (``__init__``
    excepted: as in Captum, it opens with "Args:" and the class docstring summarizes)."""
    import captum_interactions

    found = []
    for name in sorted(vars(captum_interactions)):
        obj = getattr(captum_interactions, name)
        module = getattr(obj, "__module__", "") or ""
        if name.startswith("_") or not module.startswith("captum_interactions._core"):
            continue
        if inspect.isfunction(obj):
            found.append((name, obj.__doc__))
            continue
        if not inspect.isclass(obj):
            continue
        found.append((name, obj.__doc__))
        for member_name, member in vars(obj).items():
            if member_name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                doc = member.__doc__ if not isinstance(member, property) else member.fget.__doc__
                found.append((f"{name}.{member_name}", doc))
    return found


def test_public_docstrings_found():
    names = {name for name, _ in _public_api_docstrings()}
    assert {
        "IntegratedHessians.attribute",
        "ExpectedHessians.attribute",
        "LayerIntegratedHessians.attribute",
        "SmoothHess.attribute",
        "HOPE.expand",
        "ContextualDecomposition.interactions",
        "AgglomerativeContextualDecomposition.attribute",
        "explain_dataset",
    } <= names


def test_public_docstrings_open_with_a_one_line_summary():
    problems = []
    for name, doc in _public_api_docstrings():
        lines = inspect.cleandoc(doc or "").splitlines()
        if not lines or not lines[0].strip():
            problems.append(f"{name}: no docstring")
        elif lines[0].rstrip().endswith(":") or lines[0].strip().startswith("Args"):
            problems.append(f"{name}: opens with {lines[0]!r}, not a summary")
        elif len(lines) > 1 and lines[1].strip():
            problems.append(f"{name}: the summary {lines[0]!r} runs on to a second line")
    assert not problems, "\n".join(problems)
