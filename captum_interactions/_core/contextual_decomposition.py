#!/usr/bin/env python3
import contextlib
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from captum._utils.common import _select_targets
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.attribution import Attribution
from captum.log import log_usage
from torch import Tensor
from torch.utils._pytree import tree_flatten

from captum_interactions._utils.cd_rules import CDTensor, MaskedIndices, SharedCDTensor
from captum_interactions._utils.common import (
    RowExpansion,
    check_finite,
    check_target_range,
    explained_dtype_errors,
    format_inputs,
    model_modules,
    preserved_module_state,
    validate_internal_batch_size,
    validate_target,
    warn_if_nonfinite,
)
from captum_interactions._utils.feature_groups import FeatureGroups, split_features
from captum_interactions._utils.memory import (
    ActivationMeter,
    cd_masks_per_chunk,
    get_memory_budget,
)

MaskType = Union[Tensor, Tuple[Tensor, ...]]


def _output_dtype(inputs: Tuple[Tensor, ...]) -> torch.dtype:
    for inp in inputs:
        if inp.is_floating_point():
            return inp.dtype
    return torch.get_default_dtype()


#: On CPU (without ``internal_batch_size``) a pass holds at most this many
#: bytes of activations: larger tensors cost more per element (fresh pages for
#: every allocation above the allocator's reuse threshold, cache misses). On
#: the benchmark CNN 784 single-pixel masks take 3x longer in one pass than in
#: chunks of about 200; results do not depend on the chunking.
_CPU_CHUNK_BYTES = 32 * 2**20
#: ... measured on a first chunk of at most this many rows. Neither goes below
#: this many masks (each pass also computes the N examples' totals; the memory
#: budget still rules)
_CPU_FIRST_CHUNK_ROWS = 64
_CPU_MIN_CHUNK_MASKS = 8


