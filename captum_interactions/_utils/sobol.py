#!/usr/bin/env python3
r"""Many independently scrambled Sobol sequences at once.

SmoothHess needs one randomized Sobol sequence per example and noise block.
``torch.quasirandom.SobolEngine`` scrambles one sequence per engine, and
building an engine costs about 0.3 ms (its 30 x 30 matrices for every
dimension), more than the gradients of a small model. Here every sequence is
scrambled the same way, a random linear matrix scramble followed by a random
digital shift (Matousek 1998; Owen 2003, "Variance with alternative
scramblings of digital nets"), but all sequences at once with integer tensor
operations, and only for the direction numbers the requested points use.

For dimension d, point i of the unscrambled sequence is the XOR of the
direction numbers v_j (30-bit integers, ``SobolEngine``'s) over the bits j of
gray(i) = i XOR (i >> 1). A lower-triangular binary matrix L with unit
diagonal (output bit k, counted from the most significant, depends on input
bits 1..k) is linear over GF(2), so scrambling the points is scrambling the
direction numbers: v_j' = L v_j, the XOR of the columns of L picked by the
bits of v_j. Each point is then XORed with a uniform random
30-bit shift. Both keep the net property of the sequence (every elementary
interval holds its share of points), and every point is uniform on the grid of
2^-30, so the mean over a sequence is unbiased.
"""
from functools import lru_cache

import torch
from torch import Tensor

#: bits of every coordinate (as ``torch.quasirandom.SobolEngine``)
MAXBIT = 30

@lru_cache(maxsize=16)
def _direction_numbers(dimension: int) -> Tensor:
    """(dimension, MAXBIT) int64 direction numbers of the unscrambled sequence."""
    return torch.quasirandom.SobolEngine(dimension, scramble=False).sobolstate.clone()


def scrambled_sobol(num_points: int, num_sequences: int, dimension: int) -> Tensor:
    r"""The first points of independently scrambled Sobol sequences.

    Args:
        num_points (int): points per sequence (the first ``num_points``).
        num_sequences (int): independent scrambles.
        dimension (int): coordinates per point (at most 21201).

    Returns:
        **points** (Tensor): float64 of shape (num_points, num_sequences,
        dimension) in [0, 1), on the CPU; random numbers come from torch's
        global generator (reproducible under ``torch.manual_seed``).

    Examples::

        >>> import torch
        >>> from captum_interactions._utils.sobol import scrambled_sobol
        >>> torch.manual_seed(0)
        >>> u = scrambled_sobol(8, num_sequences=3, dimension=2)
        >>> # each column holds one point in each eighth of [0, 1)
        >>> sorted((u[:, 0, 0] * 8).floor().tolist())
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    used = max(1, (num_points - 1).bit_length())  # direction numbers of points 0..n-1
    directions = _direction_numbers(dimension)[:, :used]  # (D, m)
    column = torch.arange(used, dtype=torch.int64)
    position = MAXBIT - 1 - column  # input bit l (from the most significant) sits at 2^(29 - l)
    # column l of L: its diagonal bit and random bits below it; v_j has bits
    # only in its top j + 1 positions, so columns l < m are all that is used
    columns = torch.randint(0, 1 << MAXBIT, (num_sequences, dimension, used))
    columns = (columns & ((1 << position) - 1)) | (1 << position)
    # v_j' = XOR of the columns l picked by the bits of v_j
    picks = ((directions[:, :, None] >> position) & 1).bool()  # (D, j, l)
    scrambled = torch.zeros(num_sequences, dimension, used, dtype=torch.int64)
    for l in range(used):
        scrambled ^= torch.where(picks[None, :, :, l], columns[:, :, l : l + 1], 0)
    shift = torch.randint(0, 1 << MAXBIT, (num_sequences, dimension))
    index = torch.arange(num_points, dtype=torch.int64)
    gray = index ^ (index >> 1)
    points = shift.expand(num_points, num_sequences, dimension).clone()
    for j in range(used):
        uses = ((gray >> j) & 1).bool().view(-1, 1, 1)
        points ^= torch.where(uses, scrambled[:, :, j], 0)
    return points.to(torch.float64) / float(1 << MAXBIT)
