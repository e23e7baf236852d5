import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import nn  # noqa: E402

from captum_interactions import IntegratedHessians  # noqa: E402
from captum_interactions.visualization import (  # noqa: E402
    visualize_hierarchy,
    visualize_image_interactions,
    visualize_interaction_matrix,
    visualize_interaction_scatter,
    visualize_taylor,
    visualize_top_interactions,
)

DTYPE = torch.float64


def saved(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    return path


def symmetric_matrix(size=5, seed=0):
    generator = np.random.default_rng(seed)
    a = generator.normal(size=(size, size))
    return a + a.T


def heatmap(ax):
    images = [c for c in ax.get_children() if isinstance(c, AxesImage)]
    assert len(images) == 1
    return images[0]


def test_interaction_matrix_cells_labels_scale_and_annotations(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 1)).to(DTYPE)
    gamma = IntegratedHessians(model).attribute(torch.randn(1, 4, dtype=DTYPE))  # (1, 4, 4)
    names = ["age", "bmi", "bp", "s1"]
    fig, ax = visualize_interaction_matrix(
        gamma, names, mask_diagonal=True, annotate_top_k=3, use_pyplot=False, title="IH"
    )
    saved(fig, tmp_path, "matrix")
    image = heatmap(ax)
    data = image.get_array()
    assert data.shape == (4, 4)
    assert data.mask[np.arange(4), np.arange(4)].all() and data.mask.sum() == 4
    off = gamma[0].numpy().copy()
    np.fill_diagonal(off, 0.0)
    low, high = image.get_clim()
    assert low == pytest.approx(-high) and high == pytest.approx(np.abs(off).max())
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "IH"
    # one annotation per pair (upper triangle), the 3 largest |Gamma_ij|
    texts = ax.texts
    assert len(texts) == 3
    upper = np.abs(off[np.triu_indices(4, 1)])
    expected = np.sort(upper)[::-1][:3]
    shown = np.sort([abs(float(t.get_text())) for t in texts])[::-1]
    np.testing.assert_allclose(shown, expected, rtol=0.06)
    # colour convention: positive green, negative red
    cmap = image.get_cmap()
    assert cmap(1.0)[1] > 0.4 and cmap(1.0)[0] < 0.1
    assert cmap(0.0)[0] > 0.9 and cmap(0.0)[1] < 0.1


def test_interaction_matrix_annotates_each_pair_once_despite_round_off():
    matrix = symmetric_matrix(4, 5)
    noisy = matrix + 1e-7 * np.random.default_rng(0).normal(size=(4, 4))  # float32-like
    fig, ax = visualize_interaction_matrix(noisy, annotate_top_k=3, mask_diagonal=True,
                                           use_pyplot=False)
    positions = sorted((round(t.get_position()[1]), round(t.get_position()[0])) for t in ax.texts)
    assert len(positions) == 3 and all(r < c for r, c in positions)  # upper triangle only
    upper = np.abs(matrix[np.triu_indices(4, 1)])
    assert {abs(matrix[r, c]) for r, c in positions} == set(np.sort(upper)[-3:])


def test_interaction_matrix_rectangular_many_features_and_errors(tmp_path):
    block = np.arange(60 * 3, dtype=float).reshape(60, 3) - 90
    fig, ax = visualize_interaction_matrix(
        block, [f"t{i}" for i in range(60)], ["a", "b", "c"], max_tick_labels=20,
        use_pyplot=False,
    )
    saved(fig, tmp_path, "rect")
    assert heatmap(ax).get_array().shape == (60, 3)
    assert len(ax.get_yticklabels()) == 20  # every 3rd row labelled
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="feature_names"):
        visualize_interaction_matrix(np.eye(3), ["a"], use_pyplot=False)
    with pytest.raises(ValueError, match="interactions"):
        visualize_interaction_matrix(np.zeros((2, 3, 3)), use_pyplot=False)
    with pytest.raises(ValueError, match="annotate_top_k"):
        visualize_interaction_matrix(np.eye(3), annotate_top_k=-1, use_pyplot=False)


def test_top_interactions_bars(tmp_path):
    matrix = symmetric_matrix(5)
    names = list("abcde")
    fig, ax = visualize_top_interactions(matrix, names, k=4, use_pyplot=False)
    saved(fig, tmp_path, "top")
    bars = ax.patches
    assert len(bars) == 4
    i, j = np.triu_indices(5, 1)
    pair_totals = matrix[i, j] + matrix[j, i]
    order = np.argsort(-np.abs(pair_totals))[:4]
    # strongest at the top: bar heights (y) decrease along the ranking
    by_height = sorted(bars, key=lambda b: -b.get_y())
    np.testing.assert_allclose([b.get_width() for b in by_height], pair_totals[order])
    for bar in by_height:
        expected = "green" if bar.get_width() >= 0 else "red"
        assert bar.get_facecolor() == to_rgba(expected)
    labels = [t.get_text() for t in ax.get_yticklabels()]  # ticks set top-down
    assert labels == [f"{names[a]} \u00d7 {names[b]}" for a, b in zip(i[order], j[order])]
    assert ax.get_xlabel() == "interaction"


