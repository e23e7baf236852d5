#!/usr/bin/env python3
r"""
Plots for interaction attributions, in Captum's conventions.

Every function returns ``(figure, axis)`` (or ``(figure, axes)`` for several
panels), takes ``plt_fig_axis`` to draw into an existing figure and
``use_pyplot`` (True: create the figure with ``pyplot`` and call
``plt.show()``; False: a standalone ``matplotlib.figure.Figure``, for scripts
and servers). Colours follow Captum: green for positive, red for negative, on a
colour scale symmetric around 0, so white always means "no interaction".

Functions:

- :func:`visualize_interaction_matrix`: heatmap of one interaction matrix.
- :func:`visualize_top_interactions`: bar chart of the strongest pairs.
- :func:`visualize_interaction_scatter`: dependence plot over a dataset
  (Janizek et al.): interaction of i with j against the value of i, coloured
  by the value of j.
- :func:`visualize_image_interactions`: the interactions of one pixel (or
  patch) with every other one, over the image (Captum's
  ``visualize_image_attr``).
- :func:`visualize_taylor`: a 1-D or 2-D slice of a function against its
  Taylor polynomials of several orders.
- :func:`visualize_hierarchy`: the levels of an ACD hierarchy.
"""
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap, Normalize, to_rgba
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

__all__ = [
    "visualize_interaction_matrix",
    "visualize_top_interactions",
    "visualize_interaction_scatter",
    "visualize_image_interactions",
    "visualize_taylor",
    "visualize_hierarchy",
]

ArrayLike = Union[Tensor, np.ndarray, Sequence[Any]]
FigureAxis = Tuple[Figure, Any]

#: Captum's diverging map (``sign="all"`` in ``captum.attr.visualization``).
POSITIVE_COLOR = "green"
NEGATIVE_COLOR = "red"


def interaction_cmap() -> LinearSegmentedColormap:
    """Red (negative) - white (0) - green (positive), as Captum's ``sign="all"``."""
    cmap = LinearSegmentedColormap.from_list("RdWhGn", [NEGATIVE_COLOR, "white", POSITIVE_COLOR])
    return cmap.with_extremes(bad="lightgrey")


#: Outline of the image's ink drawn over ACD regions (a colour the region map never uses).
INK_OUTLINE_COLOR = "blue"


