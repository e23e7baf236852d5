#!/usr/bin/env python3
import math
import warnings
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from captum_interactions._utils.common import (
    RowExpansion,
    check_finite,
    format_inputs,
    model_modules,
    preserved_module_state,
    run_scalar_forward,
    validate_internal_batch_size,
    validate_positive_int,
    validate_target,
    warn_if_nonfinite,
)
from captum_interactions._utils.feature_groups import FeatureGroups, flatten_features
from captum_interactions._utils.hessian import validate_output_layout
from captum_interactions._utils.jets import Jet, UnsupportedJetOperation, recording_kinks
from captum_interactions._utils.nonsmooth import NonSmoothModelWarning
from captum_interactions._utils.memory import (
    ACTIVATION_PRIOR,
    ActivationMeter,
    budget_error,
    get_memory_budget,
    hope_directions_per_chunk,
    hope_fixed_bytes,
)
from captum_interactions._utils.taylor_polynomial import (
    RecoveryPlan,
    TaylorPolynomial,
    monomials,
    recovery_plan,
)

_MAX_MONOMIALS = 2_000_000


def _warn_on_kinks(operations: List[str]) -> None:
    """The expansion point is on a kink of a piecewise operation (see
    :class:`~captum_interactions._utils.jets.recording_kinks`)."""
    if operations:
        warnings.warn(
            f"HOPE: the expansion point lies on a kink of {', '.join(operations)} that "
            "the variables move (an input exactly at a break point, e.g. a ReLU input "
            "of exactly 0, or a tie for the maximum of a pooling window, common on "
            "blank image regions). The model is not differentiable there: the "
            "polynomial takes one piece's derivatives (the first element of a tie; "
            "the piece of inputs > 0) and is the expansion of neither side. Move the "
            "expansion point off the kink (e.g. add small noise), or expand a smooth "
            "surrogate: captum_interactions.smooth_model(model).",
            NonSmoothModelWarning,
            stacklevel=4,
        )
_HOPE_OVERFLOW_HINT = (
    " The order-k coefficients scale like the k-th power of the inputs' (or the"
    " group shifts') scale, so the highest orders overflow first: lower `order` or"
    " rescale the inputs."
)


@lru_cache(maxsize=32)
def _exponent_table(num_variables: int, order: int, device: str = "cpu") -> Tuple[Tensor, dict]:
    """(M, p) exponents of every monomial up to ``order`` (graded) on ``device``
    and the index tables that TaylorPolynomial derives from them, shared by
    every call."""
    exponents = [m for d in range(order + 1) for m in monomials(num_variables, d)]
    table = torch.from_numpy(
        np.asarray(exponents, dtype=np.int64).reshape(len(exponents), num_variables)
    ).to(device)
    # graded: the degrees, and each order's positions as one slice, are known
    # from the counts (TaylorPolynomial would read them back from the tensor)
    counts = [math.comb(num_variables + d - 1, d) for d in range(order + 1)]
    starts = [sum(counts[:d]) for d in range(order + 2)]
    degrees = torch.from_numpy(np.repeat(np.arange(order + 1, dtype=np.int64), counts))
    return table, {
        "exponents": table, "graded_exponents": True, "degrees": degrees.to(device),
        "order": order, "positions": {d: slice(starts[d], starts[d + 1]) for d in range(order + 1)},
    }


# pure arithmetic on the call's sizes, repeated on every call
_fixed_bytes = lru_cache(maxsize=64)(
    lambda p, orders, n, itemsize, k: hope_fixed_bytes(p, list(orders), n, itemsize, k)
)


# FeatureGroups per (mask tensors, input shapes), while the same, unmodified
# mask tensors come back (torch.unique and the indicators on every call cost
# more than the rest of a small expansion), with what is derived from them
_GROUPS_CACHED = 8
_GROUPS: "OrderedDict[Any, Tuple[Tuple[Tensor, ...], FeatureGroups, Dict[Any, Any]]]" = (
    OrderedDict()
)


