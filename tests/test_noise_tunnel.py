"""Captum's NoiseTunnel over every method: each cell equals the manual smoothing.

The matrix: method (IH, EH, layer IH, SmoothHess, HOPE order 2) x nt_type
(smoothgrad, smoothgrad_sq, vargrad) x inputs (one tensor, a tuple of tensors
with ``output_layout="per_input"``, a tuple with a per-example ``feature_mask``).
The expected value is built without NoiseTunnel: the noisy inputs are drawn
exactly as NoiseTunnel draws them (same seed, same calls), the method is run on
them (one run per noise sample for the deterministic methods; one run over the
whole noisy batch for the randomized ones, whose own draws then follow the same
random stream), and the per-example mean, mean of squares or variance over the
samples is taken with ``torch.var``.
"""
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch
from captum.attr import GradientShap, NoiseTunnel
from torch import Tensor, nn

from captum_interactions import (
    HOPE,
    ExpectedHessians,
    IntegratedHessians,
    LayerIntegratedHessians,
    SmoothHess,
)

DTYPE = torch.float64
N, S, STDEV = 2, 3, 0.2
METHODS = ["IH", "EH", "LayerIH", "SmoothHess", "HOPE"]
NT_TYPES = ["smoothgrad", "smoothgrad_sq", "vargrad"]
FORMS = ["tensor", "tuple", "feature_mask"]
RANDOMIZED = {"EH", "SmoothHess"}


class TwoInputNet(nn.Module):
    """f(a, b) = out(tanh(hidden([a, b]))), two outputs; b may be omitted."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, a: Tensor, b: Tensor = None) -> Tensor:
        x = a if b is None else torch.cat([a, b.flatten(1)], dim=1)
        return self.out(torch.tanh(self.hidden(x)))


def make_model() -> TwoInputNet:
    torch.manual_seed(0)
    return TwoInputNet().to(DTYPE)


def make_data() -> Dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=DTYPE)
    a, b = x[:, :3], x[:, 3:].reshape(N, 1, 2)
    background = torch.randn(N, 5, generator=g, dtype=DTYPE)  # B = N: passes NoiseTunnel as is
    return {
        "x": x,
        "ab": (a, b),
        "background": background,
        "background_ab": (background[:, :3], background[:, 3:].reshape(N, 1, 2)),
        # per-example groups for a (ids differ by example), one shared row for b
        "mask_ab": (torch.tensor([[0, 0, 1], [0, 1, 1]]), torch.tensor([[[2, 2]]])),
        "layer_mask": torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]]),
    }


def method_and_kwargs(name: str, form: str, model: nn.Module, data: Dict[str, Any]):
    """The attribution object, its inputs and the keyword arguments of one cell."""
    inputs = data["x"] if form == "tensor" else data["ab"]
    kwargs: Dict[str, Any] = {"target": 1}
    if form == "tuple":
        kwargs["output_layout"] = "per_input"
    if form == "feature_mask":
        kwargs["feature_mask"] = data["layer_mask"] if name == "LayerIH" else data["mask_ab"]
    if name == "IH":
        method = IntegratedHessians(model)
        # per-example baselines: NoiseTunnel repeats them per noisy copy
        kwargs.update(
            n_steps=4,
            baselines=data["background"] if form == "tensor" else data["background_ab"],
        )
    elif name == "EH":
        method = ExpectedHessians(model)
        kwargs.update(
            n_samples=6,
            baselines=data["background"] if form == "tensor" else data["background_ab"],
        )
    elif name == "LayerIH":
        method = LayerIntegratedHessians(model, model.hidden)
        kwargs.update(n_steps=4)
        if form == "tuple":
            kwargs["grouping"] = "full"
    elif name == "SmoothHess":
        method = SmoothHess(model)  # NoiseTunnel keeps `stdevs`: SmoothHess' sigma is its default
        kwargs.update(n_samples=4)
    else:
        method = HOPE(model)
        kwargs.update(order=2)
    return method, inputs, kwargs


def noisy_inputs_like_noise_tunnel(inputs: Tuple[Tensor, ...], stdev: float, samples: int):
    """NoiseTunnel's draws, call for call: one normal draw per input, in order,
    with a float32 standard deviation tensor; example-major rows (n * S + s)."""
    noisy = []
    for x in inputs:
        size = (x.shape[0] * samples,) + tuple(x.shape[1:])
        noise = torch.normal(0, torch.tensor(stdev, device=x.device).repeat(size))
        noisy.append(x.repeat_interleave(samples, dim=0) + noise)
    return tuple(noisy)


def expand_per_sample(kwargs: Dict[str, Any], samples: int) -> Dict[str, Any]:
    """Per-example kwargs repeated for the (N * S)-row noisy batch, as NoiseTunnel does."""
    out = dict(kwargs)
    for key in ("baselines", "feature_mask"):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            value = (value,)
        if isinstance(value, tuple):
            expanded = tuple(
                v.repeat_interleave(samples, dim=0)
                if isinstance(v, Tensor) and v.shape[0] == N > 1 else v
                for v in value
            )
            out[key] = expanded if isinstance(kwargs[key], tuple) else expanded[0]
    return out


def as_tuple(result: Any) -> Tuple[Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def smooth(stacked: Tensor, nt_type: str) -> Tensor:
    """stacked: (N, S, ...) -> NoiseTunnel's aggregate over the S samples."""
    if nt_type == "smoothgrad":
        return stacked.mean(dim=1)
    if nt_type == "smoothgrad_sq":
        return (stacked**2).mean(dim=1)
    return stacked.var(dim=1, unbiased=False)