class ContextualDecomposition(Attribution):
    r"""
    Contextual decomposition: the part of the output due to a group of features.

    Contextual decomposition (CD) splits every activation of a network into a
    part due to a group of input features (relevant, :math:`\beta`) and a part
    due to everything else (irrelevant, :math:`\gamma`), with
    :math:`\beta + \gamma` equal to the true activation at every layer, and
    reads the relevant part of the output as the group's importance (Murdoch,
    Liu and Yu 2018; Singh, Murdoch and Yu 2019).

    The pair is propagated in the real execution order of the forward pass by
    intercepting torch operations (a tensor subclass with
    ``__torch_function__``), so functional calls (``F.relu``,
    ``torch.flatten``), residual ``+`` and ``x.view`` work, in any module
    order. Rules (see :mod:`captum_interactions._utils.cd_rules` for all of
    them): affine layers (``Linear``, ``Conv1d/2d``) apply the weights to both
    parts and share the bias in proportion to :math:`|W\beta|, |W\gamma|`;
    ReLU-family activations give :math:`\beta' = f(\beta)`,
    :math:`\gamma' = f(\beta + \gamma) - f(\beta)`; max-pooling gathers both
    parts at the argmax of the total; linear bias-free operations act on each
    part; batch norm (eval) is affine; layer norm centres each part and scales
    by the total's standard deviation; ``tanh``/``sigmoid``/``GELU`` use a
    two-player Shapley linearization; ``Embedding`` makes the rows of the
    relevant tokens relevant; ``LSTM`` uses Murdoch's rules. An operation
    without a rule raises an error naming it.

    Many masks are decomposed in one forward pass: for N examples and M masks
    the model runs once on M x N rows (mask-major, ``row = mask * N + example``).
    The true activation of an example is the same for all of its masks, so it
    is computed once (N more rows) and only the relevant part is carried per
    mask; the irrelevant part is the difference, taken where a rule needs it.
    The results equal those of carrying both parts to round-off, at about half
    the cost; operations without a rule of that kind carry both parts.
    The model is explained in eval mode; its train/eval flags are restored
    afterwards, even when the call raises.

    **Empty and full masks.** With every feature relevant the irrelevant part
    stays 0 at every layer and the output decomposes as (f(x), 0); with none
    relevant, (0, f(x)) (both up to round-off, as nonlinear rules compute one
    part as f(total) minus the other). This holds because a bias whose unit has
    :math:`W\beta = W\gamma = 0` exactly (a convolution window over an all-zero
    region) is shared by the relevant fraction of the layer input's L1 mass for
    that example, not evenly. The one exception: an example whose input to a
    biased layer is entirely zero shares that layer's biases evenly.

    Papers: https://arxiv.org/abs/1801.05453 (CD),
    https://arxiv.org/abs/1806.05337 (ACD, CD for CNNs)
    """

    #: Carry the true activation once per example and only the relevant part
    #: per mask (the irrelevant part is their difference). False: carry both
    #: parts of every mask (the same decomposition up to round-off, about twice
    #: the work; kept as the reference the tests compare with).
    _shared_total: bool = True

    def __init__(self, forward_func: Callable) -> None:
        r"""
        Args:
            forward_func (Callable): the model (an ``nn.Module``) or its forward
                function. The decomposition follows the torch operations it
                executes on the inputs.
        """
        Attribution.__init__(self, forward_func)

    # ------------------------------------------------------------------
    # core: many masks, one pass per chunk

    def _decompose_masks(
        self,
        inputs: Tuple[Tensor, ...],
        masks: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        internal_batch_size: Optional[int],
        select_target: bool,
        warn: bool = True,
    ) -> Tuple[Tensor, Tensor]:
        """Masks (M, N or 1, *F_i) per input -> relevant/irrelevant outputs (M, N, ...);
        ``warn``: a NonFiniteResultWarning for examples with NaN/inf scores."""
        num_examples = inputs[0].shape[0]
        num_masks = masks[0].shape[0]
        chunking = dict(
            num_masks=num_masks,
            num_examples=num_examples,
            num_features=sum(int(x[0].numel()) for x in inputs),
            mask_rows=max(m.shape[1] for m in masks),
            itemsize=torch.finfo(_output_dtype(inputs)).bits // 8,
            internal_batch_size=internal_batch_size,
            budget=get_memory_budget(inputs[0].device),
            method=type(self).__name__,
        )
        # planned with a prior on the activations, re-planned once measured
        per_chunk = cd_masks_per_chunk(**chunking)
        cpu_cap = internal_batch_size is None and inputs[0].device.type == "cpu"
        if cpu_cap:
            # a first chunk of moderate size measures the activations (below)
            per_chunk = min(per_chunk, max(
                _CPU_MIN_CHUNK_MASKS, _CPU_FIRST_CHUNK_ROWS // num_examples))
        measured = False
        expansion = RowExpansion(target, additional_forward_args, num_examples, num_masks)
        rels, irrs = [], []
        start = 0
        while start < num_masks:
            stop = min(num_masks, start + per_chunk)
            chunk_target, chunk_args = expansion.rows(start * num_examples, stop * num_examples)
            # the activations are measured only to re-plan later chunks
            meter = ActivationMeter(self.forward_func) if not measured and stop < num_masks \
                else None
            with meter if meter is not None else contextlib.nullcontext():
                rel, irr = self._run_rows(
                    inputs, tuple(m[start:stop] for m in masks), chunk_args
                )
            if meter is not None and meter.measured:
                measured = True
                per_row = meter.numel / ((stop - start) * num_examples)
                per_chunk = cd_masks_per_chunk(**chunking, activations_per_row=per_row)
                if cpu_cap:
                    per_chunk = min(per_chunk, max(
                        _CPU_MIN_CHUNK_MASKS,
                        int(_CPU_CHUNK_BYTES // (per_row * chunking["itemsize"] * num_examples)),
                    ))
            if select_target:
                rel = self._select(rel, chunk_target)
                irr = self._select(irr, chunk_target)
            rels.append(rel.reshape((stop - start, num_examples) + rel.shape[1:]))
            irrs.append(irr.reshape((stop - start, num_examples) + irr.shape[1:]))
            start = stop
        rel, irr = torch.cat(rels), torch.cat(irrs)
        if warn:  # (examples first for the warning)
            warn_if_nonfinite(rel.transpose(0, 1), type(self).__name__, "in the forward pass")
        return rel, irr

    @staticmethod
    def _select(output: Tensor, target: TargetType) -> Tensor:
        rows = output.shape[0]
        if target is not None and output.dim() >= 2:
            check_target_range(target, tuple(output.shape[1:]))
        try:
            selected = _select_targets(output, target)
        except (AssertionError, IndexError) as err:
            raise ValueError(
                f"`target`={target!r} cannot select from the model output of shape "
                f"{tuple(output.shape[1:])} per example: {err}"
            ) from err
        if selected.dim() == 2 and selected.shape[1] == 1:
            selected = selected[:, 0]
        if selected.dim() != 1 or selected.shape[0] != rows:
            hint = (
                " Pass `target` to select one output per example."
                if target is None
                else f" `target`={target!r} does not select one scalar per example."
            )
            raise ValueError(
                "the forward function must give one scalar per example after target "
                f"selection; it gives an output of shape {tuple(selected.shape[1:])} "
                f"per example.{hint}"
            )
        return selected

    def _run_rows(
        self,
        inputs: Tuple[Tensor, ...],
        masks: Tuple[Tensor, ...],
        additional_forward_args: Any,
    ) -> Tuple[Tensor, Tensor]:
        wrapped: List[Tensor] = []
        for x, mask in zip(inputs, masks):
            k = mask.shape[0]
            rows = (k * x.shape[0],) + tuple(x.shape[1:])
            x_rows = x.unsqueeze(0).expand((k,) + tuple(x.shape))
            if x.is_floating_point() and self._shared_total:
                # relevant rows of the k masks, then the example rows (the
                # total, shared by every mask), in one buffer
                joined = x.new_empty((rows[0] + x.shape[0],) + tuple(x.shape[1:]))
                torch.mul(x_rows, mask.to(x.dtype), out=joined[: rows[0]].view(x_rows.shape))
                joined[rows[0]:].copy_(x)
                wrapped.append(SharedCDTensor.wrap(joined[: rows[0]], joined[rows[0]:], k, joined))
            elif x.is_floating_point():
                m = mask.to(x.dtype)
                # the parts side by side in one buffer: the first layer then
                # takes both in one call without concatenating them
                pair = x.new_empty((2,) + tuple(x_rows.shape))
                torch.mul(x_rows, m, out=pair[0])
                torch.mul(x_rows, 1 - m, out=pair[1])
                rel, irr = pair[0].reshape(rows), pair[1].reshape(rows)
                wrapped.append(CDTensor.wrap(rel, irr, x_rows.reshape(rows).clone()))
            else:
                m = mask.expand((k,) + tuple(x.shape)).reshape(rows)
                wrapped.append(MaskedIndices.wrap(x_rows.reshape(rows).clone(), m))
        extra = additional_forward_args
        if extra is not None and not isinstance(extra, tuple):
            extra = (extra,)
        with torch.no_grad(), preserved_module_state(self.forward_func):
            for module in model_modules(self.forward_func):
                module.eval()
            with explained_dtype_errors(self.forward_func, inputs):
                output = self.forward_func(*wrapped, *(extra or ()))
        leaves = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
        if not leaves:
            raise TypeError("the forward function must return a tensor")
        out = leaves[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the forward function must return a tensor, got {type(output).__name__}"
            )
        if isinstance(out, CDTensor):
            return out.rel, out.irr
        if isinstance(out, SharedCDTensor):
            rel = out.rel
            irr = torch.sub(out.tot.unsqueeze(0), rel.unflatten(0, (out.masks, -1)))
            return rel, irr.flatten(0, 1)
        # the output does not depend on the inputs at all: everything is irrelevant
        plain = out.as_subclass(Tensor) if isinstance(out, Tensor) else out
        return torch.zeros_like(plain), plain

    # ------------------------------------------------------------------
    # public API

    def decompose(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        mask: MaskType,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
    ) -> Tuple[Tensor, Tensor]:
        r"""
        Relevant and irrelevant parts of the model output for binary masks.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs, batch first; floating
                point features, or integer token ids consumed by an embedding.
            mask (Tensor or tuple[Tensor, ...]): one binary mask per input
                (1 = relevant), broadcastable to the input (leading dimension
                N or 1), or a batch of M masks of shape (M, N or 1, *F) (one
                more dimension than the input); all M masks run in one pass.
            target (int, tuple, Tensor or list, optional): output selection with
                Captum's semantics; None returns the whole output.
                Default: None
            additional_forward_args (Any, optional): further forward arguments.
                Default: None
            internal_batch_size (int, optional): most rows (masks x examples) per
                forward pass. Default: None (all at once)

        Returns:
            (**relevant**, **irrelevant**): model outputs of shape (N, ...) for one
            mask, (M, N, ...) for a batch of masks (after target selection if
            ``target`` is given); ``relevant + irrelevant`` is the model output.

        Examples::

            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
            ...                             torch.nn.Linear(8, 2))
            >>> cd = ContextualDecomposition(model)
            >>> x = torch.randn(3, 4)
            >>> rel, irr = cd.decompose(x, torch.tensor([1, 1, 0, 0]))
            >>> torch.allclose(rel + irr, model(x), atol=1e-6)
            True
        """
        inputs_t = format_inputs(inputs, allow_integer=True)
        validate_internal_batch_size(internal_batch_size)
        check_finite(inputs_t, "inputs")
        num_examples = inputs_t[0].shape[0]
        if target is not None:
            validate_target(target, num_examples)
        masks_t = mask if isinstance(mask, tuple) else (mask,)
        if len(masks_t) != len(inputs_t):
            raise ValueError(
                f"`mask` must have one tensor per input tensor: got {len(masks_t)} "
                f"masks for {len(inputs_t)} inputs"
            )
        batched = None
        formatted = []
        for i, (m, x) in enumerate(zip(masks_t, inputs_t)):
            if not isinstance(m, Tensor):
                raise TypeError(f"`mask[{i}]` must be a tensor, got {type(m).__name__}")
            m = m.to(x.device)
            is_batch = m.dim() == x.dim() + 1
            if batched is None:
                batched = is_batch
            elif batched != is_batch:
                raise ValueError("`mask`: either every tensor is one mask or every one is a batch")
            if not ((m == 0) | (m == 1)).all():
                raise ValueError(f"`mask[{i}]` must be binary (0/1 or bool)")
            try:
                if is_batch:
                    if m.shape[1] not in (1, x.shape[0]):
                        raise RuntimeError
                    m = m.expand((m.shape[0], m.shape[1]) + tuple(x.shape[1:]))
                else:
                    m = m.expand_as(x) if m.dim() == x.dim() else m.expand((1,) + tuple(x.shape[1:]))
                    m = m.unsqueeze(0)
            except RuntimeError:
                raise ValueError(
                    f"`mask[{i}]` of shape {tuple(m.shape)} does not broadcast to "
                    f"`inputs[{i}]` of shape {tuple(x.shape)} (one mask) or to "
                    f"(M, {', '.join(map(str, x.shape))}) (a batch of masks)"
                ) from None
            formatted.append(m)
        counts = {m.shape[0] for m in formatted}
        if len(counts) != 1:
            raise ValueError(f"`mask`: every input needs the same number of masks, got {counts}")
        rel, irr = self._decompose_masks(
            inputs_t, tuple(formatted), target, additional_forward_args,
            internal_batch_size, select_target=target is not None,
        )
        if not batched:
            rel, irr = rel[0], irr[0]
        return rel, irr

    def _check_masks_fit(
        self, inputs: Tuple[Tensor, ...], groups: FeatureGroups, num_masks: int
    ) -> None:
        """Raise before the (M, rows, D) masks are built if they cannot fit the budget."""
        cd_masks_per_chunk(
            num_masks=num_masks,
            num_examples=inputs[0].shape[0],
            num_features=groups.num_features,
            mask_rows=groups.index.shape[0],
            itemsize=torch.finfo(_output_dtype(inputs)).bits // 8,
            internal_batch_size=None,
            budget=get_memory_budget(inputs[0].device),
            method=type(self).__name__,
        )

    def _group_masks(
        self, inputs: Tuple[Tensor, ...], groups: FeatureGroups, members: Tensor
    ) -> Tuple[Tensor, ...]:
        """Masks of unions of groups: ``members`` (M, G) 0/1 -> per input (M, N or 1, *F_i)."""
        index = groups.index  # (1 or N, D)
        flat = members[:, index]  # (M, 1 or N, D)
        return split_features(flat, groups.feature_shapes)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
    ) -> Tensor:
        r"""
        CD score (relevant part of the selected output) of every feature group.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs, batch first; floating
                point features, or integer token ids consumed by an embedding.
            feature_mask (Tensor or tuple[Tensor, ...], optional): integer group
                ids broadcastable to each input (Captum's meaning; ids global
                across the tuple). None makes every scalar feature (every token
                for token ids) its own group. Default: None
            target (int, tuple, Tensor or list, optional): output index with
                Captum's semantics; required for multi-output models.
                Default: None
            additional_forward_args (Any, optional): further forward arguments.
                Default: None
            internal_batch_size (int, optional): most rows (groups x examples)
                per forward pass; does not change the result. Default: None

        Returns:
            **scores** (Tensor): shape (N, G), the relevant output of each group,
            groups in sorted id order. All G decompositions run in one pass.

        Examples::

            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
            ...                             torch.nn.Flatten(), torch.nn.Linear(36, 3))
            >>> x = torch.randn(2, 1, 5, 5)
            >>> quadrants = torch.tensor([[0, 0, 1, 1, 1]] * 2 + [[2, 2, 3, 3, 3]] * 3)
            >>> scores = ContextualDecomposition(model).attribute(
            ...     x, feature_mask=quadrants.view(1, 1, 5, 5), target=0)
            >>> scores.shape
            torch.Size([2, 4])
        """
        inputs_t = format_inputs(inputs, allow_integer=True)
        validate_internal_batch_size(internal_batch_size)
        validate_target(target, inputs_t[0].shape[0])
        check_finite(inputs_t, "inputs")
        groups = FeatureGroups(feature_mask, inputs_t)
        self._check_masks_fit(inputs_t, groups, groups.num_groups)
        members = torch.eye(groups.num_groups, dtype=torch.bool, device=inputs_t[0].device)
        rel, _ = self._decompose_masks(
            inputs_t, self._group_masks(inputs_t, groups, members), target,
            additional_forward_args, internal_batch_size, select_target=True,
        )
        return rel.T.to(_output_dtype(inputs_t))

    def interactions(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
    ) -> Tensor:
        r"""
        CD interactions of feature groups.

        Off the diagonal, entry (S, T) is :math:`CD(S \cup T) - CD(S) - CD(T)`
        (symmetric); the diagonal holds the main effect :math:`CD(S)` (the
        group's own score, as in :meth:`attribute`). Unlike Hessian-based
        interactions, rows do not sum to a first-order attribution: CD is not
        additive over groups. G + G(G-1)/2 decompositions run in one pass.

        Args:
            inputs, feature_mask, target, additional_forward_args,
            internal_batch_size: as in :meth:`attribute`.

        Returns:
            **interactions** (Tensor): shape (N, G, G), groups in sorted id order.

        Examples::

            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
            ...                             torch.nn.Linear(8, 1))
            >>> x = torch.randn(2, 4)
            >>> inter = ContextualDecomposition(model).interactions(
            ...     x, feature_mask=torch.tensor([0, 0, 1, 2]))
            >>> inter.shape
            torch.Size([2, 3, 3])
        """
        inputs_t = format_inputs(inputs, allow_integer=True)
        validate_internal_batch_size(internal_batch_size)
        num_examples = inputs_t[0].shape[0]
        validate_target(target, num_examples)
        check_finite(inputs_t, "inputs")
        groups = FeatureGroups(feature_mask, inputs_t)
        g = groups.num_groups
        self._check_masks_fit(inputs_t, groups, g + g * (g - 1) // 2)
        device = inputs_t[0].device
        rows, cols = torch.triu_indices(g, g, offset=1, device=device)
        eye = torch.eye(g, dtype=torch.bool, device=device)
        members = torch.cat([eye, eye[rows] | eye[cols]])
        rel, _ = self._decompose_masks(
            inputs_t, self._group_masks(inputs_t, groups, members), target,
            additional_forward_args, internal_batch_size, select_target=True,
        )
        rel = rel.T.to(_output_dtype(inputs_t))  # (N, G + pairs)
        single, pair = rel[:, :g], rel[:, g:]
        out = torch.diag_embed(single)
        values = pair - single[:, rows] - single[:, cols]
        out[:, rows, cols] = values
        out[:, cols, rows] = values
        return out
