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
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from captum.attr import NoiseTunnel
from torch import Tensor

from captum_interactions._utils.common import RowExpansion, run_scalar_forward
from captum_interactions._utils.feature_groups import (
    FeatureGroups,
    flatten_features,
    split_features,
)
from captum_interactions._utils.memory import (
    ACTIVATION_PRIOR,
    ActivationMeter,
    budget_error,
    format_bytes,
    get_memory_budget,
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
    return_output: bool = False,
) -> Tuple[Tuple[Tensor, ...], ...]:
    """Leaf copies of ``points`` and grad f at them, kept differentiable
    (``create_graph=False``: plain gradients, no graph kept).

    Returns ``(leaves, grads)``, and the selected outputs f (R,) detached as a
    third item with ``return_output=True``; a gradient that does not depend on
    an input (e.g. a model linear in it) is returned as zeros that do not
    require grad.
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
    if return_output:
        return leaves, grads, output.detach().reshape(-1)
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
    if not live:  # gradient constant in the inputs: H = 0
        return tuple(torch.zeros_like(d) for d in directions)
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
    # zeros only where an input does not reach the gradient (allocated on demand)
    return tuple(
        torch.zeros_like(d) if h is None else h.detach() for d, h in zip(directions, hv)
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


#: working-memory model of one batch of r rows x c directions (coarse, in
#: elements of the inputs' dtype): the double-backward graph of a row holds
#: ~GRAPH_FACTOR x (D + A) (A: the model's activations per row), and every HVP
#: ~HVP_FEATURE_FACTOR x D (direction, result, products) plus ~HVP_ACTIVATION_FACTOR x A
#: (the vmapped backward).
GRAPH_FACTOR = 4
HVP_FEATURE_FACTOR = 6
HVP_ACTIVATION_FACTOR = 4


@dataclass
class PathMemoryPlan:
    """Bytes of a path-interaction call and the chunk sizes that fit the budget."""

    budget: int
    fixed_bytes: int
    output_bytes: int
    row_bytes: int
    hvp_bytes: int
    rows: int
    directions: int

    @property
    def peak_bytes(self) -> int:
        """Estimated peak: fixed + one batch of ``rows`` x ``directions``."""
        return self.fixed_bytes + self.rows * (self.row_bytes + self.directions * self.hvp_bytes)


def plan_path_chunks(
    num_rows: int,
    num_features: int,
    num_groups: int,
    num_examples: int,
    itemsize: int,
    internal_batch_size: Optional[int],
    budget: int,
    activations_per_row: Optional[float] = None,
    copies_of_output: int = 2,
    method: str = "IntegratedHessians",
) -> PathMemoryPlan:
    """Largest (rows, directions) batch within ``budget``; raises when nothing fits.

    The output (N, G, G) (``copies_of_output`` times: the accumulator and the
    formatted result or a temporary) and the path points (rows x D, three
    tensors) are fixed; each row of a batch adds its graph, each HVP its
    direction and products. The user's ``internal_batch_size`` is an upper
    bound that the budget may lower (results do not depend on it).
    """
    d, g = num_features, num_groups
    a = ACTIVATION_PRIOR * d if activations_per_row is None else activations_per_row
    output_bytes = num_examples * g * g * itemsize
    fixed = copies_of_output * output_bytes + 3 * num_rows * d * itemsize
    row_bytes = int(GRAPH_FACTOR * (d + a) * itemsize)
    hvp_bytes = int((HVP_FEATURE_FACTOR * d + HVP_ACTIVATION_FACTOR * a + g) * itemsize)
    available = budget - fixed
    if available < row_bytes + hvp_bytes:
        needed = fixed + row_bytes + hvp_bytes
        grouped = g < d
        raise budget_error(
            method,
            needed,
            budget,
            f"the interactions of {num_examples} example(s) over {g} "
            f"{'groups' if grouped else 'features'} take "
            f"{format_bytes(output_bytes)} each copy, plus one Hessian-vector product",
            "Pass a `feature_mask` with fewer groups (the output is N x G x G), or "
            "fewer examples per call; `internal_batch_size` cannot help, the work is "
            "already chunked to one row and one direction.",
        )
    rows = min(num_rows, available // (row_bytes + g * hvp_bytes))
    if rows >= 1:
        directions = g
    else:
        rows = 1
        directions = max(1, min(g, (available - row_bytes) // hvp_bytes))
    if internal_batch_size is not None:
        user_rows, user_directions = _chunk_sizes(num_rows, g, internal_batch_size)
        rows, directions = min(rows, user_rows), min(directions, user_directions)
    return PathMemoryPlan(budget, fixed, output_bytes, row_bytes, hvp_bytes, int(rows), int(directions))


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
    method_name: str = "IntegratedHessians",
    copy_examples: Optional[Tensor] = None,
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
        internal_batch_size (int, optional): max HVPs evaluated at once; the
            memory budget (:mod:`captum_interactions._utils.memory`) may lower
            it, and chooses the batch when it is None.
        counter (CostCounter, optional): incremented with the work done.
        run_rows (Callable, optional): replaces :func:`gradients_with_graph`
            (used by the layer variant to inject points into a layer).
        method_name (str, optional): named in a memory-budget error.
        copy_examples (Tensor, optional): when the rows are copies of these
            examples, copy-major (row = copy * len(copy_examples) + k), the
            per-example sums add the copies up with a reshape (chunks hold
            whole copies) instead of scattering row by row. Same result.

    Raises:
        MemoryBudgetError: when the (N, G, G) output and one Hessian-vector
            product cannot fit in the memory budget.
    """
    num_rows = points[0].shape[0]
    num_groups = groups.num_groups
    dtype, device = points[0].dtype, points[0].device
    plan_args = dict(
        num_rows=num_rows,
        num_features=groups.num_features,
        num_groups=num_groups,
        num_examples=num_examples,
        itemsize=points[0].element_size(),
        internal_batch_size=internal_batch_size,
        budget=get_memory_budget(device),
        copies_of_output=2 if groups.is_identity and len(points) > 1 else 1,
        method=method_name,
    )
    # before anything of size N x G x G is allocated; the first batch is planned
    # with a prior on the model's activations, measured during it
    plan = plan_path_chunks(**plan_args)
    result = torch.zeros(num_examples, num_groups, num_groups, dtype=dtype, device=device)
    diagonal = torch.zeros(num_examples, num_groups, dtype=dtype, device=device)
    run_rows = run_rows or gradients_with_graph
    start, measured = 0, False
    count = 0 if copy_examples is None else copy_examples.numel()
    while start < num_rows:
        step = plan.rows
        if count and step >= count:
            step -= step % count  # whole copies per chunk
        stop = min(num_rows, start + step)
        target, args = expansion.rows(start, stop)
        # the measurement only re-plans later chunks: none when one chunk is all
        meter = ActivationMeter(forward_func, enabled=stop < num_rows)
        with meter:
            leaves, grads = run_rows(
                forward_func, tuple(p[start:stop] for p in points), target, args
            )
        if not measured and meter.measured:
            measured = True
            plan = plan_path_chunks(
                **plan_args, activations_per_row=meter.numel / (stop - start)
            )
        rows_index = example_index[start:stop]
        whole_copies = count > 0 and start % count == 0 and (stop - start) % count == 0

        def add_rows(into: Tensor, values: Tensor) -> None:
            """into[e] += sum of values over the rows of example e (rows on dim 0)."""
            if whole_copies:
                into.index_add_(0, copy_examples, values.reshape((-1, count) + values.shape[1:]).sum(0))
            else:
                into.index_add_(0, rows_index, values)

        def add_hvp_rows(into: Tensor, block: Tensor) -> None:
            """into[e, :, c] += sum over the rows of example e of block[c, row, :]."""
            if whole_copies:
                # sum the copies while the rows are still contiguous (a strided
                # reshape of the permuted block would copy it first)
                per_copy = block.reshape((block.shape[0], -1, count) + block.shape[2:])
                into.index_add_(0, copy_examples, per_copy.sum(1).permute(1, 2, 0))
            else:
                into.index_add_(0, rows_index, block.permute(1, 2, 0))

        scale = _read_only_flat([s[start:stop] for s in scales])  # (r, D)
        grad_flat = _read_only_flat([g.detach() for g in grads])
        first = groups.group_sum(scale * grad_flat, rows_index)
        add_rows(diagonal, first * first_order_weight[start:stop, None])
        scale_w2 = scale * second_order_weight[start:stop, None]  # (r, D)
        shapes = [tuple(leaf.shape[1:]) for leaf in leaves]
        for g0 in range(0, num_groups, plan.directions):
            g1 = min(num_groups, g0 + plan.directions)
            directions_flat = groups.indicators(g0, g1, rows_index, dtype) * scale
            directions = split_features(directions_flat, shapes)
            del directions_flat
            hv = hessian_vector_products(leaves, grads, directions)
            del directions
            hv_flat = _read_only_flat(hv, batch_dims=2)  # (C, r, D)
            del hv
            # in place where hv is this call's own dense output (a zero HVP may
            # come back with the directions' broadcast strides)
            weighted = hv_flat.mul_(scale_w2) if hv_flat.is_contiguous() else hv_flat * scale_w2
            block = groups.group_sum(weighted, rows_index)  # (C, r, G)
            del weighted
            del hv_flat
            add_hvp_rows(result[:, :, g0:g1], block)
            del block
            if counter is not None:
                counter.hvps += (g1 - g0) * (stop - start)
        if counter is not None:
            counter.gradient_rows += stop - start
            counter.batches += 1
        del leaves, grads
        start = stop
    # in place: diag_embed would allocate a second N x G x G tensor
    result.diagonal(dim1=1, dim2=2).add_(diagonal)
    return result


