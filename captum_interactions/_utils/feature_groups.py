#!/usr/bin/env python3
"""Feature groups from a Captum ``feature_mask``, over the flattened inputs.

Every method works on the inputs flattened and concatenated into one feature
axis of length D = sum_i prod(F_i). A :class:`FeatureGroups` maps that axis to G
groups (G = D and the identity map when there is no mask), sums per-feature
values into groups and builds group-indicator directions, so that a G x G
result never forms a D x D matrix.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


def flatten_features(tensors: Sequence[Tensor], batch_dims: int = 1) -> Tensor:
    """Concatenate tensors of shape (*B, *F_i) into (*B, D)."""
    return torch.cat(
        [t.reshape(t.shape[:batch_dims] + (-1,)) for t in tensors], dim=batch_dims
    )


def split_features(
    flat: Tensor, feature_shapes: Sequence[Tuple[int, ...]]
) -> Tuple[Tensor, ...]:
    """Inverse of :func:`flatten_features` along the last axis."""
    sizes = [int(torch.Size(s).numel()) for s in feature_shapes]
    pieces = torch.split(flat, sizes, dim=-1)
    return tuple(
        p.reshape(flat.shape[:-1] + tuple(s)) for p, s in zip(pieces, feature_shapes)
    )


class FeatureGroups:
    """Groups of the flattened features, as given by a Captum ``feature_mask``.

    Args:
        feature_mask (Tensor or tuple[Tensor, ...] or None): integer group ids,
            one tensor per input, each broadcastable to that input (leading
            dimension N or 1). Ids are global across the tuple: the same id in
            two inputs is one group. Groups are ordered by sorted id. ``None``
            makes every scalar feature its own group (G = D).
        inputs (tuple[Tensor, ...]): the formatted inputs, batch first.
    """

    def __init__(
        self,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]],
        inputs: Tuple[Tensor, ...],
    ) -> None:
        self.feature_shapes = [tuple(inp.shape[1:]) for inp in inputs]
        self.num_features = sum(int(torch.Size(s).numel()) for s in self.feature_shapes)
        self.num_examples = inputs[0].shape[0]
        device = inputs[0].device
        self.is_identity = feature_mask is None
        if feature_mask is None:
            self.num_groups = self.num_features
            self.group_ids = torch.arange(self.num_features, device=device)
            self.index = self.group_ids.unsqueeze(0)  # (1, D)
            return
        masks = feature_mask if isinstance(feature_mask, tuple) else (feature_mask,)
        if len(masks) != len(inputs):
            raise ValueError(
                f"`feature_mask` must have one tensor per input tensor: got "
                f"{len(masks)} masks for {len(inputs)} inputs"
            )
        expanded_masks = []
        per_example = False
        for i, (mask, inp) in enumerate(zip(masks, inputs)):
            if not isinstance(mask, Tensor) or mask.is_floating_point():
                raise TypeError(
                    f"`feature_mask[{i}]` must be an integer tensor of group ids"
                )
            mask = mask.to(inp.device)
            try:
                expanded = mask.expand_as(inp) if mask.dim() <= inp.dim() else None
            except RuntimeError:
                expanded = None
            if expanded is None:
                raise ValueError(
                    f"`feature_mask[{i}]` of shape {tuple(mask.shape)} does not "
                    f"broadcast to `inputs[{i}]` of shape {tuple(inp.shape)}"
                )
            if mask.dim() == inp.dim() and mask.shape[0] == inp.shape[0] > 1:
                per_example = True
            expanded_masks.append(expanded)
        # shared masks: the first example's row only (no copy of N equal rows)
        flat_masks = [m.reshape(m.shape[0], -1) if per_example else m[:1].reshape(1, -1)
                      for m in expanded_masks]
        flat = (flat_masks[0] if len(flat_masks) == 1 else torch.cat(flat_masks, dim=1)).long()
        self.group_ids, self.index = torch.unique(flat, sorted=True, return_inverse=True)
        self.num_groups = int(self.group_ids.numel())

    def row_index(self, example_index: Optional[Tensor]) -> Tensor:
        """Group index of every feature, (1, D) if shared else (rows, D)."""
        if self.index.shape[0] == 1 or example_index is None:
            return self.index
        return self.index[example_index]

    def group_sum(self, values: Tensor, example_index: Optional[Tensor] = None) -> Tensor:
        """Sum the last axis (D) of ``values`` (..., rows, D) into groups (..., rows, G)."""
        if self.is_identity:
            return values
        index = self.row_index(example_index).expand(values.shape)
        out = values.new_zeros(values.shape[:-1] + (self.num_groups,))
        return out.scatter_add_(-1, index, values)

    def indicators(
        self,
        start: int,
        stop: int,
        example_index: Optional[Tensor] = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """1_{feature in group g} for g in [start, stop): shape (stop-start, rows or 1, D)."""
        index = self.row_index(example_index)
        groups = torch.arange(start, stop, device=index.device).view(-1, 1, 1)
        return (index.unsqueeze(0) == groups).to(dtype)

    def split(self, flat: Tensor) -> Tuple[Tensor, ...]:
        return split_features(flat, self.feature_shapes)
