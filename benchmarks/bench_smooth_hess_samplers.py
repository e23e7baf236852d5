#!/usr/bin/env python3
"""SmoothHess estimators: error against gradient calls, and calls to a target error.

Every estimator is unbiased (tests/test_smooth_hess.py checks it against the
closed forms), so its error is its spread. For each estimator and budget of
gradient calls per example, the relative Frobenius error ||H_hat - H||_F / ||H||_F
(root mean square over repeats) is measured

- on closed forms, against the exact smoothed Hessian:
  ``relu_sum`` (sum_k a_k relu(w_k.x + b_k), d = 20), ``relu_product``
  (relu(x1) relu(x2)) and ``max`` (max(x1, x2));
- on a 784-500-300-10 ReLU MLP (random weights, logit 3), where no closed form
  exists: the mean squared error of an unbiased estimator is its variance,
  E||H_hat - H||^2 = E||H_hat_r - H_hat_s||^2 / 2 over independent repeats r, s,
  so the error comes from the spread between repeats, against the norm of
  their pooled mean, with no long reference run.

The estimators: ``gaussian`` with antithetic pairs is the reference
implementation's estimator (Torop et al.: i.i.d. Stein sampling, antithetic);
``plain`` drops the pairs; ``orthogonal`` and ``sobol`` are this library's
variance-reduced samplers; ``+ subspace`` projects the noise onto the input
subspace the model sees (``input_subspace``: automatic for an ``nn.Sequential``
starting with ``nn.Linear``, or an explicit W for the closed form with fewer
units than features); ``+ cv`` adds the first-layer ReLU control variate
(``control_variate``); ``+ importance`` draws the noise from the wider
N(0, tau^2 I), tau^2 = 1 + 2.5 / r, with exact density-ratio weights
(``importance="auto"``, generic: no structure needed); the rows without it
pass ``importance=None``; ``+ fit`` adds the cross-fitted ReLU surrogate
(``control_variate="fit"``, generic too, opt-in: ``auto`` never fits, so on
the plain functions in 20 features ``auto`` is orthogonal + importance).
``auto (default)`` is what ``SmoothHess.attribute``
does with no options. The closed forms are plain functions (no structure to
detect), except ``relu_sum as nn.Sequential``, where the control variate is f
itself (one hidden layer) and the estimate is exact.

The calls each estimator needs for 10%, 3% and 1%: interpolated (log-log)
between the two measured budgets around the target; beyond the largest budget
extrapolated with error = c / sqrt(calls) from it, below the smallest one
with the same law from it (both marked ``extrapolated``); the ratio is the
reference estimator's calls over the estimator's. An estimator whose error
is round-off (< 1e-10) at every budget is marked ``exact``.

    python benchmarks/bench_smooth_hess_samplers.py [--quick] [--device cuda]
"""
import argparse
import math
import os
import time

import torch
from torch import nn

from captum_interactions import SmoothHess
from _common import device_name, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OFF = dict(input_subspace=None, control_variate=None, importance=None)
IMP = dict(input_subspace=None, control_variate=None)  # importance="auto"
REFERENCE = "gaussian (reference)"
ESTIMATORS = {
    REFERENCE: dict(sampler="gaussian", antithetic=True, **OFF),
    "orthogonal": dict(sampler="orthogonal", antithetic=True, **OFF),
    "sobol": dict(sampler="sobol", antithetic=True, **OFF),
    "gaussian + importance": dict(sampler="gaussian", antithetic=True, **IMP),
    "orthogonal + importance": dict(sampler="orthogonal", antithetic=True, **IMP),
    "sobol + importance": dict(sampler="sobol", antithetic=True, **IMP),
    "orthogonal + importance + fit": dict(
        sampler="orthogonal", antithetic=True, input_subspace=None, control_variate="fit"
    ),
    "sobol + importance + fit": dict(
        sampler="sobol", antithetic=True, input_subspace=None, control_variate="fit"
    ),
    "auto (default)": dict(),
}
# the fitted surrogate with the sampler "auto" takes in each dimension
ONLY_IN_2D = ("sobol + importance + fit",)
# orthogonal frames of 2 directions are slow to draw and no better than i.i.d.
SKIP_IN_2D = ("orthogonal + importance", "orthogonal + importance + fit")
MLP_ESTIMATORS = {
    REFERENCE: dict(sampler="gaussian", **OFF),
    "orthogonal": dict(sampler="orthogonal", **OFF),
    "orthogonal + subspace": dict(sampler="orthogonal", control_variate=None, importance=None),
    "gaussian + subspace + cv": dict(sampler="gaussian", importance=None),
    "auto (default)": dict(),
}
EXACT = 1e-10
TARGETS = (0.10, 0.03, 0.01)
SQRT2PI = math.sqrt(2 * math.pi)


def _phi(t):
    return torch.exp(-0.5 * t * t) / SQRT2PI


def _cdf(t):
    return 0.5 * (1 + torch.erf(t / math.sqrt(2)))


def _smoothed_relu(u, s):
    return s * _phi(u / s) + u * _cdf(u / s)


