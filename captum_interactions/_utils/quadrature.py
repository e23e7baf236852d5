#!/usr/bin/env python3
r"""Quadrature for the double path integral of Integrated Hessians.

Every Integrated Hessians integrand depends on alpha and beta only through
t = alpha * beta, and

.. math::
    \int_0^1\!\!\int_0^1 g(\alpha\beta)\,d\alpha\,d\beta = \int_0^1 (-\ln t)\, g(t)\,dt,

so one path of ``n_steps`` points replaces an ``n_steps``\ :sup:`2` grid.

Rules (``method``):

- ``"gausslog"`` (the default): one Gauss rule for the weight -ln(t) on
  [0, 1], exact for degree 2 n - 1, computed from modified moments scaled so
  that nothing overflows at any n. Spectrally accurate on analytic
  integrands (softplus networks); on the models of
  benchmarks/bench_quadrature.py the most accurate rule (or tied) wherever
  the path's sharpest layer is resolved; before that no rule is reliably
  better.
- ``"gausslog_composite"``: [0, 1] cut into equal panels of
  :data:`POINTS_PER_PANEL` points; on every panel the Gauss rule for the
  weight -ln(t) restricted to that panel. The first panel [0, a] carries the
  log singularity exactly, as
  :math:`\int_0^a -\ln t\, g = a\int_0^1 (-\ln a - \ln s)\, g(as)\, ds`, a
  Gauss rule for the positive weight :math:`-\ln a - \ln s`. Exact for
  polynomials of degree 2 * POINTS_PER_PANEL - 1 times the log weight; the
  panels nest when ``n_steps`` doubles.
- ``"gausslegendre"``: Gauss-Legendre nodes with -ln(t) folded into the
  weights (as a port of Captum's IG rule would do); ``"riemann_middle"``:
  midpoints, -ln(t) folded in.

No fixed rule's error is monotone in n_steps before a sharp layer along the
path is resolved (it depends on where the layer falls between nodes); the
adaptive mode (:func:`refine_until_complete`) checks completeness per
example instead.

All rules are valid for every ``n_steps >= 1``; the Gauss-type rules have
positive weights summing to 1 (= the integral of -ln t).
"""
import functools
import math
import warnings
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import scipy.linalg
import torch
from captum._utils.common import _format_additional_forward_args
from torch import Tensor

SUPPORTED_METHODS = ("gausslog_composite", "gausslog", "gausslegendre", "riemann_middle")
DEFAULT_METHOD = "gausslog"
#: Path points per panel of ``"gausslog_composite"`` (chosen by
#: benchmarks/bench_quadrature.py).
POINTS_PER_PANEL = 16
#: Default path points of IntegratedHessians / LayerIntegratedHessians.
DEFAULT_N_STEPS = 16
#: Default budget of the adaptive mode (``completeness_tol``): steps per example.
DEFAULT_MAX_STEPS = 1024

Rule = Tuple[Tuple[float, ...], Tuple[float, ...]]


def _scaled_log_moments(count: int, shift: float) -> np.ndarray:
    r"""4^k m_k, with m_k = \int_0^1 (shift - \ln t)\, \pi_k(t)\,dt for the monic shifted Legendre \pi_k.

    For the shifted Legendre P*_k: \int -\ln t P*_k = (-1)^k / (k (k+1)) for
    k >= 1 and \int P*_k = 0; the monic polynomial divides by (2k)!/(k!)^2 ~
    4^k / sqrt(pi k). The factor 4^k keeps every quantity O(1) for any k
    (unscaled, (2k)!/(k!)^2 overflows a float beyond k ~ 511).
    """
    moments = np.empty(count)
    moments[0] = 1.0 + shift
    for k in range(1, count):
        scale = math.exp(k * math.log(4.0) + 2 * math.lgamma(k + 1) - math.lgamma(2 * k + 1))
        moments[k] = (-1) ** k / (k * (k + 1)) * scale
    return moments


