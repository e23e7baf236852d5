#!/usr/bin/env python3
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np
import torch
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from captum_interactions._utils.common import (
    RowExpansion,
    check_finite,
    format_baselines,
    format_inputs,
    preserved_module_state,
    run_scalar_forward,
    validate_internal_batch_size,
    validate_positive_int,
    validate_target,
    warn_if_nonfinite,
)
from captum_interactions._utils.nonsmooth import checked_smoothness
from captum_interactions._utils.feature_groups import FeatureGroups
from captum_interactions._utils.hessian import (
    CostCounter,
    accumulate_path_interactions,
    format_interaction_output,
    path_scalars,
    validate_output_layout,
)
from captum_interactions._utils.quadrature import (
    DEFAULT_METHOD,
    DEFAULT_N_STEPS,
    DEFAULT_MAX_STEPS,
    GRADED_METHOD,
    GRADED_MIN_STEPS,
    graded_log_weight_rule,
    log_weight_rule,
    integrate_to_completeness,
    select_examples,
    validate_adaptive_arguments,
    validate_method,
)

InteractionsType = Union[Tensor, Tuple[Tuple[Tensor, ...], ...]]


def output_difference(
    forward_func: Callable,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
) -> Tensor:
    """f(x) - f(x') per example, from one forward pass over both (no graph)."""
    num_examples = inputs[0].shape[0]
    rows = tuple(torch.cat([x, b.expand_as(x)]) for x, b in zip(inputs, baselines))
    row_target, row_args = RowExpansion(
        target, additional_forward_args, num_examples, 2
    ).rows(0, 2 * num_examples)
    with torch.no_grad():
        values = run_scalar_forward(forward_func, rows, row_target, row_args)
    return values[:num_examples] - values[num_examples:]


def path_rows(
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    t: Tensor,
) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """Points x' + t (x - x') and the matching Delta, copy-major rows (K * N, *F).

    ``t`` is (K,) (the same path points for every example) or (K, N); each
    baseline is (N, *F) or, one per copy, (K, N, *F).
    """
    num_copies = t.shape[0]
    points, deltas = [], []
    for x, base in zip(inputs, baselines):
        t_b = t.to(x.dtype).reshape((num_copies, -1) + (1,) * (x.dim() - 1))
        delta = (x - base).expand((num_copies,) + x.shape)
        points.append((base + t_b * delta).reshape((-1,) + x.shape[1:]))
        deltas.append(delta.reshape((-1,) + x.shape[1:]))
    return tuple(points), tuple(deltas)


def path_integrator(
    forward_func: Callable,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    method: str,
    groups: FeatureGroups,
    multiply_by_inputs: bool,
    internal_batch_size: Optional[int],
    counter: CostCounter,
    method_name: str,
    run_rows: Optional[Callable[..., Any]] = None,
) -> Callable[[int, Optional[Tensor]], Tensor]:
    """``integrate(steps, index)``: the (N, G, G) interactions at ``steps`` path
    points of the rule ``method``, or those of the examples ``index`` only.

    Shared by Integrated Hessians (``inputs`` are the model's inputs) and the
    layer variant (``inputs`` are the layer's activations, ``run_rows``
    injects them); ``baselines`` have the shapes of ``inputs``.
    """
    num_examples = inputs[0].shape[0]
    dtype, device = inputs[0].dtype, inputs[0].device

    def integrate(steps: int, index: Optional[Tensor]) -> Tensor:
        if index is None:
            examples = torch.arange(num_examples, device=device)
            sub_inputs, sub_baselines = inputs, baselines
            sub_target, sub_args = target, additional_forward_args
        else:
            examples = index
            sub_inputs = tuple(x[index] for x in inputs)
            sub_baselines = tuple(b[index] for b in baselines)
            sub_target, sub_args = select_examples(
                target, additional_forward_args, index, num_examples
            )
        count = examples.numel()
        if method == GRADED_METHOD and steps >= GRADED_MIN_STEPS:

            def path_values(t: np.ndarray) -> Tuple[np.ndarray, ...]:
                """F, F', F'' of F(t) = f(x' + t Delta) at t (count, K), float64 on the host."""
                t_rows = torch.as_tensor(t.T, dtype=dtype, device=device)  # copy-major
                points, deltas = path_rows(sub_inputs, sub_baselines, t_rows)
                values = path_scalars(
                    forward_func, points, deltas,
                    RowExpansion(sub_target, sub_args, count, t.shape[1]),
                    internal_batch_size, counter, run_rows, method_name,
                )
                return tuple(v.reshape(t.shape[1], count).T.double().cpu().numpy() for v in values)

            nodes, weights, _ = graded_log_weight_rule(steps, path_values, count)
            t = torch.as_tensor(nodes.T.copy(), dtype=dtype, device=device)  # (steps, count)
            w = torch.as_tensor(weights.T.copy(), dtype=dtype, device=device)
        else:  # below GRADED_MIN_STEPS the graded rule is "gausslog" exactly
            nodes, weights = log_weight_rule(
                "gausslog" if method == GRADED_METHOD else method, steps
            )
            t = torch.tensor(nodes, dtype=dtype, device=device)[:, None].expand(steps, count)
            w = torch.tensor(weights, dtype=dtype, device=device)[:, None].expand(steps, count)
        points, deltas = path_rows(sub_inputs, sub_baselines, t)
        scales = deltas if multiply_by_inputs else tuple(torch.ones_like(d) for d in deltas)
        # rows keep their original example index (per-example feature masks
        # are looked up by it); the result is cut to ``index`` after
        interactions = accumulate_path_interactions(
            forward_func,
            points,
            scales,
            example_index=examples.repeat(steps),
            num_examples=num_examples,
            first_order_weight=w.reshape(-1),
            second_order_weight=(w * t).reshape(-1),
            expansion=RowExpansion(sub_target, sub_args, count, steps),
            groups=groups,
            internal_batch_size=internal_batch_size,
            counter=counter,
            run_rows=run_rows,
            method_name=method_name,
            copy_examples=examples,
        )
        return interactions if index is None else interactions[index]

    return integrate


