#!/usr/bin/env python3
"""Integrated Hessians quadrature: completeness error vs n_steps for each rule, and the adaptive mode.

The total of the interaction matrix equals f(x) - f(x') only in the quadrature
limit, so |sum(Gamma) - (f(x) - f(x'))| / |f(x) - f(x')| (max over the examples)
is the error of the rule. It is measured in float64 (round-off ~1e-14) on:

- softplus MLPs 10 -> 64 -> 64 -> 1 with beta 1, 10, 50;
- Captum's ``captum.testing.helpers.basic_models`` with float inputs, inside
  ``replace_relu_with_softplus`` (beta 10, its default), on the inputs and
  additional arguments Captum's own tests use;
- a CNN with max pooling made smooth inline (a log-sum-exp pool, temperature
  1/beta) after softplus(beta=10) convolutions;
- MiniLM (all-MiniLM-L6-v2, offline) on a sentence pair, token embeddings, as
  ``LayerIntegratedHessians`` explains it (skipped when not installed).

The error table runs each rule with one feature group (the total of Gamma is
the same for any grouping, and one group costs one HVP per path point); the
adaptive rows run the default rule with ``completeness_tol=1e-4`` and the
default groups (the full matrix; tokens for MiniLM), timed.

    python benchmarks/bench_quadrature.py [--quick] [--device cuda]

Writes ``benchmarks/results/quadrature_<device>.json``.
"""
import argparse
import contextlib
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import captum_interactions._utils.quadrature as quadrature
from captum_interactions import (
    IntegratedHessians,
    LayerIntegratedHessians,
    replace_relu_with_softplus,
)
from _common import device_name, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPE = torch.float64

# (label, method, points per panel of the composite rule)
RULES = [
    ("gausslog_graded", "gausslog_graded", None),
    ("gausslog_composite p=4", "gausslog_composite", 4),
    ("gausslog_composite p=8", "gausslog_composite", 8),
    ("gausslog_composite p=16", "gausslog_composite", 16),
    ("gausslog", "gausslog", None),
    ("gausslegendre", "gausslegendre", None),
    ("riemann_middle", "riemann_middle", None),
]


@contextlib.contextmanager
def points_per_panel(p):
    saved = quadrature.POINTS_PER_PANEL
    quadrature.POINTS_PER_PANEL = p if p is not None else saved
    try:
        yield
    finally:
        quadrature.POINTS_PER_PANEL = saved


class SmoothMaxPool2d(nn.Module):
    """tau * logsumexp(x / tau) over k x k windows: a smooth upper bound of max pooling."""

    def __init__(self, kernel, tau):
        super().__init__()
        self.kernel, self.tau = kernel, tau

    def forward(self, x):
        n, c, h, w = x.shape
        k = self.kernel
        windows = F.unfold(x.reshape(n * c, 1, h, w), k, stride=k)  # (n c, k k, L)
        pooled = self.tau * torch.logsumexp(windows / self.tau, dim=1)
        return pooled.reshape(n, c, h // k, w // k)


def softplus_mlp(beta, device, d=10, hidden=64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, hidden), nn.Softplus(beta=beta),
        nn.Linear(hidden, hidden), nn.Softplus(beta=beta),
        nn.Linear(hidden, 1),
    ).to(device, DTYPE)


def smooth_maxpool_cnn(device, beta=10.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=beta),
        SmoothMaxPool2d(2, 1.0 / beta),
        nn.Conv2d(4, 8, 3, padding=1), nn.Softplus(beta=beta),
        SmoothMaxPool2d(2, 1.0 / beta),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.Softplus(beta=beta), nn.Linear(16, 1),
    ).to(device, DTYPE)


def cases(device, quick):
    """(name, explainer factory, inputs, baselines, target, additional args,
    one-group mask, context manager factory)."""
    from captum.testing.helpers import basic_models as bm

    def t(values, shape=None):
        x = torch.tensor(values, dtype=DTYPE, device=device)
        return x if shape is None else x.reshape(shape)

    out = []
    torch.manual_seed(1)
    x = torch.randn(4, 10, dtype=DTYPE, device=device)
    for beta in (1.0, 10.0, 50.0):
        out.append((f"softplus MLP beta={beta:g}", softplus_mlp(beta, device), x,
                    torch.zeros(1, 10, dtype=DTYPE, device=device), None, None, None))
    # Captum's basic models, with inputs from Captum's own tests
    captum = [
        ("BasicModel2", bm.BasicModel2(),
         (t([[3.0], [2.0]]), t([[1.0], [-0.5]])), None, None, None),
        ("BasicModel3", bm.BasicModel3(),
         (t([[3.0], [2.5]]), t([[1.0], [0.5]])), None, None, None),
        ("BasicModel4_MultiArgs", bm.BasicModel4_MultiArgs(),
         (t([[1.5, 2.0, 34.3]]), t([[3.0, 3.5, 23.2]])), None, None,
         (t([[1.0, 3.0, 4.0]]), 1)),
        ("BasicModel5_MultiArgs", bm.BasicModel5_MultiArgs(),
         (t([[1.5, 2.0, 34.3]]), t([[3.0, 3.5, 23.2]])), None, None, ([2, 3], 1)),
        ("BasicModel_MultiLayer", bm.BasicModel_MultiLayer(),
         t([[20.0, 50.0, 30.0]]), None, 0, None),
        ("BasicModel_ConvNet_One_Conv", bm.BasicModel_ConvNet_One_Conv(),
         t(list(range(16)), (1, 1, 4, 4)), None, 0, None),
        ("BasicModel_ConvNetWithPaddingDilation", bm.BasicModel_ConvNetWithPaddingDilation(),
         t([float(v) / 4 for v in range(25)], (1, 1, 5, 5)), None, 0, None),
    ]
    if quick:
        captum = [c for c in captum if c[0] in ("BasicModel5_MultiArgs", "BasicModel_ConvNet_One_Conv")]
    for name, model, inputs, base, target, args in captum:
        torch.manual_seed(0)
        model = model.to(device, DTYPE)
        out.append((name, model, inputs, base, target, args, "softplus"))
    torch.manual_seed(2)
    out.append(("max-pool CNN (log-sum-exp pool) beta=10", smooth_maxpool_cnn(device),
                torch.randn(2, 1, 8, 8, dtype=DTYPE, device=device), None, None, None, None))
    return out


