#!/usr/bin/env python3
import math
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

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
    SteinAccumulator,
    draw_noise,
    example_chunks,
    noise_block_sizes,
    plain_gradients,
    resolve_sampler,
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
        self.last_call_samples = 0

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
        sampler: str = "auto",
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
            sampler (str, optional): how the noise directions z are drawn;
                every choice keeps each z marginally N(0, I), so the estimate
                stays unbiased. ``"orthogonal"``: blocks of up to D
                orthonormal directions with chi(D) radii, which cancel the
                quadratic part of the sampling error (2-3x fewer gradient
                calls than i.i.d. at equal error on a 784-500-300-10 ReLU MLP).
                ``"sobol"``: randomized quasi-Monte Carlo (scrambled Sobol
                points through the normal quantile), far ahead in few
                dimensions. ``"gaussian"``: i.i.d. draws, the plain estimator.
                ``"auto"``: ``"sobol"`` up to 16 features, else
                ``"orthogonal"``. Structured samples are drawn in at least 16
                independent blocks (orthonormal frames of up to D directions:
                the full orthogonal gain needs ``n_samples`` >= 32 D with pairs);
                their standard error comes from the spread of the block
                means, scaled by t(B-1)/z at 97.5% so that +-1.96 SE
                intervals keep 95% coverage. Default: "auto"
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

        sampler = resolve_sampler(sampler, num_features)
        block_sizes = noise_block_sizes(sampler, num_units, num_examples, num_features)
        # before the (N, G, G) accumulators are allocated: the budget bounds the
        # gradient rows per pass (and raises if the output cannot fit); an
        # orthogonal block also holds its Gaussian matrix and radii while drawn
        noise_numel = max(block_sizes) * num_examples * num_features
        internal_batch_size = smooth_hess_rows(
            num_examples, num_features, groups.num_groups, inputs_t[0].element_size(),
            rows_per_unit, return_stderr,
            noise_numel * (3 if sampler == "orthogonal" else 1),
            internal_batch_size, get_memory_budget(device),
        )
        accumulator = SteinAccumulator(
            num_examples,
            groups,
            dtype,
            device,
            with_stderr=return_stderr,
            independent_units=sampler == "gaussian",
        )
        base_expansion = RowExpansion(target, additional_forward_args, num_examples, 1)
        examples_per_pass, units_per_pass = example_chunks(
            num_examples, rows_per_unit, num_units, internal_batch_size
        )
        self.last_call_cost = CostCounter()
        with preserved_module_state(self.forward_func, eval_mode=True):
            for block_units in block_sizes:
                noise = draw_noise(
                    sampler, block_units, num_examples, num_features, dtype, device
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
                accumulator.end_block(block_units)

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


    def attribute_to_stderr(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        rel_stderr: float = 0.05,
        max_samples: int = 65536,
        initial_samples: int = 512,
        **kwargs: Any,
    ) -> Any:
        r"""
        SmoothHess with as many samples as needed for a target relative error.

        Draws samples in rounds until, for every example, the standard error
        of the Hessian relative to its size, ||SE||_F / ||H||_F, is at most
        ``rel_stderr``, or ``max_samples`` gradient calls per example are
        spent (then a warning names the examples short of the target). Each
        round predicts the samples still needed from the error so far
        (error ~ n^(-1/2)); rounds are independent and are pooled by their
        sizes, so no sample is wasted.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): as in :meth:`attribute`.
            rel_stderr (float, optional): target ||SE||_F / ||H||_F per
                example, in (0, 1). Default: 0.05
            max_samples (int, optional): budget of gradient calls per example.
                Default: 65536
            initial_samples (int, optional): size of the first round.
                Default: 512
            **kwargs: any other argument of :meth:`attribute` (``target``,
                ``stdevs``, ``feature_mask``, ``sampler``, ...);
                ``return_stderr`` is always on.

        Returns:
            The outputs of :meth:`attribute` with ``return_stderr=True``:
            **hessian**, (**smoothgrad**), **hessian stderr**, (**smoothgrad
            stderr**). The samples used per example are in
            ``self.last_call_samples``, the gradient calls in
            ``self.last_call_cost``.

        Examples::

            >>> import torch
            >>> from captum_interactions import SmoothHess
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
            ...                             torch.nn.Linear(16, 1))
            >>> sh = SmoothHess(model)
            >>> hess, hess_se = sh.attribute_to_stderr(torch.randn(2, 4), rel_stderr=0.1)
            >>> sh.last_call_samples <= 65536
            True
        """
        if not (isinstance(rel_stderr, (int, float)) and 0 < rel_stderr < 1):
            raise ValueError(f"`rel_stderr` must be in (0, 1), got {rel_stderr!r}")
        validate_positive_int(max_samples, "max_samples", minimum=4)
        validate_positive_int(initial_samples, "initial_samples", minimum=4)
        if "return_stderr" in kwargs or "n_samples" in kwargs:
            raise ValueError(
                "`return_stderr` and `n_samples` are chosen by attribute_to_stderr; "
                "pass `rel_stderr` / `max_samples` instead"
            )
        granularity = 2 if kwargs.get("antithetic", True) else 1
        pooled: Optional[List[Any]] = None
        used = 0
        total_cost = CostCounter()
        round_samples = min(initial_samples, max_samples)
        while True:
            round_samples -= round_samples % granularity
            outputs = self.attribute(
                inputs, n_samples=round_samples, return_stderr=True, **kwargs
            )
            total_cost.gradient_rows += self.last_call_cost.gradient_rows
            total_cost.batches += self.last_call_cost.batches
            pooled = _pool_rounds(pooled, used, list(outputs), round_samples)
            used += round_samples
            num_estimates = len(pooled) // 2
            achieved = _relative_stderr(pooled[0], pooled[num_estimates])
            worst = achieved.max().item()
            remaining = max_samples - used
            if worst <= rel_stderr or remaining < 2 * granularity:
                break
            needed = math.ceil(1.2 * used * (worst / rel_stderr) ** 2) - used
            round_samples = min(remaining, max(needed, granularity * 2))
        self.last_call_cost = total_cost
        self.last_call_samples = used
        if worst > rel_stderr:
            short = (achieved > rel_stderr).nonzero().flatten().tolist()
            warnings.warn(
                f"SmoothHess reached a relative standard error of {worst:.3g} "
                f"(target {rel_stderr}) for examples {short} within "
                f"`max_samples`={max_samples}; raise `max_samples` or `stdevs`",
                stacklevel=2,
            )
        return tuple(pooled)

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


def _tensors(value: Any) -> List[Tensor]:
    """The tensors of an output (a tensor or nested tuples), in order."""
    if isinstance(value, Tensor):
        return [value]
    return [t for part in value for t in _tensors(part)]


def _rebuild(value: Any, tensors: List[Tensor]) -> Any:
    """``value``'s nesting with ``tensors`` (consumed in order) as leaves."""
    if isinstance(value, Tensor):
        return tensors.pop(0)
    return tuple(_rebuild(part, tensors) for part in value)


def _pool_rounds(
    pooled: Optional[List[Any]], pooled_samples: int, outputs: List[Any], samples: int
) -> List[Any]:
    """Pool two independent rounds: means weighted by size, SE in quadrature.

    ``outputs`` holds the estimates, then their standard errors (same order).
    """
    if pooled is None:
        return outputs
    total = pooled_samples + samples
    w_old, w_new = pooled_samples / total, samples / total
    half = len(outputs) // 2
    merged = []
    for k, (old, new) in enumerate(zip(pooled, outputs)):
        if k < half:
            leaves = [w_old * a + w_new * b for a, b in zip(_tensors(old), _tensors(new))]
        else:
            leaves = [
                ((w_old * a) ** 2 + (w_new * b) ** 2).sqrt()
                for a, b in zip(_tensors(old), _tensors(new))
            ]
        merged.append(_rebuild(old, leaves))
    return merged


def _relative_stderr(hessian: Any, stderr: Any) -> Tensor:
    """||SE||_F / ||H||_F per example, over every block of the layout."""
    num_examples = _tensors(hessian)[0].shape[0]
    h = torch.cat([t.reshape(num_examples, -1) for t in _tensors(hessian)], dim=1)
    se = torch.cat([t.reshape(num_examples, -1) for t in _tensors(stderr)], dim=1)
    return se.norm(dim=1) / h.norm(dim=1).clamp_min(torch.finfo(h.dtype).tiny)
