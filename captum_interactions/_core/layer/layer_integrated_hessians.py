#!/usr/bin/env python3
import contextlib
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import torch
from captum._utils.common import _format_additional_forward_args
from captum._utils.gradient import _forward_layer_eval
from captum._utils.typing import BaselineType, TargetType
from captum.attr._utils.attribution import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor
from torch.nn import Module

from captum_interactions._core.integrated_hessians import output_difference, path_integrator
from captum_interactions._utils.common import (
    check_finite,
    explained_dtype_errors,
    format_inputs,
    format_baselines,
    preserved_module_state,
    validate_internal_batch_size,
    validate_positive_int,
    validate_target,
    warn_if_nonfinite,
)
from captum_interactions._utils.nonsmooth import checked_smoothness
from captum_interactions._utils.feature_groups import FeatureGroups
from captum_interactions._utils.hessian import (
    CostCounter,
    format_interaction_output,
    gradients_with_graph,
    validate_output_layout,
)
from captum_interactions._utils.quadrature import (
    DEFAULT_MAX_STEPS,
    DEFAULT_METHOD,
    DEFAULT_N_STEPS,
    integrate_to_completeness,
    validate_adaptive_arguments,
    validate_method,
)

InteractionsType = Union[Tensor, Tuple[Tuple[Tensor, ...], ...]]
FeatureMaskType = Union[None, str, Tensor, Tuple[Tensor, ...]]

#: ``grouping`` values: one group per position along dim 1 (tokens), or no grouping.
TOKENS = "tokens"
FULL = "full"


