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
supported in a set S of s variables only see monomials supported in S, so the
diagonal blocks (directions and monomials of exact support S) are invertible.
Support sizes are solved in ascending order: for every S of size s at once,

.. math::
    T_{full(S)} = B_{s,d}^{-1} \big(c_d(u) - L_{s,d}\, T_{lower(S)}\big),

where u runs over the C(d-1, s-1) directions of exact support S, L holds
u^q for the already known monomials q of smaller support inside S, and B
holds u^q for the monomials of exact support S. B and L depend only on
(s, d); B^{-1} is exact rational arithmetic rounded once to float64, shipped
as a table up to d = 8 (``block_inverses.npy``) and computed beyond. The cost
is linear in the number of monomials, and no matrix larger than C(d-1, s-1) is
inverted. The solves are linear in the c_d, so for p <= 4 variables and
d <= 8 the package also ships their result as one dense map per (p, d)
(``recovery_maps.f8``, 470 KB): a first call reads the maps it needs
instead of building them (up to 5 ms at p = 4, d = 8).
"""
import itertools
import math
import os
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

Monomial = Tuple[int, ...]


# --------------------------------------------------------------------------
# multi-indices
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def monomials(num_variables: int, degree: int) -> Tuple[Monomial, ...]:
    """All exponent tuples of total degree ``degree`` (graded, lexicographic:
    the first exponent descending, then the rest in that order)."""
    if num_variables <= 1:
        return ((degree,),) if num_variables == 1 else (((),) if degree == 0 else ())
    # built from the cached monomials of one variable fewer
    return tuple((first,) + rest for first in range(degree, -1, -1)
                 for rest in monomials(num_variables - 1, degree - first))


def _compositions(total: int, parts: int) -> List[Monomial]:
    """Positive compositions of ``total`` into ``parts`` parts."""
    out = []
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        out.append(tuple(bounds[i + 1] - bounds[i] for i in range(parts)))
    return out


_MAX_EXACT_INVERSE = 80
# below this degree every u^q of a block (at most (d - 1)^d) is exact in int64
# and in float64, so the power tables are vectorised; above, Python integers
_INT64_POWERS_MAX_DEGREE = 13


def _power_table(rows: Sequence[Monomial], exponents: Sequence[Monomial],
                 degree: int) -> np.ndarray:
    """(len(rows), len(exponents)) float64 table of u^q, each entry exact and
    then rounded once."""
    if not rows or not exponents:
        return np.zeros((len(rows), len(exponents)))
    if degree <= _INT64_POWERS_MAX_DEGREE:
        u = np.asarray(rows, dtype=np.int64)
        q = np.asarray(exponents, dtype=np.int64)
        return (u[:, None, :] ** q[None, :, :]).prod(-1).astype(np.float64)
    return np.array([[float(_power(a, b)) for b in exponents] for a in rows])


@lru_cache(maxsize=None)
def _block_inverse_table() -> Dict[Tuple[int, int], np.ndarray]:
    """The shipped exact block inverses {(s, d): B_{s,d}^{-1}} for d <= 8 (see
    :func:`block_inverse_table_values`), read once per process."""
    flat = np.load(_TABLE_PATH)
    table, offset = {}, 0
    for s, d in _table_blocks():
        n = math.comb(d - 1, s - 1)
        table[(s, d)] = flat[offset : offset + n * n].reshape(n, n)
        offset += n * n
    if offset != flat.size:
        raise RuntimeError(f"{_TABLE_PATH} holds {flat.size} values, expected {offset}")
    return table


#: Degrees whose block inverses ship with the package: each is the exact
#: rational inverse rounded once to float64, as :func:`_exact_inverse` makes it
#: (the exact elimination costs up to 30 ms per call at order 8, more than the
#: expansion it serves; ``block_inverse_table_values`` rebuilds the file).
TABLE_MAX_DEGREE = 8
_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_inverses.npy")


def _table_blocks() -> List[Tuple[int, int]]:
    return [(s, d) for d in range(1, TABLE_MAX_DEGREE + 1) for s in range(1, d + 1)]


def block_inverse_table_values() -> np.ndarray:
    """Every B_{s,d}^{-1} of the shipped table, computed exactly now and
    concatenated row-major in the table's order (d ascending, then s):
    ``np.save(_TABLE_PATH, block_inverse_table_values())`` writes the file."""
    return np.concatenate([_exact_block_inverse(s, d).reshape(-1) for s, d in _table_blocks()])


#: Up to this many variables (and order TABLE_MAX_DEGREE) the recovery maps
#: ship with the package: building them from the block solves costs more than
#: the expansion they serve (up to 5 ms at p = 4, d = 8, on every first call).
#: The file, ``recovery_maps.f8``, is raw little-endian float64 (as
#: ``ndarray.tofile`` writes it), so a plan reads its maps at their offset
#: with one read; parsing an .npy header would cost more than the maps of a
#: small plan.
RECOVERY_TABLE_MAX_VARIABLES = 4
_RECOVERY_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "recovery_maps.f8")


def _recovery_table_blocks() -> List[Tuple[int, int]]:
    return [(p, d) for p in range(2, RECOVERY_TABLE_MAX_VARIABLES + 1)
            for d in range(1, TABLE_MAX_DEGREE + 1)]


def recovery_table_values() -> np.ndarray:
    """Every shipped recovery map, computed now from the block solves: for each
    (p, d) the dense map of a plan of order d alone, (n_d, M_d) with n_d <= M_d
    directions, zero-padded to M_d rows and concatenated row-major in the
    table's order (p ascending, then d).
    ``recovery_table_values().astype("<f8").tofile(_RECOVERY_TABLE_PATH)``
    writes the file."""
    parts = []
    for (p, d), (_, count) in _RECOVERY_TABLE_OFFSETS.items():  # in file order
        padded = np.zeros((count, count))
        dense = RecoveryPlan(p, (d,))._dense_map(d)
        padded[: dense.shape[0]] = dense
        parts.append(padded.reshape(-1))
    return np.concatenate(parts)


def _recovery_table_offsets() -> Dict[Tuple[int, int], Tuple[int, int]]:
    """{(p, d): (offset, M_d)}: where each map starts in the table, in values."""
    offsets, offset = {}, 0
    for p, d in _recovery_table_blocks():
        count = math.comb(p + d - 1, d)
        offsets[(p, d)] = (offset, count)
        offset += count * count
    return offsets


#: the table's layout (a constant of the file format, not a cache)
_RECOVERY_TABLE_OFFSETS = _recovery_table_offsets()


def _read_bytes(path: str, offset: int, count: int) -> bytes:
    """Up to ``count`` bytes of the file at ``offset``: one ``pread`` where the
    platform has it (a first call reads its maps this way; ``np.fromfile``
    costs twice as much for a few kB)."""
    if hasattr(os, "pread"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            return os.pread(descriptor, count, offset)
        finally:
            os.close(descriptor)
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(count)


@lru_cache(maxsize=None)
def _recovery_table_maps(num_variables: int, top: int) -> Dict[int, np.ndarray]:
    """{d: shipped (M_d, M_d) map of (p, d)} for d = 1..``top`` within the table
    (see :func:`recovery_table_values`), read in one piece: they are stored
    one after the other."""
    offsets = _RECOVERY_TABLE_OFFSETS
    degrees = [d for d in range(1, top + 1) if (num_variables, d) in offsets]
    if not degrees:
        return {}
    first, _ = offsets[(num_variables, 1)]
    last, count = offsets[(num_variables, degrees[-1])]
    size = last + count * count - first
    values = np.frombuffer(_read_bytes(_RECOVERY_TABLE_PATH, 8 * first, 8 * size), dtype="<f8")
    if values.size != size:
        raise RuntimeError(f"{_RECOVERY_TABLE_PATH} is shorter than its table of maps")
    maps = {}
    for d in degrees:
        offset, count = offsets[(num_variables, d)]
        maps[d] = values[offset - first : offset - first + count * count].reshape(count, count)
    return maps


def _exact_block_inverse(support_size: int, degree: int) -> np.ndarray:
    """B_{s,d}^{-1} by exact elimination (integers), rounded once to float64."""
    full = _compositions(degree, support_size)
    block = [[_power(u, q) for q in full] for u in full]
    return np.asarray(_exact_inverse(block), dtype=np.float64).reshape(len(full), len(full))


@lru_cache(maxsize=None)
def _support_block(support_size: int, degree: int) -> Tuple[Tuple[Monomial, ...], Tuple[Monomial, ...], np.ndarray, np.ndarray]:
    """The solve for the monomials of exact support within ``support_size`` local variables.

    Directions u and monomials q of full support are the positive compositions
    of ``degree`` (equally many). Returns (u, lower, B^{-1}, L) with
    B[u, q] = u^q (q of full support) and L[u, q'] = u^q' over the local
    monomials q' of smaller support (``lower``), as float64 arrays. B^{-1} is
    exact rational arithmetic rounded once to float64 (from the shipped table
    up to degree 8; floating point beyond 80 rows).
    """
    full = tuple(_compositions(degree, support_size))
    lower = tuple(q for q in monomials(support_size, degree) if not all(e > 0 for e in q))
    if degree <= TABLE_MAX_DEGREE:
        inverse = _block_inverse_table()[(support_size, degree)]
    elif len(full) <= _MAX_EXACT_INVERSE:
        inverse = _exact_block_inverse(support_size, degree)
    else:
        inverse = np.linalg.inv(_power_table(full, full, degree))
    return full, lower, inverse, _power_table(full, lower, degree)


def _power(u: Monomial, q: Monomial) -> int:
    return math.prod(map(pow, u, q))


def _exact_inverse(matrix: List[List[int]]) -> List[List[float]]:
    """Inverse of an integer matrix, exact and then rounded once to float64, by
    fraction-free Gauss-Jordan elimination.

    Bareiss' update keeps every entry an integer (each division by the previous
    pivot is exact), so nothing is rounded until the last step, where the right
    block holds det(A) * A^{-1}: each entry is then one correctly rounded
    integer division. Rows are updated as numpy object arrays (Python integers,
    any size), one vectorised update per pivot."""
    n = len(matrix)
    if n == 1:  # every block of support size 1
        return [[1 / int(matrix[0][0])]]
    rows = np.empty((n, 2 * n), dtype=object)
    for i, row in enumerate(matrix):
        rows[i, :n] = [int(x) for x in row]
        rows[i, n:] = [int(i == j) for j in range(n)]
    previous = 1
    others = np.ones(n, dtype=bool)
    for col in range(n):
        pivot_row = next(r for r in range(col, n) if rows[r, col] != 0)
        if pivot_row != col:
            rows[[col, pivot_row]] = rows[[pivot_row, col]]
        pivot_line = rows[col].copy()
        pivot = pivot_line[col]
        others[col] = False
        factors = rows[others, col].reshape(-1, 1)
        rows[others] = (pivot * rows[others] - factors * pivot_line) // previous
        others[col] = True
        previous = pivot
    # now rows[i, i] == det (up to sign, the same on every row) for all i
    return [[int(x) / int(rows[i, i]) for x in rows[i, n:]] for i in range(n)]


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
        # per order, as numpy arrays (many small tensors would cost more than
        # the expansion at low orders): (gather index into directions, scale
        # g^d, count); the per-support-size solves are made when first needed
        # (the shipped maps of :func:`_recovery_table_maps` need none)
        self._gathers: Dict[int, Tuple[np.ndarray, np.ndarray, int]] = {}
        for d in self.orders:
            if d == 0:
                continue
            mons = monomials(p, d)
            gather, common = [], []
            for mon in mons:  # (plain Python: faster than numpy at these sizes)
                g = math.gcd(*mon)
                prim = mon if g == 1 else tuple(e // g for e in mon)
                index = direction_index.get(prim)
                if index is None:
                    index = direction_index[prim] = len(self.directions)
                    self.directions.append(prim)
                gather.append(index)
                common.append(g)
            self._gathers[d] = (np.asarray(gather, dtype=np.int64),
                                np.asarray(common, dtype=np.float64) ** d, len(mons))
        if not self.directions:  # order 0 only: one (zero) direction suffices
            self.directions.append((0,) * p)

    def _blocks(self, d: int) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """The solves of order ``d``, one per support size s: (positions of the
        monomials of exact support S, of those of smaller support inside S,
        B_{s,d}^{-1}, L_{s,d}) for every support S of size s at once."""
        cache = self.__dict__.setdefault("_block_cache", {})
        if d not in cache:
            p = self.num_variables
            mons = monomials(p, d)
            locate = _monomial_locator(np.asarray(mons, dtype=np.int64).reshape(len(mons), p),
                                       mons, d)
            blocks = []
            for s in range(1, min(d, p) + 1):
                full, lower, inverse, lower_matrix = _support_block(s, d)
                supports = np.asarray(
                    list(itertools.combinations(range(p), s)), dtype=np.int64
                ).reshape(-1, s)
                # directions and monomials of exact support S share their exponents
                blocks.append((locate(_embedded(full, supports, p)),
                               locate(_embedded(lower, supports, p)),
                               inverse, lower_matrix))
            cache[d] = blocks
        return cache[d]

    @property
    def steps(self) -> Dict[int, Tuple[Tensor, Tensor, List[Tuple[Tensor, ...]], int]]:
        """The per-order solves as tensors (made on first use: the dense maps
        need only the arrays)."""
        steps = self.__dict__.get("_steps")
        if steps is None:
            steps = self._steps = {
                d: (torch.from_numpy(gather), torch.from_numpy(scale),
                    [tuple(map(torch.from_numpy, block)) for block in self._blocks(d)], count)
                for d, (gather, scale, count) in self._gathers.items()
            }
        return steps

    def direction_matrix(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(n_directions, p) integer directions as floats (cached per dtype and device)."""
        cache = self.__dict__.setdefault("_direction_cache", {})
        key = (str(device), dtype)
        if key not in cache:
            as_array = np.asarray(self.directions, dtype=np.float64).reshape(
                len(self.directions), self.num_variables)
            cache[key] = torch.from_numpy(as_array).to(device, dtype)
        return cache[key]

    # the recovery is linear: below this many entries it is one dense
    # (n_directions, M_d) matrix per order, built once from the exact solves
    _DENSE_MAX_ENTRIES = 4_000_000
    _STACKED_MAX_ENTRIES = 300_000

    def _dense_arrays(self) -> Optional[Dict[int, np.ndarray]]:
        """{d: (n_directions, M_d) float64 map}, or None where the maps would be
        too large (the block solves are used); made once per plan."""
        if "_dense_np" not in self.__dict__:
            self._dense_np = None
            if self._dense_fits():
                self._dense_np = {}
                for d in self.orders:
                    if d != 0:
                        rows, values = self._map_rows(d)
                        if isinstance(rows, slice):  # already every direction's row
                            self._dense_np[d] = values
                            continue
                        self._dense_np[d] = full = np.zeros((len(self.directions), values.shape[1]))
                        full[rows] = values
        return self._dense_np

    def _dense_fits(self) -> bool:
        """Whether the dense maps of every order are small enough to build."""
        sizes = [self._gathers[d][2] for d in self.orders if d != 0]
        return len(self.directions) * sum(sizes) <= self._DENSE_MAX_ENTRIES

    def _dense_maps(self, device: torch.device, dtype: torch.dtype) -> Optional[Dict[int, Tensor]]:
        """{d: (n_directions, M_d)} with coefficients_d = univariate[d].T @ map_d, or
        None where the maps would be too large (the block solves are used)."""
        cache = self.__dict__.setdefault("_dense_cache", {})
        key = (str(device), dtype)
        if key not in cache:
            arrays = self._dense_arrays()
            cache[key] = None if arrays is None else {
                d: torch.from_numpy(m).to(device, dtype) for d, m in arrays.items()
            }
        return cache[key]

    def recover(self, univariate: Tensor) -> Dict[int, Tensor]:
        """``univariate`` (K + 1, n_directions, N) -> {d: (N, M_d) monomial coefficients}."""
        maps = self._dense_maps(univariate.device, univariate.dtype)
        if maps is None:
            return self._recover_blocks(univariate)
        out = {}
        for d in self.orders:
            out[d] = (univariate[0, 0].unsqueeze(-1) if d == 0
                      else univariate[d].transpose(0, 1) @ maps[d])
        return out

    def recover_concatenated(self, univariate: Tensor) -> Tensor:
        """``univariate`` (K + 1, n_directions, N) -> (N, sum_d M_d): the monomial
        coefficients of every order, ascending, as one matrix product where the
        stacked maps are small (else :meth:`recover` order by order)."""
        cache = self.__dict__.setdefault("_stacked_cache", {})
        key = (str(univariate.device), univariate.dtype, univariate.shape[0])
        if key not in cache:
            cache[key] = self._stacked_map(univariate.shape[0], univariate.device,
                                           univariate.dtype)
        stacked = cache[key]
        if stacked is None:
            parts = self.recover(univariate)
            return torch.cat([parts[d] for d in self.orders], dim=1)
        rows = univariate.shape[0] * univariate.shape[1]
        return univariate.reshape(rows, -1).transpose(0, 1) @ stacked

    def _stacked_map(self, num_coefficients: int, device: torch.device,
                     dtype: torch.dtype) -> Optional[Tensor]:
        """((K + 1) * n_directions, sum_d M_d) block map, or None if too large."""
        n = len(self.directions)
        total = sum(math.comb(self.num_variables + d - 1, d) for d in self.orders)
        # the stacked map is block diagonal ((K + 1) times the entries of the
        # maps): worth one product only while small, else one product per order
        if not self._dense_fits() or num_coefficients * n * total > self._STACKED_MAX_ENTRIES:
            return None
        stacked = np.zeros((num_coefficients, n, total))
        offset = 0
        for d in self.orders:
            if d == 0:
                stacked[0, 0, offset] = 1  # the value, the same along every direction
                offset += 1
                continue
            rows, values = self._map_rows(d)  # placed directly (no per-order copy)
            count = values.shape[1]
            stacked[d, :, offset : offset + count][rows] = values
            offset += count
        return torch.from_numpy(stacked.reshape(num_coefficients * n, total)).to(device, dtype)

    def _map_rows(self, d: int) -> Tuple[Union[List[int], slice], np.ndarray]:
        """(rows, values): the (n_directions, M_d) map of :meth:`_dense_map` is
        ``values`` at the directions ``rows`` and zero elsewhere; read from the
        shipped table where it holds (p, d). Made once per order (the stacked
        map and the per-order maps both use it)."""
        cache = self.__dict__.setdefault("_map_rows_cache", {})
        if d not in cache:
            if self.num_variables == 1:  # one direction (1,): the coefficients are T_d
                cache[d] = slice(None), np.ones((1, 1))
            else:
                shipped = _recovery_table_maps(self.num_variables, max(self.orders)).get(d)
                if shipped is None:
                    cache[d] = slice(None), self._dense_map(d)
                else:
                    # the table's rows are the directions of order d in the order
                    # they first occur among the monomials, as in a plan of that
                    # order alone
                    rows = list(dict.fromkeys(self._gathers[d][0].tolist()))
                    cache[d] = rows, shipped[: len(rows)]
        return cache[d]

    def _dense_map(self, d: int) -> np.ndarray:
        """(n_directions, M_d) float64: the block solves of :meth:`_recover_blocks`
        applied to every unit vector at once (in numpy: small arrays, many steps)."""
        gather, scale, count = self._gathers[d]
        n = len(self.directions)
        # c_d at every multi-index direction, for the univariate input e_row
        c = np.zeros((n, count))
        c[gather, np.arange(count)] = scale
        coeffs = np.zeros((n, count))
        for full_idx, lower_idx, inverse, lower_matrix in self._blocks(d):  # ascending support
            residual = c[:, full_idx]  # (n, n_supports, n_full)
            if lower_matrix.shape[1]:
                residual = residual - coeffs[:, lower_idx] @ lower_matrix.T
            coeffs[:, full_idx.reshape(-1)] = (residual @ inverse.T).reshape(n, -1)
        return coeffs

    def _recover_blocks(self, univariate: Tensor) -> Dict[int, Tensor]:
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
            for full_idx, lower_idx, inverse, lower_matrix in blocks:  # ascending support
                full_idx = full_idx.to(device)
                residual = c[:, full_idx]  # (N, n_supports, n_full)
                if lower_matrix.shape[1]:
                    known = coeffs[:, lower_idx.to(device)]  # (N, n_supports, n_lower)
                    residual = residual - known @ lower_matrix.to(device, dtype).T
                solved = residual @ inverse.to(device, dtype).T
                coeffs[:, full_idx.reshape(-1)] = solved.reshape(c.shape[0], -1)
            out[d] = coeffs
        return out


