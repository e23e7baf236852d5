"""The benchmarks' malloc environment: what spawned processes see, and that the
parent's environment comes back unchanged."""
import multiprocessing as mp
import os

from benchmarks._common import MALLOC_SETTINGS, malloc_environment

NAMES = sorted({name for values in MALLOC_SETTINGS.values() for name in values})


def _report(queue):
    queue.put({name: os.environ.get(name) for name in NAMES})


def _seen_by_a_spawned_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_report, args=(queue,))
    proc.start()
    seen = queue.get(timeout=60)
    proc.join()
    return seen


def test_tuned_setting_reaches_spawned_processes_and_is_undone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # a user's own value
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with malloc_environment("tuned"):
        seen = _seen_by_a_spawned_process()
    assert seen == {"MALLOC_MMAP_THRESHOLD_": str(2**28), "MALLOC_TRIM_THRESHOLD_": str(2**29)}
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_default_setting_removes_inherited_thresholds(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "999")
    with malloc_environment("default"):
        seen = _seen_by_a_spawned_process()
    assert seen == {name: None for name in NAMES}
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "999"
