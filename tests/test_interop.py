"""to_shapiq / from_shapiq (export to shapiq's InteractionValues) and top_interactions."""
import warnings

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from captum_interactions import (  # noqa: E402
    ContextualDecomposition,
    IntegratedHessians,
    InteractionTable,
    TopInteraction,
    from_shapiq,
    to_shapiq,
    top_interactions,
)

shapiq = pytest.importorskip("shapiq")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()


def _ih(n: int = 3):
    model = _model()
    x = torch.randn(n, 4, dtype=torch.float64)
    baseline = torch.zeros(1, 4, dtype=torch.float64)
    gamma = IntegratedHessians(model).attribute(x, baselines=baseline, target=0)
    with torch.no_grad():
        f_x, f_0 = model(x)[:, 0], float(model(baseline)[0, 0])
    return gamma, f_x, f_0


def test_export_round_trips_values_and_index_sets():
    gamma, _, f_0 = _ih()
    iv = to_shapiq(gamma, example=1, baseline_value=f_0)
    d = 4
    expected_sets = {()} | {(i,) for i in range(d)} | {
        (i, j) for i in range(d) for j in range(i + 1, d)
    }
    assert set(iv.dict_values) == expected_sets
    assert (iv.n_players, iv.min_order, iv.max_order) == (4, 0, 2)
    assert iv.dict_values[()] == pytest.approx(f_0, abs=1e-15)
    for i in range(d):
        assert iv.dict_values[(i,)] == pytest.approx(float(gamma[1, i, i]), abs=1e-15)
        for j in range(i + 1, d):
            pair = float(gamma[1, i, j] + gamma[1, j, i])
            assert iv.dict_values[(i, j)] == pytest.approx(pair, abs=1e-15)
    # back: the same matrix (IH is symmetric), and export again: the same sets and values
    back = from_shapiq(iv)
    torch.testing.assert_close(back, gamma[1], atol=1e-15, rtol=0)
    again = to_shapiq(back, baseline_value=f_0)
    assert set(again.dict_values) == set(iv.dict_values)
    for key, value in iv.dict_values.items():
        assert again.dict_values[key] == pytest.approx(value, abs=1e-15)
    assert again.interaction_lookup == iv.interaction_lookup


def test_export_keeps_completeness():
    # IH: sum Gamma = f(x) - f(x'), so the exported values sum to f(x)
    gamma, f_x, f_0 = _ih()
    for k, iv in enumerate(to_shapiq(gamma, baseline_value=f_0)):
        assert sum(iv.dict_values.values()) == pytest.approx(float(f_x[k]), abs=1e-9)


def test_batch_gives_a_list_and_per_example_baselines():
    gamma, f_x, _ = _ih(3)
    ivs = to_shapiq(gamma, baseline_value=torch.tensor([1.0, 2.0, 3.0]))
    assert isinstance(ivs, list) and len(ivs) == 3
    assert [iv.baseline_value for iv in ivs] == [1.0, 2.0, 3.0]
    single = to_shapiq(gamma[:1])
    assert isinstance(single, shapiq.InteractionValues)


def test_entry_mode_for_cd_interactions():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(2, 4)
    inter = ContextualDecomposition(model).interactions(x, target=0)
    iv = to_shapiq(inter, example=0, pair_value="entry")
    assert iv.dict_values[(0, 2)] == pytest.approx(float(inter[0, 0, 2]), abs=1e-6)
    assert iv.dict_values[(1,)] == pytest.approx(float(inter[0, 1, 1]), abs=1e-6)
    torch.testing.assert_close(from_shapiq(iv, pair_value="entry"), inter[0].double())


def test_nested_tuple_layout_is_flattened():
    torch.manual_seed(1)
    model_a = torch.nn.Linear(5, 1).double()

    def forward(a, b):
        z = torch.cat([a, b.flatten(1)], dim=1)
        return torch.tanh(model_a(z)) ** 2

    a, b = torch.randn(2, 1, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64)
    nested = IntegratedHessians(forward).attribute((a, b))
    flat = IntegratedHessians(forward).attribute((a, b), output_layout="flat")
    iv = to_shapiq(nested, example=1)
    torch.testing.assert_close(from_shapiq(iv), flat[1], atol=1e-12, rtol=0)


