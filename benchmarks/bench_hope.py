#!/usr/bin/env python3
"""HOPE (Taylor-mode jets) against nested autograd and nested torch.func.jacfwd.

Cases (float64 by default):

- ``sine_mlp``: 1-D MLP 1 -> 1024 x 4 (sine) -> 1, order 10, at 4 points;
- ``conv_net_p2`` / ``conv_net_p4``: a small 2-D conv net on 1 x 8 x 8 images
  (conv-tanh-conv-softplus-avgpool-linear), expanded in p = 2 (left/right
  halves) or p = 4 (quadrants) group variables (``feature_mask``) at orders
  4, 6 and 8, at 1 point.

Methods: ``hope`` (HOPE.expand), ``autograd`` (nested
torch.autograd.grad with create_graph over the unique entries of each
symmetric derivative tensor), ``jacfwd`` (torch.func.jacfwd nested k times).
Each runs after a warm-up call at order 1, in its own spawned process. Peak
memory comes from the first call at order K (the growth of sampled RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA); the time is the best of up to 20
further calls (fewer once a quarter of the timeout, 10 s at most, is spent). HOPE's first-call time includes
building its (cached) recovery plan; its "plan call" is the best of as many
calls as the steady time (up to 20, within the same time budget), each made
after clearing every HOPE cache (plan, shipped tables, series plans, derivative
layouts, dense conv matrices) in the warm process, reported against the steady
call. A baseline that exceeds ``--timeout``
seconds is stopped and reported as skipped, with the lower bound on HOPE's
speed-up that the timeout implies. Errors: max |D^k - D^k_exact| / max
|D^k_exact| over k <= K against exact float64 derivatives from an independent
truncated power-series evaluation of the same net (``_taylor_reference.py``).

Every timed process runs with glibc malloc's thresholds fixed (``--malloc
tuned``, the default; see ``_common.MALLOC_SETTINGS``): with the default
thresholds, whether large tensors are reused from the heap or mapped fresh on
every call depends on the process's history, which moves HOPE's time with 4
groups by up to 2x between processes (``bench_hope_malloc.py`` measures it;
nested autograd moves by 5% at most).
``--malloc default`` leaves them as they are.

    python benchmarks/bench_hope.py [--device cuda] [--quick] [--timeout 120]
                                    [--malloc tuned|default] [--out PATH]
"""
import argparse
import copy
import itertools
import multiprocessing as mp
import os
import platform
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from captum_interactions import HOPE  # noqa: E402
from _taylor_reference import derivative_tensors  # noqa: E402
from _common import (  # noqa: E402
    MALLOC_SETTINGS, PeakRSS, malloc_environment, sync, write_results,
)


class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def sine_mlp(width, depth, dtype, device):
    torch.manual_seed(0)
    layers = [nn.Linear(1, width)]
    for _ in range(depth - 1):
        layers += [Sin(), nn.Linear(width, width)]
    layers += [Sin(), nn.Linear(width, 1)]
    return nn.Sequential(*layers).to(dtype=dtype, device=device)


def conv_net(dtype, device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Softplus(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 1),
    ).to(dtype=dtype, device=device)