def test_top_interactions_batch_mean_abs_and_diagonal():
    batch = np.stack([symmetric_matrix(3, s) for s in range(4)])
    fig, ax = visualize_top_interactions(
        batch, k=6, include_diagonal=True, combine_symmetric=False, aggregate="mean_abs",
        use_pyplot=False,
    )
    assert len(ax.patches) == 6  # 3 pairs + 3 main effects
    widths = sorted(b.get_width() for b in ax.patches)
    mean_abs = np.abs(batch).mean(0)
    np.testing.assert_allclose(widths, np.sort(mean_abs[np.triu_indices(3)]))
    assert sum("(main)" in t.get_text() for t in ax.get_yticklabels()) == 3
    assert ax.get_xlabel() == "mean |interaction|"
    with pytest.raises(ValueError, match="aggregate"):
        visualize_top_interactions(batch, aggregate="median", use_pyplot=False)
    with pytest.raises(ValueError, match="`k`"):
        visualize_top_interactions(batch[0], k=0, use_pyplot=False)


def test_interaction_scatter_points(tmp_path):
    generator = np.random.default_rng(1)
    inputs = generator.normal(size=(30, 3))
    gamma = np.stack([symmetric_matrix(3, s) for s in range(30)])
    fig, ax = visualize_interaction_scatter(
        torch.tensor(gamma), torch.tensor(inputs), 0, 2, ["x", "y", "z"], use_pyplot=False
    )
    saved(fig, tmp_path, "scatter")
    collections = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(collections) == 1
    offsets = collections[0].get_offsets()
    assert offsets.shape == (30, 2)
    np.testing.assert_allclose(offsets[:, 0], inputs[:, 0])
    np.testing.assert_allclose(offsets[:, 1], gamma[:, 0, 2] + gamma[:, 2, 0])
    np.testing.assert_allclose(collections[0].get_array(), inputs[:, 2])
    assert ax.get_xlabel() == "value of x"
    assert ax.get_ylabel() == "interaction x \u00d7 z"
    assert fig.axes[-1].get_ylabel() == "value of z"  # colour bar
    with pytest.raises(ValueError, match="interacting_feature"):
        visualize_interaction_scatter(gamma, inputs, 0, 3, use_pyplot=False)
    with pytest.raises(ValueError, match="inputs"):
        visualize_interaction_scatter(gamma, inputs[:, :2], 0, 1, use_pyplot=False)


def test_image_interactions_pixel_row(tmp_path):
    height = width = 4
    generator = np.random.default_rng(2)
    gamma = generator.normal(size=(1, 1, height, width, 1, height, width))  # batch 1, C = 1
    image = torch.rand(1, height, width)
    fig, ax = visualize_image_interactions(gamma, image, (1, 2), use_pyplot=False)
    saved(fig, tmp_path, "image")
    images = [c for c in ax.get_children() if isinstance(c, AxesImage)]
    assert len(images) == 2  # the grey image and Captum's blended heat map
    heat = np.asarray(images[1].get_array())
    row = gamma[0, 0, 1, 2, 0].copy()
    row[1, 2] = 0.0  # the pixel's own main effect is left out
    # Captum normalizes by a positive threshold: the same map up to scale and clipping
    assert heat[1, 2] == 0.0
    inside = (np.abs(heat) < 1) & (row != 0)
    scale = heat[inside] / row[inside]
    assert inside.sum() > 8 and (scale > 0).all()
    np.testing.assert_allclose(scale, scale[0], rtol=1e-6)
    assert images[1].get_clim() == (-1, 1)
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[2] == 1.0]
    assert len(boxes) == 1 and boxes[0].get_xy() == (1.5, 0.5)