class IntegratedHessians(GradientAttribution):
    r"""
    Integrated Hessians: pairwise feature interactions that add up to f(x) - f(x').

    Integrated Hessians explain, for every pair of input features (i, j), how
    much of the change f(x) - f(x') is due to their interaction. They are the
    Integrated Gradients of Integrated Gradients (Janizek, Sturmfels and Lee):

    .. math::
        \Gamma_{ij} = \Delta_i \Delta_j \int_0^1\!\!\int_0^1 \alpha\beta\,
            \partial_i\partial_j f(x' + \alpha\beta\Delta)\,d\alpha\,d\beta
            \quad (i \ne j),

    with :math:`\Delta = x - x'`, and the diagonal adds the main effect
    :math:`\Delta_i \int\!\int \partial_i f(x' + \alpha\beta\Delta)`. The matrix is
    symmetric, its row sums are the Integrated Gradients, and its total is
    f(x) - f(x') (completeness).

    The integrand depends on t = alpha * beta only, so the double integral is
    computed as :math:`\int_0^1 -\ln(t)\, g(t)\,dt` with a Gauss rule for the log
    weight: ``n_steps`` points on one path instead of ``n_steps``\ :sup:`2`. Each
    path point costs one forward + backward for the gradient and one batched
    Hessian-vector product per feature (per group with ``feature_mask``).

    ReLU networks have a zero Hessian almost everywhere; explain them through
    :func:`~captum_interactions.replace_relu_with_softplus`, as the paper does.

    **Smoothness.** The method needs a model that is twice differentiable along
    the path. ReLU, max pooling, clamps, ``abs``, ``maximum``/``minimum`` have
    a zero Hessian almost everywhere plus deltas on their kinks, which no
    quadrature sees: the result is then wrong (row sums need not match
    Integrated Gradients) though the completeness error may stay small. The
    first forward of each call is inspected and a ``NonSmoothModelWarning``
    names the non-smooth operations met on input-dependent values, and warns
    when the output does not depend differentiably on the inputs (``detach``,
    ``round``, ``argmax``, integer casts: zero Hessian and gradient). Explain
    such models through :func:`~captum_interactions.smooth_model` (smooth
    surrogates, as the paper's softplus swap) or with
    :class:`~captum_interactions.SmoothHess`.

    **Model state.** The model is evaluated in eval mode for the call, whatever
    its mode (dropout off, BatchNorm on its running statistics), so each
    example's result depends on that example alone, not on the rest of the
    batch nor on the path points batched with it; its train/eval flags and
    buffers are restored bit for bit afterwards, also when the call raises.
    BatchNorm without running statistics (``track_running_stats=False``) mixes
    the rows of any batch and raises a ``ValueError``.

    Paper: https://jmlr.org/papers/v22/20-1223.html (arXiv:2002.04138)
    """

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        r"""
        Args:
            forward_func (Callable): the forward function of the model or any
                modification of it.
            multiply_by_inputs (bool, optional): whether the Delta factors are
                applied (the paper's definition, which satisfies completeness).
                With ``False`` the "global" integrated second derivatives
                :math:`\int\!\int \alpha\beta H_{ij}` (plus the integrated
                gradient on the diagonal) are returned instead, as Captum's
                ``multiply_by_inputs`` does for Integrated Gradients.
                Default: True
        """
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self.last_call_cost = CostCounter()
        self.last_call_steps: Optional[Tensor] = None

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the Delta = x - x' factors are applied (``multiply_by_inputs``)."""
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        """True: ``return_convergence_delta=True`` reports the completeness error."""
        return True

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int = DEFAULT_N_STEPS,
        method: str = DEFAULT_METHOD,
        internal_batch_size: Optional[int] = None,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        return_convergence_delta: bool = False,
        output_layout: str = "nested",
        completeness_tol: Optional[float] = None,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> Union[InteractionsType, Tuple[InteractionsType, Tensor]]:
        r"""
        Integrated Hessians of the selected output: every pair of features' interaction.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs to explain, batch first,
                floating point. A tuple is explained jointly (interactions across
                tensors included).
            baselines (scalar, Tensor, tuple of scalar or Tensor, optional):
                reference points, in Captum's forms: None (zeros), a number, a
                tensor shaped like the input or with batch size 1, or a tuple of
                those per input. Default: None
            target (int, tuple, Tensor or list, optional): output indices to
                explain, with Captum's semantics; required when the model has
                more than one output per example. Default: None
            additional_forward_args (Any, optional): further arguments of the
                forward function, after the inputs; tensors with a batch
                dimension are repeated along the path. Default: None
            n_steps (int, optional): path points of the quadrature rule, any
                integer >= 1 (with ``completeness_tol``: the first level of
                the refinement). Default: 16
            method (str, optional): the quadrature rule for the -ln(t) weight
                of the double path integral (every rule is valid for any
                ``n_steps``). ``"gausslog_graded"``: per example, from 32
                steps on, either one Gauss rule for -ln(t) on [0, 1] or
                ``n_steps / 4`` panels of 4 points graded towards the path's
                sharp layers, whichever has the smaller error bound; the
                bounds come from the completeness of the total, which is
                known exactly panel by panel (about 3.5 ``n_steps``
                single-direction HVPs per example, counted in
                ``last_call_cost``; see the design page). Below 32 steps it is
                ``"gausslog"``. Its error did not grow with ``n_steps`` on
                any model of ``benchmarks/bench_quadrature.py``.
                ``"gausslog"``: one Gauss rule for -ln(t) on [0, 1], exact for
                polynomials of degree 2 n_steps - 1 (most accurate on smooth
                paths). ``"gausslog_composite"``: [0, 1] cut into equal panels
                of 16 points. ``"gausslegendre"`` and ``"riemann_middle"``:
                Gauss-Legendre nodes or midpoints with -ln(t) folded into the
                weights (less accurate; for comparison). On a model with a
                layer too sharp for ``n_steps`` (a large softplus ``beta``,
                inputs of large magnitude) no rule is accurate until the
                layer is resolved: use ``completeness_tol``.
                Default: "gausslog_graded"
            internal_batch_size (int, optional): the most Hessian-vector products
                evaluated in one batch (rows x directions); bounds memory, does
                not change the result. None lets the memory budget choose (see
                :func:`~captum_interactions.set_memory_budget`), which also
                lowers a given value that would not fit. Default: None
            feature_mask (Tensor or tuple[Tensor, ...], optional): integer group
                ids broadcastable to each input (Captum's meaning; ids are global
                across the tuple). The result is then the (N, G, G) matrix of
                group interactions, in sorted id order, computed with G (not D)
                HVPs per path point. Default: None
            return_convergence_delta (bool, optional): also return
                sum(Gamma) - (f(x) - f(x')) per example. Default: False
            output_layout (str, optional): how the full (unmasked) matrix is
                returned. ``"nested"``: (N, *F, *F) for one input,
                ``out[i][j]`` of shape (N, *F_i, *F_j) for a tuple.
                ``"per_input"``: one tensor per input, ``out[i]`` of shape
                (N, *F_i, D), D the total number of features (columns in the
                flattened, concatenated order of the inputs): a tuple aligned
                with the inputs, to use with Captum's ``NoiseTunnel`` and
                ``captum.metrics`` on tuple inputs; ``out[i].sum(-1)`` are the
                row sums, shaped like ``inputs[i]``. ``"flat"``: one (N, D, D)
                tensor. With ``feature_mask`` every layout is (N, G, G).
                Default: "nested"
            completeness_tol (float, optional): adaptive mode. Per example,
                ``n_steps`` is doubled until
                ``abs(sum(Gamma) - (f(x) - f(x'))) <= completeness_tol * abs(f(x) - f(x'))``
                or the next level would exceed ``max_steps``; each example's
                result comes from the first level that meets the tolerance,
                only the examples not yet within it are recomputed, and the
                steps used are stored in ``self.last_call_steps``. Examples
                that miss it get a warning naming them, their error and the
                fix. Needs ``multiply_by_inputs=True``. None: one fixed rule of
                ``n_steps`` points. Default: None
            max_steps (int, optional): the budget of the adaptive mode: the
                most path points per example (levels n_steps, 2 n_steps, ...
                up to it; the work done is at most about twice the last
                level's). Ignored without ``completeness_tol``. Default: 1024

        Raises:
            ValueError: NaN/inf in ``inputs`` or ``baselines`` (naming the
                example indices), no examples (N = 0), ``target`` out of the
                output's range; ``MemoryBudgetError`` (a ValueError) when the
                (N, G, G) output cannot fit in the memory budget.
            TypeError: inputs whose dtype the model does not accept.

        Returns:
            **interactions** or (**interactions**, **delta**):
            - **interactions** (Tensor or tuple[tuple[Tensor, ...], ...]):
              for one input of shape (N, *F), a tensor (N, *F, *F): row i, column
              j is the interaction of feature i with feature j, the diagonal holds
              the main effects. For a tuple of inputs, ``interactions[i][j]`` of
              shape (N, *F_i, *F_j). With ``feature_mask``, one (N, G, G) tensor.
              Other layouts: see ``output_layout``.
            - **delta** (Tensor): completeness error of shape (N,), returned when
              ``return_convergence_delta=True``. The interactions sum to
              f(x) - f(x') exactly only in the limit of the quadrature, so
              delta measures the error of the rule (plus round-off).

        Examples::

            >>> import torch
            >>> from captum_interactions import IntegratedHessians
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Softplus(),
            ...                             torch.nn.Linear(8, 2))
            >>> x = torch.randn(4, 3)
            >>> ih = IntegratedHessians(model)
            >>> gamma, delta = ih.attribute(x, target=1, return_convergence_delta=True)
            >>> gamma.shape
            torch.Size([4, 3, 3])
            >>> # adaptive: double the steps per example until completeness holds
            >>> gamma = ih.attribute(x, target=1, completeness_tol=1e-4)
            >>> ih.last_call_steps.shape  # path points used, per example
            torch.Size([4])
        """
        is_inputs_tuple = isinstance(inputs, tuple)
        inputs_t = format_inputs(inputs)
        validate_positive_int(n_steps, "n_steps")
        validate_method(method)
        validate_adaptive_arguments(
            completeness_tol, max_steps, n_steps, self._multiply_by_inputs
        )
        validate_internal_batch_size(internal_batch_size)
        validate_output_layout(output_layout, is_inputs_tuple and feature_mask is None)
        baselines_t = format_baselines(baselines, inputs_t)
        check_finite(inputs_t, "inputs")
        check_finite(baselines_t, "baselines")
        num_examples = inputs_t[0].shape[0]
        validate_target(target, num_examples)
        groups = FeatureGroups(feature_mask, inputs_t)

        self.last_call_cost = CostCounter()
        with preserved_module_state(self.forward_func, eval_mode=True), checked_smoothness(self):
            # inside the check: it swaps in the forward function it inspects
            integrate = path_integrator(
                self.forward_func, inputs_t, baselines_t, target, additional_forward_args,
                method, groups, self._multiply_by_inputs, internal_batch_size,
                self.last_call_cost, type(self).__name__,
            )
            interactions, self.last_call_steps, delta = integrate_to_completeness(
                integrate,
                lambda: output_difference(
                    self.forward_func, inputs_t, baselines_t, target,
                    additional_forward_args,
                ),
                n_steps, completeness_tol, max_steps, method, type(self).__name__,
                warn=self._multiply_by_inputs,
            )
            warn_if_nonfinite(
                interactions, type(self).__name__, "on the path from the baseline to the input",
                row_sums=delta,
            )
            result = format_interaction_output(
                interactions, groups, is_inputs_tuple, output_layout
            )
        if return_convergence_delta:
            return result, delta
        return result
