#!/usr/bin/env python3
"""Integrated Hessians: speed and completeness against a naive loop and path-explain.

For a softplus MLP with d = 10, 50, 100 inputs and N = 4 examples (float32):

- ``captum_interactions``: batched HVPs over a 16-point Gauss rule for the
  -ln(t) weight (default settings);
- ``bare batched HVPs``: the same rule with no checks at all, every path row
  in one forward + backward and one batched HVP (the floor; the issue's
  "IH time over its bare HVP cost"), timed alternately with ours (101 rounds;
  ``ours_over_bare_per_round`` is the median of the per-round ratios);
- ``naive loop``: the same quadrature, but one double-backward per feature per
  path point per example, the way a first implementation would do it;
- ``path-explain`` 0.0.7 (``interactions(x, baseline, num_samples=200,
  use_expectation=False)``), loaded from its file (the package imports
  TensorFlow at top level); skipped if it is not installed.

Also the grouped cost (G = 5 groups over d = 100). Prints a table and writes
``benchmarks/results/integrated_hessians_<device>.json``.

    python benchmarks/bench_integrated_hessians.py [--device cuda] [--quick]
"""
import argparse
import os
import sys

import torch
from torch import nn

from captum_interactions import IntegratedHessians
from _common import (  # noqa: E402
    device_name, load_path_explain, timed, timed_interleaved, write_results,
)
from captum_interactions._utils.quadrature import gauss_log_rule

HERE = os.path.dirname(os.path.abspath(__file__))


def softplus_mlp(d, hidden=64, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, hidden),
        nn.Softplus(beta=2.0),
        nn.Linear(hidden, hidden),
        nn.Softplus(beta=2.0),
        nn.Linear(hidden, 1),
    ).to(device)


def naive_integrated_hessians(model, x, baseline, n_steps=16):
    """One double-backward per feature, per path point, per example."""
    nodes, weights = gauss_log_rule(n_steps)
    n, d = x.shape
    out = torch.zeros(n, d, d, device=x.device, dtype=x.dtype)
    hvps = 0
    for e in range(n):
        delta = x[e] - baseline[e]
        for t, w in zip(nodes, weights):
            point = (baseline[e] + t * delta).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(point[None])[0, 0], point, create_graph=True)
            hess = torch.stack(
                [torch.autograd.grad(grad[j], point, retain_graph=True)[0] for j in range(d)]
            )
            hvps += d
            out[e] += w * (t * torch.outer(delta, delta) * hess + torch.diag(delta * grad.detach()))
    return out, hvps


def bare_integrated_hessians(model, x, baseline, n_steps=16):
    """The bare cost of the rule: every path row in one forward + backward with
    graph and one batched HVP over all d directions, no checks (the floor that
    ``IntegratedHessians`` is compared with)."""
    nodes, weights = gauss_log_rule(n_steps)
    t = torch.tensor(nodes, dtype=x.dtype, device=x.device)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    n, d = x.shape
    delta = x - baseline
    points = (baseline + t[:, None, None] * delta).reshape(-1, d).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(points).sum(), points, create_graph=True)
    rows_delta = delta.repeat(n_steps, 1)
    directions = torch.eye(d, dtype=x.dtype, device=x.device)[:, None, :] * rows_delta
    (hv,) = torch.autograd.grad(grad, points, directions, is_grads_batched=True)
    second = (hv.detach() * rows_delta).reshape(d, n_steps, n, d)  # (j, k, e, i)
    out = torch.einsum("k,jkei->eij", w * t, second)
    first = (grad.detach() * rows_delta).reshape(n_steps, n, d)
    out.diagonal(dim1=1, dim2=2).add_(torch.einsum("k,kei->ei", w, first))
    return out