def manual_noise_tunnel(name, method, inputs, kwargs, nt_type, seed):
    inputs_t = inputs if isinstance(inputs, tuple) else (inputs,)
    torch.manual_seed(seed)
    noisy = noisy_inputs_like_noise_tunnel(inputs_t, STDEV, S)
    pack = (lambda t: t) if isinstance(inputs, tuple) else (lambda t: t[0])
    if name in RANDOMIZED:
        # one run over the noisy batch: the method's own draws follow NoiseTunnel's
        runs = as_tuple(method.attribute(pack(noisy), **expand_per_sample(kwargs, S)))
        stacked = [r.reshape((N, S) + r.shape[1:]) for r in runs]
    else:
        # independent runs, one per noise sample (rows n * S + s of the noisy batch)
        per_sample = []
        for s in range(S):
            rows = tuple(t.reshape((N, S) + t.shape[1:])[:, s] for t in noisy)
            per_sample.append(as_tuple(method.attribute(pack(rows), **kwargs)))
        stacked = [torch.stack(parts, dim=1) for parts in zip(*per_sample)]
    return tuple(smooth(t, nt_type) for t in stacked)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("nt_type", NT_TYPES)
@pytest.mark.parametrize("name", METHODS)
def test_noise_tunnel_equals_manual_smoothing(name, nt_type, form):
    model, data = make_model(), make_data()
    method, inputs, kwargs = method_and_kwargs(name, form, model, data)
    seed = 1234
    torch.manual_seed(seed)
    result = NoiseTunnel(method).attribute(
        inputs, nt_type=nt_type, nt_samples=S, stdevs=STDEV, **kwargs
    )
    expected = manual_noise_tunnel(name, method, inputs, kwargs, nt_type, seed)
    got = as_tuple(result)
    assert len(got) == len(expected)
    if form == "tuple":  # aligned with the inputs (or the layer's one tensor)
        assert isinstance(result, tuple) or name == "LayerIH"
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        scale = e.abs().max().item()
        assert scale > 1e-6  # a real signal, not zeros compared with zeros
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11 * max(1.0, scale))
    # the smoothed result is not just the noiseless one
    if nt_type == "smoothgrad" and name not in RANDOMIZED:
        clean = as_tuple(method.attribute(inputs, **kwargs))
        assert max((c - g).abs().max().item() for c, g in zip(clean, got)) > 1e-6


