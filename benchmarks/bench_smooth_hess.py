#!/usr/bin/env python3
"""SmoothHess: accuracy vs cost, throughput, and PMSE against Softplus Hessians.

1. Error against the closed form. For f(x) = sum_k a_k relu(w_k.x + b_k) the
   smoothed Hessian is sum_k a_k phi(mu_k/s_k)/s_k w_k w_k^T. Relative
   Frobenius error (mean over seeds) vs gradient calls per example, for the
   default antithetic estimator and the naive one (i.i.d. z).
2. Throughput (gradient calls per second) on a 784-500-300-10 ReLU MLP for
   N = 1 and N = 64 examples: ``SmoothHess`` (full 784 x 784 and grouped on
   7 x 7 patches, G = 16) against two baselines in the same run: a naive loop
   (one forward/backward per noise sample, the Stein sum accumulated by hand)
   and Captum's ``NoiseTunnel(Saliency)`` SmoothGrad (gradients only, no Hessian).
3. PMSE (uniform in the ball) on a small ReLU regression net trained in the
   script: SmoothGrad + SmoothHess, Softplus(beta) gradient + Hessian, and the
   plain gradient; sigma and beta are picked on validation points from a grid,
   PMSE reported on separate test points.

Prints tables and writes ``benchmarks/results/smooth_hess[_<device>].json``.

    python benchmarks/bench_smooth_hess.py [--device cuda] [--quick]
"""
import argparse
import math
import os
import statistics
import time

import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from captum_interactions import SmoothHess, replace_relu_with_softplus
from captum_interactions.metrics import pmse
from _common import device_name, timed, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# --- 1. error vs cost ---------------------------------------------------------


def relu_sum(d, k, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=gen, dtype=dtype).to(device) / math.sqrt(d)
    b = (0.5 * torch.randn(k, generator=gen, dtype=dtype)).to(device)
    a = torch.randn(k, generator=gen, dtype=dtype).to(device)

    def f(x):
        return torch.relu(x @ w.T + b) @ a

    def smoothed_hessian(x, sigma):
        s = sigma * w.norm(dim=1)
        t = (x @ w.T + b) / s
        phi = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        return torch.einsum("k,nk,ki,kj->nij", a, phi / s, w, w)

    return f, smoothed_hessian


def error_vs_cost(device, quick):
    d, k, n_ex, sigma = 20, 64, 4, 0.5
    dtype = torch.float64
    f, smoothed = relu_sum(d, k, device, dtype)
    torch.manual_seed(0)
    x = torch.randn(n_ex, d, dtype=dtype, device=device)
    truth = smoothed(x, sigma)
    scale = truth.flatten(1).norm(dim=1)
    budgets = [16, 64, 256, 1024] if quick else [16, 64, 256, 1024, 4096, 16384]
    seeds = range(3 if quick else 8)
    rows = []
    sh = SmoothHess(f)
    for n in budgets:
        row = {"gradient_calls": n}
        for name, antithetic in (("antithetic", True), ("naive", False)):
            errs = []
            for seed in seeds:
                torch.manual_seed(seed)
                # i.i.d. draws, no importance weights: this section is about
                # antithetic pairs alone (the variance-reduced samplers:
                # bench_smooth_hess_samplers.py)
                h = sh.attribute(
                    x, n_samples=n, stdevs=sigma, antithetic=antithetic, sampler="gaussian",
                    importance=None,
                )
                errs.append(((h - truth).flatten(1).norm(dim=1) / scale).mean().item())
            row[name] = statistics.mean(errs)
        row["naive_over_antithetic"] = row["naive"] / row["antithetic"]
        rows.append(row)
    return {"d": d, "k": k, "examples": n_ex, "sigma": sigma, "rows": rows}


# --- 2. throughput ------------------------------------------------------------


def mnist_mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 10)
    ).to(device).eval()