def token_feature_mask(activations: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """One group per index of dim 1 of every tensor (ids global across the tuple).

    For a layer output of shape (N, T, E) the groups are the T tokens, each over
    its E embedding coordinates; for an (N, F) output (a Linear layer) they are
    the F single units.
    """
    masks, offset = [], 0
    for act in activations:
        if act.dim() < 2:
            raise ValueError(
                "`grouping='tokens'` groups the layer's units by dim 1, which a "
                f"layer tensor of shape {tuple(act.shape)} does not have; pass "
                "`grouping='full'` or an explicit `feature_mask`"
            )
        length = act.shape[1]
        ids = torch.arange(offset, offset + length, device=act.device)
        masks.append(ids.view((1, length) + (1,) * (act.dim() - 2)).expand((1,) + act.shape[1:]))
        offset += length
    return tuple(masks)


def _as_tuple(value: Any) -> Tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


class _LayerInjection:
    """Forward (pre-)hook replacing a layer's output (input) with given tensors.

    The hook is registered only for the duration of one forward call, inside
    ``try/finally``, so the model is never left with it.
    """

    def __init__(self, layer: Module, attribute_to_layer_input: bool) -> None:
        self.layer = layer
        self.attribute_to_layer_input = attribute_to_layer_input

    @contextlib.contextmanager
    def replacing(self, tensors: Tuple[Tensor, ...]) -> Iterator[List[int]]:
        calls: List[int] = []

        def check(original: Tuple[Any, ...]) -> None:
            if len(original) != len(tensors) or any(
                not isinstance(o, Tensor) or o.shape != t.shape
                for o, t in zip(original, tensors)
            ):
                shapes = [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__
                          for o in original]
                raise ValueError(
                    f"`layer` {type(self.layer).__name__} produced {shapes} in a path "
                    f"evaluation, expected {[tuple(t.shape) for t in tensors]}: the "
                    "layer must give the same shapes for the inputs and the baselines"
                )
            calls.append(1)

        if self.attribute_to_layer_input:

            def pre_hook(module: Module, args: Tuple[Any, ...]) -> Tuple[Tensor, ...]:
                check(args)
                return tensors

            handle = self.layer.register_forward_pre_hook(pre_hook)
        else:

            def hook(module: Module, args: Any, output: Any) -> Any:
                is_tuple = isinstance(output, tuple)
                check(_as_tuple(output))
                return tensors if is_tuple else tensors[0]

            handle = self.layer.register_forward_hook(hook)
        try:
            yield calls
        finally:
            handle.remove()


class LayerIntegratedHessians(LayerAttribution, GradientAttribution):
    r"""
    Integrated Hessians between the units of a layer (e.g. token x token).

    Integrated Hessians in the space of a layer's activations: the
    interactions between the units of ``layer`` (its output, or its input with
    ``attribute_to_layer_input=True``) that explain the change f(x) - f(x')
    (Janizek, Sturmfels and Lee, section 5.1). On a transformer's embedding
    layer this gives token x token interactions.

    As Captum's :class:`~captum.attr.LayerIntegratedGradients` does, the layer's
    activations a(x) and a(x') are computed at the inputs and the baselines,
    and the path points a(x') + t (a(x) - a(x')) are injected with a forward
    hook while the model runs on the original inputs (so attention masks,
    position ids and other inputs stay as they are). The Hessian-vector
    products are taken with respect to the injected tensor:

    .. math::
        \Gamma_{AB} = \sum_{i\in A, j\in B} \Delta_i \Delta_j \int_0^1\!\!\int_0^1
            \alpha\beta\, \partial_i\partial_j f(a' + \alpha\beta\Delta)\,
            d\alpha\,d\beta \; (+ \text{the main effect on the diagonal}),

    with :math:`\Delta = a(x) - a(x')` and groups A, B of layer units.

    **Groups.** On a layer output of shape (N, T, *E) (an embedding layer:
    tokens x embedding dimensions) the default groups are the T positions of
    dim 1: the result is (N, T, T) and costs T Hessian-vector products per
    path point (not T x E). On an (N, F) output (a Linear layer) the same rule
    gives one group per unit: (N, F, F). ``grouping="full"`` returns the
    interactions of every single unit, (N, T, *E, T, *E), at T x E HVPs per
    point; an explicit integer ``feature_mask`` (Captum's meaning,
    broadcastable to the layer's activations) gives any other grouping.

    **Completeness.** :math:`\sum \Gamma = f(x) - f(x')` holds when the layer
    is the only path from the inputs to the output (e.g. the word embeddings
    of a transformer whose other inputs, such as the attention mask, are
    passed in ``additional_forward_args`` and are the same for the inputs and
    the baselines), as for Captum's LayerIntegratedGradients;
    ``return_convergence_delta=True`` reports the error.

    Second derivatives of Hugging Face models need an attention whose backward
    is twice differentiable: load them with ``attn_implementation="eager"``.
    ReLU networks have a zero Hessian almost everywhere; see
    :func:`~captum_interactions.replace_relu_with_softplus`.

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

    def __init__(
        self,
        forward_func: Callable,
        layer: Module,
        device_ids: Union[None, List[int]] = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        r"""
        Args:
            forward_func (Callable): the forward function of the model or any
                modification of it.
            layer (torch.nn.Module): the layer whose output (or input) is
                explained. Its output must have the same shape at the inputs
                and at the baselines. A list of layers is not supported.
            device_ids (list[int], optional): device ids of a
                ``DataParallel`` model, used (as in Captum) to gather the
                layer's activations at the inputs and baselines. The path
                evaluations run on the inputs' device. Default: None
            multiply_by_inputs (bool, optional): whether the Delta factors
                a(x) - a(x') are applied (the paper's definition, which
                satisfies completeness). With ``False`` the "global" integrated
                second derivatives are returned, as Captum's
                ``multiply_by_inputs`` does for LayerIntegratedGradients.
                Default: True
        """
        if isinstance(layer, (list, tuple)):
            raise TypeError(
                "`layer` must be one torch.nn.Module; lists of layers are not "
                "supported by LayerIntegratedHessians"
            )
        if not isinstance(layer, Module):
            raise TypeError(f"`layer` must be a torch.nn.Module, got {type(layer).__name__}")
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
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

    def _layer_activations(
        self,
        inputs: Tuple[Tensor, ...],
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
    ) -> Tuple[Tensor, ...]:
        with explained_dtype_errors(self.forward_func, inputs):
            activations = _forward_layer_eval(
                self.forward_func,
                inputs,
                self.layer,
                additional_forward_args=additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
            )
        activations = tuple(a.detach() for a in _as_tuple(activations))
        where = "input" if attribute_to_layer_input else "output"
        for i, act in enumerate(activations):
            if not isinstance(act, Tensor) or not act.is_floating_point():
                raise TypeError(
                    f"the {where} of `layer` ({type(self.layer).__name__}) must be "
                    f"floating point tensors to be differentiated; item {i} is "
                    f"{getattr(act, 'dtype', type(act).__name__)}"
                )
        return activations

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int = DEFAULT_N_STEPS,
        method: str = DEFAULT_METHOD,
        internal_batch_size: Optional[int] = None,
        feature_mask: FeatureMaskType = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        grouping: str = TOKENS,
        output_layout: str = "nested",
        completeness_tol: Optional[float] = None,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> Union[InteractionsType, Tuple[InteractionsType, Tensor]]:
        r"""
        Integrated Hessians between the units (or groups of units) of ``layer``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): the model's inputs, batch
                first (e.g. token ids; they need not be floating point, only
                the layer's activations are differentiated).
            baselines (scalar, Tensor, tuple of scalar or Tensor, optional):
                reference inputs, in the inputs' space and Captum's forms (None
                means zeros; for text, e.g. pad-token ids from
                :class:`captum.attr.TokenReferenceBase`). The layer's
                activations at the baselines are the path's start.
                Default: None
            target (int, tuple, Tensor or list, optional): output indices to
                explain, with Captum's semantics; required when the model has
                more than one output per example. Default: None
            additional_forward_args (Any, optional): further arguments of the
                forward function after the inputs (e.g. attention masks); the
                same for the inputs, the baselines and every path point.
                Default: None
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
            internal_batch_size (int, optional): the most Hessian-vector
                products evaluated in one batch (rows x directions); bounds
                memory, does not change the result. Default: None
            feature_mask (Tensor or tuple[Tensor, ...], optional): integer
                group ids of the layer's units (one tensor per layer tensor),
                broadcastable to the activations: (N, G, G) over the sorted
                ids. None: the groups of ``grouping``. The strings
                ``"tokens"`` / ``"full"`` are still accepted here but
                deprecated (they cannot pass through Captum's NoiseTunnel,
                which expands ``feature_mask`` as tensors): use ``grouping``.
                Default: None
            return_convergence_delta (bool, optional): also return
                sum(Gamma) - (f(x) - f(x')) per example. Default: False
            attribute_to_layer_input (bool, optional): explain the layer's
                input (injected with a forward pre-hook) instead of its output.
                Default: False
            grouping (str, optional): the groups used when ``feature_mask`` is
                None. ``"tokens"``: one group per index of dim 1 of each layer
                tensor: the tokens of an (N, T, *E) output, giving (N, T, T);
                the single units of an (N, F) output, giving (N, F, F).
                ``"full"``: every unit on its own, (N, *F, *F), at one HVP per
                unit. Default: "tokens"
            output_layout (str, optional): layout of the ungrouped
                (``grouping="full"``) result for a layer with several tensors:
                ``"nested"``, ``"per_input"`` (one tensor per layer tensor,
                for ``NoiseTunnel``) or ``"flat"``, as in
                :meth:`IntegratedHessians.attribute`. Default: "nested"
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

        Returns:
            **interactions** or (**interactions**, **delta**):
            - **interactions** (Tensor or tuple[tuple[Tensor, ...], ...]):
              (N, T, T) token x token interactions by default ((N, F, F) on an
              (N, F) layer); (N, G, G) with a mask; with ``grouping="full"``,
              (N, *F, *F) for a layer with one tensor,
              ``out[i][j]`` of shape (N, *F_i, *F_j) for several. Row = the unit
              (group) explained, column = the one it interacts with; the
              diagonal holds the main effects, so row sums are the layer
              Integrated Gradients (summed over the group).
            - **delta** (Tensor): sum(Gamma) - (f(x) - f(x')), shape (N,),
              returned when ``return_convergence_delta=True``: the error of
              the quadrature rule (plus round-off) when the layer is the only
              path from the inputs to the output.

        Examples::

            >>> import torch
            >>> from torch import nn
            >>> from captum_interactions import LayerIntegratedHessians
            >>> class TextModel(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.embedding = nn.Embedding(100, 8)
            ...         self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 8, 16),
            ...                                   nn.GELU(), nn.Linear(16, 1))
            ...     def forward(self, ids):
            ...         return self.head(self.embedding(ids))
            >>> model = TextModel()
            >>> ids = torch.randint(1, 100, (2, 5))
            >>> lih = LayerIntegratedHessians(model, model.embedding)
            >>> gamma, delta = lih.attribute(ids, baselines=torch.zeros_like(ids),
            ...                              return_convergence_delta=True)
            >>> gamma.shape  # token x token
            torch.Size([2, 5, 5])
        """
        inputs_t = format_inputs(inputs, allow_integer=True)
        validate_positive_int(n_steps, "n_steps")
        validate_method(method)
        validate_adaptive_arguments(
            completeness_tol, max_steps, n_steps, self._multiply_by_inputs
        )
        validate_internal_batch_size(internal_batch_size)
        num_examples = inputs_t[0].shape[0]
        validate_target(target, num_examples)
        if isinstance(feature_mask, str):
            if feature_mask not in (TOKENS, FULL):
                raise ValueError(
                    f"`feature_mask` must be a tensor of group ids (or a tuple of "
                    f"them), got the string {feature_mask!r}; groupings by name "
                    f"go in `grouping` ({TOKENS!r} or {FULL!r})"
                )
            warnings.warn(
                f"`feature_mask={feature_mask!r}` is deprecated: pass "
                f"`grouping={feature_mask!r}` (a string in `feature_mask` cannot "
                "pass through Captum's NoiseTunnel)",
                DeprecationWarning,
                stacklevel=3,
            )
            grouping, feature_mask = feature_mask, None
        if grouping not in (TOKENS, FULL):
            raise ValueError(
                f"`grouping` must be {TOKENS!r} or {FULL!r}, got {grouping!r}"
            )
        if feature_mask is not None and grouping != TOKENS:
            raise ValueError(
                f"`grouping={grouping!r}` and an explicit `feature_mask` contradict "
                "each other: pass one of them"
            )
        validate_output_layout(output_layout)
        baselines_t = self._format_input_baselines(baselines, inputs_t)
        check_finite(inputs_t, "inputs")
        check_finite(baselines_t, "baselines")
        extra_args = _format_additional_forward_args(additional_forward_args)

        with preserved_module_state(self.forward_func, eval_mode=True), checked_smoothness(self):
            layer_inputs = self._layer_activations(inputs_t, extra_args, attribute_to_layer_input)
            layer_baselines = self._layer_activations(
                baselines_t, extra_args, attribute_to_layer_input
            )
            for i, (a, b) in enumerate(zip(layer_inputs, layer_baselines)):
                if a.shape != b.shape:
                    raise ValueError(
                        f"the layer's activations differ in shape between `inputs` "
                        f"({tuple(a.shape)}) and `baselines` ({tuple(b.shape)}) "
                        f"(layer tensor {i})"
                    )
            layer_is_tuple = len(layer_inputs) > 1
            if feature_mask is not None:
                mask = feature_mask
            elif grouping == FULL or (
                len(layer_inputs) == 1 and layer_inputs[0].dim() == 2
            ):
                mask = None  # per-unit groups of one (N, F) tensor: no grouping needed
            else:
                mask = token_feature_mask(layer_inputs)
            groups = FeatureGroups(mask, layer_inputs)

            # The model inputs travel with the rows as leading "additional
            # arguments" (as in Captum's LayerIntegratedGradients), so that any
            # slice of path rows comes with its copies of the original inputs.
            injection = _LayerInjection(self.layer, attribute_to_layer_input)
            forward_func = self.forward_func

            def injected_forward(*args: Any) -> Any:
                leaves = args[: len(layer_inputs)]
                model_args = args[len(layer_inputs):]
                with injection.replacing(tuple(leaves)) as calls:
                    output = forward_func(*model_args)
                if not calls:
                    raise ValueError(
                        f"`layer` ({type(self.layer).__name__}) was not called by "
                        "the forward function"
                    )
                return output

            def run_rows(
                _: Callable, rows: Tuple[Tensor, ...], row_target: Any, row_args: Any,
                **options: Any,
            ) -> Tuple[Tuple[Tensor, ...], ...]:
                return gradients_with_graph(
                    injected_forward, rows, row_target, row_args, **options
                )

            all_args = inputs_t + (extra_args if extra_args is not None else ())

            self.last_call_cost = CostCounter()
            integrate = path_integrator(
                forward_func, layer_inputs, layer_baselines, target, all_args, method,
                groups, self._multiply_by_inputs, internal_batch_size, self.last_call_cost,
                type(self).__name__, run_rows=run_rows,
            )
            interactions, self.last_call_steps, delta = integrate_to_completeness(
                integrate,
                lambda: output_difference(forward_func, inputs_t, baselines_t, target, extra_args),
                n_steps, completeness_tol, max_steps, method, type(self).__name__,
                warn=self._multiply_by_inputs,
                other_cause=" (or `layer` is not the only path from the inputs to the output)",
            )
            warn_if_nonfinite(
                interactions, type(self).__name__,
                "on the path from the baseline to the input (at the layer and after it)",
                row_sums=delta,
            )
            result = format_interaction_output(
                interactions, groups, layer_is_tuple, output_layout
            )
        if return_convergence_delta:
            return result, delta
        return result


    @staticmethod
    def _format_input_baselines(
        baselines: BaselineType, inputs: Tuple[Tensor, ...]
    ) -> Tuple[Tensor, ...]:
        """Captum's baseline forms in the inputs' space, keeping integer dtypes (token ids)."""
        if baselines is None:
            return tuple(torch.zeros_like(x) for x in inputs)
        # format_baselines works on floating point tensors; float64 holds integer
        # ids (e.g. token ids) exactly, and they are cast back below
        float_inputs = tuple(
            x if x.is_floating_point()
            else torch.empty(x.shape, dtype=torch.float64, device=x.device)
            for x in inputs
        )
        formatted = [
            base.to(x.dtype) for base, x in zip(format_baselines(baselines, float_inputs), inputs)
        ]
        return tuple(formatted)
