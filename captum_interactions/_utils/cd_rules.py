#!/usr/bin/env python3
"""Contextual decomposition (CD) propagation rules and the interception machinery.

Every activation of the forward pass is carried as a :class:`CDTensor`: a tensor
subclass whose data is the *true* activation (computed by the real operation on
the true inputs) and which also holds the relevant part ``rel`` (beta) and the
irrelevant part ``irr`` (gamma), with ``rel + irr == data`` to float precision.
``__torch_function__`` sees every torch call in *execution order* (module calls
reach it as ``F.linear``, ``torch.conv2d``, ``F.relu`` ...), so functional calls,
residual additions, ``x.view`` and modules used out of declaration order all
propagate correctly. Integer token ids enter as :class:`MaskedIndices`, which
only an embedding lookup may consume.

Rules (beta = relevant, gamma = irrelevant, x = beta + gamma the true input):

- affine (``linear``, ``conv1d/2d/3d``): ``W beta`` and ``W gamma`` (one call on
  both parts; the layer's total is ``W beta + W gamma + b``); the bias is
  shared per element in proportion to ``|W beta|`` and ``|W gamma|``. Where
  both are exactly 0 (e.g. a convolution window over an all-zero image region)
  the bias is shared in proportion to the L1 mass of the relevant and
  irrelevant parts of the layer's whole input for that example (evenly only if
  that input is all zero). An even split there (the ``acd`` package's choice)
  would put half of such biases into the irrelevant part of a full mask (and
  the relevant part of an empty one), breaking full mask -> (output, 0) on
  images with black backgrounds; every bias-like constant below uses the same
  tie rule;
- batch norm (eval, running statistics): ``s * beta``, ``s * gamma`` with
  ``s = weight / sqrt(running_var + eps)``; the shift
  ``bias - running_mean * s`` is shared like an affine bias;
- layer norm: each part is centred with its own mean and scaled by
  ``weight / std(x)`` (the *total* activation's standard deviation, eps
  included); the bias is shared like an affine bias. The centred parts add up to
  ``(x - mean(x)) / std(x)``, so completeness is exact;
- ReLU family (``relu``, ``leaky_relu``, ``hardtanh``/``relu6``, ``elu``):
  ``beta' = f(beta)``, ``gamma' = f(x) - f(beta)``;
- smooth elementwise (``tanh``, ``sigmoid``, ``gelu``, ``silu``, ``softplus``):
  two-player Shapley linearization of ``g(z) = f(z) - f(0)``:
  ``b = 1/2 [g(beta) + g(x) - g(gamma)]``, ``c = 1/2 [g(gamma) + g(x) - g(beta)]``
  (``b + c = f(x) - f(0)``), then the constant ``f(0)`` is shared between the
  parts in proportion to ``|b|`` and ``|c|`` (tie rule when both are 0),
  exactly like a bias. Hence ``beta' + gamma' = f(x)``, an all-relevant input keeps
  ``gamma' = 0`` and an all-irrelevant one keeps ``beta' = 0``;
- max-pool: both parts gathered at the argmax of the total (``return_indices``);
- linear bias-free ops (avg-pool, adaptive avg-pool, dropout in eval, view,
  reshape, flatten, permute, transpose, indexing, sum, mean, pad with zeros,
  dtype casts, ``matmul``/multiplication/division by a constant): applied to
  each part; ``cat``/``stack`` concatenate the parts (a plain tensor among them
  is irrelevant);
- addition: parts of CD operands are added (residual connections); a constant
  (tensor or number without parts) is shared like a bias;
- embedding: rows of the relevant tokens are relevant, the other rows irrelevant;
- LSTM (``torch.lstm``; batch-first or not, stacked, bidirectional, no
  projections): the rules of Murdoch, Liu and Yu (ICLR 2018). Gate
  pre-activations are split into relevant / irrelevant / bias terms;
  ``i``, ``g`` and ``f`` are linearized by the Shapley rule over the relevant and
  irrelevant terms with the bias always present; the cell
  ``c = f c_prev + i g`` gives ``beta_c = (f_r + f_b) beta_prev +
  i_r (g_r + g_b) + i_b g_r`` (+ ``i_b g_b`` when the step's input is relevant),
  the rest goes to gamma; ``h = o tanh(c)`` with the output gate ``o`` undivided
  and ``tanh`` split by the two-player Shapley rule. The bias-only product
  ``i_b g_b`` is shared in proportion to the L1 mass of the step's relevant and
  irrelevant input (Murdoch's rule for a binary span: relevant iff the token is
  in the phrase). A given initial state (h0, c0) is irrelevant.

Anything else that produces a tensor from a CD activation raises
:class:`UnsupportedOperationError` naming the operation.

For many masks of the same examples the activations are carried as
:class:`SharedCDTensor` instead: the relevant part of every (mask, example)
row and the true activation of every example once, the irrelevant part being
their difference. Its rules (see "shared-total representation" below) do the
arithmetic of the rules above with ``gamma = total - beta``; an operation
without one converts its operands to :class:`CDTensor` and continues with the
rules above.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

_DISABLE = torch._C.DisableTorchFunctionSubclass


class UnsupportedOperationError(ValueError):
    """An operation without a contextual decomposition rule.

    A ValueError, not a TypeError: Python turns a TypeError raised inside
    ``Tensor.__mul__`` etc. into ``NotImplemented`` and loses the message.
    """


def _row_share(rel: Tensor, irr: Tensor) -> Tensor:
    """Per example (row): |rel|_1 / (|rel|_1 + |irr|_1), 1/2 when both are 0."""
    if rel.dim() == 0:
        a, b = rel.abs(), irr.abs()
    else:
        a, b = rel.abs().reshape(rel.shape[0], -1).sum(1), irr.abs().reshape(irr.shape[0], -1).sum(1)
    total = a + b
    share = torch.where(total > 0, a / torch.where(total > 0, total, torch.ones_like(total)), 0.5)
    return share.reshape(share.shape + (1,) * max(rel.dim() - 1, 0))


def _may_tie(total: Tensor) -> bool:
    """Whether some element of the (non-negative) magnitude sum is 0. On CPU a
    fast reduction decides, so the tie rule is skipped when nothing ties; on
    other devices it is always applied, to avoid a host-device sync per layer."""
    if total.device.type != "cpu":
        return True
    return total.numel() > 0 and bool(total.amin() == 0)


def _split_constant(
    rel: Tensor, irr: Tensor, const: Any,
    tie_share: Union[None, Tensor, Callable[[], Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """Add ``const`` to the parts, shared per element in proportion to |rel|, |irr|.

    Where both are exactly 0 the share is ``tie_share`` (the relevant fraction of
    the L1 mass of the layer's input, per example; a tensor or a function that
    computes it), 1/2 if not given.
    """
    magnitude = rel.abs()
    total = magnitude + irr.abs()
    share = magnitude.div_(total)  # 0/0 = nan where both are 0: replaced next
    # total >= 0, so its minimum tells whether any element ties (a fast
    # reduction; ``(total == 0).any()`` costs several times more on CPU)
    if _may_tie(total):
        tie = 0.5 if tie_share is None else tie_share
        if callable(tie):  # computed only when some element needs it
            tie = tie()
        share = torch.where(total == 0, tie, share)
    # rel' = rel + share const, irr' = irr + const - share const; a full part
    # (share 1) keeps the other exactly 0. In-place products: a broadcast
    # addcmul is several times slower than mul + add on CPU
    rel_const = share.mul_(const)
    new_rel = rel + rel_const
    new_irr = (irr + const).sub_(rel_const)
    return new_rel, new_irr


def _as_pair(rel: Tensor, irr: Tensor) -> Optional[Tensor]:
    """(2, *shape) view of the two parts when ``irr`` directly follows ``rel`` in
    one contiguous buffer (as the rules below produce them), else None: layers
    then take both parts in one call without concatenating them first."""
    if (
        rel.shape != irr.shape or rel.dtype != irr.dtype or rel.numel() == 0
        or not rel.is_contiguous() or not irr.is_contiguous()
        or irr.storage_offset() != rel.storage_offset() + rel.numel()
        or rel.untyped_storage().data_ptr() != irr.untyped_storage().data_ptr()
    ):
        return None
    shape = (2,) + tuple(rel.shape)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return rel.as_strided(shape, tuple(reversed(strides)), rel.storage_offset())


def _split_pair(pair: Tensor, const: Tensor, tie_share: Callable[[], Tensor]) -> Tensor:
    """:func:`_split_constant` on both parts stacked as ``pair`` (2, ...), in
    fewer passes: part' = part + const |part| / (|rel| + |irr|). A part that is
    exactly 0 everywhere stays exactly 0; the parts add up to the total
    (part sum + const) to round-off."""
    share = pair.abs()
    total = torch.add(share[0], share[1])  # not .sum(0): a reduction zero-fills first
    share.div_(total)  # 0/0 = nan where both are 0: replaced next
    if _may_tie(total):
        tie = tie_share()
        tie = torch.stack(torch.broadcast_tensors(tie, 1 - tie)) if isinstance(tie, Tensor) \
            else torch.tensor([tie, 1 - tie], dtype=pair.dtype, device=pair.device).reshape(
                (2,) + (1,) * (pair.dim() - 1))
        share = torch.where(total == 0, tie, share)
    return share.mul_(const).add_(pair)


class CDTensor(Tensor):
    """An activation (its data) with its relevant (``rel``) and irrelevant (``irr``) parts."""

    rel: Tensor
    irr: Tensor
    total: Tensor

    @staticmethod
    def wrap(rel: Tensor, irr: Tensor, total: Tensor) -> "CDTensor":
        obj = Tensor._make_subclass(CDTensor, total)
        obj.rel, obj.irr, obj.total = rel, irr, total
        return obj

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})


class MaskedIndices(Tensor):
    """Integer token ids with a 0/1 relevance mask of the same shape."""

    mask: Tensor
    ids: Tensor

    @staticmethod
    def wrap(ids: Tensor, mask: Tensor) -> "MaskedIndices":
        obj = Tensor._make_subclass(MaskedIndices, ids)
        obj.ids, obj.mask = ids, mask
        return obj

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})


def _plain(x: Any) -> Any:
    if isinstance(x, CDTensor):
        return x.total
    if isinstance(x, SharedCDTensor):
        return _expanded_total(x)
    if isinstance(x, MaskedIndices):
        return x.ids
    return x


def _true_result(func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    """The real operation on the true activations."""
    with _DISABLE():
        return func(*tree_map(_plain, tuple(args)), **tree_map(_plain, kwargs))


def _contains_tensor(value: Any) -> bool:
    return any(isinstance(v, Tensor) for v in tree_flatten(value)[0])


def _name(func: Callable) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _dispatch(func: Callable, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    name = _name(func)
    if _has_shared(args, kwargs):
        return _dispatch_shared(func, name, args, kwargs)
    rule = _RULES.get(name)
    if rule is not None:
        if name not in _INDEX_OK and _contains((args, kwargs), MaskedIndices):
            raise UnsupportedOperationError(
                f"contextual decomposition: integer (token id) inputs can only be "
                f"consumed by an embedding lookup (nn.Embedding / F.embedding); got "
                f"the operation `{_qualname(func)}` on them"
            )
        return rule(func, args, kwargs)
    result = _true_result(func, args, kwargs)
    if not _contains_tensor(result):
        # metadata: shape, size(), dim(), dtype, device, repr ...
        return result
    if name in _INDEX_OK and any(isinstance(a, MaskedIndices) for a in args):
        return result
    raise UnsupportedOperationError(
        f"contextual decomposition has no rule for the operation `{_qualname(func)}` "
        f"applied to a decomposed activation. Supported operations: "
        f"{supported_operations()}"
    )


def _qualname(func: Callable) -> str:
    module = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or _name(func)
    if "boolean_dispatch" in qual:
        qual = _name(func)
    return f"{module}.{qual}" if module else qual


# ----------------------------------------------------------------------------
# helpers to rebuild calls on the parts


def _with_first(args: Sequence[Any], first: Any) -> Tuple[Any, ...]:
    return (first,) + tuple(tree_map(_plain, tuple(args[1:])))


def _inplace_requested(name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    if name.endswith("_") and not name.endswith("__"):
        return True
    if name.startswith("__i") and name not in ("__index__", "__int__", "__invert__"):
        return True
    position = _INPLACE_POSITION.get(name)
    if kwargs.get("inplace", False):
        return True
    return position is not None and len(args) > position and bool(args[position])


def _out_of_place(name: str, args: Sequence[Any], kwargs: Dict[str, Any]):
    """(args, kwargs) with any ``inplace`` flag switched off."""
    args, kwargs = list(args), dict(kwargs)
    if "inplace" in kwargs:
        kwargs["inplace"] = False
    position = _INPLACE_POSITION.get(name)
    if position is not None and len(args) > position:
        args[position] = False
    return args, kwargs


_INPLACE_POSITION = {
    "relu": 1, "relu6": 1, "leaky_relu": 2, "hardtanh": 3, "elu": 2, "silu": 1,
    "dropout": 3, "dropout1d": 3, "dropout2d": 3, "dropout3d": 3,
}


def _finish(
    name: str, args: Sequence[Any], kwargs: Dict[str, Any], rel: Tensor, irr: Tensor, total: Tensor
) -> CDTensor:
    """Wrap the result; for an in-place call write into the input, as the real op does."""
    target = args[0] if args else None
    if _inplace_requested(name, args, kwargs) and isinstance(target, CDTensor):
        if target.rel.shape == rel.shape and target.irr.shape == irr.shape:
            target.rel.copy_(rel)
            target.irr.copy_(irr)
            if target.total.data_ptr() != total.data_ptr():
                target.total.copy_(total)
            return target
    return CDTensor.wrap(rel, irr, total)


# ----------------------------------------------------------------------------
# rules


def _rule_linear_op(func, args, kwargs):
    """Bias-free linear operations: applied to each part."""
    name = _name(func)
    x = args[0]
    if not isinstance(x, CDTensor):
        return _second_operand_linear(func, args, kwargs)
    call_args, call_kwargs = _out_of_place(name, args, kwargs)
    call_kwargs = tree_map(_plain, call_kwargs)
    total = _true_result(func, args, kwargs)
    _refuse_integer_cast(func, total)
    rel = func(*_with_first(call_args, x.rel), **call_kwargs)
    irr = func(*_with_first(call_args, x.irr), **call_kwargs)
    if isinstance(total, (tuple, list)):
        return type(total)(CDTensor.wrap(r, i, t) for r, i, t in zip(rel, irr, total))
    return _finish(name, args, kwargs, rel, irr, total)


def _refuse_integer_cast(func: Callable, total: Any) -> None:
    """A cast of a decomposed activation to an integer or bool dtype is not
    linear: the cast parts would not add up to the cast total."""
    if isinstance(total, Tensor) and not (total.is_floating_point() or total.is_complex()):
        raise UnsupportedOperationError(
            f"contextual decomposition: `{_qualname(func)}` casts a decomposed activation "
            f"to {str(total.dtype).replace('torch.', '')}; rounding is not linear, so the "
            "relevant and irrelevant parts cannot be cast one by one (their sum would not "
            "be the cast of the activation). Explain an output computed before the cast."
        )


def _second_operand_linear(func, args, kwargs):
    raise UnsupportedOperationError(
        f"contextual decomposition: `{_qualname(func)}` with a decomposed activation "
        f"in a position other than the first is not supported"
    )


def _rule_dropout(func, args, kwargs):
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    if training:
        raise UnsupportedOperationError(
            f"contextual decomposition explains the model in eval mode: "
            f"`{_qualname(func)}` was called with training=True"
        )
    return args[0]


def _rule_pad(func, args, kwargs):
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    if mode == "constant" and value not in (None, 0, 0.0):
        raise UnsupportedOperationError(
            "contextual decomposition: F.pad with a non-zero constant is not supported"
        )
    return _rule_linear_op(func, args, kwargs)


def _rule_affine(func, args, kwargs):
    """linear / conv: W beta, W gamma, bias shared in proportion to |W beta|, |W gamma|."""
    x = args[0]
    if not isinstance(x, CDTensor) or any(isinstance(a, CDTensor) for a in args[1:]):
        raise UnsupportedOperationError(
            f"contextual decomposition: `{_qualname(func)}` must take the decomposed "
            f"activation as its input and plain tensors as weight and bias"
        )
    args = list(args)
    kwargs = dict(kwargs)
    if "bias" in kwargs:
        bias = kwargs.pop("bias")
    elif len(args) > 2:
        bias = args[2]
        args[2] = None
    else:
        bias = None
    # both parts in one call; the total is their sum plus the bias (the real
    # op's value up to round-off), which saves a third of the layer's work
    batched = x.rel.dim() >= 2 if _name(func) == "linear" else x.rel.dim() == args[1].dim()
    if batched:
        pair = _as_pair(x.rel, x.irr)
        joined = pair.flatten(0, 1) if pair is not None else torch.cat([x.rel, x.irr])
        out = func(joined, *args[1:], **kwargs)
        pair = out.unflatten(0, (2, x.rel.shape[0]))
        total = torch.add(pair[0], pair[1])
        if bias is None:
            return CDTensor.wrap(pair[0], pair[1], total)
        shaped = bias if _name(func) == "linear" else bias.reshape(
            (-1,) + (1,) * (args[1].dim() - 2))
        total.add_(shaped)
        pair = _split_pair(pair, shaped, partial(_row_share, x.rel, x.irr))
        return CDTensor.wrap(pair[0], pair[1], total)
    else:
        rel, irr = func(x.rel, *args[1:], **kwargs), func(x.irr, *args[1:], **kwargs)
    total = rel + irr
    if bias is not None:
        if _name(func) == "linear":
            shaped = bias
        else:
            shaped = bias.reshape((-1,) + (1,) * (args[1].dim() - 2))
        total = total + shaped
        rel, irr = _split_constant(rel, irr, shaped, partial(_row_share, x.rel, x.irr))
    return CDTensor.wrap(rel, irr, total)


def _rule_batch_norm(func, args, kwargs):
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    x = bound["input"]
    if bound["training"] or bound["running_mean"] is None or bound["running_var"] is None:
        raise UnsupportedOperationError(
            "contextual decomposition supports batch norm in eval mode with running "
            "statistics only (batch statistics would mix the decompositions of the batch)"
        )
    total = _true_result(func, args, kwargs)
    shape = (-1,) + (1,) * (x.total.dim() - 2)
    scale = torch.rsqrt(bound["running_var"] + bound["eps"])
    if bound["weight"] is not None:
        scale = scale * bound["weight"]
    shift = -bound["running_mean"] * scale
    if bound["bias"] is not None:
        shift = shift + bound["bias"]
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    tie = _row_share(x.rel, x.irr)
    rel, irr = _split_constant(x.rel * scale, x.irr * scale, shift, tie)
    # torch's kernel rounds differently from x * scale + shift (by ~1e-7 of the
    # shift in float32). Left in place, that residual becomes a non-zero
    # irrelevant part after the next ReLU (f(total) - f(rel)) even for a full
    # mask, and a later bias split in proportion |W rel| : |W irr| hands a whole
    # shift to it wherever W rel is exactly 0 (a dead window): 1e-4 of the
    # output. Sharing the residual like a constant makes rel + irr equal the
    # real output, and keeps an exactly-zero part exactly zero.
    rel, irr = _split_constant(rel, irr, total - (rel + irr), tie)
    return CDTensor.wrap(rel, irr, total)


def _rule_layer_norm(func, args, kwargs):
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    bound = {"weight": None, "bias": None, "eps": 1e-5}
    bound.update(zip(names, args))
    bound.update(kwargs)
    x = bound["input"]
    shape = bound["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dims = tuple(range(-len(shape), 0))
    total = _true_result(func, args, kwargs)
    var = x.total.var(dim=dims, unbiased=False, keepdim=True)
    inv_std = torch.rsqrt(var + bound["eps"])
    rel = (x.rel - x.rel.mean(dim=dims, keepdim=True)) * inv_std
    irr = (x.irr - x.irr.mean(dim=dims, keepdim=True)) * inv_std
    if bound["weight"] is not None:
        rel, irr = rel * bound["weight"], irr * bound["weight"]
    if bound["bias"] is not None:
        rel, irr = _split_constant(rel, irr, bound["bias"], partial(_row_share, x.rel, x.irr))
    return CDTensor.wrap(rel, irr, total)


def _elementwise(func, args, kwargs) -> Tuple[CDTensor, Callable[[Tensor], Tensor], Tensor]:
    x = args[0]
    if not isinstance(x, CDTensor):
        return _second_operand_linear(func, args, kwargs)
    call_args, call_kwargs = _out_of_place(_name(func), args, kwargs)
    rest = tuple(tree_map(_plain, tuple(call_args[1:])))
    call_kwargs = tree_map(_plain, call_kwargs)

    def f(t: Tensor) -> Tensor:
        return func(t, *rest, **call_kwargs)

    return x, f, f(x.total)


def _rule_relu_family(func, args, kwargs):
    """beta' = f(beta), gamma' = f(beta + gamma) - f(beta)."""
    x, f, total = _elementwise(func, args, kwargs)
    name = _name(func)
    if name == "relu" and not _inplace_requested(name, args, kwargs):
        # both parts written side by side, ready for the next layer's one call
        pair = x.rel.new_empty((2,) + tuple(x.rel.shape))
        torch.clamp_min(x.rel, 0, out=pair[0])
        torch.sub(total, pair[0], out=pair[1])
        return CDTensor.wrap(pair[0], pair[1], total)
    rel = f(x.rel)
    return _finish(name, args, kwargs, rel, total - rel, total)


def _shapley_two(f: Callable[[Tensor], Tensor], rel: Tensor, irr: Tensor, f_total: Tensor):
    """Two-player Shapley split of f(rel + irr); f(0) shared like a bias."""
    f_zero = f(torch.zeros((), dtype=rel.dtype, device=rel.device))
    f_rel, f_irr = f(rel), f(irr)
    b = 0.5 * ((f_rel - f_zero) + (f_total - f_irr))
    c = 0.5 * ((f_irr - f_zero) + (f_total - f_rel))
    return _split_constant(b, c, f_zero, partial(_row_share, rel, irr))


def _rule_smooth(func, args, kwargs):
    x, f, total = _elementwise(func, args, kwargs)
    rel, irr = _shapley_two(f, x.rel, x.irr, total)
    return _finish(_name(func), args, kwargs, rel, irr, total)


def _rule_max_pool(func, args, kwargs):
    x = args[0]
    name = _name(func)
    dims = 3 if "3d" in name else 2 if "2d" in name else 1
    wants_indices = kwargs.get("return_indices", args[6] if len(args) > 6 else False)
    call_args, call_kwargs = list(args), dict(kwargs)
    if len(call_args) > 6:
        call_args[6] = True
    else:
        call_kwargs["return_indices"] = True
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    with _DISABLE():
        total, indices = pool(x.total, *tree_map(_plain, tuple(call_args[1:])), **call_kwargs)
    flat_index = indices.flatten(-dims)
    pair = _as_pair(x.rel, x.irr)
    if pair is not None:  # one gather for both parts
        both = pair.flatten(-dims).gather(
            -1, flat_index.unsqueeze(0).expand((2,) + tuple(flat_index.shape))
        ).view((2,) + tuple(indices.shape))
        rel, irr = both[0], both[1]
    else:
        rel = x.rel.flatten(-dims).gather(-1, flat_index).view_as(indices)
        irr = x.irr.flatten(-dims).gather(-1, flat_index).view_as(indices)
    out = CDTensor.wrap(rel, irr, total)
    return (out, indices) if wants_indices else out


def _terms(name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Tuple[float, Any]]:
    """(coefficient, operand) terms of an addition/subtraction."""
    alpha = kwargs.get("alpha", 1)
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    if name in ("__rsub__", "rsub"):
        return [(1, b), (-alpha, a)]
    if name in ("sub", "sub_", "__sub__", "__isub__", "subtract"):
        return [(1, a), (-alpha, b)]
    return [(1, a), (alpha, b)]


def _rule_add(func, args, kwargs):
    name = _name(func)
    total = _true_result(func, args, kwargs)
    rel = irr = None
    const: Any = 0
    for coef, operand in _terms(name, args, kwargs):
        if isinstance(operand, CDTensor):
            r, i = (operand.rel, operand.irr) if coef == 1 else (coef * operand.rel, coef * operand.irr)
            rel = r if rel is None else rel + r
            irr = i if irr is None else irr + i
        else:
            const = const + coef * operand
    assert rel is not None and irr is not None
    if isinstance(const, Tensor) or const != 0:
        tie = partial(_row_share, rel, irr)
        rel, irr = torch.broadcast_tensors(rel, irr, total)[:2]
        rel, irr = _split_constant(rel, irr, const, tie)
    else:
        rel, irr = rel.expand_as(total), irr.expand_as(total)
    return _finish(name, args, kwargs, rel, irr, total)


def _rule_scale(func, args, kwargs):
    """Multiplication / division / matmul with exactly one decomposed operand."""
    name = _name(func)
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    cd_args = [x for x in (a, b) if isinstance(x, CDTensor)]
    divides = name in ("div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide")
    if len(cd_args) != 1 or (divides and isinstance(b, CDTensor)) or name == "__rtruediv__":
        raise UnsupportedOperationError(
            f"contextual decomposition: `{_qualname(func)}` is supported only between a "
            f"decomposed activation and a constant (no product or division of two "
            f"decomposed activations, no division by one)"
        )
    total = _true_result(func, args, kwargs)
    rest_kwargs = tree_map(_plain, {k: v for k, v in kwargs.items() if k != "other"})
    if isinstance(a, CDTensor):
        other = _plain(b)
        rel = func(a.rel, other, **rest_kwargs)
        irr = func(a.irr, other, **rest_kwargs)
    else:
        rel = func(a, b.rel, **rest_kwargs)
        irr = func(a, b.irr, **rest_kwargs)
    return _finish(name, args, kwargs, rel, irr, total)


def _rule_cat(func, args, kwargs):
    tensors = args[0] if args else kwargs["tensors"]
    rest = tuple(args[1:])
    rest_kwargs = {k: v for k, v in kwargs.items() if k != "tensors"}
    total = _true_result(func, args, kwargs)
    rels = [t.rel if isinstance(t, CDTensor) else torch.zeros_like(t) for t in tensors]
    irrs = [t.irr if isinstance(t, CDTensor) else t for t in tensors]
    return CDTensor.wrap(func(rels, *rest, **rest_kwargs), func(irrs, *rest, **rest_kwargs), total)


def _rule_embedding(func, args, kwargs):
    ids = args[0] if args else kwargs["input"]
    if not isinstance(ids, MaskedIndices):
        raise UnsupportedOperationError(
            "contextual decomposition: the embedding lookup must take the token ids "
            "given as inputs"
        )
    total = _true_result(func, args, kwargs)
    mask = ids.mask.to(total.dtype).unsqueeze(-1)
    rel = total * mask
    return CDTensor.wrap(rel, total * (1 - mask), total)


def _rule_index_passthrough(func, args, kwargs):
    """Casts/moves of token ids keep their mask."""
    ids = args[0]
    out = _true_result(func, args, kwargs)
    if isinstance(ids, MaskedIndices) and isinstance(out, Tensor) and out.shape == ids.ids.shape:
        return MaskedIndices.wrap(out, ids.mask)
    return out


# --- LSTM (Murdoch, Liu, Yu 2018) --------------------------------------------


def _shapley_three(f, rel: Tensor, irr: Tensor, bias: Tensor):
    """Shapley split of f(rel + irr + bias) over rel and irr, the bias always present."""
    f_b = f(bias)
    f_rb, f_ib, f_all = f(rel + bias), f(irr + bias), f(rel + irr + bias)
    rel_c = 0.5 * ((f_rb - f_b) + (f_all - f_ib))
    irr_c = 0.5 * ((f_ib - f_b) + (f_all - f_rb))
    return rel_c, irr_c, f_b.expand_as(rel_c)


def _lstm_direction(
    x_rel: Tensor,
    x_irr: Tensor,
    weights: Sequence[Tensor],
    h0: Tuple[Tensor, Tensor],
    c0: Tuple[Tensor, Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One direction of one layer, inputs (B, T, F); returns output parts and last h, c parts."""
    w_ih, w_hh = weights[0], weights[1]
    if len(weights) >= 4:
        bias = weights[2] + weights[3]
    else:
        bias = torch.zeros(w_ih.shape[0], dtype=x_rel.dtype, device=x_rel.device)
    b_i, b_f, b_g, b_o = bias.chunk(4)
    h_rel, h_irr = h0
    c_rel, c_irr = c0
    # input projections for all steps at once
    pre_x_rel = x_rel @ w_ih.T
    pre_x_irr = x_irr @ w_ih.T
    rel_mass = x_rel.abs().sum(-1)
    irr_mass = x_irr.abs().sum(-1)
    mass = rel_mass + irr_mass
    step_share = torch.where(mass > 0, rel_mass / torch.where(mass > 0, mass, 1), 0.5)
    out_rel, out_irr = [], []
    for t in range(x_rel.shape[1]):
        pre_rel = (pre_x_rel[:, t] + h_rel @ w_hh.T).chunk(4, dim=-1)
        pre_irr = (pre_x_irr[:, t] + h_irr @ w_hh.T).chunk(4, dim=-1)
        i_r, i_i, i_b = _shapley_three(torch.sigmoid, pre_rel[0], pre_irr[0], b_i)
        f_r, f_i, f_b = _shapley_three(torch.sigmoid, pre_rel[1], pre_irr[1], b_f)
        g_r, g_i, g_b = _shapley_three(torch.tanh, pre_rel[2], pre_irr[2], b_g)
        o = torch.sigmoid(pre_rel[3] + pre_irr[3] + b_o)
        bias_product = i_b * g_b
        share = step_share[:, t : t + 1]
        new_c_rel = (
            (f_r + f_b) * c_rel + i_r * (g_r + g_b) + i_b * g_r + share * bias_product
        )
        new_c_irr = (
            (f_r + f_i + f_b) * c_irr
            + f_i * c_rel
            + i_i * (g_r + g_i + g_b)
            + (i_r + i_b) * g_i
            + (1 - share) * bias_product
        )
        c_rel, c_irr = new_c_rel, new_c_irr
        tanh_rel, tanh_irr = _shapley_two(torch.tanh, c_rel, c_irr, torch.tanh(c_rel + c_irr))
        h_rel, h_irr = o * tanh_rel, o * tanh_irr
        out_rel.append(h_rel)
        out_irr.append(h_irr)
    return (
        torch.stack(out_rel, 1), torch.stack(out_irr, 1), h_rel, h_irr, c_rel, c_irr
    )


