import pytest
import torch
from torch import nn

from captum_interactions import SmoothHess, replace_relu_with_softplus
from captum_interactions._utils.stein import quadratic_form
from captum_interactions.metrics import pmse, sample_ball

DTYPE = torch.float64


def cpu_randn(gen, *shape):
    """Seeded CPU draw moved to the default device (CUDA test mode included)."""
    return torch.randn(*shape, generator=gen, dtype=DTYPE, device="cpu").to(
        torch.get_default_device()
    )


class Quadratic(nn.Module):
    """f(x) = 1/2 x^T A x + b^T x + c, exactly its own second-order Taylor model."""

    def __init__(self, a, b, c=0.3):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return 0.5 * ((x @ self.a) * x).sum(1) + x @ self.b + self.c


def random_quadratic(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = cpu_randn(gen, d, d)
    return Quadratic(a + a.T, cpu_randn(gen, d))


def test_exact_taylor_model_of_a_quadratic_has_zero_pmse_for_both_samplers():
    model = random_quadratic(4)
    x = torch.randn(3, 4, dtype=DTYPE)
    grad = x @ model.a + model.b
    hess = model.a.expand(3, 4, 4)
    for sampler in ("uniform", "reference"):
        err = pmse(model, x, grad, hess, radius=0.7, n_samples=200, sampler=sampler)
        assert err.shape == (3,)
        assert err.abs().max() < 1e-24


def test_first_order_model_pmse_matches_closed_moments_of_each_sampler():
    """Gradient only: PMSE = E[(1/2 D^T A D)^2] = E|D|^4 / 4 * E[(u^T A u)^2], u uniform
    on the sphere, E[(u^T A u)^2] = (tr(A)^2 + 2 tr(A^2)) / (d (d + 2));
    E|D|^4 = r^4 d / (d + 4) uniformly in the ball, r^4 / 5 for norm r U."""
    d, r = 6, 0.8
    model = random_quadratic(d, seed=1)
    a = model.a
    x = torch.randn(2, d, dtype=DTYPE)
    grad = x @ a + model.b
    sphere = (torch.trace(a) ** 2 + 2 * torch.trace(a @ a)) / (d * (d + 2))
    moments = {"uniform": r**4 * d / (d + 4), "reference": r**4 / 5}
    torch.manual_seed(0)
    for sampler, moment in moments.items():
        err = pmse(model, x, grad, None, radius=r, n_samples=40000, sampler=sampler)
        expected = 0.25 * moment * sphere
        torch.testing.assert_close(err, expected.expand(2), rtol=0.04, atol=0)
    # the two samplers differ by far more than the tolerance above
    assert moments["uniform"] / moments["reference"] > 2.5


def test_samplers_stay_in_the_ball_with_the_right_radial_law():
    torch.manual_seed(0)
    d, r = 5, 2.0
    for sampler, half_mass in (("uniform", 0.5**d), ("reference", 0.5)):
        delta = sample_ball(20000, 2, d, r, sampler, DTYPE)
        norms = delta.norm(dim=2)
        assert delta.shape == (20000, 2, d) and norms.max() <= r * (1 + 1e-12)
        frac = (norms < r / 2).to(DTYPE).mean().item()
        assert abs(frac - half_mass) < 0.02
        # directions are isotropic: the mean is near zero
        assert delta.mean(dim=(0, 1)).abs().max() < 0.05


def test_quadratic_term_einsum_equals_per_sample_products():
    h = torch.randn(3, 5, 5, dtype=DTYPE)
    delta = torch.randn(7, 3, 5, dtype=DTYPE)
    expected = torch.stack(
        [torch.stack([delta[s, n] @ h[n] @ delta[s, n] for n in range(3)]) for s in range(7)]
    )
    torch.testing.assert_close(quadratic_form(h, delta), expected, rtol=1e-12, atol=1e-12)


def test_tuple_inputs_targets_and_internal_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(DTYPE)
    x = torch.randn(4, 5, dtype=DTYPE)
    g = torch.randn(4, 5, dtype=DTYPE)
    h = torch.randn(4, 5, 5, dtype=DTYPE)
    target = [0, 2, 1, 1]
    results = []
    for ibs in (None, 1, 5, 13):
        torch.manual_seed(3)
        results.append(
            pmse(model, x, g, h, 0.5, n_samples=50, target=target, internal_batch_size=ibs)
        )
    for res in results[1:]:
        torch.testing.assert_close(res, results[0], rtol=1e-12, atol=1e-14)
    split = lambda t: (t[:, :2], t[:, 2:])  # noqa: E731
    h_blocks = tuple(
        tuple(h[:, rows][:, :, cols] for cols in (slice(0, 2), slice(2, 5)))
        for rows in (slice(0, 2), slice(2, 5))
    )
    torch.manual_seed(3)
    tuple_result = pmse(
        lambda a, b: model(torch.cat([a, b], 1)), split(x), split(g), h_blocks, 0.5,
        n_samples=50, target=target,
    )
    torch.testing.assert_close(tuple_result, results[0], rtol=1e-12, atol=1e-14)


def test_smoothhess_beats_gradient_only_on_a_relu_net_and_softplus_pair_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1)).to(DTYPE)
    x = torch.randn(6, 4, dtype=DTYPE)
    r = 0.5
    torch.manual_seed(1)
    hess, grad = SmoothHess(model).attribute(
        x, n_samples=20000, stdevs=r / 2, return_smoothgrad=True
    )
    torch.manual_seed(2)
    second = pmse(model, x, grad, hess, r, n_samples=4000)
    torch.manual_seed(2)
    first = pmse(model, x, grad, None, r, n_samples=4000)
    assert second.mean() < first.mean()
    with replace_relu_with_softplus(model, beta=5.0):
        xs = x.clone().requires_grad_(True)
        sp_grad = torch.autograd.grad(model(xs).sum(), xs)[0]
        sp_hess = torch.stack([
            torch.autograd.functional.hessian(lambda v: model(v[None])[0, 0], p) for p in x
        ])
    torch.manual_seed(2)
    softplus = pmse(model, x, sp_grad, sp_hess, r, n_samples=4000)
    assert torch.isfinite(softplus).all() and (softplus > 0).all()


def test_bad_arguments():
    model = random_quadratic(3)
    x = torch.randn(2, 3, dtype=DTYPE)
    g = torch.zeros(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="sampler"):
        pmse(model, x, g, None, 1.0, sampler="gaussian")
    with pytest.raises(ValueError, match="radius"):
        pmse(model, x, g, None, 0.0)
    with pytest.raises(ValueError, match="hessian"):
        pmse(model, x, g, torch.zeros(2, 4, 4, dtype=DTYPE), 1.0)
    with pytest.raises(ValueError, match="gradient"):
        pmse(model, x, torch.zeros(2, 4, dtype=DTYPE), None, 1.0)
    with pytest.raises(ValueError, match="n_samples"):
        pmse(model, x, g, None, 1.0, n_samples=0)
