#!/usr/bin/env python3
r"""Helpers for SmoothHess (Stein's identity) and for evaluating Hessian estimates.

Stein's identity for a Gaussian perturbation e ~ N(0, Sigma), Sigma = diag(sigma^2):

.. math::
    \nabla^2 (f * q_\Sigma)(x) = \mathbb{E}\big[\Sigma^{-1} e\, \nabla f(x + e)^\top\big]
        = \mathbb{E}\big[(z / \sigma)\, \nabla f(x + \sigma \odot z)^\top\big],
    \quad z \sim N(0, I).

Every sample ("unit") u contributes a rank-one term a_u b_u^T, with a_u = z_u / sigma
and b_u the gradient (or the half difference of the two gradients of an antithetic
pair). :class:`SteinAccumulator` sums those terms, optionally over feature groups,
and the sums of squares needed for a standard error, without ever holding a
(units, D, D) tensor.

The identity holds for every z whose *marginal* law is N(0, I), whatever the
dependence between samples, so the estimator stays unbiased when samples are
drawn jointly to cancel each other's errors (:func:`draw_noise`):

- ``"orthogonal"``: blocks of k <= D directions, orthonormal within a block
  (Haar-random), each scaled by an independent chi(D) radius. In a block the
  directions cannot crowd together, so the quadratic part of f is averaged
  almost exactly (Yu et al., "Orthogonal Random Features", NeurIPS 2016;
  Choromanski et al., "Structured Evolution with Compact Architectures", 2018).
- ``"sobol"``: randomized quasi-Monte Carlo: a scrambled Sobol sequence per
  example (random linear matrix scramble and digital shift, each point uniform
  on the cube; :mod:`captum_interactions._utils.sobol`) mapped through the
  normal quantile. Best in few dimensions.
- ``"gaussian"``: i.i.d. draws (the plain estimator).

Samples of a block are dependent, blocks are independent: the standard error
of the structured samplers comes from the spread of the block means.

**Input subspace (Rao-Blackwellisation).** When the model sees its input only
through a linear map, f(x) = g(W x) (a first ``nn.Linear`` with fewer units than
features), f(x + sigma z) depends on z only through P z, P the orthogonal
projector onto the row space of W diag(sigma) (in the coordinates of z). The
part (I - P) z is independent of P z, hence of the gradient, and has mean zero,
so E[z grad f^T] = E[P z grad f^T]: replacing z by P z = E[z | P z] keeps the
estimate unbiased and removes the variance of the discarded part exactly. The
samplers then draw xi ~ N(0, I_r) in the r-dimensional subspace and
z = Q xi (Q an orthonormal basis of it; :func:`subspace_basis`), so orthogonal
frames need r directions, not D.
"""
import math
import warnings
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from captum_interactions._utils.feature_groups import FeatureGroups, flatten_features
from captum_interactions._utils.hessian import gradients_with_graph
from captum_interactions._utils.sobol import scrambled_sobol

# the noise of one block is drawn in one call, independent of internal_batch_size
# (so results do not depend on it); a block holds about this many numbers
NOISE_BLOCK_NUMEL = 1 << 22

SAMPLERS = ("auto", "orthogonal", "sobol", "gaussian")
# structured samplers split the samples into at least this many independent
# blocks for the standard error; few blocks keep each block large (an
# orthonormal frame needs up to D directions, a QMC sequence gains with length)
MIN_BLOCKS = 16
# Sobol sequences gain more from length than frames do (the error of a
# scrambled net falls faster than n^(-1/2)): 8 blocks (t with 7 degrees of
# freedom for the standard error) halve the error at 256 calls in 2 features
# against 16 (benchmarks/bench_smooth_hess_samplers.py)
SOBOL_MIN_BLOCKS = 8
# importance sampling (``importance="auto"``): the noise is drawn from
# N(0, tau^2 I_r) with tau^2 = 1 + IMPORTANCE_KAPPA / r in the r sampled
# dimensions, so the weight p/q never exceeds (1 + kappa/r)^(r/2) < e^(kappa/2)
IMPORTANCE_KAPPA = 2.5
# an explicit tau whose largest weight tau^r exceeds this warns
IMPORTANCE_MAX_WEIGHT = 100.0
# "auto" uses randomized QMC up to this many features, orthogonal blocks above
# (measured crossover: benchmarks/bench_smooth_hess.py, error vs calls)
SOBOL_MAX_FEATURES = 16
# torch's SobolEngine supports at most this many dimensions
SOBOL_MAX_DIMENSION = 21201