def _rule_lstm(func, args, kwargs):
    names = ["input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
             "bidirectional", "batch_first"]
    if len(args) != len(names) or not isinstance(args[0], CDTensor):
        raise UnsupportedOperationError(
            "contextual decomposition supports nn.LSTM on a padded (not packed) "
            "decomposed input only"
        )
    bound = dict(zip(names, args))
    if bound["train"] and bound["dropout"] > 0 and bound["num_layers"] > 1:
        raise UnsupportedOperationError(
            "contextual decomposition explains the LSTM in eval mode (dropout active)"
        )
    total = _true_result(func, args, kwargs)
    x = bound["input"]
    params = [_plain(p) for p in bound["params"]]
    dirs = 2 if bound["bidirectional"] else 1
    layers = bound["num_layers"]
    per = len(params) // (layers * dirs)
    if per not in (2, 4):
        raise UnsupportedOperationError(
            "contextual decomposition: nn.LSTM with proj_size > 0 is not supported"
        )
    batch_first = bound["batch_first"]
    unbatched = x.total.dim() == 2
    rel, irr = x.rel, x.irr
    if unbatched:
        rel, irr = rel.unsqueeze(0 if batch_first else 1), irr.unsqueeze(0 if batch_first else 1)
    if not batch_first:
        rel, irr = rel.transpose(0, 1), irr.transpose(0, 1)
    h0, c0 = bound["hx"]

    def state(s, index):
        s_plain = _plain(s)[index]
        if unbatched:
            s_plain = s_plain.unsqueeze(0)
        if isinstance(s, CDTensor):
            r, i = s.rel[index], s.irr[index]
            if unbatched:
                r, i = r.unsqueeze(0), i.unsqueeze(0)
            return r, i
        return torch.zeros_like(s_plain), s_plain

    h_rels, h_irrs, c_rels, c_irrs = [], [], [], []
    for layer in range(layers):
        outs_rel, outs_irr = [], []
        for direction in range(dirs):
            k = layer * dirs + direction
            weights = params[k * per : (k + 1) * per]
            seq_rel, seq_irr = (rel, irr) if direction == 0 else (rel.flip(1), irr.flip(1))
            o_rel, o_irr, hr, hi, cr, ci = _lstm_direction(
                seq_rel, seq_irr, weights, state(h0, k), state(c0, k)
            )
            if direction == 1:
                o_rel, o_irr = o_rel.flip(1), o_irr.flip(1)
            outs_rel.append(o_rel)
            outs_irr.append(o_irr)
            h_rels.append(hr)
            h_irrs.append(hi)
            c_rels.append(cr)
            c_irrs.append(ci)
        rel, irr = torch.cat(outs_rel, -1), torch.cat(outs_irr, -1)
    if not batch_first:
        rel, irr = rel.transpose(0, 1), irr.transpose(0, 1)
    hn_rel, hn_irr = torch.stack(h_rels), torch.stack(h_irrs)
    cn_rel, cn_irr = torch.stack(c_rels), torch.stack(c_irrs)
    if unbatched:
        squeeze = 0 if batch_first else 1
        rel, irr = rel.squeeze(squeeze), irr.squeeze(squeeze)
        hn_rel, hn_irr, cn_rel, cn_irr = (t.squeeze(1) for t in (hn_rel, hn_irr, cn_rel, cn_irr))
    out, h_n, c_n = total
    return (
        CDTensor.wrap(rel, irr, out),
        CDTensor.wrap(hn_rel, hn_irr, h_n),
        CDTensor.wrap(cn_rel, cn_irr, c_n),
    )


