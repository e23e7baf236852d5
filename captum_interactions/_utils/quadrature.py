#!/usr/bin/env python3
r"""Quadrature for the double path integral of Integrated Hessians.

Every Integrated Hessians integrand depends on alpha and beta only through
t = alpha * beta, and

.. math::
    \int_0^1\!\!\int_0^1 g(\alpha\beta)\,d\alpha\,d\beta = \int_0^1 (-\ln t)\, g(t)\,dt,

so one path of ``n_steps`` points replaces an ``n_steps``\ :sup:`2` grid. The
default rule is Gauss quadrature for the weight :math:`-\ln t` on [0, 1], exact
for polynomials of degree 2n - 1 in t.
"""
import functools
import math
from typing import Tuple

import numpy as np

SUPPORTED_METHODS = ("gausslog", "gausslegendre", "riemann_middle")


def _log_weight_modified_moments(count: int) -> np.ndarray:
    r"""m_k = \int_0^1 -\ln(t)\, \pi_k(t)\,dt for the monic shifted Legendre \pi_k.

    For the (non-monic) shifted Legendre P*_k: \int -\ln t P*_k = (-1)^k / (k (k+1))
    for k >= 1 and 1 for k = 0; the monic polynomial divides by (2k)!/(k!)^2.
    """
    moments = np.empty(count)
    moments[0] = 1.0
    for k in range(1, count):
        leading = math.exp(math.lgamma(2 * k + 1) - 2 * math.lgamma(k + 1))
        moments[k] = (-1) ** k / (k * (k + 1)) / leading
    return moments


def _recurrence_from_modified_moments(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gautschi's modified Chebyshev algorithm (well conditioned, unlike raw moments)."""
    moments = _log_weight_modified_moments(2 * n)
    # monic shifted Legendre: pi_{k+1} = (t - a_k) pi_k - b_k pi_{k-1}
    a = np.full(2 * n, 0.5)
    k = np.arange(2 * n, dtype=float)
    b = np.where(k > 0, k**2 / (4.0 * (4.0 * k**2 - 1.0)), 0.0)
    alpha = np.zeros(n)
    beta = np.zeros(n)
    sigma_prev = np.zeros(2 * n)
    sigma = moments.copy()
    alpha[0] = a[0] + moments[1] / moments[0]
    beta[0] = moments[0]
    for kk in range(1, n):
        sigma_new = np.zeros(2 * n)
        for ll in range(kk, 2 * n - kk):
            sigma_new[ll] = (
                sigma[ll + 1]
                - (alpha[kk - 1] - a[ll]) * sigma[ll]
                - beta[kk - 1] * sigma_prev[ll]
                + b[ll] * sigma[ll - 1]
            )
        alpha[kk] = (
            a[kk] + sigma_new[kk + 1] / sigma_new[kk] - sigma[kk] / sigma[kk - 1]
        )
        beta[kk] = sigma_new[kk] / sigma[kk - 1]
        sigma_prev, sigma = sigma, sigma_new
    return alpha, beta


@functools.lru_cache(maxsize=64)
def gauss_log_rule(n: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    r"""Nodes and weights with \sum_k w_k g(t_k) = \int_0^1 -\ln(t) g(t) dt for deg g <= 2n-1."""
    alpha, beta = _recurrence_from_modified_moments(n)
    jacobi = np.diag(alpha) + np.diag(np.sqrt(beta[1:]), 1) + np.diag(np.sqrt(beta[1:]), -1)
    nodes, vectors = np.linalg.eigh(jacobi)
    weights = beta[0] * vectors[0] ** 2
    return tuple(nodes.tolist()), tuple(weights.tolist())


def log_weight_rule(method: str, n_steps: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    r"""Path points t_k and weights w_k for \int_0^1 -\ln(t) g(t) dt.

    Args:
        method (str): ``"gausslog"`` (Gauss rule for the log weight, the default
            and by far the most accurate), ``"gausslegendre"`` (Gauss-Legendre
            nodes, the log folded into the weights, as a naive port of Captum's
            IG rule would do) or ``"riemann_middle"`` (midpoints).
        n_steps (int): number of path points.
    """
    if method == "gausslog":
        return gauss_log_rule(n_steps)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        t = 0.5 * (x + 1.0)
        w = 0.5 * w * -np.log(t)
        return tuple(t.tolist()), tuple(w.tolist())
    if method == "riemann_middle":
        t = (np.arange(n_steps) + 0.5) / n_steps
        w = -np.log(t) / n_steps
        return tuple(t.tolist()), tuple(w.tolist())
    raise ValueError(
        f"`method` must be one of {SUPPORTED_METHODS}, got {method!r}"
    )
