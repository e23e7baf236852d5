#!/usr/bin/env python3
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.typing import TargetType
from captum.attr._utils.attribution import Attribution
from captum.log import log_usage
from torch import Tensor

from captum_interactions._core.contextual_decomposition import ContextualDecomposition
from captum_interactions._utils.common import (
    check_finite,
    format_inputs,
    validate_internal_batch_size,
    validate_target,
    warn_nonfinite_examples,
)


@dataclass
class HierarchyLevel:
    """One level of an ACD hierarchy.

    Attributes:
        groups (list[Tensor]): unit indices (sorted, int64) of every group.
        scores (Tensor): CD score of every group, shape (len(groups),).
        parents (Tensor): index of the group of the next level that contains
            each group, -1 at the top level (or, at level 0, for a unit not yet
            selected at level 1).
    """

    groups: List[Tensor]
    scores: Tensor
    parents: Tensor


class Hierarchy:
    """The ACD hierarchy of one example.

    Level 0 holds every unit (a token, or a ``block_size`` x ``block_size``
    pixel block) as a singleton with its CD score; level k >= 1 holds the
    connected components (contiguous phrases, 4-connected image regions) after
    the k-th agglomeration step, with their CD scores. Every group of level k
    is contained in one group of level k + 1 (its ``parents`` entry). The last
    level is a single group covering the whole input (when the
    agglomeration ran to the end), whose score is the full-mask CD score, i.e.
    the model output.

    Attributes:
        kind (str): ``"sequence"`` or ``"image"``.
        levels (list[HierarchyLevel]): level 0 (units) to the top.
        unit_map (Tensor): unit index of every position, shape (T,) or (H, W).
        grid_shape (tuple[int, ...]): number of units per axis.
    """

    def __init__(
        self,
        kind: str,
        levels: List[HierarchyLevel],
        unit_map: Tensor,
        grid_shape: Tuple[int, ...],
    ) -> None:
        self.kind = kind
        self.levels = levels
        self.unit_map = unit_map
        self.grid_shape = grid_shape

    @property
    def num_units(self) -> int:
        """Number of units (tokens or pixel blocks) of the hierarchy."""
        return len(self.levels[0].groups)

    def __len__(self) -> int:
        return len(self.levels)

    def __repr__(self) -> str:
        sizes = [len(level.groups) for level in self.levels]
        return f"Hierarchy(kind={self.kind!r}, units={self.num_units}, groups per level={sizes})"

    def unit_labels(self, level: int) -> Tensor:
        """Group index of every unit at ``level`` (-1: not in a group yet), shape (U,)."""
        labels = torch.full((self.num_units,), -1, dtype=torch.long, device=self.unit_map.device)
        for index, group in enumerate(self.levels[level].groups):
            labels[group] = index
        return labels

    def labels(self, level: int) -> Tensor:
        """Group index of every position (token or pixel) at ``level``, -1 if none."""
        return self.unit_labels(level)[self.unit_map]

    def score_map(self, level: int) -> Tensor:
        """Score of the group holding each position at ``level`` (NaN outside groups)."""
        scores = self.levels[level].scores
        labels = self.labels(level)
        out = torch.full(labels.shape, float("nan"), dtype=scores.dtype, device=scores.device)
        inside = labels >= 0
        out[inside] = scores[labels[inside]]
        return out

    def plot(self, *args: Any, **kwargs: Any):
        """:meth:`plot_text` for sequences, :meth:`plot_image` for images."""
        if self.kind == "sequence":
            return self.plot_text(*args, **kwargs)
        return self.plot_image(*args, **kwargs)

    def plot_text(
        self,
        words: Optional[Sequence[str]] = None,
        ax: Any = None,
        cmap: Any = None,
        fmt: str = "{:.2f}",
    ):
        """Plot the hierarchy of a sequence as a phrase tree.

        One row per level (units at the bottom), one box per
        phrase spanning its words, coloured by score (default: Captum's red -
        white - green) with a colour bar. Returns (figure, axis). Drawn by
        :func:`captum_interactions.visualization.visualize_hierarchy`."""
        from captum_interactions.visualization import visualize_hierarchy

        return visualize_hierarchy(self, words=words, cmap=cmap, value_format=fmt,
                                   plt_fig_axis=None if ax is None else (ax.figure, ax))

    def plot_image(
        self,
        image: Optional[Tensor] = None,
        levels: Optional[Sequence[int]] = None,
        cmap: Any = None,
        ncols: int = 4,
    ):
        """Plot the hierarchy of an image as region overlays, one panel per level.

        Each group is coloured by its CD score (default: Captum's red - white -
        green, with a colour bar), the image's ink outlined. Returns (figure,
        array of axes). Drawn by
        :func:`captum_interactions.visualization.visualize_hierarchy`."""
        from captum_interactions.visualization import visualize_hierarchy

        return visualize_hierarchy(self, image=image, levels=levels, cmap=cmap, ncols=ncols)


