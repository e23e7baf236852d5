import math

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from torch import nn

from captum_interactions import IntegratedHessians
from captum_interactions.metrics import interaction_completeness

DTYPE = torch.float64


def softplus_mlp(d_in=5, hidden=16, d_out=3, beta=3.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Softplus(beta=beta),
        nn.Linear(hidden, hidden),
        nn.Softplus(beta=beta),
        nn.Linear(hidden, d_out),
    ).to(DTYPE)


class Product(nn.Module):
    """f(x) = prod_k x_k."""

    def forward(self, x):
        return x.prod(dim=1)


class Quadratic(nn.Module):
    """f(x) = 1/2 x^T A x + b^T x + c."""

    def __init__(self, a, b, c=0.7):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x):
        return 0.5 * ((x @ self.a) * x).sum(1) + x @ self.b + self.c


def quadratic_ih(a, b, x, base):
    """Closed form: H = A constant, grad f(y) = A y + b, int int alpha beta = 1/4."""
    delta = x - base
    gamma = 0.25 * delta[:, :, None] * delta[:, None, :] * a
    main = delta * (base @ a + b) + 0.25 * delta * (delta @ a)
    return gamma + torch.diag_embed(main)


def test_product_of_coordinates_from_zero_every_entry_is_f_over_m_squared():
    for m in (2, 3, 4):
        x = torch.rand(3, m, dtype=DTYPE) + 0.5
        gamma = IntegratedHessians(Product()).attribute(x)
        expected = (x.prod(1) / m**2)[:, None, None].expand(3, m, m)
        torch.testing.assert_close(gamma, expected, rtol=1e-12, atol=1e-12)


def test_quadratic_form_any_baseline_closed_form():
    torch.manual_seed(1)
    d = 4
    a = torch.randn(d, d, dtype=DTYPE)
    a = a + a.T
    b = torch.randn(d, dtype=DTYPE)
    x, base = torch.randn(5, d, dtype=DTYPE), torch.randn(5, d, dtype=DTYPE)
    gamma = IntegratedHessians(Quadratic(a, b)).attribute(x, base, n_steps=4)
    torch.testing.assert_close(gamma, quadratic_ih(a, b, x, base), rtol=1e-12, atol=1e-12)
    # a batch-1 baseline is broadcast as in Captum
    gamma1 = IntegratedHessians(Quadratic(a, b)).attribute(x, base[:1], n_steps=4)
    torch.testing.assert_close(
        gamma1, quadratic_ih(a, b, x, base[:1].expand_as(x)), rtol=1e-12, atol=1e-12
    )


def test_symmetry_row_sums_equal_captum_integrated_gradients():
    model = softplus_mlp()
    x, base = torch.randn(4, 5, dtype=DTYPE), torch.randn(4, 5, dtype=DTYPE)
    gamma = IntegratedHessians(model).attribute(x, base, target=2)
    torch.testing.assert_close(gamma, gamma.transpose(1, 2), rtol=0, atol=1e-12)
    ig = IntegratedGradients(model).attribute(x, base, target=2, n_steps=300)
    torch.testing.assert_close(gamma.sum(2), ig, rtol=1e-7, atol=1e-9)


def test_completeness_default_steps_float64_and_metric():
    model = softplus_mlp(beta=5.0)
    x, base = torch.randn(6, 5, dtype=DTYPE), torch.randn(6, 5, dtype=DTYPE)
    ih = IntegratedHessians(model)
    gamma, delta = ih.attribute(x, base, target=0, return_convergence_delta=True)
    # relative to the output's magnitude (f(x) - f(x') itself can be near 0)
    scale = (model(x).abs() + model(base).abs())[:, 0]
    assert (delta.abs() / scale).max() <= 1e-7
    torch.testing.assert_close(
        interaction_completeness(model, gamma, x, base, target=0), delta, rtol=0, atol=1e-12
    )
    # the log-weight Gauss rule beats Gauss-Legendre at equal cost by orders of magnitude
    _, delta_gl = ih.attribute(
        x, base, target=0, method="gausslegendre", return_convergence_delta=True
    )
    assert delta_gl.abs().max() > 100 * delta.abs().max()
    # cost: n_steps rows of gradients, n_steps * D HVPs per example
    assert ih.last_call_cost.gradient_rows == 16 * 6
    assert ih.last_call_cost.hvps == 16 * 6 * 5


def test_matches_nested_autograd_hessian_along_the_path():
    """Independent computation: torch.autograd.functional.hessian at Gauss-log nodes."""
    from captum_interactions._utils.quadrature import gauss_log_rule

    model = softplus_mlp(d_in=3, d_out=1)
    x, base = torch.randn(1, 3, dtype=DTYPE), torch.randn(1, 3, dtype=DTYPE)
    f = lambda v: model(v.unsqueeze(0))[0, 0]  # noqa: E731
    delta = (x - base)[0]
    nodes, weights = gauss_log_rule(16)
    expected = torch.zeros(3, 3, dtype=DTYPE)
    for t, w in zip(nodes, weights):
        point = base[0] + t * delta
        hess = torch.autograd.functional.hessian(f, point)
        grad = torch.autograd.functional.jacobian(f, point)
        expected += w * (t * torch.outer(delta, delta) * hess + torch.diag(delta * grad))
    gamma = IntegratedHessians(model).attribute(x, base)
    torch.testing.assert_close(gamma[0], expected, rtol=1e-12, atol=1e-13)


