#!/usr/bin/env python3
"""Interaction detection against known ground truth, for every pairwise method
of captum_interactions and for the peers (path_explain, shapiq, acd) in the same run.

Functions with known interacting pairs:

- Archipelago's synthetic functions (Tsang, Rambhatla, Liu, NeurIPS 2020):
  p = 40, q = 10, x in {-1, +1}^40, explained at x = +1 against the baseline -1,
  every function adding sum_i x_i (features 1-based in the formulas, 0-based in code):
    synth1: sum_{i,j<=q} x_i x_j + sum_{i in (q,2q], j in (2q,3q]} x_i x_j
    synth2: AND(x_1..x_2q = +1) + AND(x_{q+1}..x_3q = +1)
    synth3: AND(x_1..x_2q = -1) + AND(x_{q+1}..x_3q = +1)
    synth4: AND(x_1 = x_2 = +1, x_3 = -1) + AND(x_{q+1}..x_3q = +1)
  (AND returns +1 or -1.) Ground truth: every pair inside one AND's block (for
  synth1's product terms: the pairs the products couple).
- path_explain's pairwise functions: x ~ N(0, I) in D = 10 dimensions,
  y = sum over three chosen disjoint pairs of c * g(x_i, x_j), g in {xy, max, min,
  (x+y)^2, x sign(y), cos(x+y), tanh(x+y)}, baseline 0 (EH: N(0, I) background).

Each function is explained as given (an analytic torch function: the ANDs are step
functions, with zero gradient and Hessian almost everywhere) and through small
MLPs trained on it in this script (softplus and ReLU variants).

Scores: a pair's score is |Gamma_ij + Gamma_ji| (|H_ij| for Hessians, |CD
interaction| for CD, |value of {i, j}| for shapiq), pairs i < j. ROC-AUC and
precision@k (k = number of true pairs) are tie-aware: tied scores count as a
random order (all-zero scores give AUC 0.5 and the base rate), averaged over the
explained examples.

Cost: ``evals/ex`` counts the model's forward rows per example (a counting
wrapper around the model; for shapiq, the coalitions evaluated; for acd, one per
decomposition). Gradient methods also backpropagate: ``passes/ex`` adds, per
method's formula, the backward and Hessian-vector products (IH: n_steps x (1 + D)
passes; EH: n_samples x (1 + D); SmoothHess: n_samples gradients; HOPE: jets, one
forward of K + 1 coefficients per direction; path_explain: measured gradient calls).
shapiq's approximators get the budget of our IH: n_steps x (1 + D) model calls.

Usage: ``python benchmarks/bench_ground_truth.py [--quick] [--out PATH]``.
"""
import argparse
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import device_name, load_acd_cd, load_path_explain, write_results  # noqa: E402

from captum_interactions import (  # noqa: E402
    HOPE,
    ContextualDecomposition,
    ExpectedHessians,
    IntegratedHessians,
    SmoothHess,
    replace_relu_with_softplus,
)

Pair = Tuple[int, int]

P, Q = 40, 10
PATH_D = 10
SOFTPLUS_BETA = 10.0


# ----------------------------------------------------------------------------- functions
class Synth(nn.Module):
    """Archipelago's synth1-4 as an analytic torch function of (N, 40) inputs -> (N, 1)."""

    def __init__(self, which: int) -> None:
        super().__init__()
        self.which = which

    @staticmethod
    def _and(x: torch.Tensor, signs: Sequence[Tuple[int, float]]) -> torch.Tensor:
        idx = torch.tensor([i for i, _ in signs])
        want = torch.tensor([s for _, s in signs], dtype=x.dtype)
        on = (x[:, idx] * want > 0).all(dim=1)
        return on.to(x.dtype) * 2.0 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = Q
        out = x.sum(dim=1)
        if self.which == 1:
            out = out + x[:, :q].sum(1) ** 2 + x[:, q:2 * q].sum(1) * x[:, 2 * q:3 * q].sum(1)
        else:
            block2 = [(i, 1.0) for i in range(q, 3 * q)]
            if self.which == 2:
                first = [(i, 1.0) for i in range(2 * q)]
            elif self.which == 3:
                first = [(i, -1.0) for i in range(2 * q)]
            else:
                first = [(0, 1.0), (1, 1.0), (2, -1.0)]
            out = out + self._and(x, first) + self._and(x, block2)
        return out.unsqueeze(1)


