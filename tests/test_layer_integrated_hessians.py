import re

import numpy as np
import pytest
import torch
from captum.attr import LayerIntegratedGradients
from matplotlib.figure import Figure
from torch import nn

from captum_interactions._core.integrated_hessians import IntegratedHessians
from captum_interactions._core.layer.layer_integrated_hessians import LayerIntegratedHessians
from captum_interactions._utils.text import (
    keep_special_tokens_baseline,
    merge_token_attributions,
    merge_token_interactions,
    merge_word_pieces,
    word_feature_mask,
    word_piece_groups,
)
from captum_interactions._utils.text_visualization import (
    token_row_sums_record,
    top_token_pairs,
    visualize_token_interactions,
    visualize_token_row_sums,
    visualize_top_token_pairs,
)

DTYPE = torch.float64
VOCAB, DIM, LENGTH = 20, 4, 5


class TinyText(nn.Module):
    """Embedding -> per-token tanh -> masked softmax pooling (mixes tokens) -> GELU -> scalar."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.score = nn.Linear(DIM, 1)
        self.head = nn.Sequential(nn.Linear(DIM, 8), nn.GELU(), nn.Linear(8, 2))
        self.to(DTYPE)

    def body(self, embeds, mask):
        hidden = torch.tanh(self.mix(embeds))
        scores = self.score(hidden).squeeze(-1).masked_fill(mask == 0, -1e9)
        pooled = (scores.softmax(-1)[..., None] * hidden).sum(1)
        return self.head(pooled)

    def forward(self, ids, mask):
        return self.body(self.embedding(ids), mask)


def data(n=3):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (n, LENGTH))
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[0, -1] = 0  # a padded position
    base = keep_special_tokens_baseline(ids, pad_token_id=0, special_token_ids=[])
    return ids, mask, base


def token_mask():
    return torch.arange(LENGTH).view(1, LENGTH, 1).expand(1, LENGTH, DIM)


def embedding_ih(model, ids, mask, base, **kwargs):
    """IntegratedHessians on the embedding outputs, an independent route."""
    ih = IntegratedHessians(lambda e, m: model.body(e, m), **kwargs.pop("ctor", {}))
    with torch.no_grad():
        x, x0 = model.embedding(ids), model.embedding(base)
    return ih.attribute(x, baselines=x0, additional_forward_args=(mask,), **kwargs)


def no_hooks(module):
    return all(
        not m._forward_hooks and not m._forward_pre_hooks for m in module.modules()
    )


@pytest.mark.parametrize("target", [0, 1])
def test_token_interactions_equal_integrated_hessians_on_embeddings(target):
    model = TinyText()
    ids, mask, base = data()
    lih = LayerIntegratedHessians(model, model.embedding)
    gamma = lih.attribute(ids, baselines=base, target=target, additional_forward_args=(mask,),
                          n_steps=8)
    expected = embedding_ih(model, ids, mask, base, target=target, n_steps=8,
                            feature_mask=token_mask())
    assert gamma.shape == (3, LENGTH, LENGTH)
    torch.testing.assert_close(gamma, expected, rtol=0, atol=1e-10)
    assert gamma[:, :, :].abs().max() > 1e-3  # not trivially zero
    off_diagonal = gamma - torch.diag_embed(torch.diagonal(gamma, dim1=1, dim2=2))
    assert off_diagonal.abs().max() > 1e-4  # tokens do interact through the pooling
    torch.testing.assert_close(gamma, gamma.transpose(1, 2), rtol=0, atol=1e-12)
    assert lih.last_call_cost.hvps == 8 * 3 * LENGTH  # T HVPs per path point, not T * E
    assert no_hooks(model)


def test_full_matrix_and_explicit_mask_equal_integrated_hessians():
    model = TinyText()
    ids, mask, base = data(2)
    lih = LayerIntegratedHessians(model, model.embedding)
    full = lih.attribute(ids, baselines=base, target=0, additional_forward_args=(mask,),
                         n_steps=6, grouping="full")
    expected = embedding_ih(model, ids, mask, base, target=0, n_steps=6)
    assert full.shape == (2, LENGTH, DIM, LENGTH, DIM)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-10)
    assert lih.last_call_cost.hvps == 6 * 2 * LENGTH * DIM
    # grouped result = summed full matrix; an explicit mask = dimension groups
    tokens = lih.attribute(ids, baselines=base, target=0, additional_forward_args=(mask,),
                           n_steps=6)
    torch.testing.assert_close(tokens, full.sum(dim=(2, 4)), rtol=0, atol=1e-10)
    dims = lih.attribute(ids, baselines=base, target=0, additional_forward_args=(mask,),
                         n_steps=6, feature_mask=torch.arange(DIM).view(1, 1, DIM))
    torch.testing.assert_close(dims, full.sum(dim=(1, 3)), rtol=0, atol=1e-10)


def test_completeness_and_row_sums_equal_captum_layer_integrated_gradients():
    model = TinyText()
    ids, mask, base = data()
    lih = LayerIntegratedHessians(model, model.embedding)
    gamma, delta = lih.attribute(ids, baselines=base, target=1, additional_forward_args=(mask,),
                                 n_steps=24, return_convergence_delta=True)
    with torch.no_grad():
        change = model(ids, mask)[:, 1] - model(base, mask)[:, 1]
    assert delta.shape == (3,)
    torch.testing.assert_close(delta, gamma.sum(dim=(1, 2)) - change, rtol=0, atol=1e-14)
    assert delta.abs().max() < 1e-9 * change.abs().max()
    # Sum_j Gamma_ij = layer IG of token i (Captum's own hooks and quadrature)
    lig = LayerIntegratedGradients(model, model.embedding)
    ig = lig.attribute(ids, baselines=base, target=1, additional_forward_args=(mask,),
                       n_steps=64, method="gausslegendre").sum(-1)
    torch.testing.assert_close(gamma.sum(2), ig, rtol=1e-7, atol=1e-9)


def test_attribute_to_layer_input_equals_previous_layer_output():
    model = TinyText()
    ids, mask, base = data()
    # mix's input is the embedding output: the two explanations are the same
    by_input = LayerIntegratedHessians(model, model.mix).attribute(
        ids, baselines=base, target=0, additional_forward_args=(mask,), n_steps=6,
        attribute_to_layer_input=True)
    by_output = LayerIntegratedHessians(model, model.embedding).attribute(
        ids, baselines=base, target=0, additional_forward_args=(mask,), n_steps=6)
    torch.testing.assert_close(by_input, by_output, rtol=0, atol=1e-10)
    # the output of mix differs (it is one layer later)
    later = LayerIntegratedHessians(model, model.mix).attribute(
        ids, baselines=base, target=0, additional_forward_args=(mask,), n_steps=6)
    assert later.shape == by_output.shape
    assert no_hooks(model)


def test_attribute_to_layer_input_float_model_matches_integrated_hessians():
    torch.manual_seed(3)
    first, second = nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 4), nn.GELU(),
                                                   nn.Linear(4, 1))
    model = nn.Sequential(first, second).to(DTYPE)
    x, x0 = torch.randn(2, 3, dtype=DTYPE), torch.randn(1, 3, dtype=DTYPE)
    lih = LayerIntegratedHessians(model, second)
    with pytest.warns(DeprecationWarning, match="grouping='full'"):
        gamma = lih.attribute(x, baselines=x0, n_steps=8, attribute_to_layer_input=True,
                              feature_mask="full")  # the deprecated alias of grouping='full'
    with torch.no_grad():
        a, a0 = first(x), first(x0)
    expected = IntegratedHessians(second).attribute(a, baselines=a0, n_steps=8)
    assert gamma.shape == (2, 4, 4)
    torch.testing.assert_close(gamma, expected, rtol=0, atol=1e-12)
    # a 2-D activation: the default groups are its single units, the same matrix
    default = lih.attribute(x, baselines=x0, n_steps=8, attribute_to_layer_input=True)
    torch.testing.assert_close(default, expected, rtol=0, atol=1e-12)
    full = lih.attribute(x, baselines=x0, n_steps=8, attribute_to_layer_input=True,
                         grouping="full")
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-12)


def test_multiply_by_inputs_false_matches_integrated_hessians():
    model = TinyText()
    ids, mask, base = data(2)
    lih = LayerIntegratedHessians(model, model.embedding, multiply_by_inputs=False)
    assert not lih.multiplies_by_inputs
    gamma = lih.attribute(ids, baselines=base, target=0, additional_forward_args=(mask,),
                          n_steps=6)
    expected = embedding_ih(model, ids, mask, base, target=0, n_steps=6,
                            feature_mask=token_mask(), ctor={"multiply_by_inputs": False})
    torch.testing.assert_close(gamma, expected, rtol=0, atol=1e-10)
    with_inputs = LayerIntegratedHessians(model, model.embedding).attribute(
        ids, baselines=base, target=0, additional_forward_args=(mask,), n_steps=6)
    assert (gamma - with_inputs).abs().max() > 1e-3


def test_internal_batch_size_and_default_zero_baseline():
    model = TinyText()
    ids, mask, _ = data()
    lih = LayerIntegratedHessians(model, model.embedding)
    ref = lih.attribute(ids, target=0, additional_forward_args=(mask,), n_steps=5)
    chunked = lih.attribute(ids, baselines=0, target=0, additional_forward_args=(mask,),
                            n_steps=5, internal_batch_size=7)
    torch.testing.assert_close(ref, chunked, rtol=0, atol=1e-12)


class Failing(TinyText):
    """Raises on the path evaluations (more rows than examples), after the layer ran."""

    def forward(self, ids, mask):
        embeds = self.embedding(ids)
        if ids.shape[0] > 3:
            raise RuntimeError("boom")
        return self.body(embeds, mask)


def test_hooks_removed_and_state_restored_when_the_call_raises():
    model = Failing().train()
    ids, mask, base = data()
    lih = LayerIntegratedHessians(model, model.embedding)
    for to_input, layer in ((False, model.embedding), (True, model.mix)):
        lih = LayerIntegratedHessians(model, layer)
        with pytest.raises(RuntimeError, match="boom"):
            lih.attribute(ids, baselines=base, target=0, additional_forward_args=(mask,),
                          attribute_to_layer_input=to_input)
        assert no_hooks(model)
        assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"feature_mask": "words"}, ValueError, "feature_mask"),
        ({"internal_batch_size": 0}, ValueError, "internal_batch_size"),
        ({"target": [0]}, ValueError, "target"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    model = TinyText()
    ids, mask, base = data()
    lih = LayerIntegratedHessians(model, model.embedding)
    with pytest.raises(error, match=match):
        lih.attribute(ids, baselines=base, additional_forward_args=(mask,),
                      **{"target": 0, **kwargs})
    assert no_hooks(model)


def test_bad_layers_raise():
    model = TinyText()
    with pytest.raises(TypeError, match="layer"):
        LayerIntegratedHessians(model, [model.embedding, model.mix])
    ids, mask, base = data()
    unused = nn.Linear(DIM, DIM).to(DTYPE)
    with pytest.raises(Exception):  # Captum's layer evaluation finds no activation
        LayerIntegratedHessians(model, unused).attribute(
            ids, baselines=base, target=0, additional_forward_args=(mask,))
    assert no_hooks(unused) and no_hooks(model)
    # the embedding's input is integer ids: not differentiable
    with pytest.raises(TypeError, match="floating point"):
        LayerIntegratedHessians(model, model.embedding).attribute(
            ids, baselines=base, target=0, additional_forward_args=(mask,),
            attribute_to_layer_input=True)


# ----------------------------------------------------------------- word pieces

TOKENS = ["[CLS]", "un", "##believ", "##able", "film", "!", "[SEP]", "[PAD]"]


def test_word_piece_groups_hand_made():
    groups, words = word_piece_groups(TOKENS)
    assert groups == [None, 0, 0, 0, 1, 2, None, None]
    assert words == ["unbelievable", "film", "!"]
    # a leading continuation piece (no previous word) starts a word
    assert word_piece_groups(["[CLS]", "##x", "y"]) == ([None, 0, 1], ["##x", "y"])


def test_merge_token_interactions_sums_pieces_and_drops_markers():
    values = torch.arange(64, dtype=DTYPE).view(8, 8)
    merged, words = merge_word_pieces(values, TOKENS)
    pieces = [[1, 2, 3], [4], [5]]
    expected = torch.tensor(
        [[float(values[a][:, b].sum()) for b in pieces] for a in
         [torch.tensor(p) for p in pieces]], dtype=DTYPE)
    assert words == ["unbelievable", "film", "!"]
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    assert merged[0, 0].item() == sum(values[i, j].item() for i in (1, 2, 3) for j in (1, 2, 3))
    groups = word_piece_groups(TOKENS)[0]
    batched = merge_token_interactions(torch.stack([values, 2 * values]), groups)
    torch.testing.assert_close(batched, torch.stack([merged, 2 * merged]))
    row = merge_token_attributions(values.sum(1), word_piece_groups(TOKENS)[0])
    torch.testing.assert_close(row, values[:, [1, 2, 3, 4, 5]][[1, 2, 3, 4, 5]].new_tensor(
        [float(values[[1, 2, 3]].sum()), float(values[4].sum()), float(values[5].sum())]))
    with pytest.raises(ValueError, match="groups"):
        merge_token_interactions(values, [0, 1])


def test_word_feature_mask_equals_merged_token_interactions():
    model = TinyText()
    ids, mask, base = data(2)
    tokens = ["[CLS]", "a", "##b", "c", "[SEP]"]
    groups, words = word_piece_groups(tokens)
    lih = LayerIntegratedHessians(model, model.embedding)
    kwargs = dict(baselines=base, target=0, additional_forward_args=(mask,), n_steps=6)
    by_token = lih.attribute(ids, **kwargs)
    by_word = lih.attribute(ids, feature_mask=word_feature_mask(groups, DIM), **kwargs)
    assert lih.last_call_cost.hvps == 6 * 2 * 4  # 2 words + 2 markers
    torch.testing.assert_close(by_word[:, :2, :2], merge_token_interactions(by_token, groups),
                               rtol=0, atol=1e-10)


# -------------------------------------------------------------- visualization

def _gamma():
    torch.manual_seed(0)
    a = torch.randn(5, 5, dtype=DTYPE)
    return a + a.T


def test_token_heatmap_renders_cells_labels_and_masked_diagonal(tmp_path):
    gamma, tokens = _gamma(), ["the", "film", "was", "not", "bad"]
    fig, ax = visualize_token_interactions(gamma, tokens, mask_diagonal=True, annotate=True,
                                           title="t", use_pyplot=False)
    assert isinstance(fig, Figure)
    image = ax.get_images()[0].get_array()
    assert image.shape == (5, 5)
    assert image.mask.sum() == 5 and all(image.mask[i, i] for i in range(5))
    np.testing.assert_allclose(image.data, gamma.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    assert len(ax.texts) == 20  # annotations off the masked diagonal
    path = tmp_path / "heatmap.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    # a (1, T, T) batch of one works; wrong label count is refused
    visualize_token_interactions(gamma[None], tokens, use_pyplot=False)
    with pytest.raises(ValueError, match="tokens"):
        visualize_token_interactions(gamma, tokens[:3], use_pyplot=False)


def test_top_pairs_bar_chart_bars_labels_and_order(tmp_path):
    gamma, tokens = _gamma(), ["the", "film", "was", "not", "bad"]
    fig, ax = visualize_top_token_pairs(gamma, tokens, k=4, use_pyplot=False)
    bars = ax.patches
    assert len(bars) == 4
    pairs = top_token_pairs(gamma, tokens, k=4)
    widths = [b.get_width() for b in sorted(bars, key=lambda b: -b.get_y())]  # top first
    np.testing.assert_allclose(widths, [v for _, _, v in pairs])
    assert abs(widths[0]) >= abs(widths[1]) >= abs(widths[2]) >= abs(widths[3])
    i, j, v = pairs[0]
    assert v == pytest.approx(2 * gamma[i, j].item()) and i < j
    by_height = dict(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()]))
    assert by_height[max(by_height)] == f"{tokens[i]} \u00d7 {tokens[j]}"  # strongest on top
    colors = {tuple(np.round(b.get_facecolor()[:3], 2)) for b in bars}
    assert colors <= {(0.0, 0.5, 0.0), (1.0, 0.0, 0.0)}
    path = tmp_path / "pairs.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    assert len(top_token_pairs(gamma, tokens, k=100)) == 10  # 5 choose 2
    assert len(top_token_pairs(gamma, tokens, k=100, include_diagonal=True)) == 15


def test_row_sums_through_captum_visualize_text(tmp_path):
    pytest.importorskip("IPython")
    gamma, tokens = _gamma(), ["the", "film", "was", "not", "bad"]
    record = token_row_sums_record(gamma, tokens, convergence_score=0.01)
    np.testing.assert_allclose(record.word_attributions.numpy(),
                               gamma.sum(1).numpy() / gamma.sum(1).abs().max().item())
    assert record.attr_score == pytest.approx(gamma.sum().item())
    html = visualize_token_row_sums([gamma, gamma], [tokens, tokens]).data
    (tmp_path / "rows.html").write_text(html)
    assert len(re.findall("<mark", html)) >= 2 * 5
    for token in tokens:
        assert token in html