def test_grouped_equals_summed_full_matrix_shared_and_per_example_masks():
    model = softplus_mlp(d_in=6)
    x, base = torch.randn(3, 6, dtype=DTYPE), torch.randn(3, 6, dtype=DTYPE)
    ih = IntegratedHessians(model)
    full = ih.attribute(x, base, target=1)
    mask = torch.tensor([[5, 5, 9, 2, 2, 2]])
    grouped = ih.attribute(x, base, target=1, feature_mask=mask)
    assert ih.last_call_cost.hvps == 16 * 3 * 3  # G = 3 directions, not D = 6
    onehot = torch.stack([(mask[0] == g) for g in (2, 5, 9)], 1).to(DTYPE)  # sorted ids
    torch.testing.assert_close(grouped, onehot.T @ full @ onehot, rtol=1e-12, atol=1e-12)
    per_example = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2], [2, 2, 2, 0, 1, 1]])
    grouped_pe = ih.attribute(x, base, target=1, feature_mask=per_example)
    for n in range(3):
        oh = torch.stack([(per_example[n] == g) for g in range(3)], 1).to(DTYPE)
        torch.testing.assert_close(grouped_pe[n], oh.T @ full[n] @ oh, rtol=1e-12, atol=1e-12)


class TwoInputModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = softplus_mlp(d_in=2 + 3 * 2, d_out=2)

    def forward(self, a, b, scale=1.0):
        return self.net(torch.cat([a, b.flatten(1)], dim=1)) * scale


def test_tuple_inputs_equal_concatenated_input_and_additional_args():
    model = TwoInputModel()
    a, b = torch.randn(2, 2, dtype=DTYPE), torch.randn(2, 3, 2, dtype=DTYPE)
    ih = IntegratedHessians(model)
    out = ih.attribute((a, b), target=1, additional_forward_args=(2.0,))
    assert out[0][0].shape == (2, 2, 2) and out[0][1].shape == (2, 2, 3, 2)
    assert out[1][0].shape == (2, 3, 2, 2) and out[1][1].shape == (2, 3, 2, 3, 2)
    concat = torch.cat([a, b.flatten(1)], 1)
    ref = IntegratedHessians(lambda v: model.net(v) * 2.0).attribute(concat, target=1)
    full = torch.cat(
        [
            torch.cat([out[0][0], out[0][1].reshape(2, 2, 6)], 2),
            torch.cat([out[1][0].reshape(2, 6, 2), out[1][1].reshape(2, 6, 6)], 2),
        ],
        1,
    )
    torch.testing.assert_close(full, ref, rtol=1e-12, atol=1e-12)
    # a mask group spanning both tensors
    grouped = ih.attribute(
        (a, b),
        target=1,
        additional_forward_args=(2.0,),
        feature_mask=(torch.tensor([[0, 1]]), torch.tensor([[[1, 2], [2, 2], [0, 0]]])),
    )
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 0, 0])
    oh = torch.stack([(ids == g) for g in range(3)], 1).to(DTYPE)
    torch.testing.assert_close(grouped, oh.T @ ref @ oh, rtol=1e-12, atol=1e-12)


