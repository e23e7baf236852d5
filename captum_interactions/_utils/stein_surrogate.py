#!/usr/bin/env python3
r"""A fitted ReLU surrogate as a control variate for SmoothHess, for any model.

The first-layer control variate (:class:`~captum_interactions._utils.stein.ReluSurrogate`)
needs the model's structure. For a black box, a surrogate of the same family,

.. math::
    g(x + \sigma \odot u) = \sum_j c_j\, \mathrm{relu}(v_j \cdot u + \beta_j) + L \cdot u,

is *fitted* to gradients already computed: in the noise coordinates
u = (y - x) / sigma (per example), least squares between
:math:`\nabla_u g(u) = \sum_j c_j 1[v_j \cdot u + \beta_j > 0] v_j + L` and
:math:`\sigma \odot \nabla f(x + \sigma \odot u)`, with Adam on a sigmoid
relaxation of the step whose temperature falls to 0.02 (the kinks sharpen as
they settle). The smoothed Hessian and gradient of g are exact
(:math:`\sum_j c_j \varphi(\beta_j/|v_j|)/|v_j|\, w_j w_j^\top`, w_j = v_j / sigma),
so the Stein terms of f - g plus g's exact values are unbiased *whatever g
is*, provided g does not depend on the samples it corrects: SmoothHess splits
the samples into two folds, fits g_A on fold A and g_B on fold B, and corrects
fold A with g_B and fold B with g_A (cross-fitting). Given g_B, fold A's
estimate is unbiased and its error has mean zero, so the two folds' errors
are uncorrelated and the spread of the block means (each block carries its
surrogate's exact value) stays an honest standard error.

With an input subspace the fit is done in the sampled coordinates xi
(u = Q xi), so g depends on the input only through the subspace, as the
projected Stein identity requires.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from captum_interactions._utils.feature_groups import FeatureGroups
from captum_interactions._utils.stein import smoothed_relu_terms

# hidden units, Adam steps and learning rate of the fit; points per fold and
# example used for fitting (a random subset beyond it)
FIT_HIDDEN = 64
FIT_STEPS = 400
FIT_LR = 0.03
FIT_MAX_POINTS = 2048
# the temperature of the sigmoid relaxation, relative to |v_j|: from START to END
FIT_TEMPERATURE = (0.3, 0.02)


def fit_relu_surrogate(
    points: Tensor,
    targets: Tensor,
    hidden: Optional[int] = None,
    steps: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit sum_j c_j relu(v_j . u + beta_j) + L . u to gradients, per example.

    ``points`` (N, M, r) are the noise coordinates u of M samples per example,
    ``targets`` (N, M, r) the model's gradients in those coordinates. Returns
    V (N, J, r), beta (N, J), c (N, J), L (N, r), detached. The
    initialisation draws from torch's global generator (reproducible under
    ``torch.manual_seed``).
    """
    hidden = FIT_HIDDEN if hidden is None else hidden  # read at call time
    steps = FIT_STEPS if steps is None else steps
    num_examples, _, dim = points.shape
    points = points.detach()
    targets = targets.detach()
    dtype, device = points.dtype, points.device
    with torch.enable_grad():
        v = torch.randn(num_examples, hidden, dim, dtype=dtype, device=device)
        v = (v / math.sqrt(dim)).requires_grad_(True)
        beta = torch.randn(num_examples, hidden, dtype=dtype, device=device)
        beta.requires_grad_(True)
        c = torch.zeros(num_examples, hidden, dtype=dtype, device=device, requires_grad=True)
        linear = targets.mean(dim=1).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([v, beta, c, linear], lr=FIT_LR)
        start, end = FIT_TEMPERATURE
        tiny = torch.finfo(dtype).tiny
        for step in range(steps):
            temperature = start * (1 - step / steps) + end
            norm = v.norm(dim=-1).clamp_min(tiny)  # (N, J)
            pre = torch.einsum("nmr,njr->nmj", points, v) + beta.unsqueeze(1)
            active = torch.sigmoid(pre / (temperature * norm.unsqueeze(1)))
            predicted = torch.einsum("nmj,njr->nmr", active * c.unsqueeze(1), v)
            predicted = predicted + linear.unsqueeze(1)
            loss = (predicted - targets).pow(2).sum(-1).mean(-1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return v.detach(), beta.detach(), c.detach(), linear.detach()


class FittedReluSurrogate:
    r"""g_n(y) = sum_j c_nj relu(w_nj . y + b_nj) + l_n . y, one per example.

    Built from a fit in the sampled coordinates xi (``basis`` Q maps them to
    the noise coordinates u = Q xi, None for u = xi) at the points ``x_flat``
    with noise scales ``sigma_flat``: w_nj = (Q v_nj) / sigma,
    b_nj = beta_nj - w_nj . x_n, l_n = (Q L_n) / sigma.
    """

    def __init__(
        self,
        fit: Tuple[Tensor, Tensor, Tensor, Tensor],
        x_flat: Tensor,
        sigma_flat: Tensor,
        basis: Optional[Tensor],
    ) -> None:
        v, beta, c, linear = fit
        if basis is not None:
            v = v @ basis.transpose(0, 1)  # (N, J, D)
            linear = linear @ basis.transpose(0, 1)  # (N, D)
        self.weight = v / sigma_flat  # (N, J, D), rows w_nj
        self.noise_weight = v  # (N, J, D): w_nj * sigma, for the scales s_nj
        self.bias = beta - torch.einsum("njd,nd->nj", self.weight, x_flat)
        self.slopes = c
        self.linear = linear / sigma_flat.reshape(1, -1)  # (N, D)

    def gradients(self, points: Tensor, example_start: int, example_stop: int) -> Tensor:
        """grad g at ``points`` (copies, n, D) of examples [start, stop)."""
        rows = slice(example_start, example_stop)
        weight = self.weight[rows]
        pre = torch.einsum("knd,njd->knj", points, weight) + self.bias[rows]
        active = (pre > 0).to(points.dtype) * self.slopes[rows]
        return torch.einsum("knj,njd->knd", active, weight) + self.linear[rows]

    def smoothed(
        self, x_flat: Tensor, groups: FeatureGroups
    ) -> Tuple[Tensor, Tensor]:
        """The exact smoothed Hessian (N, G, G) and gradient (N, G) of g."""
        u = torch.einsum("njd,nd->nj", self.weight, x_flat) + self.bias  # = beta
        scale = self.noise_weight.norm(dim=-1)  # (N, J): s_nj = |sigma * w_nj|
        density, cdf = smoothed_relu_terms(u, scale)
        num_examples = x_flat.shape[0]
        rows = self.weight.transpose(0, 1)  # (J, N, D)
        example_index = None
        if groups.index.shape[0] > 1:
            example_index = torch.arange(num_examples, device=x_flat.device)
        grouped = groups.group_sum(rows, example_index)  # (J, N, G)
        hessian = torch.einsum("jng,nj,jnh->ngh", grouped, self.slopes * density, grouped)
        gradient = torch.einsum("jng,nj->ng", grouped, self.slopes * cdf)
        linear = groups.group_sum(self.linear.unsqueeze(0), example_index)[0]
        return hessian, gradient + linear
