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