# ----------------------------------------------------------------------------
# shared-total representation
#
# For M masks of the same N examples the true activation of an example is the
# same for every mask; only the relevant part differs. A SharedCDTensor holds
# the relevant part of all M x N rows (mask-major) and the true activation of
# the N examples once; the irrelevant part is implied, gamma = total - beta,
# and is computed only where a rule needs it. Each rule below performs the
# arithmetic of the two-stream rule above on (beta, total - beta), so the
# decomposition is the same up to round-off; a layer then costs one pass over
# M x N + N rows instead of 2 M x N. Where possible the relevant rows and the
# total rows sit in one buffer (``joined``: M x N rows, then N rows) so that a
# layer takes both in one call, and a full mask (beta == total) stays bitwise
# equal to the total, keeping its irrelevant part exactly 0.
#
# An operation without a rule here converts its shared operands into two-stream
# CDTensors (materializing gamma) and continues with the rules above; a call on
# plain operands with a batch dimension (a per-row constant) does the same.

_FALLBACK = object()


class SharedCDTensor(Tensor):
    """Relevant part ``rel`` of M x N rows (mask-major) and the true activation
    ``tot`` of the N examples, shared by the M masks (the irrelevant part is
    ``tot - rel``); ``joined``: a buffer holding ``rel`` rows then ``tot`` rows,
    or None."""

    rel: Tensor
    tot: Tensor
    masks: int
    joined: Optional[Tensor]

    @staticmethod
    def wrap(
        rel: Tensor, tot: Tensor, masks: int, joined: Optional[Tensor] = None
    ) -> "SharedCDTensor":
        obj = Tensor._make_subclass(SharedCDTensor, rel)
        obj.rel, obj.tot, obj.masks, obj.joined = rel, tot, masks, joined
        return obj

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})


