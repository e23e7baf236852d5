#!/usr/bin/env python3
r"""Multivariate Taylor polynomials stored as unique monomials, and the exact
recovery of their coefficients from univariate Taylor coefficients.

Recovery (Griewank, Utke and Walther, "Evaluating higher derivative tensors by
forward propagation of univariate Taylor series", Math. Comp. 69, 2000). For a
direction v, the order-d univariate coefficient of t -> f(x0 + t v) is

.. math::
    c_d(v) = \sum_{|j| = d} T_j\, v^j, \qquad T_j = \partial^j f(x_0) / j!,

so the T_j of order d solve a linear system over the directions
v = i for all multi-indices |i| = d (the system is invertible: GUW 2000).
It is block triangular in the *support* of the multi-indices: directions
supported in a set S of s variables only see monomials supported in S. Hence
every monomial of exact support S is obtained from the directions supported in
S through one small local inverse that depends only on (s, d), computed once in
exact rational arithmetic. The cost is linear in the number of monomials.
"""
import itertools
import math
from fractions import Fraction
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Monomial = Tuple[int, ...]


# --------------------------------------------------------------------------
# multi-indices
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def monomials(num_variables: int, degree: int) -> Tuple[Monomial, ...]:
    """All exponent tuples of total degree ``degree`` (graded, lexicographic)."""
    out = []
    for combo in itertools.combinations_with_replacement(range(num_variables), degree):
        exps = [0] * num_variables
        for v in combo:
            exps[v] += 1
        out.append(tuple(exps))
    return tuple(out)