@lru_cache(maxsize=32)
def recovery_plan(num_variables: int, orders: Tuple[int, ...]) -> RecoveryPlan:
    """A cached :class:`RecoveryPlan` (its index tables are built in Python)."""
    return RecoveryPlan(num_variables, orders)


@lru_cache(maxsize=8)
def _derivative_layout(exps: Tuple[Monomial, ...], p: int, k: int) -> Tuple[Tensor, Tensor]:
    """(j! per monomial, the monomial of every entry of a (p,)*k tensor), cached:
    building the lookup costs more than using it."""
    if k <= 20:  # j! <= k! fits in int64: exact, then rounded once
        table = np.asarray([math.factorial(e) for e in range(k + 1)], dtype=np.int64)
        exps_np = np.asarray(exps, dtype=np.int64).reshape(len(exps), p)
        factorials = torch.from_numpy(table[exps_np].prod(axis=1).astype(np.float64))
    else:
        factorials = torch.tensor(
            [math.prod(math.factorial(int(e)) for e in row) for row in exps],
            dtype=torch.float64,
        )
    if k == 0:
        return factorials, torch.zeros(1, dtype=torch.long)
    canonical = monomials(p, k)
    if exps == canonical:  # as HOPE builds it
        return factorials, torch.from_numpy(_canonical_lookup(p, k))
    if len(exps) == len(canonical) and set(exps) == set(canonical):  # complete, permuted
        position = {m: n for n, m in enumerate(exps)}
        permutation = np.asarray([position[m] for m in canonical], dtype=np.int64)
        return factorials, torch.from_numpy(permutation[_canonical_lookup(p, k)])
    # every index tuple (i_1..i_k) and every monomial as its sorted index
    # tuple, keyed in base p: keys stay below p^k, the size of the output,
    # so they cannot overflow (base k + 1 over the exponents would for p > 40)
    grids = torch.meshgrid(*[torch.arange(p)] * k, indexing="ij")
    tuples = torch.stack([g.reshape(-1) for g in grids], dim=1).sort(dim=1).values
    exps_t = torch.tensor(exps, dtype=torch.long).reshape(len(exps), p)
    monomial_tuples = torch.repeat_interleave(
        torch.arange(p).repeat(exps_t.shape[0]), exps_t.reshape(-1)
    ).reshape(-1, k)  # exponents -> the sorted index tuple of each monomial
    radix = p ** torch.arange(k - 1, -1, -1, dtype=torch.long)
    keys = monomial_tuples @ radix
    order = torch.argsort(keys)
    lookup = order[torch.searchsorted(keys[order], tuples @ radix)]
    return factorials, lookup.reshape(-1)