def synth_truth(which: int) -> Set[Pair]:
    q = Q

    def block(members: Sequence[int]) -> Set[Pair]:
        return {(i, j) for i in members for j in members if i < j}

    if which == 1:
        return block(range(q)) | {(i, j) for i in range(q, 2 * q) for j in range(2 * q, 3 * q)}
    first = range(3) if which == 4 else range(2 * q)
    return block(first) | block(range(q, 3 * q))


PAIR_FUNCS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "xy": lambda a, b: a * b,
    "max": torch.maximum,
    "min": torch.minimum,
    "(x+y)^2": lambda a, b: (a + b) ** 2,
    "x*sign(y)": lambda a, b: a * torch.sign(b),
    "cos(x+y)": lambda a, b: torch.cos(a + b),
    "tanh(x+y)": lambda a, b: torch.tanh(a + b),
}
PATH_PAIRS: List[Pair] = [(0, 3), (2, 7), (5, 9)]
PATH_COEFS = [1.0, -0.8, 0.6]


class PairFunction(nn.Module):
    """y = sum_k c_k g(x_i, x_j) over the chosen pairs, (N, D) -> (N, 1)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.g = name, PAIR_FUNCS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0.0
        for (i, j), c in zip(PATH_PAIRS, PATH_COEFS):
            out = out + c * self.g(x[:, i], x[:, j])
        return out.unsqueeze(1)


def mlp(d: int, activation: str) -> nn.Module:
    act = nn.Softplus if activation == "softplus" else nn.ReLU
    return nn.Sequential(nn.Linear(d, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 1))


def synth_training_data(n: int, gen: torch.Generator) -> torch.Tensor:
    """{-1, +1}^40 points near all -1, all +1 and uniform (flip rate ~ U(0, 0.5)),
    so the AND blocks (probability 2^-20 under uniform sampling) are represented."""
    centre = torch.randint(0, 3, (n, 1), generator=gen)
    base = torch.where(centre == 0, -1.0, 1.0).expand(n, P).clone()
    uniform = torch.randint(0, 2, (n, P), generator=gen).float() * 2 - 1
    base = torch.where(centre == 2, uniform, base)
    flip = torch.rand(n, P, generator=gen) < torch.rand(n, 1, generator=gen) * 0.5
    return torch.where(flip, -base, base)


def train(func: nn.Module, x: torch.Tensor, activation: str, steps: int, seed: int
          ) -> Tuple[nn.Module, float]:
    """An MLP fitted to ``func`` on ``x`` (full-batch Adam); returns (model, R^2)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        y = func(x)
    mean, scale = y.mean(), y.std().clamp_min(1e-8)
    model = mlp(x.shape[1], activation)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - (y - mean) / scale) ** 2).mean()
        loss.backward()
        opt.step()
    # fold the target scaling into the last layer, so the model predicts y itself
    with torch.no_grad():
        model[-1].weight.mul_(scale)
        model[-1].bias.mul_(scale).add_(mean)
        r2 = 1.0 - float(((model(x) - y) ** 2).mean() / y.var())
    return model.eval(), r2


# ----------------------------------------------------------------------------- scoring
def pair_scores(matrix: torch.Tensor, combine: bool) -> np.ndarray:
    """Scores of the pairs i < j from a (D, D) matrix."""
    m = matrix.detach().double().cpu()
    i, j = torch.triu_indices(m.shape[0], m.shape[0], offset=1)
    s = (m[i, j] + m[j, i]) if combine else m[i, j]
    return s.abs().numpy()