def one_group_mask(inputs):
    masks = tuple(torch.zeros((1,) + x.shape[1:], dtype=torch.long, device=x.device)
                  for x in (inputs if isinstance(inputs, tuple) else (inputs,)))
    return masks if isinstance(inputs, tuple) else masks[0]


def relative_errors(delta, change):
    return (delta.abs() / change.abs()).max().item()


def run_table(explain, steps_list, rules, verbose=False):
    """{rule label: [relative completeness error per n_steps]}."""
    table = {}
    for label, method, p in rules:
        errors = []
        with points_per_panel(p):
            for n in steps_list:
                delta, change = explain(n, method)
                errors.append(relative_errors(delta, change))
                if verbose:
                    print(f"  {label} n={n}: {errors[-1]:.1e}", flush=True)
        table[label] = errors
    return table


def non_increasing(errors, floor):
    """Error never grows with n_steps, up to the model's round-off floor."""
    return all(b <= a or b <= floor for a, b in zip(errors, errors[1:]))


def round_off_floor(table):
    """10x the smallest error any rule reaches at the most steps, within
    [1e-12, 1e-6]: below it, differences are round-off of the model's float64
    evaluation (the cap keeps an unconverged table from hiding a rise)."""
    return min(1e-6, max(1e-12, 10 * min(errors[-1] for errors in table.values())))


