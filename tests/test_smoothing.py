"""smooth_model (the smoothing helper) and the non-smoothness check of IH/EH/LayerIH."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_interactions import (
    ExpectedHessians,
    IntegratedHessians,
    LayerIntegratedHessians,
    NonSmoothModelWarning,
    SmoothHess,
    replace_relu_with_softplus,
    smooth_model,
)
from captum_interactions._utils.smoothing import SMOOTHED_OPERATIONS, SmoothingMode

DTYPE = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


X = 3 * randn(5, 4)
Y = randn(5, 4, seed=1)
PRELU = nn.PReLU(4, init=0.3).to(DTYPE)

# (name, op) pairs: every functional, method and in-place form the helper covers
ELEMENTWISE_OPS = {
    "F.relu": lambda v: F.relu(v),
    "F.relu inplace": lambda v: F.relu(v.clone(), inplace=True),
    "torch.relu": lambda v: torch.relu(v),
    "Tensor.relu_": lambda v: v.clone().relu_(),
    "nn.ReLU6": lambda v: nn.ReLU6()(v),
    "F.relu6": lambda v: F.relu6(v),
    "F.hardtanh": lambda v: F.hardtanh(v, -0.5, 2.0),
    "F.hardtanh inplace": lambda v: F.hardtanh(v.clone(), -1.0, 1.0, True),
    "Tensor.clamp": lambda v: v.clamp(min=-1, max=1),
    "torch.clamp tensor max": lambda v: torch.clamp(v, max=Y),
    "Tensor.clamp_": lambda v: v.clone().clamp_(0, 1),
    "torch.clip": lambda v: torch.clip(v, -1.0),
    "torch.clamp_min": lambda v: torch.clamp_min(v, 0.3),
    "Tensor.clamp_max": lambda v: v.clamp_max(0.3),
    "torch.abs": lambda v: torch.abs(v),
    "abs()": lambda v: abs(v),
    "Tensor.abs_": lambda v: v.clone().abs_(),
    "F.leaky_relu": lambda v: F.leaky_relu(v, 0.2),
    "nn.LeakyReLU": lambda v: nn.LeakyReLU(0.1)(v),
    "nn.PReLU": lambda v: PRELU(v),
    "F.rrelu eval": lambda v: F.rrelu(v),
    "nn.Hardsigmoid": lambda v: nn.Hardsigmoid()(v),
    "F.hardswish": lambda v: F.hardswish(v),
    "torch.maximum": lambda v: torch.maximum(v, Y),
    "Tensor.minimum": lambda v: v.minimum(Y),
    "torch.max binary": lambda v: torch.max(v, Y),
    "torch.fmin": lambda v: torch.fmin(v, Y),
    "Tensor.max all": lambda v: v.max(),
    "torch.max dim": lambda v: torch.max(v, 1).values,
    "Tensor.min dim keepdim": lambda v: v.min(dim=0, keepdim=True)[0],
    "torch.amax dims": lambda v: torch.amax(v, (0, 1)),
    "Tensor.amin": lambda v: v.amin(1),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE_OPS))
def test_every_surrogate_is_smooth_and_tends_to_the_op(name):
    op = ELEMENTWISE_OPS[name]
    exact = op(X.clone())
    errors = []
    for beta in (2.0, 20.0, 200.0):
        with SmoothingMode(beta):
            smooth = op(X.clone())
        assert smooth.shape == exact.shape
        errors.append((smooth - exact).abs().max().item())
    # really replaced (differs at small beta) and converging to the op
    assert errors[0] > 1e-3, errors
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.05
    # a nonzero second derivative where the op has a kink
    x = X.clone().requires_grad_(True)
    with SmoothingMode(2.0):
        out = op(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    # H v along a random direction (H 1 = 0 for shift-equivariant maxima)
    (second,) = torch.autograd.grad((grad * randn(*x.shape, seed=9)).sum(), x)
    assert second.abs().max() > 1e-3


def test_inplace_forms_write_into_their_input():
    v = X.clone()
    with SmoothingMode(5.0):
        out = F.relu(v, inplace=True)
    assert out is v
    torch.testing.assert_close(v, F.softplus(X, beta=5.0))


def test_max_indices_stay_the_exact_ones():
    with SmoothingMode(2.0):
        smooth = torch.max(X, 1)
    assert type(smooth) is type(torch.max(X, 1))
    assert torch.equal(smooth.indices, torch.max(X, 1).indices)


POOL_INPUTS = {1: randn(2, 3, 11), 2: randn(2, 3, 9, 10), 3: randn(2, 2, 7, 6, 8)}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_max_pool_windows_match_pytorch(n):
    """At a huge beta the softmax pool is the max pool, for every padding,
    stride, dilation and ceil_mode, as modules and functional calls."""
    x = POOL_INPUTS[n]
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    module = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[n]
    cases = 0
    for k, s, p, d, c in itertools.product([2, 3], [None, 1, 2], [0, 1], [1, 2], [False, True]):
        if p > k // 2:
            continue
        exact, exact_idx = pool(x, k, s, p, d, c, return_indices=True)
        with SmoothingMode(1e8):
            out = module(k, s, p, d, ceil_mode=c)(x)
            out_f, idx = pool(x, k, s, p, d, c, return_indices=True)
        assert out.shape == exact.shape
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)
        torch.testing.assert_close(out_f, exact, rtol=0, atol=1e-12)
        assert torch.equal(idx, exact_idx)
        with SmoothingMode(2.0):
            smooth = module(k, s, p, d, ceil_mode=c)(x)
        # between the window mean and max, strictly below the max somewhere
        assert (smooth <= exact + 1e-12).all() and (exact - smooth).max() > 1e-3
        cases += 1
    assert cases == 48


@pytest.mark.parametrize("n, size", [(1, 4), (2, (4, 3)), (3, (3, None, 5)), (2, 1)])
def test_adaptive_max_pool_matches_pytorch(n, size):
    x = POOL_INPUTS[n]
    pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[n]
    module = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[n]
    exact, exact_idx = pool(x, size, return_indices=True)
    with SmoothingMode(1e8):
        out = module(size)(x)
        _, idx = pool(x, size, return_indices=True)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)
    assert torch.equal(idx, exact_idx)
    with SmoothingMode(2.0):
        assert (exact - module(size)(x)).max() > 1e-3


def test_softmax_pool_is_the_closed_form_on_one_window():
    x = randn(1, 1, 4)
    with SmoothingMode(3.0):
        out = F.max_pool1d(x, 4)
    w = torch.softmax(3.0 * x[0, 0], 0)
    torch.testing.assert_close(out.reshape(()), (w * x[0, 0]).sum(), rtol=1e-14, atol=0)


class EveryOp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.act = nn.LeakyReLU(0.1)
        self.prelu = nn.PReLU(3)
        self.adaptive = nn.AdaptiveMaxPool2d(2)
        self.fc = nn.Linear(12, 1)

    def forward(self, x):
        h = self.pool(F.relu(self.conv(x)))
        h = self.prelu(self.act(h)).clamp(-1, 1) + h.abs()
        h = torch.maximum(F.hardtanh(self.adaptive(h)), torch.zeros_like(h[..., :2, :2]))
        return self.fc(h.flatten(1))


def test_smooth_model_restores_everything_even_on_error():
    model = EveryOp().to(DTYPE)
    x = randn(3, 1, 5, 5)
    before = model(x)
    with smooth_model(model, beta=4.0):
        smooth = model(x)
        assert F.relu(torch.tensor([-1.0])).item() == 0.0  # outside the forward
    assert (smooth - before).abs().max() > 1e-3
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with smooth_model(model, beta=4.0):
            model(x)
            raise RuntimeError("boom")
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0
    # the old name is the same helper
    with replace_relu_with_softplus(model, beta=4.0):
        torch.testing.assert_close(model(x), smooth, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0, -1.0, float("inf"), float("nan"), "10", True])
def test_beta_must_be_finite_and_positive(beta):
    with pytest.raises(ValueError, match="beta"):
        with smooth_model(nn.ReLU(), beta=beta):
            pass


def test_rrelu_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="rrelu.*eval"):
        with SmoothingMode(2.0):
            F.rrelu(X, training=True)


def test_smoothed_model_gives_ih_row_sums_equal_to_ig():
    """The smoothed model has a proper Hessian: IH row sums = IG of the same model."""
    from captum.attr import IntegratedGradients

    model = EveryOp().to(DTYPE).eval()
    x = randn(2, 1, 5, 5, seed=3)
    with smooth_model(model, beta=4.0), warnings.catch_warnings():
        warnings.simplefilter("error", NonSmoothModelWarning)
        gamma = IntegratedHessians(model).attribute(x, n_steps=64)
        ig = IntegratedGradients(model).attribute(x, n_steps=1000, method="gausslegendre")
    rows = gamma.reshape(2, 25, 25).sum(-1)
    torch.testing.assert_close(rows, ig.reshape(2, 25), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gamma.reshape(2, 25, 25), gamma.reshape(2, 25, 25).transpose(1, 2))


# --------------------------------------------------------------------------
# the check in IntegratedHessians / ExpectedHessians / LayerIntegratedHessians


def ih_warnings(forward, x=None, method=IntegratedHessians, **kwargs):
    x = randn(3, 4) if x is None else x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method is ExpectedHessians:
            torch.manual_seed(0)
            result = method(forward).attribute(x, baselines=randn(4, 4, seed=2), n_samples=4,
                                               **kwargs)
        else:
            result = method(forward).attribute(x, n_steps=4, **kwargs)
    return [w for w in caught if issubclass(w.category, NonSmoothModelWarning)], result


MLP = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1)).to(DTYPE)


def test_smoothness_check_passes_calls_without_autograd_through():
    """A forward under no_grad (the completeness forward, now run first)
    differentiates nothing: it is not inspected and does not use up the
    inspection, so the first differentiated call still warns about the ReLU."""
    from types import SimpleNamespace

    from captum_interactions._utils.nonsmooth import checked_smoothness

    holder = SimpleNamespace(forward_func=MLP)
    x = randn(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with checked_smoothness(holder, "IntegratedHessians"):
            check = holder.forward_func
            with torch.no_grad():
                check(x.clone().requires_grad_(True))
            assert not check.done and not caught
            check(x.clone().requires_grad_(True))
            assert check.done
    assert holder.forward_func is MLP
    warned = [w for w in caught if issubclass(w.category, NonSmoothModelWarning)]
    assert len(warned) == 1 and "relu" in str(warned[0].message).lower()

NONSMOOTH_MODELS = {
    "relu": (MLP, ["relu", "smooth_model"]),
    "max pool": (lambda x: F.max_pool1d(x[:, None], 2)[:, 0].sum(1) ** 2, ["max_pool1d"]),
    "clamp method": (lambda x: x.clamp(-0.5, 0.5).sum(1) ** 2, ["clamp"]),
    "abs": (lambda x: (x.abs() * x).sum(1), ["abs"]),
    "maximum": (lambda x: torch.maximum(x, x.flip(1)).pow(2).sum(1), ["maximum"]),
    "where on a comparison": (lambda x: torch.where(x > 0, x ** 2, x ** 3).sum(1),
                              ["gt (used by where)", "SmoothHess"]),
    "mask": (lambda x: (x * (x > 0).to(x.dtype)).pow(2).sum(1), ["gt (used by to)"]),
    "argmax index": (lambda x: x.gather(1, x.argmax(1, keepdim=True))[:, 0] ** 2,
                     ["argmax (used by gather)"]),
    "sort": (lambda x: torch.sort(x, 1).values[:, 0] ** 2, ["sort", "no smooth surrogate"]),
    "round inside": (lambda x: (x.round() * x).sum(1), ["round"]),
}


@pytest.mark.parametrize("name", sorted(NONSMOOTH_MODELS))
def test_nonsmooth_models_warn_once_naming_the_op_and_the_fix(name):
    forward, words = NONSMOOTH_MODELS[name]
    caught, _ = ih_warnings(forward)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "IntegratedHessians" in message and "SmoothHess" in message
    for word in words:
        assert word in message, (word, message)
    # nothing is left behind: no torch function mode, the forward unwrapped
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("name", ["round", "detach", "integer cast"])
def test_output_not_differentiably_connected_warns(name):
    forward = {
        "round": lambda x: torch.round(x).sum(1),
        "detach": lambda x: (x * x).detach().sum(1) + MLP[0].weight.sum(),
        "integer cast": lambda x: x.long().sum(1) * MLP[0].weight.sum(),
    }[name]
    caught, gamma = ih_warnings(forward)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "does not depend differentiably on the inputs" in message
    assert {"round": "round", "detach": "detach", "integer cast": "long"}[name] in message
    assert gamma.abs().max() == 0  # what the warning is about


def test_smooth_models_do_not_warn():
    quiet = [
        nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 1)).to(DTYPE),
        lambda x: torch.tanh(x).prod(1),
        # non-smooth ops on parameters only (not on input-dependent values)
        lambda x: MLP[0].weight.relu().sum() * x.pow(2).sum(1),
        # comparisons that only feed a check (no floating point result)
        lambda x: x.pow(2).sum(1) * float(torch.isfinite(x).all()),
    ]
    for forward in quiet:
        caught, _ = ih_warnings(forward)
        assert not caught, [str(w.message) for w in caught]
    with smooth_model(MLP):
        caught, _ = ih_warnings(MLP)
    assert not caught


def test_expected_and_layer_hessians_warn_too_and_smoothhess_does_not():
    caught, _ = ih_warnings(MLP, method=ExpectedHessians)
    assert len(caught) == 1 and "ExpectedHessians" in str(caught[0].message)

    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1))
    model = model.to(DTYPE)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        LayerIntegratedHessians(model, model[1]).attribute(randn(3, 4), n_steps=4,
                                                           feature_mask="full")
    layer = [w for w in rec if issubclass(w.category, NonSmoothModelWarning)]
    assert len(layer) == 1 and "LayerIntegratedHessians" in str(layer[0].message)
    assert "relu" in str(layer[0].message)
    # the ReLU before the layer is not on the explained path: no warning
    before = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(),
                           nn.Linear(5, 1)).to(DTYPE)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        LayerIntegratedHessians(before, before[2]).attribute(randn(3, 4), n_steps=4,
                                                             feature_mask="full")
    assert not [w for w in rec if issubclass(w.category, NonSmoothModelWarning)]

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        SmoothHess(MLP).attribute(randn(3, 4), n_samples=4, stdevs=0.1)
    assert not [w for w in rec if issubclass(w.category, NonSmoothModelWarning)]


def test_the_check_leaves_the_attribution_and_model_as_they_were():
    ih = IntegratedHessians(MLP)
    forward = ih.forward_func
    hooks = (len(MLP._forward_hooks), len(MLP._forward_pre_hooks))
    ih_warnings(MLP)
    with pytest.raises(ValueError):
        ih.attribute(randn(3, 4), n_steps=0)
    assert ih.forward_func is forward
    assert (len(MLP._forward_hooks), len(MLP._forward_pre_hooks)) == hooks
    assert torch._C._len_torch_function_stack() == 0


def test_check_covers_only_the_first_differentiated_forward():
    """The mode is active for one forward per call, not for all of them: the
    first one with autograd on (the completeness forward, without autograd,
    runs before it and is not inspected)."""
    seen = []

    def forward(x):
        seen.append((torch._C._len_torch_function_stack(), torch.is_grad_enabled()))
        return torch.tanh(x).sum(1)

    IntegratedHessians(forward).attribute(randn(3, 4), n_steps=4, internal_batch_size=4,
                                          return_convergence_delta=True)
    assert len(seen) > 2
    first = next(n for n, (_, grad) in enumerate(seen) if grad)
    assert [depth for depth, _ in seen] == [int(n == first) for n in range(len(seen))]


def test_smoothed_operation_names_are_all_flagged_by_the_check():
    from captum_interactions._utils.nonsmooth import _NONSMOOTH

    assert SMOOTHED_OPERATIONS <= _NONSMOOTH


def test_huge_bounds_do_not_cancel_the_other_operand():
    """maximum(x, finfo.min) (attention masks) and clamps with huge bounds stay x."""
    low = torch.tensor(torch.finfo(DTYPE).min, dtype=DTYPE)
    with SmoothingMode(10.0):
        torch.testing.assert_close(torch.maximum(X, low), X, rtol=1e-15, atol=0)
        torch.testing.assert_close(X.clamp(-1e300, 1e300), X, rtol=1e-15, atol=0)
        torch.testing.assert_close(torch.minimum(X, -low), X, rtol=1e-15, atol=0)
    # and the second derivative at a tie is softplus''(0) = beta / 4
    x = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    with SmoothingMode(10.0):
        out = torch.maximum(x, torch.zeros(3, dtype=DTYPE))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(g, torch.full_like(g, 0.5))
    torch.testing.assert_close(h, torch.full_like(h, 2.5))


def test_dependence_trace_reads_the_same_leaves_as_tree_flatten():
    # the trace's fast reader of op arguments must see every tensor that
    # torch's pytree sees, in any argument structure
    from torch.utils._pytree import tree_flatten

    from captum_interactions._utils.nonsmooth import _leaves

    a, b, c = torch.ones(1), torch.zeros(2), torch.ones(3)
    cases = [
        ((a, 2, None), {}),
        (([a, b], 1.5), {"dim": 0}),
        (((a, (b, c)),), {"out": None}),
        (({"x": a, "y": [b]},), {"weight": c}),
        ((torch.float32, "mean"), {"tensors": (a, b)}),
    ]
    for args, kwargs in cases:
        expected = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        got = [t for t in _leaves(args, kwargs) if isinstance(t, torch.Tensor)]
        assert [id(t) for t in got] == [id(t) for t in expected]