@lru_cache(maxsize=None)
def _canonical_lookup(p: int, k: int) -> np.ndarray:
    """(p^k,) position in ``monomials(p, k)`` of the monomial of every entry
    (i_1..i_k) of a (p,)*k tensor, row-major. Built order by order: the entry
    (i_1..i_k) is the entry (i_1..i_{k-1}) times x_{i_k}, so one table of
    "monomial of order k - 1 times x_i" (M_{k-1} x p) and one gather per order
    (in numpy: small arrays, built once)."""
    if k == 0:
        return np.zeros(1, dtype=np.int64)
    lower = monomials(p, k - 1)
    index = {m: n for n, m in enumerate(monomials(p, k))}
    times = np.asarray(
        [index[m[:i] + (m[i] + 1,) + m[i + 1:]] for m in lower for i in range(p)],
        dtype=np.int64,
    ).reshape(len(lower), p)
    return times[_canonical_lookup(p, k - 1)].reshape(-1)


def _embedded(local: Sequence[Monomial], supports: np.ndarray, p: int) -> np.ndarray:
    """(n_supports, len(local), p) exponents: every local monomial (over s
    variables) placed on every support (n_supports, s) among p variables."""
    out = np.zeros((supports.shape[0], len(local), p), dtype=np.int64)
    if len(local):
        exps = np.asarray(local, dtype=np.int64).reshape(len(local), -1)
        rows = np.arange(supports.shape[0])[:, None, None]
        cols = np.arange(len(local))[None, :, None]
        out[rows, cols, supports[:, None, :]] = exps[None]
    return out