def minilm_case(device):
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from captum_interactions._utils.text import (
            SentencePairSimilarity, encode_sentence_pair, keep_special_tokens_baseline,
            load_minilm,
        )
        encoder, tokenizer = load_minilm(device=device, dtype=DTYPE)
    except Exception as err:  # optional dependency
        print(f"MiniLM skipped: {err!r}")
        return None
    ids, mask, first_length, tokens = encode_sentence_pair(
        tokenizer, "the acting was unbelievably bad and the plot predictable",
        "a fine film with a terrible script")
    model = SentencePairSimilarity(encoder, first_length).eval()
    baseline = keep_special_tokens_baseline(ids, tokenizer.pad_token_id, tokenizer.all_special_ids)
    return model, ids.to(device), baseline.to(device), mask.to(device), len(tokens[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="n_steps up to 128, fewer models and rules, MiniLM up to 64")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--only", default=None,
                        help="run only the models whose name contains this text")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--minilm-max-steps", type=int, default=128,
                        help="budget of the adaptive MiniLM row (CPU time)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    # the tables run rules at too few steps on purpose: their completeness
    # warnings are what the table shows; the adaptive rows' warnings are kept
    warnings.filterwarnings("ignore", message=".*miss completeness by more than")
    steps_list = [8, 16, 32, 64, 128] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024]
    rules = RULES if not args.quick else [r for r in RULES if r[0] in (
        "gausslog_graded", "gausslog_composite p=16", "gausslog", "gausslegendre")]
    rows, adaptive = [], []

    for name, model, inputs, base, target, extra, wrap in cases(device, args.quick):
        if args.only and args.only not in name:
            continue
        ctx = (lambda: replace_relu_with_softplus(model, beta=10.0)) if wrap else contextlib.nullcontext
        with ctx():
            ih = IntegratedHessians(model)
            mask = one_group_mask(inputs)

            def explain(n, method):
                _, delta = ih.attribute(inputs, base, target=target, additional_forward_args=extra,
                                        n_steps=n, method=method, feature_mask=mask,
                                        return_convergence_delta=True)
                change = delta.new_tensor(change_of(model, inputs, base, target, extra))
                return delta, change

            table = run_table(explain, steps_list, rules)
            rows.append(dict(model=name, errors=table))
            print(name, {k: [f"{e:.1e}" for e in v] for k, v in table.items()}, flush=True)
            start = time.perf_counter()
            _, delta = ih.attribute(inputs, base, target=target, additional_forward_args=extra,
                                    completeness_tol=args.tol, return_convergence_delta=True)
            seconds = time.perf_counter() - start
            change = delta.new_tensor(change_of(model, inputs, base, target, extra))
            adaptive.append(dict(model=name, steps=ih.last_call_steps.tolist(), seconds=seconds,
                                 relative_error=relative_errors(delta, change),
                                 hvps=ih.last_call_cost.hvps))

    if not args.no_minilm and (not args.only or args.only in "MiniLM"):
        loaded = minilm_case(device)
        if loaded is not None:
            model, ids, baseline, mask, num_tokens = loaded
            lih = LayerIntegratedHessians(model, model.word_embeddings)
            name = f"MiniLM sentence pair ({num_tokens} tokens)"
            one_group = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
            minilm_steps = [8, 16] if args.quick else [8, 16, 32, 64]
            minilm_rules = [r for r in rules if r[0] in (
                "gausslog_graded", "gausslog", "gausslog_composite p=16")]
            with torch.no_grad():
                change = (model(ids, mask) - model(baseline, mask)).double()

            def explain_text(n, method):
                _, delta = lih.attribute(ids, baselines=baseline, additional_forward_args=(mask,),
                                         n_steps=n, method=method, feature_mask=one_group,
                                         internal_batch_size=64, return_convergence_delta=True)
                return delta, change

            table = run_table(explain_text, minilm_steps, minilm_rules, verbose=True)
            rows.append(dict(model=name, errors=table, n_steps=minilm_steps))
            print(name, {k: [f"{e:.1e}" for e in v] for k, v in table.items()}, flush=True)
            start = time.perf_counter()
            # one group (the total's error is the same for any grouping): token
            # groups would cost num_tokens times more, too slow for a CPU run
            _, delta = lih.attribute(ids, baselines=baseline, additional_forward_args=(mask,),
                                     completeness_tol=args.tol, max_steps=args.minilm_max_steps,
                                     feature_mask=one_group, internal_batch_size=64,
                                     return_convergence_delta=True)
            adaptive.append(dict(model=name, steps=lih.last_call_steps.tolist(),
                                 seconds=time.perf_counter() - start,
                                 relative_error=relative_errors(delta, change),
                                 hvps=lih.last_call_cost.hvps))

    default_label = quadrature.DEFAULT_METHOD + (
        f" p={quadrature.POINTS_PER_PANEL}" if quadrature.DEFAULT_METHOD == "gausslog_composite" else "")
    print(f"Completeness error |sum(Gamma) - (f(x) - f(x'))| / |f(x) - f(x')| (max over examples), "
          f"float64, device={device}; default: {default_label}, n_steps={quadrature.DEFAULT_N_STEPS}")
    for row in rows:
        row_steps = row.get("n_steps", steps_list)
        print(f"\n{row['model']}")
        header = (f"  {'rule':<24}" + "".join(f"{n:>9}" for n in row_steps)
                  + f"  non-increasing (floor {round_off_floor(row['errors']):.0e})")
        print(header)
        row["non_increasing"] = {}
        row["round_off_floor"] = floor = round_off_floor(row["errors"])
        for label, errors in row["errors"].items():
            mono = non_increasing(errors, floor)
            row["non_increasing"][label] = mono
            print(f"  {label:<24}" + "".join(f"{e:>9.1e}" for e in errors) + f"  {mono}")
    print(f"\nAdaptive mode (default rule, completeness_tol={args.tol:g}, default groups):")
    print(f"  {'model':<42} {'steps per example':<22} {'rel. error':>10} {'HVPs':>8} {'seconds':>8}")
    for a in adaptive:
        print(f"  {a['model']:<42} {str(a['steps']):<22} {a['relative_error']:>10.1e} "
              f"{a['hvps']:>8} {a['seconds']:>8.3f}")
    result = dict(
        benchmark="quadrature", device=device, device_name=device_name(device),
        torch=torch.__version__, threads=torch.get_num_threads(), dtype="float64",
        default_method=quadrature.DEFAULT_METHOD, points_per_panel=quadrature.POINTS_PER_PANEL,
        default_n_steps=quadrature.DEFAULT_N_STEPS, n_steps=steps_list, tol=args.tol,
        quick=args.quick, rows=rows, adaptive=adaptive,
    )
    suffix = "_quick" if args.quick else ""
    out = args.out or os.path.join(HERE, "results", f"quadrature_{device.split(':')[0]}{suffix}.json")
    write_results(result, out)
    return 0


def change_of(model, inputs, base, target, extra):
    """f(x) - f(x') per example, through Captum's forward helper."""
    from captum._utils.common import _format_additional_forward_args, _run_forward

    from captum_interactions._utils.common import format_baselines, format_inputs

    inputs_t = format_inputs(inputs)
    base_t = format_baselines(base, inputs_t)
    extra = _format_additional_forward_args(extra)
    with torch.no_grad():
        fx = _run_forward(model, inputs_t, target, extra).reshape(-1)
        fb = _run_forward(model, base_t, target, extra).reshape(-1)
    return (fx - fb).tolist()


if __name__ == "__main__":
    sys.exit(main())