def _wrap_joined(out: Any, rows: int, masks: int) -> Any:
    """SharedCDTensor(s) over a joined buffer (or a tuple of them)."""
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap_joined(o, rows, masks) for o in out)
    return SharedCDTensor.wrap(out[:rows], out[rows:], masks, out)


def _by_mask(t: Tensor, masks: int) -> Tensor:
    """(M x N, ...) -> (M, N, ...) (always a view)."""
    return t.unflatten(0, (masks, -1))


def _irr_by_mask(x: SharedCDTensor) -> Tensor:
    """The irrelevant part, (M, N, ...)."""
    return torch.sub(x.tot.unsqueeze(0), _by_mask(x.rel, x.masks))


def _expanded_total(x: SharedCDTensor) -> Tensor:
    """The total of every row, (M x N, ...), materialized."""
    shape = (x.masks,) + tuple(x.tot.shape)
    return x.tot.unsqueeze(0).expand(shape).contiguous().flatten(0, 1)


def _row_share_by_mask(rel: Tensor, irr: Tensor) -> Tensor:
    """:func:`_row_share` of (M, N, ...) parts, shaped (M, N, 1, ...)."""
    masks = rel.shape[0]
    flat = lambda t: t.reshape((-1,) + tuple(t.shape[2:]))  # noqa: E731
    return _by_mask(_row_share(flat(rel), flat(irr)), masks)