def _monomial_locator(exps: np.ndarray, mons: Sequence[Monomial], degree: int):
    """A function from exponent arrays (..., p) of degree ``degree`` to their
    positions in ``exps`` (= ``mons``): keys in base degree + 1 where they fit
    in int64, else a dictionary."""
    p = exps.shape[1]
    if p * math.log2(degree + 1) < 62:
        radix = (degree + 1) ** np.arange(p, dtype=np.int64)
        keys = exps @ radix
        order = np.argsort(keys)
        sorted_keys = keys[order]
        return lambda e: order[np.searchsorted(sorted_keys, e @ radix)]
    position = {m: n for n, m in enumerate(mons)}
    return lambda e: np.array(
        [position[tuple(row)] for row in e.reshape(-1, p).tolist()], dtype=np.int64
    ).reshape(e.shape[:-1])


def _format_magnitude(value: float, precision: int) -> str:
    """``value`` (>= 0) with ``precision`` significant digits, without a
    padded exponent: 0.5, 1.2, 1e-5, 1.23e4."""
    text = f"{value:.{precision}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


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
        *,
        _tables: Optional[Dict] = None,
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
        # index tables derived from the exponents alone (degrees, per-order
        # positions, derivative layouts), shared by polynomials built on the
        # same exponents tensor (HOPE passes one per (p, K); indexing keeps it)
        if _tables is None or _tables.get("exponents") is not self.exponents:
            _tables = {"exponents": self.exponents}
        self._tables = _tables
        if "degrees" not in _tables:
            _tables["degrees"] = self.exponents.sum(1)
        self._degrees = _tables["degrees"]

    # -- basic structure ----------------------------------------------------

    @property
    def num_variables(self) -> int:
        return self.exponents.shape[1]

    @property
    def order(self) -> int:
        if "order" not in self._tables:
            self._tables["order"] = (
                int(self._degrees.max().item()) if self._degrees.numel() else 0
            )
        return self._tables["order"]

    def __len__(self) -> int:
        return self.coefficients.shape[0]

    def __getitem__(self, index) -> "TaylorPolynomial":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaylorPolynomial(
            self.exponents, self.coefficients[index], self.center[index], self.feature_names,
            _tables=self._tables,
        )

    def __iter__(self):
        for n in range(len(self)):
            yield self[n]

    def coefficients_of_order(self, k: int) -> Tuple[Tensor, Tensor]:
        """(exponents (M_k, p), coefficients (N, M_k)) of the order-k terms."""
        if "positions" not in self._tables:
            # every order at once from one host copy of the degrees: a slice
            # (a view) where an order is contiguous, as HOPE's graded layout is
            found: Dict[int, List[int]] = {}
            for n, degree in enumerate(self._degrees.tolist()):
                found.setdefault(degree, []).append(n)
            table = {}
            for degree, where in found.items():
                if where[-1] - where[0] == len(where) - 1:
                    table[degree] = slice(where[0], where[-1] + 1)
                else:
                    table[degree] = torch.tensor(where, device=self.exponents.device)
            self._tables["positions"] = table
        positions = self._tables["positions"].get(k, slice(0, 0))
        return self.exponents[positions], self.coefficients[:, positions]

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
        """Value of the polynomials at points ``x`` (absolute, not offsets).

        Args:
            x (Tensor): points in the variables' space, last axis p:

                - one polynomial (N = 1, one expansion point): any batch of
                  points, shape (*B, p) -> values of shape (*B), e.g. a grid
                  or samples (M, p) -> (M,); a single point (p,) -> (1,).
                - N polynomials: (N, p) one point each -> (N,), or
                  (N, P, p) P points each -> (N, P) (more generally
                  (N, *B, p) -> (N, *B)).
        Returns:
            Tensor of values, shaped as above.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"`x` must be a tensor, got {type(x).__name__}")
        x = x.to(self.coefficients.device, self.coefficients.dtype)
        p, n = self.num_variables, len(self)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.shape[-1] != p:
            raise ValueError(
                f"`x` must have its variables on the last axis, of size {p}, "
                f"got shape {tuple(x.shape)}"
            )
        if n == 1:
            # one expansion point: broadcast it to every point of any batch
            delta = x - self.center[0]
            return self._monomial_values(delta) @ self.coefficients[0]
        if x.dim() < 2 or x.shape[0] != n:
            raise ValueError(
                f"`x` must have shape ({n}, {p}) or ({n}, P, {p}) for these {n} "
                f"polynomials (or select one, poly[i], to evaluate it at any "
                f"batch of points), got {tuple(x.shape)}"
            )
        batch = (n,) + (1,) * (x.dim() - 2)
        values = self._monomial_values(x - self.center.reshape(batch + (p,)))
        return (values * self.coefficients.reshape(batch + (-1,))).sum(-1)

    def derivative_tensor(self, k: int) -> Tensor:
        """The full symmetric k-th derivative tensor (N, p, ..., p) at the center.

        Entry (i_1..i_k) is d^k f / dx_{i_1}..dx_{i_k} = j! T_j, j the
        multi-index counting the i's. Built on request: p^k entries.
        """
        if k < 0 or k > self.order:
            raise ValueError(f"`k` must be in [0, {self.order}], got {k}")
        p = self.num_variables
        exps, coeffs = self.coefficients_of_order(k)
        key = ("layout", k, coeffs.device, coeffs.dtype)
        if key not in self._tables:
            # exponents known to be graded as monomials() lists them (HOPE's
            # table says so): no need to read them back from the tensor
            graded = self._tables.get("graded_exponents", False)
            exps_key = monomials(p, k) if graded else tuple(map(tuple, exps.tolist()))
            factorials, lookup = _derivative_layout(exps_key, p, k)
            self._tables[key] = (factorials.to(coeffs.device, coeffs.dtype),
                                 lookup.to(coeffs.device))
        factorials, lookup = self._tables[key]
        derivs = coeffs * factorials
        if k == 0:
            return derivs[:, 0]
        return derivs[:, lookup].reshape((len(self),) + (p,) * k)

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
        return TaylorPolynomial(self.exponents, out, new_center.clone(), self.feature_names,
                                _tables=self._tables)

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
                                    self.feature_names, _tables=self._tables)
        local = self.recenter(center)
        if mode == "local":
            return local
        coeffs = (w[:, None] * local.coefficients).sum(0, keepdim=True)
        return TaylorPolynomial(self.exponents, coeffs, center, self.feature_names,
                                _tables=self._tables)

    def truncate(self, order: int) -> "TaylorPolynomial":
        keep = self._degrees <= order
        return TaylorPolynomial(self.exponents[keep], self.coefficients[:, keep],
                                self.center, self.feature_names)

    # -- reading ------------------------------------------------------------

    def monomial_string(self, exponents: Sequence[int], center=None,
                        precision: int = 4) -> str:
        """The monomial as text, e.g. ``x1^2*x2`` or ``(x1 - 0.4)^2``; ``"1"`` for
        the constant. ``center`` offsets are printed with ``precision``
        significant digits."""
        parts = []
        for name, e, c in zip(self.feature_names, exponents,
                              center if center is not None else [0.0] * len(exponents)):
            if e == 0:
                continue
            if c == 0:
                base = name
            else:
                base = f"({name} {'-' if c > 0 else '+'} {_format_magnitude(abs(c), precision)})"
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
                  precision: int = 3) -> str:
        """One polynomial as a readable formula, lowest degree first, e.g.
        ``0.2 + x1 - 0.5*x1*x2 + 1.2*x2^3``.

        Coefficients are printed with ``precision`` significant digits; a
        coefficient that prints as 1 is left out (``x1^2``, not ``1*x1^2``), and
        signs join the terms (``a - b``, never ``a + -b``).

        Args:
            example (int): which polynomial of the batch. Default: 0
            top (int, optional): keep the ``top`` largest terms. Default: all
            min_abs (float): drop terms with |coefficient| < min_abs. Default: 0
            precision (int): significant digits of the coefficients. Default: 3
        """
        if isinstance(precision, bool) or not isinstance(precision, int) or precision < 1:
            raise ValueError(f"`precision` must be an integer >= 1, got {precision!r}")
        center = self.center[example].tolist()
        pieces = []
        for exps, value in sorted(
            self.terms(top=top, min_abs=min_abs, example=example),
            key=lambda t: (sum(t[0]), [-e for e in t[0]]),
        ):
            magnitude = _format_magnitude(abs(value), precision)
            mono = self.monomial_string(exps, center, precision=max(precision, 4))
            if mono == "1":
                body = magnitude
            elif float(magnitude) == 1.0:
                body = mono
            else:
                body = f"{magnitude}*{mono}"
            pieces.append(("-" if value < 0 else "+", body))
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
