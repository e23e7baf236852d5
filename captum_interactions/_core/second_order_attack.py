#!/usr/bin/env python3
r"""First- and second-order adversarial steps from a local model of f.

SmoothHess' adversarial experiment (Torop et al., NeurIPS 2023, sec. 5) moves an
input by the step that most decreases the quadratic model

.. math::
    m(\delta) = g^\top \delta + \tfrac12 \delta^\top H \delta, \qquad \|\delta\|_2 \le r,

built from a (gradient, Hessian) pair (SmoothGrad and SmoothHess, a Softplus
Hessian, ...), and compares it with the first-order step -r g / ||g||. The
trust-region subproblem is solved exactly (More and Sorensen) from the
eigendecomposition of H, including the "hard case".
"""
from typing import Tuple, Union

import torch
from torch import Tensor

from captum_interactions._utils.feature_groups import split_features
from captum_interactions._utils.stein import flatten_gradient, flatten_hessian

GradientType = Union[Tensor, Tuple[Tensor, ...]]
HessianType = Union[Tensor, Tuple[Tuple[Tensor, ...], ...]]


def _validate_radius(radius: float) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"`radius` must be a number > 0, got {radius!r}")
    return float(radius)


def _unflatten(flat: Tensor, shapes, is_tuple: bool) -> GradientType:
    parts = split_features(flat, shapes)
    return parts if is_tuple else parts[0]


