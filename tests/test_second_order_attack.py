import pytest
import torch
from torch import nn

from captum_interactions import SmoothHess
from captum_interactions._core.second_order_attack import trust_region_step
from captum_interactions.metrics import first_order_attack, second_order_attack

DTYPE = torch.float64


def cpu_randn(gen, *shape):
    """Seeded CPU draw moved to the default device (CUDA test mode included)."""
    return torch.randn(*shape, generator=gen, dtype=DTYPE, device="cpu").to(
        torch.get_default_device()
    )


def model_value(g, h, d):
    return (g * d).sum(-1) + 0.5 * torch.einsum("ni,nij,nj->n", d, h, d)


def assert_trust_region_optimal(g, h, d, r, tol=1e-8):
    """Global optimality (More-Sorensen): some mu >= 0 with (H + mu I) d = -g,
    H + mu I positive semidefinite, ||d|| <= r and mu (r - ||d||) = 0."""
    for n in range(g.shape[0]):
        gn, hn, dn = g[n], h[n], d[n]
        norm = dn.norm()
        assert norm <= r * (1 + 1e-10)
        if norm < r * (1 - 1e-8):
            mu = torch.zeros((), dtype=DTYPE)
        else:
            mu = -(dn @ (hn @ dn + gn)) / (dn @ dn)
        assert mu >= -tol
        residual = hn @ dn + gn + mu * dn
        assert residual.norm() <= tol * (1 + gn.norm() + hn.norm())
        assert torch.linalg.eigvalsh(hn)[0] + mu >= -tol
        assert mu * (r - norm) <= tol


def random_symmetric(n, d, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    m = cpu_randn(gen, n, d, d)
    return 0.5 * (m + m.transpose(1, 2)) + shift * torch.eye(d, dtype=DTYPE)


def test_interior_newton_step_when_positive_definite_and_short():
    h = random_symmetric(3, 4, 0, shift=6.0)
    assert torch.linalg.eigvalsh(h).min() > 0
    g = 0.1 * torch.randn(3, 4, dtype=DTYPE)
    d = second_order_attack(g, h, radius=10.0)
    torch.testing.assert_close(d, -torch.linalg.solve(h, g), rtol=1e-10, atol=1e-12)
    assert_trust_region_optimal(g, h, d, 10.0)


def test_boundary_solution_is_globally_optimal_and_beats_random_points():
    torch.manual_seed(0)
    h = random_symmetric(5, 6, 1)  # indefinite
    g = torch.randn(5, 6, dtype=DTYPE)
    r = 0.8
    d = second_order_attack(g, h, radius=r)
    assert_trust_region_optimal(g, h, d, r)
    torch.testing.assert_close(d.norm(dim=1), torch.full((5,), r, dtype=DTYPE))
    # no feasible random point does better
    cand = torch.randn(4000, 5, 6, dtype=DTYPE)
    cand = cand / cand.norm(dim=2, keepdim=True) * r * torch.rand(4000, 5, 1, dtype=DTYPE)
    values = torch.stack([model_value(g, h, c) for c in cand])
    assert (model_value(g, h, d) <= values.min(0).values + 1e-12).all()
    # and it is at least as good as the first-order step on the same model
    d1 = first_order_attack(g, r)
    assert (model_value(g, h, d) <= model_value(g, h, d1) + 1e-12).all()


def test_hard_case_gradient_orthogonal_to_lowest_eigenvector():
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=DTYPE))
    lam = torch.tensor([-2.0, 1.0, 3.0], dtype=DTYPE)
    h = (q * lam) @ q.T
    g = (q[:, 1] * 0.1 + q[:, 2] * 0.1)[None]
    r = 1.0
    d = second_order_attack(g, h[None], radius=r)
    assert_trust_region_optimal(g, h[None], d, r)
    # closed form: mu = 2, d = -0.1/3 q1 - 0.1/5 q2 +- tau q0 on the boundary
    base = -0.1 / 3 * q[:, 1] - 0.1 / 5 * q[:, 2]
    tau = (r**2 - base.norm() ** 2).sqrt()
    expected_value = model_value(g, h[None], (base + tau * q[:, 0])[None])
    torch.testing.assert_close(model_value(g, h[None], d), expected_value)
    # zero gradient, indefinite: move along the lowest eigenvector
    d0 = second_order_attack(torch.zeros(1, 3, dtype=DTYPE), h[None], radius=2.0)
    torch.testing.assert_close(d0.abs()[0], (2.0 * q[:, 0]).abs(), rtol=1e-10, atol=1e-12)


def test_eigenpairs_sorted_and_zero_hessian_is_first_order():
    g = torch.randn(4, 5, dtype=DTYPE)
    h = random_symmetric(4, 5, 3)
    _, eigenvalues, eigenvectors = trust_region_step(g, h, 1.0)
    assert (eigenvalues[:, 1:] >= eigenvalues[:, :-1]).all()
    torch.testing.assert_close(
        eigenvectors @ torch.diag_embed(eigenvalues) @ eigenvectors.transpose(1, 2), h
    )
    d = second_order_attack(g, torch.zeros(4, 5, 5, dtype=DTYPE), 0.3)
    torch.testing.assert_close(d, first_order_attack(g, 0.3))
    torch.testing.assert_close(
        first_order_attack(g, 0.3), -0.3 * g / g.norm(dim=1, keepdim=True)
    )
    assert first_order_attack(torch.zeros(2, 3), 1.0).abs().sum() == 0


def test_tuple_layout_and_smoothhess_attack_on_relu_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    hess, grad = SmoothHess(model).attribute(
        x, n_samples=2000, stdevs=0.3, return_smoothgrad=True
    )
    d = second_order_attack(grad, hess, 0.3)
    assert_trust_region_optimal(grad, hess, d, 0.3, tol=1e-7)
    blocks = tuple(
        tuple(hess[:, rows][:, :, cols] for cols in (slice(0, 1), slice(1, 4)))
        for rows in (slice(0, 1), slice(1, 4))
    )
    d_tuple = second_order_attack((grad[:, :1], grad[:, 1:]), blocks, 0.3)
    torch.testing.assert_close(torch.cat(d_tuple, 1), d)
    with pytest.raises(ValueError, match="radius"):
        second_order_attack(grad, hess, -1.0)
    with pytest.raises(ValueError, match="hessian"):
        second_order_attack(grad, hess[:, :3, :3], 1.0)
