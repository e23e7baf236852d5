#!/usr/bin/env python3
r"""Taylor-mode propagation (univariate Taylor series, "jets") through torch code.

A :class:`Jet` stands for the curve :math:`t \mapsto y(x_0 + t v)` truncated at
order K, stored as its *normalized* Taylor coefficients

.. math::
    y_k = \frac{1}{k!} \frac{d^k}{dt^k} y(x_0 + t v) \Big|_{t=0}, \quad k = 0..K,

in one tensor of shape (K + 1, *value_shape). Many directions travel together
along the batch axis. A jet is a ``torch.Tensor`` subclass whose value is y_0,
so shape/dtype/device queries work, and whose ``__torch_function__`` replaces
each operation of the model by its exact rule on the coefficients:

- linear, bias-free operations (reshape, indexing, sum, mean, cat, average
  pooling, ...): applied to every coefficient (``torch.vmap`` over the K axis);
- affine layers (Linear, Conv, BatchNorm in eval mode): the weight acts on
  every coefficient, the bias/shift on y_0 only (a conv on many rows of a small
  input as one product with its dense matrix);
- products: Cauchy convolution :math:`(ab)_k = \sum_{j \le k} a_j b_{k-j}`;
- elementwise functions: the classical recurrences of Taylor arithmetic
  (Griewank and Walther, *Evaluating Derivatives*, ch. 13), e.g. for
  :math:`e = \exp(a)`: :math:`k e_k = \sum_{j=1}^{k} j a_j e_{k-j}`; sin/cos
  jointly; GELU through its derivative ODE; tanh, sigmoid and softplus by
  composition with their Taylor series at a_0 (derivatives as polynomials in
  tanh), or through their derivative ODEs for large tensors;
  division, log, sqrt and powers through the division recurrence;
- piecewise-linear functions (ReLU, LeakyReLU, hardtanh, clamp, abs, max
  pooling): the piece is chosen from y_0 and applied to every coefficient
  (exact wherever the function is smooth, i.e. off the kinks); comparisons,
  ``sign`` and integer casts give constants (zero derivatives). Inside
  :class:`recording_kinks`, the rules record the kinks they meet at y_0;
- LayerNorm and softmax are composed from the rules above.

Any other operation raises :class:`UnsupportedJetOperation` naming it.
"""
import math
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


class UnsupportedJetOperation(ValueError):
    """An operation of the model has no Taylor-mode rule."""


# --------------------------------------------------------------------------
# the tensor subclass
# --------------------------------------------------------------------------


class Jet(Tensor):
    """Truncated Taylor series of a tensor-valued curve; value = coefficient 0.

    ``degree`` (optional) marks the coefficients above it as known zeros (the
    input line x0 + t v has degree 1), so that affine layers skip them. With
    ``order``, ``coefficients`` may hold only rows 0..degree: the zero rows are
    then made on first use of :attr:`coefficients` (rules that know the degree
    read :attr:`low` and never make them).

    ``period`` (optional) P marks the value (coefficient 0) as repeating along
    its first axis with period P: HOPE's lines all pass through the expansion
    points, so row q * P + n of the value is example n's for every direction q.
    Rules that keep the first axis row by row (affine layers, tanh, sigmoid,
    softplus) pass it on, and the series of tanh, sigmoid and softplus
    evaluate their derivatives on the first P rows only; every other rule drops
    it (the results are the same, only slower)."""

    degree: Optional[int]
    period: Optional[int]

    @staticmethod
    def __new__(cls, coefficients: Tensor, degree: Optional[int] = None,
                order: Optional[int] = None, period: Optional[int] = None) -> "Jet":
        # (_make_subclass detaches the value itself)
        jet = Tensor._make_subclass(cls, coefficients[0], False)
        order = coefficients.shape[0] - 1 if order is None else order
        jet._stored = coefficients
        jet._order = order
        jet.degree = degree if degree is not None and degree < order else None
        jet.period = period if period is not None and coefficients.dim() > 1 and (
            coefficients.shape[1] > period and coefficients.shape[1] % period == 0
        ) else None
        if coefficients.shape[0] != order + 1 and (
            jet.degree is None or coefficients.shape[0] != jet.degree + 1
        ):
            raise ValueError("a jet stores all its coefficients or rows 0..degree")
        return jet

    def __init__(self, coefficients: Tensor, degree: Optional[int] = None,  # noqa: D107
                 order: Optional[int] = None, period: Optional[int] = None) -> None:
        pass

    @property
    def coefficients(self) -> Tensor:
        """(K + 1, *value_shape) normalized Taylor coefficients."""
        stored = self._stored
        if stored.shape[0] != self._order + 1:  # rows above the degree: zeros, made once
            full = stored.new_zeros((self._order + 1,) + stored.shape[1:])
            full[: stored.shape[0]] = stored
            self._stored = stored = full
        return stored

    @property
    def low(self) -> Tensor:
        """Rows 0..degree of the coefficients (all of them without a degree)."""
        if self.degree is None:
            return self.coefficients
        return self._stored[: self.degree + 1] if self._stored.shape[0] > self.degree + 1 \
            else self._stored

    @property
    def order(self) -> int:
        return self._order

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        with torch._C.DisableTorchFunctionSubclass():
            return (
                f"Jet(order={self.order}, shape={tuple(self.coefficients.shape[1:])})"
            )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is None:
            raise UnsupportedJetOperation(
                f"HOPE (Taylor-mode propagation) has no rule for the operation "
                f"`{_func_name(func)}`. Supported operations: {supported_operations()}"
            )
        return rule(func, args, kwargs)


def _func_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and hasattr(owner, "__objclass__"):
        # reading a tensor attribute (e.g. `x.is_nested`): a getset descriptor's __get__
        cls = "Tensor" if owner.__objclass__ is torch._C.TensorBase else owner.__objclass__.__name__
        return f"{cls}.{owner.__name__} (attribute read)"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    module = getattr(func, "__module__", None)
    if name and module and not name.startswith(module):
        return f"{module}.{name}" if module != "torch._C" else name
    return str(name or func)


def make_jet(value: Tensor, direction: Tensor, order: int) -> Jet:
    """Jet of the line x0 + t v: coefficients (x0, v, 0, ..., 0)."""
    coeffs = value.new_zeros((order + 1,) + value.shape)
    coeffs[0] = value
    if order >= 1:
        coeffs[1] = direction
    return Jet(coeffs, degree=min(order, 1))


def coefficients_of(x: Any, order: int, like: Optional[Tensor] = None) -> Tensor:
    """Coefficients of a jet, or of a constant (zero beyond order 0)."""
    if isinstance(x, Jet):
        return x.coefficients
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x, dtype=like.dtype if like is not None else None,
                            device=like.device if like is not None else None)
    out = x.new_zeros((order + 1,) + x.shape)
    out[0] = x
    return out


def _order_of(args: Any) -> int:
    for a in tree_flatten(args)[0]:
        if isinstance(a, Jet):
            return a.order
    raise AssertionError("no jet among the arguments")


def _first_jet(args: Any) -> Jet:
    for a in tree_flatten(args)[0]:
        if isinstance(a, Jet):
            return a
    raise AssertionError("no jet among the arguments")


def _wrap(out: Any) -> Any:
    return tree_map(lambda t: Jet(t) if isinstance(t, Tensor) else t, out)


def _lift(c: Tensor, ndim: int) -> Tensor:
    """Insert value dims after the K axis so that c has ``ndim`` value dims."""
    missing = ndim - (c.dim() - 1)
    if missing <= 0:
        return c
    return c.reshape(c.shape[:1] + (1,) * missing + c.shape[1:])


def _align(*cs: Tensor) -> List[Tensor]:
    ndim = max(c.dim() - 1 for c in cs)
    return [_lift(c, ndim) for c in cs]


