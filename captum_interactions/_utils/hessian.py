#!/usr/bin/env python3
r"""Batched Hessian-vector products and the path-interaction accumulator.

One forward + backward (with ``create_graph``) over a batch of path points gives
the first-order gradient; a second backward, batched over many directions with
``is_grads_batched=True`` (vmap over the backward graph), gives H v for all of
them at once. Interaction methods (Integrated/Expected Hessians and the layer
variant) reduce to :func:`accumulate_path_interactions`:

.. math::
    \Gamma^{(n)}_{AB} = \sum_{r \in n} w^{(1)}_r \,\delta_{AB} \sum_{i\in A} s_i \partial_i f(x_r)
        + w^{(2)}_r \,(s\odot 1_A)^\top H(x_r)\,(s\odot 1_B),

where s is the per-row scale (Delta = x - x' for Integrated Hessians). With G
groups the cost is G HVPs per row, never D.
"""
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from captum_interactions._utils.common import RowExpansion, run_scalar_forward
from captum_interactions._utils.feature_groups import (
    FeatureGroups,
    flatten_features,
    split_features,
)


@dataclass
class CostCounter:
    """Model-evaluation counts of one call: forward+backward passes and HVPs."""

    gradient_rows: int = 0
    hvps: int = 0
    batches: int = 0


def gradients_with_graph(
    forward_func: Callable,
    points: Tuple[Tensor, ...],
    target: Any,
    additional_forward_args: Any,
    create_graph: bool = True,
) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """Leaf copies of ``points`` and grad f at them, kept differentiable
    (``create_graph=False``: plain gradients, no graph kept).

    Returns ``(leaves, grads)``; a gradient that does not depend on an input
    (e.g. a model linear in it) is returned as zeros that do not require grad.
    """
    leaves = tuple(p.detach().requires_grad_(True) for p in points)
    with torch.enable_grad():
        output = run_scalar_forward(forward_func, leaves, target, additional_forward_args)
        if not output.requires_grad:
            raise ValueError(
                "the selected model output does not depend differentiably on "
                "`inputs` (it does not require grad)"
            )
        grads = torch.autograd.grad(
            output.sum(), leaves, create_graph=create_graph, allow_unused=True
        )
    grads = tuple(
        torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)
    )
    return leaves, grads