def _recurrence_from_log_moments(n: int, shift: float) -> Tuple[np.ndarray, np.ndarray]:
    r"""Recurrence coefficients of the monic orthogonal polynomials for the
    weight (shift - ln t) on [0, 1].

    Gautschi's modified Chebyshev algorithm on modified moments against the
    shifted Legendre polynomials (well conditioned, unlike raw moments), run on
    s_{k,l} = 4^{k+l} sigma_{k,l} so that nothing under- or overflows.
    """
    size = 2 * n
    moments = _scaled_log_moments(size, shift)
    a = np.full(size, 0.5)
    ll = np.arange(size, dtype=float)
    b = np.where(ll > 0, ll**2 / (4.0 * (4.0 * ll**2 - 1.0)), 0.0)
    alpha = np.zeros(n)
    beta = np.zeros(n)
    sigma_prev = np.zeros(size)
    sigma = moments.copy()
    alpha[0] = a[0] + sigma[1] / (4.0 * sigma[0])
    beta[0] = sigma[0]
    for k in range(1, n):
        sl = slice(k, size - k)
        sigma_new = np.zeros(size)
        sigma_new[sl] = (
            sigma[k + 1 : size - k + 1]
            - 4.0 * (alpha[k - 1] - a[sl]) * sigma[sl]
            - 16.0 * beta[k - 1] * sigma_prev[sl]
            + 16.0 * b[sl] * sigma[k - 1 : size - k - 1]
        )
        alpha[k] = a[k] + (sigma_new[k + 1] / sigma_new[k] - sigma[k] / sigma[k - 1]) / 4.0
        beta[k] = sigma_new[k] / (16.0 * sigma[k - 1])
        sigma_prev, sigma = sigma, sigma_new
    return alpha, beta


