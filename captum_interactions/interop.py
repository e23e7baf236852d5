#!/usr/bin/env python3
r"""
Interaction results in other libraries' formats.

- :func:`to_shapiq`: any pairwise result of this library as shapiq's
  ``InteractionValues`` (needs the optional extra: ``pip install
  "captum-interactions[shapiq]"``), so shapiq's plots (``network_plot``,
  ``force_plot``, ``upset_plot``, ``bar_plot``, ...) draw our output.
- :func:`from_shapiq`: back to a symmetric (D, D) matrix in this library's layout.
"""
import warnings
from typing import Any, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from captum_interactions._utils.pairs import as_batch, check_pair_value, pair_matrix

__all__ = ["to_shapiq", "from_shapiq"]

#: The label our exports carry by default: not one of shapiq's game-theoretic
#: indices (Integrated Hessians is not k-SII, STII or FSII), so shapiq's own
#: index-specific conversions never run on it.
DEFAULT_INDEX = "captum_interactions"


def _import_shapiq() -> Any:
    try:
        import shapiq
    except ImportError:
        raise ImportError(
            "to_shapiq needs shapiq: pip install \"captum-interactions[shapiq]\" "
            "(or pip install shapiq)"
        ) from None
    return shapiq


def to_shapiq(
    interactions: Any,
    example: Optional[int] = None,
    baseline_value: Union[float, Tensor, np.ndarray] = 0.0,
    pair_value: str = "sum",
    index: str = DEFAULT_INDEX,
    estimated: bool = True,
    estimation_budget: Optional[int] = None,
) -> Any:
    r"""
    Export an interaction result to shapiq's ``InteractionValues``.

    Players are the features (or the ``feature_mask`` groups) in the result's
    order. The exported values are: the empty set, ``baseline_value``; each
    singleton {i}, the main effect :math:`\Gamma_{ii}`; each pair {i, j}
    (i < j), :math:`\Gamma_{ij} + \Gamma_{ji}` (``pair_value="sum"``: the
    pair's whole share for IH, EH and layer IH, which split it into two equal
    halves) or :math:`\Gamma_{ij}` (``"entry"``: for CD interactions, whose
    off-diagonal entry already is the pair's interaction, and for Hessians).
    With IH/EH and ``baseline_value`` = f(x'), the exported values sum to f(x)
    (completeness), which shapiq's force and waterfall plots show.

    Args:
        interactions (Tensor, array, nested tuple or DatasetExplanation): a
            (D, D) matrix, an (N, D, D) batch (grouped results: (N, G, G)), the
            nested layout of tuple inputs, or an ``explain_dataset`` result (its
            mean interactions).
        example (int, optional): which example of a batch to export. None
            exports every example: one ``InteractionValues`` for a single
            example, a list of N otherwise (shapiq's ``bar_plot`` and
            ``beeswarm``-style plots take lists). Default: None
        baseline_value (float, Tensor or array, optional): the value of the
            empty coalition, e.g. f(x') (a scalar, or one per example).
            Default: 0.0
        pair_value (str, optional): ``"sum"`` or ``"entry"``, see above.
            Default: "sum"
        index (str, optional): the label stored as ``InteractionValues.index``.
            Our values are not one of shapiq's game-theoretic indices, so the
            default is the neutral ``"captum_interactions"``. Default:
            "captum_interactions"
        estimated (bool, optional): stored as ``estimated`` (True for Monte
            Carlo methods such as EH and SmoothHess). Default: True
        estimation_budget (int, optional): stored as ``estimation_budget``
            (e.g. the model evaluations spent). Default: None

    Returns:
        **values** (shapiq.InteractionValues or list of them): ``n_players`` = D,
        ``min_order`` = 0, ``max_order`` = 2, every subset of size <= 2 present.

    Examples::

        >>> import shapiq
        >>> gamma = IntegratedHessians(model).attribute(x, baselines=x0)  # (N, D, D)
        >>> iv = to_shapiq(gamma, example=0, baseline_value=float(model(x0)))
        >>> shapiq.network_plot(iv, feature_names=names)
    """
    shapiq = _import_shapiq()
    check_pair_value(pair_value)
    if not isinstance(index, str) or not index:
        raise TypeError(f"`index` must be a non-empty string, got {index!r}")
    batch = as_batch(interactions)
    n, d = batch.shape[0], batch.shape[1]
    if d == 0:
        raise ValueError("`interactions` has no features (D = 0)")
    bad = (~torch.isfinite(batch).reshape(n, -1).all(dim=1)).nonzero().flatten().tolist()
    if example is not None:
        if isinstance(example, bool) or not isinstance(example, (int, np.integer)) or not (
            -n <= example < n
        ):
            raise ValueError(f"`example` must be an integer in [0, {n}), got {example!r}")
        example = int(example) % n
    chosen = [example] if example is not None else list(range(n))
    bad = [k for k in bad if k in chosen]
    if bad:
        raise ValueError(
            f"`interactions` has NaN or infinite values in example(s) {bad[:10]}; "
            "shapiq's plots need finite values (export the finite examples)"
        )
    baselines = torch.as_tensor(np.asarray(
        baseline_value.detach().cpu() if isinstance(baseline_value, Tensor) else baseline_value,
        dtype=np.float64)).flatten()
    if baselines.numel() not in (1, n) or not torch.isfinite(baselines).all():
        raise ValueError(
            f"`baseline_value` must be a finite number or {n} numbers (one per example), "
            f"got {baselines.numel()} values"
        )
    pairs = pair_matrix(batch, pair_value)
    rows, cols = torch.triu_indices(d, d, offset=1)
    out: List[Any] = []
    for k in chosen:
        base = float(baselines[k if baselines.numel() > 1 else 0])
        values = {(): base}
        diag = torch.diagonal(pairs[k])
        for i in range(d):
            values[(i,)] = float(diag[i])
        upper = pairs[k][rows, cols]
        for i, j, v in zip(rows.tolist(), cols.tolist(), upper.tolist()):
            values[(i, j)] = float(v)
        with warnings.catch_warnings():
            if index == DEFAULT_INDEX:  # known not to be a shapiq index: say nothing
                warnings.filterwarnings("ignore", message=".*not a valid interaction index.*")
            out.append(shapiq.InteractionValues(
                values, index=index, max_order=2, min_order=0, n_players=d,
                baseline_value=base, estimated=estimated,
                estimation_budget=estimation_budget,
            ))
    return out[0] if len(out) == 1 else out