def relative_completeness(model, gamma, x, baseline):
    with torch.no_grad():
        change = (model(x) - model(baseline))[:, 0]
    total = gamma.reshape(gamma.shape[0], -1).sum(1)
    return ((total - change).abs() / change.abs()).max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="d = 10, 50 only, fewer repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    dims = (10, 50) if args.quick else (10, 50, 100)
    n_examples = 4
    path_explainer = load_path_explain()
    rows = []
    for d in dims:
        model = softplus_mlp(d, device=device)
        torch.manual_seed(1)
        x = torch.randn(n_examples, d, device=device)
        baseline = torch.zeros(1, d, device=device)
        ih = IntegratedHessians(model)
        ih.attribute(x, baseline)  # warm-up
        bare_integrated_hessians(model, x, baseline.expand_as(x))
        repeats = 101 if not args.quick else 31  # medians of ms-scale calls
        # ours and the bare HVPs alternate, so that their ratio sees the same machine
        ((t_ours, gamma), (t_bare, gamma_bare)), (_, bare_over_ours) = timed_interleaved(
            [lambda: ih.attribute(x, baseline),
             lambda: bare_integrated_hessians(model, x, baseline.expand_as(x))],
            device, repeats,
        )
        rows.append(
            dict(
                d=d, method="captum_interactions", groups=None, seconds=t_ours,
                hvps=ih.last_call_cost.hvps, gradient_rows=ih.last_call_cost.gradient_rows,
                completeness_rel=relative_completeness(model, gamma, x, baseline),
            )
        )
        rows.append(
            dict(
                d=d, method="bare batched HVPs", groups=None, seconds=t_bare,
                ours_over_bare_per_round=1.0 / bare_over_ours,
                hvps=d * 16 * n_examples,
                completeness_rel=relative_completeness(model, gamma_bare, x, baseline),
                max_abs_diff_vs_ours=(gamma_bare - gamma).abs().max().item(),
            )
        )
        t_naive, (gamma_naive, hvps) = timed(
            lambda: naive_integrated_hessians(model, x, baseline.expand_as(x)), device, 1
        )
        rows.append(
            dict(
                d=d, method="naive loop", groups=None, seconds=t_naive, hvps=hvps,
                completeness_rel=relative_completeness(model, gamma_naive, x, baseline),
                max_abs_diff_vs_ours=(gamma_naive - gamma).abs().max().item(),
            )
        )
        if path_explainer is not None:
            explainer = path_explainer(model)
            x_req = x.clone().requires_grad_(True)
            try:
                t_pe, gamma_pe = timed(
                    lambda: explainer.interactions(
                        x_req, baseline, num_samples=200, use_expectation=False, verbose=False
                    ).detach(),
                    device,
                    3,
                )
                rows.append(
                    dict(
                        d=d, method="path-explain 0.0.7", groups=None, seconds=t_pe,
                        hvps=None,
                        completeness_rel=relative_completeness(model, gamma_pe, x, baseline),
                    )
                )
            except Exception as err:  # report, do not hide, a peer failure
                rows.append(dict(d=d, method="path-explain 0.0.7", error=repr(err)))
        if d == 100 or (args.quick and d == dims[-1]):
            mask = (torch.arange(d, device=device) * 5 // d).view(1, d)
            t_group, gamma_g = timed(
                lambda: ih.attribute(x, baseline, feature_mask=mask), device, 5
            )
            rows.append(
                dict(
                    d=d, method="captum_interactions grouped", groups=5, seconds=t_group,
                    hvps=ih.last_call_cost.hvps,
                    completeness_rel=relative_completeness(model, gamma_g, x, baseline),
                )
            )
    by_key = {(r["d"], r["method"]): r for r in rows}
    for r in rows:
        ours = by_key.get((r["d"], "captum_interactions"))
        if "seconds" in r and ours:
            r["time_vs_ours"] = r["seconds"] / ours["seconds"]
    header = f"{'d':>4} {'method':<30} {'seconds':>9} {'x ours':>8} {'HVPs':>7} {'completeness':>13}"
    print(f"Integrated Hessians, softplus MLP d->64->64->1, N={n_examples}, float32, device={device}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['d']:>4} {r['method']:<30} failed: {r['error'][:60]}")
            continue
        hvps = "-" if r.get("hvps") is None else str(r["hvps"])
        print(
            f"{r['d']:>4} {r['method']:<30} {r['seconds']:>9.4f} {r['time_vs_ours']:>8.1f} "
            f"{hvps:>7} {r['completeness_rel']:>13.2e}"
        )
    print("ours / bare HVPs, median over alternating rounds: " + ", ".join(
        f"d={r['d']} {r['ours_over_bare_per_round']:.2f}x"
        for r in rows if "ours_over_bare_per_round" in r
    ))
    result = dict(
        benchmark="integrated_hessians",
        device=device,
        device_name=device_name(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        n_examples=n_examples,
        n_steps=16,
        rows=rows,
    )
    out = args.out or os.path.join(HERE, "results", f"integrated_hessians_{device.split(':')[0]}.json")
    write_results(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