def _feature_groups(
    feature_mask: Union[None, Tensor, Tuple[Tensor, ...]], inputs: Tuple[Tensor, ...]
) -> Tuple[FeatureGroups, Dict[Any, Any]]:
    """FeatureGroups(feature_mask, inputs) and a dict for values derived from it
    (directions, names), both cached."""
    masks = () if feature_mask is None else (
        feature_mask if isinstance(feature_mask, tuple) else (feature_mask,)
    )
    if not all(isinstance(m, Tensor) for m in masks):
        return FeatureGroups(feature_mask, inputs), {}  # raises the usual error
    key = (
        feature_mask is None, isinstance(feature_mask, tuple),
        tuple((id(m), m._version) for m in masks),
        tuple(tuple(x.shape) for x in inputs), inputs[0].device,
    )
    entry = _GROUPS.get(key)
    # the masks themselves are kept: an id is only reused after its tensor is gone
    if entry is not None and all(a is b for a, b in zip(entry[0], masks)):
        _GROUPS.move_to_end(key)
        return entry[1], entry[2]
    groups = FeatureGroups(feature_mask, inputs)
    _GROUPS[key] = (masks, groups, {})
    while len(_GROUPS) > _GROUPS_CACHED:
        _GROUPS.popitem(last=False)
    return groups, _GROUPS[key][2]


def _clear_caches() -> None:
    """Forget every cached plan and table (recovery plans, block inverses,
    the shipped tables of block inverses and recovery maps, derivative layouts,
    exponent tables, series weights and plans, dense conv matrices): the next
    call builds or reads them again, as a first call does. For benchmarks of
    that first call."""
    from captum_interactions._utils import jets, taylor_polynomial

    for cached in (
        taylor_polynomial.recovery_plan, taylor_polynomial._support_block,
        taylor_polynomial._block_inverse_table, taylor_polynomial._recovery_table_maps,
        taylor_polynomial._derivative_layout, taylor_polynomial._canonical_lookup,
        taylor_polynomial.monomials, _exponent_table, _fixed_bytes,
    ):
        cached.cache_clear()
    jets.clear_caches()
    _GROUPS.clear()


def _failing_module(forward_func: Callable, traceback: Any) -> Optional[str]:
    """The innermost module of ``forward_func`` whose ``forward`` was running when
    an error was raised, read from the error's traceback: free on success (no
    hooks to register and remove on every call)."""
    labels = {}
    for root in model_modules(forward_func):
        for name, module in root.named_modules():
            labels.setdefault(id(module), f"{name or '<root>'} ({type(module).__name__})")
    found = None
    while traceback is not None:
        frame = traceback.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and id(owner) in labels:
            found = labels[id(owner)]
        traceback = traceback.tb_next
    return found


def _default_names(groups: FeatureGroups, num_inputs: int) -> List[str]:
    if not groups.is_identity:
        return [f"g{int(g)}" for g in groups.group_ids.tolist()]
    names = []
    for i, shape in enumerate(groups.feature_shapes):
        prefix = "x" if num_inputs == 1 else f"x{i + 1}_"
        size = int(torch.Size(shape).numel())
        if len(shape) <= 1:
            names += [f"{prefix}{k + 1}" for k in range(size)]
        else:
            names += [f"{prefix}[{','.join(map(str, idx))}]"
                      for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape])
                      .reshape(size, -1).tolist()]
    return names


def _cached_names(groups: FeatureGroups, num_inputs: int, derived: Dict[Any, Any]) -> List[str]:
    names = derived.get("names")
    if names is None:
        names = derived["names"] = _default_names(groups, num_inputs)
    return list(names)  # a copy: the polynomial may keep and change its own


