#!/usr/bin/env python3
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from captum_interactions._utils.common import (
    RowExpansion,
    check_finite,
    check_noise_resolution,
    format_inputs,
    normalize_stdevs,
    preserved_module_state,
    validate_internal_batch_size,
    validate_positive_int,
    validate_target,
)
from captum_interactions._utils.feature_groups import (
    FeatureGroups,
    flatten_features,
    split_features,
)
from captum_interactions._utils.hessian import (
    CostCounter,
    format_interaction_output,
    validate_output_layout,
)
from captum_interactions._utils.memory import get_memory_budget, smooth_hess_rows
from captum_interactions._utils.stein import (
    NOISE_BLOCK_NUMEL,
    SteinAccumulator,
    example_chunks,
    plain_gradients,
)

InteractionsType = Union[Tensor, Tuple[Tuple[Tensor, ...], ...]]


class SmoothHess(GradientAttribution):
    r"""
    SmoothHess: the Hessian of the Gaussian-smoothed model, from gradient calls only.

    SmoothHess (Torop et al.): the Hessian of the network convolved with a
    Gaussian, estimated from gradient calls only through Stein's identity.
    ReLU networks have a zero Hessian almost everywhere; their Gaussian
    smoothing does not, and SmoothHess measures it directly, with no change of
    activation. With z ~ N(0, I) and sigma the noise standard deviation,

    .. math::
        \nabla^2 (f * q_\sigma)(x) = \frac{1}{\sigma}\,
            \mathbb{E}\big[z\, \nabla f(x + \sigma z)^\top\big],
        \qquad
        \nabla (f * q_\sigma)(x) = \mathbb{E}\big[\nabla f(x + \sigma z)\big]

    (the second is SmoothGrad, returned from the same gradient calls). The
    estimate is symmetrized. By default samples come in antithetic pairs
    (z, -z), whose term is :math:`z\,(\nabla f(x+\sigma z) - \nabla f(x-\sigma z))^\top/(2\sigma)`:
    the first-order part of the gradient cancels, which lowers the variance.
    With one sigma per input tensor the perturbation is anisotropic and the
    identity becomes :math:`\mathbb{E}[\Sigma^{-1} e\, \nabla f(x+e)^\top]`,
    e ~ N(0, Sigma), i.e. z is divided by each feature's sigma.

    Cost: ``n_samples`` gradient evaluations per example, plus rank-one updates
    of a D x D (or G x G with ``feature_mask``) matrix per sample.

    **Model state.** The model is evaluated in eval mode for the call, whatever
    its mode (dropout off, BatchNorm on its running statistics), so each
    example's result depends on that example alone, not on the rest of the
    batch nor on the path points batched with it; its train/eval flags and
    buffers are restored bit for bit afterwards, also when the call raises.
    BatchNorm without running statistics (``track_running_stats=False``) mixes
    the rows of any batch and raises a ``ValueError``.

    Paper: https://arxiv.org/abs/2311.00858 (NeurIPS 2023). Note that the
    reference code's ``std`` argument is a variance: its ``std=0.03`` is
    ``stdevs=0.173`` here.
    """

    def __init__(self, forward_func: Callable) -> None:
        r"""
        Args:
            forward_func (Callable): the forward function of the model or any
                modification of it. It must be differentiable in its inputs
                almost everywhere (ReLU networks are fine).
        """
        GradientAttribution.__init__(self, forward_func)
        self.last_call_cost = CostCounter()

    def has_convergence_delta(self) -> bool:
        """False: SmoothHess has no completeness property to report an error of."""
        return False

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_samples: int = 512,
        stdevs: Union[float, Sequence[float]] = 0.1,
        internal_batch_size: Optional[int] = None,
        feature_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        return_smoothgrad: bool = False,
        return_stderr: bool = False,
        antithetic: bool = True,
        output_layout: str = "nested",
    ) -> Any:
        r"""
        Hessian of the Gaussian-smoothed model at ``inputs`` (and SmoothGrad), from gradients only.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): inputs to explain, batch
                first: (N, *F) or a tuple of (N, *F_i).
            target (int, tuple, Tensor or list, optional): output indices, with
                Captum's semantics. Required for multi-output models.
                Default: None
            additional_forward_args (Any, optional): further forward arguments,
                repeated for every noisy copy. Default: None
            n_samples (int, optional): gradient evaluations per example (noisy
                points), at least 2; even when ``antithetic`` (n_samples / 2
                pairs). The error falls like n_samples^(-1/2). Default: 512
            stdevs (float or tuple[float, ...], optional): sigma, the standard
                deviation of the Gaussian noise (not its variance), one float or
                one per input tensor. Must be > 0. Default: 0.1
            internal_batch_size (int, optional): the most gradient evaluations
                in one forward/backward pass. Results do not depend on it.
                Default: None (as many as the memory budget allows, see
                :func:`~captum_interactions.set_memory_budget`; the noise is
                drawn in blocks of about 4M numbers, which also bounds a pass)
            feature_mask (Tensor or tuple[Tensor, ...], optional): integer group
                ids, broadcastable to each input (Captum's meaning). The result
                is then the (N, G, G) smoothed Hessian summed over group pairs,
                H_AB = sum_{i in A, j in B} H_ij, computed from group sums of
                noise and gradients (no D x D matrix is formed). Default: None
            return_smoothgrad (bool, optional): also return SmoothGrad, the
                gradient of the smoothed function, from the same samples: in
                the inputs' layout, or (N, G) group sums with ``feature_mask``.
                Default: False
            return_stderr (bool, optional): also return the Monte Carlo
                standard error of every returned entry, from the samples
                already drawn (sample standard deviation of the per-sample terms
                / sqrt(number of independent samples)), so that ``n_samples``
                can be chosen. Needs at least 2 independent samples (2 pairs
                when ``antithetic``). Default: False
            antithetic (bool, optional): draw noise in pairs (z, -z).
                Default: True
            output_layout (str, optional): layout of the ungrouped Hessian
                (and its standard error): ``"nested"``, ``"per_input"`` (a
                tuple aligned with the inputs, for ``NoiseTunnel`` and
                ``captum.metrics`` on tuple inputs) or ``"flat"``, as in
                :meth:`IntegratedHessians.attribute`. Default: "nested"

        Returns:
            **hessian**, followed by **smoothgrad** if ``return_smoothgrad``,
            followed by the standard error of each of them if ``return_stderr``
            (in the same layout):

            - **hessian** (Tensor or tuple[tuple[Tensor, ...], ...]): the
              symmetric smoothed Hessian, (N, *F, *F) for one input tensor,
              ``out[i][j]`` of shape (N, *F_i, *F_j) for a tuple of inputs,
              (N, G, G) with ``feature_mask``.
            - **smoothgrad** (Tensor or tuple[Tensor, ...]): (N, *F) per input,
              or (N, G).

            The number of gradient evaluations is in ``self.last_call_cost``.

        Examples::

            >>> import torch
            >>> from captum_interactions import SmoothHess
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
            ...                             torch.nn.Linear(16, 3))
            >>> sh = SmoothHess(model)
            >>> x = torch.randn(2, 4)
            >>> hess, grad, hess_se, grad_se = sh.attribute(
            ...     x, target=1, n_samples=1000, stdevs=0.2,
            ...     return_smoothgrad=True, return_stderr=True)
            >>> hess.shape, grad.shape
            (torch.Size([2, 4, 4]), torch.Size([2, 4]))
        """
        is_inputs_tuple = isinstance(inputs, tuple)
        inputs_t = format_inputs(inputs)
        validate_positive_int(n_samples, "n_samples", minimum=2)
        if antithetic and n_samples % 2:
            raise ValueError(
                f"`n_samples` must be even with `antithetic=True` (pairs z, -z), "
                f"got {n_samples}"
            )
        sigmas = normalize_stdevs(stdevs, len(inputs_t))
        validate_output_layout(output_layout, is_inputs_tuple and feature_mask is None)
        validate_internal_batch_size(internal_batch_size)
        check_finite(inputs_t, "inputs")
        check_noise_resolution(sigmas, inputs_t)
        num_examples = inputs_t[0].shape[0]
        validate_target(target, num_examples)
        rows_per_unit = 2 if antithetic else 1
        num_units = n_samples // rows_per_unit
        if return_stderr and num_units < 2:
            raise ValueError(
                "`return_stderr=True` needs at least 2 independent samples: "
                f"`n_samples` >= {2 * rows_per_unit}, got {n_samples}"
            )
        groups = FeatureGroups(feature_mask, inputs_t)
        dtype, device = inputs_t[0].dtype, inputs_t[0].device
        shapes = [tuple(x.shape[1:]) for x in inputs_t]
        x_flat = flatten_features(inputs_t)  # (N, D)
        num_features = x_flat.shape[1]
        sigma_flat = flatten_features(
            [torch.full_like(x[:1], s) for x, s in zip(inputs_t, sigmas)]
        )  # (1, D)

        # before the (N, G, G) accumulators are allocated: the budget bounds the
        # gradient rows per pass (and raises if the output cannot fit)
        units_per_block = max(
            1, min(num_units, NOISE_BLOCK_NUMEL // max(1, num_examples * num_features))
        )
        internal_batch_size = smooth_hess_rows(
            num_examples, num_features, groups.num_groups, inputs_t[0].element_size(),
            rows_per_unit, return_stderr, units_per_block * num_examples * num_features,
            internal_batch_size, get_memory_budget(device),
        )
        accumulator = SteinAccumulator(
            num_examples, groups, dtype, device, with_stderr=return_stderr
        )
        base_expansion = RowExpansion(target, additional_forward_args, num_examples, 1)
        examples_per_pass, units_per_pass = example_chunks(
            num_examples, rows_per_unit, num_units, internal_batch_size
        )
        self.last_call_cost = CostCounter()
        with preserved_module_state(self.forward_func, eval_mode=True):
            for block_start in range(0, num_units, units_per_block):
                block_units = min(units_per_block, num_units - block_start)
                noise = torch.randn(
                    block_units, num_examples, num_features, dtype=dtype, device=device
                )
                for e0 in range(0, num_examples, examples_per_pass):
                    e1 = min(num_examples, e0 + examples_per_pass)
                    target_e, args_e = base_expansion.rows(e0, e1)
                    for u0 in range(0, block_units, units_per_pass):
                        u1 = min(block_units, u0 + units_per_pass)
                        z = noise[u0:u1, e0:e1]  # (u, n, D)
                        perturbation = z * sigma_flat
                        if antithetic:
                            perturbation = torch.cat([perturbation, -perturbation])
                        points_flat = x_flat[e0:e1] + perturbation  # (r * u, n, D)
                        copies = points_flat.shape[0]
                        expansion = RowExpansion(target_e, args_e, e1 - e0, copies)
                        points = split_features(
                            points_flat.reshape(-1, num_features), shapes
                        )
                        grads = plain_gradients(
                            self.forward_func,
                            points,
                            expansion.target,
                            expansion.additional_forward_args,
                        )
                        grad_flat = flatten_features(grads).view(copies, e1 - e0, -1)
                        if antithetic:
                            plus, minus = grad_flat.chunk(2)
                            b, c = 0.5 * (plus - minus), 0.5 * (plus + minus)
                        else:
                            b = c = grad_flat
                        accumulator.add(z / sigma_flat, b, c, e0, e1)
                        self.last_call_cost.gradient_rows += copies * (e1 - e0)
                        self.last_call_cost.batches += 1

        hessian = format_interaction_output(
            accumulator.mean_hessian(num_units), groups, is_inputs_tuple, output_layout
        )
        outputs = [hessian]
        if return_smoothgrad:
            outputs.append(
                _format_gradient(
                    accumulator.mean_gradient(num_units), groups, shapes, is_inputs_tuple
                )
            )
        if return_stderr:
            outputs.append(
                format_interaction_output(
                    accumulator.stderr_hessian(num_units),
                    groups,
                    is_inputs_tuple,
                    output_layout,
                )
            )
            if return_smoothgrad:
                outputs.append(
                    _format_gradient(
                        accumulator.stderr_gradient(num_units),
                        groups,
                        shapes,
                        is_inputs_tuple,
                    )
                )
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _format_gradient(
    flat: Tensor,
    groups: FeatureGroups,
    shapes: Sequence[Tuple[int, ...]],
    is_inputs_tuple: bool,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """(N, G) -> (N, G) when grouped, else the inputs' layout."""
    if not groups.is_identity:
        return flat
    parts = split_features(flat, shapes)
    return parts if is_inputs_tuple else parts[0]