def auc_and_precision(scores: np.ndarray, truth: np.ndarray) -> Tuple[float, float]:
    """Tie-aware ROC-AUC (Mann-Whitney) and expected precision@k (k = #true)
    when tied scores are ordered at random. Scores below 1e-10 x the largest are 0."""
    s = np.where(np.isfinite(scores), scores, 0.0)
    top = s.max() if s.size else 0.0
    s = np.where(s <= 1e-10 * top, 0.0, s)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    start = 0
    while start < len(s):  # average ranks over ties
        stop = start
        while stop + 1 < len(s) and sorted_s[stop + 1] == sorted_s[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    auc = (ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    k = n_pos
    threshold = np.sort(s)[::-1][k - 1]
    above = s > threshold
    tied = s == threshold
    hits = truth[above].sum() + (k - above.sum()) * truth[tied].sum() / tied.sum()
    return float(auc), float(hits / k)


# ----------------------------------------------------------------------------- counting
class Counted(nn.Module):
    """Counts the rows the wrapped model is evaluated on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


# ----------------------------------------------------------------------------- methods
class Case:
    """One function (analytic or an MLP) with its explained inputs and ground truth."""

    def __init__(self, family: str, function: str, variant: str, model: nn.Module,
                 inputs: torch.Tensor, baseline: torch.Tensor, background: torch.Tensor,
                 truth: Set[Pair], fit_r2: Optional[float]) -> None:
        self.family, self.function, self.variant = family, function, variant
        self.model, self.inputs, self.baseline = model, inputs, baseline
        self.background, self.fit_r2 = background, fit_r2
        d = inputs.shape[1]
        i, j = torch.triu_indices(d, d, offset=1)
        self.truth = np.array([(int(a), int(b)) in truth for a, b in zip(i, j)])
        self.num_true = len(truth)

    @property
    def name(self) -> str:
        return f"{self.function}/{self.variant}"


def run_ours(case: Case, cfg: dict) -> Dict[str, Tuple]:
    """{method: (list of per-example score vectors, rows, passes per example, note)}."""
    d = case.inputs.shape[1]
    n = case.inputs.shape[0]
    results = {}
    relu = case.variant == "relu-mlp"
    n_steps, n_eh = cfg["n_steps"], cfg["eh_samples"]

    def run(name: str, fn: Callable[[nn.Module], torch.Tensor], passes: float,
            combine: bool = True, smooth: bool = False) -> None:
        counted = Counted(case.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # non-smooth warnings: expected on the ReLU MLPs
                start = time.perf_counter()
                if smooth:
                    with replace_relu_with_softplus(counted, beta=SOFTPLUS_BETA):
                        out = fn(counted)
                else:
                    out = fn(counted)
                elapsed = time.perf_counter() - start
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
            results[name] = (None, 0, 0, f"n/a: {type(err).__name__}: {str(err).splitlines()[0][:90]}")
            return
        scores = [pair_scores(out[k], combine) for k in range(n)]
        results[name] = (scores, counted.rows / n, passes, elapsed / n)

    ih_passes = n_steps * (1 + d)
    run("IH", lambda m: IntegratedHessians(m).attribute(
        case.inputs, baselines=case.baseline, target=0, n_steps=n_steps), ih_passes)
    torch.manual_seed(0)
    run("EH", lambda m: ExpectedHessians(m).attribute(
        case.inputs, baselines=case.background, target=0, n_samples=n_eh), n_eh * (1 + d))
    torch.manual_seed(0)
    run("SmoothHess", lambda m: SmoothHess(m).attribute(
        case.inputs, target=0, stdevs=cfg["sigma"], n_samples=ih_passes), ih_passes)
    run("HOPE-2", lambda m: HOPE(m).attribute(case.inputs, order=2, target=0),
        d * (d + 1) / 2)
    if case.variant != "analytic":
        run("CD", lambda m: ContextualDecomposition(m).interactions(case.inputs, target=0),
            d + d * (d - 1) / 2, combine=False)
    if relu:
        run(f"IH softplus(b={SOFTPLUS_BETA:g})", lambda m: IntegratedHessians(m).attribute(
            case.inputs, baselines=case.baseline, target=0, n_steps=n_steps), ih_passes,
            smooth=True)
        torch.manual_seed(0)
        run(f"EH softplus(b={SOFTPLUS_BETA:g})", lambda m: ExpectedHessians(m).attribute(
            case.inputs, baselines=case.background, target=0, n_samples=n_eh),
            n_eh * (1 + d), smooth=True)
    return results


def run_path_explain(case: Case, cfg: dict) -> Dict[str, Tuple]:
    explainer_cls = load_path_explain()
    if explainer_cls is None:
        return {"path_explain IH": (None, 0, 0, "n/a: path_explain not installed")}
    results = {}
    n = case.inputs.shape[0]
    ns = cfg["pe_samples"]
    for name, use_expectation, baseline in (
        ("path_explain IH", False, case.baseline[:1]),
        ("path_explain EH", True, case.background),
    ):
        counted = Counted(case.model)
        explainer = explainer_cls(counted)
        np.random.seed(0)
        torch.manual_seed(0)
        try:
            start = time.perf_counter()
            out = explainer.interactions(
                case.inputs.clone().requires_grad_(True), baseline, num_samples=ns,
                use_expectation=use_expectation,
                output_indices=torch.zeros(n, dtype=torch.long), verbose=False)
            elapsed = time.perf_counter() - start
        except Exception as err:  # a peer failing is reported, not fatal
            results[name] = (None, 0, 0, f"n/a: {type(err).__name__}: {str(err)[:80]}")
            continue
        inner = int(round(math.sqrt(ns)))
        d = case.inputs.shape[1]
        passes = inner * inner + inner * d  # inner gradients per outer point + D second grads
        scores = [pair_scores(torch.as_tensor(out[k]), True) for k in range(n)]
        results[name] = (scores, counted.rows / n, passes, elapsed / n)
    return results


def run_shapiq(case: Case, cfg: dict) -> Dict[str, Tuple]:
    try:
        import shapiq
    except ImportError:
        return {"shapiq": (None, 0, 0, "n/a: shapiq not installed")}
    d = case.inputs.shape[1]
    n = case.inputs.shape[0]
    budget = cfg["n_steps"] * (1 + d)
    exact = d <= cfg["shapiq_exact_max_players"]
    results: Dict[str, Tuple] = {}
    methods: List[Tuple[str, Callable]] = []
    if exact:
        for index in ("k-SII", "STII", "FSII"):
            methods.append((f"shapiq {index} exact", index))
    else:
        methods += [
            ("shapiq k-SII KernelSHAPIQ", lambda: shapiq.KernelSHAPIQ(
                n=d, max_order=2, index="k-SII", random_state=0)),
            ("shapiq STII PermutationSampling", lambda: shapiq.PermutationSamplingSTII(
                n=d, max_order=2, random_state=0)),
            ("shapiq FSII RegressionFSII", lambda: shapiq.RegressionFSII(
                n=d, max_order=2, random_state=0)),
        ]
    for name, make in methods:
        rows = [0]
        scores, elapsed = [], 0.0
        for k in range(n):
            x, b = case.inputs[k], case.baseline[min(k, case.baseline.shape[0] - 1)]

            def game(coalitions: np.ndarray) -> np.ndarray:
                z = torch.as_tensor(np.atleast_2d(coalitions), dtype=torch.bool)
                rows[0] += z.shape[0]
                with torch.no_grad():
                    return case.model(torch.where(z, x, b)).squeeze(1).double().numpy()

            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exact:
                    computer = shapiq.ExactComputer(game, n_players=d)
                    iv = computer(make, order=2)
                else:
                    iv = make().approximate(budget, game)
            elapsed += time.perf_counter() - start
            values = iv.dict_values
            pair_values = [abs(values.get((i, j), 0.0)) for i in range(d) for j in range(i + 1, d)]
            scores.append(np.array(pair_values))
        results[name] = (scores, rows[0] / n, rows[0] / n, elapsed / n)
    if not exact:
        results["shapiq exact"] = (None, 0, 0, f"n/a: 2^{d} coalitions per example "
                                   "(infeasible)")
    return results


_ACD: List[Optional[Callable]] = []


def run_acd(case: Case, cfg: dict) -> Dict[str, Tuple]:
    if case.variant == "analytic":
        return {"acd CD": (None, 0, 0, "n/a: needs a network of nn layers")}
    if not _ACD:  # loaded once: a second load finds its stand-in package
        _ACD.append(load_acd_cd())
    acd_cd = _ACD[0]
    if acd_cd is None:
        return {"acd CD": (None, 0, 0, "n/a: acd not installed")}
    d = case.inputs.shape[1]
    n = case.inputs.shape[0]
    model = case.model
    if isinstance(model[1], nn.Softplus):
        return {"acd CD": (None, 0, 0, "n/a: acd 0.0.2 has no rule for Softplus")}
    scores, calls = [], 0
    start = time.perf_counter()
    for k in range(n):
        x = case.inputs[k:k + 1]

        def cd_score(members: Sequence[int]) -> float:
            nonlocal calls
            calls += 1
            mask = np.zeros(d)
            mask[list(members)] = 1
            rel, _ = acd_cd(x, model, mask=torch.tensor(mask, dtype=torch.float32), device="cpu")
            return float(rel.detach().flatten()[0])

        single = [cd_score([i]) for i in range(d)]
        vals = [cd_score([i, j]) - single[i] - single[j]
                for i in range(d) for j in range(i + 1, d)]
        scores.append(np.abs(np.array(vals)))
    elapsed = time.perf_counter() - start
    return {"acd CD": (scores, calls / n, calls / n, elapsed / n)}


# ----------------------------------------------------------------------------- driver
def build_cases(cfg: dict) -> List[Case]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    x_synth = torch.ones(1, P)
    baseline_synth = -torch.ones(1, P)
    background_synth = torch.randint(0, 2, (cfg["background"], P), generator=gen).float() * 2 - 1
    train_synth = synth_training_data(cfg["train_n"], gen)
    for which in cfg["synth"]:
        func = Synth(which)
        truth = synth_truth(which)
        cases.append(Case("archipelago", f"synth{which}", "analytic", func, x_synth,
                          baseline_synth, background_synth, truth, None))
        for act in ("softplus", "relu"):
            model, r2 = train(func, train_synth, act, cfg["train_steps"], seed=which)
            cases.append(Case("archipelago", f"synth{which}", f"{act}-mlp", model, x_synth,
                              baseline_synth, background_synth, truth, r2))
    x_path = torch.randn(cfg["path_examples"], PATH_D, generator=gen)
    background_path = torch.randn(cfg["background"], PATH_D, generator=gen)
    train_path = torch.randn(cfg["train_n"], PATH_D, generator=gen)
    truth = set(PATH_PAIRS)
    for name in cfg["pair_funcs"]:
        func = PairFunction(name)
        cases.append(Case("path_explain", name, "analytic", func, x_path,
                          torch.zeros(1, PATH_D), background_path, truth, None))
        for act in ("softplus", "relu"):
            model, r2 = train(func, train_path, act, cfg["train_steps"], seed=len(name))
            cases.append(Case("path_explain", name, f"{act}-mlp", model, x_path,
                              torch.zeros(1, PATH_D), background_path, truth, r2))
    return cases


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer functions and examples")
    parser.add_argument("--out", default=None, help="results JSON path")
    args = parser.parse_args(argv)
    # one thread: on a shared, loaded machine two threads spin and run ~10x slower
    torch.set_num_threads(1)
    cfg = dict(n_steps=32, eh_samples=32, sigma=0.5, pe_samples=256, background=256,
               train_n=4096, train_steps=400, path_examples=4, shapiq_exact_max_players=12,
               synth=[1, 2, 3, 4], pair_funcs=list(PAIR_FUNCS))
    if args.quick:
        cfg.update(train_n=2048, train_steps=200, path_examples=2, synth=[1, 2],
                   pair_funcs=["xy", "max", "cos(x+y)"], pe_samples=64)
    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        "ground_truth_quick.json" if args.quick else "ground_truth.json")
    t0 = time.perf_counter()
    cases = build_cases(cfg)
    print(f"built {len(cases)} cases in {time.perf_counter() - t0:.1f}s")
    rows = []
    for case in cases:
        found = {}
        for runner in (run_ours, run_path_explain, run_shapiq, run_acd):
            found.update(runner(case, cfg))
        for method, (scores, evals, passes, extra) in found.items():
            row = dict(family=case.family, function=case.function, variant=case.variant,
                       method=method, num_true_pairs=case.num_true, fit_r2=case.fit_r2,
                       peer=not method.split()[0] in ("IH", "EH", "SmoothHess", "HOPE-2", "CD"))
            if scores is None:
                row.update(auc=None, precision_at_k=None, note=extra)
            else:
                metrics = [auc_and_precision(s, case.truth) for s in scores]
                row.update(auc=float(np.mean([m[0] for m in metrics])),
                           precision_at_k=float(np.mean([m[1] for m in metrics])),
                           seconds_per_example=extra, evals_per_example=evals,
                           passes_per_example=passes, examples=len(scores))
            rows.append(row)
        print(f"  {case.name}: {len(found)} methods ({time.perf_counter() - t0:.0f}s)")

    header = f"{'function':<22}{'method':<36}{'AUC':>6}{'P@k':>6}{'ms/ex':>9}{'evals/ex':>10}{'passes/ex':>11}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        label = f"{r['function']}/{r['variant']}"
        if r["auc"] is None:
            print(f"{label:<22}{r['method']:<36}  {r['note']}")
        else:
            print(f"{label:<22}{r['method']:<36}{r['auc']:6.3f}{r['precision_at_k']:6.2f}"
                  f"{1e3 * r['seconds_per_example']:9.1f}{r['evals_per_example']:10.0f}"
                  f"{r['passes_per_example']:11.0f}")
    summary = summarize(rows)
    print()
    print("mean over functions (applicable cases only):")
    for method, (auc, prec, count) in summary.items():
        print(f"  {method:<36} AUC {auc:.3f}  P@k {prec:.2f}  ({count} cases)")
    result = dict(
        benchmark="ground_truth", quick=args.quick, config=cfg, device=device_name("cpu"),
        torch=torch.__version__, threads=torch.get_num_threads(),
        note="timings from a shared 2-core machine (contended)",
        total_seconds=time.perf_counter() - t0, rows=rows,
        summary={m: dict(auc=a, precision_at_k=p, cases=c) for m, (a, p, c) in summary.items()},
    )
    write_results(result, out_path)
    return result


def summarize(rows: List[dict]) -> Dict[str, Tuple[float, float, int]]:
    by_method: Dict[str, List[dict]] = {}
    for r in rows:
        if r["auc"] is not None:
            by_method.setdefault(r["method"], []).append(r)
    return {m: (float(np.mean([r["auc"] for r in rs])),
                float(np.mean([r["precision_at_k"] for r in rs])), len(rs))
            for m, rs in by_method.items()}


if __name__ == "__main__":
    main()