NORMAL_975 = 1.959963984540054
_T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646}


def student_t_975(dof: int) -> float:
    """The 97.5% quantile of Student's t (table to 7, Cornish-Fisher beyond: < 1e-3)."""
    if dof in _T_975:
        return _T_975[dof]
    z = NORMAL_975
    return (
        z
        + (z**3 + z) / (4 * dof)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
    )


def resolve_sampler(sampler: str, num_features: int) -> str:
    """Validate ``sampler`` and resolve ``"auto"`` by the number of features."""
    if sampler not in SAMPLERS:
        raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "auto":
        return "sobol" if num_features <= SOBOL_MAX_FEATURES else "orthogonal"
    if sampler == "sobol" and num_features > SOBOL_MAX_DIMENSION:
        raise ValueError(
            f"`sampler='sobol'` supports at most {SOBOL_MAX_DIMENSION} features "
            f"(torch's SobolEngine), got {num_features}; use sampler='orthogonal'"
        )
    return sampler


def noise_block_sizes(
    sampler: str,
    num_units: int,
    num_examples: int,
    num_features: int,
    statistical: bool = False,
) -> List[int]:
    """Units per noise block, in drawing order.

    i.i.d. noise is drawn in blocks that only bound memory (unless
    ``statistical``: then in blocks as Sobol points are). Structured noise
    is drawn in statistical blocks: at most D directions (an orthonormal set),
    at least :data:`MIN_BLOCKS` blocks (:data:`SOBOL_MIN_BLOCKS` for Sobol
    sequences) for the standard error, and within
    the noise memory bound.
    """
    per_memory = max(1, NOISE_BLOCK_NUMEL // max(1, num_examples * num_features))
    if sampler == "gaussian" and not statistical:
        size = min(num_units, per_memory)
    else:
        min_blocks = SOBOL_MIN_BLOCKS if sampler == "sobol" else MIN_BLOCKS
        size = min(per_memory, math.ceil(num_units / min_blocks))
        if sampler == "orthogonal":
            size = min(size, num_features)
    full, rest = divmod(num_units, size)
    return [size] * full + ([rest] if rest else [])


def draw_noise(
    sampler: str,
    num_units: int,
    num_examples: int,
    num_features: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """One block of standard normal noise of shape (units, N, D), per example.

    Every z[u, n] is marginally N(0, I) for every sampler (the estimator stays
    unbiased); randomness comes from torch's global generator, so results are
    reproducible under ``torch.manual_seed``.
    """
    shape = (num_units, num_examples, num_features)
    if sampler == "gaussian":
        return torch.randn(shape, dtype=dtype, device=device)
    if sampler == "orthogonal":
        # Haar-random orthonormal columns: QR of a Gaussian matrix with the
        # signs of R's diagonal moved into Q
        gaussian = torch.randn(
            num_examples, num_features, num_units, dtype=dtype, device=device
        )
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        radius = torch.randn(
            num_examples, num_units, num_features, dtype=dtype, device=device
        ).norm(dim=-1)  # chi(D): |N(0, I_D)|
        return (q * radius.unsqueeze(-2)).permute(2, 0, 1)
    # randomized QMC: an independently scrambled Sobol sequence per example
    # (linear matrix scramble and digital shift, all examples at once)
    uniform = scrambled_sobol(num_units, num_examples, num_features)
    eps = torch.finfo(torch.float64).eps
    uniform = uniform.clamp(eps, 1.0 - eps)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * uniform - 1.0)).to(
        device=device, dtype=dtype
    )


def importance_scale(importance: Any, sample_dim: int) -> Optional[float]:
    """tau, the scale of the proposal N(0, tau^2 I_r), or None (no importance sampling).

    ``importance`` is ``"auto"`` (tau^2 = 1 + :data:`IMPORTANCE_KAPPA` / r),
    ``None`` or a float tau >= 1 (1 is the same as None); ``sample_dim`` is r.
    Call :func:`validate_importance` first.
    """
    if importance is None:
        return None
    if isinstance(importance, str):
        return math.sqrt(1.0 + IMPORTANCE_KAPPA / max(1, sample_dim))
    tau = float(importance)
    if tau == 1.0:
        return None
    if sample_dim * math.log(tau) > math.log(IMPORTANCE_MAX_WEIGHT):
        warnings.warn(
            f"`importance`={tau:g} in {sample_dim} sampled dimensions gives "
            f"importance weights up to tau^r = 10^{sample_dim * math.log10(tau):.1f}: "
            "the estimate may be far more variable than without; "
            "importance='auto' keeps them below e^1.25",
            stacklevel=3,
        )
    return tau