@pytest.mark.parametrize("name", ["IH", "EH", "LayerIH"])
def test_noise_tunnel_convergence_delta_per_noisy_copy(name):
    model, data = make_model(), make_data()
    method, inputs, kwargs = method_and_kwargs(name, "tuple", model, data)
    torch.manual_seed(7)
    smoothed, delta = NoiseTunnel(method).attribute(
        inputs, nt_samples=S, stdevs=STDEV, return_convergence_delta=True, **kwargs
    )
    assert delta.shape == (N * S,)
    torch.manual_seed(7)
    noisy = noisy_inputs_like_noise_tunnel(inputs, STDEV, S)
    _, expected = method.attribute(
        noisy, return_convergence_delta=True, **expand_per_sample(kwargs, S)
    )
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12)
    if name != "EH":  # 4 Gauss-log points on a tanh net: completeness to ~1e-5
        assert delta.abs().max() < 1e-4


def test_expected_hessians_baseline_forms_match_gradient_shap_under_noise_tunnel():
    """EH takes a baseline distribution under NoiseTunnel in every form GradientShap does.

    B = 1 and B = N pass NoiseTunnel as they are; for other B, NoiseTunnel itself
    asserts (for GradientShap too) unless ``draw_baseline_from_distrib=True``.
    """
    model, data = make_model(), make_data()
    x = data["x"]
    g = torch.Generator().manual_seed(5)
    for num_refs in (1, N, 7):
        background = torch.randn(num_refs, 5, generator=g, dtype=DTYPE)
        for draw in (False, True):
            outcomes = []
            pairs = ((GradientShap(model), {}), (ExpectedHessians(model), {"n_samples": 4}))
            for method, extra in pairs:
                try:
                    NoiseTunnel(method).attribute(
                        x, nt_samples=S, stdevs=STDEV, baselines=background, target=1,
                        draw_baseline_from_distrib=draw, **extra,
                    )
                    outcomes.append("ok")
                except AssertionError:
                    outcomes.append("assert")
            assert outcomes[0] == outcomes[1], (num_refs, draw, outcomes)
            assert outcomes[1] == ("assert" if num_refs == 7 and not draw else "ok")


def test_expected_hessians_draw_baseline_from_distrib_equals_manual():
    model, data = make_model(), make_data()
    x = data["x"]
    background = torch.randn(7, 5, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    eh = ExpectedHessians(model)
    np.random.seed(3)
    torch.manual_seed(11)
    result = NoiseTunnel(eh).attribute(
        x, nt_samples=S, stdevs=STDEV, baselines=background, target=1, n_samples=6,
        draw_baseline_from_distrib=True,
    )
    # NoiseTunnel draws one reference per noisy row (numpy), then the noise (torch)
    np.random.seed(3)
    drawn = background[np.random.choice(7, N * S).tolist()]
    torch.manual_seed(11)
    (noisy,) = noisy_inputs_like_noise_tunnel((x,), STDEV, S)
    runs = eh.attribute(noisy, baselines=drawn, target=1, n_samples=6)
    expected = runs.reshape((N, S) + runs.shape[1:]).mean(dim=1)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_expected_hessians_multiplies_by_inputs_like_gradient_shap():
    model, data = make_model(), make_data()
    assert ExpectedHessians(model).multiplies_by_inputs is True
    assert GradientShap(model).multiplies_by_inputs is True
    assert NoiseTunnel(ExpectedHessians(model)).multiplies_by_inputs is True
    local = ExpectedHessians(model, multiply_by_inputs=False)
    assert local.multiplies_by_inputs is False
    # off the diagonal, global = local scaled by Delta on both sides: with one
    # reference and the same draws of t the two are exactly related entry by entry
    x, ref = data["x"], data["background"][:1]
    torch.manual_seed(2)
    g_local = local.attribute(x, baselines=ref, target=1, n_samples=5)
    torch.manual_seed(2)
    g_global = ExpectedHessians(model).attribute(x, baselines=ref, target=1, n_samples=5)
    delta = x - ref
    off = ~torch.eye(5, dtype=torch.bool)
    scaled = g_local * delta[:, :, None] * delta[:, None, :]
    torch.testing.assert_close(g_global[:, off], scaled[:, off], rtol=1e-12, atol=1e-14)
    assert (g_global - g_local).abs().max() > 1e-3


def test_layer_integrated_hessians_grouping_full_through_noise_tunnel():
    """The old ``feature_mask='full'`` could not pass NoiseTunnel; ``grouping='full'`` does."""
    torch.manual_seed(0)
    proj = nn.Linear(3, 4).to(DTYPE)
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(5 * 4, 1)).to(DTYPE)
    model = nn.Sequential(proj, head)
    x = torch.randn(N, 5, 3, dtype=DTYPE)  # (N, T, E): the layer output is (N, T, 4)
    lih = LayerIntegratedHessians(model, proj)
    torch.manual_seed(4)
    full = NoiseTunnel(lih).attribute(x, nt_samples=S, stdevs=STDEV, grouping="full", n_steps=4)
    assert full.shape == (N, 5, 4, 5, 4)
    torch.manual_seed(4)
    tokens = NoiseTunnel(lih).attribute(x, nt_samples=S, stdevs=STDEV, n_steps=4)
    assert tokens.shape == (N, 5, 5)
    # token groups are the summed unit matrix (same noise, smoothgrad is linear)
    torch.testing.assert_close(tokens, full.sum(dim=(2, 4)), rtol=1e-10, atol=1e-12)
    # the string form is refused by NoiseTunnel itself (Captum expands masks as tensors)
    with pytest.raises(AssertionError, match="str"):
        NoiseTunnel(lih).attribute(x, nt_samples=S, stdevs=STDEV, feature_mask="full")


