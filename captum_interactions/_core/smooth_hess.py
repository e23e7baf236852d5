#!/usr/bin/env python3
import math
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.attribution import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from captum_interactions._utils.nonsmooth import checked_smoothness
from captum_interactions._utils.common import (
    RowExpansion,
    check_finite,
    check_noise_resolution,
    format_inputs,
    run_scalar_forward,
    normalize_stdevs,
    preserved_module_state,
    validate_internal_batch_size,
    validate_positive_int,
    validate_target,
    warn_if_nonfinite,
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
from captum_interactions._utils.memory import (
    get_memory_budget,
    smooth_hess_rows,
)
from captum_interactions._utils.stein import (
    SteinAccumulator,
    draw_noise,
    example_chunks,
    importance_scale,
    importance_weights,
    validate_importance,
    ReluSurrogate,
    first_linear_layer,
    relu_after,
    noise_block_sizes,
    plain_gradients,
    resolve_sampler,
    subspace_basis,
)
from captum_interactions._utils.stein_surrogate import (
    FIT_MAX_POINTS,
    FittedReluSurrogate,
    fit_relu_surrogate,
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

    Two exact variance reductions apply when the model starts with a linear
    layer (``input_subspace``, ``control_variate``): the noise is projected
    onto the input subspace the model sees (a conditional expectation, so
    still unbiased), and the Stein terms of a first-layer surrogate whose
    smoothed Hessian is known in closed form are subtracted and its exact
    value added back. On a 784-500-300-10 ReLU MLP both together with the
    orthogonal sampler (the default there) need 9-10x fewer gradient calls
    than i.i.d. antithetic sampling for a relative error of 10% to 1%
    (``benchmarks/bench_smooth_hess_samplers.py``). Two generic reductions
    need no structure: importance sampling from a wider Gaussian with exact
    density-ratio weights (``importance``), and a ReLU surrogate fitted to
    the gradients already computed, cross-fitted between two halves of the
    samples so that it stays unbiased (``control_variate="fit"``).

    Cost: ``n_samples`` gradient evaluations per example, plus rank-one updates
    of a D x D (or G x G with ``feature_mask``) matrix per sample.

    **Continuity.** Stein's identity on gradients needs a model that is
    continuous in its inputs; kinks (ReLU, max pooling, ``abs``) are fine, a
    jump is not: its delta never shows in a gradient, so the estimate misses
    its share. The first gradient pass of each call is inspected, and a
    ``NonSmoothModelWarning`` names rounding, ``sign``, masks and indices of
    input-dependent values (``x > 0`` used in arithmetic, integer casts),
    cut gradients (``detach``) and an output that does not depend
    differentiably on the inputs.

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
        self.last_call_subspace_rank: Optional[int] = None
        self.last_call_control_variate = False
        self.last_call_fitted_surrogate = False
        self.last_call_importance_scale: Optional[float] = None
        # (a "_cache" name: explain_dataset leaves it out of the method's fingerprint)
        self._basis_cache: Optional[Tuple[Tensor, Any, Optional[Tensor]]] = None

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
        input_subspace: Union[str, None, Tensor] = "auto",
        control_variate: Optional[str] = "auto",
        importance: Union[str, None, float] = "auto",
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
                ``"orthogonal"`` (counting the r dimensions of the subspace
                when ``input_subspace`` projects, and D below reads r).
                Structured samples are drawn in at least 16 (Sobol: 8)
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
            input_subspace (str, Tensor or None, optional): Rao-Blackwellised
                sampling in the subspace of inputs the model sees. If the model
                uses the (flattened, concatenated) inputs x only through W x,
                pass W, shape (m, D): z is replaced by its projection onto the
                row space of W (scaled by sigma), E[z | that projection], which
                is unbiased and removes the variance of the rest exactly, and
                the sampler draws in that r-dimensional subspace (r = rank W;
                nothing changes when r = D). The condition is checked with one
                forward pass per call (the output must not move along a random
                excluded direction as long as a typical sample; else a
                ``ValueError``); a W that passes the check but is wrong in
                directions it did not probe biases the estimate. ``"auto"``:
                W is the weight of the first layer of an ``nn.Sequential`` that
                starts with ``nn.Linear`` (after any ``nn.Identity`` /
                ``nn.Flatten()``), one input tensor, no forward hooks on those
                modules; otherwise no projection. ``None``: never project.
                The rank used is in ``self.last_call_subspace_rank`` (None
                without projection). Default: "auto"
            control_variate (str or None, optional): ``"auto"``: when the
                model is an ``nn.Sequential`` that starts with ``nn.Linear``
                then ``nn.ReLU`` (the ``"auto"`` rule of ``input_subspace``),
                subtract the Stein terms of the surrogate
                g(x) = v^T relu(W x + b), v the gradient of the later layers at
                the clean point (one more gradient row per example), computed
                with the same noise, and add g's exact smoothed Hessian and
                gradient back. Unbiased for any v; the first layer's kink
                crossings cancel (exact for one hidden layer). Costs a
                (rows x D) @ (D x m) product per pass. ``"fit"``: for any
                model (a black box), a surrogate
                g = sum_j c_j relu(v_j . u + beta_j) + L . u of the noise
                coordinates u (64 units) is fitted by least squares to the
                gradients already computed (no extra gradient calls), with
                cross-fitting: the samples are split into two folds by
                blocks, each fold's surrogate corrects the other fold's
                Stein terms and adds its exact smoothed Hessian and gradient,
                so the estimate stays unbiased whatever the fit, and the
                standard error comes from the spread of the block means.
                Costs a fit (400 Adam steps on up to 2048 points per fold
                and example) and keeps every sample's noise and gradient
                terms until both fits are done. On a plain function
                summing 64 ReLU units in 20 features: 5-7x fewer gradient
                calls than orthogonal frames alone for 3%-1% error (17-24x
                fewer than i.i.d. sampling), 1.8x for 10%; on max(x1, x2)
                with Sobol points 3x fewer than without it; on relu(x1)
                relu(x2) 2x more for 1%
                (``benchmarks/bench_smooth_hess_samplers.py``). Worth it
                when a gradient call is expensive: the fit takes seconds per
                example on a CPU (about 1.3 s against 2 ms for a whole call
                without it on a small MLP of 40 features), so ``"auto"``
                never fits. ``None``: off. Whether a
                control variate was used is in
                ``self.last_call_control_variate``, whether it was fitted in
                ``self.last_call_fitted_surrogate``.
                Default: "auto"
            importance (str, float or None, optional): importance sampling
                of the noise, for any model (no structure needed). The
                noise is drawn from the wider N(0, tau^2 I) in the r sampled
                dimensions (r = D, or the rank of ``input_subspace``) and
                every Stein term (and SmoothGrad term) is weighted by the
                exact density ratio w = tau^r exp(-|z|^2 (1 - 1/tau^2) / 2),
                z the drawn noise, so the estimate stays unbiased for every
                sampler (orthogonal frames and Sobol points are scaled by
                tau). Wider noise reaches the kinks far from x more often,
                where a piecewise-linear model's curvature lies: for
                examples whose nearest kink is a few sigma away the Stein
                terms are rare events, and these dominate the relative error
                (``max(x1, x2)`` at three points, one 2.5 sigma from the
                kink, with Sobol points: 3-4.5x fewer gradient calls than
                Sobol alone for 10%-1% error, 5-25x fewer than i.i.d.
                sampling; ``benchmarks/bench_smooth_hess_samplers.py``).
                ``"auto"``: tau^2 = 1 + 2.5 / r, so w < e^1.25 in any
                dimension (the gain fades with r: about 1.2x in 20
                features). A float: tau itself, >= 1 (1 is the same as
                None); a warning when tau^r > 100, as the weights then make
                the estimate more variable. ``None``: z ~ N(0, I), no
                weights. The tau used is in
                ``self.last_call_importance_scale`` (None when off).
                Default: "auto"

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

        resolve_sampler(sampler, 1)  # validated before any model call
        validate_importance(importance)
        if control_variate not in ("auto", "fit", None) or not (
            control_variate is None or isinstance(control_variate, str)
        ):
            raise ValueError(
                "`control_variate` must be 'auto', 'fit' or None, got "
                f"{control_variate!r}"
            )
        if control_variate == "fit" and num_units < 4:
            raise ValueError(
                "`control_variate='fit'` needs at least 4 independent samples (2 per "
                f"fold): `n_samples` >= {4 * rows_per_unit}, got {n_samples}"
            )
        layer = None
        if (input_subspace == "auto" or control_variate == "auto") and (
            additional_forward_args is None
        ):
            layer = first_linear_layer(self.forward_func, inputs_t)
            if layer is not None and layer[1].weight.dtype != dtype:
                layer = None  # the model call raises the dtype error below
        weight = self._subspace_weight(input_subspace, inputs_t, num_features, layer)
        basis64 = None
        if weight is not None:
            # an SVD of W per call: reused while W (its storage and in-place
            # version) and the sigmas are the same, e.g. over rounds or batches
            # (the cache holds W itself, so its identity cannot be reused)
            key = (
                weight.data_ptr(), weight._version, tuple(weight.shape),
                weight.dtype, weight.device, tuple(float(v) for v in sigmas),
                tuple(shapes),
            )
            cache = self._basis_cache
            if cache is not None and cache[0] is weight and cache[1] == key:
                basis64 = cache[2]
            else:
                basis64 = subspace_basis(weight, sigma_flat)
                self._basis_cache = (weight, key, basis64)
        surrogate_layer = None
        if (
            control_variate == "auto"
            and layer is not None
            and relu_after(self.forward_func, layer[0])
            and _rows_in_span(layer[1].weight.detach(), sigma_flat, basis64)
        ):
            surrogate_layer = layer

        # the fitted surrogate only when asked for (the first-layer one needs
        # "auto"): it saves gradient calls but costs seconds of fitting per
        # call, far more than the calls it saves on a cheap model
        fitting = control_variate == "fit"

        def plan(
            basis: Optional[Tensor], with_surrogate: bool
        ) -> Tuple[str, List[int], int]:
            sample_dim = num_features if basis is None else basis.shape[1]
            resolved = resolve_sampler(sampler, sample_dim)
            sizes = noise_block_sizes(
                resolved, num_units, num_examples, sample_dim, statistical=fitting
            )
            # before the (N, G, G) accumulators are allocated: the budget bounds
            # the gradient rows per pass (and raises if the output cannot fit);
            # an orthogonal block also holds its Gaussian matrix and radii while
            # drawn; with a subspace it is drawn in r dimensions, then mapped to
            # D; a control variate holds its exact (N, G, G) Hessian
            noise_numel = max(sizes) * num_examples * num_features
            noise_numel *= 3 if resolved == "orthogonal" else 1
            noise_numel += 0 if basis is None else noise_numel
            if with_surrogate:
                noise_numel += num_examples * groups.num_groups * (groups.num_groups + 1)
            if fitting:  # every sample's noise and two gradient terms are kept
                noise_numel += num_units * num_examples * (sample_dim + 2 * num_features)
                noise_numel += 2 * num_examples * groups.num_groups * (groups.num_groups + 1)
            rows = smooth_hess_rows(
                num_examples, num_features, groups.num_groups,
                inputs_t[0].element_size(), rows_per_unit, return_stderr,
                noise_numel, internal_batch_size, get_memory_budget(device),
            )
            return resolved, sizes, rows

        basis = None if basis64 is None else basis64.to(device=device, dtype=dtype)
        plan(basis, surrogate_layer is not None)  # budget errors before any model call
        self.last_call_cost = CostCounter()
        surrogate = None
        if basis is not None or surrogate_layer is not None:
            with preserved_module_state(self.forward_func, eval_mode=True):
                if basis is not None:
                    basis = self._check_subspace(
                        basis, x_flat, sigma_flat, shapes, target,
                        additional_forward_args,
                        strict=not isinstance(input_subspace, str),
                    )
                    if basis is None:  # "auto" fell back: the structure is not what it seems
                        surrogate_layer = None
                if surrogate_layer is not None:
                    surrogate = self._relu_surrogate(surrogate_layer, x_flat, target)
        self.last_call_subspace_rank = None if basis is None else basis.shape[1]
        sampler, block_sizes, internal_batch_size = plan(basis, surrogate is not None)
        self.last_call_control_variate = fitting or surrogate is not None
        self.last_call_fitted_surrogate = fitting
        sample_dim = num_features if basis is None else basis.shape[1]
        scale = importance_scale(importance, sample_dim)
        self.last_call_importance_scale = scale
        accumulator = SteinAccumulator(
            num_examples,
            groups,
            dtype,
            device,
            with_stderr=return_stderr,
            # the fitted surrogate adds its exact value per block: block spread
            independent_units=sampler == "gaussian" and not fitting,
        )
        kept: List[Tuple[int, Tensor, Optional[Tensor], Tensor, Tensor]] = []
        base_expansion = RowExpansion(target, additional_forward_args, num_examples, 1)
        examples_per_pass, units_per_pass = example_chunks(
            num_examples, rows_per_unit, num_units, internal_batch_size
        )

        def stein_terms(z: Tensor, e0: int, e1: int) -> Tuple[Tensor, Tensor]:
            """b and c (Stein and SmoothGrad factors) of the units z (u, n, D) of
            the examples e0..e1, from one gradient pass."""
            target_e, args_e = base_expansion.rows(e0, e1)
            perturbation = z * sigma_flat
            if antithetic:
                perturbation = torch.cat([perturbation, -perturbation])
            points_flat = x_flat[e0:e1] + perturbation  # (r * u, n, D)
            copies = points_flat.shape[0]
            expansion = RowExpansion(target_e, args_e, e1 - e0, copies)
            points = split_features(points_flat.reshape(-1, num_features), shapes)
            grads = plain_gradients(
                self.forward_func, points, expansion.target, expansion.additional_forward_args
            )
            grad_flat = flatten_features(grads).view(copies, e1 - e0, -1)
            if surrogate is not None:  # Stein terms of f - g
                grad_flat = grad_flat - surrogate.gradients(points_flat, e0, e1)
            self.last_call_cost.gradient_rows += copies * (e1 - e0)
            self.last_call_cost.batches += 1
            if antithetic:
                plus, minus = grad_flat.chunk(2)
                return 0.5 * (plus - minus), 0.5 * (plus + minus)
            return grad_flat, grad_flat

        # blocks that fit one pass together share it (small models: the
        # per-pass cost is most of the time); each is still accumulated and
        # closed on its own, so the estimate and its standard error are the same
        groups_of_blocks: List[List[int]] = []
        for block_units in block_sizes:
            last = groups_of_blocks[-1] if groups_of_blocks else None
            if (last is not None and examples_per_pass == num_examples
                    and sum(last) + block_units <= units_per_pass):
                last.append(block_units)
            else:
                groups_of_blocks.append([block_units])
        # the first gradient pass is inspected: jumps (not kinks) break Stein's identity
        with preserved_module_state(self.forward_func, eval_mode=True), \
                checked_smoothness(self, jumps_only=True):
            for group in groups_of_blocks:
                drawn = []
                for block_units in group:
                    noise = draw_noise(
                        sampler, block_units, num_examples, sample_dim, dtype, device
                    )
                    weights = None
                    if scale is not None:  # noise -> tau * noise, weights p/q (units, N)
                        weights = importance_weights(noise, scale).unsqueeze(-1)
                    xi = noise
                    if basis is not None:
                        noise = noise @ basis.transpose(0, 1)  # (units, N, D): z = Q xi
                    drawn.append((block_units, noise, xi, weights))
                shared = None
                if len(group) > 1:
                    shared = stein_terms(torch.cat([d[1] for d in drawn]), 0, num_examples)
                offset = 0
                for block_units, noise, xi, weights in drawn:
                    if fitting:  # this block's Stein factors, kept until both fits
                        kept_b = noise.new_empty(block_units, num_examples, num_features)
                        kept_c = torch.empty_like(kept_b)
                    for e0 in range(0, num_examples, examples_per_pass):
                        e1 = min(num_examples, e0 + examples_per_pass)
                        for u0 in range(0, block_units, units_per_pass):
                            u1 = min(block_units, u0 + units_per_pass)
                            z = noise[u0:u1, e0:e1]  # (u, n, D)
                            if shared is None:
                                b, c = stein_terms(z, e0, e1)
                            else:  # the group's pass: one chunk per block
                                b = shared[0][offset : offset + block_units]
                                c = shared[1][offset : offset + block_units]
                            if fitting:
                                kept_b[u0:u1, e0:e1] = b
                                kept_c[u0:u1, e0:e1] = c
                                continue
                            a = z / sigma_flat
                            if weights is not None:  # E_p[h] = E_q[(p/q) h]
                                w = weights[u0:u1, e0:e1]
                                a, c = a * w, c * w
                            accumulator.add(a, b, c, e0, e1)
                    offset += block_units
                    if fitting:
                        kept.append((block_units, xi, weights, kept_b, kept_c))
                        continue
                    accumulator.end_block(block_units)
        if fitting:
            self._add_cross_fitted(
                accumulator, kept, x_flat, sigma_flat, basis, groups, antithetic
            )

        mean_hessian = accumulator.mean_hessian(num_units)  # fitted: exact values in
        mean_gradient = accumulator.mean_gradient(num_units)
        if surrogate is not None:  # + the control variate's exact expectation
            exact_hessian, exact_gradient = surrogate.smoothed(x_flat, sigma_flat, groups)
            mean_hessian = mean_hessian + exact_hessian
            mean_gradient = mean_gradient + exact_gradient
        warn_if_nonfinite(
            mean_hessian, type(self).__name__, "at the sampled points x + sigma * z"
        )
        hessian = format_interaction_output(
            mean_hessian, groups, is_inputs_tuple, output_layout
        )
        outputs = [hessian]
        if return_smoothgrad:
            outputs.append(
                _format_gradient(mean_gradient, groups, shapes, is_inputs_tuple)
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


    @staticmethod
    def _add_cross_fitted(
        accumulator: SteinAccumulator,
        kept: List[Tuple[int, Tensor, Optional[Tensor], Tensor, Tensor]],
        x_flat: Tensor,
        sigma_flat: Tensor,
        basis: Optional[Tensor],
        groups: FeatureGroups,
        antithetic: bool,
    ) -> None:
        """Cross-fitting: blocks alternate between two folds; a ReLU surrogate
        is fitted on each fold's gradients and corrects the other fold's Stein
        terms, whose blocks then carry its exact smoothed Hessian and gradient."""
        folds = [kept[0::2], kept[1::2]]
        surrogates = []
        for fold in folds:
            xi = torch.cat([k[1] for k in fold])  # (M, N, r) sampled coordinates
            b = torch.cat([k[3] for k in fold])
            c = torch.cat([k[4] for k in fold])
            if antithetic:  # both points of each pair: grad f(x -+ sigma z) = c -+ b
                xi, grad = torch.cat([xi, -xi]), torch.cat([c + b, c - b])
            else:
                grad = c
            if xi.shape[0] > FIT_MAX_POINTS:  # a random subset for the fit
                subset = torch.randperm(xi.shape[0], device=xi.device)[:FIT_MAX_POINTS]
                xi, grad = xi[subset], grad[subset]
            target = grad * sigma_flat  # gradients in the noise coordinates u
            if basis is not None:
                target = target @ basis  # ... and in the sampled ones, xi
            fit = fit_relu_surrogate(xi.transpose(0, 1), target.transpose(0, 1))
            surrogates.append(FittedReluSurrogate(fit, x_flat, sigma_flat, basis))
        num_examples = x_flat.shape[0]
        for index, fold in enumerate(folds):
            other = surrogates[1 - index]  # fitted without this fold's samples
            exact_hessian, exact_gradient = other.smoothed(x_flat, groups)
            for block_units, xi, weights, b, c in fold:
                z = xi if basis is None else xi @ basis.transpose(0, 1)
                perturbation = z * sigma_flat
                plus = other.gradients(x_flat + perturbation, 0, num_examples)
                if antithetic:
                    minus = other.gradients(x_flat - perturbation, 0, num_examples)
                    b = b - 0.5 * (plus - minus)
                    c = c - 0.5 * (plus + minus)
                else:
                    b = c = b - plus
                a = z / sigma_flat
                if weights is not None:
                    a, c = a * weights, c * weights
                accumulator.add(a, b, c, 0, num_examples)
                accumulator.add_constant(exact_hessian, exact_gradient, block_units)
                accumulator.end_block(block_units)

    def _subspace_weight(
        self,
        input_subspace: Union[str, None, Tensor],
        inputs: Tuple[Tensor, ...],
        num_features: int,
        layer: Optional[Tuple[int, torch.nn.Linear]],
    ) -> Optional[Tensor]:
        """The map W the model sees the flattened inputs through, or None."""
        if input_subspace is None:
            return None
        if isinstance(input_subspace, str):
            if input_subspace != "auto":
                raise ValueError(
                    "`input_subspace` must be 'auto', None or a (m, D) tensor, "
                    f"got {input_subspace!r}"
                )
            return None if layer is None else layer[1].weight
        if not isinstance(input_subspace, Tensor):
            raise TypeError(
                "`input_subspace` must be 'auto', None or a (m, D) tensor, got "
                f"{type(input_subspace).__name__}"
            )
        if input_subspace.dim() != 2 or input_subspace.shape[1] != num_features:
            raise ValueError(
                f"`input_subspace` must have shape (m, {num_features}) (the "
                f"flattened features), got {tuple(input_subspace.shape)}"
            )
        if not input_subspace.is_floating_point():
            raise TypeError("`input_subspace` must be a floating-point tensor")
        check_finite((input_subspace,), "input_subspace")
        return input_subspace

    def _relu_surrogate(
        self, layer: Tuple[int, torch.nn.Linear], x_flat: Tensor, target: TargetType
    ) -> ReluSurrogate:
        """g = v^T relu(W x + b), v the gradient of the layers after the ReLU at x."""
        index, linear = layer
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        hidden = torch.relu(torch.nn.functional.linear(x_flat, weight, bias))
        rest = self.forward_func[index + 2 :]
        (slopes,) = plain_gradients(rest, (hidden,), target, None)
        self.last_call_cost.gradient_rows += x_flat.shape[0]
        self.last_call_cost.batches += 1
        return ReluSurrogate(weight, bias, slopes.reshape(x_flat.shape[0], -1))

    def _check_subspace(
        self,
        basis: Tensor,
        x_flat: Tensor,
        sigma_flat: Tensor,
        shapes: Sequence[Tuple[int, ...]],
        target: TargetType,
        additional_forward_args: Any,
        strict: bool,
    ) -> Optional[Tensor]:
        """One forward pass: the output must not move along an excluded direction.

        Per example, f at x, at x + sigma z (z ~ N(0, I)) and at x + sigma z_perp,
        z_perp a random direction orthogonal to the subspace with the norm of z.
        A move along z_perp larger than 1% of the move along z (plus 1000 eps
        times the size of the outputs, for round-off) means the model sees more than the subspace: ``ValueError`` for a given
        W, a warning and no projection for ``"auto"``.
        """
        num_examples, num_features = x_flat.shape
        z = torch.randn_like(x_flat)
        z_perp = z
        for _ in range(2):  # twice: exact even when z is (nearly) in the subspace
            z_perp = z_perp - (z_perp @ basis) @ basis.transpose(0, 1)
        z_perp = z_perp * (
            z.norm(dim=1, keepdim=True) / z_perp.norm(dim=1, keepdim=True).clamp_min(
                torch.finfo(z.dtype).tiny
            )
        )
        points_flat = torch.cat([x_flat, x_flat + sigma_flat * z, x_flat + sigma_flat * z_perp])
        expansion = RowExpansion(target, additional_forward_args, num_examples, 3)
        with torch.no_grad():
            out = run_scalar_forward(
                self.forward_func,
                split_features(points_flat, shapes),
                expansion.target,
                expansion.additional_forward_args,
            ).reshape(3, num_examples)
        base, full, perp = out[0], out[1], out[2]
        move_full, move_perp = (full - base).abs(), (perp - base).abs()
        eps = torch.finfo(out.dtype).eps
        # round-off scale: the example's own outputs and the batch's largest
        scale = out.abs().amax(dim=0) + out.abs().max()
        allowed = 1e-2 * move_full + 1e3 * eps * scale
        bad = (move_perp > allowed).nonzero().flatten().tolist()
        if not bad:
            return basis
        message = (
            f"the model's output moves along directions outside `input_subspace` "
            f"(rank {basis.shape[1]} of {num_features} features) for examples {bad}: "
            f"it does not see its inputs only through W x, and projecting the "
            f"noise would bias the estimate"
        )
        if strict:
            raise ValueError(message + "; pass input_subspace=None")
        warnings.warn(message + "; sampling without projection", stacklevel=3)
        return None

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

def _rows_in_span(weight: Tensor, sigma_flat: Tensor, basis: Optional[Tensor]) -> bool:
    """Whether the rows of W diag(sigma) lie in the span of ``basis`` (all of R^D if None)."""
    if basis is None:
        return True
    rows = weight.reshape(weight.shape[0], -1).to(torch.float64)
    rows = rows * sigma_flat.reshape(1, -1).to(rows.device, torch.float64)
    basis = basis.to(rows.device)
    residual = rows - (rows @ basis) @ basis.transpose(0, 1)
    return bool(residual.norm() <= 1e-4 * rows.norm())


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