def test_image_input_layout_and_completeness():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 2), nn.Softplus(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)
    ).to(DTYPE)
    x = torch.randn(2, 1, 4, 4, dtype=DTYPE)
    gamma, delta = IntegratedHessians(model).attribute(
        x, target=0, return_convergence_delta=True
    )
    assert gamma.shape == (2, 1, 4, 4, 1, 4, 4)
    assert delta.abs().max() < 1e-10
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    mask = ((rows // 2) * 2 + cols // 2).view(1, 1, 4, 4)  # four 2x2 patches
    grouped = IntegratedHessians(model).attribute(x, target=0, feature_mask=mask)
    flat = gamma.reshape(2, 16, 16)
    ids = mask.reshape(16)
    oh = torch.stack([(ids == g) for g in ids.unique()], 1).to(DTYPE)
    torch.testing.assert_close(grouped, oh.T @ flat @ oh, rtol=1e-12, atol=1e-12)


def test_internal_batch_size_and_target_forms_give_same_numbers():
    model = softplus_mlp()
    x = torch.randn(4, 5, dtype=DTYPE)
    ih = IntegratedHessians(model)
    ref = ih.attribute(x, target=2)
    for ibs in (1, 3, 7, 64, 10_000):
        torch.testing.assert_close(
            ih.attribute(x, target=2, internal_batch_size=ibs), ref, rtol=1e-12, atol=1e-13
        )
    torch.testing.assert_close(ih.attribute(x, target=torch.tensor(2)), ref)
    per_example = [2, 0, 1, 2]
    by_list = ih.attribute(x, target=per_example, internal_batch_size=9)
    by_tensor = ih.attribute(x, target=torch.tensor(per_example))
    torch.testing.assert_close(by_list, by_tensor, rtol=1e-12, atol=1e-13)
    for n, tgt in enumerate(per_example):
        torch.testing.assert_close(
            by_list[n], ih.attribute(x[n : n + 1], target=tgt)[0], rtol=1e-12, atol=1e-13
        )
    # tuple target on a 3-D output
    model3 = lambda v: model(v).unsqueeze(1).expand(-1, 2, 3)  # noqa: E731
    torch.testing.assert_close(
        IntegratedHessians(model3).attribute(x, target=(1, 2)), ref, rtol=1e-12, atol=1e-13
    )


def test_linear_model_has_only_main_effects():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    gamma = IntegratedHessians(model).attribute(x)
    torch.testing.assert_close(gamma, torch.diag_embed(x * model.weight[0]), rtol=1e-12, atol=1e-14)


def test_noise_tunnel_wraps_integrated_hessians():
    model = softplus_mlp()
    x = torch.randn(2, 5, dtype=DTYPE)
    ih = IntegratedHessians(model)
    assert hasattr(ih.attribute, "__wrapped__")
    torch.manual_seed(0)
    nt = NoiseTunnel(ih).attribute(
        x, nt_samples=4, stdevs=0.0, target=1, return_convergence_delta=True
    )
    gamma, delta = nt
    torch.testing.assert_close(gamma, ih.attribute(x, target=1), rtol=1e-10, atol=1e-12)
    assert delta.shape == (8,)
    smoothed = NoiseTunnel(ih).attribute(x, nt_samples=3, stdevs=0.3, target=1)
    assert smoothed.shape == (2, 5, 5) and not torch.allclose(smoothed, gamma)


def test_runs_under_no_grad_and_float32():
    model = softplus_mlp().float()
    x = torch.randn(3, 5)
    with torch.no_grad():
        gamma, delta = IntegratedHessians(model).attribute(
            x, target=0, return_convergence_delta=True
        )
    assert gamma.dtype == torch.float32
    change = (model(x) - model(torch.zeros_like(x)))[:, 0]
    assert (delta.abs() / change.abs()).max() < 1e-4


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"n_steps": 2.5}, ValueError, "n_steps"),
        ({"baselines": torch.zeros(4, 4, dtype=DTYPE)}, ValueError, "baselines"),
        ({"baselines": torch.zeros(2, 5, dtype=DTYPE)}, ValueError, "baselines"),
        ({"target": None}, ValueError, "target"),
        ({"target": [0, 1]}, ValueError, "target"),
        ({"feature_mask": torch.zeros(1, 4, dtype=torch.long)}, ValueError, "feature_mask"),
        ({"feature_mask": torch.zeros(1, 5)}, TypeError, "feature_mask"),
        ({"method": "simpson"}, ValueError, "method"),
        ({"internal_batch_size": 0}, ValueError, "internal_batch_size"),
    ],
)
def test_bad_input_raises_clear_error_and_leaves_model_unchanged(kwargs, error, match):
    model = softplus_mlp()
    model.train()
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    call = {"target": 0, **kwargs}
    with pytest.raises(error, match=match):
        IntegratedHessians(model).attribute(torch.randn(3, 5, dtype=DTYPE), **call)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_bad_inputs_type():
    with pytest.raises(TypeError, match="inputs"):
        IntegratedHessians(softplus_mlp()).attribute([1.0, 2.0])
    with pytest.raises(TypeError, match="floating point"):
        IntegratedHessians(softplus_mlp()).attribute(torch.ones(2, 5, dtype=torch.long))


def test_model_state_unchanged_after_successful_call():
    model = softplus_mlp()
    model.train()
    IntegratedHessians(model).attribute(torch.randn(2, 5, dtype=DTYPE), target=0)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_pairwise_interaction_of_xor_like_function_is_the_product_term():
    """f = x1 x2 + sin(x3): the only off-diagonal entries are (1, 2) and (2, 1)."""
    f = lambda v: v[:, 0] * v[:, 1] + torch.sin(v[:, 2])  # noqa: E731
    x = torch.tensor([[1.0, 2.0, 0.5]], dtype=DTYPE)
    gamma = IntegratedHessians(f).attribute(x)
    assert gamma[0, 0, 1].item() == pytest.approx(0.5, abs=1e-12)  # f(x)/m^2 * 2 = 2/4
    assert gamma[0, 0, 2].abs().item() < 1e-14 and gamma[0, 1, 2].abs().item() < 1e-14
    assert gamma[0, 2, 2].item() == pytest.approx(math.sin(0.5), abs=1e-12)