def _adjacency(kind: str, grid_shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """(U, U) bool: neighbouring units (sequence: i +- 1; image: 4-neighbourhood)."""
    if kind == "sequence":
        (length,) = grid_shape
        idx = torch.arange(length, device=device)
        return (idx[:, None] - idx[None, :]).abs() == 1
    rows, cols = grid_shape
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return ((r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()) == 1


def _edges(adjacency: Tensor) -> Tuple[Tensor, Tensor]:
    """(source, destination) unit indices of the neighbour pairs, both directions."""
    src, dst = torch.nonzero(adjacency, as_tuple=True)
    return src, dst


def _components(selected: Tensor, edges: Tuple[Tensor, Tensor]) -> Tensor:
    """Connected components of the selected units: label per unit (-1 unselected),
    numbered 0.. in order of their first unit.

    Min-label propagation over the edge list (O(edges) per sweep, not a dense
    U x U pass) with pointer jumping (a unit takes its label's label), which
    shortens chains of labels geometrically. At the fixpoint neighbours agree,
    so every unit holds the smallest unit index of its component."""
    src, dst = edges
    keep = selected[src] & selected[dst]
    src, dst = src[keep], dst[keep]
    units = selected.numel()
    idx = torch.arange(units, device=selected.device)
    labels = idx.clone()
    while True:
        new = labels.scatter_reduce(0, dst, labels[src], reduce="amin")
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    roots = torch.unique(labels[selected])
    out = torch.full_like(idx, -1)
    out[selected] = torch.searchsorted(roots, labels[selected])
    return out


class AgglomerativeContextualDecomposition(Attribution):
    r"""
    Agglomerative contextual decomposition: a hierarchy of feature groups.

    Agglomerative contextual decomposition (ACD; Singh, Murdoch and Yu, ICLR
    2019) builds a hierarchy of feature groups for one prediction, scoring
    groups with contextual decomposition (:class:`ContextualDecomposition`).

    The input is split into units (tokens of a sequence, or
    ``block_size`` x ``block_size`` pixel blocks of an image). Starting from the
    CD score of every unit, each step

    1. selects the not-yet-selected units whose candidate score is at or above
       the ``percentile``-th percentile of the remaining candidates (at least
       one unit);
    2. forms the connected components of all selected units (contiguous
       phrases for sequences, 4-connected regions for images): one level of the
       hierarchy, each component scored by CD;
    3. rescores every unselected unit u next to a component C by the CD gain of
       adding it, :math:`CD(C \cup \{u\}) - CD(C)` (the best over neighbouring
       components); units next to no component keep their previous score.

    It stops when every unit is selected (or after ``max_levels`` levels). The
    CD scores of all components and all candidate merges of a step are
    computed in one batched CD pass.

    Paper: https://arxiv.org/abs/1806.05337
    """

    def __init__(self, forward_func: Callable) -> None:
        r"""
        Args:
            forward_func (Callable): the model or its forward function, with the
                operations :class:`ContextualDecomposition` supports.
        """
        Attribution.__init__(self, forward_func)
        self.cd = ContextualDecomposition(forward_func)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Any = None,
        structure: str = "auto",
        block_size: int = 1,
        percentile: float = 75.0,
        absolute: bool = False,
        max_levels: Optional[int] = None,
        internal_batch_size: Optional[int] = None,
    ) -> Union[Hierarchy, List[Hierarchy]]:
        r"""
        The ACD hierarchy of feature groups of each example, scored by contextual decomposition.

        Args:
            inputs (Tensor): one input tensor, batch first: token ids (N, T) or
                sequence features (N, T, E) for ``structure="sequence"`` (units
                along dimension 1), or images (N, C, H, W) / (N, H, W) for
                ``structure="image"`` (units over the last two dimensions).
            target (int, tuple, Tensor or list, optional): output to explain,
                Captum's semantics. Default: None
            additional_forward_args (Any, optional): further forward arguments.
                Default: None
            structure (str, optional): ``"sequence"``, ``"image"`` or ``"auto"``
                (integer inputs are sequences, 4-d inputs images).
                Default: "auto"
            block_size (int, optional): positions (sequence) or pixels per side
                (image) of one unit. Default: 1
            percentile (float, optional): in [0, 100); units at or above this
                percentile of the remaining candidate scores join at each step
                (lower = more units per step, fewer levels). Default: 75.0
            absolute (bool, optional): rank candidates by absolute score instead
                of by signed score towards the target. Default: False
            max_levels (int, optional): stop after this many agglomeration
                levels. Default: None (until every unit is selected)
            internal_batch_size (int, optional): most masks per CD pass.
                Default: None

        Returns:
            **hierarchy** (Hierarchy or list[Hierarchy]): for N = 1 one
            :class:`Hierarchy`, else a list with one per example.

        Examples::

            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1),
            ...     torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 3))
            >>> acd = AgglomerativeContextualDecomposition(model)
            >>> hierarchy = acd.attribute(torch.randn(1, 1, 8, 8), target=0, block_size=2)
            >>> fig, axes = hierarchy.plot(torch.randn(1, 8, 8))
        """
        if not isinstance(inputs, Tensor):
            raise TypeError(f"`inputs` must be one tensor, got {type(inputs).__name__}")
        format_inputs(inputs, allow_integer=True)  # batch dimension, N >= 1, dtype
        check_finite(inputs, "inputs")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"`block_size` must be an integer >= 1, got {block_size!r}")
        if not isinstance(percentile, (int, float)) or not 0 <= percentile < 100:
            raise ValueError(f"`percentile` must be in [0, 100), got {percentile!r}")
        if max_levels is not None and (not isinstance(max_levels, int) or max_levels < 1):
            raise ValueError(f"`max_levels` must be None or an integer >= 1, got {max_levels!r}")
        validate_internal_batch_size(internal_batch_size)
        kind = self._structure(inputs, structure)
        num_examples = inputs.shape[0]
        validate_target(target, num_examples)
        device = inputs.device
        if kind == "sequence":
            length = inputs.shape[1]
            grid: Tuple[int, ...] = (math.ceil(length / block_size),)
            unit_map = torch.arange(length, device=device) // block_size
            mask_shape = (1, length) + (1,) * (inputs.dim() - 2)
        else:
            height, width = inputs.shape[-2:]
            grid = (math.ceil(height / block_size), math.ceil(width / block_size))
            rows = torch.arange(height, device=device) // block_size
            cols = torch.arange(width, device=device) // block_size
            unit_map = rows[:, None] * grid[1] + cols[None, :]
            mask_shape = (1,) * (inputs.dim() - 2) + (height, width)
        adjacency = _adjacency(kind, grid, device)
        hierarchies = []
        nonfinite: List[int] = []  # examples with a NaN/inf score, reported once
        for n in range(num_examples):
            example_target, example_args = _example_slice(
                target, additional_forward_args, n, num_examples
            )

            def score(members: Tensor) -> Tensor:
                masks = members[:, unit_map].reshape((members.shape[0],) + mask_shape)
                rel, _ = self.cd._decompose_masks(
                    (inputs[n : n + 1],), (masks,), example_target, example_args,
                    internal_batch_size, select_target=True, warn=False,
                )
                if (not nonfinite or nonfinite[-1] != n) and not bool(
                    torch.isfinite(rel).all()
                ):
                    nonfinite.append(n)
                return rel[:, 0]

            hierarchies.append(
                _agglomerate(score, kind, grid, unit_map, adjacency, percentile, absolute,
                             max_levels)
            )
        warn_nonfinite_examples(
            nonfinite, num_examples, type(self).__name__, "in the forward pass",
            inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype(),
        )
        return hierarchies[0] if num_examples == 1 else hierarchies

    @staticmethod
    def _structure(inputs: Tensor, structure: str) -> str:
        if structure not in ("auto", "sequence", "image"):
            raise ValueError(
                f"`structure` must be 'auto', 'sequence' or 'image', got {structure!r}"
            )
        if structure == "auto":
            if not inputs.is_floating_point() and inputs.dim() == 2:
                return "sequence"
            if inputs.dim() == 4:
                return "image"
            raise ValueError(
                f"`structure='auto'` cannot tell a sequence from an image for inputs of "
                f"shape {tuple(inputs.shape)}; pass structure='sequence' or 'image'"
            )
        if structure == "sequence" and inputs.dim() < 2:
            raise ValueError("`inputs` for a sequence must have shape (N, T) or (N, T, ...)")
        if structure == "image" and inputs.dim() < 3:
            raise ValueError("`inputs` for an image must have shape (N, H, W) or (N, C, H, W)")
        return structure