def closed_forms(device, dtype):
    """(name, model, points, sigma, exact smoothed Hessian)."""
    gen = torch.Generator().manual_seed(0)
    d, k = 20, 64
    w = torch.randn(k, d, generator=gen, dtype=dtype) / math.sqrt(d)
    b = 0.5 * torch.randn(k, generator=gen, dtype=dtype)
    a = torch.randn(k, generator=gen, dtype=dtype)
    w, b, a = w.to(device), b.to(device), a.to(device)
    x = torch.randn(4, d, generator=gen, dtype=dtype).to(device)
    sigma = 0.5
    s = sigma * w.norm(dim=1)
    h_sum = torch.einsum("k,nk,ki,kj->nij", a, _phi((x @ w.T + b) / s) / s, w, w)
    yield "relu_sum (d=20)", (lambda v: torch.relu(v @ w.T + b) @ a), x, sigma, h_sum, {}

    # the same sum as nn.Sequential(Linear, ReLU, Linear): "auto" detects it
    # and the control variate is f itself
    net = nn.Sequential(nn.Linear(d, k), nn.ReLU(), nn.Linear(k, 1, bias=False))
    net = net.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        net[0].weight.copy_(w)
        net[0].bias.copy_(b)
        net[2].weight.copy_(a[None])
    yield "relu_sum as nn.Sequential (d=20)", net, x, sigma, h_sum, {"target": 0}

    # fewer units than features: the model sees 8 of the 20 directions
    k8 = 8
    w8 = torch.randn(k8, d, generator=gen, dtype=dtype).to(device) / math.sqrt(d)
    b8 = (0.5 * torch.randn(k8, generator=gen, dtype=dtype)).to(device)
    a8 = torch.randn(k8, generator=gen, dtype=dtype).to(device)
    s8 = sigma * w8.norm(dim=1)
    h8 = torch.einsum("k,nk,ki,kj->nij", a8, _phi((x @ w8.T + b8) / s8) / s8, w8, w8)
    yield (
        "relu_sum, 8 units (d=20)", (lambda v: torch.relu(v @ w8.T + b8) @ a8), x,
        sigma, h8, {"subspace": w8},
    )

    sigma = 0.1
    x2 = torch.tensor([[0.05, 0.1], [-0.1, 0.2], [0.3, -0.05]], dtype=dtype, device=device)
    m1, m2 = _smoothed_relu(x2[:, 0], sigma), _smoothed_relu(x2[:, 1], sigma)
    c1, c2 = _cdf(x2[:, 0] / sigma), _cdf(x2[:, 1] / sigma)
    h_prod = torch.stack(
        [
            torch.stack([_phi(x2[:, 0] / sigma) / sigma * m2, c1 * c2], -1),
            torch.stack([c1 * c2, _phi(x2[:, 1] / sigma) / sigma * m1], -1),
        ],
        -2,
    )
    yield "relu_product (d=2)", (lambda v: torch.relu(v[:, 0]) * torch.relu(v[:, 1])), x2, sigma, h_prod, {}

    # max(x1, x2) = x2 + relu(x1 - x2): the Hessian of a smoothed relu along (1, -1)
    direction = torch.tensor([1.0, -1.0], dtype=dtype, device=device)
    s = sigma * math.sqrt(2.0)
    u = x2 @ direction
    h_max = (_phi(u / s) / s)[:, None, None] * torch.outer(direction, direction)
    yield "max (d=2)", (lambda v: torch.maximum(v[:, 0], v[:, 1])), x2, sigma, h_max, {}


def relative_error_exact(forward, x, sigma, truth, calls, repeats, options, target=None):
    sh = SmoothHess(forward)
    errors = []
    for r in range(repeats):
        torch.manual_seed(1000 + r)
        h = sh.attribute(x, target=target, n_samples=calls, stdevs=sigma, **options)
        errors.append(((h - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)) ** 2)
    return torch.stack(errors).mean().sqrt().item()


def relative_error_spread(forward, x, sigma, calls, repeats, options, target):
    sh = SmoothHess(forward)
    runs = []
    for r in range(repeats):
        torch.manual_seed(2000 + r)
        runs.append(sh.attribute(x, target=target, n_samples=calls, stdevs=sigma, **options))
    runs = torch.stack(runs)  # (R, N, D, D)
    mean = runs.mean(0)
    # unbiased: E||H_hat - H||^2 = R/(R-1) * mean_r ||H_r - mean||^2
    mse = (runs - mean).flatten(2).pow(2).sum(-1).mean(0) * repeats / (repeats - 1)
    return (mse.sqrt() / mean.flatten(1).norm(dim=1)).pow(2).mean().sqrt().item()


