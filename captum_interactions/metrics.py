#!/usr/bin/env python3
"""Metrics for interaction attributions: completeness and PMSE."""
from typing import Any, Callable, Tuple, Union

import torch
from captum._utils.typing import BaselineType, TargetType
from torch import Tensor

from captum_interactions._utils.common import (
    format_baselines,
    format_inputs,
    run_scalar_forward,
)

InteractionsType = Union[Tensor, Tuple[Tuple[Tensor, ...], ...]]


def _total_per_example(interactions: InteractionsType) -> Tensor:
    if isinstance(interactions, Tensor):
        return interactions.reshape(interactions.shape[0], -1).sum(dim=1)
    if isinstance(interactions, tuple) and interactions:
        blocks = [b for row in interactions for b in (row if isinstance(row, tuple) else (row,))]
        return sum(b.reshape(b.shape[0], -1).sum(dim=1) for b in blocks)
    raise TypeError(
        "`interactions` must be a tensor or a tuple of tuples of tensors, got "
        f"{type(interactions).__name__}"
    )


def interaction_completeness(
    forward_func: Callable,
    interactions: InteractionsType,
    inputs: Union[Tensor, Tuple[Tensor, ...]],
    baselines: BaselineType = None,
    target: TargetType = None,
    additional_forward_args: Any = None,
) -> Tensor:
    r"""
    Completeness error of an interaction matrix: the sum of all its entries
    minus the change in output it explains, per example,

    .. math::
        \delta_n = \sum_{i,j} \Gamma^{(n)}_{ij} - \big(f(x^{(n)}) - f(x'^{(n)})\big).

    Integrated Hessians and its layer variant satisfy completeness exactly, so
    this measures their quadrature error.

    Args:
        forward_func (Callable): the model (or any function) that was explained.
        interactions (Tensor or tuple[tuple[Tensor, ...], ...]): the result of an
            interaction method: (N, *F, *F), grouped (N, G, G), or the tuple of
            tuples returned for tuple inputs.
        inputs (Tensor or tuple[Tensor, ...]): the explained inputs, batch first.
        baselines (BaselineType, optional): the baselines used, in Captum's
            forms. Default: None (zeros).
        target (TargetType, optional): output selection, as in Captum.
            Default: None.
        additional_forward_args (Any, optional): extra model arguments.
            Default: None.

    Returns:
        Tensor: completeness error of shape (N,).

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softplus(),
        ...                             torch.nn.Linear(4, 1))
        >>> x = torch.randn(2, 3)
        >>> ih = IntegratedHessians(model)
        >>> gamma = ih.attribute(x)
        >>> interaction_completeness(model, gamma, x).abs().max() < 1e-4
        tensor(True)
    """
    inputs_t = format_inputs(inputs)
    baselines_t = format_baselines(baselines, inputs_t)
    with torch.no_grad():
        f_x = run_scalar_forward(forward_func, inputs_t, target, additional_forward_args)
        f_b = run_scalar_forward(
            forward_func, baselines_t, target, additional_forward_args
        )
    return _total_per_example(interactions) - (f_x - f_b)


# --- PMSE (SmoothHess, Torop et al. 2023) ------------------------------------
from typing import Optional  # noqa: E402

from captum_interactions._core.second_order_attack import (  # noqa: E402,F401
    first_order_attack,
    second_order_attack,
)
from captum_interactions._utils.common import (  # noqa: E402
    RowExpansion,
    validate_internal_batch_size,
    validate_positive_int,
    validate_target,
)
from captum_interactions._utils.feature_groups import (  # noqa: E402
    flatten_features,
    split_features,
)
from captum_interactions._utils.stein import (  # noqa: E402
    NOISE_BLOCK_NUMEL,
    flatten_gradient,
    flatten_hessian,
    quadratic_form,
)

PMSE_SAMPLERS = ("uniform", "reference")