def _input_tie(x: SharedCDTensor) -> Callable[[], Tensor]:
    """The tie share of a layer whose input is ``x``, (M, N, 1, ...)."""
    return lambda: _row_share_by_mask(_by_mask(x.rel, x.masks), _irr_by_mask(x))


def _joined(x: SharedCDTensor) -> Tensor:
    return x.joined if x.joined is not None else torch.cat([x.rel, x.tot])


def _two_stream(x: SharedCDTensor) -> CDTensor:
    total = _expanded_total(x)
    return CDTensor.wrap(x.rel, total - x.rel, total)


def _contains(value: Any, types: Any) -> bool:
    """Whether ``value`` (nested lists, tuples, dicts) holds an instance of ``types``
    (a plain recursion: cheaper than a pytree flatten on every intercepted call)."""
    if isinstance(value, types):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains(v, types) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, types) for v in value.values())
    return False


def _has_shared(args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    return _contains(args, SharedCDTensor) or (bool(kwargs) and _contains(kwargs, SharedCDTensor))


def _shared_in(values: Any) -> bool:
    return _contains(values, (SharedCDTensor, CDTensor))


# metadata queries: answered from the relevant part (same shape, dtype, device)
_META = {
    "size", "dim", "ndimension", "numel", "nelement", "__len__", "stride", "is_contiguous",
    "is_floating_point", "is_complex", "element_size", "get_device", "__get__",
}


def _meta_plain(x: Any) -> Any:
    return x.rel if isinstance(x, SharedCDTensor) else x


def _dispatch_shared(func: Callable, name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    rule = _SHARED_RULES.get(name)
    if rule is not None:
        out = rule(func, name, args, kwargs)
        if out is not _FALLBACK:
            return out
    elif name in _META:
        with _DISABLE():
            if len(args) == 1 and not kwargs:  # x.numel(), x.dim(), x.shape ...
                result = func(_meta_plain(args[0]))
            else:
                result = func(*tree_map(_meta_plain, tuple(args)), **tree_map(_meta_plain, kwargs))
        if not _contains_tensor(result):
            return result
    return _fallback(func, name, args, kwargs)


def _fallback(func: Callable, name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    """Convert the shared operands to two-stream CDTensors and apply the rules above."""
    converted: Dict[int, CDTensor] = {}

    def convert(v: Any) -> Any:
        if isinstance(v, SharedCDTensor):
            if id(v) not in converted:
                converted[id(v)] = _two_stream(v)
            return converted[id(v)]
        return v

    result = _dispatch(func, tree_map(convert, tuple(args)), tree_map(convert, kwargs))
    target = args[0] if args else None
    if (
        isinstance(target, SharedCDTensor) and isinstance(result, CDTensor)
        and _inplace_requested(name, args, kwargs) and result.rel.shape == target.rel.shape
    ):
        # an in-place call: write the result into the shared activation
        target.rel.copy_(result.rel)
        target.tot.copy_(_by_mask(result.total, target.masks)[0])
        return target
    return result


def _batch_free(c: Any, dims: int) -> bool:
    """Whether a plain operand broadcasts against a (rows, ...) activation of
    ``dims`` dimensions without a row dimension of its own."""
    if isinstance(c, (SharedCDTensor, CDTensor, MaskedIndices)):
        return False
    if not isinstance(c, Tensor):
        return True
    return c.dim() < dims or (c.dim() == dims and c.shape[0] == 1)


def _split_constant_rel(
    rel: Tensor, irr: Tensor, const: Any, tie_share: Callable[[], Tensor]
) -> Tensor:
    """The relevant part of :func:`_split_constant` (same arithmetic)."""
    magnitude = rel.abs()
    total = magnitude + irr.abs()
    share = magnitude.div_(total)
    if _may_tie(total):
        share = torch.where(total == 0, tie_share(), share)
    return rel + share.mul_(const)


def _split_joined_constant(out: Tensor, rows: int, masks: int, const: Tensor,
                           tie_share: Callable[[], Tensor]) -> None:
    """In place on ``out`` = [A beta (M x N rows); A total (N rows)] of a linear
    map A: share ``const`` like :func:`_split_pair` with A gamma = A total - A beta;
    the total rows get the whole constant."""
    rel = _by_mask(out[:rows], masks)
    total_rows = out[rows:]
    # |A beta| + |A gamma| is 0 only where A total is 0 too: when the N total
    # rows have no zero, the full check below is skipped
    may_tie = total_rows.device.type != "cpu" or bool((total_rows == 0).any())
    denom = torch.sub(total_rows, rel).abs_()  # |A gamma|
    share = rel.abs()
    denom.add_(share)
    share.div_(denom)  # 0/0 = nan where both are 0: replaced next
    if may_tie and _may_tie(denom):
        share = torch.where(denom == 0, tie_share(), share)
    rel.add_(share.mul_(const))
    total_rows.add_(const)


def _s_affine(func, name, args, kwargs):
    x = args[0]
    if not isinstance(x, SharedCDTensor) or len(args) < 2 or _shared_in((args[1:], kwargs)):
        return _FALLBACK
    args, kwargs = list(args), dict(kwargs)
    weight = args[1]
    if "bias" in kwargs:
        bias = kwargs.pop("bias")
    elif len(args) > 2:
        bias, args[2] = args[2], None
    else:
        bias = None
    linear = name == "linear"
    if not isinstance(weight, Tensor) or (
        x.rel.dim() < 2 if linear else x.rel.dim() != weight.dim()
    ):
        return _FALLBACK
    rows = x.rel.shape[0]
    out = func(_joined(x), *args[1:], **kwargs)
    if bias is not None:
        shaped = bias if linear else bias.reshape((-1,) + (1,) * (weight.dim() - 2))
        _split_joined_constant(out, rows, x.masks, shaped, _input_tie(x))
    return _wrap_joined(out, rows, x.masks)


def _s_batch_norm(func, name, args, kwargs):
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps"]
    bound: Dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                             "eps": 1e-5}
    bound.update(zip(names, args))
    bound.update(kwargs)
    x = bound["input"]
    if (
        not isinstance(x, SharedCDTensor) or x.rel.dim() < 2 or bound["training"]
        or bound["running_mean"] is None or bound["running_var"] is None
        or _shared_in([v for k, v in bound.items() if k != "input"])
    ):
        return _FALLBACK
    shape = (-1,) + (1,) * (x.rel.dim() - 2)
    scale = torch.rsqrt(bound["running_var"] + bound["eps"])
    if bound["weight"] is not None:
        scale = scale * bound["weight"]
    shift = -bound["running_mean"] * scale
    if bound["bias"] is not None:
        shift = shift + bound["bias"]
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    rows = x.rel.shape[0]
    out = _joined(x) * scale
    # the total is x * scale + shift like the parts (not torch's kernel, which
    # rounds differently): a full mask keeps its irrelevant part exactly 0
    _split_joined_constant(out, rows, x.masks, shift, _input_tie(x))
    return _wrap_joined(out, rows, x.masks)


def _s_layer_norm(func, name, args, kwargs):
    names = ["input", "normalized_shape", "weight", "bias", "eps"]
    bound: Dict[str, Any] = {"weight": None, "bias": None, "eps": 1e-5}
    bound.update(zip(names, args))
    bound.update(kwargs)
    x = bound["input"]
    if not isinstance(x, SharedCDTensor) or _shared_in([bound["weight"], bound["bias"]]):
        return _FALLBACK
    shape = bound["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) >= x.rel.dim():
        return _FALLBACK
    dims = tuple(range(-len(shape), 0))
    with _DISABLE():
        total = func(*tree_map(lambda v: v.tot if v is x else v, tuple(args)), **kwargs)
    inv_std = torch.rsqrt(x.tot.var(dim=dims, unbiased=False, keepdim=True) + bound["eps"])
    rel_in, irr_in = _by_mask(x.rel, x.masks), _irr_by_mask(x)
    rel = (rel_in - rel_in.mean(dim=dims, keepdim=True)) * inv_std
    irr = (irr_in - irr_in.mean(dim=dims, keepdim=True)) * inv_std
    if bound["weight"] is not None:
        rel, irr = rel * bound["weight"], irr * bound["weight"]
    if bound["bias"] is not None:
        rel = _split_constant_rel(rel, irr, bound["bias"],
                                  lambda: _row_share_by_mask(rel_in, irr_in))
    return SharedCDTensor.wrap(rel.flatten(0, 1), total, x.masks)


def _s_pointwise(func, name, args, kwargs):
    """ReLU family: beta' = f(beta), total' = f(total) (gamma' = f(total) - f(beta))."""
    x = args[0]
    if not isinstance(x, SharedCDTensor) or _shared_in((args[1:], kwargs)):
        return _FALLBACK
    rest = tuple(args[1:])
    out = _map_parts(x, lambda t: func(t, *rest, **kwargs))
    return x if _inplace_requested(name, args, kwargs) else out


def _map_parts(x: "SharedCDTensor", call: Callable[[Tensor], Any]) -> Any:
    """``call`` (an op that keeps rows independent) applied to the relevant rows
    and the total rows: once on the joined buffer when the parts share one,
    else on each part (an op returning a tuple gives a tuple of results)."""
    if x.joined is not None:
        return _wrap_joined(call(x.joined), x.rel.shape[0], x.masks)
    rel, tot = call(x.rel), call(x.tot)
    if isinstance(rel, (tuple, list)):
        return type(rel)(SharedCDTensor.wrap(r, t, x.masks) for r, t in zip(rel, tot))
    return SharedCDTensor.wrap(rel, tot, x.masks)


def _s_smooth(func, name, args, kwargs):
    """Two-player Shapley rule of :func:`_shapley_two` with gamma = total - beta."""
    x = args[0]
    if not isinstance(x, SharedCDTensor) or _shared_in((args[1:], kwargs)):
        return _FALLBACK
    call_args, call_kwargs = _out_of_place(name, args, kwargs)
    rest = tuple(call_args[1:])

    def f(t: Tensor) -> Tensor:
        return func(t, *rest, **call_kwargs)

    rel, irr = _by_mask(x.rel, x.masks), _irr_by_mask(x)
    total = f(x.tot)
    f_zero = f(torch.zeros((), dtype=rel.dtype, device=rel.device))
    f_rel, f_irr = f(rel), f(irr)
    f_total = total.unsqueeze(0)
    b = 0.5 * ((f_rel - f_zero) + (f_total - f_irr))
    c = 0.5 * ((f_irr - f_zero) + (f_total - f_rel))
    new_rel = _split_constant_rel(b, c, f_zero, lambda: _row_share_by_mask(rel, irr)).flatten(0, 1)
    if _inplace_requested(name, args, kwargs):
        x.rel.copy_(new_rel)
        x.tot.copy_(total)
        return x
    return SharedCDTensor.wrap(new_rel, total, x.masks)


def _s_max_pool(func, name, args, kwargs):
    """Both parts (and the total) gathered at the argmax of the example's total."""
    x = args[0]
    if not isinstance(x, SharedCDTensor) or _shared_in((args[1:], kwargs)):
        return _FALLBACK
    dims = 3 if "3d" in name else 2 if "2d" in name else 1
    if x.rel.dim() != dims + 2:
        return _FALLBACK
    wants_indices = kwargs.get("return_indices", args[6] if len(args) > 6 else False)
    call_args, call_kwargs = list(args), dict(kwargs)
    if len(call_args) > 6:
        call_args[6] = True
    else:
        call_kwargs["return_indices"] = True
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    with _DISABLE():
        total, indices = pool(x.tot, *call_args[1:], **call_kwargs)
    rows, masks = x.rel.shape[0], x.masks
    flat_index = indices.flatten(-dims).unsqueeze(0)  # (1, N, C, L)
    out = x.rel.new_empty((rows + total.shape[0],) + tuple(total.shape[1:]))
    torch.gather(
        _by_mask(x.rel.flatten(-dims), masks), -1,
        flat_index.expand((masks,) + tuple(flat_index.shape[1:])),
        out=_by_mask(out[:rows].flatten(-dims), masks),
    )
    out[rows:].copy_(total)
    result = _wrap_joined(out, rows, masks)
    return (result, indices.repeat((masks,) + (1,) * (indices.dim() - 1))) if wants_indices \
        else result


def _s_add(func, name, args, kwargs):
    terms = _terms(name, args, kwargs)
    shared = [(coef, o) for coef, o in terms if isinstance(o, SharedCDTensor)]
    if not shared:
        return _FALLBACK
    first = shared[0][1]
    dims, rows, masks = first.rel.dim(), first.rel.shape[0], first.masks
    if any(
        isinstance(o, (CDTensor, MaskedIndices))
        or isinstance(o, SharedCDTensor) and (
            o.masks != masks or o.rel.dim() != dims or o.rel.shape[0] != rows)
        or not isinstance(o, SharedCDTensor) and not _batch_free(o, dims)
        for _, o in terms
    ):
        return _FALLBACK
    const: Any = 0
    for coef, operand in terms:
        if not isinstance(operand, SharedCDTensor):
            const = const + coef * operand
    has_const = isinstance(const, Tensor) or const != 0
    inplace = _inplace_requested(name, args, kwargs)
    target = args[0]
    if all(o.joined is not None for _, o in shared):
        summed = None
        for coef, operand in shared:
            part = operand.joined if coef == 1 else coef * operand.joined
            summed = part if summed is None else summed + part
        if summed is shared[0][1].joined:  # x + 0: a new tensor, as the real op gives
            summed = summed.clone()
        rel, tot = summed[:rows], summed[rows:]
    else:
        rel = tot = None
        for coef, operand in shared:
            r, t = (operand.rel, operand.tot) if coef == 1 else (
                coef * operand.rel, coef * operand.tot)
            rel = r if rel is None else rel + r
            tot = t if tot is None else tot + t
        summed = None
    if has_const:
        new_tot = tot + const
        rel_m = _by_mask(rel, masks)
        irr_m = torch.sub(tot.unsqueeze(0), rel_m)
        rel_b, irr_b = torch.broadcast_tensors(rel_m, irr_m, new_tot.unsqueeze(0))[:2]
        rel = _split_constant_rel(rel_b, irr_b, const,
                                  lambda: _row_share_by_mask(rel_m, irr_m)).flatten(0, 1)
        tot, summed = new_tot, None
    elif summed is None:
        full = torch.broadcast_shapes(rel.shape[1:], tot.shape[1:])
        rel, tot = rel.expand((rows,) + full), tot.expand((tot.shape[0],) + full)
    if inplace and isinstance(target, SharedCDTensor) and target.rel.shape == rel.shape:
        target.rel.copy_(rel)
        target.tot.copy_(tot)
        return target
    if summed is not None:
        return _wrap_joined(summed, rows, masks)
    return SharedCDTensor.wrap(rel, tot, masks)


def _s_scale(func, name, args, kwargs):
    """Multiplication / division / matmul of a shared activation by a batch-free constant."""
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    rest_kwargs = {k: v for k, v in kwargs.items() if k != "other"}
    if _shared_in(rest_kwargs) or name in ("__rtruediv__", "__rmatmul__", "bmm"):
        return _FALLBACK
    if isinstance(a, SharedCDTensor):
        x, other, first = a, b, True
    elif name in ("mul", "__mul__", "__rmul__", "multiply"):
        x, other, first = b, a, False
    else:
        return _FALLBACK
    if not isinstance(x, SharedCDTensor):
        return _FALLBACK
    if "matmul" in name or name == "mm":
        if not isinstance(other, Tensor) or isinstance(other, (SharedCDTensor, CDTensor)) \
                or other.dim() > 2 or x.rel.dim() < 2:
            return _FALLBACK
    elif not _batch_free(other, x.rel.dim()):
        return _FALLBACK
    call = (lambda t: func(t, other, **rest_kwargs)) if first else \
        (lambda t: func(other, t, **rest_kwargs))
    out = _map_parts(x, call)
    return x if _inplace_requested(name, args, kwargs) else out


def _s_dropout(func, name, args, kwargs):
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return _FALLBACK if training else args[0]


def _norm_dim(d: Any, dims: int) -> Optional[int]:
    if isinstance(d, bool) or not isinstance(d, int) or dims == 0:
        return None
    return d % dims


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], pos: int, key: str, default: Any) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(key, default)


def _dims_ok(value: Any, dims: int) -> bool:
    """Every dimension in ``value`` (int or sequence) is a valid non-row dimension."""
    values = value if isinstance(value, (tuple, list)) else [value]
    normed = [_norm_dim(v, dims) for v in values]
    return len(normed) > 0 and all(v is not None and v >= 1 for v in normed)


def _index_ok(index: Any) -> bool:
    if not isinstance(index, tuple) or not index or not (
        isinstance(index[0], slice) and index[0] == slice(None)
    ):
        return False
    return all(
        i is None or i is Ellipsis or isinstance(i, slice)
        or (isinstance(i, int) and not isinstance(i, bool))
        for i in index[1:]
    )


def _permute_ok(args, kwargs, d):
    order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else \
        args[1:] if len(args) > 1 else kwargs.get("dims", ())
    return len(order) == d and _norm_dim(order[0], d) == 0


# row-wise bias-free linear operations: (rel dims, args, kwargs) -> whether the
# call keeps dimension 0 (the rows) and does not depend on the number of rows
_ROW_OPS: Dict[str, Callable[[int, Sequence[Any], Dict[str, Any]], bool]] = {
    "flatten": lambda d, a, k: _norm_dim(_arg(a, k, 1, "start_dim", 0), d) not in (None, 0),
    "unflatten": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d),
    "unsqueeze": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d + 1),
    "squeeze": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d),
    "transpose": lambda d, a, k: _dims_ok(
        [_arg(a, k, 1, "dim0", None), _arg(a, k, 2, "dim1", None)], d),
    "swapaxes": lambda d, a, k: _dims_ok(
        [_arg(a, k, 1, "axis0", None), _arg(a, k, 2, "axis1", None)], d),
    "swapdims": lambda d, a, k: _dims_ok(
        [_arg(a, k, 1, "dim0", None), _arg(a, k, 2, "dim1", None)], d),
    "permute": lambda d, a, k: _permute_ok(a, k, d),
    "select": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d),
    "narrow": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d),
    "__getitem__": lambda d, a, k: len(a) > 1 and _index_ok(a[1]),
    "chunk": lambda d, a, k: _dims_ok(_arg(a, k, 2, "dim", 0), d),
    "split": lambda d, a, k: _dims_ok(_arg(a, k, 2, "dim", 0), d),
    "unbind": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", 0), d),
    "sum": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d),
    "mean": lambda d, a, k: _dims_ok(_arg(a, k, 1, "dim", None), d),
    "pad": lambda d, a, k: len(_arg(a, k, 1, "pad", ())) // 2 < d,
}
_ROW_OPS.update({
    n: (lambda d, a, k: True)
    for n in ("contiguous", "clone", "detach", "to", "float", "double", "half", "neg",
              "__neg__", "negative")
})
_ROW_OPS.update({
    f"{kind}{n}d": (lambda n: lambda d, a, k: d == n + 2)(n)
    for kind in ("avg_pool", "adaptive_avg_pool") for n in (1, 2, 3)
})
_ROW_OPS.update({
    n: (lambda d, a, k: d == 4) for n in ("pixel_shuffle", "pixel_unshuffle")
})