def _example_slice(target: TargetType, args: Any, n: int, num_examples: int):
    if isinstance(target, list):
        target = [target[n]]
    elif isinstance(target, Tensor) and target.numel() > 1:
        target = target[n : n + 1]
    if args is not None:
        args_t = args if isinstance(args, tuple) else (args,)
        args = tuple(
            a[n : n + 1] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == num_examples
            else a
            for a in args_t
        )
    return target, args


def _agglomerate(
    score: Callable[[Tensor], Tensor],
    kind: str,
    grid: Tuple[int, ...],
    unit_map: Tensor,
    adjacency: Tensor,
    percentile: float,
    absolute: bool,
    max_levels: Optional[int],
) -> Hierarchy:
    units = adjacency.shape[0]
    device = adjacency.device
    edges = _edges(adjacency)
    eye = torch.eye(units, dtype=torch.bool, device=device)
    unit_scores = score(eye)
    groups0 = [torch.tensor([u], device=device) for u in range(units)]
    levels = [HierarchyLevel(groups0, unit_scores, torch.full((units,), -1, device=device))]
    candidate = unit_scores.abs() if absolute else unit_scores.clone()
    selected = torch.zeros(units, dtype=torch.bool, device=device)
    quantile = torch.tensor(percentile / 100.0, dtype=candidate.dtype, device=device)
    while not bool(selected.all()) and (max_levels is None or len(levels) <= max_levels):
        remaining = ~selected
        threshold = torch.quantile(candidate[remaining], quantile)
        new = remaining & (candidate >= threshold)
        if not bool(new.any()):
            best = torch.where(remaining, candidate, torch.full_like(candidate, -math.inf))
            new[best.argmax()] = True
        selected = selected | new
        labels = _components(selected, edges)
        num_components = int(labels.max()) + 1
        members = labels[None, :] == torch.arange(num_components, device=device)[:, None]
        # units next to a component: scatter each member along its edges
        touched = torch.zeros((num_components, units), device=device).index_add_(
            1, edges[1], members[:, edges[0]].float()
        )
        frontier = (touched > 0) & ~selected[None, :]
        comp_index, unit_index = torch.nonzero(frontier, as_tuple=True)
        merged = members[comp_index].clone()
        merged[torch.arange(comp_index.numel(), device=device), unit_index] = True
        scores = score(torch.cat([members, merged]))
        comp_scores = scores[:num_components]
        gains = scores[num_components:] - comp_scores[comp_index]
        key = gains.abs() if absolute else gains
        best_gain = torch.full_like(candidate, -math.inf).scatter_reduce(
            0, unit_index, key, reduce="amax"
        )
        candidate = torch.where(torch.isfinite(best_gain), best_gain, candidate)
        groups = [torch.nonzero(row).flatten() for row in members]
        # parents of the previous level: the component holding its first unit
        previous = levels[-1]
        previous.parents = torch.stack([labels[g[0]] for g in previous.groups])
        levels.append(
            HierarchyLevel(groups, comp_scores, torch.full((num_components,), -1, device=device))
        )
    return Hierarchy(kind, levels, unit_map, grid)
