#!/usr/bin/env python3
"""HOPE (Taylor-mode jets) against nested autograd and nested torch.func.jacfwd.

Cases (float64 by default):

- ``sine_mlp``: 1-D MLP 1 -> 1024 x 4 (sine) -> 1, order 10, at 4 points;
- ``conv_net``: a small 2-D conv net on 1 x 8 x 8 images (conv-tanh-conv-
  softplus-avgpool-linear), expanded in p = 2 group variables (left/right
  image halves, ``feature_mask``) at orders 4, 6 and 8, at 1 point.

Methods: ``hope`` (HOPE.expand), ``autograd`` (nested torch.autograd.grad with
create_graph: every entry of the order-k derivative tensor), ``jacfwd``
(torch.func.jacfwd nested k times). Every method runs in its own process
(CPU, spawned; peak RSS growth from ``resource``) or in-process on CUDA
(``torch.cuda.max_memory_allocated``). A baseline that exceeds ``--timeout``
seconds is stopped and reported as skipped. Errors: max |D^k - D^k_ref| /
max |D^k_ref| over all orders, against float64 nested autograd (the exact
derivatives up to round-off); when that is skipped, against jacfwd.

    python benchmarks/bench_hope.py [--device cuda] [--quick] [--timeout 60]
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from captum_interactions import HOPE  # noqa: E402


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
    """(model f(z) on variables z (N, p) as a function, HOPE call, points)."""
    if name == "sine_mlp":
        net = sine_mlp(256 if quick else 1024, 4, dtype, device)
        x = torch.linspace(-0.5, 0.5, 4, dtype=dtype, device=device)[:, None]

        def scalar(z, n):  # z: (p,) variables for example n
            return net((x[n] + z).reshape(1, 1))[0, 0]

        def hope(order):
            return HOPE(net).expand(x, order=order)

        return scalar, hope, x.shape[0], 1
    net = conv_net(dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, 1, 8, 8, generator=gen, dtype=dtype).to(device)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.long, device=device)
    mask[..., 4:] = 1
    ind = torch.stack([(mask == g).to(dtype) for g in (0, 1)])  # (2, 1, 1, 8, 8)

    def scalar(z, n):
        shift = (z.reshape(2, 1, 1, 1, 1) * ind).sum(0)
        return net(x[n : n + 1] + shift)[0, 0]

    def hope(order):
        return HOPE(net).expand(x, order=order, feature_mask=mask)

    return scalar, hope, x.shape[0], 2


def derivatives_autograd(scalar, n_examples, p, order, dtype, device):
    out = []
    for n in range(n_examples):
        z = torch.zeros(p, dtype=dtype, device=device, requires_grad=True)
        tensor = scalar(z, n).reshape(())
        per_order = []
        for _ in range(order):
            rows = []
            for g in tensor.reshape(-1):
                (row,) = torch.autograd.grad(g, z, create_graph=True)
                rows.append(row)
            tensor = torch.stack(rows).reshape(tensor.shape + (p,))
            per_order.append(tensor.detach())
        out.append(per_order)
    return [torch.stack([out[n][k] for n in range(n_examples)]) for k in range(order)]


def derivatives_jacfwd(scalar, n_examples, p, order, dtype, device):
    out = []
    for n in range(n_examples):
        fn = lambda z, n=n: scalar(z, n)  # noqa: E731
        per_order = []
        for _ in range(order):
            fn = torch.func.jacfwd(fn)
            per_order.append(fn(torch.zeros(p, dtype=dtype, device=device)).detach())
        out.append(per_order)
    return [torch.stack([out[n][k] for n in range(n_examples)]) for k in range(order)]


def derivatives_hope(hope, order):
    poly = hope(order)
    return [poly.derivative_tensor(k) for k in range(1, order + 1)]


def run_method(case, method, order, dtype_name, device, quick, queue):
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scalar, hope, n_ex, p = make_case(case, dtype, device, quick)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if method == "hope":
        result = derivatives_hope(hope, order)
    elif method == "autograd":
        result = derivatives_autograd(scalar, n_ex, p, order, dtype, device)
    else:
        result = derivatives_jacfwd(scalar, n_ex, p, order, dtype, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # plain numpy arrays: torch tensors would travel through shared memory
    queue.put((elapsed, peak, [r.cpu().numpy() for r in result]))


def measure(case, method, order, args):
    if args.device.startswith("cuda"):  # in-process: forked CUDA contexts are unsafe
        import queue as q

        box = q.Queue()
        run_method(case, method, order, args.dtype, args.device, args.quick, box)
        elapsed, peak, result = box.get()
        return elapsed, peak, [torch.from_numpy(r) for r in result]
    ctx = mp.get_context("spawn")  # fork after torch threads start can deadlock
    box = ctx.Queue()
    proc = ctx.Process(target=run_method,
                       args=(case, method, order, args.dtype, args.device, args.quick, box))
    proc.start()
    try:
        result = box.get(timeout=args.timeout)
    except Exception:
        proc.terminate()
        proc.join()
        return None
    proc.join()
    return result[0], result[1], [torch.from_numpy(r) for r in result[2]]


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
                        help="seconds before a baseline is skipped (default 30, quick 20)")
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 20.0 if args.quick else 30.0
    plan = [("sine_mlp", 10)] + [("conv_net", k) for k in ((4, 6) if args.quick else (4, 6, 8))]
    rows = []
    for case, order in plan:
        res = {m: measure(case, m, order, args) for m in ("autograd", "jacfwd", "hope")}
        ref = res["autograd"] or res["jacfwd"]
        ref_name = "autograd" if res["autograd"] else ("jacfwd" if res["jacfwd"] else None)
        for method in ("hope", "autograd", "jacfwd"):
            r = res[method]
            row = {"case": case, "order": order, "method": method}
            if r is None:
                row.update(status=f"skipped (> {args.timeout:.0f} s)")
            else:
                row.update(status="ok", seconds=r[0], peak_mib=r[1] / 2**20,
                           rel_error=None if ref is None or method == ref_name
                           else rel_error(r[2], ref[2]),
                           reference=ref_name)
                if method != "hope" and res["hope"] is not None:
                    row["hope_speedup"] = r[0] / res["hope"][0]
            rows.append(row)
    header = f"{'case':10s} {'K':>2s} {'method':9s} {'time [s]':>10s} {'peak MiB':>9s} " \
             f"{'rel. error':>11s} {'HOPE speedup':>13s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['case']:10s} {r['order']:2d} {r['method']:9s} {r['status']}")
            continue
        err = "reference" if r["rel_error"] is None and r["reference"] == r["method"] else (
            "n/a" if r["rel_error"] is None else f"{r['rel_error']:.2e}")
        speed = f"{r['hope_speedup']:.0f}x" if "hope_speedup" in r else ""
        print(f"{r['case']:10s} {r['order']:2d} {r['method']:9s} {r['seconds']:10.4f} "
              f"{r['peak_mib']:9.1f} {err:>11s} {speed:>13s}")
    out = {
        "benchmark": "hope",
        "device": args.device,
        "dtype": args.dtype,
        "quick": args.quick,
        "timeout_s": args.timeout,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "hope.json" if args.device == "cpu" and not args.quick else (
        f"hope_{args.device.split(':')[0]}{'_quick' if args.quick else ''}.json")
    with open(os.path.join(HERE, "results", name), "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