def validate_importance(importance: Any) -> None:
    """``importance`` must be ``"auto"``, None or a finite float >= 1."""
    if importance is None or (isinstance(importance, str) and importance == "auto"):
        return
    if isinstance(importance, str):
        raise ValueError(
            f"`importance` must be 'auto', None or a float >= 1, got {importance!r}"
        )
    if isinstance(importance, bool) or not isinstance(importance, (int, float)):
        raise TypeError(
            "`importance` must be 'auto', None or a float >= 1 (the proposal's "
            f"scale tau), got {importance!r}"
        )
    if not (math.isfinite(importance) and importance >= 1.0):
        raise ValueError(
            "`importance` must be 'auto', None or a finite float >= 1 (the "
            f"proposal's scale tau; below 1 the weights are unbounded), got {importance!r}"
        )


def importance_weights(noise: Tensor, scale: float) -> Tensor:
    r"""Scale standard noise to the proposal, in place, and return the weights p/q.

    ``noise`` (units, N, r) is N(0, I) marginally; it becomes xi = tau * noise,
    marginally N(0, tau^2 I_r) = q, and the weight of each sample is

    .. math::
        w = \frac{p(\xi)}{q(\xi)} = \tau^r \exp\big(-|\xi_0|^2 (\tau^2 - 1) / 2\big),
        \qquad \xi_0 = \xi / \tau,

    so E_q[w h(xi)] = E_p[h(xi)] for any h: the Stein terms stay unbiased.
    Returns w, shape (units, N), in the noise's dtype.
    """
    dim = noise.shape[-1]
    square = (noise * noise).sum(dim=-1)
    weights = torch.exp(dim * math.log(scale) - 0.5 * (scale * scale - 1.0) * square)
    noise.mul_(scale)
    return weights


def first_linear_layer(
    forward_func: Callable, inputs: Tuple[Tensor, ...]
) -> Optional[Tuple[int, torch.nn.Linear]]:
    """(index, layer): the first ``nn.Linear``, when the model provably sees its input only as W x.

    The rule (``input_subspace="auto"``): ``forward_func`` is an ``nn.Sequential``
    (its own ``forward``, no forward hooks on it or on the modules up to the
    linear layer), called on one input tensor; it starts with any number of
    ``nn.Identity`` and ``nn.Flatten()`` (the default ``start_dim=1``,
    ``end_dim=-1``), then an ``nn.Linear`` that receives (N, D), the flattened
    features. Anything else returns None.
    """
    if not isinstance(forward_func, torch.nn.Sequential) or len(inputs) != 1:
        return None
    if type(forward_func).forward is not torch.nn.Sequential.forward:
        return None
    if forward_func._forward_hooks or forward_func._forward_pre_hooks:
        return None
    is_flat = inputs[0].dim() == 2
    num_features = int(inputs[0][0].numel())
    for index, module in enumerate(forward_func):
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        if type(module) is torch.nn.Identity:
            continue
        if type(module) is torch.nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
            is_flat = True
            continue
        if (
            type(module) is torch.nn.Linear
            and is_flat
            and module.in_features == num_features
        ):
            return index, module
        return None
    return None


def relu_after(forward_func: torch.nn.Sequential, index: int) -> bool:
    """Whether module ``index + 1`` of the Sequential is a hook-free ``nn.ReLU``."""
    if index + 1 >= len(forward_func):
        return False
    module = forward_func[index + 1]
    return type(module) is torch.nn.ReLU and not (
        module._forward_hooks or module._forward_pre_hooks
    )


def smoothed_relu_terms(u: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """phi(u/s)/s and Phi(u/s) for relu(u + s z), z ~ N(0, 1): the second and
    first derivative of its Gaussian smoothing in u (s = 0: a point mass, the
    step 1[u > 0] and no density)."""
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    t = u / safe
    density = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi) / safe
    density = torch.where(positive, density, torch.zeros_like(density))
    cdf = 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))
    cdf = torch.where(positive, cdf, (u > 0).to(u.dtype))
    return density, cdf