class HOPE(GradientAttribution):
    r"""
    HOPE: the exact Taylor polynomial of a model's output, up to any order.

    HOPE (High-order Polynomial Expansion) writes the selected output of a
    network as its Taylor polynomial at the input, up to order K:

    .. math::
        f(x_0 + \delta) \approx \sum_{k \le K} \frac{1}{k!} D^k f(x_0)[\delta^{\otimes k}]
            = \sum_{|j| \le K} T_j\, \delta^j .

    The derivatives are *exact* at every order and depth. They are computed
    by Taylor-mode propagation: one forward pass carries the K + 1 normalized
    Taylor coefficients of t -> f(x_0 + t v) through every operation of the
    model (a ``torch.Tensor`` subclass intercepts the operations, so ordinary
    ``nn.Module`` code works), for many directions v at once along the batch
    axis; the mixed partials T_j of order d are then recovered exactly from the
    directions v = i, |i| = d (Griewank, Utke and Walther, Math. Comp. 2000).
    The reference implementation of the paper keeps only unmixed derivatives
    at hidden layers, which is wrong at order >= 2 for stacked layers; this one
    is not.

    Cost: ``attribute(order=k)`` propagates one line per monomial of order k,
    C(p + k - 1, k); ``expand`` the lines of every order 1..K, a line shared
    by several orders (i and g i) once (161 for p = 4, K = 6, against
    C(9, 6) = 84 at the top order alone). Each line is one row of the batch
    with K + 1 coefficients, O(K^2) work per nonlinearity; all lines travel
    in one batched forward pass (chunked to the memory budget). The recovery
    plan of (p, orders) is built on the first call and cached. With many input
    features use ``feature_mask``: the variables are then the G group shifts.

    Supported operations: see :func:`captum_interactions._utils.jets.supported_operations`
    (linear/conv/pooling/reshape/indexing, elementwise sin, cos, tanh, sigmoid,
    softplus, GELU, SiLU, exp, log, sqrt, pow, ReLU-family as piecewise
    linear, add/mul/div/matmul/addmm (GPT-2), LayerNorm, softmax, BatchNorm and dropout in
    eval mode). Any other operation raises a ``ValueError`` naming it and the
    module it ran in.

    **Kinks.** Piecewise operations (the ReLU family, clamps, ``abs``, max
    pooling, masks from comparisons such as ``x > 0``, ``sign``, integer casts)
    are expanded on the piece that holds the expansion point, which is exact
    wherever the point is off their kinks. On a kink that the variables move (a
    ReLU input of exactly 0, a tie for the maximum of a pooling window, as on
    blank image regions) the model is not differentiable and the polynomial is
    the expansion of neither side: the call then warns with a
    ``NonSmoothModelWarning`` naming the operations. (Ties in ``argmax`` are
    not detected.)

    Paper: Xiao, Zhang, Cheng, Suo, IEEE TPAMI 2024,
    https://doi.org/10.1109/TPAMI.2024.3399197 (arXiv:2307.08192)
    """

    def __init__(self, forward_func: Callable) -> None:
        r"""
        Args:
            forward_func (Callable): the forward function of the model or any
                modification of it, built from supported operations.
        """
        GradientAttribution.__init__(self, forward_func)

    @classmethod
    def get_name(cls) -> str:
        """The method's display name, "HOPE"."""
        return "HOPE"

    def _univariate(
        self,
        inputs: Tuple[Tensor, ...],
        groups: FeatureGroups,
        plan: RecoveryPlan,
        order: int,
        target: TargetType,
        additional_forward_args: Any,
        internal_batch_size: Optional[int],
        fixed_bytes: int = 0,
        budget: Optional[int] = None,
        derived: Optional[Dict[Any, Any]] = None,
    ) -> Tensor:
        """(K + 1, n_directions, N) Taylor coefficients of f along every direction.

        ``derived``: a cache of the direction rows per chunk (see _feature_groups)."""
        num_examples = inputs[0].shape[0]
        dtype, device = inputs[0].dtype, inputs[0].device
        dirs = plan.direction_matrix(dtype, device)  # (Q, p)
        n_dirs = dirs.shape[0]
        num_features = groups.num_features
        if budget is None:
            budget = get_memory_budget(device)
        if derived is None:
            derived = {}
        chunking = dict(
            fixed_bytes=fixed_bytes, num_examples=num_examples, order=order,
            itemsize=inputs[0].element_size(),
            internal_batch_size=internal_batch_size, budget=budget,
        )
        # the first chunk assumes activations of ACTIVATION_PRIOR x D per row;
        # the rest uses the widths measured during it
        per_chunk = hope_directions_per_chunk(
            width=num_features * (1 + ACTIVATION_PRIOR), **chunking
        )
        measured = False
        expansion = RowExpansion(target, additional_forward_args, num_examples, n_dirs)
        results = []
        start = 0
        while start < n_dirs:
            stop = min(n_dirs, start + per_chunk)
            key = ("directions", plan, start, stop, dtype)
            per_input = derived.get(key)
            if per_input is None:
                if len(derived) > 32:  # many orders or chunkings: keep the names only
                    for old in [k for k in derived if k != "names"]:
                        del derived[old]
                per_input = derived[key] = self._direction_rows(
                    inputs, groups, dirs[start:stop], num_examples
                )
            jets = []
            for x, v in zip(inputs, per_input):
                # a line: rows x0 and v only, the coefficients above are zero (made
                # only if a rule needs them; affine layers and tanh do not)
                low = x.new_empty((min(order, 1) + 1,) + v.shape)
                # the point, broadcast over the directions without a copy of its own
                low[0].view((stop - start,) + x.shape).copy_(x)
                if order >= 1:
                    low[1] = v
                # every direction's line passes through the points: the value
                # repeats with period N along the rows
                jets.append(Jet(low, degree=min(order, 1), order=order, period=num_examples))
            rows_target, rows_args = expansion.rows(
                start * num_examples, stop * num_examples
            )
            if measured or stop == n_dirs:
                # one chunk, or widths known: nothing to measure (hooks cost time)
                out = run_scalar_forward(
                    self.forward_func, tuple(jets), rows_target, rows_args
                )
            else:
                with ActivationMeter(self.forward_func) as meter:
                    out = run_scalar_forward(
                        self.forward_func, tuple(jets), rows_target, rows_args
                    )
            if not measured and stop < n_dirs and meter.measured:
                measured = True
                rows = (stop - start) * num_examples
                per_chunk = hope_directions_per_chunk(
                    width=num_features + meter.numel / rows, **chunking
                )
            if isinstance(out, Jet):
                coeffs = out.coefficients
            else:  # output independent of the inputs
                coeffs = torch.zeros((order + 1,) + out.shape, dtype=dtype, device=device)
                coeffs[0] = out
            results.append(coeffs.reshape(order + 1, stop - start, num_examples))
            start = stop
        return results[0] if len(results) == 1 else torch.cat(results, dim=1)

    @staticmethod
    def _direction_rows(
        inputs: Tuple[Tensor, ...], groups: FeatureGroups, chunk: Tensor,
        num_examples: int,
    ) -> List[Tensor]:
        """Per input, the directions of ``chunk`` (Q, p) as input rows (Q * N, *F_i)."""
        if groups.is_identity:
            flat_dirs = chunk.unsqueeze(1).expand(-1, num_examples, -1)
        else:
            # the direction's value on each feature's group: (Q, rows|1, D)
            flat_dirs = chunk[:, groups.row_index(None)].expand(-1, num_examples, -1)
        rows = []
        offset = 0
        for x in inputs:
            size = x[0].numel()
            rows.append(flat_dirs[..., offset : offset + size].reshape(
                (-1,) + tuple(x.shape[1:])
            ))
            offset += size
        return rows

    def _coefficients(
        self,
        inputs: Tuple[Tensor, ...],
        groups: FeatureGroups,
        orders: Sequence[int],
        target: TargetType,
        additional_forward_args: Any,
        internal_batch_size: Optional[int],
        derivative_order: Optional[int] = None,
        derived: Optional[Dict[Any, Any]] = None,
    ):
        top = max(orders)
        p = groups.num_groups
        count = math.comb(p + top - 1, top)
        if count > _MAX_MONOMIALS:
            raise ValueError(
                f"an order-{top} expansion in {p} variables has {count} monomials of "
                f"top order; pass a `feature_mask` with fewer groups or lower `order`"
            )
        num_examples = inputs[0].shape[0]
        itemsize = inputs[0].element_size()
        fixed, _, what = _fixed_bytes(
            p, tuple(sorted(set(orders))), num_examples, itemsize, derivative_order
        )
        budget = get_memory_budget(inputs[0].device)
        one_direction = 6 * (top + 1) * groups.num_features * itemsize * num_examples
        if fixed + one_direction > budget:
            raise budget_error(
                "HOPE",
                fixed + one_direction,
                budget,
                f"an order-{top} expansion in {p} variables: {what}",
                "Lower `order`, or pass a `feature_mask` with fewer groups (fewer "
                "variables); `internal_batch_size` cannot help, the propagation is "
                "already chunked to one direction.",
            )
        plan = recovery_plan(p, tuple(sorted(set(orders))))
        with torch.no_grad(), preserved_module_state(self.forward_func), \
                recording_kinks() as kinks:
            try:
                univariate = self._univariate(
                    inputs, groups, plan, top, target, additional_forward_args,
                    internal_batch_size, fixed_bytes=fixed, budget=budget,
                    derived=derived,
                )
            except UnsupportedJetOperation as err:
                module = _failing_module(self.forward_func, err.__traceback__)
                where = f" (in module {module})" if module else ""
                raise UnsupportedJetOperation(f"{err.args[0]}{where}") from None
        _warn_on_kinks(kinks.names())
        return plan, univariate

    def expand(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        order: int = 2,
        target: TargetType = None,
        additional_forward_args: Any = None,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        internal_batch_size: Optional[int] = None,
        feature_names: Optional[Sequence[str]] = None,
    ) -> TaylorPolynomial:
        r"""
        Taylor polynomial of the selected output at every example, up to ``order``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): expansion points, batch first.
            order (int, optional): K, the highest order kept. Default: 2
            target (int, tuple, Tensor or list, optional): output selection with
                Captum's semantics (applied to every Taylor coefficient).
                Default: None
            additional_forward_args (Any, optional): further forward arguments.
                Default: None
            feature_mask (Tensor or tuple[Tensor, ...], optional): Captum group
                ids; the variables become the G group shifts z_g, with
                x = x_0 + sum_g z_g 1_g (so the order-2 part is the grouped
                Hessian sum_{i in A, j in B} H_ij). Default: None
            internal_batch_size (int, optional): most rows (directions x
                examples) propagated at once. Default: None (all)
            feature_names (sequence of str, optional): variable names for
                printing. Default: x1..xD (one input), x{i}_{k} (tuples),
                g{id} (groups)

        Returns:
            **polynomial** (TaylorPolynomial): a batched polynomial object
            holding the N expansions (``poly[n]`` is example n); without a
            mask its variables are the flattened, concatenated features and
            its centers the inputs; with a mask the variables are group shifts
            and the centers are 0.

        Examples::

            >>> import torch
            >>> from captum_interactions import HOPE
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
            ...                           torch.nn.Linear(16, 1)).double()
            >>> poly = HOPE(net).expand(torch.zeros(1, 2, dtype=torch.float64), order=4)
            >>> print(poly.to_string(top=5))
        """
        inputs_t = format_inputs(inputs)
        validate_positive_int(order, "order", minimum=0)
        validate_internal_batch_size(internal_batch_size)
        validate_target(target, inputs_t[0].shape[0])
        check_finite(inputs_t, "inputs")
        groups, derived = _feature_groups(feature_mask, inputs_t)
        plan, univariate = self._coefficients(
            inputs_t, groups, list(range(order + 1)), target, additional_forward_args,
            internal_batch_size, derived=derived,
        )
        coefficients = plan.recover_concatenated(univariate)
        if not bool(torch.isfinite(coefficients).all()):
            # the stacked product mixes the orders (0 * inf = NaN): order by
            # order, the orders below an overflow keep their values
            parts = plan.recover(univariate)
            coefficients = torch.cat([parts[d] for d in plan.orders], dim=1)
            warn_if_nonfinite(
                coefficients, "HOPE", "at the expansion point", _HOPE_OVERFLOW_HINT
            )
        p = groups.num_groups
        if groups.is_identity:
            center = flatten_features(inputs_t)
        else:
            center = inputs_t[0].new_zeros((inputs_t[0].shape[0], p))
        exponents, tables = _exponent_table(p, order, str(coefficients.device))
        return TaylorPolynomial(
            exponents,
            coefficients,
            center,
            feature_names if feature_names is not None
            else _cached_names(groups, len(inputs_t), derived),
            _tables=tables,
        )

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        order: int = 2,
        target: TargetType = None,
        additional_forward_args: Any = None,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        internal_batch_size: Optional[int] = None,
        output_layout: str = "nested",
    ) -> Any:
        r"""
        The exact order-``order`` derivative tensor of the selected output.

        Only the directions of that order are propagated (C(p + k - 1, k)
        lines, fewer after removing repeats), in one Taylor-mode pass.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): points, batch first.
            order (int, optional): k >= 1. Default: 2 (the Hessian)
            target, additional_forward_args, feature_mask, internal_batch_size:
                as in :meth:`expand`.
            output_layout (str, optional): layout of the ungrouped result.
                ``"nested"``: as below. ``"per_input"``: one tensor per input,
                ``out[i]`` of shape (N, *F_i, D, ..., D) (k - 1 axes of the D
                flattened, concatenated features): a tuple aligned with the
                inputs, for ``NoiseTunnel`` and ``captum.metrics`` on tuple
                inputs. ``"flat"``: one (N, D, ..., D) tensor. With
                ``feature_mask`` every layout is (N, G, ..., G).
                Default: "nested"

        Returns:
            **derivatives**: for one input (N, *F): order 1 -> (N, *F), order 2 ->
            (N, *F, *F), order k -> (N, *F x k). For a tuple of inputs, nested
            tuples: ``out[i][j]`` of shape (N, *F_i, *F_j) for order 2 (the
            layout of the "Design and math" page), a tuple of tensors for order 1. With ``feature_mask``:
            one tensor (N, G, ..., G) over the groups in sorted id order.

        Examples::

            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
            ...                           torch.nn.Linear(8, 1))
            >>> hess = HOPE(net).attribute(torch.randn(4, 3), order=2)
            >>> hess.shape
            torch.Size([4, 3, 3])
        """
        is_tuple = isinstance(inputs, tuple)
        inputs_t = format_inputs(inputs)
        validate_positive_int(order, "order")
        validate_internal_batch_size(internal_batch_size)
        validate_target(target, inputs_t[0].shape[0])
        validate_output_layout(output_layout, is_tuple and feature_mask is None and order > 1)
        check_finite(inputs_t, "inputs")
        groups, derived = _feature_groups(feature_mask, inputs_t)
        plan, univariate = self._coefficients(
            inputs_t, groups, [order], target, additional_forward_args,
            internal_batch_size, derivative_order=order, derived=derived,
        )
        coeffs = plan.recover(univariate)
        p = groups.num_groups
        poly = TaylorPolynomial(
            torch.tensor(monomials(p, order), dtype=torch.long).reshape(-1, p),
            coeffs[order],
            inputs_t[0].new_zeros((inputs_t[0].shape[0], p)),
        )
        flat = poly.derivative_tensor(order)  # (N, p, ..., p)
        warn_if_nonfinite(flat, "HOPE", "at the point", _HOPE_OVERFLOW_HINT)
        if not groups.is_identity or output_layout == "flat":
            return flat
        if output_layout == "per_input":
            sizes = [int(torch.Size(s).numel()) for s in groups.feature_shapes]
            rows = tuple(
                block.reshape(block.shape[:1] + tuple(shape) + block.shape[2:]).contiguous()
                for block, shape in zip(
                    torch.split(flat, sizes, dim=1), groups.feature_shapes
                )
            )
            return rows if is_tuple else rows[0]
        return _split_derivative(flat, groups.feature_shapes, order, is_tuple)


def _split_derivative(flat: Tensor, shapes, order: int, is_tuple: bool):
    """(N, D, ..., D) -> per-input blocks (N, *F_i1, ..., *F_ik), nested k deep."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def split(t: Tensor, axis: int, picked: List[int]):
        if axis == order:
            n = t.shape[0]
            return t.reshape((n,) + tuple(d for i in picked for d in shapes[i]))
        parts = torch.split(t, sizes, dim=1 + axis)
        blocks = tuple(split(part, axis + 1, picked + [i]) for i, part in enumerate(parts))
        return blocks if is_tuple else blocks[0]

    return split(flat, 0, [])
