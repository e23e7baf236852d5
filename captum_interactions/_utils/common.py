#!/usr/bin/env python3
"""Input, baseline, target and model-state helpers shared by every method.

They wrap Captum's own formatting helpers (``captum._utils.common``,
``captum.attr._utils.common``) and turn Captum's assertions into ``ValueError``/
``TypeError`` messages that name the offending argument.
"""
import contextlib
import functools
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from captum._utils.common import (
    _select_targets,
    _expand_additional_forward_args,
    _expand_target,
    _format_additional_forward_args,
    _format_tensor_into_tuples,
)
from captum._utils.typing import BaselineType, TargetType
from captum.attr._utils.common import _format_callable_baseline
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook


def format_inputs(
    inputs: Any, name: str = "inputs", allow_integer: bool = False
) -> Tuple[Tensor, ...]:
    """Tensor or tuple of tensors -> tuple of tensors (batch first), validated.

    Floating point only, unless ``allow_integer`` (token ids for an embedding,
    for methods that do not differentiate the inputs)."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple) or len(inputs) == 0:
        raise TypeError(
            f"`{name}` must be a tensor or a non-empty tuple of tensors, "
            f"got {type(inputs).__name__}"
        )
    for i, inp in enumerate(inputs):
        if not isinstance(inp, Tensor):
            raise TypeError(
                f"`{name}[{i}]` must be a torch.Tensor, got {type(inp).__name__}"
            )
        if inp.dim() < 1:
            raise ValueError(
                f"`{name}[{i}]` must have a batch dimension (shape (N, ...)), "
                f"got a 0-d tensor"
            )
        if allow_integer:
            if inp.dtype == torch.bool or inp.is_complex():
                raise TypeError(
                    f"`{name}[{i}]` must be floating point (features) or integer (token "
                    f"ids for an embedding), got dtype {inp.dtype}"
                )
        elif not inp.is_floating_point():
            raise TypeError(
                f"`{name}[{i}]` must be a floating point tensor to be "
                f"differentiated, got dtype {inp.dtype}"
            )
    n = inputs[0].shape[0]
    if n == 0:
        raise ValueError(
            f"`{name}` has no examples (batch size 0); every method needs at least "
            "one example (there is no empty result)"
        )
    for i, inp in enumerate(inputs):
        if inp.shape[0] != n:
            raise ValueError(
                f"every tensor in `{name}` must have the same batch size; "
                f"`{name}[0]` has {n} examples but `{name}[{i}]` has {inp.shape[0]}"
            )
    return inputs


def format_baselines(
    baselines: BaselineType, inputs: Tuple[Tensor, ...]
) -> Tuple[Tensor, ...]:
    """Captum ``BaselineType`` -> tuple of tensors of exactly ``inputs``' shapes.

    ``None`` means zeros; scalars, per-example tensors and batch-1 tensors are
    broadcast as in Captum's IntegratedGradients.
    """
    if baselines is None:
        return tuple(torch.zeros_like(inp) for inp in inputs)
    if not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        raise ValueError(
            f"`baselines` must have one entry per input tensor: got "
            f"{len(baselines)} baselines for {len(inputs)} inputs"
        )
    formatted = []
    for i, (base, inp) in enumerate(zip(baselines, inputs)):
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            formatted.append(torch.full_like(inp, float(base)))
            continue
        if not isinstance(base, Tensor):
            raise TypeError(
                f"`baselines[{i}]` must be a tensor or a number, got "
                f"{type(base).__name__}"
            )
        base = base.to(device=inp.device, dtype=inp.dtype)
        if base.shape == inp.shape[1:]:
            base = base.unsqueeze(0)
        if base.dim() != inp.dim() or base.shape[1:] != inp.shape[1:] or (
            base.shape[0] not in (1, inp.shape[0])
        ):
            raise ValueError(
                f"`baselines[{i}]` has shape {tuple(base.shape)}, expected "
                f"{tuple(inp.shape)} (per example) or "
                f"{(1,) + tuple(inp.shape[1:])} (one baseline for the batch) "
                f"to match `inputs[{i}]`"
            )
        formatted.append(base.expand_as(inp))
    return tuple(formatted)


def format_baseline_distribution(
    baselines: Union[BaselineType, Callable[..., Any]],
    inputs: Tuple[Tensor, ...],
    original_inputs: Any,
) -> Tuple[Tensor, ...]:
    """Baselines drawn from a distribution (Captum's GradientShap convention).

    ``baselines`` is a tensor (or tuple) of shape (B, *F_i) holding B reference
    samples, or a callable returning one (called with the inputs if it takes
    arguments). Scalars give a one-sample distribution.
    """
    if baselines is None:
        raise ValueError(
            "`baselines` is required: pass a tensor (or tuple of tensors) of "
            "reference samples of shape (B, *input_shape), or a callable "
            "returning one"
        )
    if callable(baselines) and not isinstance(baselines, Tensor):
        baselines = _format_callable_baseline(baselines, original_inputs)
    if not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        raise ValueError(
            f"`baselines` must have one entry per input tensor: got "
            f"{len(baselines)} baselines for {len(inputs)} inputs"
        )
    formatted = []
    n_refs = None
    for i, (base, inp) in enumerate(zip(baselines, inputs)):
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            base = torch.full_like(inp[:1], float(base))
        if not isinstance(base, Tensor):
            raise TypeError(
                f"`baselines[{i}]` must be a tensor or a number, got "
                f"{type(base).__name__}"
            )
        base = base.to(device=inp.device, dtype=inp.dtype)
        if base.dim() != inp.dim() or base.shape[1:] != inp.shape[1:]:
            raise ValueError(
                f"`baselines[{i}]` has shape {tuple(base.shape)}; a baseline "
                f"distribution for `inputs[{i}]` must have shape "
                f"(B, {', '.join(map(str, inp.shape[1:]))})"
            )
        if n_refs is not None and base.shape[0] not in (1, n_refs):
            raise ValueError(
                "every tensor in `baselines` must hold the same number of "
                f"reference samples, got {n_refs} and {base.shape[0]}"
            )
        n_refs = max(n_refs or 1, base.shape[0])
        formatted.append(base)
    assert n_refs is not None
    return tuple(b.expand((n_refs,) + b.shape[1:]) for b in formatted)


def validate_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def validate_internal_batch_size(internal_batch_size: Optional[int]) -> None:
    if internal_batch_size is not None:
        validate_positive_int(internal_batch_size, "internal_batch_size")


def validate_target(target: TargetType, num_examples: int) -> None:
    """Captum's target forms; list/tensor targets must have one entry per example."""
    if target is None or isinstance(target, (int, tuple)):
        return
    if isinstance(target, Tensor):
        if target.numel() > 1 and (target.dim() != 1 or target.numel() != num_examples):
            raise ValueError(
                f"`target` as a tensor must be a scalar or have shape "
                f"({num_examples},), got shape {tuple(target.shape)}"
            )
        return
    if isinstance(target, list):
        if len(target) != num_examples:
            raise ValueError(
                f"`target` as a list must have one entry per example "
                f"({num_examples}), got {len(target)}"
            )
        return
    raise TypeError(
        "`target` must be None, an int, a tuple, a tensor or a list, got "
        f"{type(target).__name__}"
    )


def _target_indices(target: TargetType) -> List[Tuple[int, ...]]:
    """Every index tuple a Captum target selects (ints as 1-tuples)."""
    if target is None:
        return []
    if isinstance(target, int):
        return [(target,)]
    if isinstance(target, tuple):
        return [tuple(int(t) for t in target)]
    if isinstance(target, Tensor):
        return [(int(t),) for t in target.reshape(-1).tolist()]
    if isinstance(target, list):
        out: List[Tuple[int, ...]] = []
        for t in target:
            out += _target_indices(t)
        return out
    return []


def check_target_range(target: TargetType, output_shape: Sequence[int]) -> None:
    """Every index of ``target`` must lie inside the per-example output shape."""
    for index in _target_indices(target):
        if len(index) > len(output_shape):
            raise ValueError(
                f"`target`={target!r} has {len(index)} indices but the model output "
                f"has shape {tuple(output_shape)} per example"
            )
        for k, size in zip(index, output_shape):
            if not -size <= k < size:
                raise ValueError(
                    f"`target`={target!r} is out of range: the model output has "
                    f"shape {tuple(output_shape)} per example, so target indices "
                    f"must lie in [{-size}, {size - 1}] (got {k})"
                )


def model_parameter_dtypes(forward_func: Callable) -> List[torch.dtype]:
    """Floating dtypes of the parameters and buffers behind ``forward_func``."""
    dtypes = set()
    for root in model_modules(forward_func):
        for t in list(root.parameters()) + list(root.buffers()):
            if t.is_floating_point():
                dtypes.add(t.dtype)
    return sorted(dtypes, key=str)


@contextlib.contextmanager
def explained_dtype_errors(
    forward_func: Callable, inputs: Sequence[Tensor], name: str = "inputs"
) -> Iterator[None]:
    """Turn torch's dtype mismatch from deep inside the model into a TypeError
    naming the argument, its dtype and the model's."""
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        if "dtype" not in message.lower() and "type" not in message.lower():
            raise
        model_dtypes = model_parameter_dtypes(forward_func)
        for i, inp in enumerate(inputs):
            if not isinstance(inp, Tensor):
                continue
            if model_dtypes and not inp.is_floating_point():
                raise TypeError(
                    f"`{name}[{i}]` is an integer tensor ({inp.dtype}) but the model "
                    f"computes in {', '.join(map(str, model_dtypes))}: integer inputs are "
                    "only meaningful as token ids consumed by an embedding layer. Pass "
                    f"floating point inputs (e.g. `.to({model_dtypes[0]})`). Torch said: "
                    f"{message.splitlines()[0]}"
                ) from err
            if model_dtypes and inp.dtype not in model_dtypes:
                kind = "floating point"
                raise TypeError(
                    f"`{name}[{i}]` has dtype {inp.dtype} ({kind}) but the model's "
                    f"parameters are {', '.join(map(str, model_dtypes))}: cast the "
                    f"inputs (e.g. `.to({model_dtypes[0]})`) or the model (e.g. "
                    f"`model.to({inp.dtype})`) so that they match. Torch said: "
                    f"{message.splitlines()[0]}"
                ) from err
        raise


def run_scalar_forward(
    forward_func: Callable,
    inputs: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
) -> Tensor:
    """Run the model, select ``target`` with Captum's semantics, return shape (rows,).

    Raises a ``ValueError`` naming ``target`` when it is out of the range of the
    model's output, or when the selected output is not one scalar per example
    (for instance a multi-output model called without ``target``), and a
    ``TypeError`` when the inputs' dtype does not match the model's.
    """
    # Captum's _run_forward, without its inspect.signature per call (a forward
    # function without parameters cannot depend on the inputs anyway)
    args = _format_additional_forward_args(additional_forward_args)
    with explained_dtype_errors(forward_func, inputs):
        output = forward_func(*inputs, *args) if args is not None else forward_func(*inputs)
    if not isinstance(output, Tensor):
        raise TypeError(
            f"the forward function must return a tensor, got {type(output).__name__}"
        )
    rows = inputs[0].shape[0]
    if target is not None:
        if output.dim() < 2 or output.shape[0] != rows:
            raise ValueError(
                f"`target`={target!r} selects from an output of shape (N, ...), but "
                f"the forward function returned shape {tuple(output.shape)} for a "
                f"batch of {rows}"
            )
        check_target_range(target, tuple(output.shape[1:]))
        output = _select_targets(output, target)
    if output.dim() == 0 and rows == 1:
        output = output.reshape(1)
    if output.dim() == 2 and output.shape[1] == 1:
        output = output[:, 0]
    if output.dim() != 1 or output.shape[0] != rows:
        per_example = (
            tuple(output.shape[1:]) if output.dim() >= 1 and output.shape[0] == rows
            else tuple(output.shape)
        )
        hint = (
            " Pass `target` to select one output per example."
            if target is None
            else f" `target`={target!r} does not select one scalar per example."
        )
        raise ValueError(
            "the forward function must give one scalar per example after "
            f"target selection; it gives an output of shape {per_example} per "
            f"example.{hint}"
        )
    return output


class RowExpansion:
    """``target`` and ``additional_forward_args`` repeated for ``n_copies`` of a batch.

    Rows are ordered copy-major (row = copy * N + example), Captum's ``repeat``
    expansion, so any contiguous range of whole copies can be sliced out.
    """

    def __init__(
        self,
        target: TargetType,
        additional_forward_args: Any,
        num_examples: int,
        n_copies: int,
    ) -> None:
        self.num_examples = num_examples
        self.target = _expand_target(target, n_copies)
        self.additional_forward_args = _expand_additional_forward_args(
            _format_additional_forward_args(additional_forward_args), n_copies
        )

    def rows(self, start: int, stop: int) -> Tuple[TargetType, Any]:
        target = self.target
        if isinstance(target, list) or (
            isinstance(target, Tensor) and target.numel() > 1
        ):
            target = target[start:stop]
        args = self.additional_forward_args
        if args is not None:
            args = tuple(
                a[start:stop] if isinstance(a, Tensor) and a.dim() > 0 else a
                for a in args
            )
        return target, args


def _modules_referenced(obj: Any, depth: int, found: Dict[int, torch.nn.Module]) -> None:
    """nn.Modules reachable from a callable: itself, a bound method's owner, a
    ``functools.partial``'s parts, what it wraps (``__wrapped__``), closure cells
    and the globals its code names."""
    if isinstance(obj, torch.nn.Module):
        found.setdefault(id(obj), obj)
        return
    if depth <= 0 or obj is None:
        return
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        found.setdefault(id(owner), owner)
    if isinstance(obj, functools.partial):
        for part in (obj.func,) + tuple(obj.args) + tuple(obj.keywords.values()):
            _modules_referenced(part, depth - 1, found)
        return
    wrapped = getattr(obj, "__wrapped__", None)  # functools.wraps and our wrappers
    if wrapped is not None:
        _modules_referenced(wrapped, depth - 1, found)
    function = getattr(obj, "__func__", obj)
    code = getattr(function, "__code__", None)
    if code is None:
        return
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        _modules_referenced(value, depth - 1, found)
    namespace = getattr(function, "__globals__", {})
    for name in code.co_names:
        value = namespace.get(name)
        if isinstance(value, torch.nn.Module) or callable(value) and (
            getattr(value, "__code__", None) is not None
        ):
            _modules_referenced(value, depth - 1, found)


def model_modules(forward_func: Callable) -> List[torch.nn.Module]:
    """The ``nn.Module``s behind ``forward_func``: the module itself, a bound
    method's owner, or the modules a function (a lambda, a ``functools.partial``)
    refers to through its closure or the globals it names."""
    found: Dict[int, torch.nn.Module] = {}
    _modules_referenced(forward_func, 3, found)
    return list(found.values())


def _check_batch_independent(module: torch.nn.Module) -> None:
    if isinstance(module, _BatchNorm) and (
        module.running_mean is None or module.running_var is None
    ):
        raise ValueError(
            f"the model's {type(module).__name__} has no running statistics "
            "(track_running_stats=False), so it normalizes with the statistics of "
            "the batch it is given: one example's result would depend on the other "
            "examples and on the path points batched with it. Give it running "
            "statistics (track_running_stats=True, after training) or use a "
            "per-example normalization (LayerNorm, GroupNorm, InstanceNorm)"
        )


class _ModuleSnapshot:
    """Train/eval flags and buffers of modules, restored bit for bit on demand."""

    def __init__(self) -> None:
        self.seen: Set[int] = set()
        self.flags: List[Tuple[torch.nn.Module, bool]] = []
        self.buffers: List[Tuple[torch.nn.Module, str, Tensor, Tensor]] = []

    def add(self, module: torch.nn.Module) -> bool:
        if id(module) in self.seen:
            return False
        self.seen.add(id(module))
        self.flags.append((module, module.training))
        for name, buf in module._buffers.items():
            if buf is not None:
                self.buffers.append((module, name, buf, buf.detach().clone()))
        return True

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, buf, saved in self.buffers:
                if module._buffers.get(name) is not buf:
                    module._buffers[name] = buf
                if buf.shape != saved.shape:
                    buf.data = saved
                elif not torch.equal(buf, saved):
                    buf.copy_(saved)
        for module, flag in self.flags:
            if module.training != flag:  # (nn.Module.__setattr__ is not free)
                module.training = flag


@contextlib.contextmanager
def preserved_module_state(
    forward_func: Callable, eval_mode: bool = False
) -> Iterator[None]:
    """Leave the model as it was: train/eval flags and buffers (BatchNorm running
    statistics, counters) are restored bit for bit, even if the body raises.

    With ``eval_mode``, every module runs in eval mode inside the block (dropout
    off, BatchNorm on its running statistics), so that one example's result does
    not depend on the other rows of the batch; modules the forward function
    reaches without ``model_modules`` finding them are switched (and restored)
    when they are first called. BatchNorm without running statistics raises a
    ``ValueError``, since it would mix the rows of a batch in any mode.
    """
    snapshot = _ModuleSnapshot()
    handle = None
    try:
        for root in model_modules(forward_func):
            for module in root.modules():
                if snapshot.add(module) and eval_mode:
                    _check_batch_independent(module)
                    if module.training:
                        module.training = False
        if eval_mode:

            def switch_to_eval(module: torch.nn.Module, args: Any) -> None:
                if snapshot.add(module):
                    _check_batch_independent(module)
                    if module.training:
                        module.training = False

            handle = register_module_forward_pre_hook(switch_to_eval)
        yield
    finally:
        if handle is not None:
            handle.remove()
        snapshot.restore()


def nonfinite_examples(tensor: Tensor) -> List[int]:
    """Indices along dim 0 of the rows holding a NaN or an infinity."""
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        return []
    if tensor.dim() == 0:
        return [] if bool(torch.isfinite(tensor)) else [0]
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def _shown_indices(indices: Sequence[int], limit: int = 10) -> str:
    """The first ``limit`` indices, comma-separated, then "..." if there are more."""
    return ", ".join(map(str, indices[:limit])) + (", ..." if len(indices) > limit else "")


class NonFiniteResultWarning(UserWarning):
    """An attribution holds NaN or infinite entries: the model (or its
    derivatives) was not finite where the method evaluated it, or overflowed."""


def warn_if_nonfinite(
    result: Tensor, method: str, where: str, hint: str = "",
    row_sums: Optional[Tensor] = None,
) -> None:
    """A :class:`NonFiniteResultWarning` naming the examples (rows of dim 0) of
    ``result`` that hold a NaN or an infinity; one reduction when all is finite.

    ``where``: where the method evaluates the model ("on the path from the
    baseline to the input", ...); ``hint``: a method-specific cause and fix.
    ``row_sums``: a tensor made from the sums of every row of ``result`` (such
    as the completeness delta, sum - (f(x) - f(x'))): a NaN or an infinity
    among a sum's terms makes the sum NaN or infinite, so where these are all
    finite so is ``result``, and only they are checked (N values, not N G^2)."""
    if not isinstance(result, Tensor) or not result.is_floating_point() or result.numel() == 0:
        return
    if row_sums is not None and bool(torch.isfinite(row_sums).all()):
        return
    if bool(torch.isfinite(result).all()):
        return
    warn_nonfinite_examples(
        nonfinite_examples(result), 1 if result.dim() == 0 else result.shape[0], method,
        where, result.dtype, hint, stacklevel=4,
    )


def warn_nonfinite_examples(
    bad: Sequence[int], rows: int, method: str, where: str, dtype: torch.dtype,
    hint: str = "", stacklevel: int = 3,
) -> None:
    """The :class:`NonFiniteResultWarning` of :func:`warn_if_nonfinite` for
    the examples ``bad`` (of ``rows``), where the caller found them."""
    if not bad:
        return
    warnings.warn(
        f"{method}: the result holds NaN or infinite entries for {len(bad)} of {rows} "
        f"examples (index {_shown_indices(bad)}): the model's output or its derivatives are not finite "
        f"{where} (a log or a division at 0, or an overflow in {dtype}).{hint} "
        "Check the model there; where it overflows, compute in float64 "
        "(`model.double()` and float64 inputs).",
        NonFiniteResultWarning,
        stacklevel=stacklevel,
    )


def check_finite(
    tensors: Union[Tensor, Sequence[Tensor]], name: str, what: str = "examples"
) -> None:
    """ValueError naming ``name`` and the rows (examples) with NaN/inf values."""
    if isinstance(tensors, Tensor):
        tensors = (tensors,)
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and t.is_floating_point() and bool(torch.isfinite(t).all()):
            continue  # the common case: one reduction, no per-row work
        bad = nonfinite_examples(t)
        if bad:
            label = name if len(tensors) == 1 else f"{name}[{i}]"
            raise ValueError(
                f"`{label}` holds NaN or infinite values in {what} "
                f"{_shown_indices(bad)} ({len(bad)} of {t.shape[0]}); every "
                "method would return NaN there (and, through shared batches, "
                "possibly elsewhere). Remove or replace those values."
            )


def validate_finite_positive(value: Any, name: str) -> float:
    """A finite number > 0 (e.g. a softplus beta, a noise level)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value < float("inf")
    ):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    return float(value)


def check_noise_resolution(
    stdevs: Sequence[float], inputs: Sequence[Tensor], name: str = "stdevs"
) -> None:
    """Noise below the dtype's resolution at the inputs' scale is lost in x + sigma z."""
    for i, (sigma, x) in enumerate(zip(stdevs, inputs)):
        info = torch.finfo(x.dtype)
        scale = max(1.0, float(x.detach().abs().max())) if x.numel() else 1.0
        if sigma < info.eps * scale:
            raise ValueError(
                f"`{name}`={sigma!r} (for `inputs[{i}]`) is below the resolution of "
                f"{x.dtype} at the inputs' scale ({info.eps:.3g} x {scale:.3g}): "
                "x + sigma z rounds back to x and every estimate is exactly 0. Use "
                f"`{name}` >= {info.eps * scale:.3g} (in practice much larger)"
            )


def normalize_stdevs(
    stdevs: Union[float, Sequence[float]], num_inputs: int, name: str = "stdevs"
) -> Tuple[float, ...]:
    """A positive float, or one per input tensor."""
    if isinstance(stdevs, (int, float)) and not isinstance(stdevs, bool):
        stdevs = (float(stdevs),) * num_inputs
    stdevs = tuple(stdevs)
    if len(stdevs) != num_inputs:
        raise ValueError(
            f"`{name}` must be a float or one value per input tensor "
            f"({num_inputs}), got {len(stdevs)} values"
        )
    for s in stdevs:
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not s > 0:
            raise ValueError(f"`{name}` must be > 0, got {s!r}")
        if s == float("inf"):
            raise ValueError(f"`{name}` must be finite, got {s!r}")
    return tuple(float(s) for s in stdevs)


__all__ = [
    "format_inputs",
    "format_baselines",
    "format_baseline_distribution",
    "validate_positive_int",
    "validate_internal_batch_size",
    "validate_target",
    "run_scalar_forward",
    "RowExpansion",
    "model_modules",
    "preserved_module_state",
    "normalize_stdevs",
    "check_finite",
    "nonfinite_examples",
    "validate_finite_positive",
    "check_noise_resolution",
    "check_target_range",
    "explained_dtype_errors",
    "model_parameter_dtypes",
    "_format_tensor_into_tuples",
]
