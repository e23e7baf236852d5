"""Timing helpers shared by the benchmark scripts."""
import statistics
import time


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