def readable_text_color(background: Any) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with ``background``
    (any matplotlib colour), by WCAG relative luminance (threshold 0.179)."""
    channels = []
    for value in to_rgba(background)[:3]:
        channels.append(value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4)
    luminance = 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]
    return "black" if luminance > 0.179 else "white"


def _pair_bars(ax: Any, values: Sequence[float], labels: Sequence[str], xlabel: str) -> None:
    """Horizontal bars, the first value at the top, green positive / red negative."""
    positions = np.arange(len(values))[::-1]
    ax.barh(positions, values,
            color=[POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in values])
    ax.set_yticks(positions)
    ax.set_yticklabels(labels)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)


def _to_numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a tensor or an array of numbers, got {type(values).__name__}"
        ) from None
    return array


def _squeeze_batch(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """Drop a leading batch dimension of size 1 (a single explained example)."""
    if array.ndim == ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != ndim:
        raise ValueError(
            f"`{name}` must have {ndim} dimensions (or a leading batch dimension of "
            f"size 1), got shape {tuple(array.shape)}"
        )
    return array


def _names(names: Optional[Sequence[str]], count: int, name: str, prefix: str = "x") -> List[str]:
    if names is None:
        return [f"{prefix}{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"`{name}` must have {count} entries, got {len(names)}")
    return names


def _create_figure(
    plt_fig_axis: Optional[Tuple[Figure, Any]],
    use_pyplot: bool,
    fig_size: Tuple[float, float],
    nrows: int = 1,
    ncols: int = 1,
) -> Tuple[Figure, Any]:
    if plt_fig_axis is not None:
        return plt_fig_axis
    if use_pyplot:
        return plt.subplots(nrows, ncols, figsize=fig_size, squeeze=nrows * ncols == 1)
    fig = Figure(figsize=fig_size)
    axes = fig.subplots(nrows, ncols, squeeze=nrows * ncols == 1)
    return fig, axes


def _finish(fig: Figure, use_pyplot: bool, plt_fig_axis: Any) -> None:
    if plt_fig_axis is None:
        fig.tight_layout()
    if use_pyplot:
        plt.show()


def _symmetric_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def _tick_step(count: int, max_labels: int) -> int:
    return max(1, int(np.ceil(count / max_labels)))


def visualize_interaction_matrix(
    interactions: ArrayLike,
    feature_names: Optional[Sequence[str]] = None,
    column_names: Optional[Sequence[str]] = None,
    mask_diagonal: bool = False,
    annotate_top_k: int = 0,
    value_format: str = "{:.2g}",
    cmap: Any = None,
    show_colorbar: bool = True,
    max_tick_labels: int = 40,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Axes]] = None,
    fig_size: Tuple[float, float] = (6, 5),
    use_pyplot: bool = True,
) -> Tuple[Figure, Axes]:
    r"""
    Heatmap of one interaction matrix (row = the feature explained, column =
    the feature it interacts with), green positive, red negative, colour scale
    symmetric around 0.

    Args:
        interactions (Tensor or array): (D, D) or (R, C) matrix, or (1, R, C)
            for one explained example (e.g. ``ih.attribute(x[:1])``; token x
            token for text, group x group with ``feature_mask``).
        feature_names (sequence of str, optional): row labels (features,
            tokens, groups). Default: ``x0, x1, ...``
        column_names (sequence of str, optional): column labels, when they
            differ from the rows (a cross block ``out[i][j]`` of a tuple of
            inputs). Default: ``feature_names`` for a square matrix
        mask_diagonal (bool, optional): grey out the diagonal (the main
            effects), so that the colour scale shows the interactions only.
            Default: False
        annotate_top_k (int, optional): write the value in the k cells of
            largest magnitude (off the diagonal when it is masked; one cell per
            pair for a symmetric matrix). Default: 0
        value_format (str, optional): format of annotations. Default: "{:.2g}"
        cmap (str or Colormap, optional): colour map. Default: Captum's
            red-white-green
        show_colorbar (bool, optional): add a colour bar. Default: True
        max_tick_labels (int, optional): label at most this many rows/columns
            (every k-th one beyond). Default: 40
        title (str, optional): axis title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis) to draw into.
            Default: None (a new figure)
        fig_size (tuple, optional): size of a new figure. Default: (6, 5)
        use_pyplot (bool, optional): create the figure with pyplot and call
            ``plt.show()``. Default: True

    Returns:
        (**figure**, **axis**): the figure and the axis with the heatmap.

    Examples::

        >>> gamma = IntegratedHessians(model).attribute(x[:1])
        >>> fig, ax = visualize_interaction_matrix(gamma, ["age", "bmi", "bp"],
        ...                                        mask_diagonal=True, annotate_top_k=3)
    """
    matrix = _squeeze_batch(_to_numpy(interactions, "interactions"), 2, "interactions")
    rows, cols = matrix.shape
    row_names = _names(feature_names, rows, "feature_names")
    if column_names is None and rows == cols:
        col_names = row_names
    else:
        col_names = _names(column_names, cols, "column_names")
    if isinstance(annotate_top_k, bool) or not isinstance(annotate_top_k, int) or annotate_top_k < 0:
        raise ValueError(f"`annotate_top_k` must be an integer >= 0, got {annotate_top_k!r}")

    shown = np.ma.masked_invalid(matrix.copy())
    if mask_diagonal:
        index = np.arange(min(rows, cols))
        shown[index, index] = np.ma.masked
    limit = _symmetric_limit(shown.filled(np.nan))
    colormap = cmap if cmap is not None else interaction_cmap()

    fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size)
    image = ax.imshow(shown, cmap=colormap, vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    x_step, y_step = _tick_step(cols, max_tick_labels), _tick_step(rows, max_tick_labels)
    ax.set_xticks(range(0, cols, x_step))
    ax.set_xticklabels(col_names[::x_step], rotation=90 if cols > 6 else 0,
                       fontsize=8 if cols > 20 else 10)
    ax.set_yticks(range(0, rows, y_step))
    ax.set_yticklabels(row_names[::y_step], fontsize=8 if rows > 20 else 10)
    ax.set_xlabel("interacting feature (column)")
    ax.set_ylabel("explained feature (row)")

    if annotate_top_k:
        candidates = np.abs(shown.filled(np.nan))
        # float32 estimates are symmetric up to round-off, relative to the largest entry
        scale = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 0.0
        symmetric = rows == cols and np.allclose(matrix, matrix.T, rtol=0, atol=1e-4 * scale)
        if symmetric:  # one annotation per pair
            candidates[np.tril_indices(rows, -1)] = np.nan
        flat = np.where(np.isfinite(candidates.ravel()), candidates.ravel(), -np.inf)
        count = min(annotate_top_k, int(np.isfinite(candidates).sum()))
        for position in np.argsort(-flat, kind="stable")[:count]:
            r, c = divmod(int(position), cols)
            cell = image.cmap(image.norm(matrix[r, c]))
            ax.text(c, r, value_format.format(matrix[r, c]), ha="center", va="center",
                    fontsize=7 if max(rows, cols) > 12 else 9, color=readable_text_color(cell))
    if show_colorbar:
        colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        colorbar.set_label("interaction")
    if title:
        ax.set_title(title)
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def _pair_values(
    matrix: np.ndarray, include_diagonal: bool, combine_symmetric: bool
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    size = matrix.shape[0]
    i, j = np.triu_indices(size, 0 if include_diagonal else 1)
    values = matrix[i, j]
    if combine_symmetric:
        values = np.where(i == j, values, matrix[i, j] + matrix[j, i])
    return i, j, values


def _aggregate(array: np.ndarray, aggregate: str, name: str) -> np.ndarray:
    if array.ndim == 3:
        if aggregate == "mean":
            return array.mean(0)
        if aggregate == "mean_abs":
            return np.abs(array).mean(0)
        raise ValueError(f"`aggregate` must be 'mean' or 'mean_abs', got {aggregate!r}")
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be a (D, D) matrix or an (N, D, D) batch, got shape {array.shape}"
        )
    return array


def visualize_top_interactions(
    interactions: ArrayLike,
    feature_names: Optional[Sequence[str]] = None,
    k: int = 10,
    include_diagonal: bool = False,
    combine_symmetric: bool = True,
    aggregate: str = "mean",
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Axes]] = None,
    fig_size: Optional[Tuple[float, float]] = None,
    use_pyplot: bool = True,
) -> Tuple[Figure, Axes]:
    r"""
    Horizontal bar chart of the ``k`` strongest pairwise interactions, largest
    magnitude at the top, green bars for positive and red for negative values.

    Args:
        interactions (Tensor or array): a square (D, D) matrix, or an
            (N, D, D) batch that is reduced over examples with ``aggregate``.
        feature_names (sequence of str, optional): D names. Default: x0, x1, ...
        k (int, optional): number of pairs shown. Default: 10
        include_diagonal (bool, optional): also rank the main effects
            (shown as "x_i (main)"). Default: False
        combine_symmetric (bool, optional): a pair's bar is
            :math:`\Gamma_{ij} + \Gamma_{ji}`, its whole share of
            f(x) - f(x'); False shows :math:`\Gamma_{ij}` (i < j) alone.
            Default: True
        aggregate (str, optional): for a batch, ``"mean"`` (signed average)
            or ``"mean_abs"`` (average magnitude, a global importance).
            Default: "mean"
        title (str, optional): axis title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis) to draw into.
            Default: None
        fig_size (tuple, optional): size of a new figure. Default: grows with k
        use_pyplot (bool, optional): create the figure with pyplot and call
            ``plt.show()``. Default: True

    Returns:
        (**figure**, **axis**)

    Examples::

        >>> gamma = IntegratedHessians(model).attribute(x)  # (N, D, D)
        >>> fig, ax = visualize_top_interactions(gamma, names, k=5, aggregate="mean_abs")
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    matrix = _aggregate(_to_numpy(interactions, "interactions"), aggregate, "interactions")
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`interactions` must be square, got shape {matrix.shape}")
    names = _names(feature_names, matrix.shape[0], "feature_names")
    i, j, values = _pair_values(matrix, include_diagonal, combine_symmetric)
    order = np.argsort(-np.abs(values), kind="stable")[:k]
    labels = [
        f"{names[a]} (main)" if a == b else f"{names[a]} \u00d7 {names[b]}"
        for a, b in zip(i[order], j[order])
    ]
    shown = values[order]
    if fig_size is None:
        fig_size = (6, 1.0 + 0.35 * len(order))
    fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size)
    _pair_bars(ax, shown, labels, "mean |interaction|"
               if aggregate == "mean_abs" and np.ndim(interactions) == 3 else "interaction")
    ax.set_ylabel("feature pair")
    if title:
        ax.set_title(title)
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def visualize_interaction_scatter(
    interactions: ArrayLike,
    inputs: ArrayLike,
    feature: int,
    interacting_feature: int,
    feature_names: Optional[Sequence[str]] = None,
    combine_symmetric: bool = True,
    cmap: Any = "coolwarm",
    point_size: float = 12.0,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Axes]] = None,
    fig_size: Tuple[float, float] = (6, 4),
    use_pyplot: bool = True,
) -> Tuple[Figure, Axes]:
    r"""
    Interaction dependence plot (Janizek et al., Fig. 5): over a dataset, the
    interaction of ``feature`` i with ``interacting_feature`` j (y) against the
    value of feature i (x), each point coloured by the value of feature j.

    Args:
        interactions (Tensor or array): (N, D, D) interactions of N examples.
        inputs (Tensor or array): (N, D) the explained inputs.
        feature (int): i, on the horizontal axis.
        interacting_feature (int): j, the colour.
        feature_names (sequence of str, optional): D names. Default: x0, ...
        combine_symmetric (bool, optional): plot
            :math:`\Gamma_{ij} + \Gamma_{ji}` (the pair's share of the output
            change) instead of :math:`\Gamma_{ij}`. Default: True
        cmap (str or Colormap, optional): colour map of the feature j values
            (values, not attributions, hence not Captum's red/green).
            Default: "coolwarm"
        point_size (float, optional): marker area. Default: 12
        title (str, optional): axis title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis). Default: None
        fig_size (tuple, optional): size of a new figure. Default: (6, 4)
        use_pyplot (bool, optional): pyplot figure + ``plt.show()``.
            Default: True

    Returns:
        (**figure**, **axis**)

    Examples::

        >>> gamma = ExpectedHessians(model).attribute(x, baselines=x_train)
        >>> fig, ax = visualize_interaction_scatter(gamma, x, 2, 8, names)
    """
    gamma = _to_numpy(interactions, "interactions")
    values = _to_numpy(inputs, "inputs")
    if gamma.ndim != 3 or gamma.shape[1] != gamma.shape[2]:
        raise ValueError(f"`interactions` must have shape (N, D, D), got {gamma.shape}")
    values = values.reshape(values.shape[0], -1)
    if values.shape != gamma.shape[:2]:
        raise ValueError(
            f"`inputs` must have shape (N, D) = {gamma.shape[:2]}, got {values.shape}"
        )
    num_features = gamma.shape[1]
    for name, index in (("feature", feature), ("interacting_feature", interacting_feature)):
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
            0 <= index < num_features
        ):
            raise ValueError(f"`{name}` must be an integer in [0, {num_features}), got {index!r}")
    names = _names(feature_names, num_features, "feature_names")
    y = gamma[:, feature, interacting_feature]
    if combine_symmetric and feature != interacting_feature:
        y = y + gamma[:, interacting_feature, feature]
    fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size)
    points = ax.scatter(values[:, feature], y, c=values[:, interacting_feature], cmap=cmap,
                        s=point_size, edgecolors="none")
    ax.axhline(0.0, color="grey", lw=0.8, zorder=0)
    colorbar = fig.colorbar(points, ax=ax)
    colorbar.set_label(f"value of {names[interacting_feature]}")
    ax.set_xlabel(f"value of {names[feature]}")
    ax.set_ylabel(f"interaction {names[feature]} \u00d7 {names[interacting_feature]}")
    if title:
        ax.set_title(title)
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def _image_hwc(image: np.ndarray) -> np.ndarray:
    """(C, H, W), (H, W, C) or (H, W) -> (H, W, C) in [0, 1] for display."""
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = np.transpose(image, (1, 2, 0))
    elif image.ndim != 3:
        raise ValueError(f"`image` must be (H, W), (C, H, W) or (H, W, C), got {image.shape}")
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def visualize_image_interactions(
    interactions: ArrayLike,
    image: ArrayLike,
    pixel: Union[int, Tuple[int, int]],
    feature_mask: Optional[ArrayLike] = None,
    mask_self: bool = True,
    method: str = "blended_heat_map",
    outlier_perc: Union[int, float] = 2,
    alpha_overlay: float = 0.6,
    show_colorbar: bool = True,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Axes]] = None,
    fig_size: Tuple[float, float] = (5, 5),
    use_pyplot: bool = True,
) -> Tuple[Figure, Axes]:
    r"""
    The interactions of one pixel (or one patch of ``feature_mask``) with every
    other pixel, drawn over the image with Captum's ``visualize_image_attr``
    (``sign="all"``: green where the interaction is positive, red where
    negative). The chosen pixel/patch is outlined in blue.

    Args:
        interactions (Tensor or array): one example's interactions: (H, W, H, W)
            or (C, H, W, C, H, W) for image input of shape (C, H, W) (channels
            are summed), or (G, G) group interactions with ``feature_mask``.
            A leading batch dimension of size 1 is dropped.
        image (Tensor or array): the image, (H, W), (C, H, W) or (H, W, C).
        pixel (tuple[int, int] or int): (row, column) of the pixel whose
            interaction row is shown; with ``feature_mask``, the group id.
        feature_mask (Tensor or array, optional): (H, W) (or broadcastable
            (1, H, W), (1, 1, H, W)) integer group ids used for
            ``interactions``; groups are in sorted id order. Default: None
        mask_self (bool, optional): leave out the pixel's own entry (its main
            effect, which usually dwarfs the interactions). Default: True
        method (str, optional): Captum's ``visualize_image_attr`` method:
            ``"blended_heat_map"`` or ``"heat_map"``.
            Default: "blended_heat_map"
        outlier_perc (float, optional): Captum's outlier percentage for the
            colour scale. Default: 2
        alpha_overlay (float, optional): heat map opacity over the image.
            Default: 0.6
        show_colorbar (bool, optional): Captum's colour bar. Default: True
        title (str, optional): axis title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis). Default: None
        fig_size (tuple, optional): size of a new figure. Default: (5, 5)
        use_pyplot (bool, optional): pyplot figure + ``plt.show()``.
            Default: True

    Returns:
        (**figure**, **axis**)

    Examples::

        >>> patches = (torch.arange(8)[:, None] // 2) * 4 + torch.arange(8)[None] // 2
        >>> gamma = IntegratedHessians(model).attribute(img[None], feature_mask=patches)
        >>> fig, ax = visualize_image_interactions(gamma, img, pixel=5, feature_mask=patches)
    """
    from captum.attr import visualization as captum_viz

    gamma = _to_numpy(interactions, "interactions")
    picture = _to_numpy(image, "image")
    if picture.ndim == 4 and picture.shape[0] == 1:
        picture = picture[0]
    picture = _image_hwc(picture)
    height, width = picture.shape[:2]
    if feature_mask is not None:
        mask = _to_numpy(feature_mask, "feature_mask").astype(np.int64)
        mask = mask.reshape(mask.shape[-2:]) if mask.size == height * width else mask
        if mask.shape != (height, width):
            raise ValueError(
                f"`feature_mask` must broadcast to the image's (H, W) = {(height, width)}, "
                f"got shape {np.shape(feature_mask)}"
            )
        ids = np.unique(mask)
        gamma = _squeeze_batch(gamma, 2, "interactions")
        if gamma.shape != (len(ids), len(ids)):
            raise ValueError(
                f"`interactions` must be ({len(ids)}, {len(ids)}) for the {len(ids)} groups "
                f"of `feature_mask`, got shape {gamma.shape}"
            )
        if not isinstance(pixel, (int, np.integer)) or pixel not in set(ids.tolist()):
            raise ValueError(f"`pixel` must be one of the group ids {ids.tolist()}, got {pixel!r}")
        row = gamma[int(np.searchsorted(ids, pixel))]
        if mask_self:
            row = row.copy()
            row[int(np.searchsorted(ids, pixel))] = 0.0
        attr = row[np.searchsorted(ids, mask)]
        selected = mask == pixel
    else:
        if gamma.ndim in (5, 7) and gamma.shape[0] == 1:
            gamma = gamma[0]
        if gamma.ndim == 6:  # (C, H, W, C, H, W): sum the pixel's channels and the others'
            gamma = gamma.sum(axis=(0, 3))
        if gamma.shape != (height, width, height, width):
            raise ValueError(
                f"`interactions` must be (H, W, H, W) or (C, H, W, C, H, W) for an image of "
                f"size {(height, width)}, got shape {gamma.shape}"
            )
        if (
            not isinstance(pixel, tuple) or len(pixel) != 2
            or not (0 <= pixel[0] < height and 0 <= pixel[1] < width)
        ):
            raise ValueError(f"`pixel` must be a (row, column) inside {(height, width)}, got {pixel!r}")
        attr = gamma[pixel[0], pixel[1]].copy()
        if mask_self:
            attr[pixel[0], pixel[1]] = 0.0
        selected = np.zeros((height, width), dtype=bool)
        selected[pixel[0], pixel[1]] = True

    fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size)
    captum_viz.visualize_image_attr(
        attr[:, :, None], picture, method=method, sign="all", plt_fig_axis=(fig, ax),
        outlier_perc=outlier_perc, alpha_overlay=alpha_overlay, show_colorbar=show_colorbar,
        title=title, use_pyplot=False,
    )
    rows, cols = np.nonzero(selected)
    ax.add_patch(Rectangle((cols.min() - 0.5, rows.min() - 0.5), cols.max() - cols.min() + 1,
                           rows.max() - rows.min() + 1, fill=False, edgecolor="blue", lw=2))
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def _taylor_callables(
    taylor: Any, orders: Optional[Sequence[int]]
) -> List[Tuple[str, Callable[[Tensor], Tensor]]]:
    if hasattr(taylor, "truncate") and hasattr(taylor, "evaluate"):  # a TaylorPolynomial
        if len(taylor) != 1:
            raise ValueError(
                f"`taylor` holds {len(taylor)} polynomials; pass one (taylor[n])"
            )
        if orders is None:
            orders = range(1, taylor.order + 1)
        out = []
        for k in orders:
            poly = taylor.truncate(int(k))
            out.append((f"order {k}", lambda x, p=poly: p.evaluate(x.unsqueeze(0))[0]))
        return out
    if isinstance(taylor, Mapping):
        keys = list(taylor.keys()) if orders is None else list(orders)
        missing = [k for k in keys if k not in taylor]
        if missing:
            raise ValueError(f"`orders` {missing} are not keys of `taylor`")
        return [(f"order {k}" if isinstance(k, int) else str(k), taylor[k]) for k in keys]
    raise TypeError(
        "`taylor` must be a TaylorPolynomial (HOPE) or a mapping {order or label: callable}, "
        f"got {type(taylor).__name__}"
    )


