#!/usr/bin/env python3
"""Readable tables of interaction results: :func:`top_interactions`."""
from typing import Any, List, NamedTuple, Optional, Sequence

import torch

from captum_interactions._utils.pairs import as_batch, pair_matrix

__all__ = ["TopInteraction", "InteractionTable", "top_interactions"]


class TopInteraction(NamedTuple):
    """One ranked pair of :func:`top_interactions`.

    Fields: rank (1 = strongest), feature indices i <= j, their names, and the
    pair's value."""

    rank: int
    i: int
    j: int
    feature_i: str
    feature_j: str
    value: float


class InteractionTable(tuple):
    """The ranked pairs of :func:`top_interactions`, printed as an aligned table.

    A tuple of :class:`TopInteraction`; ``value_label`` names the value column."""

    def __new__(cls, rows: Sequence[TopInteraction], value_label: str = "value"):
        table = super().__new__(cls, rows)
        table.value_label = value_label
        return table

    def __str__(self) -> str:
        if not self:
            return "(no pairs)"
        pairs = [f"{r.feature_i} \u00d7 {r.feature_j}" if r.i != r.j else f"{r.feature_i} (main)"
                 for r in self]
        values = [f"{r.value:+.6g}" for r in self]
        w_rank = max(4, len(str(len(self))))
        w_pair = max(4, *(len(p) for p in pairs))
        w_value = max(len(self.value_label), *(len(v) for v in values))
        lines = [f"{'rank':>{w_rank}}  {'pair':<{w_pair}}  {self.value_label:>{w_value}}"]
        lines += [f"{r.rank:>{w_rank}}  {p:<{w_pair}}  {v:>{w_value}}"
                  for r, p, v in zip(self, pairs, values)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"InteractionTable(\n{self}\n)"

    def _repr_html_(self) -> str:  # notebooks
        head = f"<tr><th>rank</th><th>pair</th><th>{self.value_label}</th></tr>"
        body = "".join(
            f"<tr><td>{r.rank}</td><td>{r.feature_i} &times; {r.feature_j}</td>"
            f"<td>{r.value:+.6g}</td></tr>" for r in self
        )
        return f"<table>{head}{body}</table>"


def top_interactions(
    interactions: Any,
    k: int = 10,
    feature_names: Optional[Sequence[str]] = None,
    example: Optional[int] = None,
    aggregate: str = "mean_abs",
    pair_value: str = "sum",
    include_diagonal: bool = False,
) -> InteractionTable:
    r"""
    The ``k`` strongest pairwise interactions, as a ranked, printable table.

    Pairs i < j are ranked by the magnitude of their value (ties keep index
    order); a pair's value is :math:`\Gamma_{ij} + \Gamma_{ji}` (its whole
    share of f(x) - f(x') for IH/EH, ``pair_value="sum"``) or
    :math:`\Gamma_{ij}` (``"entry"``: CD interactions, Hessians).

    Args:
        interactions (Tensor, array, nested tuple or DatasetExplanation): a
            (D, D) matrix, an (N, D, D) batch, the nested layout of tuple
            inputs, or an ``explain_dataset`` result (its mean interactions).
        k (int, optional): number of pairs listed (fewer if there are fewer
            pairs). Default: 10
        feature_names (sequence of str, optional): D names. Default: x0, x1, ...
        example (int, optional): rank one example of a batch; None reduces the
            batch over examples with ``aggregate``. Default: None
        aggregate (str, optional): for a batch, ``"mean_abs"`` (mean of
            abs(pair value): a global importance, signs cannot cancel) or
            ``"mean"`` (signed mean). Default: "mean_abs"
        pair_value (str, optional): ``"sum"`` or ``"entry"``. Default: "sum"
        include_diagonal (bool, optional): also rank the main effects
            :math:`\Gamma_{ii}` (listed as "name (main)"). Default: False

    Returns:
        **table** (InteractionTable): a tuple of ``TopInteraction(rank, i, j,
        feature_i, feature_j, value)``, strongest first; ``print(table)``
        shows it aligned.

    Examples::

        >>> gamma = torch.zeros(3, 3)
        >>> gamma[0, 2] = gamma[2, 0] = 0.25
        >>> table = top_interactions(gamma, k=1, feature_names=["a", "b", "c"])
        >>> print(table)
        rank  pair   value
           1  a × c   +0.5
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    batch = as_batch(interactions)
    n, d = batch.shape[0], batch.shape[1]
    if feature_names is None:
        names: List[str] = [f"x{i}" for i in range(d)]
    else:
        names = [str(name) for name in feature_names]
        if len(names) != d:
            raise ValueError(f"`feature_names` must have {d} entries, got {len(names)}")
    pairs = pair_matrix(batch, pair_value)
    if example is not None:
        if isinstance(example, bool) or not isinstance(example, int) or not -n <= example < n:
            raise ValueError(f"`example` must be an integer in [0, {n}), got {example!r}")
        matrix, label = pairs[example], "value"
    elif n == 1:
        matrix, label = pairs[0], "value"
    elif aggregate == "mean_abs":
        matrix, label = pairs.abs().mean(dim=0), "mean |value|"
    elif aggregate == "mean":
        matrix, label = pairs.mean(dim=0), "mean value"
    else:
        raise ValueError(f"`aggregate` must be 'mean_abs' or 'mean', got {aggregate!r}")
    rows, cols = torch.triu_indices(d, d, offset=0 if include_diagonal else 1)
    values = matrix[rows, cols]
    if not torch.isfinite(values).all():
        raise ValueError("`interactions` has NaN or infinite values; rank finite results "
                         "(explain_dataset summaries skip such examples)")
    order = torch.sort(values.abs(), descending=True, stable=True).indices[:k]
    table = [
        TopInteraction(rank + 1, int(rows[o]), int(cols[o]), names[int(rows[o])],
                       names[int(cols[o])], float(values[o]))
        for rank, o in enumerate(order.tolist())
    ]
    return InteractionTable(table, label)