def _const(x: Any, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _vdim(dim: int) -> int:
    """A value dimension as a dimension of the coefficient tensor."""
    return dim + 1 if dim >= 0 else dim


# --------------------------------------------------------------------------
# Taylor arithmetic on coefficient tensors (K + 1, ...)
# --------------------------------------------------------------------------


def series_mul(a: Tensor, b: Tensor) -> Tensor:
    a, b = _align(a, b)
    order = a.shape[0] - 1
    return torch.stack(
        [(a[: k + 1] * b[: k + 1].flip(0)).sum(0) for k in range(order + 1)]
    )


def series_bilinear(op: Callable, a: Tensor, b: Tensor) -> Tensor:
    """(a op b)_k = sum_j a_j op b_{k-j} for a bilinear ``op`` (e.g. matmul)."""
    order = a.shape[0] - 1
    out = []
    for k in range(order + 1):
        acc = op(a[0], b[k])
        for j in range(1, k + 1):
            acc = acc + op(a[j], b[k - j])
        out.append(acc)
    return torch.stack(out)


def series_div(a: Tensor, b: Tensor) -> Tensor:
    a, b = _align(a, b)
    order = max(a.shape[0], b.shape[0]) - 1
    q: List[Tensor] = []
    for k in range(order + 1):
        num = a[k]
        for j in range(1, k + 1):
            num = num - b[j] * q[k - j]
        q.append(num / b[0])
    return torch.stack(torch.broadcast_tensors(*q))


_WEIGHTS: Dict[Any, Tensor] = {}


def _weighted(a: Tensor) -> Tensor:
    """(K, ...) j a_j for j = 1..K: the coefficients of t a'(t)."""
    order = a.shape[0] - 1
    key = (order, a.dim(), a.dtype, a.device)
    weights = _WEIGHTS.get(key)
    if weights is None:  # built once per order, dtype and device
        weights = torch.arange(1, order + 1, dtype=a.dtype, device=a.device)
        weights = _WEIGHTS[key] = weights.reshape((order,) + (1,) * (a.dim() - 1))
    return a[1:] * weights


def _ode_term(ja: Tensor, g_reversed: Tensor, k: int) -> Tensor:
    """(1/k) sum_{j=1..k} j a_j g_{k-j}: the order-k coefficient of y with y' = g a'.

    ``ja`` holds j a_j (j = 1..K) and ``g_reversed`` holds g_K..g_0 (g reversed
    along the K axis, filled at least up to g_{k-1}), so the sum is one dot
    product over the leading axis: one kernel per order instead of k."""
    order = g_reversed.shape[0] - 1
    return _dot0(ja[:k], g_reversed[order - k + 1 :]).div_(k)


# above this many elements per coefficient an in-place multiply-add loop beats
# one strided vecdot reduction (measured on CPU, float64, one thread)
_DOT_LOOP_NUMEL = 8192


def _dot0(x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """sum_i x_i * y_i over the leading axis (shapes broadcast after it), into
    ``out`` when given (only where no argument requires grad)."""
    if x.shape[0] > 1 and y.numel() // y.shape[0] < _DOT_LOOP_NUMEL:
        if out is None:
            return torch.linalg.vecdot(x, y, dim=0)
        return torch.linalg.vecdot(x, y, dim=0, out=out)
    acc = x[0] * y[0] if out is None else torch.mul(x[0], y[0], out=out)
    for i in range(1, x.shape[0]):
        acc.addcmul_(x[i], y[i])
    return acc


def _writes_allowed(*tensors: Tensor) -> bool:
    """Whether ``out=`` may be used (autograd refuses it for inputs needing grad)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _ode_integrate(a: Tensor, y0: Tensor, g: Tensor) -> Tensor:
    """Series of y with y' = g a' and y(0) = y0, for a known series ``g``."""
    ja, g_reversed = _weighted(a), g.flip(0)
    out = [y0]
    for k in range(1, a.shape[0]):
        out.append(_ode_term(ja, g_reversed, k))
    return torch.stack(torch.broadcast_tensors(*out))


def series_exp(a: Tensor) -> Tensor:
    order = a.shape[0] - 1
    ja = _weighted(a)
    # e_k depends on e_0..e_{k-1}: kept reversed (e_K..e_0) for the dot product
    e_reversed = torch.empty_like(a)
    e_reversed[order] = torch.exp(a[0])
    for k in range(1, order + 1):
        e_reversed[order - k] = _ode_term(ja, e_reversed, k)
    return e_reversed.flip(0)


def series_log(a: Tensor) -> Tensor:
    out = [torch.log(a[0])]
    for k in range(1, a.shape[0]):
        acc = a[k]
        for j in range(1, k):
            acc = acc - (j / k) * out[j] * a[k - j]
        out.append(acc / a[0])
    return torch.stack(out)


def _signed_steps(order: int, like: Tensor) -> Tensor:
    """(K, 2, 1, ...) with rows (-1/k, 1/k), k = 1..K (cached)."""
    key = ("sincos", order, like.dim(), like.dtype, like.device)
    steps = _WEIGHTS.get(key)
    if steps is None:
        k = torch.arange(1, order + 1, dtype=like.dtype, device=like.device)
        steps = torch.stack([-1 / k, 1 / k], dim=1)
        steps = _WEIGHTS[key] = steps.reshape((order, 2) + (1,) * (like.dim() - 1))
    return steps


def series_sin_cos(a: Tensor):
    """sin' = cos a', cos' = -sin a': both sums of one order in one dot product.

    ``rev`` holds (cos_m, sin_m) for m = K..0 (reversed), so
    sum_j j a_j rev[K-k+j] = (k sin_k, -k cos_k), written back swapped."""
    order = a.shape[0] - 1
    ja = _weighted(a).unsqueeze(1)
    steps = _signed_steps(order, a)
    rev = a.new_empty((order + 1, 2) + a.shape[1:])
    rev[order, 0], rev[order, 1] = torch.cos(a[0]), torch.sin(a[0])
    for k in range(1, order + 1):
        sums = _dot0(ja[:k], rev[order - k + 1 :])  # (k sin_k, -k cos_k)
        rev[order - k] = sums.flip(0).mul_(steps[k - 1])
    rev = rev.flip(0)
    return rev[:, 1], rev[:, 0]


def _series_riccati(
    a: Tensor, y0: Tensor, quadratic: float, linear: float, const: float,
    integral0: Optional[Tensor] = None,
):
    """y' = (const + linear*y + quadratic*y^2) a' (tanh: 1 - y^2; sigmoid: y - y^2).

    With ``integral0``, also the series of I with I' = y a', I(0) = integral0
    (softplus from sigmoid), from the same dot products. Returns (y, I or None)."""
    order = a.shape[0] - 1
    if integral0 is None:
        return _series_riccati_alone(a, y0, quadratic, linear, const), None
    ja = _weighted(a).unsqueeze(1)
    # fwd[k] = (y_k, I_k); rev[m] = (g_{K-m}, y_{K-m}) with g = y'/a', reversed
    # along the K axis so that sum_j j a_j g_{k-j} and sum_j j a_j y_{k-j} are
    # one dot product; y in both orders gives the self-convolution sum_i y_i y_{k-i}
    fwd = a.new_empty((order + 1, 2) + a.shape[1:])
    rev = a.new_empty((order + 1, 2) + a.shape[1:])
    fwd[0, 0] = y0
    fwd[0, 1] = integral0
    rev[order, 1] = y0
    rev[order, 0] = const + linear * y0 + quadratic * y0 * y0
    y = fwd[:, 0]
    write = _writes_allowed(a, y0, integral0)
    for k in range(1, order + 1):
        sources = rev[order - k + 1 :]
        if write:
            _dot0(ja[:k], sources, out=fwd[k]).div_(k)
        else:
            fwd[k] = _dot0(ja[:k], sources).div_(k)
        if k < order:
            row = rev[order - k]
            row[1] = y[k]
            if write:
                g_k = _dot0(y[: k + 1], rev[order - k :, 1], out=row[0]).mul_(quadratic)
                if linear:
                    g_k.add_(y[k], alpha=linear)
            else:
                square = _dot0(y[: k + 1], rev[order - k :, 1]).mul_(quadratic)
                row[0] = square.add_(y[k], alpha=linear) if linear else square
    return y, fwd[:, 1]


def _series_riccati_alone(a: Tensor, y0: Tensor, quadratic: float, linear: float,
                          const: float) -> Tensor:
    """:func:`_series_riccati` without the integral: y, g reversed and y reversed
    in three contiguous buffers (fewest operations per order)."""
    order = a.shape[0] - 1
    ja = _weighted(a)
    y, y_rev, g_rev = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    y[0] = y0
    y_rev[order] = y0
    g_rev[order] = const + linear * y0 + quadratic * y0 * y0
    write = _writes_allowed(a, y0)
    for k in range(1, order + 1):
        if write:
            y_k = _dot0(ja[:k], g_rev[order - k + 1 :], out=y[k]).div_(k)
        else:
            y[k] = _dot0(ja[:k], g_rev[order - k + 1 :]).div_(k)
            y_k = y[k]
        if k < order:
            y_rev[order - k] = y_k
            if write:
                g_k = _dot0(y[: k + 1], y_rev[order - k :], out=g_rev[order - k])
                g_k.mul_(quadratic)
                if linear:
                    g_k.add_(y_k, alpha=linear)
            else:
                square = _dot0(y[: k + 1], y_rev[order - k :]).mul_(quadratic)
                g_rev[order - k] = square.add_(y_k, alpha=linear) if linear else square
    return y


# f(u0 + delta) = sum_m f^(m)(u0)/m! delta^m for tanh, sigmoid and softplus: the
# normalized derivatives are polynomials in y = tanh(u0) (tanh(u0 / 2) for
# sigmoid and softplus), so all of them are one matrix product with a few powers
# of y and q = 1 - y^2; the powers of the series delta (Faa di Bruno: one product
# per partition of k <= K) come from a product tree with one gather-multiply per
# doubling of the number of parts. Whole-tensor operations: O(log K) dispatched
# ops in all instead of a few per order, for small models where the dispatch
# dominates; the work grows with the partition count, so large tensors keep the
# O(K^2) recurrence (_COMPOSE_NUMEL). A line (a = a_0 + a_1 t, e.g. after the
# first affine layer) only needs the powers of a_1.

@lru_cache(maxsize=None)
def _q_basis_rows(order: int) -> Tuple[Tuple[int, ...], ...]:
    """Rows m = 0..order: tanh^(m)(u) = A_m(q) + y B_m(q) with y = tanh u and
    q = 1 - y^2 = sech^2 u, as the integer coefficients (A_0..A_h, B_0..B_h),
    h = (order + 1) // 2; shared by the derivative tables of every kind.

    Near |y| = 1 the monomials y^j nearly cancel in a derivative polynomial
    (tanh^(m) is exponentially small there); in q and y q^i each derivative is
    a sum of terms of one sign there, hence accurate. From dy/du = q and
    dq/du = -2 y q: A_{m+1} = q B_m - 2 (1 - q) q B_m' and B_{m+1} = -2 q A_m'
    (' = d/dq), starting from A_0 = 0, B_0 = 1."""
    half = (order + 1) // 2
    a: List[int] = []
    b = [1]
    rows = []
    for m in range(order + 1):
        rows.append(tuple(a + [0] * (half + 1 - len(a)) + b + [0] * (half + 1 - len(b))))
        if m == order:
            break
        next_a = [0] * (len(b) + 1)
        for i, c in enumerate(b):
            next_a[i + 1] += c + 2 * i * c
            next_a[i] -= 2 * i * c
        next_b = [-2 * i * c for i, c in enumerate(a)]
        while next_a and next_a[-1] == 0:
            next_a.pop()
        while next_b and next_b[-1] == 0:
            next_b.pop()
        a, b = next_a, next_b
    return tuple(rows)


@lru_cache(maxsize=None)
def _derivative_table(kind: str, order: int) -> Tuple[Tuple[float, ...], ...]:
    """Rows m = 1..order: f^(m)(u)/m! in the basis (1, q, .., q^h, y, y q, .., y q^h),
    h = (order + 1) // 2, with y = tanh(u) (tanh) or tanh(u / 2) (sigmoid,
    softplus: sigmoid(u) = (1 + tanh(u / 2)) / 2, softplus' = sigmoid). Exact
    integers divided once (Python's int / int rounds correctly)."""
    half = (order + 1) // 2
    in_q = _q_basis_rows(order)
    rows = []
    for m in range(1, order + 1):
        if kind == "tanh":
            vector, denominator = in_q[m], math.factorial(m)
        elif kind == "sigmoid":
            vector, denominator = in_q[m], math.factorial(m) * 2 ** (m + 1)
        elif m == 1:  # softplus' = sigmoid, which the basis row of y holds for softplus
            vector, denominator = [int(i == half + 1) for i in range(2 * half + 2)], 1
        else:  # softplus^(m)/m! = sigmoid^(m-1)/(m-1)! / m
            vector, denominator = in_q[m - 1], math.factorial(m) * 2**m
        rows.append(tuple(c / denominator for c in vector))
    return tuple(rows)


@lru_cache(maxsize=None)
def _partitions(k: int, largest: int) -> Tuple[Tuple[int, ...], ...]:
    """Partitions of k into parts <= largest, parts in decreasing order
    (cached: the recursion asks for the same (k, largest) many times)."""
    if k == 0:
        return ((),)
    return tuple((j,) + rest for j in range(min(k, largest), 0, -1)
                 for rest in _partitions(k - j, j))


@lru_cache(maxsize=None)
def _partition_count(order: int, degree: int) -> int:
    """Number of partitions of k = 1..order into parts <= degree."""
    ways = [1] + [0] * order  # ways[k]: partitions of k, parts <= the current one
    for part in range(1, degree + 1):
        for k in range(part, order + 1):
            ways[k] += ways[k - part]
    return sum(ways[1:])


@lru_cache(maxsize=None)
def _monomial_tree(order: int, degree: int):
    """Rows of the monomials prod_j delta_j^(mu_j) over the partitions mu of
    k = 1..order into parts <= degree, rows 0..degree-1 being delta_1..delta_degree;
    stage s appends the partitions with 2^(s-1) < parts <= 2^s, each as the
    product of two earlier rows. Returns (stages [(left, right)], k of each row,
    number of parts of each row, multinomial count m!/prod mu_j! of each row)."""
    rows: List[Tuple[int, ...]] = [(j,) for j in range(1, degree + 1)]
    index = {mu: i for i, mu in enumerate(rows)}
    every = [mu for k in range(1, order + 1) for mu in _partitions(k, degree)]
    stages = []
    size = 1
    while size < order:
        new = [mu for mu in every if size < len(mu) <= 2 * size]
        left, right = [], []
        for mu in new:
            half = (len(mu) + 1) // 2
            left.append(index[mu[:half]])
            right.append(index[mu[half:]])
        for mu in new:
            index[mu] = len(rows)
            rows.append(mu)
        if new:
            stages.append((left, right))
        size *= 2
    counts = []
    for mu in rows:
        c = math.factorial(len(mu))
        for j in set(mu):
            c //= math.factorial(mu.count(j))
        counts.append(c)
    return stages, [sum(mu) for mu in rows], [len(mu) for mu in rows], counts


_SERIES_PLANS: Dict[Any, Any] = {}
# above this many monomial elements (rows x coefficient size) the O(K^2)
# recurrence beats the composition (measured on CPU, float64, one thread)
_COMPOSE_NUMEL = 65536


def _composition_plan(kind: str, order: int, degree: int, dtype: torch.dtype,
                      device: torch.device):
    """Index tensors of the product tree, and (const, W) with const + W @ basis =
    count * f^(m)(u)/m! on every row (m: the row's number of parts), where
    basis = (q, .., q^h, y, y q, .., y q^h) with y = tanh(u) (tanh) or
    tanh(u / 2) (sigmoid, softplus) and q = 1 - y^2 (cached)."""
    key = (kind, order, degree, dtype, device)
    plan = _SERIES_PLANS.get(key)
    if plan is not None:
        return plan
    # (index tables in numpy, one host-to-device copy: many small tensors
    # would cost more than a small expansion)
    if degree == 1:  # rows: delta_1^m, m = 1..order (count 1)
        parts, counts, stages, k_rows = list(range(1, order + 1)), [1] * order, [], None
    else:
        tree, ks, parts, counts = _monomial_tree(order, degree)
        sizes = [len(left) for left, _ in tree]
        flat = np.asarray([i for left, right in tree for i in left + right] + [k - 1 for k in ks],
                          dtype=np.int64)
        indices = torch.from_numpy(flat).to(device)
        stages, offset = [], 0
        for size in sizes:
            stages.append((indices[offset : offset + size],
                           indices[offset + size : offset + 2 * size]))
            offset += 2 * size
        k_rows = indices[offset:]
    # each row: its m-th derivative (rounded once) times its integer count
    table = np.asarray(_derivative_table(kind, order), dtype=np.float64)
    weights_np = table[np.asarray(parts) - 1] * np.asarray(counts, dtype=np.float64)[:, None]
    weights = torch.from_numpy(weights_np).to(dtype=dtype, device=device)
    const = weights[:, :1] if weights_np[:, 0].any() else None
    plan = _SERIES_PLANS[key] = (stages, k_rows, const, weights[:, 1:])
    return plan


def _compose(a: Tensor, kind: str, y0: Tensor, y: Tensor, q: Tensor,
             degree: Optional[int], linear: Optional[Tensor] = None,
             order: Optional[int] = None) -> Optional[Tensor]:
    """Series of f(a) for f = tanh, sigmoid or softplus with f(a_0) = ``y0``,
    y = tanh(a_0) (tanh(a_0 / 2) for sigmoid and softplus), q = 1 - y^2 (given
    accurately); ``linear`` replaces y in the basis (softplus: sigmoid(a_0)).
    ``degree``: a_k = 0 above it; with ``order``, ``a`` may hold rows 0..degree
    only. ``y0``, ``y``, ``q`` and ``linear`` may cover only the first P rows
    of the value's first axis when a_0 repeats with period P (see
    :class:`Jet`): the derivatives are then made once per period. None where
    the recurrence is the cheaper way (large coefficients, high order)."""
    order = a.shape[0] - 1 if order is None else order
    if order == 0:
        return _tiled(y0, a[0]).unsqueeze(0)
    degree = order if degree is None or degree < 1 else min(degree, order)
    periodic = y0.numel() < a[0].numel()
    if degree > 1 and _partition_count(order, degree) * (a.numel() // a.shape[0]) > _COMPOSE_NUMEL:
        # work grows with the partition count: the recurrence is cheaper, unless
        # the derivatives are made once per period (the composition then costs
        # about three passes per monomial, the recurrence ~1.5 K^2)
        if not periodic or _partition_count(order, degree) > order * order:
            return None
    stages, k_rows, const, weights = _composition_plan(kind, order, degree, a.dtype, a.device)
    flat = a.reshape(a.shape[0], -1)
    # basis (q^1..q^h, y, y q^1..y q^h), then every row's weighted derivative at once
    y, q = y.reshape(1, -1), q.reshape(1, -1)
    q_powers = q.expand((weights.shape[1] - 1) // 2, -1).cumprod(0)
    basis = torch.cat([q_powers, y if linear is None else linear.reshape(1, -1), q_powers * y])
    derivatives = weights @ basis if const is None else torch.addmm(const, weights, basis)
    # (rows, copies, period): the derivatives broadcast over the copies
    copies = flat.shape[1] // derivatives.shape[1]
    per_period = derivatives.unsqueeze(1)
    write = _writes_allowed(a, y0, y, q) and (linear is None or _writes_allowed(linear))
    if write:  # fresh large tensors cost page faults: fill one output in place
        out = flat.new_empty((order + 1, flat.shape[1]))
        out[0].view(copies, -1).copy_(y0.reshape(1, -1))
    if degree == 1:  # a line: the only monomials are delta_1^k
        powers = flat[1].expand(order, -1).cumprod(0).view(order, copies, -1)
        if write:
            torch.mul(per_period, powers, out=out[1:].view(order, copies, -1))
            return out.reshape((order + 1,) + a.shape[1:])
        return torch.cat([_tiled(y0, a[0]).reshape(1, -1),
                          (per_period * powers).reshape(order, -1)]).reshape(
            (order + 1,) + a.shape[1:])
    if write:
        monomials = flat.new_empty((derivatives.shape[0], flat.shape[1]))
        monomials[:degree] = flat[1 : degree + 1]
        filled = degree
        for left, right in stages:
            rows = monomials[filled : filled + left.shape[0]]
            done = monomials[:filled]  # disjoint from `rows` (out= refuses overlap)
            torch.index_select(done, 0, left, out=rows)
            rows.mul_(done.index_select(0, right))
            filled += left.shape[0]
        monomials.view(monomials.shape[0], copies, -1).mul_(per_period)
        out[1:].zero_().index_add_(0, k_rows, monomials)
        return out.reshape((order + 1,) + a.shape[1:])
    monomials = flat[1 : degree + 1]
    for left, right in stages:
        monomials = torch.cat(
            [monomials, monomials.index_select(0, left) * monomials.index_select(0, right)]
        )
    terms = (monomials.reshape(monomials.shape[0], copies, -1) * per_period).reshape(
        monomials.shape)
    higher = terms.new_zeros((order,) + terms.shape[1:]).index_add_(0, k_rows, terms)
    return torch.cat([_tiled(y0, a[0]).reshape(1, -1), higher]).reshape(
        (order + 1,) + a.shape[1:])


def _first_period(value: Tensor, period: Optional[int]) -> Tensor:
    """The first ``period`` rows of a value that repeats with that period."""
    return value if period is None else value[:period]


def _tiled(part: Tensor, like: Tensor) -> Tensor:
    """``part`` (the first P rows of a periodic value) repeated to ``like``'s shape."""
    if part.shape == like.shape:
        return part
    return part.unsqueeze(0).expand((like.shape[0] // part.shape[0],) + part.shape).reshape(
        like.shape)


def _padded(a: Tensor, order: Optional[int]) -> Tensor:
    """All K + 1 rows of coefficients given as rows 0..degree (the rest zero)."""
    if order is None or a.shape[0] == order + 1:
        return a
    return torch.cat([a, a.new_zeros((order + 1 - a.shape[0],) + a.shape[1:])])


def series_tanh(a: Tensor, degree: Optional[int] = None, order: Optional[int] = None,
                period: Optional[int] = None) -> Tensor:
    y0 = torch.tanh(_first_period(a[0], period))
    out = _compose(a, "tanh", y0, y0, 1 - y0 * y0, degree, order=order)
    return out if out is not None else _series_riccati(
        _padded(a, order), _tiled(y0, a[0]), -1.0, 0.0, 1.0)[0]


def _half_tanh(s: Tensor, b0: Tensor):
    """tanh(b0 / 2) = s - r and 1 - tanh(b0 / 2)^2 = 4 s r from s = sigmoid(b0)
    and r = sigmoid(-b0) (no cancellation where s is near 0 or 1)."""
    r = torch.sigmoid(-b0)
    return s - r, (4 * s) * r


def series_sigmoid(a: Tensor, degree: Optional[int] = None,
                   order: Optional[int] = None, period: Optional[int] = None) -> Tensor:
    a0 = _first_period(a[0], period)
    y0 = torch.sigmoid(a0)
    out = _compose(a, "sigmoid", y0, *_half_tanh(y0, a0), degree, order=order)
    return out if out is not None else _series_riccati(
        _padded(a, order), _tiled(y0, a[0]), -1.0, 1.0, 0.0)[0]


def series_pow_scalar(a: Tensor, r: float) -> Tensor:
    if float(r) == int(r) and 0 <= r <= 16:
        r = int(r)
        out = coefficients_of(torch.ones_like(a[0]), a.shape[0] - 1)
        for _ in range(r):
            out = series_mul(out, a)
        return out
    p = [torch.pow(a[0], r)]
    for k in range(1, a.shape[0]):
        acc = (r - (k - 1)) * a[1] * p[k - 1]
        for j in range(2, k + 1):
            acc = acc + (r * j - (k - j)) * a[j] * p[k - j]
        p.append(acc / (k * a[0]))
    return torch.stack(p)


def series_sqrt(a: Tensor) -> Tensor:
    s = [torch.sqrt(a[0])]
    for k in range(1, a.shape[0]):
        acc = a[k]
        for j in range(1, k):
            acc = acc - s[j] * s[k - j]
        s.append(acc / (2 * s[0]))
    return torch.stack(s)


def series_softplus(a: Tensor, beta: float = 1.0, threshold: float = 20.0,
                    degree: Optional[int] = None, order: Optional[int] = None,
                    period: Optional[int] = None) -> Tensor:
    # softplus(a) = (1/beta) softplus(b), b = beta a, whose derivatives are sigmoid's
    b = a if beta == 1.0 else a * beta
    a0, b0 = _first_period(a[0], period), _first_period(b[0], period)
    y0 = F.softplus(a0, beta=beta, threshold=threshold)
    s0 = torch.sigmoid(b0)
    y = _compose(b, "softplus", y0, *_half_tanh(s0, b0), degree, linear=s0, order=order)
    if y is None:
        y = _series_riccati(_padded(b, order), _tiled(s0, b[0]), -1.0, 1.0, 0.0,
                            integral0=_tiled(y0, a[0]))[1]
    if beta != 1.0:
        y[1:] /= beta
    # torch switches to the identity where beta * a > threshold
    linear = b0 > threshold
    # (on CPU, skipped when no element is past the threshold: no sync to save)
    if a.device.type != "cpu" or bool(linear.any()):
        y[1:] = torch.where(_tiled(linear, b[0]), _padded(a, order)[1:], y[1:])
    return y


def series_gelu_erf(a: Tensor) -> Tensor:
    # gelu = a * Phi(a), Phi' = phi(a) a', phi = exp(-a^2 / 2) / sqrt(2 pi)
    phi = series_exp(-0.5 * series_mul(a, a)) / math.sqrt(2 * math.pi)
    cdf = _ode_integrate(a, 0.5 * (1 + torch.erf(a[0] / math.sqrt(2))), phi)
    return series_mul(a, cdf)


def series_erf(a: Tensor) -> Tensor:
    dens = series_exp(-series_mul(a, a)) * (2 / math.sqrt(math.pi))
    return _ode_integrate(a, torch.erf(a[0]), dens)


def series_gelu_tanh(a: Tensor) -> Tensor:
    inner = math.sqrt(2 / math.pi) * (a + 0.044715 * series_pow_scalar(a, 3))
    t = series_tanh(inner)
    t = t.clone()
    t[0] = t[0] + 1
    return 0.5 * series_mul(a, t)


def _piecewise(a: Tensor, slope: Tensor, value0: Tensor) -> Tensor:
    """Piecewise-linear map: y_0 = f(a_0), y_k = slope(a_0) * a_k."""
    out = a * slope.unsqueeze(0)
    out[0] = value0
    return out


# Kinks met at the expansion point, per operation name, while a record is open
# (see recording_kinks): the rules of piecewise operations choose their piece
# from y_0 alone, which is exact off the kinks only.
_KINKS = threading.local()  # .record: the open record of this thread (or None)


def _kink_record() -> Optional[Dict[str, List[Tensor]]]:
    return getattr(_KINKS, "record", None)


class recording_kinks:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Collect the kinks that piecewise rules meet: ``names()`` on exit lists the
    operations (``"relu"``, ``"max_pool2d"``, ...) whose input sat exactly on a
    break point (a tie for the maximum of a pooling window) while the variables
    move it, i.e. where the propagated series is not the function's."""

    def __enter__(self) -> "recording_kinks":
        self._previous, self._flags = _kink_record(), {}
        _KINKS.record = self._flags
        return self

    def __exit__(self, *exc: Any) -> None:
        _KINKS.record = self._previous

    def names(self) -> List[str]:
        """The operations that met a kink (one device sync per operation)."""
        return [name for name, flags in self._flags.items()
                if bool(torch.stack(flags).any())]


def _note_kinks(name: str, on_break: Tensor, a: Tensor, b: Optional[Tensor] = None) -> None:
    """Record ``name`` where an element of the value a_0 is on a break point
    (``on_break``) and a higher coefficient of the same element is not zero
    (a constant on a kink stays on it: no error); with ``b``, where a higher
    coefficient of a differs from b's (a break point b_0 that moves too)."""
    record = _kink_record()
    if record is None or a.shape[0] < 2:
        return
    if on_break.device.type == "cpu" and not bool(on_break.any()):
        return  # the common case; (on CUDA no sync: the record is read once at the end)
    moving = (a[1:] != (0 if b is None else b[1:])).any(0)
    record.setdefault(name, []).append((on_break & moving).any())


def _note_ties(name: str, a: Tensor, out: Tensor, args: tuple, kwargs: Dict[str, Any],
               spatial_dims: int) -> None:
    """Record ``name`` where a pooling window's maximum a_0 is attained by more
    than one element whose first-order coefficient a_1 differs from the chosen
    one's (``out``): along the variables the maximum then switches element, a
    kink. (Tied elements with equal a_1 and different higher coefficients are
    not looked at: a corner of measure zero, and checking every order costs K
    times as much.)"""
    record = _kink_record()
    if record is None or a.shape[0] < 2:
        return
    switching = _switching_windows(a, out, args, kwargs, spatial_dims, per_window=False)
    record.setdefault(name, []).append(switching.any())


def _switching_windows(a: Tensor, out: Tensor, args: tuple, kwargs: Dict[str, Any],
                       spatial_dims: int, per_window: bool = True) -> Tensor:
    """Per window of a max pooling of the coefficients ``a`` (K + 1, ...) with
    result ``out`` (the coefficients of each window's chosen maximum): whether
    that maximum of a_0 is tied with an element whose a_1 differs from the
    chosen one's (shape ``out.shape[1:]``). ``args``: max_pool's arguments
    after the input. Without ``per_window`` the result may be per element
    instead (the same ``any``)."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})

    def per_dim(value: Any, default: Any) -> Tuple[int, ...]:
        if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
            value = default
        if isinstance(value, int):
            return (value,) * spatial_dims
        return tuple(int(v) for v in value)

    kernel = per_dim(bound["kernel_size"], None)
    stride = per_dim(bound.get("stride"), kernel)
    padding = per_dim(bound.get("padding", 0), 0)
    dilation = per_dim(bound.get("dilation", 1), 1)
    if stride == kernel and set(dilation) == {1} and set(padding) == {0}:
        return _switching_tiles(a, out, kernel, bool(bound.get("ceil_mode", False)),
                                per_window)
    first = a.dim() - spatial_dims
    spans = [dilation[d] * (kernel[d] - 1) + 1 for d in range(spatial_dims)]
    counts = [out.shape[out.dim() - spatial_dims + d] for d in range(spatial_dims)]
    # windows as views (of a copy padded with -inf where max pooling pads); the
    # output says how many windows there are (ceil_mode included)
    pads: List[int] = []
    for d in reversed(range(spatial_dims)):
        needed = (counts[d] - 1) * stride[d] + spans[d]
        pads += [padding[d], max(0, needed - a.shape[first + d] - padding[d])]
    padded = any(pads)

    def windows_of(t: Tensor) -> Tensor:
        """(..., *out, *kernel) windows of t (..., *spatial), spatial dims last."""
        windows = F.pad(t, pads, value=-math.inf) if padded else t
        lead = t.dim() - spatial_dims
        for d in range(spatial_dims):
            windows = windows.unfold(lead + d, spans[d], stride[d])[..., :: dilation[d]]
            windows = windows.narrow(lead + d, 0, counts[d])
        return windows

    chosen = out[:2].reshape((2,) + out.shape[1:] + (1,) * spatial_dims)
    # tied with the window's maximum yet moving otherwise (so not the chosen one)
    switching = (windows_of(a[0]) == chosen[0]) & (windows_of(a[1]) != chosen[1])
    return switching.flatten(start_dim=-spatial_dims).any(-1)


def _switching_tiles(a: Tensor, out: Tensor, kernel: Tuple[int, ...], ceil_mode: bool,
                     per_window: bool) -> Tensor:
    """:func:`_switching_windows` for windows that tile the input (stride =
    kernel, no padding or dilation: each element in one window at most), the
    usual ``MaxPool2d(k)``, by contiguous elementwise tests instead of the
    windows' strided views. Without ``per_window``, per element (the same any)."""
    spatial_dims = len(kernel)
    spatial = a.shape[a.dim() - spatial_dims:]
    # rows 0 and 1 of each window's chosen element, on every element of the
    # window (NaN on the elements of no window: never equal)
    spread = out[:2]
    for d in range(spatial_dims):
        dim = spread.dim() - spatial_dims + d
        spread = spread.repeat_interleave(kernel[d], dim=dim)
        if spread.shape[dim] > spatial[d]:  # ceil_mode: the last window is partial
            spread = spread.narrow(dim, 0, spatial[d])
        elif spread.shape[dim] < spatial[d]:  # the remainder is in no window
            pad = [0, 0] * (spread.dim() - 1 - dim) + [0, spatial[d] - spread.shape[dim]]
            spread = F.pad(spread, pad, value=math.nan)
    # tied with its window's maximum yet moving otherwise (so not the chosen one)
    switching = (a[0] == spread[0]) & (a[1] != spread[1])
    if not per_window:
        return switching
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial_dims - 1]
    lead = switching.shape[: switching.dim() - spatial_dims]
    windows = pool(switching.to(a.dtype).reshape((-1, 1) + tuple(spatial)), kernel, kernel,
                   ceil_mode=ceil_mode)
    return windows.reshape(lead + windows.shape[2:]) > 0


# --------------------------------------------------------------------------
# rules: (func, args, kwargs) -> result
# --------------------------------------------------------------------------

_RULES: Dict[Callable, Callable] = {}
_SUPPORTED_NAMES: set = set()
_METADATA = set()


def _register(names: Sequence[str], rule: Callable) -> None:
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = {"torch": torch, "Tensor": Tensor, "F": F, "torch.special": torch.special}[owner_name]
        func = getattr(owner, attr, None)
        if func is None:
            continue
        _RULES[func] = rule
        _SUPPORTED_NAMES.add(name)


def supported_operations() -> str:
    return ", ".join(sorted(_SUPPORTED_NAMES))


def _shift_dim(dim: Any) -> Any:
    if isinstance(dim, int):
        return _vdim(dim)
    if isinstance(dim, (tuple, list)):
        return type(dim)(_vdim(d) for d in dim)
    return dim


def _fast_linear(func, args, kwargs) -> Optional[Tensor]:
    """Coefficients of the common linear ops without ``torch.vmap`` (which costs
    tens of microseconds per call), or None where the general path is needed."""
    x = args[0] if args else None
    if not isinstance(x, Jet) or any(isinstance(a, Jet) for a in args[1:]) or any(
        isinstance(v, Jet) for v in kwargs.values()
    ):
        return None
    a = x.low  # rows 0..degree: the zero rows above stay zero
    kind = _FAST_LINEAR.get(func)
    if kind == "pool":
        # batch-first ops: the coefficient axis joins the batch axis
        spatial = _POOL_DIMS[func]
        if a.dim() - 1 == spatial + 2:
            out = func(a.flatten(0, 1), *args[1:], **kwargs)
            return out.unflatten(0, a.shape[:2])
        if a.dim() - 1 == spatial + 1:
            return func(a, *args[1:], **kwargs)
        return None
    if kind == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if len(args) > 3 or set(kwargs) - {"start_dim", "end_dim"} or not (
            isinstance(start, int) and isinstance(end, int)
        ):
            return None
        if a.dim() == 1:  # a 0-d value: flatten gives shape (1,)
            return a.reshape(a.shape[0], 1)
        return a.flatten(_vdim(start), _vdim(end))
    if kind == "reshape":
        if kwargs:
            return None
        shape = args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if not all(isinstance(n, int) for n in shape):
            return None
        try:
            return getattr(a, func.__name__)((a.shape[0],) + tuple(shape))
        except RuntimeError:  # e.g. a view of non-contiguous coefficients
            return None
    if kind == "index":
        index = args[1]
        index = index if isinstance(index, tuple) else (index,)
        if not all(
            i is None or i is Ellipsis or isinstance(i, slice)
            or (isinstance(i, int) and not isinstance(i, bool))
            for i in index
        ):
            return None  # tensor / bool / list indices: the general path
        return a[(slice(None),) + index]
    if kind == "reduce":
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dim is None or len(args) > 3 or set(kwargs) - {"dim", "keepdim"}:
            return None
        return func(a, _shift_dim(dim), keepdim)
    return None


def _linear_rule(func, args, kwargs):
    """Linear, bias-free op: applied to every coefficient."""
    fast = _fast_linear(func, args, kwargs)
    if fast is not None:
        return Jet(fast, degree=args[0].degree, order=args[0].order)
    flat, spec = tree_flatten((args, kwargs))
    positions = [i for i, a in enumerate(flat) if isinstance(a, Jet)]

    def per_coefficient(*coeffs):
        new = list(flat)
        for p, c in zip(positions, coeffs):
            new[p] = c
        a, kw = tree_unflatten(new, spec)
        return func(*a, **kw)

    out = torch.vmap(per_coefficient)(*[flat[p].coefficients for p in positions])
    return _wrap(out)


def _cast_rule(func, args, kwargs):
    """``to``/``type_as`` and the integer and bool casts. A floating result is
    linear (every coefficient cast). An integer or bool one is piecewise
    constant in the input: its derivatives are zero, so the cast value is
    returned as a constant; it jumps where the value is a nonzero integer
    (truncation) or 0 (bool), recorded as a kink when the variables move it."""
    source = args[0]
    with torch._C.DisableTorchFunctionSubclass():
        # the dtype of the result, from an empty tensor: a float cast runs once
        probe = func(source.new_empty(0), *args[1:], **kwargs)
        if not isinstance(probe, Tensor):  # x.type() with no dtype: the type's name
            return func(*args, **kwargs)
    if probe.dtype.is_floating_point or probe.dtype.is_complex:
        return _linear_rule(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        value = func(*args, **kwargs)
    if isinstance(source, Jet):
        a = source.coefficients
        if value.dtype == torch.bool:
            on_jump = a[0] == 0
        else:
            on_jump = (a[0] == torch.trunc(a[0])) & (a[0] != 0)
        _note_kinks(f"a cast to {str(value.dtype).replace('torch.', '')}", on_jump, a)
    return value


def _promote_list_rule(func, args, kwargs):
    """cat/stack: constants join as jets with zero higher coefficients."""
    tensors = args[0]
    order = _order_of(tensors)
    like = _first_jet(tensors)
    promoted = [Jet(coefficients_of(t, order, like)) if not isinstance(t, Jet) else t
                for t in tensors]
    return _linear_rule(func, (promoted,) + tuple(args[1:]), kwargs)


def _where_rule(func, args, kwargs):
    cond, x, y = args[0], args[1], args[2]
    if isinstance(cond, Jet):
        cond = cond.coefficients[0]
    like = _first_jet((x, y))
    order = like.order
    cx, cy = coefficients_of(_const(x, like), order), coefficients_of(_const(y, like), order)
    cx, cy = _align(cx, cy)
    cond = _lift(cond.unsqueeze(0), cx.dim() - 1)
    return Jet(torch.where(cond, cx, cy))


def _add_rule(sign: float, reverse: bool = False):
    """a + sign * alpha * b; reversed (rsub): b - alpha * a."""

    def rule(func, args, kwargs):
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", 1)
        like = _first_jet((a, b))
        ca = coefficients_of(_const(a, like), like.order)
        cb = coefficients_of(_const(b, like), like.order)
        ca, cb = _align(ca, cb)
        if reverse:
            return Jet(cb - alpha * ca)
        return Jet(ca + sign * alpha * cb)

    return rule


def _mul_rule(func, args, kwargs):
    a, b = args[0], args[1]
    if isinstance(a, Jet) and isinstance(b, Jet):
        return Jet(series_mul(a.coefficients, b.coefficients))
    jet, other = (a, b) if isinstance(a, Jet) else (b, a)
    other = _const(other, jet)
    ca, cb = _align(jet.coefficients, other.unsqueeze(0))
    return Jet(ca * cb)


def _div_rule(func, args, kwargs):
    a, b = args[0], args[1]
    if kwargs.get("rounding_mode") is not None:
        raise UnsupportedJetOperation("division with rounding_mode is not differentiable")
    like = _first_jet((a, b))
    if not isinstance(b, Jet):
        other = _const(b, like)
        ca, cb = _align(a.coefficients, other.unsqueeze(0))
        return Jet(ca / cb)
    ca = coefficients_of(_const(a, like), like.order)
    return Jet(series_div(ca, b.coefficients))


def _rdiv_rule(func, args, kwargs):
    # Tensor.__rdiv__(self, other) = other / self
    return _div_rule(func, (args[1], args[0]), {})


def _matmul_rule(func, args, kwargs):
    a, b = args[0], args[1]
    if isinstance(a, Jet) and isinstance(b, Jet):
        return Jet(series_bilinear(torch.matmul, a.coefficients, b.coefficients))
    return _linear_rule(func, args, kwargs)


def _addmm_rule(func, args, kwargs):
    """addmm/baddbmm(input, m1, m2, beta, alpha) = beta input + alpha m1 @ m2
    (GPT-2's Conv1D layers), composed from the add and matmul rules."""
    names = ("input", "mat1", "mat2") if func in (torch.addmm, Tensor.addmm) else (
        "input", "batch1", "batch2")
    bound = dict(zip(names, args), **kwargs)
    beta, alpha = bound.get("beta", 1), bound.get("alpha", 1)
    product = torch.matmul(bound[names[1]], bound[names[2]])
    base = bound["input"]
    return (base if beta == 1 else beta * base) + (product if alpha == 1 else alpha * product)


def _unary(series: Callable):
    def rule(func, args, kwargs):
        return Jet(series(args[0].coefficients))

    return rule


def _unary_of_degree(series: Callable):
    """A rule whose series uses the input's degree (a line: powers of a_1 only)."""

    def rule(func, args, kwargs):
        x = args[0]
        return Jet(series(x.low, x.degree, x.order, x.period), period=x.period)

    return rule


def _sin_rule(func, args, kwargs):
    return Jet(series_sin_cos(args[0].coefficients)[0])


def _cos_rule(func, args, kwargs):
    return Jet(series_sin_cos(args[0].coefficients)[1])


def _pow_rule(func, args, kwargs):
    base, exponent = args[0], args[1] if len(args) > 1 else kwargs["exponent"]
    if isinstance(base, Jet) and not isinstance(exponent, Jet):
        if isinstance(exponent, Tensor):
            if exponent.numel() != 1:
                raise UnsupportedJetOperation("pow with a tensor exponent of several elements")
            exponent = exponent.item()
        return Jet(series_pow_scalar(base.coefficients, float(exponent)))
    # c ** x = exp(x log c), x ** y = exp(y log x)
    like = _first_jet((base, exponent))
    cb = coefficients_of(_const(base, like), like.order)
    ce = coefficients_of(_const(exponent, like), like.order)
    return Jet(series_exp(series_mul(ce, series_log(cb))))


def _rpow_rule(func, args, kwargs):
    return _pow_rule(func, (args[1], args[0]), {})


def _relu_rule(func, args, kwargs):
    a = args[0].coefficients
    positive = a[0] > 0
    _note_kinks("relu", a[0] == 0, a)
    return Jet(_piecewise(a, positive.to(a.dtype), torch.relu(a[0])))


def _leaky_relu_rule(func, args, kwargs):
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    a = args[0].coefficients
    s = torch.where(a[0] > 0, torch.ones_like(a[0]), torch.full_like(a[0], slope))
    if slope != 1:
        _note_kinks("leaky_relu", a[0] == 0, a)
    return Jet(_piecewise(a, s, F.leaky_relu(a[0], slope)))


def _clamp_tensor_bounds(x: Any, lo: Any, hi: Any) -> "Jet":
    """clamp(x, lo, hi) = min(max(x, lo), hi) with tensor (or jet) bounds: each
    element follows the coefficients of whichever of x, lo, hi it equals."""
    like = _first_jet((x, lo, hi))
    order = like.order
    result = coefficients_of(_const(x, like), order, like)
    for bound, below in ((lo, True), (hi, False)):
        if bound is None:
            continue
        cb = coefficients_of(_const(bound, like), order, like)
        result, cb = _align(result, cb)
        outside = result[0] < cb[0] if below else result[0] > cb[0]
        _note_kinks("clamp", result[0] == cb[0], result, cb)
        result = torch.where(outside.unsqueeze(0), cb, result)
    return Jet(result)


def _clamp_like(lo_default, hi_default, lo_name, hi_name, fn, name="clamp"):
    def rule(func, args, kwargs):
        lo = args[1] if len(args) > 1 else kwargs.get(lo_name, lo_default)
        hi = args[2] if len(args) > 2 else kwargs.get(hi_name, hi_default)
        if not isinstance(args[0], Jet) or isinstance(lo, Tensor) or isinstance(hi, Tensor):
            return _clamp_tensor_bounds(args[0], lo, hi)
        a = args[0].coefficients
        inside = torch.ones_like(a[0], dtype=torch.bool)
        if lo is not None:
            inside = inside & (a[0] > lo)
            _note_kinks(name, a[0] == lo, a)
        if hi is not None:
            inside = inside & (a[0] < hi)
            _note_kinks(name, a[0] == hi, a)
        return Jet(_piecewise(a, inside.to(a.dtype), fn(a[0], lo, hi)))

    return rule


def _abs_rule(func, args, kwargs):
    a = args[0].coefficients
    _note_kinks("abs", a[0] == 0, a)
    return Jet(_piecewise(a, torch.sign(a[0]), a[0].abs()))


def _elu_rule(func, args, kwargs):
    a = args[0].coefficients
    alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
    neg = alpha * series_exp(a)
    neg[0] = neg[0] - alpha
    _note_kinks("elu", a[0] == 0, a)  # C^1 at most: the second derivative jumps
    return Jet(torch.where((a[0] > 0).unsqueeze(0), a, neg))


def _softplus_rule(func, args, kwargs):
    beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
    threshold = args[2] if len(args) > 2 else kwargs.get("threshold", 20.0)
    x = args[0]
    return Jet(series_softplus(x.low, float(beta), float(threshold), x.degree, x.order,
                               x.period), period=x.period)


def _gelu_rule(func, args, kwargs):
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    a = args[0].coefficients
    return Jet(series_gelu_tanh(a) if approximate == "tanh" else series_gelu_erf(a))


def _silu_rule(func, args, kwargs):
    a = args[0].coefficients
    return Jet(series_mul(a, series_sigmoid(a)))


def _softmax_coeffs(a: Tensor, dim: int, log: bool) -> Tensor:
    d = _vdim(dim)
    shift = a[0].amax(dim=dim, keepdim=True).unsqueeze(0)
    shifted = a.clone()
    shifted[0:1] = shifted[0:1] - shift
    e = series_exp(shifted)
    total = e.sum(dim=d, keepdim=True)
    if log:
        out = shifted - series_log(total)
        return out
    return series_div(e, total)


def _softmax_rule(log: bool):
    def rule(func, args, kwargs):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            raise UnsupportedJetOperation("softmax without an explicit `dim`")
        dtype = kwargs.get("dtype")
        a = args[0].coefficients
        if dtype is not None:
            a = a.to(dtype)
        return Jet(_softmax_coeffs(a, dim, log))

    return rule


def _layer_norm_rule(func, args, kwargs):
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    a = bound["input"].coefficients
    n = len(tuple(bound["normalized_shape"]))
    dims = tuple(range(-n, 0))
    eps = bound.get("eps", 1e-5)
    centered = a - a.mean(dim=dims, keepdim=True)
    var = series_mul(centered, centered).mean(dim=dims, keepdim=True)
    var[0] = var[0] + eps
    y = series_mul(centered, series_pow_scalar(var, -0.5))
    weight, bias = bound.get("weight"), bound.get("bias")
    if weight is not None:
        y = y * weight
    if bias is not None:
        y[0] = y[0] + bias
    return Jet(y)


def _batch_norm_rule(func, args, kwargs):
    names = ["input", "running_mean", "running_var", "weight", "bias", "training",
             "momentum", "eps"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("training", False) or bound.get("running_mean") is None:
        raise UnsupportedJetOperation(
            "batch_norm in training mode (batch statistics mix the directions "
            "of the expansion); call model.eval() first"
        )
    a = bound["input"].coefficients
    eps = bound.get("eps", 1e-5)
    scale = torch.rsqrt(bound["running_var"] + eps)
    if bound.get("weight") is not None:
        scale = scale * bound["weight"]
    value_dims = a.dim() - 1
    scale = scale.reshape((1, -1) + (1,) * (value_dims - 2))
    out = a * scale
    out[0] = F.batch_norm(a[0], bound["running_mean"], bound["running_var"],
                          bound.get("weight"), bound.get("bias"), False, 0.0, eps)
    return Jet(out)


# conv layers as one dense matrix product where the matrix is small and the
# batch amortizes building it: torch's float64 CPU convolution loops over the
# batch (slow for many rows of a small image); cached per weight and shape
_DENSE_CONV_INPUTS = 1024  # most input elements per example
_DENSE_CONV_ENTRIES = 2**20  # most matrix entries
_DENSE_CONV_CACHED = 16
_PENDING = object()  # a conv seen once, with too few rows to build its matrix then
_DENSE_CONV: "OrderedDict[Any, Tuple[Tensor, int, Any, Optional[torch.Size]]]" = OrderedDict()


def clear_caches() -> None:
    """Forget the cached series weights, composition plans and dense conv
    matrices (the next call builds them again, as a first call does)."""
    _WEIGHTS.clear()
    _SERIES_PLANS.clear()
    _DENSE_CONV.clear()
    _q_basis_rows.cache_clear()
    _partitions.cache_clear()
    _derivative_table.cache_clear()
    _monomial_tree.cache_clear()
    _partition_count.cache_clear()


def _dense_conv(func: Callable, weight: Tensor, flat: Tensor, rest: tuple,
                rest_kw: dict) -> Optional[Tensor]:
    """The bias-free conv of the batch ``flat`` as one product with the conv's
    (in_numel, out_numel) matrix, or None where the direct call is cheaper (a
    large matrix, or under in_numel / 2 rows). Building the matrix is one conv
    of in_numel rows: a batch of fewer rows builds it only when the same conv
    comes again (a single call does not pay for it)."""
    rows, value_shape = flat.shape[0], flat.shape[1:]
    in_numel = math.prod(value_shape)
    if 2 * rows < in_numel or in_numel > _DENSE_CONV_INPUTS:
        return None
    try:
        key = (func, id(weight), tuple(value_shape), rest, tuple(sorted(rest_kw.items())),
               weight.dtype, weight.device)
        hash(key)
    except TypeError:  # unhashable arguments: no cache, the direct call
        return None
    entry = _DENSE_CONV.get(key)
    current = entry is not None and entry[0] is weight and entry[1] == weight._version
    if not current and rows < in_numel:
        # seen once: the direct call now, the matrix if the conv comes again
        entry = _DENSE_CONV[key] = (weight, weight._version, _PENDING, None)
    elif not current or entry[2] is _PENDING:
        eye = torch.eye(in_numel, dtype=weight.dtype, device=weight.device)
        image = func(eye.reshape((in_numel,) + tuple(value_shape)), weight, None,
                     *rest, **rest_kw)
        matrix = image.reshape(in_numel, -1) if image.numel() <= _DENSE_CONV_ENTRIES else None
        entry = _DENSE_CONV[key] = (weight, weight._version, matrix, image.shape[1:])
    _DENSE_CONV.move_to_end(key)
    while len(_DENSE_CONV) > _DENSE_CONV_CACHED:
        _DENSE_CONV.popitem(last=False)
    if entry[2] is None or entry[2] is _PENDING:
        return None
    return flat.reshape(rows, in_numel).mm(entry[2]).reshape((rows,) + entry[3])


def _affine_rule(func, args, kwargs):
    """linear / conv: weight on every coefficient, bias on coefficient 0 only."""
    x = args[0]
    if any(isinstance(a, Jet) for a in args[1:]) or any(
        isinstance(v, Jet) for v in kwargs.values()
    ):
        raise UnsupportedJetOperation(
            f"`{_func_name(func)}` with a weight that depends on the inputs"
        )
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    rest, rest_kw = tuple(args[3:]), {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
    degree = x.degree
    # the coefficients above `degree` are zero and stay zero: map the others only
    low = x.low
    if func is F.linear:
        out = F.linear(low, weight)
        if bias is not None:  # (add_ on the row: `out[0] +=` also writes it back)
            out[0].add_(bias)
        # linear keeps the leading axes (of a 1-D value, the axis is the features)
        keeps_rows = low.dim() > 2
    else:
        # conv: the coefficients join the batch axis (one call, no vmap); an
        # unbatched input (C, *spatial) already has the coefficient axis as its batch
        batched = low.dim() - 1 == weight.dim()
        flat = low.flatten(0, 1) if batched else low
        out = _dense_conv(func, weight, flat, rest, rest_kw) if batched else None
        if out is None:
            out = func(flat, weight, None, *rest, **rest_kw)
        out = out.unflatten(0, low.shape[:2]) if batched else out
        if bias is not None:
            out[0].add_(bias.reshape((-1,) + (1,) * (weight.dim() - 2)))
        keeps_rows = batched  # (unbatched, the first axis is the channels)
    return Jet(out, degree=degree, order=x.order, period=x.period if keeps_rows else None)


def _max_pool_rule(spatial_dims: int):
    def rule(func, args, kwargs):
        kwargs = dict(kwargs)
        return_indices = kwargs.pop("return_indices", False)
        if len(args) > 6:
            return_indices = args[6]
            args = args[:6]
        a = args[0].coefficients
        out0, idx = func(a[0], *args[1:], **kwargs, return_indices=True)
        # every coefficient is gathered where coefficient 0 attains the max
        src = a.flatten(start_dim=a.dim() - spatial_dims)
        index = idx.flatten(start_dim=idx.dim() - spatial_dims)
        index = index.unsqueeze(0).expand((a.shape[0],) + index.shape)
        out = src.gather(-1, index).reshape((a.shape[0],) + out0.shape)
        _note_ties(f"max_pool{spatial_dims}d", a, out, args[1:], kwargs, spatial_dims)
        return (Jet(out), idx) if return_indices else Jet(out)

    return rule


def _dropout_rule(func, args, kwargs):
    names = ["input", "p", "training", "inplace"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    training = bound.get("training", True)
    if training and bound.get("p", 0.5) > 0:
        raise UnsupportedJetOperation(
            "dropout in training mode; call model.eval() first"
        )
    return bound["input"]


def _identity_rule(func, args, kwargs):
    return args[0]


_METADATA_NAMES = [
    "dim", "ndimension", "size", "numel", "nelement", "is_floating_point", "is_complex",
    "element_size", "get_device", "is_contiguous", "stride", "data_ptr", "__len__",
    "__format__", "storage_offset", "is_sparse",
]
for _name in _METADATA_NAMES:
    _f = getattr(Tensor, _name, None)
    if _f is not None:
        _METADATA.add(_f)
for _prop in ["shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad",
              "is_leaf", "grad_fn", "names", "is_meta", "is_quantized", "is_mps",
              "is_nested", "is_sparse"]:
    _d = getattr(Tensor, _prop, None)
    if _d is not None and hasattr(_d, "__get__"):
        _METADATA.add(_d.__get__)
_METADATA.add(Tensor.__repr__)
_METADATA.add(torch.is_floating_point)
_METADATA.add(torch.numel)
_METADATA.add(torch.is_tensor)

_LINEAR_NAMES = [
    "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose",
    "t", "movedim", "swapaxes", "swapdims", "narrow", "select", "expand", "expand_as",
    "repeat", "repeat_interleave", "tile", "contiguous", "clone", "__getitem__", "index_select",
    "gather", "sum", "mean", "neg", "__neg__", "negative", "split", "chunk", "unbind", "roll",
    "flip", "diagonal", "tril", "triu", "view_as", "reshape_as", "float", "double",
    "half", "cumsum", "trace", "unfold", "pad", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "pixel_shuffle", "pixel_unshuffle", "diag_embed", "einsum", "broadcast_to",
    "masked_fill", "__pos__", "positive", "cpu", "cuda",
]
_register(
    [f"{o}.{n}" for o in ("torch", "Tensor", "F") for n in _LINEAR_NAMES
     if n not in ("pad", "masked_fill", "einsum")],
    _linear_rule,
)
_register(["F.avg_pool1d", "F.avg_pool2d", "F.avg_pool3d", "F.adaptive_avg_pool1d",
           "F.adaptive_avg_pool2d", "F.adaptive_avg_pool3d", "F.pixel_shuffle",
           "F.pixel_unshuffle"], _linear_rule)
_register(["Tensor.to", "Tensor.type", "Tensor.type_as", "Tensor.long", "Tensor.int",
           "Tensor.short", "Tensor.char", "Tensor.byte", "Tensor.bool"], _cast_rule)
_FAST_LINEAR: Dict[Callable, str] = {}
_POOL_DIMS: Dict[Callable, int] = {}
for _fn, _dims in ((F.avg_pool1d, 1), (F.avg_pool2d, 2), (F.avg_pool3d, 3),
                   (F.adaptive_avg_pool1d, 1), (F.adaptive_avg_pool2d, 2),
                   (F.adaptive_avg_pool3d, 3)):
    _FAST_LINEAR[_fn], _POOL_DIMS[_fn] = "pool", _dims
for _fn in (torch.flatten, Tensor.flatten):
    _FAST_LINEAR[_fn] = "flatten"
for _fn in (Tensor.reshape, Tensor.view):
    _FAST_LINEAR[_fn] = "reshape"
_FAST_LINEAR[Tensor.__getitem__] = "index"
for _fn in (torch.sum, Tensor.sum, torch.mean, Tensor.mean):
    _FAST_LINEAR[_fn] = "reduce"
_register(["torch.cat", "torch.concat", "torch.concatenate", "torch.stack", "torch.hstack",
           "torch.vstack"], _promote_list_rule)
_register(["torch.where"], _where_rule)
_register(["Tensor.where"], lambda func, args, kwargs: _where_rule(
    func, (args[1], args[0], args[2] if len(args) > 2 else kwargs["other"]), {}))
_register(["torch.add", "Tensor.add", "Tensor.__add__", "Tensor.__radd__", "Tensor.__iadd__", "Tensor.add_"],
          _add_rule(1.0))
_register(["torch.sub", "torch.subtract", "Tensor.sub", "Tensor.__sub__", "Tensor.__isub__", "Tensor.sub_"],
          _add_rule(-1.0))
_register(["Tensor.__rsub__", "torch.rsub"], _add_rule(-1.0, reverse=True))
_register(["torch.mul", "torch.multiply", "Tensor.mul", "Tensor.__mul__", "Tensor.__rmul__",
           "Tensor.__imul__", "Tensor.mul_"], _mul_rule)
_register(["torch.div", "torch.divide", "torch.true_divide", "Tensor.div", "Tensor.__truediv__",
           "Tensor.__div__", "Tensor.__itruediv__", "Tensor.true_divide", "Tensor.div_"], _div_rule)
_register(["Tensor.__rtruediv__", "Tensor.__rdiv__"], _rdiv_rule)
_register(["torch.matmul", "Tensor.matmul", "Tensor.__matmul__", "torch.mm", "Tensor.mm",
           "torch.bmm", "Tensor.bmm", "Tensor.__rmatmul__"], _matmul_rule)
_register(["torch.addmm", "Tensor.addmm", "torch.baddbmm", "Tensor.baddbmm"], _addmm_rule)
_register(["torch.exp", "Tensor.exp"], _unary(series_exp))
_register(["torch.log", "Tensor.log"], _unary(series_log))
_register(["torch.sqrt", "Tensor.sqrt"], _unary(series_sqrt))
_register(["torch.rsqrt", "Tensor.rsqrt"],
          _unary(lambda a: series_pow_scalar(a, -0.5)))
_register(["torch.reciprocal", "Tensor.reciprocal"],
          _unary(lambda a: series_div(coefficients_of(torch.ones_like(a[0]), a.shape[0] - 1), a)))
_register(["torch.square", "Tensor.square"], _unary(lambda a: series_mul(a, a)))
_register(["torch.log1p", "Tensor.log1p"],
          _unary(lambda a: series_log(torch.cat([a[:1] + 1, a[1:]]))))
_register(["torch.expm1", "Tensor.expm1"],
          _unary(lambda a: torch.cat([torch.expm1(a[:1]), series_exp(a)[1:]])))
_register(["torch.erf", "Tensor.erf", "torch.special.erf"], _unary(series_erf))
_register(["torch.sin", "Tensor.sin"], _sin_rule)
_register(["torch.cos", "Tensor.cos"], _cos_rule)
_register(["torch.tanh", "Tensor.tanh", "F.tanh"], _unary_of_degree(series_tanh))
_register(["torch.sigmoid", "Tensor.sigmoid", "F.sigmoid"], _unary_of_degree(series_sigmoid))
_register(["torch.pow", "Tensor.pow", "Tensor.__pow__"], _pow_rule)
_register(["Tensor.__rpow__"], _rpow_rule)
_register(["torch.relu", "Tensor.relu", "F.relu"], _relu_rule)
_register(["F.leaky_relu"], _leaky_relu_rule)
_register(["torch.clamp", "Tensor.clamp", "torch.clip", "Tensor.clip"],
          _clamp_like(None, None, "min", "max", lambda x, lo, hi: torch.clamp(x, lo, hi)))
_register(["F.hardtanh"], _clamp_like(-1.0, 1.0, "min_val", "max_val",
                                      lambda x, lo, hi: torch.clamp(x, lo, hi), "hardtanh"))
_register(["F.relu6"], lambda func, args, kwargs: _clamp_like(
    0.0, 6.0, "_lo", "_hi", lambda x, lo, hi: torch.clamp(x, lo, hi), "relu6")(
        func, args[:1], {}))
_register(["torch.abs", "Tensor.abs", "Tensor.__abs__"], _abs_rule)
_register(["F.elu"], _elu_rule)
_register(["F.softplus"], _softplus_rule)
_register(["F.gelu"], _gelu_rule)
_register(["F.silu"], _silu_rule)
_register(["F.softmax", "torch.softmax", "Tensor.softmax"], _softmax_rule(False))
_register(["F.log_softmax", "torch.log_softmax", "Tensor.log_softmax"], _softmax_rule(True))
_register(["F.layer_norm"], _layer_norm_rule)
_register(["F.batch_norm"], _batch_norm_rule)
_register(["F.linear", "F.conv1d", "F.conv2d", "F.conv3d"], _affine_rule)
_register(["F.max_pool1d"], _max_pool_rule(1))
_register(["F.max_pool2d"], _max_pool_rule(2))
_register(["F.max_pool3d"], _max_pool_rule(3))
_register(["F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d", "F.alpha_dropout"],
          _dropout_rule)


def _pad_rule(func, args, kwargs):
    names = ["input", "pad", "mode", "value"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    a = bound["input"].coefficients
    mode = bound.get("mode", "constant")
    value = bound.get("value", None) or 0.0
    rest = {"pad": bound["pad"], "mode": mode}
    out = torch.vmap(lambda c: F.pad(c, **rest))(a)
    if mode == "constant" and value != 0.0:
        out[0] = F.pad(a[0], value=value, **rest)
    return Jet(out)


_register(["F.pad", "torch.constant_pad_nd"], _pad_rule)


def _masked_fill_rule(func, args, kwargs):
    x, mask, value = args[0], args[1], args[2]
    a = x.coefficients
    mask = mask.coefficients[0] if isinstance(mask, Jet) else mask
    out = a.masked_fill(mask.unsqueeze(0), 0.0)
    out[0] = a[0].masked_fill(mask, value)
    return Jet(out)


_register(["torch.masked_fill", "Tensor.masked_fill"], _masked_fill_rule)


for _prop in ("T", "mT"):
    _RULES[getattr(Tensor, _prop).__get__] = _linear_rule
    _SUPPORTED_NAMES.add(f"Tensor.{_prop}")


def _constant_like_rule(func, args, kwargs):
    """zeros_like, new_zeros, ...: a constant built from the value (coefficient 0)."""
    args, kwargs = tree_map(lambda a: a.coefficients[0] if isinstance(a, Jet) else a,
                            (args, kwargs))
    return func(*args, **kwargs)


_register(
    [f"torch.{n}_like" for n in ("zeros", "ones", "full", "empty", "rand", "randn")]
    + [f"Tensor.new_{n}" for n in ("zeros", "ones", "full", "empty", "tensor")],
    _constant_like_rule,
)

def _threshold_rule(func, args, kwargs):
    """x > y, x <= y, sign(x), ...: a constant mask from the values; it flips
    where the two sides are equal (sign: x = 0), a kink when the variables
    move them apart (the mask usually selects a piece, as in x * (x > 0))."""
    if _kink_record() is not None:
        x = args[0] if args else kwargs.get("input")
        y = args[1] if len(args) > 1 else kwargs.get("other", 0.0)
        if not isinstance(x, Jet):  # the jet first (a constant side moves nothing)
            x, y = y, x
        name = _func_name(func).rsplit(".", 1)[-1].strip("_")
        label = name if name == "sign" else f"a comparison ({name})"
        if isinstance(y, Jet):
            a, b = _align(x.coefficients, y.coefficients)
            _note_kinks(label, a[0] == b[0], a, b)
        else:
            a = x.coefficients
            _note_kinks(label, a[0] == y, a)
    return _constant_like_rule(func, args, kwargs)


# comparisons give constant masks computed from the value (exact off the
# thresholds; a tie in argmax/argmin/argsort is not detected)
_register(
    [f"{o}.{n}" for o in ("torch", "Tensor") for n in (
        "eq", "ne", "isnan", "isinf", "isfinite", "signbit", "argmax", "argmin", "argsort")]
    + [f"Tensor.__{n}__" for n in ("eq", "ne")],
    _constant_like_rule,
)
_register(
    [f"{o}.{n}" for o in ("torch", "Tensor") for n in (
        "gt", "lt", "ge", "le", "greater", "less", "sign")]
    + [f"Tensor.__{n}__" for n in ("gt", "lt", "ge", "le")],
    _threshold_rule,
)
