#!/usr/bin/env python3
r"""
Text plots for token x token interactions (e.g. from
:class:`~captum_interactions.LayerIntegratedHessians` on an embedding layer).

Captum's conventions: matplotlib functions return ``(figure, axis)`` and take
``plt_fig_axis`` (draw into an existing figure) and ``use_pyplot`` (True:
create the figure with pyplot and call ``plt.show()``; False: a standalone
``matplotlib.figure.Figure``). Colours: green positive, red negative, on a
scale symmetric around 0.

- :func:`visualize_token_interactions`: heatmap with token labels, the
  diagonal (main effects) optionally masked.
- :func:`visualize_top_token_pairs`: the k most interacting token pairs.
- :func:`token_row_sums_record` / :func:`visualize_token_row_sums`: the row
  sums (each token's total attribution, its Integrated Gradients) through
  Captum's ``VisualizationDataRecord`` and ``visualize_text``.

This module is self-contained (no import from other plotting modules).
"""
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

__all__ = [
    "visualize_token_interactions",
    "visualize_top_token_pairs",
    "token_row_sums_record",
    "visualize_token_row_sums",
]

ArrayLike = Union[Tensor, np.ndarray, Sequence[Any]]


from captum_interactions.visualization import (  # noqa: E402
    _create_figure,
    _finish,
    _pair_bars,
    _symmetric_limit,
    interaction_cmap,
)


def _token_matrix(interactions: ArrayLike, tokens: Sequence[str]) -> np.ndarray:
    """(T, T) or (1, T, T) -> numpy (T, T), checked against the tokens."""
    if isinstance(interactions, Tensor):
        matrix = interactions.detach().to("cpu", torch.float64).numpy()
    else:
        matrix = np.asarray(interactions, dtype=np.float64)
    if matrix.ndim == 3 and matrix.shape[0] == 1:
        matrix = matrix[0]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            "`interactions` must be one token x token matrix, (T, T) or (1, T, T); "
            f"got shape {matrix.shape}"
        )
    if len(tokens) != matrix.shape[0]:
        raise ValueError(
            f"`tokens` has {len(tokens)} entries but `interactions` is "
            f"{matrix.shape[0]} x {matrix.shape[1]}"
        )
    return matrix


