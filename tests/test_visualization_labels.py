"""Readable labels and colour bars in the interaction-matrix and ACD plots."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from torch import nn  # noqa: E402

from captum_interactions.visualization import (  # noqa: E402
    interaction_cmap,
    readable_text_color,
    visualize_hierarchy,
    visualize_interaction_matrix,
)


def contrast(a, b):
    """WCAG contrast ratio of two colours."""
    def luminance(colour):
        channels = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
                    for c in to_rgba(colour)[:3]]
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]
    high, low = sorted([luminance(a), luminance(b)], reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("background", ["white", "black", "#800000", "darkgreen", "green",
                                        "red", "yellow", "navy", "lightgrey"])
def test_text_colour_is_the_more_readable_of_black_and_white(background):
    chosen = readable_text_color(background)
    other = "white" if chosen == "black" else "black"
    assert contrast(chosen, background) >= contrast(other, background)
    assert contrast(chosen, background) >= 4.5  # WCAG AA for normal text


def test_dark_maroon_gets_white_text_and_white_gets_black():
    assert readable_text_color("#800000") == "white"  # "4.77" was black on dark maroon
    assert readable_text_color("white") == "black"
    cmap = interaction_cmap()
    assert readable_text_color(cmap(1.0)) == "white"  # the darkest green of the map


def test_matrix_annotations_are_readable_on_their_cells():
    matrix = torch.tensor([[1.0, -0.05], [-0.05, 0.02]])
    fig, ax = visualize_interaction_matrix(matrix, ["a", "b"], annotate_top_k=3, use_pyplot=False)
    image = ax.get_images()[0]
    for text in ax.texts:
        x, y = text.get_position()
        cell = image.cmap(image.norm(float(matrix[int(round(y)), int(round(x))])))
        assert contrast(text.get_color(), cell) >= 4.5


def _text_hierarchy():
    acd = pytest.importorskip("captum_interactions").AgglomerativeContextualDecomposition
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Flatten(), nn.Linear(20, 2))
    with torch.no_grad():
        model[2].weight.mul_(5.0)  # strong scores: dark boxes
    return acd(model).attribute(torch.tensor([[1, 2, 3, 4, 5]]), target=1)


def test_hierarchy_text_has_colour_bar_and_readable_box_labels():
    hierarchy = _text_hierarchy()
    fig, ax = visualize_hierarchy(hierarchy, words=list("abcde"), use_pyplot=False)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "CD score"  # the colour bar
    assert len(ax.texts) == len(ax.patches)
    for text, box in zip(ax.texts, ax.patches):
        assert contrast(text.get_color(), box.get_facecolor()) >= 4.5
    # Hierarchy.plot draws the same figure
    fig2, ax2 = hierarchy.plot(list("abcde"))
    assert [t.get_text() for t in ax2.texts] == [t.get_text() for t in ax.texts]
    assert len(fig2.axes) == 2
    plt.close("all")


def test_hierarchy_image_has_one_colour_bar_and_checks_arguments():
    acd = pytest.importorskip("captum_interactions").AgglomerativeContextualDecomposition
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 36, 2))
    image = torch.rand(1, 1, 6, 6)
    hierarchy = acd(model).attribute(image, target=0, block_size=2)
    fig, axes = visualize_hierarchy(hierarchy, image=image[0], levels=[0, 1], use_pyplot=False)
    bars = [a for a in fig.axes if a.get_ylabel() == "CD score of the region"]
    assert len(bars) == 1 and axes.size == 2
    # the colour bar spans the scores of the levels shown, symmetric around 0
    low, high = bars[0].get_ylim()
    limit = max(float(hierarchy.levels[k].scores.abs().max()) for k in (0, 1))
    assert low == pytest.approx(-limit) and high == pytest.approx(limit)
    with pytest.raises(ValueError, match="levels"):
        visualize_hierarchy(hierarchy, image=image[0], levels=[99], use_pyplot=False)
    with pytest.raises(ValueError, match="image"):
        visualize_hierarchy(hierarchy, image=torch.rand(5, 5), use_pyplot=False)
    plt.close("all")