def from_shapiq(values: Any, pair_value: str = "sum") -> Tensor:
    r"""
    Convert a shapiq ``InteractionValues`` back to a (D, D) interaction matrix.

    Orders 1 and 2 become a float64 matrix in this library's layout: main
    effects on the diagonal, each pair's value
    split into two equal halves :math:`\Gamma_{ij} = \Gamma_{ji}`
    (``pair_value="sum"``) or stored whole in both entries (``"entry"``). The
    inverse of :func:`to_shapiq` on symmetric matrices. Orders above 2 are
    not representable and raise.

    Args:
        values (shapiq.InteractionValues): the values to convert.
        pair_value (str, optional): ``"sum"`` or ``"entry"``. Default: "sum"

    Returns:
        **matrix** (Tensor): shape (D, D), D = ``values.n_players``.

    Examples::

        >>> matrix = from_shapiq(to_shapiq(gamma, example=0))  # == gamma[0]
    """
    check_pair_value(pair_value)
    if not hasattr(values, "dict_values") or not hasattr(values, "n_players"):
        raise TypeError(f"`values` must be a shapiq InteractionValues, got {type(values).__name__}")
    d = int(values.n_players)
    matrix = torch.zeros(d, d, dtype=torch.float64)
    for players, value in values.dict_values.items():
        if len(players) == 1:
            matrix[players[0], players[0]] = float(value)
        elif len(players) == 2:
            i, j = players
            half = float(value) / 2.0 if pair_value == "sum" else float(value)
            matrix[i, j] = matrix[j, i] = half
        elif len(players) > 2 and float(value) != 0.0:
            raise ValueError(
                f"`values` holds an order-{len(players)} interaction {players}; a (D, D) "
                "matrix holds orders 1 and 2 only"
            )
    return matrix