class ReluSurrogate:
    r"""A control variate with an exact smoothed Hessian: g(x) = v^T relu(W x + b).

    For a model f(x) = h(relu(W x + b)), v = dh/d(relu output) at the clean
    point (one backward pass per example) linearizes everything after the
    first ReLU. With s_k = ||sigma * w_k|| and u = W x + b, g's Gaussian
    smoothing is exact:

    .. math::
        
abla^2 (g * q_\sigma)(x) = W^	op \mathrm{diag}ig(v_k arphi(u_k / s_k) / s_kig) W,
        \qquad 
abla (g * q_\sigma)(x) = W^	op ig(v \odot \Phi(u / s)ig).

    The estimator averages the Stein terms of f - g (same noise, so the
    first-layer kink crossings cancel) and adds g's exact values: unbiased for
    any v, and far less variable when the first layer's kinks dominate.
    """

    def __init__(
        self, weight: Tensor, bias: Optional[Tensor], slopes: Tensor
    ) -> None:
        self.weight = weight  # (m, D)
        self.bias = bias  # (m,) or None
        self.slopes = slopes  # (N, m): v per example

    def _pre(self, points: Tensor) -> Tensor:
        pre = points @ self.weight.transpose(0, 1)
        return pre if self.bias is None else pre + self.bias

    def gradients(self, points: Tensor, example_start: int, example_stop: int) -> Tensor:
        """grad g at ``points`` (copies, n, D) of examples [start, stop)."""
        active = (self._pre(points) > 0).to(points.dtype)
        return (active * self.slopes[example_start:example_stop]) @ self.weight

    def smoothed(
        self, x_flat: Tensor, sigma_flat: Tensor, groups: FeatureGroups
    ) -> Tuple[Tensor, Tensor]:
        """The exact smoothed Hessian (N, G, G) and gradient (N, G) of g."""
        u = self._pre(x_flat)  # (N, m)
        scale = ((self.weight * sigma_flat) ** 2).sum(dim=1).sqrt()  # (m,)
        density, cdf = smoothed_relu_terms(u, scale)
        num_examples = x_flat.shape[0]
        rows = self.weight.unsqueeze(1).expand(-1, num_examples, -1)  # (m, N, D)
        example_index = None
        if groups.index.shape[0] > 1:
            example_index = torch.arange(num_examples, device=x_flat.device)
        grouped = groups.group_sum(rows, example_index)  # (m, N, G)
        hessian = torch.einsum(
            "kng,nk,knh->ngh", grouped, self.slopes * density, grouped
        )
        gradient = torch.einsum("kng,nk->ng", grouped, self.slopes * cdf)
        return hessian, gradient


def subspace_basis(weight: Tensor, sigma_flat: Tensor) -> Optional[Tensor]:
    """Orthonormal basis (D, r) of the row space of W diag(sigma), in z's coordinates.

    ``weight`` is (m, D) (the map the model sees the flattened inputs through)
    and ``sigma_flat`` (1, D). The rank r counts singular values above
    ``s_max * max(m, D) * eps`` of W's dtype (NumPy's ``matrix_rank`` rule):
    the directions dropped move W x by at most that fraction of its largest
    response, round-off for W's own precision (the only bias, at that level).
    Returns None when r = D (the projection would change nothing) or r = 0.
    """
    num_features = sigma_flat.shape[-1]
    matrix = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    matrix = matrix * sigma_flat.reshape(1, -1).to(matrix.device, torch.float64)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    if singular.numel() == 0 or singular[0] == 0:
        return None
    tol = singular[0] * max(matrix.shape) * torch.finfo(weight.dtype).eps
    rank = int((singular > tol).sum())
    if rank >= num_features:
        return None
    return vh[:rank].transpose(0, 1).contiguous()


def plain_gradients(
    forward_func: Callable,
    points: Tuple[Tensor, ...],
    target: Any,
    additional_forward_args: Any,
) -> Tuple[Tensor, ...]:
    """grad f at ``points`` (no graph kept); zeros for inputs f does not use."""
    _, grads = gradients_with_graph(
        forward_func, points, target, additional_forward_args, create_graph=False
    )
    return grads