def _primitive(direction: Monomial) -> Tuple[Monomial, int]:
    g = 0
    for e in direction:
        g = math.gcd(g, e)
    return tuple(e // g for e in direction), g


def _compositions(total: int, parts: int) -> List[Monomial]:
    """Positive compositions of ``total`` into ``parts`` parts."""
    out = []
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        out.append(tuple(bounds[i + 1] - bounds[i] for i in range(parts)))
    return out


@lru_cache(maxsize=None)
def _local_inverse(support_size: int, degree: int) -> Tuple[Tuple[Monomial, ...], Tuple[Monomial, ...], Tensor]:
    """Rows of A^{-1} for the full-support monomials of ``support_size`` local variables.

    A[u, q] = u^q over all local multi-indices u, q of degree ``degree``.
    Returns (local directions u, full-support monomials q, R) with
    T_q = sum_u R[q, u] c_d(u); R is float64 (exact rationals rounded once).
    """
    local = monomials(support_size, degree)
    full = tuple(q for q in local if all(e > 0 for e in q))
    size = len(local)
    if size <= 80:
        inverse = _fraction_inverse(
            [[_power(u, q) for q in local] for u in local]
        )
        index = {q: n for n, q in enumerate(local)}
        rows = [[float(inverse[index[q]][n]) for n in range(size)] for q in full]
        return local, full, torch.tensor(rows, dtype=torch.float64)
    a = torch.tensor(
        [[float(_power(u, q)) for q in local] for u in local], dtype=torch.float64
    )
    inverse_t = torch.linalg.inv(a)
    index = {q: n for n, q in enumerate(local)}
    rows = inverse_t[[index[q] for q in full]]
    return local, full, rows


def _power(u: Monomial, q: Monomial) -> int:
    out = 1
    for a, b in zip(u, q):
        out *= a**b
    return out


def _fraction_inverse(matrix: List[List[int]]) -> List[List[Fraction]]:
    n = len(matrix)
    aug = [[Fraction(x) for x in row] + [Fraction(int(i == j)) for j in range(n)]
           for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [x / p for x in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


class RecoveryPlan:
    """Directions to propagate and the exact map back to monomial coefficients.

    Args:
        num_variables (int): p, the number of variables of the polynomial.
        orders (sequence of int): the orders d whose coefficients are wanted.
    """

    def __init__(self, num_variables: int, orders: Sequence[int]) -> None:
        self.num_variables = p = num_variables
        self.orders = sorted(set(orders))
        direction_index: Dict[Monomial, int] = {}
        self.directions: List[Monomial] = []
        # per order: (gather index into directions, scale g^d, [(U_idx, Q_idx, R)])
        self.steps = {}
        for d in self.orders:
            if d == 0:
                continue
            mons = monomials(p, d)
            mon_index = {m: n for n, m in enumerate(mons)}
            gather, scale = [], []
            for m in mons:
                prim, g = _primitive(m)
                if prim not in direction_index:
                    direction_index[prim] = len(self.directions)
                    self.directions.append(prim)
                gather.append(direction_index[prim])
                scale.append(float(g) ** d)
            blocks = []
            for s in range(1, min(d, p) + 1):
                local, full, rows = _local_inverse(s, d)
                u_idx, q_idx = [], []
                for support in itertools.combinations(range(p), s):
                    u_idx.append([mon_index[_embed(u, support, p)] for u in local])
                    q_idx.append([mon_index[_embed(q, support, p)] for q in full])
                blocks.append((torch.tensor(u_idx), torch.tensor(q_idx), rows))
            self.steps[d] = (torch.tensor(gather), torch.tensor(scale, dtype=torch.float64),
                             blocks, len(mons))
        if not self.directions:  # order 0 only: one (zero) direction suffices
            self.directions.append((0,) * p)

    def direction_matrix(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(n_directions, p) integer directions as floats."""
        return torch.tensor(self.directions, dtype=dtype, device=device).reshape(
            len(self.directions), self.num_variables
        )

    def recover(self, univariate: Tensor) -> Dict[int, Tensor]:
        """``univariate`` (K + 1, n_directions, N) -> {d: (N, M_d) monomial coefficients}."""
        out = {}
        device, dtype = univariate.device, univariate.dtype
        for d in self.orders:
            if d == 0:
                out[0] = univariate[0, 0].unsqueeze(-1)
                continue
            gather, scale, blocks, count = self.steps[d]
            # c_d at every multi-index direction i = g * primitive(i): g^d c_d(primitive)
            c = univariate[d, gather.to(device)].transpose(0, 1) * scale.to(device, dtype)
            coeffs = c.new_zeros((c.shape[0], count))
            for u_idx, q_idx, rows in blocks:
                local_values = c[:, u_idx.to(device)]  # (N, n_supports, n_local)
                solved = local_values @ rows.to(device, dtype).T  # (N, n_supports, n_full)
                coeffs[:, q_idx.to(device).reshape(-1)] = solved.reshape(c.shape[0], -1)
            out[d] = coeffs
        return out


def _embed(local: Monomial, support: Sequence[int], p: int) -> Monomial:
    out = [0] * p
    for e, v in zip(local, support):
        out[v] = e
    return tuple(out)


# --------------------------------------------------------------------------
# the polynomial
# --------------------------------------------------------------------------


class TaylorPolynomial:
    r"""A batch of N multivariate polynomials in p variables, up to order K:

    .. math::
        T^{(n)}(x) = \sum_{|j| \le K} T^{(n)}_j \, (x - c^{(n)})^j,

    with one coefficient per *unique* monomial (never a p^k tensor).

    Attributes:
        exponents (Tensor): (M, p) integer exponents of the M monomials,
            ordered by degree (the constant term first).
        coefficients (Tensor): (N, M) coefficients T_j = (d^j f)(c) / j!.
        center (Tensor): (N, p) expansion points c in the variables' space.
        feature_names (list of str): p variable names used by ``__str__``.

    Indexing (``poly[n]``, ``poly[a:b]``) selects examples; ``len(poly)`` is N.
    """

    def __init__(
        self,
        exponents: Tensor,
        coefficients: Tensor,
        center: Tensor,
        feature_names: Optional[Sequence[str]] = None,
    ) -> None:
        if coefficients.dim() == 1:
            coefficients = coefficients.unsqueeze(0)
        if center.dim() == 1:
            center = center.unsqueeze(0)
        self.exponents = exponents.long().to(coefficients.device)
        self.coefficients = coefficients
        self.center = center.to(coefficients.device, coefficients.dtype)
        p = self.exponents.shape[1]
        if feature_names is None:
            feature_names = [f"x{i + 1}" for i in range(p)]
        if len(feature_names) != p:
            raise ValueError(
                f"`feature_names` must have {p} names, got {len(feature_names)}"
            )
        self.feature_names = list(feature_names)
        self._degrees = self.exponents.sum(1)

    # -- basic structure ----------------------------------------------------

    @property
    def num_variables(self) -> int:
        return self.exponents.shape[1]

    @property
    def order(self) -> int:
        return int(self._degrees.max().item()) if self._degrees.numel() else 0

    def __len__(self) -> int:
        return self.coefficients.shape[0]

    def __getitem__(self, index) -> "TaylorPolynomial":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaylorPolynomial(
            self.exponents, self.coefficients[index], self.center[index], self.feature_names
        )

    def __iter__(self):
        for n in range(len(self)):
            yield self[n]

    def coefficients_of_order(self, k: int) -> Tuple[Tensor, Tensor]:
        """(exponents (M_k, p), coefficients (N, M_k)) of the order-k terms."""
        mask = self._degrees == k
        return self.exponents[mask], self.coefficients[:, mask]

    def coefficient(self, monomial: Sequence[int]) -> Tensor:
        """Coefficient (N,) of one monomial given by its exponent tuple."""
        target = torch.tensor(list(monomial), device=self.exponents.device)
        hit = (self.exponents == target).all(1).nonzero()
        if hit.numel() == 0:
            return self.coefficients.new_zeros(len(self))
        return self.coefficients[:, hit[0, 0]]

    # -- evaluation ---------------------------------------------------------

    def _monomial_values(self, delta: Tensor) -> Tensor:
        """delta (N, ..., p) -> (N, ..., M) values of every monomial."""
        exps = self.exponents.to(delta.dtype)
        return torch.prod(delta.unsqueeze(-2) ** exps, dim=-1)

    def evaluate(self, x: Tensor) -> Tensor:
        """Value of each polynomial at points ``x``.

        Args:
            x (Tensor): (N, p) one point per polynomial, or (N, P, p) P points
                per polynomial, in the variables' space (absolute, not offsets).
        Returns:
            Tensor of shape (N,) or (N, P).
        """
        x = x.to(self.coefficients.dtype)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.shape[0] != len(self) or x.shape[-1] != self.num_variables:
            raise ValueError(
                f"`x` must have shape ({len(self)}, {self.num_variables}) or "
                f"({len(self)}, P, {self.num_variables}), got {tuple(x.shape)}"
            )
        center = self.center.reshape((len(self),) + (1,) * (x.dim() - 2) + (-1,))
        values = self._monomial_values(x - center)
        coeffs = self.coefficients.reshape((len(self),) + (1,) * (x.dim() - 2) + (-1,))
        return (values * coeffs).sum(-1)

    def derivative_tensor(self, k: int) -> Tensor:
        """The full symmetric k-th derivative tensor (N, p, ..., p) at the center.

        Entry (i_1..i_k) is d^k f / dx_{i_1}..dx_{i_k} = j! T_j, j the
        multi-index counting the i's. Built on request: p^k entries.
        """
        if k < 0 or k > self.order:
            raise ValueError(f"`k` must be in [0, {self.order}], got {k}")
        p = self.num_variables
        exps, coeffs = self.coefficients_of_order(k)
        factorials = torch.tensor(
            [math.prod(math.factorial(int(e)) for e in row) for row in exps.tolist()],
            dtype=coeffs.dtype, device=coeffs.device,
        )
        derivs = coeffs * factorials
        if k == 0:
            return derivs[:, 0]
        index = {tuple(row): n for n, row in enumerate(exps.tolist())}
        lookup = torch.empty((p,) * k, dtype=torch.long)
        for idx in itertools.product(range(p), repeat=k):
            counts = [0] * p
            for i in idx:
                counts[i] += 1
            lookup[idx] = index[tuple(counts)]
        return derivs[:, lookup.to(derivs.device).reshape(-1)].reshape((len(self),) + (p,) * k)

    # -- transformations ----------------------------------------------------

    def recenter(self, new_center: Tensor) -> "TaylorPolynomial":
        r"""The same polynomials re-expanded (exactly) around ``new_center``.

        With h = c1 - c0: (y + h)^j = prod_m sum_{l_m <= j_m} C(j_m, l_m)
        y_m^{l_m} h_m^{j_m - l_m}, so T'_l = sum_{j >= l} T_j prod_m C(j_m, l_m)
        h_m^{j_m - l_m}.

        Args:
            new_center (Tensor): (N, p) or (p,) new expansion points.
        """
        new_center = new_center.to(self.coefficients.device, self.coefficients.dtype)
        if new_center.dim() == 1:
            new_center = new_center.unsqueeze(0).expand(len(self), -1)
        shift = new_center - self.center  # (N, p)
        src, dst, diff, weight = self._recenter_pairs()
        dev = self.coefficients.device
        powers = torch.prod(shift.unsqueeze(1) ** diff.to(dev, shift.dtype), dim=-1)  # (N, pairs)
        contrib = self.coefficients[:, src.to(dev)] * weight.to(dev, shift.dtype) * powers
        out = torch.zeros_like(self.coefficients)
        out.index_add_(1, dst.to(dev), contrib)
        return TaylorPolynomial(self.exponents, out, new_center.clone(), self.feature_names)

    def _recenter_pairs(self):
        rows = [tuple(r) for r in self.exponents.tolist()]
        index = {r: n for n, r in enumerate(rows)}
        src, dst, diff, weight = [], [], [], []
        for n, j in enumerate(rows):
            for l in itertools.product(*[range(e + 1) for e in j]):
                src.append(n)
                dst.append(index[l])
                diff.append([a - b for a, b in zip(j, l)])
                weight.append(math.prod(math.comb(a, b) for a, b in zip(j, l)))
        return (torch.tensor(src), torch.tensor(dst), torch.tensor(diff),
                torch.tensor(weight, dtype=torch.float64))

    def aggregate(self, mode: str = "combined", center: Optional[Tensor] = None,
                  weights: Optional[Tensor] = None) -> "TaylorPolynomial":
        r"""Global (multi-point) view of a batch of local expansions.

        Following HOPE's function-discovery demo, local expansions taken at
        several reference points are combined into one global description:

        - ``"local"``: every local polynomial re-expanded exactly at the
          common ``center`` (N polynomials, comparable term by term);
        - ``"mean"``: the mean over points of the local coefficient tables
          as they are (each about its own point), a summary of which terms
          matter where;
        - ``"combined"``: the mean over points of the polynomials re-expanded
          at the common ``center`` (one polynomial, a global surrogate).

        Args:
            mode (str): "local", "mean" or "combined". Default: "combined"
            center (Tensor, optional): (p,) common center; default the mean of
                the expansion points.
            weights (Tensor, optional): (N,) non-negative weights of the points
                for "mean"/"combined"; default uniform.
        """
        if mode not in ("local", "mean", "combined"):
            raise ValueError(f"`mode` must be 'local', 'mean' or 'combined', got {mode!r}")
        if center is None:
            center = self.center.mean(0)
        center = center.to(self.coefficients.device, self.coefficients.dtype).reshape(-1)
        if weights is None:
            w = torch.full((len(self),), 1.0 / len(self), dtype=self.coefficients.dtype,
                           device=self.coefficients.device)
        else:
            w = weights.to(self.coefficients.device, self.coefficients.dtype)
            w = w / w.sum()
        if mode == "mean":
            coeffs = (w[:, None] * self.coefficients).sum(0, keepdim=True)
            return TaylorPolynomial(self.exponents, coeffs, (w[:, None] * self.center).sum(0),
                                    self.feature_names)
        local = self.recenter(center)
        if mode == "local":
            return local
        coeffs = (w[:, None] * local.coefficients).sum(0, keepdim=True)
        return TaylorPolynomial(self.exponents, coeffs, center, self.feature_names)

    def truncate(self, order: int) -> "TaylorPolynomial":
        keep = self._degrees <= order
        return TaylorPolynomial(self.exponents[keep], self.coefficients[:, keep],
                                self.center, self.feature_names)

    # -- reading ------------------------------------------------------------

    def monomial_string(self, exponents: Sequence[int], center=None) -> str:
        parts = []
        for name, e, c in zip(self.feature_names, exponents,
                              center if center is not None else [0.0] * len(exponents)):
            if e == 0:
                continue
            base = name if c == 0 else f"({name} - {c:.4g})" if c > 0 else f"({name} + {-c:.4g})"
            parts.append(base if e == 1 else f"{base}^{e}")
        return "*".join(parts) if parts else "1"

    def terms(self, top: Optional[int] = None, min_abs: float = 0.0,
              example: Optional[int] = None) -> List[Tuple[Tuple[int, ...], float]]:
        """(monomial exponents, coefficient) pairs, largest |coefficient| first.

        Args:
            top (int, optional): keep the ``top`` largest. Default: all
            min_abs (float): drop coefficients with |value| < min_abs. Default: 0
            example (int, optional): which polynomial of the batch; required
                when the batch holds more than one. Default: None
        """
        if example is None:
            if len(self) != 1:
                raise ValueError(
                    f"this TaylorPolynomial holds {len(self)} examples; pass "
                    f"`example=` or index it first (poly[n])"
                )
            example = 0
        coeffs = self.coefficients[example]
        order = torch.argsort(coeffs.abs(), descending=True, stable=True)
        out = []
        for n in order.tolist():
            value = float(coeffs[n])
            if abs(value) < min_abs or (min_abs == 0.0 and value == 0.0):
                continue
            out.append((tuple(self.exponents[n].tolist()), value))
            if top is not None and len(out) >= top:
                break
        return out

    def to_string(self, example: int = 0, top: Optional[int] = None, min_abs: float = 0.0,
                  precision: int = 4) -> str:
        center = self.center[example].tolist()
        pieces = []
        for exps, value in sorted(
            self.terms(top=top, min_abs=min_abs, example=example),
            key=lambda t: (sum(t[0]), [-e for e in t[0]]),
        ):
            mono = self.monomial_string(exps, center)
            mag = f"{abs(value):.{precision}g}"
            body = mag if mono == "1" else f"{mag}*{mono}"
            sign = "-" if value < 0 else "+"
            pieces.append((sign, body))
        if not pieces:
            return "0"
        text = ("-" if pieces[0][0] == "-" else "") + pieces[0][1]
        for sign, body in pieces[1:]:
            text += f" {sign} {body}"
        return text

    def __str__(self) -> str:
        return "\n".join(self.to_string(n) for n in range(len(self)))

    def __repr__(self) -> str:
        return (
            f"TaylorPolynomial(examples={len(self)}, variables={self.num_variables}, "
            f"order={self.order}, monomials={self.exponents.shape[0]})"
        )
