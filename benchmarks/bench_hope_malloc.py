#!/usr/bin/env python3
"""How much of a HOPE timing is the process's malloc state: the same call in
several fresh processes, with glibc malloc's default thresholds and with them
fixed (``_common.MALLOC_SETTINGS``, what ``bench_hope.py`` uses by default).

Each process is one ``bench_hope.py`` measurement (warm-up at order 1, one
first call, then the best of up to 20 calls); the table gives the spread of
those per-process best times. Under the default thresholds, glibc either
serves the call's large tensors from its heap or maps them fresh and hands
them back after the call (page faults on every call), depending on what the
process allocated before; the fixed thresholds keep them on the heap.
Also nested autograd on one case, the baseline of ``bench_hope.py``'s ratios.

CPU only: it measures the host's allocator (CUDA tensors come from PyTorch's
own caching allocator).

    python benchmarks/bench_hope_malloc.py [--processes 8] [--quick] [--out PATH]
"""
import argparse
import os
import platform
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_hope import measure  # noqa: E402
from _common import MALLOC_SETTINGS, malloc_environment, write_results  # noqa: E402

CASES = [("conv_net_p2", 6, "hope"), ("conv_net_p4", 6, "hope"), ("conv_net_p4", 8, "hope"),
         ("conv_net_p4", 6, "autograd")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=None,
                        help="processes per case and setting (default 8, quick 3)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None,
                        help="results path (default results/hope_malloc[_quick].json)")
    args = parser.parse_args()
    if args.processes is None:
        args.processes = 3 if args.quick else 8
    # what bench_hope.measure reads
    settings = argparse.Namespace(device="cpu", quick=False, dtype="float64", timeout=120.0)
    rows = []
    for case, order, method in CASES:
        for malloc in ("default", "tuned"):
            seconds = []
            with malloc_environment(malloc):
                for _ in range(args.processes):
                    result = measure(case, method, order, settings)
                    if result is None:
                        raise RuntimeError(f"{case} order {order} {method} timed out")
                    seconds.append(result[0])
            rows.append(dict(case=case, order=order, method=method, malloc=malloc,
                             process_seconds=seconds, min=min(seconds),
                             median=statistics.median(seconds), max=max(seconds)))
            print(f"{case} {order} {method} {malloc}: "
                  + " ".join(f"{1e3 * s:.2f}" for s in seconds) + " ms", flush=True)
    header = f"{'case':12s} {'K':>2s} {'method':9s} {'malloc':8s} " \
             f"{'min [ms]':>9s} {'median':>9s} {'max':>9s} {'max/min':>8s}"
    print(f"best time per process, {args.processes} processes each")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:12s} {r['order']:2d} {r['method']:9s} {r['malloc']:8s} "
              f"{1e3 * r['min']:9.2f} {1e3 * r['median']:9.2f} {1e3 * r['max']:9.2f} "
              f"{r['max'] / r['min']:8.2f}")
    write_results(
        {
            "benchmark": "hope_malloc",
            "processes": args.processes,
            "quick": args.quick,
            "malloc_settings": MALLOC_SETTINGS,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "libc": list(platform.libc_ver()),
            "rows": rows,
        },
        args.out or os.path.join(
            HERE, "results", "hope_malloc_quick.json" if args.quick else "hope_malloc.json"
        ),
    )


if __name__ == "__main__":
    main()
