#!/usr/bin/env python3
"""Smooth surrogates of non-smooth operations, swapped into a model temporarily.

Second-order methods need a model that is twice differentiable along the path.
ReLU-family activations, clamps, ``abs``, ``maximum``/``minimum`` and max
pooling are piecewise linear: their Hessian is zero almost everywhere plus a
delta on the kinks, which no quadrature sees. :func:`smooth_model` replaces each
of them by a smooth function with a sharpness ``beta`` that tends to the
original as ``beta`` grows:

=============================================  =====================================================
operation                                      smooth surrogate (``sp`` = softplus with ``beta``)
=============================================  =====================================================
``relu``                                       ``sp(x)``
``maximum(a, b)`` / ``minimum(a, b)``          ``b + sp(a - b)`` / ``a - sp(a - b)`` (*)
``clamp(x, lo, hi)``, ``clip``, ``hardtanh``,   ``min_s(max_s(x, lo), hi)`` with the smooth max/min
``relu6``, ``clamp_min``, ``clamp_max``        above (so ``relu6 = min_s(sp(x), 6)``)
``abs``                                        ``sp(x) + sp(-x)``
``leaky_relu`` / ``prelu`` (slope ``a``)       ``a x + (1 - a) sp(x)``
``rrelu`` (eval)                               leaky with the mean slope ``(lower + upper) / 2``
``hardsigmoid`` / ``hardswish``                ``clamp_s(x + 3, 0, 6) / 6`` / ``x`` times that
``max`` / ``min`` / ``amax`` / ``amin``        softmax-weighted mean ``sum softmax(beta v) v``
(reductions)                                   (``-`` of it on ``-v`` for the min)
``max_pool{1,2,3}d``, ``adaptive_max_pool*``   the softmax-weighted mean over each window
=============================================  =====================================================

(*) evaluated as ``a + sp(b - a)`` where ``a >= b`` (the same function), so
that a huge bound such as ``finfo.min`` does not cancel the other operand.

The softmax-weighted mean lies between the window's mean and its max, equals
the max when the window is constant, and tends to the max as ``beta`` grows;
padding, stride, dilation and ``ceil_mode`` follow PyTorch's max pooling
exactly (padded positions take no weight). ``return_indices=True`` returns the
indices of the exact max (they carry no gradient).
"""
import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

# -----------------------------------------------------------------------------
# argument binding


