#!/usr/bin/env python3
"""Every public method x every bad input: a clear error naming the argument, or a
documented result (docs/design.rst).

The table ``TABLE`` below is the specification: one row per bad input, one
column per public method. A cell is ``Raises(type, pattern)`` (the message must
match ``pattern``), ``Result(check)`` (a documented, correct result) or
``NA(reason)`` (the input does not apply to that method). Each cell is one test,
so a regression of any cell fails on its own.

Conventions the table documents:

- N = 0 raises ``ValueError`` naming ``inputs`` in every method (no method
  returns an empty result).
- Non-finite values raise ``ValueError`` naming the argument and the example
  (or, for ExpectedHessians' baselines, the reference-sample) indices.
- Target indices are checked against the per-example output shape of the model.
- Errors report the user's N / per-example shapes, never internal row counts.
"""
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

from captum_interactions import (
    HOPE,
    AgglomerativeContextualDecomposition,
    ContextualDecomposition,
    ExpectedHessians,
    IntegratedHessians,
    LayerIntegratedHessians,
    SmoothHess,
    replace_relu_with_softplus,
)
from captum_interactions._utils.cd_rules import UnsupportedOperationError
from captum_interactions._utils.jets import UnsupportedJetOperation

NUM_EXAMPLES, NUM_FEATURES = 4, 4


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, 2)
    ).to(dtype).eval()