def test_image_interactions_groups(tmp_path):
    patches = (torch.arange(6)[:, None] // 3) * 2 + torch.arange(6)[None] // 3  # 4 patches
    group_gamma = torch.tensor(symmetric_matrix(4, 3))
    fig, ax = visualize_image_interactions(
        group_gamma[None], torch.rand(6, 6), 3, feature_mask=patches[None, None],
        method="heat_map", use_pyplot=False,
    )
    saved(fig, tmp_path, "image_groups")
    heat = np.asarray(heatmap(ax).get_array())
    assert heat.shape == (6, 6)
    assert (heat[3:, 3:] == 0).all()  # the chosen patch (id 3), self masked
    for group in range(3):
        values = heat[patches.numpy() == group]
        assert np.ptp(values) == 0 and np.sign(values[0]) == np.sign(float(group_gamma[3, group]))
    box = [p for p in ax.patches if isinstance(p, Rectangle)][-1]
    assert box.get_xy() == (2.5, 2.5) and box.get_width() == 3
    with pytest.raises(ValueError, match="pixel"):
        visualize_image_interactions(group_gamma, torch.rand(6, 6), 9,
                                     feature_mask=patches, use_pyplot=False)
    with pytest.raises(ValueError, match="interactions"):
        visualize_image_interactions(np.zeros((3, 3)), torch.rand(6, 6), 0,
                                     feature_mask=patches, use_pyplot=False)


def test_taylor_one_dimensional_lines(tmp_path):
    def f(z):
        return torch.sin(z[:, 0])

    taylor = {1: lambda z: z[:, 0], 3: lambda z: z[:, 0] - z[:, 0] ** 3 / 6}
    fig, ax = visualize_taylor(f, taylor, center=torch.zeros(1), span=2.0, num_points=41,
                               feature_names=["t"], use_pyplot=False)
    saved(fig, tmp_path, "taylor1d")
    lines = [line for line in ax.get_lines() if line.get_label() in ("f", "order 1", "order 3")]
    assert [line.get_label() for line in lines] == ["f", "order 1", "order 3"]
    x = lines[0].get_xdata()
    assert len(x) == 41 and x[0] == -2.0 and x[-1] == 2.0
    np.testing.assert_allclose(lines[0].get_ydata(), np.sin(x))
    np.testing.assert_allclose(lines[2].get_ydata(), x - x ** 3 / 6)
    assert ax.get_xlabel() == "t" and ax.get_ylabel() == "f"
    with pytest.raises(TypeError, match="taylor"):
        visualize_taylor(f, [lambda z: z[:, 0]], center=torch.zeros(1), use_pyplot=False)
    with pytest.raises(ValueError, match="center"):
        visualize_taylor(f, taylor, use_pyplot=False)


def test_taylor_two_dimensional_panels_with_taylor_polynomial(tmp_path):
    taylor_polynomial = pytest.importorskip("captum_interactions._utils.taylor_polynomial")
    # f(a, b) = a * b + a^2 expanded at c = (1, 2): exact at order 2
    exponents = torch.tensor([[0, 0], [1, 0], [0, 1], [2, 0], [1, 1], [0, 2]])
    center = torch.tensor([1.0, 2.0], dtype=DTYPE)
    coefficients = torch.tensor([[3.0, 4.0, 1.0, 1.0, 1.0, 0.0]], dtype=DTYPE)
    poly = taylor_polynomial.TaylorPolynomial(exponents, coefficients, center, ["a", "b"])

    def f(z):
        return z[:, 0] * z[:, 1] + z[:, 0] ** 2

    fig, axes = visualize_taylor(f, poly, span=0.5, num_points=11, use_pyplot=False)
    saved(fig, tmp_path, "taylor2d")
    titles = [ax.get_title() for ax in axes.ravel() if ax.axison]
    assert titles == ["f", "order 1", "order 2"]
    assert axes.ravel()[0].get_xlabel() == "a" and axes.ravel()[0].get_ylabel() == "b"
    # order 2 is exact: its filled contours use the same levels as f's
    f_levels = axes.ravel()[0].collections[0].levels
    np.testing.assert_allclose(axes.ravel()[2].collections[0].levels, f_levels)


def _tiny_acd_inputs():
    from captum_interactions import AgglomerativeContextualDecomposition

    torch.manual_seed(0)
    text_model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2))
    image_model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                nn.Linear(2 * 36, 2))
    text = AgglomerativeContextualDecomposition(text_model).attribute(
        torch.tensor([[1, 2, 3, 4, 5]]), target=1)
    image = torch.rand(1, 1, 6, 6)
    picture = AgglomerativeContextualDecomposition(image_model).attribute(
        image, target=0, block_size=2)
    return text, picture, image


def test_hierarchy_text_and_image(tmp_path):
    pytest.importorskip("captum_interactions._core.agglomerative_contextual_decomposition")
    text, picture, image = _tiny_acd_inputs()
    words = ["a", "b", "c", "d", "e"]
    fig, ax = visualize_hierarchy(text, words=words)
    saved(fig, tmp_path, "hierarchy_text")
    assert len(ax.get_yticklabels()) == len(text.levels)
    assert [t.get_text() for t in ax.get_xticklabels()] == words
    assert len(ax.patches) == sum(len(level.groups) for level in text.levels)
    fig, axes = visualize_hierarchy(picture, image=image[0])
    saved(fig, tmp_path, "hierarchy_image")
    titled = [a for a in axes.ravel() if a.get_title()]
    assert len(titled) == len(picture.levels)
    with pytest.raises(TypeError, match="Hierarchy"):
        visualize_hierarchy([text, text])
    with pytest.raises(TypeError, match="Hierarchy"):
        visualize_hierarchy(object())