def hessian_vector_products(
    leaves: Tuple[Tensor, ...],
    grads: Tuple[Tensor, ...],
    directions: Tuple[Tensor, ...],
) -> Tuple[Tensor, ...]:
    """H v for a batch of directions, each ``directions[i]`` of shape (C, *leaves[i].shape).

    Rows of the batch are independent examples, so the HVP of the summed
    output is the per-row HVP. Falls back to a loop over directions when an
    operation of the model has no vmap rule.
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    results = [torch.zeros_like(d) for d in directions]
    if not live:
        return tuple(results)  # gradient constant in the inputs: H = 0
    outputs = [grads[i] for i in live]
    grad_outputs = [directions[i] for i in live]
    with torch.enable_grad():
        try:
            hv = torch.autograd.grad(
                outputs,
                leaves,
                grad_outputs=grad_outputs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as err:  # an op without a batching rule
            warnings.warn(
                f"batched HVPs failed ({err}); falling back to one backward per "
                "direction, which is slower",
                stacklevel=3,
            )
            columns = [
                torch.autograd.grad(
                    outputs,
                    leaves,
                    grad_outputs=[d[c] for d in grad_outputs],
                    retain_graph=True,
                    allow_unused=True,
                )
                for c in range(grad_outputs[0].shape[0])
            ]
            hv = tuple(
                None
                if columns[0][i] is None
                else torch.stack([col[i] for col in columns])
                for i in range(len(leaves))
            )
    return tuple(
        res if h is None else h.detach() for res, h in zip(results, hv)
    )


def _chunk_sizes(
    num_rows: int, num_directions: int, internal_batch_size: Optional[int]
) -> Tuple[int, int]:
    """Rows per forward pass and directions per batched HVP.

    ``internal_batch_size`` bounds rows x directions (the HVPs evaluated at
    once); it never splits a row below one, as in Captum.
    """
    if internal_batch_size is None:
        return num_rows, num_directions
    rows = max(1, min(num_rows, internal_batch_size // max(num_directions, 1)))
    directions = max(1, min(num_directions, internal_batch_size // rows))
    return rows, directions


def accumulate_path_interactions(
    forward_func: Callable,
    points: Tuple[Tensor, ...],
    scales: Tuple[Tensor, ...],
    example_index: Tensor,
    num_examples: int,
    first_order_weight: Tensor,
    second_order_weight: Tensor,
    expansion: RowExpansion,
    groups: FeatureGroups,
    internal_batch_size: Optional[int] = None,
    counter: Optional[CostCounter] = None,
    run_rows: Optional[Callable[..., Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]]] = None,
) -> Tensor:
    r"""Sum interaction contributions of R path points into (N, G, G).

    Args:
        forward_func (Callable): the model.
        points (tuple[Tensor, ...]): path points, each (R, *F_i), rows ordered
            as ``expansion`` (copy-major).
        scales (tuple[Tensor, ...]): per-row multipliers s (Delta for IH), (R, *F_i).
        example_index (Tensor): (R,) example of each row.
        num_examples (int): N.
        first_order_weight (Tensor): (R,) weight of the gradient (diagonal) term.
        second_order_weight (Tensor): (R,) weight of the Hessian term.
        expansion (RowExpansion): target / extra args for the rows.
        groups (FeatureGroups): G groups over the D flattened features.
        internal_batch_size (int, optional): max HVPs evaluated at once.
        counter (CostCounter, optional): incremented with the work done.
        run_rows (Callable, optional): replaces :func:`gradients_with_graph`
            (used by the layer variant to inject points into a layer).
    """
    num_rows = points[0].shape[0]
    num_groups = groups.num_groups
    dtype, device = points[0].dtype, points[0].device
    result = torch.zeros(num_examples, num_groups, num_groups, dtype=dtype, device=device)
    diagonal = torch.zeros(num_examples, num_groups, dtype=dtype, device=device)
    rows_per_batch, directions_per_batch = _chunk_sizes(
        num_rows, num_groups, internal_batch_size
    )
    run_rows = run_rows or gradients_with_graph
    for start in range(0, num_rows, rows_per_batch):
        stop = min(num_rows, start + rows_per_batch)
        target, args = expansion.rows(start, stop)
        leaves, grads = run_rows(
            forward_func, tuple(p[start:stop] for p in points), target, args
        )
        rows_index = example_index[start:stop]
        scale = flatten_features([s[start:stop] for s in scales])  # (r, D)
        grad_flat = flatten_features([g.detach() for g in grads])
        first = groups.group_sum(scale * grad_flat, rows_index)
        diagonal.index_add_(0, rows_index, first * first_order_weight[start:stop, None])
        w2 = second_order_weight[start:stop].view(1, -1, 1)
        shapes = [tuple(leaf.shape[1:]) for leaf in leaves]
        for g0 in range(0, num_groups, directions_per_batch):
            g1 = min(num_groups, g0 + directions_per_batch)
            directions_flat = groups.indicators(g0, g1, rows_index, dtype) * scale
            directions = split_features(directions_flat, shapes)
            hv = hessian_vector_products(leaves, grads, directions)
            hv_flat = flatten_features(hv, batch_dims=2)  # (C, r, D)
            block = groups.group_sum(scale * hv_flat * w2, rows_index)  # (C, r, G)
            result[:, :, g0:g1].index_add_(0, rows_index, block.permute(1, 2, 0))
            if counter is not None:
                counter.hvps += (g1 - g0) * (stop - start)
        if counter is not None:
            counter.gradient_rows += stop - start
            counter.batches += 1
        del leaves, grads
    result += torch.diag_embed(diagonal)
    return result


def format_interaction_output(
    interactions: Tensor,
    groups: FeatureGroups,
    is_inputs_tuple: bool,
) -> Any:
    """(N, G, G) -> Captum-style layout (docs/design.rst, "Output layouts").

    Grouped: (N, G, G). Full, one tensor: (N, *F, *F). Full, tuple of inputs:
    ``out[i][j]`` of shape (N, *F_i, *F_j).
    """
    if not groups.is_identity:
        return interactions
    n = interactions.shape[0]
    shapes = groups.feature_shapes
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    blocks = tuple(
        tuple(
            interactions[:, oi : oi + di, oj : oj + dj].reshape(
                (n,) + tuple(si) + tuple(sj)
            )
            for oj, dj, sj in zip(offsets, sizes, shapes)
        )
        for oi, di, si in zip(offsets, sizes, shapes)
    )
    return blocks if is_inputs_tuple else blocks[0][0]
