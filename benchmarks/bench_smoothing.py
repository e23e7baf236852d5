#!/usr/bin/env python3
"""Integrated Hessians on a max-pool CNN: ReLU-only smoothing vs smooth_model.

Captum's ``BasicModel_ConvNet_MaxPool3d`` (ReLU + MaxPool3d; parameters redrawn,
seeded, since the hand-set ones make the softmax output constant). With only
the ReLUs replaced by softplus (what ``replace_relu_with_softplus`` did before
it smoothed max pooling too) the pool's argmax switches along the path and IH
row sums miss Captum's Integrated Gradients by a fixed amount at every
``n_steps``, while the completeness error stays small. With
:func:`smooth_model` (softplus + softmax-weighted pooling) the error falls with
``n_steps`` to round-off. Also reports whether a ``NonSmoothModelWarning`` was
raised.

    python benchmarks/bench_smoothing.py [--steps 16 64 256]
"""
import argparse
import contextlib
import os
import sys
import warnings

import torch
from captum.attr import IntegratedGradients
from captum.testing.helpers.basic_models import BasicModel_ConvNet_MaxPool3d

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_results  # noqa: E402

from captum_interactions import (  # noqa: E402
    IntegratedHessians,
    NonSmoothModelWarning,
    smooth_model,
)
from captum_interactions._utils.smoothing import SmoothingMode  # noqa: E402


@contextlib.contextmanager
def relu_only_softplus(model, beta):
    """Softplus for ReLU, max pooling left exact: the helper's former behaviour."""

    class ReluOnly(SmoothingMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name.lstrip("_").rstrip("_") != "relu":
                return func(*args, **(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs)

    modes = []
    pre = model.register_forward_pre_hook(lambda m, a: modes.append(ReluOnly(beta).__enter__()))
    post = model.register_forward_hook(
        lambda m, a, o: modes.pop().__exit__(None, None, None), always_call=True
    )
    try:
        yield model
    finally:
        pre.remove()
        post.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "smoothing.json"))
    cli = parser.parse_args()

    torch.manual_seed(0)
    model = BasicModel_ConvNet_MaxPool3d().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    x = torch.randn(1, 1, 10, 10, 10, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(10))
    # 8 blocks of 5x5x5 voxels: group row sums are compared with IG summed per block
    block = torch.arange(10) // 5
    mask = (block[:, None, None] * 4 + block[None, :, None] * 2 + block[None, None, :])[None, None]
    target = 3

    rows = []
    print(f"{'smoothing':22s} {'n_steps':>7s} {'rowsum vs IG':>13s} {'|delta|/|df|':>13s} "
          f"{'warned':>7s}")
    for label, smoothing in (("relu only (before)", relu_only_softplus),
                             ("smooth_model (after)", smooth_model)):
        with smoothing(model, cli.beta):
            ig = IntegratedGradients(model).attribute(x, target=target, n_steps=1000,
                                                      method="gausslegendre")
            ig_groups = torch.stack([ig[mask == g].sum() for g in range(8)])
            f_diff = (model(x) - model(torch.zeros_like(x)))[0, target].item()
            for n in cli.steps:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    gamma, delta = IntegratedHessians(model).attribute(
                        x, target=target, n_steps=n, feature_mask=mask,
                        return_convergence_delta=True,
                    )
                warned = any(issubclass(w.category, NonSmoothModelWarning) for w in caught)
                error = ((gamma[0].sum(1) - ig_groups).norm() / ig_groups.norm()).item()
                completeness = abs(delta.item()) / abs(f_diff)
                rows.append({"smoothing": label, "n_steps": n, "rowsum_vs_ig": error,
                             "completeness": completeness, "f_diff": f_diff,
                             "warned": warned})
                print(f"{label:22s} {n:7d} {error:13.2e} {completeness:13.1e} {str(warned):>7s}")
    write_results({"model": "BasicModel_ConvNet_MaxPool3d (redrawn parameters)",
                   "beta": cli.beta, "rows": rows}, cli.out)


if __name__ == "__main__":
    main()
