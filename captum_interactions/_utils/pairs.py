#!/usr/bin/env python3
"""Interaction results of every method as (N, D, D) float64 tensors, and the
pair values read from them (shared by :mod:`captum_interactions.interop` and
:func:`captum_interactions.top_interactions`)."""
from typing import Any, Tuple

import numpy as np
import torch
from torch import Tensor

PAIR_VALUES = ("sum", "entry")


def as_batch(interactions: Any, name: str = "interactions") -> Tensor:
    """``interactions`` as a detached float64 CPU tensor of shape (N, D, D).

    Accepts a (D, D) or (N, D, D) tensor or array (one input, or ``feature_mask``
    groups), the nested tuple-of-tuples layout of tuple inputs (``out[i][j]`` of
    shape (N, *F_i, *F_j), concatenated over the flattened features), and a
    :class:`~captum_interactions.DatasetExplanation` (its ``mean_interactions``).
    """
    if hasattr(interactions, "mean_interactions") and hasattr(interactions, "run_digest"):
        interactions = interactions.mean_interactions
        flat = interactions.reshape(1, *_square(interactions.shape, name))
        return flat.detach().double().cpu()
    if isinstance(interactions, tuple) and interactions and all(
        isinstance(row, tuple) and row and all(hasattr(b, "shape") for b in row)
        for row in interactions
    ):
        rows = [[torch.as_tensor(block).detach() for block in row] for row in interactions]
        if any(len(row) != len(rows) for row in rows):
            raise ValueError(f"`{name}`: the nested layout must be square (out[i][j] for "
                             f"every pair of inputs), got {[len(r) for r in rows]}")
        n = rows[0][0].shape[0]
        # block (i, i) has shape (N, *F_i, *F_i): F_i's size from its first half
        feature_sizes = []
        for i, row in enumerate(rows):
            diag = row[i]
            feature_sizes.append(int(np.prod(diag.shape[1:1 + (diag.dim() - 1) // 2])))
        flat_rows = [
            torch.cat([rows[i][j].reshape(n, feature_sizes[i], feature_sizes[j])
                       for j in range(len(rows))], dim=2)
            for i in range(len(rows))
        ]
        return torch.cat(flat_rows, dim=1).double().cpu()
    if isinstance(interactions, Tensor):
        tensor = interactions.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(interactions, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(
                f"`{name}` must be a tensor or array of shape (D, D) or (N, D, D), the "
                "nested tuple layout, or a DatasetExplanation; got "
                f"{type(interactions).__name__}"
            ) from None
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.shape[1] != tensor.shape[2]:
        raise ValueError(
            f"`{name}` must have shape (D, D) or (N, D, D) (for inputs with several "
            f"feature dimensions, reshape to (N, D, D) first); got {tuple(tensor.shape)}"
        )
    if tensor.is_complex():
        raise TypeError(f"`{name}` must be real, got {tensor.dtype}")
    return tensor.double().cpu()


def _square(shape: Tuple[int, ...], name: str) -> Tuple[int, int]:
    if len(shape) % 2:
        raise ValueError(f"`{name}` must be (*F, *F), got {tuple(shape)}")
    d = int(np.prod(shape[: len(shape) // 2]))
    return d, d


def check_pair_value(pair_value: str) -> None:
    if pair_value not in PAIR_VALUES:
        raise ValueError(f"`pair_value` must be one of {PAIR_VALUES}, got {pair_value!r}")


def pair_matrix(matrix: Tensor, pair_value: str) -> Tensor:
    """(…, D, D) -> the value of pair {i, j} at [i, j] (i != j), main effect on the
    diagonal: ``"sum"`` is Gamma_ij + Gamma_ji (the pair's whole share when the
    matrix splits it in two halves, as IH/EH do); ``"entry"`` is Gamma_ij as is
    (CD interactions, Hessian entries)."""
    check_pair_value(pair_value)
    if pair_value == "entry":
        return matrix
    summed = matrix + matrix.transpose(-1, -2)
    eye = torch.eye(matrix.shape[-1], dtype=torch.bool)
    return torch.where(eye, matrix, summed)
