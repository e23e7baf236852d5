"""Exact Taylor coefficients of small Sequential nets by truncated power series.

An independent float64 reference for ``bench_hope.py``, written without any
code of the library: a quantity is a dense multivariate power series in p
variables truncated at total degree K, stored as a tensor (M, *shape) with one
row per monomial. Linear and convolution layers act on every row (the bias on
the constant row only); an activation g is composed by its Taylor series at
the constant row, g(a0 + r) = sum_n g^(n)(a0) / n! * r^n, with r^n from
repeated truncated products. g^(n) come from closed forms: sin(a + n pi / 2),
and integer polynomials in tanh and in the logistic sigmoid.

Derivative tensors follow from D_alpha f = alpha! * c_alpha.
"""
import itertools
import math
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F


class PowerSeriesAlgebra:
    """Monomials of total degree <= ``order`` in ``num_variables`` and their product table."""

    def __init__(self, num_variables: int, order: int) -> None:
        self.num_variables, self.order = num_variables, order
        self.monomials: List[Tuple[int, ...]] = [
            m for d in range(order + 1)
            for m in itertools.product(range(d + 1), repeat=num_variables) if sum(m) == d
        ]
        self.index: Dict[Tuple[int, ...], int] = {m: i for i, m in enumerate(self.monomials)}
        left, right, out = [], [], []
        for i, a in enumerate(self.monomials):
            for j, b in enumerate(self.monomials):
                if sum(a) + sum(b) <= order:
                    left.append(i)
                    right.append(j)
                    out.append(self.index[tuple(x + y for x, y in zip(a, b))])
        self.left, self.right, self.out = (torch.tensor(v) for v in (left, right, out))

    def multiply(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dev = a.device
        products = a[self.left.to(dev)] * b[self.right.to(dev)]
        return torch.zeros_like(a).index_add_(0, self.out.to(dev), products)


def _polynomial_derivative_values(base: torch.Tensor, step, count: int) -> List[torch.Tensor]:
    """Values of P_0..P_{count-1} at ``base``, P_0(u) = u, P_{n+1} = P_n' * step(u).

    Polynomials are integer coefficient lists, so the recurrence is exact."""
    poly = [0, 1]
    values = []
    for _ in range(count):
        value = torch.zeros_like(base)
        for c in reversed(poly):
            value = value * base + c
        values.append(value)
        derivative = [i * c for i, c in enumerate(poly)][1:] or [0]
        product = [0] * (len(derivative) + len(step) - 1)
        for i, c in enumerate(derivative):
            for j, s in enumerate(step):
                product[i + j] += c * s
        poly = product
    return values


def activation_derivatives(module: nn.Module, a0: torch.Tensor, order: int) -> List[torch.Tensor]:
    """[g(a0), g'(a0), ..., g^(order)(a0)] in closed form."""
    name = type(module).__name__
    if name == "Sin":
        return [torch.sin(a0 + n * math.pi / 2) for n in range(order + 1)]
    if isinstance(module, nn.Tanh):  # tanh' = 1 - t^2
        return _polynomial_derivative_values(torch.tanh(a0), [1, 0, -1], order + 1)
    if isinstance(module, nn.Softplus) and module.beta == 1:  # softplus' = s, s' = s - s^2
        sig = _polynomial_derivative_values(torch.sigmoid(a0), [0, 1, -1], order)
        return [F.softplus(a0)] + sig
    raise NotImplementedError(f"reference has no rule for {name}")


def series_forward(net: nn.Sequential, center: torch.Tensor, directions: torch.Tensor,
                   order: int) -> Tuple[PowerSeriesAlgebra, torch.Tensor]:
    """Taylor coefficients of net(center + sum_i z_i directions[i]) in z, total degree <= order.

    center: (1, *input_shape); directions: (p, *input_shape). Returns (algebra, (M, *out))."""
    p = directions.shape[0]
    algebra = PowerSeriesAlgebra(p, order)
    series = torch.zeros((len(algebra.monomials),) + tuple(center.shape[1:]),
                         dtype=center.dtype, device=center.device)
    series[0] = center[0]
    for i in range(p):
        unit = tuple(int(i == j) for j in range(p))
        if order >= 1:
            series[algebra.index[unit]] = directions[i]
    for module in net:
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            constant = module(series[:1])
            if module.bias is None:
                series = module(series)
            else:
                shape = (1, -1) + (1,) * (series.dim() - 2)
                series = module(series) - module.bias.reshape(shape)
                series[0] = constant[0]
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten)):
            series = module(series)  # linear without offset: acts row by row
        else:
            derivs = activation_derivatives(module, series[0], order)
            rest = series.clone()
            rest[0] = 0
            result = torch.zeros_like(series)
            result[0] = derivs[0]
            power = torch.zeros_like(series)
            power[0] = 1
            for n in range(1, order + 1):
                power = algebra.multiply(power, rest)
                result = result + derivs[n] / math.factorial(n) * power
            series = result
    return algebra, series


def derivative_tensors(net: nn.Sequential, center: torch.Tensor, directions: torch.Tensor,
                       order: int) -> List[torch.Tensor]:
    """Full symmetric D^k (p, ..., p) of the scalar output for k = 1..order."""
    algebra, series = series_forward(net, center, directions, order)
    coefficient = series.reshape(series.shape[0], -1)[:, 0]
    p = directions.shape[0]
    tensors = []
    for k in range(1, order + 1):
        tensor = torch.empty((p,) * k, dtype=center.dtype, device=center.device)
        for idx in itertools.product(range(p), repeat=k):
            alpha = tuple(idx.count(i) for i in range(p))
            scale = math.prod(math.factorial(a) for a in alpha)
            tensor[idx] = coefficient[algebra.index[alpha]] * scale
        tensors.append(tensor)
    return tensors
