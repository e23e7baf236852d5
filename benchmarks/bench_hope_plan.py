#!/usr/bin/env python3
"""HOPE's recovery plan on a first call: shipped recovery maps against the block solves.

A first call of ``HOPE.expand`` builds the recovery plan of its (p, orders): the
directions to propagate and the map from their univariate Taylor coefficients
to the monomial coefficients. For p <= 4 variables and orders <= 8 the maps
ship with the package (``recovery_maps.f8``); beyond, they are built from the
per-support block solves. This times, for each (p, K), the plan of orders
0..K built from nothing (every plan cache and table read cleared), with one
recovery of univariate coefficients (its stacked map included), both ways in
the same run, alternating, median of ``--repeats``; and checks that the two
give the same coefficients.

Prints a table and writes ``benchmarks/results/hope_plan.json``.

    python benchmarks/bench_hope_plan.py [--repeats 200]
"""
import argparse
import contextlib
import os
import statistics
import time
from unittest import mock

import torch

from captum_interactions._utils import taylor_polynomial as tp
from _common import write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [(2, 4), (2, 6), (2, 8), (3, 6), (4, 4), (4, 6), (4, 8)]


def clear_plan_caches() -> None:
    for cached in (tp.recovery_plan, tp._support_block, tp._block_inverse_table,
                   tp._recovery_table_maps, tp.monomials):
        cached.cache_clear()


def plan_and_recover(p: int, order: int, univariate: torch.Tensor) -> torch.Tensor:
    return tp.recovery_plan(p, tuple(range(order + 1))).recover_concatenated(univariate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hope_plan.json"))
    args = parser.parse_args()
    no_table = mock.patch.object(tp, "_recovery_table_maps", lambda p, top: {})
    rows = []
    print(f"{'p':>2} {'K':>2} {'shipped maps [us]':>18} {'block solves [us]':>18} "
          f"{'ratio':>6} {'max |diff|':>11}")
    for p, order in CASES:
        n_dirs = len(tp.RecoveryPlan(p, tuple(range(order + 1))).directions)
        univariate = torch.randn(order + 1, n_dirs, 3, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(p * 10 + order))
        times = {"shipped": [], "blocks": []}
        results = {}
        for _ in range(args.repeats):
            for way in ("shipped", "blocks"):
                clear_plan_caches()
                with no_table if way == "blocks" else contextlib.nullcontext():
                    start = time.perf_counter()
                    results[way] = plan_and_recover(p, order, univariate)
                    times[way].append(time.perf_counter() - start)
        clear_plan_caches()
        shipped, blocks = (statistics.median(times[w]) for w in ("shipped", "blocks"))
        diff = (results["shipped"] - results["blocks"]).abs().max().item()
        rows.append(dict(p=p, order=order, directions=n_dirs, shipped_seconds=shipped,
                         block_solves_seconds=blocks, ratio=blocks / shipped,
                         max_abs_difference=diff))
        print(f"{p:>2} {order:>2} {shipped * 1e6:>18.0f} {blocks * 1e6:>18.0f} "
              f"{blocks / shipped:>5.1f}x {diff:>11.1e}")
    write_results(dict(benchmark="hope_plan", torch=torch.__version__,
                       threads=torch.get_num_threads(), repeats=args.repeats, rows=rows),
                  args.out)


if __name__ == "__main__":
    main()