def _s_row_op(func, name, args, kwargs):
    x = args[0]
    if (
        not isinstance(x, SharedCDTensor) or _shared_in((args[1:], kwargs))
        or _inplace_requested(name, args, kwargs)
        or not _ROW_OPS[name](x.rel.dim(), args, kwargs)
    ):
        return _FALLBACK
    if name == "to" and not func(x.rel.new_empty(0), *args[1:], **kwargs).is_floating_point():
        return _FALLBACK  # an integer cast: the two-stream rule raises
    if name == "pad":
        mode = _arg(args, kwargs, 2, "mode", "constant")
        value = _arg(args, kwargs, 3, "value", None)
        if mode == "constant" and value not in (None, 0, 0.0):
            return _FALLBACK  # the two-stream rule raises
    rest = tuple(args[1:])
    return _map_parts(x, lambda t: func(t, *rest, **kwargs))


def _s_reshape(func, name, args, kwargs):
    """view / reshape keeping the rows: the total rows take the same row shape."""
    x = args[0]
    if not isinstance(x, SharedCDTensor):
        return _FALLBACK
    if name in ("view_as", "reshape_as"):
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if not isinstance(other, Tensor):
            return _FALLBACK
        shape = tuple(_meta_plain(other).shape)
    else:
        if _shared_in((args[1:], kwargs)) or kwargs:
            return _FALLBACK
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) \
            else tuple(args[1:])
        if any(isinstance(s, torch.dtype) for s in shape):
            return _FALLBACK  # view(dtype)
    rows = x.rel.shape[0]
    try:
        rel = (x.rel.view if name.startswith("view") else x.rel.reshape)(tuple(shape))
    except RuntimeError:
        return _FALLBACK
    if rel.dim() == 0 or rel.shape[0] != rows:
        return _FALLBACK
    row_shape = tuple(rel.shape[1:])
    if x.joined is not None:
        joined = x.joined.view((-1,) + row_shape) if name.startswith("view") else \
            x.joined.reshape((-1,) + row_shape)
        return _wrap_joined(joined, rows, x.masks)
    return SharedCDTensor.wrap(rel, x.tot.reshape((-1,) + row_shape), x.masks)