def test_shapiq_plots_render_from_the_export():
    gamma, _, f_0 = _ih()
    iv = to_shapiq(gamma, example=0, baseline_value=f_0)
    names = ["a", "b", "c", "d"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shapiq names our neutral index label
        fig, ax = shapiq.network_plot(iv, feature_names=names)
        force = shapiq.force_plot(iv, feature_names=names)
        import matplotlib.pyplot as plt

        plt.figure()  # bar_plot draws on pyplot's current axes
        bar = shapiq.bar_plot(to_shapiq(gamma), feature_names=names)
    # the network has one node per player and one edge per pair
    texts = {t.get_text() for t in ax.texts}
    assert set(names) <= texts
    assert force is not None and len(force.axes) >= 1
    assert len(bar.patches) >= 5  # the strongest main effects and pairs, plus the rest

    plt.close("all")


def test_bad_input():
    gamma, _, _ = _ih()
    with pytest.raises(ValueError, match="example"):
        to_shapiq(gamma, example=5)
    with pytest.raises(ValueError, match="pair_value"):
        to_shapiq(gamma, pair_value="half")
    with pytest.raises(ValueError, match="baseline_value"):
        to_shapiq(gamma, baseline_value=[1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        to_shapiq(torch.zeros(2, 3, 4))
    nan = gamma.clone()
    nan[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"example\(s\) \[2\]"):
        to_shapiq(nan)
    to_shapiq(nan, example=0)  # the finite example exports
    with pytest.raises(TypeError, match="InteractionValues"):
        from_shapiq(gamma)


def test_top_interactions_ranks_pairs_by_magnitude():
    g = torch.zeros(4, 4, dtype=torch.float64)
    g[0, 1] = g[1, 0] = 0.5     # pair value 1.0
    g[2, 3] = g[3, 2] = -1.5    # pair value -3.0
    g[0, 3] = g[3, 0] = 0.25    # 0.5
    g[1, 1] = 10.0              # main effect, not ranked by default
    table = top_interactions(g, k=2, feature_names=["a", "b", "c", "d"])
    assert isinstance(table, InteractionTable) and len(table) == 2
    assert table[0] == TopInteraction(1, 2, 3, "c", "d", -3.0)
    assert table[1] == TopInteraction(2, 0, 1, "a", "b", 1.0)
    text = str(table)
    assert "c \u00d7 d" in text and "-3" in text and text.splitlines()[0].split()[0] == "rank"
    assert "InteractionTable" in repr(table)
    with_main = top_interactions(g, k=1, include_diagonal=True)
    assert (with_main[0].i, with_main[0].j, with_main[0].value) == (1, 1, 10.0)
    entry = top_interactions(g, k=1, pair_value="entry")
    assert entry[0].value == -1.5
    assert len(top_interactions(g, k=100)) == 6


def test_top_interactions_over_a_batch():
    g = torch.zeros(2, 3, 3, dtype=torch.float64)
    g[0, 0, 1] = g[0, 1, 0] = 1.0      # pair (0,1): +2, -2 -> mean 0, mean |.| 2
    g[1, 0, 1] = g[1, 1, 0] = -1.0
    g[:, 1, 2] = g[:, 2, 1] = 0.5      # pair (1,2): +1 in both
    mean_abs = top_interactions(g, k=3)
    assert [(r.i, r.j, r.value) for r in mean_abs[:2]] == [(0, 1, 2.0), (1, 2, 1.0)]
    assert mean_abs.value_label == "mean |value|"
    mean = top_interactions(g, k=1, aggregate="mean")
    assert (mean[0].i, mean[0].j, mean[0].value) == (1, 2, 1.0)
    one = top_interactions(g, k=1, example=1)
    assert (one[0].i, one[0].j, one[0].value) == (0, 1, -2.0)
    with pytest.raises(ValueError, match="feature_names"):
        top_interactions(g, feature_names=["a"])
    with pytest.raises(ValueError, match="`k`"):
        top_interactions(g, k=0)
    with pytest.raises(ValueError, match="aggregate"):
        top_interactions(g, aggregate="max")