def _evaluate(func: Callable, points: Tensor, name: str) -> np.ndarray:
    with torch.no_grad():
        values = func(points)
    values = _to_numpy(values, name).reshape(-1)
    if values.size != points.shape[0]:
        raise ValueError(
            f"`{name}` must return one value per point ({points.shape[0]}), got {values.size}"
        )
    return values


def visualize_taylor(
    func: Callable[[Tensor], Tensor],
    taylor: Any,
    center: Optional[ArrayLike] = None,
    orders: Optional[Sequence[Any]] = None,
    dims: Optional[Sequence[int]] = None,
    span: Union[float, Sequence[float]] = 1.0,
    num_points: int = 101,
    feature_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Any]] = None,
    fig_size: Optional[Tuple[float, float]] = None,
    use_pyplot: bool = True,
) -> Tuple[Figure, Any]:
    r"""
    A function against its Taylor polynomials of several orders, along one
    variable (lines) or two (filled contours, one panel per order on a shared
    colour scale), the other variables fixed at ``center``.

    Args:
        func (Callable): f, mapping a (P, p) tensor of points to P values (wrap
            a model: ``lambda z: model(z)[:, target]``).
        taylor (TaylorPolynomial or Mapping): the polynomials: HOPE's
            ``TaylorPolynomial`` of one example (truncated to each of
            ``orders``), or a mapping ``{order or label: callable}`` with the
            same calling convention as ``func``.
        center (Tensor or array, optional): (p,) expansion point, the middle
            of the plotted slice. Default: the TaylorPolynomial's center
        orders (sequence, optional): which orders (keys of the mapping) to
            draw. Default: 1..K, or every key
        dims (sequence of int, optional): the 1 or 2 variables varied.
            Default: (0,) for p = 1, else (0, 1)
        span (float or sequence of float, optional): half-width of the slice
            along each varied variable. Default: 1.0
        num_points (int, optional): grid points per varied variable.
            Default: 101
        feature_names (sequence of str, optional): p variable names.
            Default: x0, x1, ...
        title (str, optional): figure title. Default: None
        plt_fig_axis (tuple, optional): (figure, axis) for the 1-D plot.
            Default: None
        fig_size (tuple, optional): figure size. Default: (6, 4) in 1-D, one
            3-inch panel per plot in 2-D
        use_pyplot (bool, optional): pyplot figure + ``plt.show()``.
            Default: True

    Returns:
        (**figure**, **axis**) in 1-D; (**figure**, **axes**) in 2-D, one
        panel for f and one per order.

    Examples::

        >>> f = lambda z: torch.sin(z[:, 0])
        >>> taylor = {1: lambda z: z[:, 0], 3: lambda z: z[:, 0] - z[:, 0] ** 3 / 6}
        >>> fig, ax = visualize_taylor(f, taylor, center=torch.zeros(1), span=3.0)
    """
    curves = _taylor_callables(taylor, orders)
    if center is None:
        if not hasattr(taylor, "center"):
            raise ValueError("`center` is required unless `taylor` is a TaylorPolynomial")
        center = taylor.center[0]
    center_t = torch.as_tensor(_to_numpy(center, "center").reshape(-1), dtype=torch.float64)
    if hasattr(taylor, "coefficients"):
        center_t = center_t.to(taylor.coefficients.dtype)
    num_vars = center_t.numel()
    if dims is None:
        dims = (0,) if num_vars == 1 else (0, 1)
    dims = tuple(int(d) for d in dims)
    if len(dims) not in (1, 2) or any(not 0 <= d < num_vars for d in dims):
        raise ValueError(f"`dims` must be 1 or 2 variable indices in [0, {num_vars}), got {dims}")
    spans = np.broadcast_to(np.asarray(span, dtype=np.float64), (len(dims),))
    names = _names(feature_names, num_vars, "feature_names")
    if hasattr(taylor, "feature_names") and feature_names is None:
        names = list(taylor.feature_names)
    axes_values = [
        np.linspace(float(center_t[d]) - s, float(center_t[d]) + s, num_points)
        for d, s in zip(dims, spans)
    ]
    grid = np.meshgrid(*axes_values, indexing="ij")
    points = center_t.repeat(grid[0].size, 1)
    for d, values in zip(dims, grid):
        points[:, d] = torch.as_tensor(values.reshape(-1), dtype=points.dtype)
    truth = _evaluate(func, points, "func")
    approximations = [(label, _evaluate(fn, points, f"taylor[{label}]")) for label, fn in curves]
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(1, len(curves))))

    if len(dims) == 1:
        fig, ax = _create_figure(plt_fig_axis, use_pyplot, fig_size or (6, 4))
        x = axes_values[0]
        ax.plot(x, truth, color="black", lw=2.5, label="f")
        for (label, values), color in zip(approximations, colors):
            ax.plot(x, values, "--", color=color, lw=1.6, label=label)
        ax.axvline(float(center_t[dims[0]]), color="grey", lw=0.8, ls=":")
        low, high = float(truth.min()), float(truth.max())
        pad = 0.5 * (high - low) + 1e-12
        ax.set_ylim(low - pad, high + pad)  # high orders may explode away from the center
        ax.set_xlabel(names[dims[0]])
        ax.set_ylabel("f")
        ax.legend(fontsize=8, loc="best")
        if title:
            ax.set_title(title)
        _finish(fig, use_pyplot, plt_fig_axis)
        return fig, ax

    panels = [("f", truth)] + approximations
    ncols = min(4, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = _create_figure(plt_fig_axis, use_pyplot, fig_size or (3.0 * ncols, 2.8 * nrows),
                               nrows, ncols)
    axes_flat = np.atleast_1d(axes).ravel()
    low, high = float(truth.min()), float(truth.max())
    levels = np.linspace(low, high if high > low else low + 1.0, 15)
    contour = None
    for ax, (label, values) in zip(axes_flat, panels):
        contour = ax.contourf(grid[0], grid[1], values.reshape(grid[0].shape), levels=levels,
                              cmap="viridis", extend="both")
        ax.plot(float(center_t[dims[0]]), float(center_t[dims[1]]), "k+", ms=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(names[dims[0]])
        ax.set_ylabel(names[dims[1]])
    for ax in axes_flat[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    if plt_fig_axis is None:
        fig.tight_layout()
    if contour is not None:
        fig.colorbar(contour, ax=list(axes_flat[: len(panels)]), shrink=0.8, label="value")
    if use_pyplot:
        plt.show()
    return fig, axes


def _score_limit(hierarchy: Any, levels: Sequence[int]) -> float:
    return max(float(hierarchy.levels[k].scores.abs().max()) for k in levels) or 1.0


def _hierarchy_text(hierarchy: Any, words: Optional[Sequence[str]], colormap: Any,
                    value_format: str, show_colorbar: bool, title: Optional[str],
                    plt_fig_axis: Any, fig_size: Any, use_pyplot: bool) -> Tuple[Figure, Any]:
    num_positions = int(hierarchy.unit_map.numel())
    words = _names(words, num_positions, "words", prefix="")
    num_levels = len(hierarchy.levels)
    fig, ax = _create_figure(
        plt_fig_axis, use_pyplot,
        fig_size or (max(6.0, 0.9 * num_positions) + 1.0, 0.6 * num_levels + 1.4))
    norm = Normalize(-_score_limit(hierarchy, range(num_levels)),
                     _score_limit(hierarchy, range(num_levels)))
    unit_map = hierarchy.unit_map.cpu()
    for k, level in enumerate(hierarchy.levels):
        for group, score in zip(level.groups, level.scores.tolist()):
            positions = torch.nonzero(torch.isin(unit_map, group.cpu())).flatten()
            left, right = int(positions.min()), int(positions.max())
            face = colormap(norm(score))
            ax.add_patch(Rectangle((left - 0.45, k - 0.4), right - left + 0.9, 0.8,
                                   facecolor=face, edgecolor="black", lw=0.5))
            label = words[left] if k == 0 and left == right else value_format.format(score)
            ax.text((left + right) / 2, k, label, ha="center", va="center", fontsize=8,
                    color=readable_text_color(face))
    ax.set_xlim(-0.6, num_positions - 0.4)
    ax.set_ylim(-0.6, num_levels - 0.4)
    ax.set_xticks(range(num_positions))
    ax.set_xticklabels(words, rotation=45, ha="right")
    ax.set_yticks(range(num_levels))
    ax.set_yticklabels([f"level {k}" for k in range(num_levels)])
    ax.set_title(title if title is not None else
                 "ACD phrase hierarchy (level 0: words; box colour and label: CD score)")
    if show_colorbar:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=ax, fraction=0.046,
                           pad=0.02)
        bar.set_label("CD score")
    _finish(fig, use_pyplot, plt_fig_axis)
    return fig, ax


def _hierarchy_image(hierarchy: Any, image: Optional[ArrayLike], levels: Optional[Sequence[int]],
                     colormap: Any, ncols: int, show_colorbar: bool, title: Optional[str],
                     fig_size: Any, use_pyplot: bool) -> Tuple[Figure, Any]:
    import math

    levels = list(range(len(hierarchy.levels))) if levels is None else [int(k) for k in levels]
    if not levels or any(not 0 <= k < len(hierarchy.levels) for k in levels):
        raise ValueError(f"`levels` must be indices in [0, {len(hierarchy.levels)}), got {levels}")
    ncols = max(1, min(int(ncols), len(levels)))
    nrows = math.ceil(len(levels) / ncols)
    fig, axes = _create_figure(None, use_pyplot, fig_size or (2.6 * ncols + 0.8, 2.6 * nrows),
                               nrows, ncols)
    axes = np.atleast_1d(np.asarray(axes, dtype=object)).reshape(nrows, ncols)
    limit = _score_limit(hierarchy, levels)
    norm = Normalize(-limit, limit)
    # pixels outside every region stay transparent, showing the image beneath
    overlay = colormap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    background = None
    if image is not None:
        background = _to_numpy(image, "image").astype(np.float64)
        while background.ndim > 2:
            background = background.mean(0)
        if background.shape != tuple(hierarchy.unit_map.shape):
            raise ValueError(f"`image` must be {tuple(hierarchy.unit_map.shape)} (after averaging "
                             f"channels), got {background.shape}")
    for ax, k in zip(axes.flat, levels):
        if background is not None:  # blank light grey, ink mid grey: never white like a 0 score
            low, high = float(background.min()), float(background.max())
            spread = high - low if high > low else 1.0
            ax.imshow(background, cmap="Greys", vmin=low - 0.25 * spread,
                      vmax=high + 0.4 * spread)
        values = hierarchy.score_map(k).detach().cpu().double().numpy()
        ax.imshow(np.ma.masked_invalid(values), cmap=overlay, norm=norm)
        if background is not None and np.ptp(background) > 0:
            middle = 0.5 * (background.min() + background.max())
            ax.contour(background, levels=[middle], colors=INK_OUTLINE_COLOR, linewidths=1.0)
        if k > 0:
            ax.add_collection(_region_boundaries(hierarchy.labels(k).cpu().numpy()))
        ax.set_title(f"level {k}: {len(hierarchy.levels[k].groups)} groups", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(levels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if show_colorbar:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=list(axes.flat),
                           shrink=0.8, pad=0.02)
        bar.set_label("CD score of the region")
    if use_pyplot:
        plt.show()
    return fig, axes


def _region_boundaries(labels: np.ndarray) -> Any:
    """Line segments between pixels of different groups (group edges for the overlay)."""
    from matplotlib.collections import LineCollection

    segments = []
    rows, cols = np.nonzero(labels[:, 1:] != labels[:, :-1])
    for r, c in zip(rows, cols):
        if labels[r, c] >= 0 or labels[r, c + 1] >= 0:
            segments.append([(c + 0.5, r - 0.5), (c + 0.5, r + 0.5)])
    rows, cols = np.nonzero(labels[1:, :] != labels[:-1, :])
    for r, c in zip(rows, cols):
        if labels[r, c] >= 0 or labels[r + 1, c] >= 0:
            segments.append([(c - 0.5, r + 0.5), (c + 0.5, r + 0.5)])
    return LineCollection(segments, colors="black", linewidths=1.0)


def visualize_hierarchy(
    hierarchy: Any,
    words: Optional[Sequence[str]] = None,
    image: Optional[ArrayLike] = None,
    levels: Optional[Sequence[int]] = None,
    cmap: Any = None,
    value_format: str = "{:.2f}",
    ncols: int = 4,
    show_colorbar: bool = True,
    title: Optional[str] = None,
    plt_fig_axis: Optional[Tuple[Figure, Any]] = None,
    fig_size: Optional[Tuple[float, float]] = None,
    use_pyplot: bool = True,
) -> Tuple[Figure, Any]:
    r"""
    The levels of an ACD hierarchy
    (:class:`~captum_interactions.Hierarchy`): for text a phrase tree (one row
    per level, one box per phrase, coloured by its CD score and labelled in
    black or white, whichever reads better on the box); for images one panel
    per level with every region coloured by its CD score, the image's ink
    outlined in blue and pixels outside any region showing the image in grey
    (blank light grey, ink darker).
    Colours are Captum's (red negative, white 0, green positive) on a scale
    symmetric around 0, explained by a colour bar.

    Args:
        hierarchy (Hierarchy): one example's hierarchy, from
            ``AgglomerativeContextualDecomposition.attribute``.
        words (sequence of str, optional): the tokens, for text. Default:
            positions
        image (Tensor or array, optional): the image drawn under the regions,
            for images ((C, H, W) or (H, W); channels are averaged).
            Default: None
        levels (sequence of int, optional): the levels drawn (images only).
            Default: all
        cmap (str or Colormap, optional): colour map. Default: Captum's
            red - white - green (:func:`interaction_cmap`)
        value_format (str, optional): format of the phrase scores (text).
            Default: "{:.2f}"
        ncols (int, optional): panels per row (images). Default: 4
        show_colorbar (bool, optional): add a colour bar of the CD score.
            Default: True
        title (str, optional): title (text) or figure title (images).
            Default: a description of the plot for text, none for images
        plt_fig_axis (tuple, optional): (figure, axis) to draw into (text
            only). Default: None
        fig_size (tuple, optional): figure size. Default: from the number of
            words and levels, or 2.6 inches per image panel
        use_pyplot (bool, optional): pyplot figure + ``plt.show()``.
            Default: True

    Returns:
        (**figure**, **axis**) for text; (**figure**, **axes**) (an array of
        axes, one panel per level) for images.

    Examples::

        >>> hierarchy = AgglomerativeContextualDecomposition(model).attribute(ids, target=1)
        >>> fig, ax = visualize_hierarchy(hierarchy, words=tokens)
    """
    if isinstance(hierarchy, (list, tuple)):
        raise TypeError(
            "`hierarchy` must be one Hierarchy; ACD returns a list for N > 1, pass one of its items"
        )
    kind = getattr(hierarchy, "kind", None)
    colormap = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    colormap = colormap if colormap is not None else interaction_cmap()
    if kind == "sequence" and hasattr(hierarchy, "levels"):
        return _hierarchy_text(hierarchy, words, colormap, value_format, show_colorbar, title,
                               plt_fig_axis, fig_size, use_pyplot)
    if kind == "image" and hasattr(hierarchy, "levels"):
        if plt_fig_axis is not None:
            raise ValueError("`plt_fig_axis` is not supported for image hierarchies "
                             "(one panel per level)")
        return _hierarchy_image(hierarchy, image, levels, colormap, ncols, show_colorbar, title,
                                fig_size, use_pyplot)
    raise TypeError(
        "`hierarchy` must be an ACD Hierarchy (kind 'sequence' or 'image' with plot methods), "
        f"got {type(hierarchy).__name__}"
    )