def _bind(
    args: Tuple[Any, ...], kwargs: Dict[str, Any], names: Sequence[str], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _tuple(value: Any, n: int) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(value) * n
        return tuple(value)
    return (value,) * n


# -----------------------------------------------------------------------------
# smooth elementwise surrogates


def _sp(x: Tensor, beta: float) -> Tensor:
    return F.softplus(x, beta=beta)


def _smooth_max(a: Any, b: Any, beta: float) -> Tensor:
    # b + sp(a - b) = a + sp(b - a): symmetric, and maximum(x, 0) = softplus(x).
    # Each example takes the form whose softplus argument is <= 0, so that a
    # huge bound (a mask value such as finfo.min) does not cancel the other
    # operand; both forms are the same analytic function, so every derivative
    # is exact. The choice is made out of sight of torch function modes: it is
    # not an input-dependent step of the model.
    with torch._C.DisableTorchFunction():
        a_first = a >= b
    return torch.where(a_first, a + _sp(b - a, beta), b + _sp(a - b, beta))


def _smooth_min(a: Any, b: Any, beta: float) -> Tensor:
    return -_smooth_max(-a, -b, beta)


def _smooth_clamp(x: Tensor, lo: Any, hi: Any, beta: float) -> Tensor:
    # clamp = min(max(x, lo), hi), composed exactly as torch defines it
    if lo is not None:
        x = _smooth_max(x, lo, beta)
    if hi is not None:
        x = _smooth_min(x, hi, beta)
    return x


def _smooth_leaky(x: Tensor, slope: Any, beta: float) -> Tensor:
    # leaky(x) = a x + (1 - a) relu(x) for any slope a
    return slope * x + (1 - slope) * _sp(x, beta)


def _smooth_hardsigmoid(x: Tensor, beta: float) -> Tensor:
    return _smooth_clamp(x + 3.0, 0.0, 6.0, beta) / 6.0


def _softmax_mean(values: Tensor, dim: Any, keepdim: bool, beta: float) -> Tensor:
    weights = torch.softmax(beta * values, dim=dim) if not isinstance(dim, tuple) else None
    if weights is None:  # several dims: flatten them into one
        dims = sorted(d % values.dim() for d in dim)
        moved = values.movedim(dims, list(range(values.dim() - len(dims), values.dim())))
        flat = moved.flatten(values.dim() - len(dims))
        out = (torch.softmax(beta * flat, dim=-1) * flat).sum(-1)
        if keepdim:
            for d in dims:
                out = out.unsqueeze(d)
        return out
    return (weights * values).sum(dim=dim, keepdim=keepdim)


def _smooth_reduce_max(x: Tensor, dim: Any, keepdim: bool, beta: float) -> Tensor:
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        flat = x.reshape(-1)
        out = (torch.softmax(beta * flat, dim=0) * flat).sum()
        return out.reshape((1,) * x.dim()) if keepdim else out
    if isinstance(dim, list):
        dim = tuple(dim)
    if isinstance(dim, tuple) and len(dim) == 1:
        dim = dim[0]
    return _softmax_mean(x, dim, keepdim, beta)


# -----------------------------------------------------------------------------
# smooth max pooling


def _pool_windows(
    length: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> Tuple[Tensor, Tensor]:
    """Indices (L_out, k) and validity of PyTorch's max-pool windows along one dim."""
    span = dilation * (kernel - 1) + 1
    numerator = length + 2 * padding - span
    if numerator < 0:
        raise ValueError(
            f"max pooling window (kernel {kernel}, dilation {dilation}) is larger "
            f"than the padded input ({length} + 2*{padding})"
        )
    out = (math.ceil if ceil_mode else math.floor)(numerator / stride) + 1
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    starts = torch.arange(out) * stride - padding
    index = starts[:, None] + torch.arange(kernel)[None, :] * dilation
    return index, (index >= 0) & (index < length)


def _adaptive_windows(length: int, out: int) -> Tuple[Tensor, Tensor]:
    """Indices (out, K) and validity of PyTorch's adaptive pooling windows."""
    starts = [(i * length) // out for i in range(out)]
    ends = [-((-(i + 1) * length) // out) for i in range(out)]
    width = max(e - s for s, e in zip(starts, ends))
    index = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]
    return index, index < torch.tensor(ends)[:, None]


def _softmax_pool(
    x: Tensor, windows: List[Tuple[Tensor, Tensor]], beta: float
) -> Tensor:
    """Softmax-weighted mean of ``x`` over a box of windows on its last dims."""
    n = len(windows)
    lead = x.dim() - n
    y = x
    for d, (index, _) in enumerate(windows):
        dim = lead + 2 * d
        size = y.shape[dim]
        idx = index.to(x.device).clamp(0, size - 1)
        y = y.index_select(dim, idx.reshape(-1)).unflatten(dim, tuple(idx.shape))
    # (..., o1, K1, o2, K2, ...) -> (..., o1, o2, ..., K1 * K2 * ...)
    perm = list(range(lead)) + [lead + 2 * d for d in range(n)] + [
        lead + 2 * d + 1 for d in range(n)
    ]
    y = y.permute(perm).flatten(lead + n)
    valid = torch.ones((), dtype=torch.bool, device=x.device)
    for d, (_, ok) in enumerate(windows):
        shape = [1] * (2 * n)
        shape[d], shape[n + d] = ok.shape
        valid = valid & ok.to(x.device).reshape(shape)
    valid = valid.flatten(n)
    logits = (beta * y).masked_fill(~valid, float("-inf"))
    return (torch.softmax(logits, dim=-1) * y.masked_fill(~valid, 0.0)).sum(-1)


def _detached(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in values.items()}
    return tuple(v.detach() if isinstance(v, Tensor) else v for v in values)


def _exact_indices(original: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tensor:
    """Indices of the exact max (they carry no gradient), computed out of sight
    of any torch function mode (the non-smoothness check included)."""
    with torch._C.DisableTorchFunction():
        _, indices = original(*_detached(args), **_detached(kwargs))
    return indices


def _smooth_max_pool(
    n: int, original: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any], beta: float
) -> Any:
    p = _bind(
        args,
        kwargs,
        ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False},
    )
    x = p["input"]
    kernel = _tuple(p["kernel_size"], n)
    stride = p["stride"]
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else (
        _tuple(stride, n)
    )
    padding, dilation = _tuple(p["padding"], n), _tuple(p["dilation"], n)
    windows = [
        _pool_windows(x.shape[x.dim() - n + d], kernel[d], stride[d], padding[d],
                      dilation[d], bool(p["ceil_mode"]))
        for d in range(n)
    ]
    out = _softmax_pool(x, windows, beta)
    if p["return_indices"]:
        return out, _exact_indices(original, args, kwargs)
    return out


def _smooth_adaptive_max_pool(
    n: int, original: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any], beta: float
) -> Any:
    p = _bind(args, kwargs, ["input", "output_size", "return_indices"], {"return_indices": False})
    x = p["input"]
    sizes = _tuple(p["output_size"], n)
    windows = []
    for d in range(n):
        length = x.shape[x.dim() - n + d]
        windows.append(_adaptive_windows(length, length if sizes[d] is None else sizes[d]))
    out = _softmax_pool(x, windows, beta)
    if p["return_indices"]:
        return out, _exact_indices(original, args, kwargs)
    return out


# -----------------------------------------------------------------------------
# the dispatch table: canonical op name -> smooth implementation


def _relu(args, kwargs, beta):
    return _sp(args[0] if args else kwargs["input"], beta)


def _relu6(args, kwargs, beta):
    return _smooth_clamp(args[0] if args else kwargs["input"], 0.0, 6.0, beta)


def _hardtanh(args, kwargs, beta):
    p = _bind(args, kwargs, ["input", "min_val", "max_val"], {"min_val": -1.0, "max_val": 1.0})
    return _smooth_clamp(p["input"], p["min_val"], p["max_val"], beta)


def _clamp(args, kwargs, beta):
    p = _bind(args, kwargs, ["input", "min", "max"], {"min": None, "max": None})
    return _smooth_clamp(p["input"], p["min"], p["max"], beta)


def _clamp_min(args, kwargs, beta):
    p = _bind(args, kwargs, ["input", "min"], {})
    return _smooth_max(p["input"], p["min"], beta)


def _clamp_max(args, kwargs, beta):
    p = _bind(args, kwargs, ["input", "max"], {})
    return _smooth_min(p["input"], p["max"], beta)


def _abs(args, kwargs, beta):
    x = args[0] if args else kwargs["input"]
    return _sp(x, beta) + _sp(-x, beta)


def _leaky_relu(args, kwargs, beta):
    p = _bind(args, kwargs, ["input", "negative_slope"], {"negative_slope": 0.01})
    return _smooth_leaky(p["input"], p["negative_slope"], beta)


def _prelu(args, kwargs, beta):
    p = _bind(args, kwargs, ["input", "weight"], {})
    x, weight = p["input"], p["weight"]
    if weight.numel() > 1 and x.dim() >= 2:
        weight = weight.reshape((-1,) + (1,) * (x.dim() - 2))
    return _smooth_leaky(x, weight, beta)


def _rrelu(args, kwargs, beta):
    p = _bind(
        args, kwargs, ["input", "lower", "upper", "training"],
        {"lower": 1.0 / 8, "upper": 1.0 / 3, "training": False},
    )
    if p["training"]:
        raise ValueError(
            "rrelu in training mode draws random slopes and has no smooth "
            "surrogate; call model.eval() first"
        )
    return _smooth_leaky(p["input"], (p["lower"] + p["upper"]) / 2, beta)


def _hardsigmoid(args, kwargs, beta):
    return _smooth_hardsigmoid(args[0] if args else kwargs["input"], beta)


def _hardswish(args, kwargs, beta):
    x = args[0] if args else kwargs["input"]
    return x * _smooth_hardsigmoid(x, beta)


def _binary(smooth: Callable) -> Callable:
    def handler(args, kwargs, beta):
        p = _bind(args, kwargs, ["input", "other"], {})
        return smooth(p["input"], p["other"], beta)

    return handler


def _reduction(sign: float, with_indices: bool) -> Callable:
    """max/min (torch.max(x), torch.max(x, dim), torch.max(x, other)), amax/amin."""

    def handler(args, kwargs, beta, original):
        p = _bind(args, kwargs, ["input", "dim", "keepdim"], {"dim": None, "keepdim": False})
        if "other" in kwargs or isinstance(p["dim"], Tensor):
            other = kwargs.get("other", p["dim"])
            smooth = _smooth_max if sign > 0 else _smooth_min
            return smooth(p["input"], other, beta)
        x = p["input"]
        values = sign * _smooth_reduce_max(sign * x, p["dim"], bool(p["keepdim"]), beta)
        if with_indices and p["dim"] is not None:
            with torch._C.DisableTorchFunction():
                exact = original(*_detached(args), **_detached(kwargs))
            return type(exact)((values, exact.indices))
        return values

    return handler


_ELEMENTWISE: Dict[str, Callable] = {
    "relu": _relu,
    "relu6": _relu6,
    "hardtanh": _hardtanh,
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": _clamp_min,
    "clamp_max": _clamp_max,
    "abs": _abs,
    "absolute": _abs,
    "leaky_relu": _leaky_relu,
    "prelu": _prelu,
    "rrelu": _rrelu,
    "hardsigmoid": _hardsigmoid,
    "hardswish": _hardswish,
    "maximum": _binary(_smooth_max),
    "minimum": _binary(_smooth_min),
    "fmax": _binary(_smooth_max),
    "fmin": _binary(_smooth_min),
}
# handlers that need the original function (for exact indices)
_WITH_ORIGINAL: Dict[str, Callable] = {
    "max": _reduction(1.0, True),
    "min": _reduction(-1.0, True),
    "amax": _reduction(1.0, False),
    "amin": _reduction(-1.0, False),
}
for _n in (1, 2, 3):
    for _name in (f"max_pool{_n}d", f"max_pool{_n}d_with_indices"):
        _WITH_ORIGINAL[_name] = (lambda n: lambda a, k, b, o: _smooth_max_pool(n, o, a, k, b))(_n)
    for _name in (f"adaptive_max_pool{_n}d", f"adaptive_max_pool{_n}d_with_indices"):
        _WITH_ORIGINAL[_name] = (
            lambda n: lambda a, k, b, o: _smooth_adaptive_max_pool(n, o, a, k, b)
        )(_n)

#: canonical names of the operations :func:`smooth_model` replaces
SMOOTHED_OPERATIONS = frozenset(_ELEMENTWISE) | frozenset(_WITH_ORIGINAL)

# position of the positional ``inplace`` flag of the functional forms
_INPLACE_FLAG_POSITION = {"relu": 1, "relu6": 1, "hardtanh": 3, "leaky_relu": 2,
                          "hardsigmoid": 1, "hardswish": 1, "rrelu": 4}


def op_name(func: Callable) -> Optional[str]:
    """Canonical name of a torch function or Tensor method: ``F._max_pool2d`` ->
    ``max_pool2d``, ``Tensor.relu_`` -> ``relu_`` (in-place keeps its ``_``)."""
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        return None
    if name.startswith("__") and name.endswith("__"):
        return name
    return name.lstrip("_")


def _is_inplace(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    if name.endswith("_") and not name.endswith("__"):
        return True
    if kwargs.get("inplace", False):
        return True
    # F.relu(x, True), F.hardtanh(x, lo, hi, True), F.leaky_relu(x, a, True), ...
    pos = _INPLACE_FLAG_POSITION.get(name)
    return pos is not None and len(args) > pos and isinstance(args[pos], bool) and args[pos]


class SmoothingMode(TorchFunctionMode):
    """Redirects non-smooth torch functions to their smooth surrogates while active."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        if name is None:
            return func(*args, **kwargs)
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        handler = _ELEMENTWISE.get(base)
        with_original = _WITH_ORIGINAL.get(base) if handler is None else None
        if handler is None and with_original is None:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        if with_original is not None:
            return with_original(args, kwargs, self.beta, func)
        clean_kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        clean_args = args
        pos = _INPLACE_FLAG_POSITION.get(base)
        if pos is not None and len(args) > pos:
            clean_args = args[:pos]
        if _is_inplace(name, args, kwargs):
            # the surrogates save their input for backward: give them a copy,
            # then overwrite x as the in-place op would have
            clean_args = (x.clone(),) + tuple(clean_args[1:])
            if "input" in clean_kwargs:
                clean_kwargs["input"] = x.clone()
            return x.copy_(handler(clean_args, clean_kwargs, self.beta))
        return handler(clean_args, clean_kwargs, self.beta)


def _validate_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
    return float(beta)


@contextlib.contextmanager
def smooth_model(model: nn.Module, beta: float = 10.0) -> Iterator[nn.Module]:
    r"""
    Temporarily replace every non-smooth operation of ``model`` with a smooth one.

    Piecewise-linear networks (ReLU, max pooling, clamps, ...) have a zero
    Hessian almost everywhere plus deltas on their kinks, so second-order
    methods (Integrated/Expected Hessians, HOPE) see no interactions or wrong
    ones. Janizek et al. explain ReLU networks through the Softplus(beta)
    network, which tends to the ReLU network as beta grows; this context
    manager does the same for every common non-smooth operation:

    - ReLU (``nn.ReLU`` modules are swapped for ``nn.Softplus(beta)``; the
      calls ``F.relu``, ``torch.relu``, ``Tensor.relu`` and in-place forms
      become ``softplus``);
    - ReLU6, Hardtanh, ``clamp``/``clip`` (functional, method and in-place
      forms, scalar or tensor bounds), ``clamp_min``/``clamp_max``;
    - ``abs``; LeakyReLU, PReLU, RReLU (eval); Hardsigmoid, Hardswish;
    - ``torch.maximum``/``minimum``/``fmax``/``fmin`` and ``torch.max``/``min``
      with a second tensor;
    - the reductions ``max``/``min`` (with or without ``dim``) and
      ``amax``/``amin``;
    - max pooling, 1-, 2- and 3-d, plain (any padding, stride, dilation,
      ``ceil_mode``) and adaptive, as modules or functional calls.

    Binary maxima use ``b + softplus_beta(a - b)`` (so ``maximum(x, 0)`` is
    exactly the softplus of ReLU); pooling and max reductions use the
    softmax-weighted mean ``sum softmax(beta v) v`` over each window, which lies
    between the mean and the max and tends to the max as ``beta`` grows. All
    surrogates are infinitely differentiable. ``beta`` is in the units of the
    values the operation sees (a kink is smoothed over about ``1 / beta``).

    Functional calls are redirected only during the model's own forward, so
    code outside it is unaffected. Everything is restored on exit, also when
    the block raises. Operations without a smooth surrogate (sorting, top-k,
    rounding, comparisons feeding ``where``, ...) are left alone; Integrated
    and Expected Hessians warn about them when they meet them (use
    :class:`~captum_interactions.SmoothHess`, which needs no smoothness, for
    such models).

    Args:
        model (nn.Module): the model to modify in place for the block's duration.
        beta (float, optional): sharpness of the surrogates, a finite number
            > 0, e.g. ``softplus(x) = log(1 + exp(beta x)) / beta``.
            Default: 10.0

    Yields:
        nn.Module: ``model`` itself (with the smooth operations).

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.ReLU(),
        ...                             torch.nn.MaxPool1d(2), torch.nn.Flatten(),
        ...                             torch.nn.Linear(6, 1))
        >>> with smooth_model(model, beta=10.0):
        ...     gamma = IntegratedHessians(model).attribute(torch.randn(3, 1, 14))
        >>> gamma.shape
        torch.Size([3, 1, 14, 1, 14])

    Paper: https://jmlr.org/papers/v22/20-1223.html (the softplus swap, §4.3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    beta = _validate_beta(beta)
    replaced: List[Tuple[nn.Module, str, nn.Module]] = []
    handles = []
    mode_stack: List[SmoothingMode] = []

    def enter_mode(module: nn.Module, args: Any) -> None:
        mode = SmoothingMode(beta)
        mode.__enter__()
        mode_stack.append(mode)

    def exit_mode(module: nn.Module, args: Any, output: Any) -> None:
        if mode_stack:
            mode_stack.pop().__exit__(None, None, None)

    try:
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.ReLU:
                    softplus = nn.Softplus(beta=beta)
                    softplus.train(child.training)
                    setattr(parent, name, softplus)
                    replaced.append((parent, name, child))
        handles.append(model.register_forward_pre_hook(enter_mode))
        handles.append(model.register_forward_hook(exit_mode, always_call=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        while mode_stack:
            mode_stack.pop().__exit__(None, None, None)
        for parent, name, child in reversed(replaced):
            setattr(parent, name, child)


@contextlib.contextmanager
def replace_relu_with_softplus(model: nn.Module, beta: float = 10.0) -> Iterator[nn.Module]:
    r"""
    Temporarily replace ReLU (and every other common non-smooth operation) of
    ``model`` with a smooth surrogate: the earlier name of :func:`smooth_model`,
    kept working with the same behaviour.

    ``nn.ReLU`` becomes ``nn.Softplus(beta)`` and ``F.relu``/``torch.relu``/
    ``Tensor.relu`` become ``softplus``, as in Janizek et al.; max pooling,
    clamps, ``abs``, leaky/parametric ReLU and ``maximum``/``minimum`` are
    smoothed as well (see :func:`smooth_model` for the surrogates), since a
    model that is smooth except for them still has delta Hessians.

    Args:
        model (nn.Module): the model to modify in place for the block's duration.
        beta (float, optional): sharpness of the softplus,
            ``softplus(x) = log(1 + exp(beta x)) / beta``. Default: 10.0

    Yields:
        nn.Module: ``model`` itself (with the swapped activations).

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(),
        ...                             torch.nn.Linear(4, 1))
        >>> with replace_relu_with_softplus(model, beta=5.0):
        ...     gamma = IntegratedHessians(model).attribute(torch.randn(3, 2))
        >>> type(model[1]).__name__
        'ReLU'
    """
    with smooth_model(model, beta) as smoothed:
        yield smoothed


__all__ = ["smooth_model", "replace_relu_with_softplus", "SMOOTHED_OPERATIONS", "op_name"]