class SteinAccumulator:
    """Running sums of the rank-one Stein terms a_u b_u^T over units u.

    ``add(a, b)`` takes a chunk of units, each (U, rows, D) for a contiguous
    range of examples; sums are kept per example over G groups.
    """

    def __init__(
        self,
        num_examples: int,
        groups: FeatureGroups,
        dtype: torch.dtype,
        device: torch.device,
        with_stderr: bool,
        independent_units: bool = True,
    ) -> None:
        g = groups.num_groups
        self.groups = groups
        self.with_stderr = with_stderr
        self.independent_units = independent_units
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.count = 0
        self.outer = zeros(num_examples, g, g)  # sum_u a_u b_u^T
        self.first = zeros(num_examples, g)  # sum_u c_u (SmoothGrad terms)
        if with_stderr and not independent_units:
            # dependent units within a block: the spread of block means,
            # sum_b n_b m_b^2 for the symmetric Hessian and the gradient
            self.num_blocks = 0
            self.block_start_outer = zeros(num_examples, g, g)
            self.block_start_first = zeros(num_examples, g)
            self.block_sq = zeros(num_examples, g, g)
            self.block_first_sq = zeros(num_examples, g)
        elif with_stderr:
            # sums for sum_u S_u^2 with S_u = (a b^T + b a^T) / 2, expanded so that
            # only (N, G, G) matrices are formed
            self.a2_b2 = zeros(num_examples, g, g)  # sum a_i^2 b_j^2
            self.ab_ab = zeros(num_examples, g, g)  # sum (a_i b_i)(a_j b_j)
            self.first_sq = zeros(num_examples, g)

    def add(
        self,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        example_start: int,
        example_stop: int,
    ) -> None:
        """Add units: a, b (Hessian factors) and c (gradient terms), each (U, rows, D)."""
        example_index = None
        if self.groups.index.shape[0] > 1:  # per-example masks
            example_index = torch.arange(example_start, example_stop, device=a.device)
        a = self.groups.group_sum(a, example_index)
        b = self.groups.group_sum(b, example_index)
        c = self.groups.group_sum(c, example_index)
        rows = slice(example_start, example_stop)
        self.outer[rows] += torch.einsum("uni,unj->nij", a, b)
        self.first[rows] += c.sum(dim=0)
        if self.with_stderr and self.independent_units:
            self.a2_b2[rows] += torch.einsum("uni,unj->nij", a * a, b * b)
            ab = a * b
            self.ab_ab[rows] += torch.einsum("uni,unj->nij", ab, ab)
            self.first_sq[rows] += (c * c).sum(dim=0)

    def add_constant(self, hessian: Tensor, gradient: Tensor, units: int) -> None:
        """Add ``units`` times a known (N, G, G) Hessian and (N, G) gradient term
        (a control variate's exact value; block statistics only)."""
        self.outer += units * hessian
        self.first += units * gradient

    def end_block(self, block_units: int) -> None:
        """Close a block of dependent units: record its mean's square."""
        if not self.with_stderr or self.independent_units:
            return
        outer = self.outer - self.block_start_outer
        outer = 0.5 * (outer + outer.transpose(1, 2))
        first = self.first - self.block_start_first
        self.block_sq += outer * outer / block_units
        self.block_first_sq += first * first / block_units
        self.block_start_outer.copy_(self.outer)
        self.block_start_first.copy_(self.first)
        self.num_blocks += 1

    def _stderr_from_blocks(self, sum_sq: Tensor, mean: Tensor, num_units: int) -> Tensor:
        # batch means m_b of sizes n_b around m = sum_b n_b m_b / n:
        # Var(m) ~ sum_b n_b (m_b - m)^2 / ((B - 1) n), and
        # sum_b n_b (m_b - m)^2 = sum_b n_b m_b^2 - n m^2
        spread = (sum_sq - num_units * mean * mean).clamp_min(0)
        stderr = (spread / ((self.num_blocks - 1) * num_units)).sqrt()
        # with B - 1 degrees of freedom the studentized error is t-distributed:
        # scale so that +-1.96 SE keeps its 95% coverage
        return stderr * (student_t_975(self.num_blocks - 1) / NORMAL_975)

    def mean_hessian(self, num_units: int) -> Tensor:
        outer = self.outer / num_units
        return 0.5 * (outer + outer.transpose(1, 2))

    def mean_gradient(self, num_units: int) -> Tensor:
        return self.first / num_units

    def stderr_hessian(self, num_units: int) -> Tensor:
        mean = self.mean_hessian(num_units)
        if not self.independent_units:
            return self._stderr_from_blocks(self.block_sq, mean, num_units)
        sum_sq = 0.25 * (
            self.a2_b2 + self.a2_b2.transpose(1, 2) + 2.0 * self.ab_ab
        )
        var = (sum_sq - num_units * mean * mean).clamp_min(0) / (num_units - 1)
        return (var / num_units).sqrt()

    def stderr_gradient(self, num_units: int) -> Tensor:
        mean = self.mean_gradient(num_units)
        if not self.independent_units:
            return self._stderr_from_blocks(self.block_first_sq, mean, num_units)
        var = (self.first_sq - num_units * mean * mean).clamp_min(0) / (num_units - 1)
        return (var / num_units).sqrt()


