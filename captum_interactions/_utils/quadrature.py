#!/usr/bin/env python3
r"""Quadrature for the double path integral of Integrated Hessians.

Every Integrated Hessians integrand depends on alpha and beta only through
t = alpha * beta, and

.. math::
    \int_0^1\!\!\int_0^1 g(\alpha\beta)\,d\alpha\,d\beta = \int_0^1 (-\ln t)\, g(t)\,dt,

so one path of ``n_steps`` points replaces an ``n_steps``\ :sup:`2` grid.

Rules (``method``):

- ``"gausslog_graded"`` (the default): per example, one ``"gausslog"`` panel
  or a partition graded towards the path's sharp layers, whichever has the
  smaller a-posteriori error bound, both known exactly from the completeness
  of the total panel by panel (:func:`graded_log_weight_rule`); ``"gausslog"``
  itself below :data:`GRADED_MIN_STEPS` points.
- ``"gausslog"``: one Gauss rule for the weight -ln(t) on
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
path is resolved (it depends on where the layer falls between nodes): the
graded rule finds those layers from the exact per-panel completeness, and the
adaptive mode (:func:`refine_until_complete`) checks completeness per example.

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

#: Rules with the same nodes for every integrand (:func:`log_weight_rule`).
FIXED_METHODS = ("gausslog_composite", "gausslog", "gausslegendre", "riemann_middle")
#: ``"gausslog_graded"`` chooses its nodes per example (:func:`graded_log_weight_rule`).
GRADED_METHOD = "gausslog_graded"
SUPPORTED_METHODS = (GRADED_METHOD,) + FIXED_METHODS
DEFAULT_METHOD = GRADED_METHOD
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


#: Below this many steps ``"gausslog_graded"`` is one Gauss-log panel (the
#: ``"gausslog"`` rule): too few panels to isolate a sharp layer, and one Gauss
#: rule is the most accurate on analytic integrands at such budgets.
GRADED_MIN_STEPS = 32
#: Points per panel of the graded partition (chosen by benchmarks/bench_quadrature.py).
GRADED_POINTS_PER_PANEL = 4

#: ``path_values(t)``: F(t), F'(t), F''(t) of F(t) = f(x' + t Delta) at the
#: path points t (N, K) of each example, float64 arrays (N, K).
PathValues = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]


def panel_rules(points: int, left: np.ndarray, right: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    r"""Gauss rules of ``points`` nodes for the weight -ln(t) on the panels [left, right].

    A panel starting at 0 takes the Gauss rule of the weight -ln(b) - ln(s) on
    [0, 1], scaled (the log singularity exactly); the others
    :func:`_panel_log_gauss`. Each distinct panel is computed once (the
    graded partitions are dyadic, so examples share most panels).

    Returns:
        nodes and weights, each of shape ``left.shape + (points,)``.
    """
    shape = np.shape(left)
    ends = np.stack([np.ravel(left), np.ravel(right)], axis=1).astype(float)
    unique, inverse = np.unique(ends, axis=0, return_inverse=True)
    nodes = np.empty((len(unique), points))
    weights = np.empty((len(unique), points))
    at_zero = unique[:, 0] == 0.0
    for k in np.nonzero(at_zero)[0]:
        b = unique[k, 1]
        s, w = _shifted_log_gauss(points, -math.log(b))
        nodes[k], weights[k] = b * s, b * w
    if (~at_zero).any():
        nodes[~at_zero], weights[~at_zero] = _panel_log_gauss(
            points, unique[~at_zero, 0], unique[~at_zero, 1]
        )
    inverse = np.ravel(inverse)
    return nodes[inverse].reshape(shape + (points,)), weights[inverse].reshape(shape + (points,))


def panel_completeness(
    left: np.ndarray, right: np.ndarray, values_left: Tuple[np.ndarray, np.ndarray],
    values_right: Tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    r"""Exact :math:`\int_a^b -\ln(t)\,(t F'(t))'\,dt` from F and F' at the panel ends.

    Integrating by parts, :math:`[-\ln(t)\, t F'(t)]_a^b + F(b) - F(a)`
    (the bracket vanishes at t = 0): the completeness of the Integrated
    Hessians total, :math:`\sum\Gamma` integrates :math:`(tF')'` against -ln t,
    holds panel by panel. ``values_*`` are (F, F') at the ends.
    """
    (f_a, df_a), (f_b, df_b) = values_left, values_right
    log_a = np.log(np.where(left > 0, left, 1.0))
    return -np.log(right) * right * df_b + log_a * left * df_a + f_b - f_a


def _coarse(errors: np.ndarray) -> np.ndarray:
    """|errors| with 8-bit significands, as sort keys: panels whose errors differ
    by round-off only (a batch evaluated whole or example by example, symmetric
    panels) tie, and the stable sort then takes them in path order."""
    significand, exponent = np.frexp(np.abs(errors))
    return np.ldexp(np.round(significand * 256) / 256, exponent)


def graded_log_weight_rule(
    n_steps: int, path_values: PathValues, num_examples: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per-example rule of ``n_steps`` points for :math:`\int_0^1 -\ln(t) g(t) dt`: one
    Gauss-log panel, or panels graded towards the path's sharp layers.

    The scalar :math:`\sum\Gamma` integrand is :math:`(tF'(t))'` with
    :math:`F(t) = f(x' + t\Delta)`, and its integral over any panel [a, b] is
    known exactly from F and F' at a and b (:func:`panel_completeness`). So
    every candidate rule's completeness error is known panel by panel before
    any interaction is computed, from F, F', F'' alone (one Hessian-vector
    product, in the direction Delta, per point):

    - one Gauss-log panel of ``n_steps`` points (``"gausslog"``), with the
      error bound max(|e(n)|, |e(n / 2)|) (the error at half the points: a
      single lucky cancellation cannot make it small);
    - a graded partition into ``n_steps // GRADED_POINTS_PER_PANEL`` panels:
      starting from [0, 1], each round halves the panels with the largest
      exact errors (at most half of them a round), until the budget of panels
      is reached; error bound: the sum of the panels' absolute errors. The
      partitions are nested: one with more steps refines one with fewer.

    The candidate with the smaller bound is taken, per example. Below
    :data:`GRADED_MIN_STEPS` points the rule is ``"gausslog"`` (nothing is
    evaluated).

    Args:
        n_steps (int): points per example, >= 1.
        path_values (Callable): F, F', F'' at points (N, K) (see :data:`PathValues`).
        num_examples (int): N.

    Returns:
        nodes (N, n_steps), weights (N, n_steps), and the panels used per
        example (N,) (1: one Gauss-log panel).
    """
    t_one, w_one = (np.array(v) for v in gauss_log_rule(n_steps))
    if n_steps < GRADED_MIN_STEPS:
        shape = (num_examples, n_steps)
        return (np.broadcast_to(t_one, shape).copy(), np.broadcast_to(w_one, shape).copy(),
                np.ones(num_examples, dtype=np.int64))
    q, n = GRADED_POINTS_PER_PANEL, num_examples
    t_half, w_half = (np.array(v) for v in gauss_log_rule(n_steps // 2))
    s_root, w_root = panel_rules(q, np.zeros(1), np.ones(1))
    ends = np.array([0.0, 1.0])
    first = np.concatenate([t_one, t_half, ends, s_root[0]])
    f, df, ddf = path_values(np.broadcast_to(first, (n, first.size)).copy())
    integrand = df + first * ddf
    cut = np.cumsum([t_one.size, t_half.size, 2])
    f0, f1, df0, df1 = f[:, cut[1]], f[:, cut[1] + 1], df[:, cut[1]], df[:, cut[1] + 1]
    change = f1 - f0
    bound_one = np.maximum(
        np.abs(integrand[:, : cut[0]] @ w_one - change),
        np.abs(integrand[:, cut[0] : cut[1]] @ w_half - change),
    )

    # leaves of the partition, (N, L) each: ends, F and F' at them, exact error
    a, b = np.zeros((n, 1)), np.ones((n, 1))
    fa, fb, dfa, dfb = f0[:, None], f1[:, None], df0[:, None], df1[:, None]
    err = (integrand[:, cut[2] :] @ w_root[0] - change)[:, None]
    num_panels = n_steps // q
    while a.shape[1] < num_panels:
        leaves = a.shape[1]
        count = min(-(-leaves // 2), num_panels - leaves)
        worst = np.argsort(-_coarse(err), axis=1, kind="stable")[:, :count]
        split = np.zeros((n, leaves), dtype=bool)
        np.put_along_axis(split, worst, True, axis=1)
        mid = 0.5 * (a + b)[split].reshape(n, count)
        child_a = np.stack([a[split].reshape(n, count), mid], -1).reshape(n, 2 * count)
        child_b = np.stack([mid, b[split].reshape(n, count)], -1).reshape(n, 2 * count)
        nodes, weights = panel_rules(q, child_a, child_b)  # (N, 2 count, q)
        t = np.concatenate([nodes.reshape(n, -1), mid], axis=1)
        f, df, ddf = path_values(t)
        sums = ((df + t * ddf)[:, : nodes[0].size].reshape(nodes.shape) * weights).sum(-1)
        f_mid, df_mid = f[:, nodes[0].size :], df[:, nodes[0].size :]

        def children(left: np.ndarray, right: np.ndarray) -> np.ndarray:
            """(N, 2 count) values of the children from the split parents' and the midpoints'."""
            return np.stack([left, right], -1).reshape(n, 2 * count)

        f_a = children(fa[split].reshape(n, count), f_mid)
        f_b = children(f_mid, fb[split].reshape(n, count))
        df_a = children(dfa[split].reshape(n, count), df_mid)
        df_b = children(df_mid, dfb[split].reshape(n, count))
        child_err = sums - panel_completeness(child_a, child_b, (f_a, df_a), (f_b, df_b))

        def merged(parent: np.ndarray, child: np.ndarray) -> np.ndarray:
            """Leaves after the split, in path order: each split parent replaced by its two children."""
            slots = np.stack([parent, np.zeros_like(parent)], -1)  # (N, L, 2)
            slots[split] = child.reshape(n * count, 2)
            keep = np.stack([np.ones_like(split), split], -1)
            return slots[keep].reshape(n, leaves + count)

        a, b = merged(a, child_a), merged(b, child_b)
        fa, fb = merged(fa, f_a), merged(fb, f_b)
        dfa, dfb = merged(dfa, df_a), merged(dfb, df_b)
        err = merged(err, child_err)
    use_graded = np.abs(err).sum(1) < bound_one

    # n_steps points on the panels; the remainder goes to the worst panels
    base, extra = divmod(n_steps, num_panels)
    rank = np.argsort(np.argsort(-_coarse(err), axis=1, kind="stable"), axis=1)
    sizes = base + (rank < extra)
    parts_t, parts_w = [], []
    for size in np.unique(sizes):
        chosen = sizes == size
        nodes, weights = panel_rules(int(size), a[chosen], b[chosen])
        parts_t.append(nodes.reshape(n, -1))
        parts_w.append(weights.reshape(n, -1))
    graded_t, graded_w = np.concatenate(parts_t, 1), np.concatenate(parts_w, 1)
    nodes = np.where(use_graded[:, None], graded_t, t_one)
    weights = np.where(use_graded[:, None], graded_w, w_one)
    return nodes, weights, np.where(use_graded, num_panels, 1)


def log_weight_rule(method: str, n_steps: int) -> Rule:
    r"""Path points t_k and weights w_k for \int_0^1 -\ln(t) g(t) dt, the same for every integrand.

    Args:
        method (str): one of :data:`FIXED_METHODS`: ``"gausslog_composite"``
            (composite Gauss rule for the log weight on equal panels), ``"gausslog"`` (one Gauss
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
        f"`method` must be one of {FIXED_METHODS}, got {method!r}"
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
    # f(x) - f(x') first: a small forward costs several times more right after
    # the path's large HVPs than before them (measured on CPU)
    change = output_change()
    interactions = integrate(n_steps, None)
    steps = torch.full(
        (interactions.shape[0],), n_steps, dtype=torch.long, device=interactions.device
    )
    total = interactions.sum(dim=(1, 2))
    delta = total - change.to(interactions.dtype)
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
    missed = delta.abs() > COMPLETENESS_WARNING * change.abs()
    if not bool(missed.any()):
        return
    bad = torch.nonzero(missed).flatten()
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
