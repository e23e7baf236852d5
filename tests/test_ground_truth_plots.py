"""visualize_interaction_dependence_2d and visualize_interaction_beeswarm: rendered content."""
import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from matplotlib.colors import to_rgba  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from captum_interactions import IntegratedHessians, explain_dataset  # noqa: E402
from captum_interactions.visualization import (  # noqa: E402
    interaction_cmap,
    visualize_interaction_beeswarm,
    visualize_interaction_dependence_2d,
)


def _product_data(n: int = 40):
    """f(x) = x0 * x1 + 0.5 x2: IH against 0 gives Gamma_01 = Gamma_10 = x0 x1 / 4."""
    torch.manual_seed(0)
    x = torch.randn(n, 3, dtype=torch.float64)

    class Product(torch.nn.Module):
        def forward(self, z):
            return (z[:, 0] * z[:, 1] + 0.5 * z[:, 2]).unsqueeze(1)

    f = Product()
    gamma = IntegratedHessians(f).attribute(x, target=0)
    return f, x, gamma


def _rendered(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # colours are mapped at draw time
    return fig


def _colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def test_dependence_2d_points_positions_and_colours():
    _, x, gamma = _product_data()
    torch.testing.assert_close(gamma[:, 0, 1], x[:, 0] * x[:, 1] / 4, atol=1e-12, rtol=0)
    fig, ax = visualize_interaction_dependence_2d(gamma, x, 0, 1, ["a", "b", "c"],
                                                  use_pyplot=False)
    _rendered(fig)
    (points,) = ax.collections
    np.testing.assert_allclose(points.get_offsets(), x[:, :2].numpy())
    # colours are the pair's value x0 x1 / 2 on a scale symmetric around 0
    pair = (x[:, 0] * x[:, 1] / 2).numpy()
    np.testing.assert_allclose(points.get_array(), pair, atol=1e-12)
    limit = np.abs(pair).max()
    assert points.norm.vmin == pytest.approx(-limit) and points.norm.vmax == pytest.approx(limit)
    faces = points.get_facecolors()
    strongest_positive, strongest_negative = int(np.argmax(pair)), int(np.argmin(pair))
    np.testing.assert_allclose(faces[strongest_positive], interaction_cmap()(
        0.5 + pair[strongest_positive] / (2 * limit)), atol=1e-6)
    assert faces[strongest_positive][1] > faces[strongest_positive][0]  # green
    assert faces[strongest_negative][0] > faces[strongest_negative][1]  # red
    (bar,) = _colorbars(fig)
    assert "\u0393[a,b] + \u0393[b,a]" in bar.get_ylabel()
    assert ax.get_xlabel() == "value of a" and ax.get_ylabel() == "value of b"


@pytest.mark.filterwarnings("ignore:explain_dataset found no parameters")
def test_dependence_2d_from_explain_dataset(tmp_path):
    f, x, gamma = _product_data(12)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    result = explain_dataset(IntegratedHessians(f), loader, str(tmp_path / "run"),
                             attribute_kwargs=dict(target=0), dependence_pairs=[(0, 1)],
                             progress=False)
    fig, ax = visualize_interaction_dependence_2d(result, None, 0, 1, use_pyplot=False)
    (points,) = ax.collections
    np.testing.assert_allclose(points.get_offsets(), x[:, :2].numpy())
    np.testing.assert_allclose(points.get_array(), gamma[:, 0, 1].numpy(), atol=1e-12)
    assert len(_colorbars(fig)) == 1
    with pytest.raises(ValueError, match="dependence_pairs"):
        visualize_interaction_dependence_2d(result, None, 0, 2, use_pyplot=False)
    # top_interactions and to_shapiq read the run's mean interactions
    from captum_interactions import top_interactions

    table = top_interactions(result, k=1)
    mean_pair = float((gamma[:, 0, 1] + gamma[:, 1, 0]).mean())
    assert (table[0].i, table[0].j) == (0, 1)
    assert table[0].value == pytest.approx(mean_pair, abs=1e-12)
    shapiq = pytest.importorskip("shapiq")
    from captum_interactions import to_shapiq

    iv = to_shapiq(result)
    assert isinstance(iv, shapiq.InteractionValues)
    assert iv.dict_values[(0, 1)] == pytest.approx(mean_pair, abs=1e-12)
    # the beeswarm reads the per-example interactions of the run
    fig, ax = visualize_interaction_beeswarm(result, k=2, use_pyplot=False)
    assert len(ax.collections) == 2 and all(len(c.get_offsets()) == 12 for c in ax.collections)


def test_beeswarm_rows_points_and_colours():
    _, x, gamma = _product_data(40)
    fig, ax = visualize_interaction_beeswarm(gamma, feature_names=["a", "b", "c"], k=3,
                                             use_pyplot=False)
    _rendered(fig)
    # one row per pair, 40 points each; the strongest pair (a, b) on top
    assert len(ax.collections) == 3
    assert all(len(c.get_offsets()) == 40 for c in ax.collections)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "a \u00d7 b"
    top = ax.collections[0]
    offsets = top.get_offsets()
    pair = (x[:, 0] * x[:, 1] / 2).numpy()
    np.testing.assert_allclose(offsets[:, 0], pair, atol=1e-12)
    assert np.all(np.abs(offsets[:, 1] - 2) <= 0.35 + 1e-12)  # row 2 (top), swarm width
    # the other pairs do not interact: every point at 0
    for other in ax.collections[1:]:
        np.testing.assert_allclose(other.get_offsets()[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(top.get_array(), pair, atol=1e-12)
    assert len(_colorbars(fig)) == 1
    positive = int(np.argmax(pair))
    face = top.get_facecolors()[positive]
    assert face[1] > face[0]  # green for the largest positive value


def test_beeswarm_coloured_by_feature_value():
    _, x, gamma = _product_data(20)
    fig, ax = visualize_interaction_beeswarm(gamma, x, k=1, use_pyplot=False)
    _rendered(fig)
    (row,) = ax.collections
    ranks = np.argsort(np.argsort(x[:, 0].numpy())) / 19
    np.testing.assert_allclose(row.get_array(), ranks)
    (bar,) = _colorbars(fig)
    assert "first feature" in bar.get_ylabel()
    lowest = int(np.argmin(x[:, 0].numpy()))
    np.testing.assert_allclose(row.get_facecolors()[lowest],
                               to_rgba(matplotlib.colormaps["coolwarm"](0.0)), atol=1e-6)


def test_bad_input():
    _, x, gamma = _product_data(5)
    with pytest.raises(ValueError, match="inputs"):
        visualize_interaction_dependence_2d(gamma, x[:, :2], 0, 1, use_pyplot=False)
    with pytest.raises(ValueError, match="interacting_feature"):
        visualize_interaction_dependence_2d(gamma, x, 0, 3, use_pyplot=False)
    with pytest.raises(ValueError, match="`k`"):
        visualize_interaction_beeswarm(gamma, k=0, use_pyplot=False)
    with pytest.raises(ValueError, match="shape"):
        visualize_interaction_beeswarm(gamma[0], use_pyplot=False)