def make_inputs(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(NUM_EXAMPLES, NUM_FEATURES, dtype=dtype)


def make_background(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(6, NUM_FEATURES, dtype=dtype)


_DEFAULT = object()


def call(method: str, inputs: Any, model: Optional[nn.Module] = None,
         baselines: Any = _DEFAULT, target: Any = 0, stdevs: float = 0.1) -> Any:
    """One small call of ``method`` with everything else valid."""
    model = make_model() if model is None else model
    if method == "IntegratedHessians":
        base = None if baselines is _DEFAULT else baselines
        return IntegratedHessians(model).attribute(inputs, base, target=target, n_steps=2)
    if method == "ExpectedHessians":
        base = make_background() if baselines is _DEFAULT else baselines
        return ExpectedHessians(model).attribute(inputs, base, target=target, n_samples=4)
    if method == "LayerIntegratedHessians":
        base = None if baselines is _DEFAULT else baselines
        layer = model[0] if isinstance(model, nn.Sequential) else next(model.children())
        return LayerIntegratedHessians(model, layer).attribute(
            inputs, base, target=target, n_steps=2, feature_mask="full"
        )
    if method == "SmoothHess":
        return SmoothHess(model).attribute(inputs, target=target, n_samples=4, stdevs=stdevs)
    if method == "HOPE.attribute":
        return HOPE(model).attribute(inputs, order=2, target=target)
    if method == "HOPE.expand":
        return HOPE(model).expand(inputs, order=2, target=target)
    if method == "CD.attribute":
        return ContextualDecomposition(model).attribute(inputs, target=target)
    if method == "CD.interactions":
        return ContextualDecomposition(model).interactions(inputs, target=target)
    if method == "ACD":
        return AgglomerativeContextualDecomposition(model).attribute(
            inputs, target=target, structure="sequence", max_levels=1
        )
    raise AssertionError(method)


METHODS = [
    "IntegratedHessians", "ExpectedHessians", "LayerIntegratedHessians", "SmoothHess",
    "HOPE.attribute", "HOPE.expand", "CD.attribute", "CD.interactions", "ACD",
]
GRADIENT = METHODS[:6]
DIFFERENTIATING = ["IntegratedHessians", "ExpectedHessians", "SmoothHess",
                   "HOPE.attribute", "HOPE.expand"]


@dataclass
class Raises:
    error: type
    match: str


@dataclass
class Result:
    check: Callable[[str], None]


@dataclass
class NA:
    reason: str


# -- the bad inputs ---------------------------------------------------------


def with_nonfinite(value: float, row: int, tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    out[row, 1] = value
    return out


def nan_inputs(method):
    return call(method, with_nonfinite(float("nan"), 2, make_inputs()))


def inf_inputs(method):
    return call(method, with_nonfinite(float("-inf"), 3, make_inputs()))


def nan_baselines(method):
    base = make_background() if method == "ExpectedHessians" else make_inputs() * 0.5
    return call(method, make_inputs(), baselines=with_nonfinite(float("nan"), 1, base))


def inf_stdevs(method):
    return call(method, make_inputs(), stdevs=float("inf"))


def tiny_stdevs(method):
    # sigma = 1e-30: x + sigma z == x in float32, every estimate would be exactly 0
    return call(method, make_inputs(), stdevs=1e-30)


def empty_batch(method):
    return call(method, make_inputs()[:0])


def target_out_of_range(method):
    return call(method, make_inputs(), target=5)


def missing_target(method):
    return call(method, make_inputs(), target=None)


def float16_inputs(method):
    return call(method, make_inputs().half())


def bfloat16_inputs(method):
    return call(method, make_inputs().bfloat16())


def zero_dim_inputs(method):
    return call(method, torch.tensor(1.0))


def integer_inputs(method):
    return call(method, torch.ones(NUM_EXAMPLES, NUM_FEATURES, dtype=torch.long))


class ClampByTensor(nn.Module):
    """clamp with input-dependent (tensor) bounds: max(min(W x + b, x), -x)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(NUM_FEATURES, NUM_FEATURES)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return (h.clamp(min=-x.abs(), max=x.abs()) ** 2).sum(-1)


def _clamp_hessian_matches_autograd(method):
    torch.manual_seed(3)
    model = ClampByTensor().double()
    x = torch.randn(3, NUM_FEATURES, dtype=torch.float64)
    hess = call(method, x, model=model, target=None)
    if method == "HOPE.expand":
        hess = hess.derivative_tensor(2)
    expected = torch.stack([
        torch.autograd.functional.hessian(lambda v: model(v.unsqueeze(0))[0], row)
        for row in x
    ])
    torch.testing.assert_close(hess, expected, rtol=1e-10, atol=1e-10)


def hope_clamp_with_tensor_bounds(method):
    return _clamp_hessian_matches_autograd(method)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(NUM_FEATURES, 1, batch_first=True)

    def forward(self, x):
        seq = x.unsqueeze(1).expand(-1, 3, -1)
        return self.attention(seq, seq, seq)[0].sum((1, 2))


def hope_unsupported_module(method):
    return call(method, make_inputs(), model=Attention().eval(), target=None)


NO_BASELINES = NA("takes no baselines")
NOISE_ONLY = NA("no noise level: `stdevs` is SmoothHess's")
HOPE_ONLY = NA("about HOPE's Taylor-mode rules")
NONFINITE_INPUTS = Raises(ValueError, r"`inputs` holds NaN or infinite values in examples 2 ")
INF_INPUTS = Raises(ValueError, r"`inputs` holds NaN or infinite values in examples 3 ")
EMPTY = Raises(ValueError, r"`inputs` has no examples \(batch size 0\)")
TARGET_RANGE = Raises(ValueError, r"`target`=5 is out of range: the model output has shape \(2,\)")
MISSING_TARGET = Raises(
    ValueError, r"shape \(2,\) per example\. Pass `target` to select one output per example"
)
ZERO_DIM = Raises(ValueError, r"`inputs\[0\]` must have a batch dimension")


def dtype_mismatch(name):
    return Raises(TypeError, rf"`inputs\[0\]` has dtype torch\.{name} .* parameters are torch\.float32")


FLOAT_ONLY = Raises(TypeError, r"`inputs\[0\]` must be a floating point tensor")
INTEGER_NOT_EMBEDDING = Raises(TypeError, r"`inputs\[0\]` is an integer tensor .* embedding layer")
CD_INTEGER_NOT_EMBEDDING = Raises(
    UnsupportedOperationError,
    r"integer \(token id\) inputs can only be consumed by an embedding lookup .* `torch\._C\._nn\.linear`",
)

TABLE = {
    nan_inputs: {m: NONFINITE_INPUTS for m in METHODS},
    inf_inputs: {m: INF_INPUTS for m in METHODS},
    nan_baselines: {
        "IntegratedHessians": Raises(ValueError, r"`baselines` holds NaN .* in examples 1 "),
        "ExpectedHessians": Raises(ValueError, r"`baselines` holds NaN .* in reference samples 1 "),
        "LayerIntegratedHessians": Raises(ValueError, r"`baselines` holds NaN .* in examples 1 "),
        **{m: NO_BASELINES for m in METHODS[3:]},
    },
    inf_stdevs: {
        **{m: NOISE_ONLY for m in METHODS},
        "SmoothHess": Raises(ValueError, r"`stdevs` must be finite, got inf"),
    },
    tiny_stdevs: {
        **{m: NOISE_ONLY for m in METHODS},
        "SmoothHess": Raises(ValueError, r"`stdevs`=1e-30 .* below the resolution of torch\.float32"),
    },
    empty_batch: {m: EMPTY for m in METHODS},
    target_out_of_range: {m: TARGET_RANGE for m in METHODS},
    missing_target: {m: MISSING_TARGET for m in METHODS},
    float16_inputs: {m: dtype_mismatch("float16") for m in METHODS},
    bfloat16_inputs: {m: dtype_mismatch("bfloat16") for m in METHODS},
    zero_dim_inputs: {m: ZERO_DIM for m in METHODS},
    integer_inputs: {
        **{m: FLOAT_ONLY for m in DIFFERENTIATING},
        # these take integer token ids for an embedding; a Linear first layer is named
        "LayerIntegratedHessians": INTEGER_NOT_EMBEDDING,
        "CD.attribute": CD_INTEGER_NOT_EMBEDDING,
        "CD.interactions": CD_INTEGER_NOT_EMBEDDING,
        "ACD": CD_INTEGER_NOT_EMBEDDING,
    },
    hope_clamp_with_tensor_bounds: {
        **{m: HOPE_ONLY for m in METHODS},
        # supported: the exact Hessian of the piecewise-smooth clamp
        "HOPE.attribute": Result(_clamp_hessian_matches_autograd),
        "HOPE.expand": Result(_clamp_hessian_matches_autograd),
    },
    hope_unsupported_module: {
        **{m: HOPE_ONLY for m in METHODS},
        "HOPE.attribute": Raises(
            UnsupportedJetOperation,
            r"`torch\.nn\.functional\.multi_head_attention_forward`.*MultiheadAttention",
        ),
        "HOPE.expand": Raises(
            UnsupportedJetOperation,
            r"`torch\.nn\.functional\.multi_head_attention_forward`.*MultiheadAttention",
        ),
    },
}


def test_table_is_complete():
    for case, row in TABLE.items():
        assert set(row) == set(METHODS), case.__name__


CELLS = [
    pytest.param(case, method, id=f"{case.__name__}-{method}")
    for case, row in TABLE.items()
    for method in METHODS
]


@pytest.mark.parametrize("case, method", CELLS)
def test_bad_input(case, method):
    expected = TABLE[case][method]
    if isinstance(expected, NA):
        pytest.skip(f"not applicable: {expected.reason}")
    if isinstance(expected, Raises):
        with pytest.raises(expected.error, match=expected.match):
            case(method)
    else:
        expected.check(method)


def test_missing_target_reports_the_users_batch_not_internal_rows():
    # 5 examples x 16 path points = 80 internal rows: the message must not say 80
    with pytest.raises(ValueError) as info:
        IntegratedHessians(make_model()).attribute(torch.randn(5, NUM_FEATURES))
    assert "80" not in str(info.value) and "(2,) per example" in str(info.value)


@pytest.mark.parametrize("beta", [float("inf"), float("nan"), 0.0, -1.0])
def test_softplus_beta_must_be_finite_and_positive(beta):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0"):
        with replace_relu_with_softplus(model, beta=beta):
            pass
    assert type(model[1]) is nn.ReLU


def test_expected_hessians_nan_baseline_no_longer_spreads():
    # before: one NaN reference made 3 of 4 examples NaN, silently
    base = make_background()
    base[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"reference samples 1 \(1 of 6\)"):
        ExpectedHessians(make_model()).attribute(make_inputs(), base, target=0, n_samples=8)
