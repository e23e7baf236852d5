import pytest
import torch
from torch import nn

from captum_interactions import ExpectedHessians, IntegratedHessians
from tests.test_integrated_hessians import Quadratic, quadratic_ih, softplus_mlp

DTYPE = torch.float64


def expected_quadratic_eh(a, b, x, refs):
    """Analytic expectation of the paired estimator for f = 1/2 x^T A x + b^T x.

    With x' uniform over ``refs`` and t = alpha beta independent of x'
    (E[t] = 1/4), every Integrated Hessians entry of a quadratic is affine in t,
    so the expectation is the IH matrix averaged over the references.
    """
    per_ref = [quadratic_ih(a, b, x, r.expand_as(x)) for r in refs]
    return torch.stack(per_ref).mean(0)


def test_paired_estimator_converges_to_analytic_expectation():
    torch.manual_seed(0)
    d = 3
    a = torch.randn(d, d, dtype=DTYPE)
    a = a + a.T
    b = torch.randn(d, dtype=DTYPE)
    x = torch.randn(2, d, dtype=DTYPE)
    refs = torch.randn(4, d, dtype=DTYPE)
    expected = expected_quadratic_eh(a, b, x, refs)
    eh = ExpectedHessians(Quadratic(a, b))
    errors = []
    for n_samples in (100, 1600, 25600):
        torch.manual_seed(1)
        errors.append((eh.attribute(x, refs, n_samples=n_samples) - expected).abs().max())
    scale = expected.abs().max()
    assert errors[-1] < 0.02 * scale
    # Monte Carlo rate: 256x the samples cuts the error by about 16x
    assert errors[-1] < errors[0] / 4
    # a formula error (say E[t] = 1/2, or no main effect) would be off by O(scale)
    assert eh.last_call_cost.hvps == 25600 * 2 * d


def test_expected_hessians_with_one_reference_is_integrated_hessians_in_expectation():
    model = softplus_mlp(d_in=4, d_out=1)
    x = torch.randn(3, 4, dtype=DTYPE)
    ref = torch.randn(1, 4, dtype=DTYPE)
    torch.manual_seed(0)
    eh, delta = ExpectedHessians(model).attribute(
        x, ref, n_samples=4000, return_convergence_delta=True
    )
    ih = IntegratedHessians(model).attribute(x, ref, n_steps=32)
    assert (eh - ih).abs().max() < 0.05 * ih.abs().max()
    change = model(x)[:, 0] - model(ref)[:, 0]
    assert (delta.abs() / change.abs()).max() < 0.05


def test_reproducible_under_manual_seed_callable_baselines_and_grouping():
    model = softplus_mlp(d_in=4)
    x = torch.randn(2, 4, dtype=DTYPE)
    background = torch.randn(20, 4, dtype=DTYPE)
    eh = ExpectedHessians(model)
    torch.manual_seed(3)
    first = eh.attribute(x, background, target=1, n_samples=16)
    torch.manual_seed(3)
    again = eh.attribute(x, lambda: background, target=1, n_samples=16)
    # identical draws; CUDA's atomic index_add may reorder the float sums
    torch.testing.assert_close(first, again, rtol=0, atol=1e-15)
    torch.manual_seed(3)
    grouped = eh.attribute(
        x, background, target=1, n_samples=16, feature_mask=torch.tensor([[0, 1, 1, 0]]),
        internal_batch_size=5,
    )
    oh = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=DTYPE)
    torch.testing.assert_close(grouped, oh.T @ first @ oh, rtol=1e-12, atol=1e-12)


def test_tuple_inputs_and_per_sample_completeness_delta():
    model = softplus_mlp(d_in=5, d_out=1)
    f = lambda u, v: model(torch.cat([u, v], 1))  # noqa: E731
    u, v = torch.randn(2, 2, dtype=DTYPE), torch.randn(2, 3, dtype=DTYPE)
    refs = (torch.randn(7, 2, dtype=DTYPE), torch.randn(7, 3, dtype=DTYPE))
    torch.manual_seed(0)
    out, delta = ExpectedHessians(f).attribute(
        (u, v), refs, n_samples=8, return_convergence_delta=True
    )
    assert out[0][1].shape == (2, 2, 3) and out[1][0].shape == (2, 3, 2)
    torch.testing.assert_close(out[0][1], out[1][0].transpose(1, 2))
    assert delta.shape == (2,)


def test_baselines_are_required_and_validated():
    eh = ExpectedHessians(softplus_mlp(d_in=4))
    x = torch.randn(2, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match="baselines"):
        eh.attribute(x, None, target=0)
    with pytest.raises(ValueError, match="baselines"):
        eh.attribute(x, torch.randn(5, 3, dtype=DTYPE), target=0)
    with pytest.raises(ValueError, match="n_samples"):
        eh.attribute(x, torch.randn(5, 4, dtype=DTYPE), target=0, n_samples=0)
    with pytest.raises(ValueError, match="target"):
        eh.attribute(x, torch.randn(5, 4, dtype=DTYPE))


def test_no_interactions_for_additive_model():
    model = lambda v: torch.sin(v).sum(1) + v[:, 0] ** 2  # noqa: E731
    x = torch.randn(2, 3, dtype=DTYPE)
    eh = ExpectedHessians(model).attribute(x, torch.randn(9, 3, dtype=DTYPE), n_samples=32)
    off = eh - torch.diag_embed(torch.diagonal(eh, dim1=1, dim2=2))
    assert off.abs().max() == 0
    assert isinstance(model, type(lambda: 0)) and not isinstance(model, nn.Module)