def _s_cat(func, name, args, kwargs):
    tensors = args[0] if args else kwargs.get("tensors")
    if name not in ("cat", "concat", "concatenate", "stack") or not isinstance(
        tensors, (list, tuple)
    ):
        return _FALLBACK
    dim = _arg(args, kwargs, 1, "dim", 0)
    if not tensors or not all(isinstance(t, SharedCDTensor) for t in tensors):
        return _FALLBACK
    first = tensors[0]
    rows, masks, dims = first.rel.shape[0], first.masks, first.rel.dim()
    if any(t.masks != masks or t.rel.dim() != dims or t.rel.shape[0] != rows for t in tensors):
        return _FALLBACK
    if not _dims_ok(dim, dims + 1 if name == "stack" else dims):
        return _FALLBACK
    if all(t.joined is not None for t in tensors):
        return _wrap_joined(func([t.joined for t in tensors], dim), rows, masks)
    return SharedCDTensor.wrap(func([t.rel for t in tensors], dim),
                               func([t.tot for t in tensors], dim), masks)


# function names of each family of rules, shared by both rule tables
# (torch.X, Tensor.X and F.X share names)
_AFFINE_NAMES = ("linear", "conv1d", "conv2d", "conv3d")
_RELU_NAMES = (
    "relu", "relu_", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "relu6", "elu", "elu_",
)
_SMOOTH_NAMES = ("tanh", "tanh_", "sigmoid", "sigmoid_", "gelu", "silu", "softplus")
_MAX_POOL_NAMES = (
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices",
)
_DROPOUT_NAMES = (
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
)
_ADD_NAMES = (
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__isub__",
    "__rsub__", "rsub", "subtract",
)
_SCALE_NAMES = (
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "div", "div_", "__truediv__",
    "__itruediv__", "__rtruediv__", "true_divide", "divide", "matmul", "__matmul__",
    "__rmatmul__", "mm", "bmm",
)
_CAT_NAMES = ("cat", "concat", "concatenate", "stack")

