#!/usr/bin/env python3
from typing import Any, Callable, Optional, Tuple, Union

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from captum_interactions._core.integrated_hessians import InteractionsType, path_rows
from captum_interactions._utils.common import (
    RowExpansion,
    check_finite,
    format_baseline_distribution,
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
    validate_output_layout,
)


class ExpectedHessians(GradientAttribution):
    r"""
    Expected Hessians: Integrated Hessians averaged over a distribution of baselines.

    Expected Hessians: Integrated Hessians averaged over a distribution of
    baselines (Janizek, Sturmfels and Lee), estimated with the paper's *paired*
    Monte Carlo estimator. Each of ``n_samples`` draws per example takes a
    reference x' from the baseline samples and alpha, beta ~ U(0, 1), and
    evaluates the Integrated Hessians integrand once at x' + alpha*beta*(x - x'):

    .. math::
        \hat\Gamma_{ij} = \frac{1}{S}\sum_{s=1}^S \Big[\alpha_s\beta_s\,
            \Delta_{s,i}\Delta_{s,j}\,\partial_i\partial_j f(x'_s + \alpha_s\beta_s\Delta_s)
            + \delta_{ij}\,\Delta_{s,i}\,\partial_i f(x'_s + \alpha_s\beta_s\Delta_s)\Big],

    with :math:`\Delta_s = x - x'_s`. Its expectation is the Integrated Hessians
    matrix averaged over the baseline distribution, whose total is
    :math:`f(x) - \mathbb{E}[f(x')]`. Baselines are required, as for Captum's
    GradientShap.

    **With NoiseTunnel.** ``NoiseTunnel(ExpectedHessians(model))`` takes the
    baseline distribution as GradientShap does, and with the same forms:
    a tensor with one sample (B = 1) or as many samples as ``inputs`` (B = N)
    passes through as is (NoiseTunnel repeats the B = N form per noisy copy,
    which keeps the same empirical distribution). For any other B, NoiseTunnel
    itself (not this class) asserts that B is 1 or N, for GradientShap too;
    pass ``draw_baseline_from_distrib=True`` to NoiseTunnel then: it draws one
    reference per noisy copy from the distribution, and Expected Hessians
    samples its references from those draws.
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
            multiply_by_inputs (bool, optional): whether the Delta_s = x - x'_s
                factors are applied (the paper's definition, whose total is
                f(x) - E[f(x')]), as for Captum's GradientShap. With ``False``
                the "global" version is returned: the mean of
                alpha_s beta_s H(x'_s + alpha_s beta_s Delta_s) plus the mean
                gradient on the diagonal. Default: True
        """
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self.last_call_cost = CostCounter()

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the interactions are multiplied by (x - x'), as GradientShap's are."""
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        """True: ``return_convergence_delta=True`` reports the completeness error."""
        return True

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Union[Tensor, Tuple[Tensor, ...], Callable[..., Any]],
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_samples: int = 200,
        internal_batch_size: Optional[int] = None,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        return_convergence_delta: bool = False,
        output_layout: str = "nested",
    ) -> Union[InteractionsType, Tuple[InteractionsType, Tensor]]:
        r"""
        Expected Hessians: Integrated Hessians averaged over baselines drawn from ``baselines``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs to explain, batch first.
            baselines (Tensor, tuple[Tensor, ...] or Callable): samples of the
                baseline distribution, shape (B, *F_i) per input (e.g. a
                background batch of training data), or a callable returning
                them (called with ``inputs`` if it takes an argument).
            target (int, tuple, Tensor or list, optional): output indices, with
                Captum's semantics. Default: None
            additional_forward_args (Any, optional): further forward arguments.
                Default: None
            n_samples (int, optional): paired (x', alpha, beta) draws per
                example; the error falls like n_samples^(-1/2). Default: 200
            internal_batch_size (int, optional): the most Hessian-vector products
                evaluated in one batch. Default: None (as many as the memory
                budget allows; see :func:`~captum_interactions.set_memory_budget`)
            feature_mask (Tensor or tuple[Tensor, ...], optional): group ids;
                the result is then (N, G, G). Default: None
            return_convergence_delta (bool, optional): also return
                sum(Gamma) - (f(x) - mean_s f(x'_s)) over the drawn references.
                Default: False
            output_layout (str, optional): ``"nested"``, ``"per_input"``
                (a tuple aligned with the inputs, for ``NoiseTunnel`` and
                ``captum.metrics`` on tuple inputs) or ``"flat"``, as in
                :meth:`IntegratedHessians.attribute`. Default: "nested"

        Returns:
            **interactions** or (**interactions**, **delta**): layout as in
            :meth:`IntegratedHessians.attribute`.

        Examples::

            >>> import torch
            >>> from captum_interactions import ExpectedHessians
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Softplus(),
            ...                             torch.nn.Linear(8, 1))
            >>> background = torch.randn(100, 3)
            >>> eh = ExpectedHessians(model)
            >>> gamma = eh.attribute(torch.randn(2, 3), baselines=background, n_samples=64)
            >>> gamma.shape
            torch.Size([2, 3, 3])
        """
        is_inputs_tuple = isinstance(inputs, tuple)
        inputs_t = format_inputs(inputs)
        validate_positive_int(n_samples, "n_samples")
        validate_internal_batch_size(internal_batch_size)
        validate_output_layout(output_layout, is_inputs_tuple and feature_mask is None)
        references = format_baseline_distribution(baselines, inputs_t, inputs)
        check_finite(inputs_t, "inputs")
        check_finite(references, "baselines", what="reference samples")
        num_examples = inputs_t[0].shape[0]
        validate_target(target, num_examples)
        groups = FeatureGroups(feature_mask, inputs_t)
        dtype, device = inputs_t[0].dtype, inputs_t[0].device

        # paired draws, copy-major rows (row = s * N + n)
        ref_index = torch.randint(
            references[0].shape[0], (n_samples * num_examples,), device=device
        )
        t = (
            torch.rand(n_samples, num_examples, device=device, dtype=dtype)
            * torch.rand(n_samples, num_examples, device=device, dtype=dtype)
        )
        drawn = tuple(
            r[ref_index].reshape((n_samples,) + x.shape) for r, x in zip(references, inputs_t)
        )
        points, deltas = path_rows(inputs_t, drawn, t)
        scales = deltas if self._multiply_by_inputs else tuple(
            torch.ones_like(d) for d in deltas
        )
        expansion = RowExpansion(target, additional_forward_args, num_examples, n_samples)
        t_rows = t.reshape(-1)
        self.last_call_cost = CostCounter()
        with preserved_module_state(self.forward_func, eval_mode=True), checked_smoothness(self):
            interactions = accumulate_path_interactions(
                self.forward_func,
                points,
                scales,
                example_index=torch.arange(num_examples, device=device).repeat(n_samples),
                num_examples=num_examples,
                first_order_weight=torch.full_like(t_rows, 1.0 / n_samples),
                second_order_weight=t_rows / n_samples,
                expansion=expansion,
                groups=groups,
                internal_batch_size=internal_batch_size,
                counter=self.last_call_cost,
                method_name=type(self).__name__,
            )
            warn_if_nonfinite(
                interactions, type(self).__name__,
                "on the paths from the reference samples to the input",
            )
            result = format_interaction_output(
                interactions, groups, is_inputs_tuple, output_layout
            )
            if not return_convergence_delta:
                return result
            with torch.no_grad():
                f_x = run_scalar_forward(
                    self.forward_func, inputs_t, target, additional_forward_args
                )
                refs_flat = tuple(r.reshape((-1,) + r.shape[2:]) for r in drawn)
                f_refs = run_scalar_forward(
                    self.forward_func,
                    refs_flat,
                    expansion.target,
                    expansion.additional_forward_args,
                ).view(n_samples, num_examples)
            delta = interactions.sum(dim=(1, 2)) - (f_x - f_refs.mean(dim=0))
        return result, delta