def _golub_welsch(alpha: np.ndarray, beta: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gauss rule(s) with recurrence (alpha, beta), shape (..., n).

    The weights are beta_0 times the squared first components of the
    eigenvectors of the Jacobi matrix (Golub and Welsch).
    """
    n = alpha.shape[-1]
    if alpha.ndim == 1 and n > 64:
        nodes, vectors = scipy.linalg.eigh_tridiagonal(alpha, np.sqrt(beta[1:]))
        return nodes, beta[0] * vectors[0] ** 2
    jacobi = np.zeros(alpha.shape + (n,))
    idx = np.arange(n)
    jacobi[..., idx, idx] = alpha
    off = np.sqrt(beta[..., 1:])
    jacobi[..., idx[:-1], idx[1:]] = off
    jacobi[..., idx[1:], idx[:-1]] = off
    nodes, vectors = np.linalg.eigh(jacobi)
    return nodes, beta[..., :1] * vectors[..., 0, :] ** 2


@functools.lru_cache(maxsize=256)
def _shifted_log_gauss(n: int, shift: float) -> Tuple[np.ndarray, np.ndarray]:
    r"""Gauss rule for the weight (shift - ln s) on [0, 1], shift >= 0."""
    return _golub_welsch(*_recurrence_from_log_moments(n, shift))


@functools.lru_cache(maxsize=64)
def gauss_log_rule(n: int) -> Rule:
    r"""Nodes and weights with \sum_k w_k g(t_k) = \int_0^1 -\ln(t) g(t) dt for deg g <= 2n-1."""
    nodes, weights = _shifted_log_gauss(n, 0.0)
    return tuple(nodes.tolist()), tuple(weights.tolist())


def _stieltjes(x: np.ndarray, lam: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Recurrence coefficients of discrete measures sum_i lam[..., i] delta(x_i) (n << len(x)),
    one row of ``lam`` per measure."""
    rows = lam.shape[:-1]
    alpha, beta = np.zeros(rows + (n,)), np.zeros(rows + (n,))
    p_prev, p = np.zeros_like(lam), np.ones_like(lam)
    norm = lam.sum(-1)
    beta[..., 0] = norm
    for k in range(n):
        alpha[..., k] = (lam * x * p * p).sum(-1) / norm
        if k + 1 < n:
            p_next = (x - alpha[..., k, None]) * p
            if k > 0:
                p_next -= beta[..., k, None] * p_prev
            norm_next = (lam * p_next * p_next).sum(-1)
            beta[..., k + 1] = norm_next / norm
            p_prev, p, norm = p, p_next, norm_next
    return alpha, beta


@functools.lru_cache(maxsize=8)
def _legendre_01(m: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(m)
    return 0.5 * (x + 1.0), 0.5 * w


def _panel_log_gauss(
    n: int, left: np.ndarray, right: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    r"""Gauss rules for the weight -ln(t) on the panels [left_k, right_k], left_k > 0.

    The weight is analytic on a panel (its singularity t = 0 lies at least a
    panel width away), so a Gauss-Legendre rule of max(64, 4n) points
    integrates it times any polynomial of degree < 2n to round-off; the Gauss
    rule of that discrete measure (Stieltjes) is the panel's Gauss rule.
    Returns nodes and weights of shape (panels, n).
    """
    width = (right - left)[:, None]
    s, w = _legendre_01(max(64, 4 * n))
    lam = w * -np.log(left[:, None] + width * s)
    nodes, weights = _golub_welsch(*_stieltjes(s, lam, n))
    return left[:, None] + width * nodes, width * weights


def _panel_sizes(n_steps: int, points_per_panel: int) -> List[int]:
    """n_steps points over ceil(n_steps / points_per_panel) panels, sizes within 1
    (the larger ones first, next to the log singularity)."""
    panels = -(-n_steps // points_per_panel)
    base, extra = divmod(n_steps, panels)
    return [base + 1 if k < extra else base for k in range(panels)]


@functools.lru_cache(maxsize=64)
def composite_gauss_log_rule(n_steps: int, points_per_panel: int = POINTS_PER_PANEL) -> Rule:
    r"""Composite Gauss rule for \int_0^1 -\ln(t) g(t) dt on equal panels.

    ``n_steps`` points on ceil(n_steps / points_per_panel) panels of [0, 1];
    panel [u, v] takes the Gauss rule of the weight -ln t on [u, v] (the first
    panel [0, a] as a Gauss rule of the weight -ln a - ln s on [0, 1], scaled).
    Exact for polynomials g of degree 2 * min(sizes) - 1; positive weights.
    """
    sizes = np.array(_panel_sizes(n_steps, points_per_panel))
    edges = np.linspace(0.0, 1.0, len(sizes) + 1)
    nodes = np.empty(n_steps)
    weights = np.empty(n_steps)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    first = float(edges[1])
    s, ws = _shifted_log_gauss(int(sizes[0]), -math.log(first))
    nodes[: sizes[0]], weights[: sizes[0]] = first * s, first * ws
    for size in set(sizes[1:].tolist()):
        panels = 1 + np.nonzero(sizes[1:] == size)[0]
        t, w = _panel_log_gauss(size, edges[panels], edges[panels + 1])
        for row, k in enumerate(panels):
            nodes[starts[k] : starts[k + 1]] = t[row]
            weights[starts[k] : starts[k + 1]] = w[row]
    return tuple(nodes.tolist()), tuple(weights.tolist())


def log_weight_rule(method: str, n_steps: int) -> Rule:
    r"""Path points t_k and weights w_k for \int_0^1 -\ln(t) g(t) dt.

    Args:
        method (str): ``"gausslog_composite"`` (composite Gauss rule for the
            log weight on equal panels, the default), ``"gausslog"`` (one Gauss
            rule for the log weight), ``"gausslegendre"`` (Gauss-Legendre
            nodes, the log folded into the weights) or ``"riemann_middle"``
            (midpoints).
        n_steps (int): number of path points, >= 1.
    """
    if method == "gausslog_composite":
        return composite_gauss_log_rule(n_steps, POINTS_PER_PANEL)
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


def validate_method(method: str) -> None:
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"`method` must be one of {SUPPORTED_METHODS}, got {method!r}")


def validate_adaptive_arguments(
    completeness_tol: Optional[float], max_steps: int, n_steps: int, multiply_by_inputs: bool
) -> None:
    """Checks of ``completeness_tol`` / ``max_steps`` (the adaptive mode)."""
    if completeness_tol is None:
        return
    if (
        isinstance(completeness_tol, bool)
        or not isinstance(completeness_tol, (int, float))
        or not math.isfinite(completeness_tol)
        or completeness_tol <= 0
    ):
        raise ValueError(
            f"`completeness_tol` must be a positive finite number or None, got {completeness_tol!r}"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < n_steps:
        raise ValueError(
            f"`max_steps` must be an integer >= `n_steps` ({n_steps}), got {max_steps!r}"
        )
    if not multiply_by_inputs:
        raise ValueError(
            "`completeness_tol` needs multiply_by_inputs=True: without the Delta "
            "factors the interactions do not sum to f(x) - f(x')"
        )


def refine_until_complete(
    integrate: Callable[[int, Optional[Tensor]], Tensor],
    output_change: Tensor,
    n_steps: int,
    completeness_tol: float,
    max_steps: int,
    method_name: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Double ``n_steps`` per example until |sum Gamma - (f(x) - f(x'))| <= tol |f(x) - f(x')|.

    Args:
        integrate (Callable): ``integrate(n, index)`` returns the (len(index), G, G)
            interactions of the examples ``index`` (all when None) at ``n`` steps.
        output_change (Tensor): f(x) - f(x'), shape (N,).
        n_steps, completeness_tol, max_steps: the first level, the relative
            tolerance and the budget (steps per example of the last level).
        method_name (str): the calling class, for the warning.

    Returns:
        (interactions (N, G, G), steps per example (N,), completeness delta (N,)),
        each example's result from the first level that met the tolerance (or
        the last level tried). Warns naming the examples that missed it.
    """
    interactions = integrate(n_steps, None)
    num_examples = interactions.shape[0]
    change = output_change.to(interactions.dtype)
    delta = interactions.sum(dim=(1, 2)) - change
    steps = torch.full((num_examples,), n_steps, dtype=torch.long, device=interactions.device)
    bound = completeness_tol * change.abs()
    pending = torch.nonzero(~(delta.abs() <= bound)).flatten()
    level = n_steps
    while pending.numel() > 0 and 2 * level <= max_steps:
        level *= 2
        refined = integrate(level, pending)
        interactions[pending] = refined
        delta[pending] = refined.sum(dim=(1, 2)) - change[pending]
        steps[pending] = level
        pending = pending[~(delta[pending].abs() <= bound[pending])]
    if pending.numel() > 0:
        shown = pending[:10].tolist()
        errors = (delta[pending[:10]].abs() / change[pending[:10]].abs()).tolist()
        listed = ", ".join(f"{i}: {e:.1e}" for i, e in zip(shown, errors))
        more = f" (and {pending.numel() - 10} more)" if pending.numel() > 10 else ""
        warnings.warn(
            f"{method_name}: completeness_tol={completeness_tol:g} not reached within "
            f"max_steps={max_steps} ({level} steps used) for {pending.numel()} of "
            f"{num_examples} examples; relative completeness error |sum(Gamma) - "
            f"(f(x) - f(x'))| / |f(x) - f(x')| by example index: {listed}{more}. "
            "Raise `max_steps`, smooth the model more (e.g. a smaller `beta` in "
            "replace_relu_with_softplus), or, if the error is near round-off, "
            "compute in float64.",
            stacklevel=4,
        )
    return interactions, steps, delta


def integrate_to_completeness(
    integrate: Callable[[int, Optional[Tensor]], Tensor],
    output_change: Callable[[], Tensor],
    n_steps: int,
    completeness_tol: Optional[float],
    max_steps: int,
    method: str,
    method_name: str,
    warn: bool,
    other_cause: str = "",
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""One fixed rule of ``n_steps`` points, or the adaptive refinement.

    Args:
        integrate (Callable): as in :func:`refine_until_complete`.
        output_change (Callable): returns f(x) - f(x'), shape (N,).
        n_steps, completeness_tol, max_steps: the call's arguments (no
            ``completeness_tol``: one fixed rule).
        method (str), method_name (str): the rule and the calling class, for
            the warnings.
        warn (bool): warn when a fixed rule misses completeness (only
            meaningful when the interactions multiply by the inputs).
        other_cause (str, optional): another cause of a miss, for the warning.

    Returns:
        (interactions (N, G, G), steps per example (N,), completeness delta (N,)).
    """
    if completeness_tol is not None:
        return refine_until_complete(
            integrate, output_change(), n_steps, completeness_tol, max_steps, method_name
        )
    interactions = integrate(n_steps, None)
    steps = torch.full(
        (interactions.shape[0],), n_steps, dtype=torch.long, device=interactions.device
    )
    total = interactions.sum(dim=(1, 2))
    delta = total - output_change().to(interactions.dtype)
    if warn:
        warn_if_incomplete(delta, total - delta, n_steps, method, method_name, other_cause)
    return interactions, steps, delta


def select_examples(
    target: Any, additional_forward_args: Any, index: Tensor, num_examples: int
) -> Tuple[Any, Any]:
    """``target`` and ``additional_forward_args`` restricted to the examples ``index``.

    Per-example targets (a list, or a tensor with one entry per example) and
    tensor arguments with a batch dimension of ``num_examples`` are indexed;
    everything else is shared by all examples and kept.
    """
    if isinstance(target, Tensor) and target.numel() > 1:
        target = target[index.to(target.device)]
    elif isinstance(target, list):
        target = [target[i] for i in index.tolist()]
    args = _format_additional_forward_args(additional_forward_args)
    if args is not None:
        args = tuple(
            a[index.to(a.device)]
            if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == num_examples
            else a
            for a in args
        )
    return target, args


#: Relative completeness error above which a fixed-steps call warns.
COMPLETENESS_WARNING = 1e-2


def warn_if_incomplete(
    delta: Tensor,
    output_change: Tensor,
    n_steps: int,
    method: str,
    method_name: str,
    other_cause: str = "",
) -> None:
    """Warn when |delta| > COMPLETENESS_WARNING * |f(x) - f(x')| for some example.

    The check costs two forward passes; it catches the rule not resolving a
    sharp layer along the path, which no fixed rule avoids before enough steps.
    """
    change = output_change.to(delta.dtype)
    bad = torch.nonzero(delta.abs() > COMPLETENESS_WARNING * change.abs()).flatten()
    if bad.numel() == 0:
        return
    shown = bad[:10]
    errors = (delta[shown].abs() / change[shown].abs()).tolist()
    listed = ", ".join(f"{i}: {e:.1e}" for i, e in zip(shown.tolist(), errors))
    more = f" (and {bad.numel() - 10} more)" if bad.numel() > 10 else ""
    warnings.warn(
        f"{method_name}: the interactions miss completeness by more than "
        f"{COMPLETENESS_WARNING:g} of |f(x) - f(x')| with n_steps={n_steps}, "
        f"method={method!r} (relative error by example index: {listed}{more}): the "
        f"path crosses layers too sharp for this many steps{other_cause}. Pass "
        "`completeness_tol` (e.g. 1e-4) to refine per example, raise `n_steps`, "
        "or smooth the model more (a smaller `beta` in replace_relu_with_softplus).",
        stacklevel=4,
    )