_SHARED_RULES: Dict[str, Callable] = {n: _s_row_op for n in _ROW_OPS}
_SHARED_RULES.update({n: _s_reshape for n in ("view", "reshape", "view_as", "reshape_as")})
_SHARED_RULES.update({n: _s_affine for n in _AFFINE_NAMES})
_SHARED_RULES.update({n: _s_pointwise for n in _RELU_NAMES})
_SHARED_RULES.update({n: _s_smooth for n in _SMOOTH_NAMES})
_SHARED_RULES.update({n: _s_max_pool for n in _MAX_POOL_NAMES})
_SHARED_RULES.update({n: _s_dropout for n in _DROPOUT_NAMES})
_SHARED_RULES.update({n: _s_add for n in _ADD_NAMES})
_SHARED_RULES.update({n: _s_scale for n in _SCALE_NAMES})
_SHARED_RULES.update({n: _s_cat for n in _CAT_NAMES})
_SHARED_RULES["batch_norm"] = _s_batch_norm
_SHARED_RULES["layer_norm"] = _s_layer_norm


# ----------------------------------------------------------------------------
# rule table of the two-part path (keyed by function name)

_LINEAR_NAMES = [
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
    "transpose", "swapaxes", "swapdims", "movedim", "t", "squeeze", "unsqueeze",
    "contiguous", "__getitem__", "select", "narrow", "expand", "expand_as", "repeat",
    "flip", "roll", "chunk", "split", "unbind", "tensor_split", "clone", "detach", "to",
    "float", "double", "half", "type_as", "sum", "mean", "neg", "__neg__", "negative",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "pixel_shuffle", "pixel_unshuffle",
    "diagonal", "tril", "triu",
]

_RULES: Dict[str, Callable] = {}
_RULES.update({n: _rule_linear_op for n in _LINEAR_NAMES})
_RULES.update({n: _rule_affine for n in _AFFINE_NAMES})
_RULES.update({n: _rule_relu_family for n in _RELU_NAMES})
_RULES.update({n: _rule_smooth for n in _SMOOTH_NAMES})
_RULES.update({n: _rule_max_pool for n in _MAX_POOL_NAMES})
_RULES.update({n: _rule_dropout for n in _DROPOUT_NAMES})
_RULES.update({n: _rule_add for n in _ADD_NAMES})
_RULES.update({n: _rule_scale for n in _SCALE_NAMES})
_RULES.update({n: _rule_cat for n in _CAT_NAMES + ("hstack", "vstack")})
_RULES["pad"] = _rule_pad
_RULES["batch_norm"] = _rule_batch_norm
_RULES["layer_norm"] = _rule_layer_norm
_RULES["embedding"] = _rule_embedding
_RULES["lstm"] = _rule_lstm
_INDEX_OK = {"embedding", "to", "contiguous", "clone", "detach", "long", "int"}
_INDEX_RULES = {"to", "contiguous", "clone", "detach", "long", "int"}


def _rule_maybe_index(func, args, kwargs):
    if args and isinstance(args[0], MaskedIndices):
        return _rule_index_passthrough(func, args, kwargs)
    rule = _RULES_BASE.get(_name(func))
    if rule is None:  # e.g. x.long() on a decomposed activation
        raise UnsupportedOperationError(
            f"contextual decomposition has no rule for the operation `{_qualname(func)}` "
            f"applied to a decomposed activation. Supported operations: "
            f"{supported_operations()}"
        )
    return rule(func, args, kwargs)


_RULES_BASE = dict(_RULES)
for _n in _INDEX_RULES:
    _RULES[_n] = _rule_maybe_index


def supported_operations() -> str:
    """A readable list of the operations with a CD rule."""
    groups = [
        "affine: nn.Linear/F.linear, nn.Conv1d/2d/3d",
        "nn.BatchNorm (eval, running stats), nn.LayerNorm",
        "ReLU family: relu, leaky_relu, relu6/hardtanh, elu",
        "Shapley-linearized: tanh, sigmoid, gelu, silu, softplus",
        "max_pool1d/2d/3d, avg_pool*, adaptive_avg_pool*, dropout (eval)",
        "view/reshape/flatten/permute/transpose/indexing/sum/mean/cat/stack/pad(0)",
        "addition of activations (residuals) or of constants, multiplication/division/"
        "matmul by constants",
        "nn.Embedding (token ids), nn.LSTM",
    ]
    return "; ".join(groups)


__all__ = [
    "CDTensor",
    "SharedCDTensor",
    "MaskedIndices",
    "UnsupportedOperationError",
    "supported_operations",
]