def path_scalars(
    forward_func: Callable,
    points: Tuple[Tensor, ...],
    deltas: Tuple[Tensor, ...],
    expansion: RowExpansion,
    internal_batch_size: Optional[int] = None,
    counter: Optional[CostCounter] = None,
    run_rows: Optional[Callable[..., Tuple[Tuple[Tensor, ...], ...]]] = None,
    method_name: str = "IntegratedHessians",
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""f, :math:`\Delta^\top \nabla f` and :math:`\Delta^\top H \Delta` at R path points.

    Along the path :math:`F(t) = f(x' + t\Delta)` these are F, F' and F''
    (one forward + backward and one Hessian-vector product, in the single
    direction Delta, per row): what the quadrature needs to check a rule's
    completeness panel by panel (:mod:`captum_interactions._utils.quadrature`).

    Args:
        forward_func, expansion, internal_batch_size, counter, run_rows,
            method_name: as in :func:`accumulate_path_interactions`.
        points (tuple[Tensor, ...]): path points, each (R, *F_i), copy-major.
        deltas (tuple[Tensor, ...]): Delta of each row, shaped like ``points``.

    Returns:
        (f, first, second), each of shape (R,).
    """
    num_rows = points[0].shape[0]
    num_features = sum(p[0].numel() for p in points)
    plan = plan_path_chunks(
        num_rows=num_rows, num_features=num_features, num_groups=1,
        num_examples=num_rows, itemsize=points[0].element_size(),
        internal_batch_size=internal_batch_size,
        budget=get_memory_budget(points[0].device), copies_of_output=1,
        method=method_name,
    )
    run_rows = run_rows or gradients_with_graph
    values, firsts, seconds = [], [], []
    for start in range(0, num_rows, plan.rows):
        stop = min(num_rows, start + plan.rows)
        target, args = expansion.rows(start, stop)
        leaves, grads, output = run_rows(
            forward_func, tuple(p[start:stop] for p in points), target, args,
            return_output=True,
        )
        delta = tuple(d[start:stop] for d in deltas)
        hv = hessian_vector_products(leaves, grads, tuple(d[None] for d in delta))
        values.append(output)
        firsts.append(_row_dot(delta, tuple(g.detach() for g in grads)))
        seconds.append(_row_dot(delta, tuple(h[0] for h in hv)))
        if counter is not None:
            counter.gradient_rows += stop - start
            counter.hvps += stop - start
            counter.batches += 1
        del leaves, grads, hv
    return torch.cat(values), torch.cat(firsts), torch.cat(seconds)


def _read_only_flat(tensors: Sequence[Tensor], batch_dims: int = 1) -> Tensor:
    """:func:`flatten_features` for values that are only read: one tensor is
    reshaped (a view where possible) instead of copied by ``torch.cat``."""
    if len(tensors) == 1:
        return tensors[0].reshape(tensors[0].shape[:batch_dims] + (-1,))
    return flatten_features(tensors, batch_dims=batch_dims)


def _row_dot(a: Tuple[Tensor, ...], b: Tuple[Tensor, ...]) -> Tensor:
    """Per-row dot products of two tuples of (R, *F_i) tensors, shape (R,)."""
    return (_read_only_flat(a) * _read_only_flat(b)).sum(-1)


#: Values of ``output_layout`` (see :func:`format_interaction_output`).
OUTPUT_LAYOUTS = ("nested", "per_input", "flat")


def _called_by_noise_tunnel(max_depth: int = 6) -> bool:
    """Whether a caller up the stack is Captum's NoiseTunnel running a method."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return False
        if frame.f_code.co_name == "_compute_partial_attribution" and isinstance(
            frame.f_locals.get("self"), NoiseTunnel
        ):
            return True
    return False


def validate_output_layout(output_layout: Any, nested_tuple: bool = False) -> None:
    """Check ``output_layout``; ``nested_tuple``: the result would be a tuple of
    tuples (a tuple of inputs, no ``feature_mask``), which NoiseTunnel cannot
    average: refuse it there with the fix instead of Captum's AttributeError."""
    if output_layout not in OUTPUT_LAYOUTS:
        raise ValueError(
            f"`output_layout` must be one of {', '.join(map(repr, OUTPUT_LAYOUTS))}, "
            f"got {output_layout!r}"
        )
    if nested_tuple and output_layout == "nested" and _called_by_noise_tunnel():
        raise ValueError(
            "NoiseTunnel is not supported with `output_layout='nested'` for a tuple "
            "of inputs: that layout is a tuple of tuples (out[i][j]) and NoiseTunnel "
            "averages one tensor per input. Pass `output_layout='per_input'` "
            "(out[i] of shape (N, *F_i, D)) or 'flat', or a `feature_mask`"
        )


def format_interaction_output(
    interactions: Tensor,
    groups: FeatureGroups,
    is_inputs_tuple: bool,
    output_layout: str = "nested",
) -> Any:
    """(N, G, G) -> the layout asked for by ``output_layout`` (docs/design.rst).

    With a ``feature_mask`` every layout is the (N, G, G) tensor. Without one
    (G = D, the flattened features of all inputs):

    - ``"nested"`` (default): one input -> (N, *F, *F); a tuple
      of inputs -> ``out[i][j]`` of shape (N, *F_i, *F_j).
    - ``"per_input"``: one tensor per input, ``out[i]`` of shape
      (N, *F_i, D): the rows of input i against every feature (columns in the
      flattened, concatenated order). A tuple aligned with the inputs, as
      Captum's NoiseTunnel and metrics expect; ``out[i].sum(-1)`` are the row
      sums, shaped like ``inputs[i]``. One input -> a tensor (N, *F, D).
    - ``"flat"``: one tensor (N, D, D).
    """
    validate_output_layout(
        output_layout, nested_tuple=is_inputs_tuple and groups.is_identity
    )
    if not groups.is_identity or output_layout == "flat":
        return interactions
    n = interactions.shape[0]
    shapes = groups.feature_shapes
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if output_layout == "per_input":
        rows = tuple(
            block.reshape((n,) + tuple(shape) + (groups.num_features,)).contiguous()
            for block, shape in zip(torch.split(interactions, sizes, dim=1), shapes)
        )
        return rows if is_inputs_tuple else rows[0]
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