def visualize_token_interactions(
    interactions: ArrayLike,
    tokens: Sequence[str],
    mask_diagonal: bool = False,
    annotate: bool = False,
    value_format: str = "{:.2f}",
    cmap: Any = None,
    show_colorbar: bool = True,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Axes]] = None,
    fig_size: Tuple[float, float] = (6, 5),
    use_pyplot: bool = True,
) -> Tuple[Figure, Axes]:
    r"""
    Heatmap of token x token interactions with the tokens as labels.

    Args:
        interactions (Tensor or array): (T, T) or (1, T, T); row = the token
            explained, column = the token it interacts with.
        tokens (sequence of str): the T token (or word) labels.
        mask_diagonal (bool, optional): grey out the diagonal (main effects),
            so that the colour scale shows the interactions only.
            Default: False
        annotate (bool, optional): write every shown value in its cell.
            Default: False
        value_format (str, optional): format of annotations. Default: "{:.2f}"
        cmap (str or Colormap, optional): colour map. Default: red-white-green
        show_colorbar (bool, optional): add a colour bar. Default: True
        title (str, optional): axis title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis) to draw into.
            Default: None
        fig_size (tuple, optional): size of a new figure. Default: (6, 5)
        use_pyplot (bool, optional): create the figure with pyplot and call
            ``plt.show()``. Default: True

    Returns:
        (**figure**, **axis**)

    Examples::

        >>> gamma = LayerIntegratedHessians(model, emb).attribute(ids, baselines=base)
        >>> fig, ax = visualize_token_interactions(gamma[0], tokens, mask_diagonal=True)
    """
    matrix = _token_matrix(interactions, tokens)
    size = matrix.shape[0]
    shown = np.ma.masked_invalid(matrix.copy())
    if mask_diagonal:
        shown[np.arange(size), np.arange(size)] = np.ma.masked
    limit = _symmetric_limit(shown.filled(np.nan))
    fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size)
    image = ax.imshow(shown, cmap=cmap if cmap is not None else interaction_cmap(), vmin=-limit,
                      vmax=limit, aspect="auto", interpolation="nearest")
    labels = [str(t) for t in tokens]
    ax.set_xticks(range(size))
    ax.set_xticklabels(labels, rotation=90, fontsize=8 if size > 20 else 10)
    ax.set_yticks(range(size))
    ax.set_yticklabels(labels, fontsize=8 if size > 20 else 10)
    ax.set_xlabel("interacting token")
    ax.set_ylabel("explained token")
    if annotate:
        for r in range(size):
            for c in range(size):
                if not np.ma.is_masked(shown[r, c]):
                    ax.text(c, r, value_format.format(matrix[r, c]), ha="center",
                            va="center", fontsize=7)
    if show_colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("interaction")
    if title:
        ax.set_title(title)
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def top_token_pairs(
    interactions: ArrayLike, tokens: Sequence[str], k: int = 10, include_diagonal: bool = False
) -> List[Tuple[int, int, float]]:
    """The k pairs (i, j), i <= j, of largest |interaction|, strongest first.

    A pair's value is the whole interaction of the two tokens,
    Gamma_ij + Gamma_ji (2 Gamma_ij for a symmetric matrix); a diagonal entry
    (with ``include_diagonal``) is the main effect Gamma_ii.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    matrix = _token_matrix(interactions, tokens)
    rows, cols = np.triu_indices(matrix.shape[0], 0 if include_diagonal else 1)
    values = np.where(rows == cols, matrix[rows, cols], matrix[rows, cols] + matrix[cols, rows])
    order = np.argsort(-np.abs(values), kind="stable")[:k]
    return [(int(rows[o]), int(cols[o]), float(values[o])) for o in order]


def visualize_top_token_pairs(
    interactions: ArrayLike,
    tokens: Sequence[str],
    k: int = 10,
    include_diagonal: bool = False,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Axes]] = None,
    fig_size: Tuple[float, float] = (6, 4),
    use_pyplot: bool = True,
) -> Tuple[Figure, Axes]:
    r"""
    Horizontal bar chart of the k most interacting token pairs (strongest on
    top; green positive, red negative). See :func:`top_token_pairs` for the
    value of a pair.

    Args:
        interactions (Tensor or array): (T, T) or (1, T, T).
        tokens (sequence of str): the T token labels.
        k (int, optional): number of pairs (fewer if there are fewer).
            Default: 10
        include_diagonal (bool, optional): rank the main effects too.
            Default: False
        title (str, optional): axis title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis) to draw into.
            Default: None
        fig_size (tuple, optional): size of a new figure. Default: (6, 4)
        use_pyplot (bool, optional): create the figure with pyplot and call
            ``plt.show()``. Default: True

    Returns:
        (**figure**, **axis**)
    """
    pairs = top_token_pairs(interactions, tokens, k, include_diagonal)
    labels = [
        str(tokens[i]) if i == j else f"{tokens[i]} \u00d7 {tokens[j]}" for i, j, _ in pairs
    ]
    values = np.array([v for _, _, v in pairs])
    fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size)
    _pair_bars(ax, values, labels, "interaction")  # strongest at the top
    if title:
        ax.set_title(title)
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def token_row_sums_record(
    interactions: ArrayLike,
    tokens: Sequence[str],
    pred_prob: float = 0.0,
    pred_class: Any = "",
    true_class: Any = "",
    attr_class: Any = "",
    convergence_score: float = 0.0,
    normalize: bool = True,
) -> Any:
    """Captum's ``VisualizationDataRecord`` of the row sums of a token matrix.

    The row sums of Integrated Hessians are each token's Integrated Gradients;
    ``attr_score`` is their total (f(x) - f(x') up to the completeness error).
    With ``normalize`` the word colours are scaled by the largest |row sum|
    (``visualize_text`` expects values in [-1, 1]).
    """
    from captum.attr import visualization as captum_viz

    matrix = _token_matrix(interactions, tokens)
    row_sums = matrix.sum(axis=1)
    total = float(row_sums.sum())
    if normalize:
        row_sums = row_sums / _symmetric_limit(row_sums)
    return captum_viz.VisualizationDataRecord(
        torch.as_tensor(row_sums), pred_prob, pred_class, true_class, attr_class,
        total, [str(t) for t in tokens], convergence_score,
    )


def visualize_token_row_sums(
    interactions: Union[ArrayLike, Sequence[ArrayLike]],
    tokens: Union[Sequence[str], Sequence[Sequence[str]]],
    legend: bool = True,
    **record_kwargs: Any,
) -> Any:
    """Row sums of one or several token matrices, as Captum's ``visualize_text``.

    Args:
        interactions: one (T, T) matrix, or a list of them (one row each).
        tokens: its tokens, or one list of tokens per matrix.
        legend (bool, optional): show Captum's legend. Default: True
        **record_kwargs: passed to :func:`token_row_sums_record` (``pred_prob``,
            ``pred_class``, ``true_class``, ``attr_class``, ``convergence_score``).

    Returns:
        The ``IPython.display.HTML`` object that ``visualize_text`` returns (its
        ``.data`` is the HTML string); needs IPython, as Captum's function does.
    """
    from captum.attr import visualization as captum_viz

    if isinstance(tokens[0], str):
        matrices, token_lists = [interactions], [tokens]
    else:
        matrices, token_lists = list(interactions), list(tokens)  # type: ignore[arg-type]
    records = [
        token_row_sums_record(m, t, **record_kwargs) for m, t in zip(matrices, token_lists)
    ]
    return captum_viz.visualize_text(records, legend=legend)
