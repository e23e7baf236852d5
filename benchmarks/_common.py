"""Helpers shared by the benchmark scripts (and the tests that compare with peers):
timing, peak memory, loading the peer packages, writing the results JSON."""
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types


def sync(device) -> None:
    """Wait for queued CUDA work, so wall-clock time covers it."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """(median seconds over ``repeats`` calls, last result)."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def timed_interleaved(fns, device, repeats):
    """Call ``fns`` in turn, ``repeats`` rounds: [(median seconds, last result)]
    per function, and the median over rounds of each one's time over the
    first's. Alternating cancels most of the drift of a shared machine that
    timing one function after the other would put into their ratio."""
    times = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            results[k] = fn()
            sync(device)
            times[k].append(time.perf_counter() - start)
    ratios = [
        statistics.median(t / t0 for t, t0 in zip(times[k], times[0])) for k in range(len(fns))
    ]
    return [(statistics.median(t), r) for t, r in zip(times, results)], ratios


# glibc malloc, fixed: large blocks come from the heap and freed memory is kept.
# Its default thresholds move with the process's history: large tensors are
# then either reused from the heap or mapped fresh (page faults on every call)
# and trimmed back after it, so the same call can take almost twice as long in
# one process as in the next (``bench_hope_malloc.py``). Ignored by other
# allocators; jemalloc and tcmalloc, which PyTorch's CPU tuning guide
# recommends, keep freed memory for reuse too.
MALLOC_SETTINGS = {
    "tuned": {"MALLOC_MMAP_THRESHOLD_": str(2**28), "MALLOC_TRIM_THRESHOLD_": str(2**29)},
    "default": {},
}


@contextlib.contextmanager
def malloc_environment(setting: str):
    """Processes started inside the block (``spawn``) use the glibc malloc
    ``setting`` ("tuned" or "default", see ``MALLOC_SETTINGS``); the variables
    are read when a process starts, so this process is unaffected."""
    names = [name for values in MALLOC_SETTINGS.values() for name in values]
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(MALLOC_SETTINGS[setting])
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class PeakRSS:
    """Peak growth of this process's resident memory inside a ``with`` block.

    ``ru_maxrss`` is a lifetime peak (imports included), so it misses any peak
    below an earlier one: a thread samples /proc/self/statm instead (Linux;
    elsewhere the ``ru_maxrss`` growth). ``growth_bytes`` after the block."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval, self.growth_bytes = interval, 0

    @staticmethod
    def _current() -> int:
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        import os
        import threading

        self._proc = os.path.exists("/proc/self/statm")
        if not self._proc:
            import resource

            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self._base = self._peak = self._current()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self._current())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._proc:
            import resource

            self.growth_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._current())
        self.growth_bytes = self._peak - self._base



def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the processor's."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def write_results(result: dict, path: str) -> None:
    """``result`` as indented JSON at ``path`` (folders created), and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")


def load_path_explain():
    """path-explain's ``PathExplainerTorch``, loaded from its file: the package's
    ``__init__`` imports TensorFlow, which the torch explainer does not use."""
    spec = importlib.util.find_spec("path_explain")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "explainers", "path_explainer_torch.py"
    )
    module_spec = importlib.util.spec_from_file_location("path_explainer_torch", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.PathExplainerTorch


def load_acd_cd():
    """acd 0.0.2's ``cd`` (needs np.int; its package __init__ needs scikit-image,
    which the CD scores do not use, so the subpackage is loaded without it)."""
    try:
        import numpy as np
    except ImportError:
        return None
    if not hasattr(np, "int"):
        np.int = int  # acd uses the alias removed in numpy 1.24
    spec = importlib.util.find_spec("acd")
    if spec is None or not spec.submodule_search_locations:
        return None
    saved = sys.modules.get("acd")
    try:
        try:
            import acd

            return acd.cd
        except ImportError:
            package = types.ModuleType("acd")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["acd"] = package
            return importlib.import_module("acd.scores.cd").cd
    except Exception:
        if saved is not None:
            sys.modules["acd"] = saved
        return None