@pytest.mark.parametrize("name", ["IH", "EH", "SmoothHess", "HOPE"])
def test_nested_layout_of_tuple_inputs_is_refused_under_noise_tunnel_with_the_fix(name):
    model, data = make_model(), make_data()
    method, inputs, kwargs = method_and_kwargs(name, "tuple", model, data)
    del kwargs["output_layout"]  # the default nested out[i][j] layout
    with pytest.raises(ValueError, match="output_layout='per_input'"):
        NoiseTunnel(method).attribute(inputs, nt_samples=S, stdevs=STDEV, **kwargs)
    # the same call outside NoiseTunnel returns the nested layout
    torch.manual_seed(0)
    nested = method.attribute(inputs, **kwargs)
    assert isinstance(nested[0], tuple) and nested[0][1].shape == (N, 3, 1, 2)


def test_layer_with_tuple_output_under_noise_tunnel_needs_per_input():
    class Split(nn.Module):
        def forward(self, x):
            return x[:, :2] * 1.0, x[:, 2:] * 1.0

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.split, self.out = Split(), nn.Linear(5, 1)

        def forward(self, x):
            first, second = self.split(x)
            return self.out(torch.tanh(torch.cat([first, second.pow(2)], dim=1)))

    torch.manual_seed(0)
    model = Model().to(DTYPE)
    x = torch.randn(N, 5, dtype=DTYPE)
    lih = LayerIntegratedHessians(model, model.split)
    with pytest.raises(ValueError, match="output_layout='per_input'"):
        NoiseTunnel(lih).attribute(x, nt_samples=S, stdevs=STDEV, n_steps=4, grouping="full")
    torch.manual_seed(3)
    rows = NoiseTunnel(lih).attribute(x, nt_samples=S, stdevs=STDEV, n_steps=4,
                                      grouping="full", output_layout="per_input")
    assert [r.shape for r in rows] == [(N, 2, 5), (N, 3, 5)]
    # equals the per-noisy-copy runs averaged (deterministic method: separate runs)
    torch.manual_seed(3)
    (noisy,) = noisy_inputs_like_noise_tunnel((x,), STDEV, S)
    runs = [lih.attribute(noisy.view(N, S, 5)[:, s], n_steps=4, grouping="full",
                          output_layout="per_input") for s in range(S)]
    for i in range(2):
        expected = torch.stack([r[i] for r in runs], dim=1).mean(dim=1)
        torch.testing.assert_close(rows[i], expected, rtol=1e-10, atol=1e-12)
