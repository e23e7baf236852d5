#!/usr/bin/env python3
"""Detect non-smooth operations in a model's forward pass, and warn once per call.

Second-order methods (Integrated/Expected Hessians) are only meaningful on a
model that is twice differentiable along the path. The first forward of a call
that differentiates its inputs runs under a ``TorchFunctionMode`` that follows
which tensors depend on the differentiated inputs (the leaf tensors that
require grad and are not parameters) and records

- non-smooth operations applied to input-dependent values (ReLU family, max
  pooling, clamps, ``abs``, ``maximum``/``minimum``, sorting, rounding, ...);
- piecewise-constant dependence: a comparison, ``argmax``, ``detach`` or an
  integer cast of an input-dependent value that is then used to compute a
  floating point value (``where``, masks, indexing);
- whether the output depends differentiably on the inputs at all.

The mode is removed after that forward, so the rest of the call runs at full
speed.
"""
import collections
import contextlib
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from captum_interactions._utils.smoothing import SMOOTHED_OPERATIONS, op_name


class NonSmoothModelWarning(UserWarning):
    """The model is not smooth enough for the method: not twice differentiable
    along the path (Integrated and Expected Hessians), not differentiable at the
    expansion point (HOPE, on a kink), not continuous (SmoothHess), or not
    differentiable in its inputs at all. The message names the operations."""


# kinks or jumps: zero Hessian almost everywhere plus deltas (or worse)
_NONSMOOTH = frozenset(SMOOTHED_OPERATIONS) | frozenset(
    {
        "threshold", "hardshrink", "softshrink",
        "fractional_max_pool2d", "fractional_max_pool3d",
        "fractional_max_pool2d_with_indices", "fractional_max_pool3d_with_indices",
        "max_unpool1d", "max_unpool2d", "max_unpool3d",
        "sort", "msort", "topk", "kthvalue", "median", "nanmedian", "quantile",
        "nanquantile", "cummax", "cummin", "mode",
        "remainder", "fmod", "frac",
    }
)
# zero gradient: the result carries no derivative of its input
_ZERO_GRADIENT = frozenset(
    {"round", "floor", "ceil", "trunc", "fix", "sign", "sgn", "heaviside", "detach",
     "argmax", "argmin", "argsort", "bucketize", "searchsorted"}
)
# functions that only read metadata or run no computation
_IGNORED = frozenset({"__get__", "__set__", "dim", "size", "numel", "_set_grad_enabled",
                      "is_floating_point", "is_complex", "stride", "data_ptr",
                      "requires_grad_", "element_size", "__len__", "__repr__", "__format__",
                      "register_hook", "retain_grad"})

_FLAGGED = _NONSMOOTH | _ZERO_GRADIENT
# no kink, but no derivative passes: reported apart from the non-smooth ops
_GRADIENT_CUTS = frozenset({"detach"})
# discontinuous (jumps): what methods built on gradients alone, which stand
# kinks (SmoothHess), cannot stand
_JUMPS = (_ZERO_GRADIENT - _GRADIENT_CUTS) | frozenset(
    {"remainder", "fmod", "frac", "hardshrink", "threshold"}
)
_DIFF = "diff"


