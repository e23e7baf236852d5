#!/usr/bin/env python3
"""Peak memory of calls with and without the memory budget.

Each case runs in a fresh subprocess (so one case's peak cannot hide another's)
and reports the growth of the resident set size (RSS) during the call,
sampled by ``benchmarks._common.PeakRSS``. "unbounded" sets a budget of 1 TB,
which reproduces the behaviour before the budget existed (everything at once);
"budget" sets the budget named in the table.

    python benchmarks/bench_memory_budget.py            # all cases
    python benchmarks/bench_memory_budget.py --features 2000 --budget 256MB
    python benchmarks/bench_memory_budget.py --features 20000 --budget 2GB --ih-only

Writes benchmarks/results/memory_budget_cpu.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_case(spec: dict) -> dict:
    """Runs inside the subprocess."""
    sys.path.insert(0, HERE)
    import torch
    from _common import PeakRSS

    import captum_interactions as ci

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = dict(spec)
    if spec["method"] == "IntegratedHessians":
        d = spec["features"]
        model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x = torch.randn(1, d)
        ih = ci.IntegratedHessians(model)
        call = lambda: ih.attribute(x, n_steps=spec["n_steps"])  # noqa: E731
    else:  # HOPE on 4 features
        model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
        x = torch.randn(1, 4, dtype=torch.float64)
        hope = ci.HOPE(model)
        call = lambda: hope.attribute(x, order=spec["order"])  # noqa: E731
    start = time.perf_counter()
    try:
        with ci.memory_budget(spec["budget"]), PeakRSS() as peak:
            call()
        out["outcome"] = "ok"
    except Exception as err:  # noqa: BLE001 - the outcome is what we report
        out["outcome"] = f"{type(err).__name__}: {str(err)[:160]}"
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_growth_bytes"] = peak.growth_bytes if out["outcome"] == "ok" else None
    if spec["method"] == "IntegratedHessians" and out["outcome"] == "ok":
        out["batches"] = ih.last_call_cost.batches
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--n-steps", type=int, default=16)
    parser.add_argument("--budget", default="256MB")
    parser.add_argument("--ih-only", action="store_true",
                        help="only the budgeted IntegratedHessians case (no unbounded run)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    cases = [
        dict(method="IntegratedHessians", features=args.features, n_steps=args.n_steps, budget="1TB"),
        dict(method="IntegratedHessians", features=args.features, n_steps=args.n_steps, budget=args.budget),
        dict(method="HOPE.attribute", order=11, budget="1TB"),
        dict(method="HOPE.attribute", order=11, budget="1GB"),
        dict(method="HOPE.attribute", order=13, budget="4GB"),
        dict(method="HOPE.attribute", order=100, budget="4GB"),
    ]
    if args.ih_only:  # e.g. D = 20000, whose unbounded run would ask for 25.6 GB
        cases = cases[1:2]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for spec in cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(spec)],
            capture_output=True, text=True, env=env, check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'method':18s} {'size':>12s} {'budget':>7s} {'peak RSS growth':>16s} {'time':>8s}  outcome")
    for r in rows:
        size = f"D={r['features']}" if "features" in r else f"order={r['order']}"
        peak = r["peak_rss_growth_bytes"]
        peak_s = "-" if peak is None else f"{peak / 1e6:.0f} MB"
        print(f"{r['method']:18s} {size:>12s} {r['budget']:>7s} {peak_s:>16s} "
              f"{r['seconds']:7.2f}s  {r['outcome']}")
    sys.path.insert(0, HERE)
    from _common import write_results

    write_results(
        {"note": "CPU, 1 thread, contended shared machine; RSS growth during the call",
         "rows": rows},
        os.path.join(HERE, "results", "memory_budget_cpu%s.json"
                     % ("_ih_d%d" % args.features if args.ih_only else "")),
    )


if __name__ == "__main__":
    main()