def flatten_gradient(
    gradient: Union[Tensor, Tuple[Tensor, ...]], name: str = "gradient"
) -> Tuple[Tensor, Tuple[Tuple[int, ...], ...], bool]:
    """A gradient in the inputs' layout -> (N, D), the feature shapes, is-tuple."""
    is_tuple = isinstance(gradient, tuple)
    parts = gradient if is_tuple else (gradient,)
    if len(parts) == 0 or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(f"`{name}` must be a tensor or a tuple of tensors")
    for i, p in enumerate(parts):
        if p.dim() < 1:
            raise ValueError(f"`{name}` must be batch first, got a 0-d tensor at {i}")
        if p.shape[0] != parts[0].shape[0]:
            raise ValueError(f"every tensor of `{name}` must have the same batch size")
    shapes = tuple(tuple(p.shape[1:]) for p in parts)
    return flatten_features(parts), shapes, is_tuple


def flatten_hessian(
    hessian: Union[Tensor, Tuple[Tuple[Tensor, ...], ...]],
    feature_shapes: Tuple[Tuple[int, ...], ...],
    name: str = "hessian",
) -> Tensor:
    """A Hessian in the layout of docs/design.rst ("Output layouts") -> (N, D, D).

    One input: (N, *F, *F) (or already (N, D, D)). Tuple inputs: ``h[i][j]`` of
    shape (N, *F_i, *F_j).
    """
    sizes = [int(torch.Size(s).numel()) for s in feature_shapes]
    total = sum(sizes)
    if isinstance(hessian, Tensor):
        if hessian.dim() < 1 or hessian.numel() != hessian.shape[0] * total * total:
            raise ValueError(
                f"`{name}` of shape {tuple(hessian.shape)} does not match "
                f"{total} features: expected (N, *F, *F)"
            )
        return hessian.reshape(hessian.shape[0], total, total)
    if not isinstance(hessian, tuple) or len(hessian) != len(sizes):
        raise TypeError(
            f"`{name}` must be a tensor or a tuple of {len(sizes)} tuples of tensors "
            "(the layout for tuple inputs)"
        )
    rows = []
    for i, row in enumerate(hessian):
        if not isinstance(row, tuple) or len(row) != len(sizes):
            raise TypeError(f"`{name}[{i}]` must be a tuple of {len(sizes)} tensors")
        blocks = []
        for j, block in enumerate(row):
            if not isinstance(block, Tensor) or block.numel() != (
                block.shape[0] * sizes[i] * sizes[j]
            ):
                raise ValueError(
                    f"`{name}[{i}][{j}]` must be a tensor of shape "
                    f"(N, *F_{i}, *F_{j}) with {sizes[i]} x {sizes[j]} features"
                )
            blocks.append(block.reshape(block.shape[0], sizes[i], sizes[j]))
        rows.append(torch.cat(blocks, dim=2))
    return torch.cat(rows, dim=1)


def quadratic_form(hessian_flat: Tensor, delta_flat: Tensor) -> Tensor:
    """delta^T H delta for deltas (S, N, D) and Hessians (N, D, D) -> (S, N).

    One einsum: H delta is batched over samples, no per-sample matrix is formed.
    """
    return torch.einsum("snd,nde,sne->sn", delta_flat, hessian_flat, delta_flat)


def example_chunks(
    num_examples: int, rows_per_unit: int, num_units: int, internal_batch_size: Optional[int]
) -> Tuple[int, int]:
    """Examples per forward pass and units per forward pass.

    ``internal_batch_size`` bounds the gradient evaluations (rows) per pass;
    an antithetic pair is never split, as Captum never splits an example.
    """
    if internal_batch_size is None:
        return num_examples, num_units
    examples = max(1, min(num_examples, internal_batch_size // rows_per_unit))
    units = max(1, min(num_units, internal_batch_size // (rows_per_unit * examples)))
    return examples, units