def sample_ball(
    num_samples: int,
    num_examples: int,
    num_features: int,
    radius: float,
    sampler: str = "uniform",
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tensor:
    r"""Perturbations in the L2 ball of radius r, shape (S, N, D).

    ``"uniform"``: uniform in the ball (direction uniform on the sphere, norm
    r U^{1/D}). ``"reference"``: SmoothHess' reference sampler, direction
    uniform on the sphere and norm r U, which puts more mass near the center
    in high dimension.
    """
    if sampler not in PMSE_SAMPLERS:
        raise ValueError(f"`sampler` must be one of {PMSE_SAMPLERS}, got {sampler!r}")
    direction = torch.randn(num_samples, num_examples, num_features, dtype=dtype, device=device)
    direction = direction / direction.norm(dim=2, keepdim=True).clamp_min(
        torch.finfo(dtype).tiny
    )
    u = torch.rand(num_samples, num_examples, 1, dtype=dtype, device=device)
    norm = radius * (u.pow(1.0 / num_features) if sampler == "uniform" else u)
    return direction * norm


def pmse(
    forward_func: Callable,
    inputs: Union[Tensor, Tuple[Tensor, ...]],
    gradient: Union[Tensor, Tuple[Tensor, ...]],
    hessian: Union[None, Tensor, Tuple[Tuple[Tensor, ...], ...]],
    radius: float,
    n_samples: int = 1000,
    sampler: str = "uniform",
    target: TargetType = None,
    additional_forward_args: Any = None,
    internal_batch_size: Optional[int] = None,
) -> Tensor:
    r"""
    Perturbation mean-squared error (PMSE) of a local quadratic model of f, the
    fidelity measure of SmoothHess (Torop et al., NeurIPS 2023):

    .. math::
        \mathrm{PMSE}(x) = \mathbb{E}_{\Delta}\Big[\big(f(x+\Delta) - f(x)
            - g^\top\Delta - \tfrac12 \Delta^\top H \Delta\big)^2\Big],
        \quad \|\Delta\|_2 \le r,

    estimated from ``n_samples`` perturbations per example. Works with any
    (gradient, Hessian) pair: SmoothGrad + SmoothHess, the gradient and Hessian
    of the Softplus(beta) network (see ``replace_relu_with_softplus``), or a
    gradient alone (``hessian=None``, the first-order model). The quadratic
    term is one einsum over the given Hessian, batched over perturbations (no
    per-sample matrix).

    Args:
        forward_func (Callable): the model f whose behaviour is approximated
            (e.g. the ReLU network).
        inputs (Tensor or tuple[Tensor, ...]): points x, batch first.
        gradient (Tensor or tuple[Tensor, ...]): g, in the inputs' layout.
        hessian (Tensor, tuple[tuple[Tensor, ...], ...] or None): H in the
            layout of ``SmoothHess.attribute`` without ``feature_mask``, or None
            for a first-order model.
        radius (float): r > 0, the L2 radius of the perturbations over all
            features of all inputs.
        n_samples (int, optional): perturbations per example. Default: 1000
        sampler (str, optional): ``"uniform"`` (uniform in the ball) or
            ``"reference"`` (the reference code's: uniform direction, norm
            r * U(0, 1)). Default: "uniform"
        target (TargetType, optional): output selection, as in Captum.
            Default: None
        additional_forward_args (Any, optional): extra model arguments.
            Default: None
        internal_batch_size (int, optional): the most model evaluations per
            forward pass. Default: None

    Returns:
        Tensor: PMSE per example, shape (N,).

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 1))
        >>> x = torch.randn(4, 3)
        >>> h, g = SmoothHess(model).attribute(x, stdevs=0.1, n_samples=1000,
        ...                                     return_smoothgrad=True)
        >>> pmse(model, x, g, h, radius=0.1).shape
        torch.Size([4])
    """
    inputs_t = format_inputs(inputs)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"`radius` must be a number > 0, got {radius!r}")
    validate_positive_int(n_samples, "n_samples")
    validate_internal_batch_size(internal_batch_size)
    num_examples = inputs_t[0].shape[0]
    validate_target(target, num_examples)
    shapes = [tuple(x.shape[1:]) for x in inputs_t]
    dtype, device = inputs_t[0].dtype, inputs_t[0].device
    g_flat, g_shapes, _ = flatten_gradient(gradient)
    if list(g_shapes) != shapes or g_flat.shape[0] != num_examples:
        raise ValueError(
            f"`gradient` must have the inputs' layout {[(num_examples,) + s for s in shapes]}"
        )
    g_flat = g_flat.to(dtype=dtype, device=device)
    h_flat = None
    if hessian is not None:
        h_flat = flatten_hessian(hessian, tuple(shapes)).to(dtype=dtype, device=device)
        if h_flat.shape[0] != num_examples:
            raise ValueError(
                f"`hessian` has {h_flat.shape[0]} examples, `inputs` {num_examples}"
            )
    x_flat = flatten_features(inputs_t)
    num_features = x_flat.shape[1]
    base_expansion = RowExpansion(target, additional_forward_args, num_examples, 1)
    samples_per_block = max(
        1, min(n_samples, NOISE_BLOCK_NUMEL // max(1, num_examples * num_features))
    )
    if internal_batch_size is None:
        examples_per_pass, samples_per_pass = num_examples, samples_per_block
    else:
        examples_per_pass = min(num_examples, internal_batch_size)
        samples_per_pass = max(1, internal_batch_size // examples_per_pass)
    total = torch.zeros(num_examples, dtype=dtype, device=device)
    with torch.no_grad():
        f_x = run_scalar_forward(forward_func, inputs_t, target, additional_forward_args)
        for s0 in range(0, n_samples, samples_per_block):
            block = sample_ball(
                min(samples_per_block, n_samples - s0),
                num_examples,
                num_features,
                float(radius),
                sampler,
                dtype,
                device,
            )
            for e0 in range(0, num_examples, examples_per_pass):
                e1 = min(num_examples, e0 + examples_per_pass)
                target_e, args_e = base_expansion.rows(e0, e1)
                for u0 in range(0, block.shape[0], samples_per_pass):
                    delta = block[u0 : u0 + samples_per_pass, e0:e1]  # (s, n, D)
                    copies = delta.shape[0]
                    expansion = RowExpansion(target_e, args_e, e1 - e0, copies)
                    points = split_features(
                        (x_flat[e0:e1] + delta).reshape(-1, num_features), shapes
                    )
                    f_pert = run_scalar_forward(
                        forward_func,
                        points,
                        expansion.target,
                        expansion.additional_forward_args,
                    ).view(copies, e1 - e0)
                    model = f_x[e0:e1] + (delta * g_flat[e0:e1]).sum(dim=2)
                    if h_flat is not None:
                        model = model + 0.5 * quadratic_form(h_flat[e0:e1], delta)
                    total[e0:e1] += (f_pert - model).pow(2).sum(dim=0)
    return total / n_samples