def _leaves(args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> List[Any]:
    """The leaves of ``(args, kwargs)``, as ``tree_flatten`` gives them.

    Runs for every op of the inspected forward: arguments that are tensors,
    numbers or flat tuples/lists of them are read directly, anything else goes
    through ``tree_flatten``.
    """
    leaves: List[Any] = []
    for value in (args, tuple(kwargs.values()) if kwargs else ()):
        for item in value:
            if isinstance(item, (tuple, list)):
                if all(isinstance(i, _FLAT_LEAF) for i in item):
                    leaves.extend(item)
                else:
                    leaves.extend(tree_flatten(item)[0])
            elif isinstance(item, _FLAT_LEAF) or item is None:
                leaves.append(item)
            else:
                leaves.extend(tree_flatten(item)[0])
    return leaves


# leaves that tree_flatten returns as themselves
_FLAT_LEAF = (Tensor, int, float, bool, str, torch.dtype, torch.device)


class _Dependence(TorchFunctionMode):
    """Follows input dependence through torch functions and records non-smooth ops."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (weakref, origin): origin None = differentiable dependence on the
        # inputs; otherwise the name of the op that cut the derivative
        self._tracked: Dict[int, Tuple[Any, Optional[str]]] = {}
        self.saw_source = False
        self.nonsmooth: "collections.Counter[str]" = collections.Counter()
        self.steps: "collections.Counter[str]" = collections.Counter()
        self.cuts: "collections.Counter[str]" = collections.Counter()

    def _mark(self, t: Tensor, origin: Optional[str]) -> None:
        try:
            ref = weakref.ref(t)
        except TypeError:
            return
        old = self._tracked.get(id(t))
        if old is not None and old[0]() is t and old[1] is None:
            return  # keep differentiable dependence
        self._tracked[id(t)] = (ref, origin)

    def state(self, t: Any) -> Any:
        """None (independent of the inputs), _DIFF, or the name of a cutting op."""
        if not isinstance(t, Tensor):
            return None
        entry = self._tracked.get(id(t))
        if entry is not None and entry[0]() is t:
            return _DIFF if entry[1] is None else entry[1]
        if t.requires_grad and t.grad_fn is None and not isinstance(t, nn.Parameter):
            # a leaf that requires grad and is no parameter: an input being
            # differentiated (the path points, or a layer's injected activations)
            self.saw_source = True
            self._mark(t, None)
            return _DIFF
        return None

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if name is None or name in _IGNORED:
            if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == (
                "data"
            ):
                self._record(args, kwargs, out, "detach")
            return out
        self._record(args, kwargs, out, name)
        return out

    def _record(self, args: Any, kwargs: Any, out: Any, name: str) -> None:
        pairs = []
        for t in _leaves(args, kwargs):
            state = self.state(t)
            if state is not None:
                pairs.append((t, state))
        if not pairs:
            return
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        differentiable = any(s == _DIFF for _, s in pairs)
        cuts = [s for _, s in pairs if s != _DIFF]
        if differentiable and base in _GRADIENT_CUTS:
            self.cuts[base] += 1
        elif differentiable and base in _FLAGGED:
            self.nonsmooth[base] += 1
        outputs = [o for o in _leaves((out,), None) if isinstance(o, Tensor)]
        floating_out = any(o.is_floating_point() or o.is_complex() for o in outputs)
        steps = [s for t, s in pairs if s != _DIFF and not t.is_floating_point()]
        if steps and floating_out and base not in _ZERO_GRADIENT:
            # a piecewise-constant function of the inputs (a mask, an index)
            # enters a floating point computation: a jump along the path
            self.steps[f"{steps[0]} (used by {base})"] += 1
        for o in outputs:
            if base in _ZERO_GRADIENT:
                self._mark(o, base)
            elif not (o.is_floating_point() or o.is_complex()):
                self._mark(o, base if differentiable else cuts[0])
            elif differentiable:
                self._mark(o, None)
            else:
                self._mark(o, cuts[0])


def _reaches_a_source(output: Tensor, sources: List[Tensor]) -> bool:
    """Whether the autograd graph of ``output`` reaches one of ``sources``."""
    targets = {id(s) for s in sources}
    if id(output) in targets:
        return True
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _format_counts(counts: "collections.Counter[str]") -> str:
    return ", ".join(
        f"{name} (x{n})" if n > 1 else name for name, n in sorted(counts.items())
    )


def _cut_parts(method: str, mode: _Dependence, disconnected: Optional[str],
               consequence: str) -> List[str]:
    """What every method reports: an output independent of the inputs (with the
    ``consequence`` for the method) and gradients cut on input-dependent values."""
    parts = []
    if disconnected is not None:
        parts.append(
            f"{method}: the selected output does not depend differentiably on the "
            f"inputs ({disconnected}): {consequence}"
        )
    if mode.cuts:
        parts.append(
            f"{method}: the gradient is cut on input-dependent values by "
            f"{_format_counts(mode.cuts)}: the derivatives through them are missing."
        )
    return parts


def _jump_message(method: str, mode: _Dependence, disconnected: Optional[str]) -> Optional[str]:
    """For methods that need a continuous model only (kinks are fine)."""
    parts = _cut_parts(method, mode, disconnected, "its gradients are zero, so the "
                       "estimate is zero whatever the model computes.")
    jumps = collections.Counter({n: c for n, c in mode.nonsmooth.items() if n in _JUMPS})
    why = ("Stein's identity on gradients holds for continuous models: a jump adds a "
           "delta to the gradient that no gradient call sees, so the estimate misses "
           "the jumps' share of the smoothed Hessian.")
    if jumps:
        parts.append(
            f"{method}: the model is discontinuous in its inputs: "
            f"{_format_counts(jumps)} on input-dependent values. {why} Fix: make these "
            "operations continuous (e.g. no rounding of input-dependent values)."
        )
    if mode.steps:
        # a mask selects pieces, which may or may not meet at its threshold
        parts.append(
            f"{method}: piecewise-constant masks or indices of input-dependent values "
            f"enter the computation ({_format_counts(mode.steps)}): the model jumps at "
            "their thresholds unless the pieces they select meet there (x * (x > 0) is "
            f"continuous, x + (x > 0) is not). {why} Fix: where the pieces do not meet, "
            "use a continuous form (e.g. a sigmoid instead of a step)."
        )
    return " ".join(parts) if parts else None


def _message(method: str, mode: _Dependence, disconnected: Optional[str]) -> Optional[str]:
    parts = _cut_parts(method, mode, disconnected, "its gradient and Hessian are zero, so "
                       "the interactions are zero whatever the model computes.")
    found = collections.Counter(mode.nonsmooth)
    found.update(mode.steps)
    if found:
        smoothable = sorted(n for n in mode.nonsmooth if n in SMOOTHED_OPERATIONS)
        others = sorted(set(found) - set(smoothable))
        text = (
            f"{method}: the model is not twice differentiable along the path: "
            f"non-smooth operations on input-dependent values in the forward pass: "
            f"{_format_counts(found)}. Their Hessian is zero almost everywhere plus "
            "deltas on the kinks, which the quadrature does not see: the "
            "interactions are wrong (row sums need not equal Integrated Gradients) "
            "even when the completeness error is small."
        )
        fixes = []
        if smoothable:
            fixes.append(
                "run the call inside `with captum_interactions.smooth_model(model, "
                f"beta=...)`, which replaces {', '.join(smoothable)} by smooth "
                "surrogates"
            )
        if others:
            fixes.append(
                f"{', '.join(others)} ha{'s' if len(others) == 1 else 've'} no smooth "
                "surrogate there: rewrite them smoothly"
            )
        fixes.append(
            "or use captum_interactions.SmoothHess, which explains non-smooth "
            "models through Gaussian smoothing"
        )
        parts.append(text + " Fix: " + "; ".join(fixes) + ".")
    return " ".join(parts) if parts else None


class _FirstForwardCheck:
    """Wraps a forward function: its first differentiated call is inspected."""

    def __init__(self, forward_func: Callable, method: str, jumps_only: bool = False) -> None:
        self.forward_func = forward_func
        self.__wrapped__ = forward_func  # the model stays findable behind the wrapper
        self.method = method
        self.jumps_only = jumps_only
        self.done = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a call without autograd (a completeness forward) differentiates
        # nothing: it is passed through, and the next call is still inspected
        if self.done or not torch.is_grad_enabled():
            return self.forward_func(*args, **kwargs)
        mode = _Dependence()
        with mode:
            output = self.forward_func(*args, **kwargs)
        if mode.saw_source:
            self.done = True
            self._report(mode, output)
        return output

    def _report(self, mode: _Dependence, output: Any) -> None:
        outputs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
        if outputs and not any(o.requires_grad for o in outputs):
            return  # the method raises its own error: nothing to differentiate
        disconnected = None
        states = [mode.state(o) for o in outputs]
        if outputs and _DIFF not in states and any(o.requires_grad for o in outputs):
            cuts = sorted({s for s in states if s is not None})
            if cuts:
                disconnected = "it reaches them only through " + ", ".join(cuts)
            else:
                sources = [
                    t for t, origin in (
                        (entry[0](), entry[1]) for entry in mode._tracked.values()
                    ) if t is not None and origin is None and t.grad_fn is None
                ]
                if not any(_reaches_a_source(o, sources) for o in outputs):
                    disconnected = "it does not reach them in the autograd graph"
        message = (_jump_message if self.jumps_only else _message)(
            self.method, mode, disconnected)
        if message is not None:
            warnings.warn(message, NonSmoothModelWarning, stacklevel=2)


@contextlib.contextmanager
def checked_smoothness(
    attribution: Any, method: Optional[str] = None, jumps_only: bool = False
) -> Iterator[None]:
    """Inspect the first differentiated forward of ``attribution``'s call.

    ``attribution.forward_func`` is wrapped for the block (and restored after,
    also when the block raises); the first forward that differentiates its
    inputs runs under :class:`_Dependence`, and a :class:`NonSmoothModelWarning`
    names what it found, once. ``jumps_only``: report what breaks a method that
    needs a continuous model only (jumps, cut gradients, an output independent
    of the inputs), not kinks.
    """
    original = attribution.forward_func
    check = _FirstForwardCheck(original, method or type(attribution).__name__, jumps_only)
    attribution.forward_func = check
    try:
        yield
    finally:
        attribution.forward_func = original


__all__ = ["NonSmoothModelWarning", "checked_smoothness"]