def make_case(name, dtype, device, quick):
    """Model, expansion points (N, ...), variable directions (p, ...), and the HOPE call."""
    if name == "sine_mlp":
        net = sine_mlp(256 if quick else 1024, 4, dtype, device)
        x = torch.linspace(-0.5, 0.5, 4, dtype=dtype, device=device)[:, None]
        directions = torch.ones(1, 1, dtype=dtype, device=device)
        mask = None
    else:  # "conv_net_p2" / "conv_net_p4": left/right halves or the four quadrants
        groups = int(name.rsplit("_p", 1)[1])
        net = conv_net(dtype, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(1, 1, 8, 8, generator=gen, dtype=dtype).to(device)
        cols = torch.arange(8, device=device)[None, :] // 4
        rows = torch.arange(8, device=device)[:, None] // 4
        mask = (cols if groups == 2 else 2 * rows + cols).expand(8, 8).reshape(1, 1, 8, 8)
        directions = torch.stack([(mask[0] == g).to(dtype) for g in range(groups)])

    def scalar(z, n):  # z: (p,) variables of example n
        shift = (z.reshape((-1,) + (1,) * (directions.dim() - 1)) * directions).sum(0)
        return net(x[n : n + 1] + shift).reshape(())

    def hope(order):
        return HOPE(net).expand(x, order=order, feature_mask=mask)

    return {"net": net, "points": x, "directions": directions, "scalar": scalar, "hope": hope}


def derivatives_autograd(case, order):
    """Nested torch.autograd.grad(create_graph=True) over the unique entries only.

    An entry D_(i1<=...<=ik) is differentiated once more in the variables j >= ik,
    so order k costs C(p+k-1, k) backward passes instead of p^k; the full
    symmetric tensor is filled from the unique entries at the end."""
    x, directions, scalar = case["points"], case["directions"], case["scalar"]
    p = directions.shape[0]
    per_example = []
    for n in range(x.shape[0]):
        z = torch.zeros(p, dtype=x.dtype, device=x.device, requires_grad=True)
        level = {(): scalar(z, n)}
        tensors = []
        for k in range(1, order + 1):
            nxt = {}
            for idx, value in level.items():
                (grad,) = torch.autograd.grad(value, z, create_graph=k < order,
                                              retain_graph=True)
                for j in range(idx[-1] if idx else 0, p):
                    nxt[idx + (j,)] = grad[j]
            level = nxt
            full = torch.empty((p,) * k, dtype=x.dtype, device=x.device)
            for idx in itertools.product(range(p), repeat=k):
                full[idx] = level[tuple(sorted(idx))].detach()
            tensors.append(full)
        per_example.append(tensors)
    return [torch.stack([t[k] for t in per_example]) for k in range(order)]


def derivatives_jacfwd(case, order):
    x, p, scalar = case["points"], case["directions"].shape[0], case["scalar"]
    out = []
    for n in range(x.shape[0]):
        fn = lambda z, n=n: scalar(z, n)  # noqa: E731
        per_order = []
        for _ in range(order):
            fn = torch.func.jacfwd(fn)
            per_order.append(fn(torch.zeros(p, dtype=x.dtype, device=x.device)).detach())
        out.append(per_order)
    return [torch.stack([out[n][k] for n in range(x.shape[0])]) for k in range(order)]


def derivatives_reference(case, order):
    """Exact float64 derivatives from the independent power-series code."""
    net64 = copy.deepcopy(case["net"]).to(torch.float64)
    x = case["points"].to(torch.float64)
    directions = case["directions"].to(torch.float64)
    per_example = [derivative_tensors(net64, x[n : n + 1], directions, order)
                   for n in range(x.shape[0])]
    return [torch.stack([t[k] for t in per_example]) for k in range(order)]


def derivatives_hope(case, order):
    poly = case["hope"](order)
    return [poly.derivative_tensor(k) for k in range(1, order + 1)]


METHODS = {"hope": derivatives_hope, "autograd": derivatives_autograd, "jacfwd": derivatives_jacfwd}


def run_method(case_name, method, order, dtype_name, device, quick, budget, queue):
    """One call under the memory probe (first, while the allocator holds nothing
    of order K), then the best time of up to 20 calls, fewer once ``budget``
    seconds are spent (at least one): the probe's sampling thread would slow
    Python-bound code if timed."""
    dtype = getattr(torch, dtype_name)
    case = make_case(case_name, dtype, device, quick)
    compute = METHODS[method]
    compute(case, 1)  # warm-up: lazy initialisation, allocator, kernels
    sync(device)
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        compute(case, order)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as rss:
            compute(case, order)
        peak = rss.growth_bytes
    first = time.perf_counter() - start
    times, spent = [], 0.0
    while not times or (len(times) < 20 and spent < budget):
        sync(device)
        start = time.perf_counter()
        result = compute(case, order)
        sync(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    plan_call = None
    if method == "hope":
        # the call that builds the plan, measured with every HOPE cache cleared
        # in this warm process, best of as many calls as the steady time (the
        # first call above is one sample that also pays the process's first
        # use of these sizes)
        from captum_interactions._core.hope import _clear_caches

        plan_calls, spent = [], 0.0
        while not plan_calls or (len(plan_calls) < len(times) and spent < budget):
            _clear_caches()
            sync(device)
            start = time.perf_counter()
            compute(case, order)
            sync(device)
            plan_calls.append(time.perf_counter() - start)
            spent += plan_calls[-1]
        plan_call = min(plan_calls)
    # plain numpy arrays: torch tensors would travel through shared memory
    queue.put((min(times), peak, [r.cpu().numpy() for r in result], first, plan_call))


def measure(case, method, order, args):
    """(best seconds, peak bytes, derivative tensors, first-call seconds), or None past
    the timeout."""
    # spawned, on CUDA too: a fork after torch threads (or a CUDA context) start is unsafe
    ctx = mp.get_context("spawn")
    box = ctx.Queue()
    # repeats stop after a quarter of the timeout (10 s at most), so a method that
    # fits the timeout with two calls is not cut off by its own repeats
    budget = min(10.0, args.timeout / 4)
    proc = ctx.Process(target=run_method, args=(case, method, order, args.dtype,
                                                args.device, args.quick, budget, box))
    proc.start()
    try:
        result = box.get(timeout=args.timeout)
    except Exception:
        proc.terminate()
        proc.join()
        return None
    proc.join()
    return result[0], result[1], [torch.from_numpy(r) for r in result[2]], result[3], result[4]


def rel_error(got, ref):
    worst = 0.0
    for g, r in zip(got, ref):
        scale = r.abs().max().item()
        worst = max(worst, (g - r).abs().max().item() / (scale if scale > 0 else 1.0))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before a baseline is skipped (default 120, quick 20)")
    parser.add_argument("--malloc", default="tuned", choices=["tuned", "default"],
                        help="glibc malloc thresholds of the timed processes (default tuned)")
    parser.add_argument("--out", default=None,
                        help="results path (default results/hope[_<device>][_quick].json)")
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 20.0 if args.quick else 120.0
    orders = (4, 6) if args.quick else (4, 6, 8)
    plan = [("sine_mlp", 10)] + [(f"conv_net_p{p}", k) for p in (2, 4) for k in orders]
    rows = []
    load_before = os.getloadavg()[0]
    for case, order in plan:
        reference = derivatives_reference(make_case(case, torch.float64, "cpu", args.quick), order)
        with malloc_environment(args.malloc):
            res = {m: measure(case, m, order, args) for m in ("hope", "autograd", "jacfwd")}
        hope_seconds = res["hope"][0] if res["hope"] is not None else None
        for method in ("hope", "autograd", "jacfwd"):
            r = res[method]
            row = {"case": case, "order": order, "method": method}
            if r is None:
                row.update(status=f"skipped (> {args.timeout:.0f} s)")
                if method != "hope" and hope_seconds:
                    row["hope_speedup_lower_bound"] = args.timeout / hope_seconds
            else:
                row.update(status="ok", seconds=r[0], first_call_seconds=r[3],
                           peak_mib=r[1] / 2**20, rel_error=rel_error(r[2], reference))
                if r[4] is not None:
                    row.update(plan_call_seconds=r[4], plan_call_over_steady=r[4] / r[0])
                if method != "hope" and hope_seconds:
                    row["hope_speedup"] = r[0] / hope_seconds
            rows.append(row)
    header = f"{'case':12s} {'K':>2s} {'method':9s} {'time [s]':>10s} {'peak MiB':>9s} " \
             f"{'rel. error':>11s} {'HOPE speedup':>13s} {'1st call [s]':>12s} " \
             f"{'plan call [s]':>13s} {'plan/steady':>11s}"
    print("errors: max |D^k - D^k_exact| / max |D^k_exact| over k <= K, against the "
          "float64 power-series reference (benchmarks/_taylor_reference.py)")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            bound = (f"  (HOPE > {r['hope_speedup_lower_bound']:.0f}x faster)"
                     if "hope_speedup_lower_bound" in r else "")
            print(f"{r['case']:12s} {r['order']:2d} {r['method']:9s} {r['status']}{bound}")
            continue
        speed = f"{r['hope_speedup']:.0f}x" if "hope_speedup" in r else ""
        first = f"{r['first_call_seconds']:.4f}" if r["method"] == "hope" else ""
        plan = f"{r['plan_call_seconds']:.4f}" if "plan_call_seconds" in r else ""
        ratio = f"{r['plan_call_over_steady']:.2f}" if "plan_call_seconds" in r else ""
        print(f"{r['case']:12s} {r['order']:2d} {r['method']:9s} {r['seconds']:10.4f} "
              f"{r['peak_mib']:9.1f} {r['rel_error']:11.2e} {speed:>13s} {first:>12s} "
              f"{plan:>13s} {ratio:>11s}")
    out = {
        "benchmark": "hope",
        "device": args.device,
        "dtype": args.dtype,
        "quick": args.quick,
        "timeout_s": args.timeout,
        "torch": torch.__version__,
        # intra-op threads of the timed processes (OMP_NUM_THREADS): timings on a
        # shared machine are only comparable at the same setting
        "threads": torch.get_num_threads(),
        # the timed processes' malloc environment (_common.MALLOC_SETTINGS)
        "malloc": {"setting": args.malloc, "environment": MALLOC_SETTINGS[args.malloc]},
        # 1-minute load average before and after the run (a shared machine)
        "load_average": [load_before, os.getloadavg()[0]],
        "platform": platform.platform(),
        "rows": rows,
    }
    name = "hope.json" if args.device == "cpu" and not args.quick else (
        f"hope_{args.device.split(':')[0]}{'_quick' if args.quick else ''}.json")
    if args.malloc != "tuned":
        name = name.replace(".json", f"_malloc_{args.malloc}.json")
    write_results(out, args.out or os.path.join(HERE, "results", name))


if __name__ == "__main__":
    main()