def naive_loop(model, x, target, n_samples, sigma):
    """One forward/backward per antithetic noise draw, Stein sum by hand."""
    n, d = x.shape
    hess = torch.zeros(n, d, d, device=x.device, dtype=x.dtype)
    for _ in range(n_samples // 2):
        z = torch.randn_like(x)
        grads = []
        for sign in (1.0, -1.0):
            point = (x + sign * sigma * z).requires_grad_(True)
            out = model(point)[:, target].sum()
            grads.append(torch.autograd.grad(out, point)[0])
        hess += z[:, :, None] * (grads[0] - grads[1])[:, None, :] / (2 * sigma)
    hess /= n_samples // 2
    return 0.5 * (hess + hess.transpose(1, 2))


def throughput(device, quick):
    model = mnist_mlp(device)
    sigma, target = 0.1, 3
    patches = (torch.arange(28)[:, None] // 7 * 4 + torch.arange(28)[None, :] // 7).reshape(
        1, 784
    ).to(device)
    repeats = 1 if quick else 3
    rows = []
    for n_ex in (1, 64):
        n_samples = (128 if n_ex == 64 else 1024) // (4 if quick else 1)
        torch.manual_seed(0)
        x = torch.rand(n_ex, 784, device=device)
        calls = n_ex * n_samples
        sh = SmoothHess(model)
        methods = {
            "SmoothHess full (D=784)": lambda: sh.attribute(
                x, target=target, n_samples=n_samples, stdevs=sigma
            ),
            # the default above projects the noise onto the first layer's row
            # space and subtracts the first-layer control variate; this row is
            # the same call without them (their cost per gradient call)
            "SmoothHess full, no subspace / cv": lambda: sh.attribute(
                x, target=target, n_samples=n_samples, stdevs=sigma,
                input_subspace=None, control_variate=None,
            ),
            "SmoothHess grouped (G=16)": lambda: sh.attribute(
                x, target=target, n_samples=n_samples, stdevs=sigma, feature_mask=patches
            ),
            "naive loop (full)": lambda: naive_loop(model, x, target, n_samples, sigma),
            "captum NoiseTunnel(Saliency) SmoothGrad": lambda: NoiseTunnel(
                Saliency(model)
            ).attribute(
                x, nt_type="smoothgrad", nt_samples=n_samples, stdevs=sigma,
                nt_samples_batch_size=max(1, 8192 // n_ex), target=target, abs=False,
            ),
        }
        timed(methods["SmoothHess full (D=784)"], device, 1)  # warm-up
        result = {"examples": n_ex, "n_samples": n_samples, "gradient_calls": calls}
        for name, fn in methods.items():
            seconds, _ = timed(fn, device, repeats)
            result[name] = {"seconds": seconds, "gradient_calls_per_s": calls / seconds}
        base = result["naive loop (full)"]["gradient_calls_per_s"]
        for name in methods:
            result[name]["speedup_vs_naive_loop"] = result[name]["gradient_calls_per_s"] / base
        rows.append(result)
    return {"model": "784-500-300-10 ReLU MLP", "sigma": sigma, "rows": rows}


# --- 3. PMSE -----------------------------------------------------------------


def train_regression_net(device, dim=8, steps=600):
    """A small ReLU net fit to a smooth function with interactions."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    ).to(device)
    data = torch.randn(2048, dim, device=device)
    labels = torch.sin(data[:, 0] * data[:, 1]) + torch.tanh(data[:, 2] * data[:, 3]) + 0.5 * (
        data[:, 4:] ** 2
    ).sum(1).sqrt()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(data)[:, 0] - labels) ** 2).mean()
        loss.backward()
        opt.step()
    return net.eval(), loss.item()


def softplus_pair(net, x, beta):
    with replace_relu_with_softplus(net, beta):
        leaf = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(net(leaf).sum(), leaf)[0]
        hess = torch.stack([
            torch.autograd.functional.hessian(lambda v: net(v[None])[0, 0], p) for p in x
        ])
    return grad, hess


def pmse_comparison(device, quick):
    dim = 8
    net, loss = train_regression_net(device, dim, steps=300 if quick else 600)
    torch.manual_seed(1)
    valid = torch.randn(8, dim, device=device)
    test = torch.randn(16 if quick else 32, dim, device=device)
    n_pmse = 500 if quick else 2000
    n_sh = 2000 if quick else 8000
    radii = [0.25, 0.5, 1.0]
    sigma_grid = [0.125, 0.25, 0.5, 1.0]  # times r
    beta_grid = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
    sh = SmoothHess(net)

    def smoothhess_pair(x, sigma):
        torch.manual_seed(2)
        h, g = sh.attribute(x, n_samples=n_sh, stdevs=sigma, return_smoothgrad=True)
        return g, h

    def score(x, g, h, r):
        torch.manual_seed(3)
        return pmse(net, x, g, h, r, n_samples=n_pmse).mean().item()

    rows = []
    for r in radii:
        best_sigma = min(
            sigma_grid, key=lambda c: score(valid, *smoothhess_pair(valid, c * r), r)
        ) * r
        best_beta = min(beta_grid, key=lambda b: score(valid, *softplus_pair(net, valid, b), r))
        leaf = test.clone().requires_grad_(True)
        plain_grad = torch.autograd.grad(net(leaf).sum(), leaf)[0]
        g_sh, h_sh = smoothhess_pair(test, best_sigma)
        row = {
            "radius": r,
            "sigma": best_sigma,
            "beta": best_beta,
            "SmoothGrad + SmoothHess": score(test, g_sh, h_sh, r),
            "Softplus grad + Hessian": score(test, *softplus_pair(net, test, best_beta), r),
            "SmoothGrad only": score(test, g_sh, None, r),
            "gradient only": score(test, plain_grad, None, r),
        }
        rows.append(row)
    return {"model": f"{dim}-64-64-1 ReLU regression net", "train_mse": loss,
            "sampler": "uniform", "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    start = time.perf_counter()
    results = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }

    acc = error_vs_cost(device, args.quick)
    results["error_vs_cost"] = acc
    print(f"\n1. relative Frobenius error vs closed form (d={acc['d']}, {acc['k']} ReLUs, "
          f"sigma={acc['sigma']}, mean over seeds)")
    print(f"{'grad calls':>10} {'antithetic':>11} {'naive':>9} {'naive/anti':>10}")
    for row in acc["rows"]:
        print(f"{row['gradient_calls']:>10} {row['antithetic']:>11.4f} {row['naive']:>9.4f} "
              f"{row['naive_over_antithetic']:>10.2f}")

    tp = throughput(device, args.quick)
    results["throughput"] = tp
    print(f"\n2. throughput on the {tp['model']} (sigma={tp['sigma']})")
    print(f"{'N':>3} {'samples':>7} {'method':<42} {'s':>8} {'grad calls/s':>13} {'vs naive':>9}")
    for row in tp["rows"]:
        for name, val in row.items():
            if isinstance(val, dict):
                print(f"{row['examples']:>3} {row['n_samples']:>7} {name:<42} "
                      f"{val['seconds']:>8.3f} {val['gradient_calls_per_s']:>13.0f} "
                      f"{val['speedup_vs_naive_loop']:>8.2f}x")

    pm = pmse_comparison(device, args.quick)
    results["pmse"] = pm
    print(f"\n3. PMSE (uniform in the ball, test points) on a {pm['model']}, "
          f"train MSE {pm['train_mse']:.3f}")
    keys = ["SmoothGrad + SmoothHess", "Softplus grad + Hessian", "SmoothGrad only",
            "gradient only"]
    print(f"{'r':>5} {'sigma':>6} {'beta':>5} " + " ".join(f"{k:>24}" for k in keys))
    for row in pm["rows"]:
        print(f"{row['radius']:>5} {row['sigma']:>6.3f} {row['beta']:>5.0f} "
              + " ".join(f"{row[k]:>24.5f}" for k in keys))
    for row in pm["rows"]:
        row["smoothhess_over_gradient_only"] = row["SmoothGrad + SmoothHess"] / row["gradient only"]
        row["softplus_over_gradient_only"] = row["Softplus grad + Hessian"] / row["gradient only"]

    results["total_seconds"] = time.perf_counter() - start
    suffix = "" if device == "cpu" else "_" + device.split(":")[0]
    path = os.path.join(HERE, "results", f"smooth_hess{suffix}.json")
    print(f"\ntotal {results['total_seconds']:.0f} s")
    write_results(results, path)


if __name__ == "__main__":
    main()