def calls_to_reach(budgets, errors):
    """Calls for each target: log-log interpolation between the measured budgets
    around it, else error = c / sqrt(calls) from the nearest end."""
    out = {}
    exact = max(errors) < EXACT
    for target in TARGETS:
        entry = {"extrapolated": False, "exact": exact}
        if exact:
            entry["calls"] = 2  # one antithetic pair already gives round-off error
        elif errors[0] <= target:
            entry["calls"] = budgets[0] * (errors[0] / target) ** 2
            entry["extrapolated"] = True
        elif errors[-1] > target:
            entry["calls"] = budgets[-1] * (errors[-1] / target) ** 2
            entry["extrapolated"] = True
        else:
            i = next(i for i, e in enumerate(errors) if e <= target) - 1
            n0, n1, e0, e1 = budgets[i], budgets[i + 1], errors[i], errors[i + 1]
            frac = math.log(e0 / target) / math.log(e0 / e1)
            entry["calls"] = math.exp(math.log(n0) + frac * math.log(n1 / n0))
        entry["calls"] = max(2, int(math.ceil(entry["calls"])))
        out[f"{target:g}"] = entry
    return out

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=8,
                        help="repeats per budget on the closed forms")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: MKL's QR/SVD stall when threads are oversubscribed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budgets = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384, 65536]
    repeats = 6 if args.quick else args.repeats
    cases = []
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 10)
    ).to(device).eval()
    x = torch.rand(1 if args.quick else 2, 784, device=device)
    mlp_budgets = [1024, 4096] if args.quick else [4096, 16384, 65536]
    mlp_repeats = 3
    case = {"case": "MLP 784-500-300-10 (float32, logit 3)", "sigma": 0.1,
            "examples": x.shape[0], "estimators": {}}
    for est, options in MLP_ESTIMATORS.items():
        t0 = time.perf_counter()
        errors = [
            relative_error_spread(mlp, x, 0.1, n, mlp_repeats, options, target=3)
            for n in mlp_budgets
        ]
        case["estimators"][est] = {
            "errors": errors,
            "to_reach": calls_to_reach(mlp_budgets, errors),
            "seconds": time.perf_counter() - t0,
        }
    cases.append(case)
    _print_case(case, mlp_budgets)
    for name, forward, x, sigma, truth, extra in closed_forms(device, torch.float64):
        case = {"case": name, "sigma": sigma, "examples": x.shape[0], "estimators": {}}
        estimators = dict(ESTIMATORS)
        if "subspace" in extra:
            estimators["orthogonal + subspace W"] = dict(
                sampler="orthogonal", input_subspace=extra["subspace"], importance=None
            )
            estimators["auto + subspace W"] = dict(input_subspace=extra["subspace"])
        if name.startswith("relu_sum as"):  # only what differs from relu_sum
            estimators = {k: estimators[k] for k in (REFERENCE, "auto (default)")}
        if x.shape[1] == 2:
            estimators = {k: v for k, v in estimators.items() if k not in SKIP_IN_2D}
        else:
            estimators = {k: v for k, v in estimators.items() if k not in ONLY_IN_2D}
        for est, options in estimators.items():
            t0 = time.perf_counter()
            errors = [
                relative_error_exact(
                    forward, x, sigma, truth, n, repeats, options, extra.get("target")
                )
                for n in budgets
            ]
            case["estimators"][est] = {
                "errors": errors,
                "to_reach": calls_to_reach(budgets, errors),
                "seconds": time.perf_counter() - t0,
            }
        cases.append(case)
        _print_case(case, budgets)

    _print_and_write(cases, budgets, mlp_budgets, repeats, mlp_repeats, device, args)


def _print_case(case, ns):
    """Print one case's table (as it finishes) and add the ratios to it."""
    print(f"\n{case['case']}  (sigma {case['sigma']}, {case['examples']} points)")
    print(f"{'estimator':26s}" + "".join(f"{n:>9d}" for n in ns)
          + "".join(f"{'to ' + k:>16s}" for k in ("10%", "3%", "1%")))
    ref = case["estimators"][REFERENCE]["to_reach"]
    for est, row in case["estimators"].items():
        cells = []
        for key in ("0.1", "0.03", "0.01"):
            calls = row["to_reach"][key]["calls"]
            ratio = ref[key]["calls"] / calls
            mark = "~" if row["to_reach"][key]["extrapolated"] else ""
            if row["to_reach"][key]["exact"]:
                cells.append("exact")
            else:
                cells.append(f"{mark + str(calls):>8s} ({ratio:4.1f}x)")
            row["to_reach"][key]["fewer_calls_than_reference"] = ratio
        print(f"{est:26s}" + "".join(f"{e:9.2g}" for e in row["errors"])
              + "".join(f"{c:>16s}" for c in cells), flush=True)


def _print_and_write(cases, budgets, mlp_budgets, repeats, mlp_repeats, device, args):
    print("\nerror: relative Frobenius error (RMS over repeats); '~': extrapolated "
          "with error = c/sqrt(calls); (Nx): reference calls / estimator calls")
    result = {
        "device": device_name(device), "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "budgets": budgets, "mlp_budgets": mlp_budgets,
        "repeats": repeats, "mlp_repeats": mlp_repeats, "quick": args.quick,
        "cases": cases,
    }
    name = "smooth_hess_samplers" + ("_quick" if args.quick else "")
    write_results(result, args.out or os.path.join(HERE, "results", name + ".json"))


if __name__ == "__main__":
    main()