def first_order_attack(gradient: GradientType, radius: float) -> GradientType:
    r"""
    The step -r g / ||g|| (per example, over all features of all inputs), which
    minimizes the linear model g^T delta over the ball ||delta|| <= r.

    Args:
        gradient (Tensor or tuple[Tensor, ...]): gradient at x in the inputs'
            layout, batch first (e.g. SmoothGrad).
        radius (float): the attack budget r > 0 (L2 norm).

    Returns:
        Tensor or tuple[Tensor, ...]: delta in the gradient's layout; zero where
        the gradient is zero.

    Examples::

        >>> g = torch.tensor([[3.0, 4.0]])
        >>> first_order_attack(g, 1.0)
        tensor([[-0.6000, -0.8000]])
    """
    r = _validate_radius(radius)
    g, shapes, is_tuple = flatten_gradient(gradient)
    norm = g.norm(dim=1, keepdim=True)
    delta = torch.where(norm > 0, -r * g / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    return _unflatten(delta, shapes, is_tuple)


def trust_region_step(
    g: Tensor, h: Tensor, radius: float, iterations: int = 200
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Exact minimizer of g^T d + 1/2 d^T H d over ||d|| <= r, batched.

    Args:
        g (Tensor): (N, D) gradients.
        h (Tensor): (N, D, D) symmetric matrices (symmetrized here).
        radius (float): r > 0.
        iterations (int): bisection steps on the secular equation.

    Returns:
        (delta (N, D), eigenvalues (N, D) ascending, eigenvectors (N, D, D) as
        columns in the same order).

    With H = Q diag(lambda) Q^T and gamma = Q^T g, the solution is
    d(mu) = -Q (Lambda + mu)^{-1} gamma with mu >= max(0, -lambda_min) and
    mu (r - ||d||) = 0. If H is positive definite and ||H^{-1} g|| <= r, mu = 0
    (interior). Otherwise ||d(mu)|| = r, found by bisection on mu, which is
    monotone. Hard case: gamma vanishes on the eigenspace of lambda_min and
    ||d(-lambda_min)|| < r (on the other eigenvectors); the solution then adds
    the lowest eigenvector to reach the boundary.
    """
    r = float(radius)
    h = 0.5 * (h + h.transpose(1, 2))
    eigenvalues, eigenvectors = torch.linalg.eigh(h)  # ascending
    gamma = torch.einsum("nji,nj->ni", eigenvectors, g)  # Q^T g
    scale = eigenvalues.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    eps = torch.finfo(g.dtype).eps
    lam_min = eigenvalues[:, :1]
    # eigen-directions that belong to the lowest eigenvalue (numerically)
    on_min = (eigenvalues - lam_min) <= 1e3 * eps * scale
    g_norm = g.norm(dim=1, keepdim=True)
    gamma_tol = 1e3 * eps * g_norm.clamp_min(eps)
    gamma_on_min = torch.where(on_min, gamma, 0.0).norm(dim=1, keepdim=True)

    def step(mu: Tensor, mask_min: bool = False) -> Tensor:
        denom = eigenvalues + mu
        coeff = -gamma / torch.where(denom > 0, denom, 1.0)
        if mask_min:
            coeff = torch.where(on_min, 0.0, coeff)
        return coeff

    lower = (-lam_min).clamp_min(0.0)
    # interior solution: H positive definite and Newton step inside the ball
    positive_definite = lam_min > 1e3 * eps * scale
    interior = positive_definite & (step(torch.zeros_like(lower)).norm(dim=1, keepdim=True) <= r)
    # hard case: no gradient component on the lowest eigenspace, and the step
    # on the other eigenvectors with mu = -lambda_min stays inside the ball
    hard_base = step(lower, mask_min=True)
    hard = (
        ~interior
        & (lam_min <= 1e3 * eps * scale)
        & (gamma_on_min <= gamma_tol)
        & (hard_base.norm(dim=1, keepdim=True) < r)
    )
    # boundary: bisection on mu in (lower, upper], ||d(mu)|| decreasing
    upper = lower + g_norm / r + eps * scale
    lo, hi = lower.clone(), upper.clone()
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_long = step(mid).norm(dim=1, keepdim=True) > r
        lo = torch.where(too_long, mid, lo)
        hi = torch.where(too_long, hi, mid)
    boundary = step(hi)
    # ||d(hi)|| <= r by construction; rescale the last bit of bisection error
    boundary_norm = boundary.norm(dim=1, keepdim=True)
    boundary = torch.where(boundary_norm > 0, boundary * (r / boundary_norm.clamp_min(eps)), boundary)
    # hard case: add tau * (first eigenvector) to reach the boundary
    tau = (r * r - hard_base.pow(2).sum(dim=1, keepdim=True)).clamp_min(0.0).sqrt()
    hard_coeff = hard_base.clone()
    hard_coeff[:, 0] += tau[:, 0]
    coeff = torch.where(interior, step(torch.zeros_like(lower)), boundary)
    coeff = torch.where(hard, hard_coeff, coeff)
    delta = torch.einsum("nij,nj->ni", eigenvectors, coeff)
    return delta, eigenvalues, eigenvectors


def second_order_attack(
    gradient: GradientType,
    hessian: HessianType,
    radius: float,
) -> GradientType:
    r"""
    The step delta minimizing the quadratic model g^T delta + 1/2 delta^T H delta
    over the L2 ball ||delta|| <= r, per example (the exact trust-region
    solution, from the eigendecomposition of H; eigenpairs in ascending order,
    hard case included). With H = 0 this reduces to :func:`first_order_attack`.

    Args:
        gradient (Tensor or tuple[Tensor, ...]): gradient at x in the inputs'
            layout (e.g. SmoothGrad), batch first.
        hessian (Tensor or tuple[tuple[Tensor, ...], ...]): Hessian at x in the
            layout of ``SmoothHess.attribute`` without ``feature_mask``:
            (N, *F, *F) or ``h[i][j]`` of shape (N, *F_i, *F_j). Symmetrized.
        radius (float): the attack budget r > 0 (L2 norm over all features).

    Returns:
        Tensor or tuple[Tensor, ...]: delta, in the gradient's layout. Apply it
        as ``x + delta`` (and clamp to the data range if needed).

    Examples::

        >>> g = torch.tensor([[1.0, 0.0]])
        >>> h = torch.tensor([[[1.0, 0.0], [0.0, -2.0]]])
        >>> second_order_attack(g, h, radius=1.0).norm()  # on the boundary
        tensor(1.0000)

    Paper: https://arxiv.org/abs/2311.00858 (SmoothHess, sec. 5.3)
    """
    r = _validate_radius(radius)
    g, shapes, is_tuple = flatten_gradient(gradient)
    h = flatten_hessian(hessian, shapes).to(dtype=g.dtype, device=g.device)
    if h.shape[0] != g.shape[0]:
        raise ValueError(
            f"`hessian` has {h.shape[0]} examples but `gradient` has {g.shape[0]}"
        )
    delta, _, _ = trust_region_step(g, h, r)
    return _unflatten(delta, shapes, is_tuple)
