"""The code blocks of docs/quickstart.rst and README.md run as written."""
import os

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
