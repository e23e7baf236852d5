"""LLMInteractionAttribution on Hugging Face causal LMs built offline (GPT-2, Llama)."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from captum.attr import (  # noqa: E402
    LayerIntegratedGradients,
    LLMAttributionResult,
    LLMGradientAttribution,
    TextTemplateInput,
    TextTokenInput,
)
from matplotlib.figure import Figure  # noqa: E402

from captum_interactions import LayerIntegratedHessians, LLMInteractionAttribution  # noqa: E402
from captum_interactions._utils.tiny_lm import (  # noqa: E402
    tiny_gpt2,
    tiny_llama,
    train_negation_lm,
    word_level_tokenizer,
)

WORDS = ("<unk>", "<pad>", "<bos>", "the", "cat", "sat", "on", "a", "mat", "not", "good",
         "bad", "is", "movie", "very", "dog", "ran")
N_STEPS = 16  # Gauss rule for the -ln(t) weight
CAPTUM_STEPS = 64  # Captum's Gauss-Legendre rule for IG


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add overhead (and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer(WORDS)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_gpt2(len(WORDS), tokenizer, dtype=torch.float64)


@pytest.fixture(scope="module")
def llama(tokenizer):
    # grouped-query attention (2 key/value heads for 4 query heads), RoPE, RMSNorm,
    # SiLU; SDPA attention (run with torch's math backend for the double backward)
    return tiny_llama(len(WORDS), tokenizer, dtype=torch.float64)


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items()
    )


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def llama_family(name, tokenizer):
    """Qwen2 (biased q/k/v) and Mistral: the Llama family's RoPE, RMSNorm, SiLU, GQA."""
    import transformers

    config = getattr(transformers, f"{name}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=64,
        attn_implementation="sdpa", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).to(torch.float64).eval()


# HF's Llama-family models compute RMSNorm in float32 even in a float64 model, so
# their round-off is float32's; GPT-2 is float64 throughout
@pytest.mark.parametrize("arch, rounding", [("gpt2", 1e-12), ("llama", 1e-6),
                                            ("Qwen2", 1e-6), ("Mistral", 1e-6)])
def test_axioms_and_row_sums_equal_captum_llm_gradient_attribution(
        arch, rounding, tokenizer, gpt2, llama):
    model = {"gpt2": gpt2, "llama": llama}.get(arch) or llama_family(arch, tokenizer)
    before = state(model)
    inp = TextTokenInput("the cat sat on the mat", tokenizer, skip_tokens=["<bos>"])
    llm = LLMInteractionAttribution(
        LayerIntegratedHessians(model, model.get_input_embeddings()), tokenizer)
    result = llm.attribute(inp, target="a dog ran", n_steps=N_STEPS, per_output_token=True)
    features, outputs = 6, 3
    assert result.input_tokens == ["the", "cat", "sat", "on", "the", "mat"]
    assert result.output_tokens == ["a", "dog", "ran"]
    assert result.seq_interactions.shape == (features, features)
    assert result.token_interactions.shape == (outputs, features, features)
    # F HVPs per path point and output token, never F x embedding size
    assert result.hvps == N_STEPS * features * outputs
    scale = result.seq_interactions.abs().max()

    # symmetry and completeness, per output token and for the whole target
    assert torch.allclose(result.token_interactions, result.token_interactions.transpose(1, 2),
                          rtol=0, atol=rounding * scale)
    change = result.output_log_probs - result.baseline_log_probs
    assert torch.allclose(result.token_interactions.sum(dim=(1, 2)), change, rtol=0,
                          atol=10 * rounding * change.abs().max())
    assert abs(result.seq_delta) < 10 * rounding * float(change.sum().abs())
    assert result.token_delta.abs().max() < 10 * rounding * change.abs().max()

    # log-probabilities are the model's own (teacher-forced target after the prompt)
    ids = torch.tensor([tokenizer.encode("the cat sat on the mat a dog ran")])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits.log_softmax(-1)[0, 6:9]
    assert torch.allclose(result.output_log_probs, log_probs[[0, 1, 2], ids[0, 7:10]],
                          rtol=0, atol=rounding)

    # row sums = Captum's LLMGradientAttribution(LayerIntegratedGradients) at the same input
    captum = LLMGradientAttribution(
        LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer
    ).attribute(inp, target="a dog ran", n_steps=CAPTUM_STEPS)
    assert relative(result.seq_attr, captum.seq_attr) < 1e-4
    assert relative(result.token_attr, captum.token_attr) < 1e-4

    # the direct sequence computation = the sum of the per-token matrices
    seq_only = llm.attribute(inp, target="a dog ran", n_steps=N_STEPS)
    assert seq_only.token_interactions is None and seq_only.hvps == N_STEPS * features
    assert relative(seq_only.seq_interactions, result.seq_interactions) < 100 * rounding
    assert no_hooks(model) and same_state(model, before)


def test_template_groups_equal_summed_token_matrix(tokenizer, gpt2):
    llm = LLMInteractionAttribution(gpt2, tokenizer)
    template = TextTemplateInput("the {} sat on {}", values=["cat", "a mat"])
    grouped = llm.attribute(template, target="not good", n_steps=N_STEPS)
    assert grouped.input_tokens == ["cat", "a mat"]
    assert grouped.hvps == N_STEPS * 2  # F = 2 features: two HVPs per point
    # the same path token by token: the template's text ("the", "sat", "on") stays fixed
    tokens = TextTokenInput("the cat sat on a mat", tokenizer,
                            skip_tokens=["<bos>", "the", "sat", "on"])
    token_level = llm.attribute(tokens, target="not good", n_steps=N_STEPS)
    assert token_level.input_tokens == ["cat", "a", "mat"]
    assignment = torch.tensor([[1.0, 0, 0], [0, 1, 1]], dtype=torch.float64)
    summed = assignment @ token_level.seq_interactions @ assignment.T
    assert relative(grouped.seq_interactions, summed) < 1e-10

    # a mask joins segments into one feature: 1 x 1, the total
    joined = llm.attribute(TextTemplateInput("the {} sat on {}", values=["cat", "a mat"],
                                             mask=[0, 0]), target="not good", n_steps=N_STEPS)
    assert joined.seq_interactions.shape == (1, 1)
    assert relative(joined.seq_interactions.sum(), summed.sum()) < 1e-10
    converted = joined.to_llm_attribution_result()
    assert converted.input_tokens == ["cat", "a mat"]  # spread back as Captum's format_attr
    assert torch.allclose(converted.seq_attr, joined.seq_attr.expand(2))

    # baseline strings with as many tokens as the values are used token for token
    based = llm.attribute(TextTemplateInput("the {} sat on {}", values=["cat", "a mat"],
                                            baselines=["dog", "the movie"]),
                          target="not good", n_steps=N_STEPS)
    ids = torch.tensor([tokenizer.encode("the dog sat on the movie not good")])
    with torch.no_grad():
        expected = gpt2(input_ids=ids).logits.log_softmax(-1)[0, [6, 7], ids[0, [7, 8]]]
    assert torch.allclose(based.baseline_log_probs, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="tokens in context"):
        llm.attribute(TextTemplateInput("the {} sat on {}", values=["cat", "a mat"],
                                        baselines=["dog", "mat"]), target="not good")


def test_generation_when_target_is_none(tokenizer, llama):
    llm = LLMInteractionAttribution(llama, tokenizer)
    inp = TextTokenInput("the cat sat on", tokenizer, skip_tokens=["<bos>"])
    result = llm.attribute(inp, gen_args={"max_new_tokens": 3, "do_sample": False}, n_steps=8)
    ids = torch.tensor([tokenizer.encode("the cat sat on")])
    with torch.no_grad():
        generated = llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False)[0, 5:]
    assert result.output_tokens == tokenizer.convert_ids_to_tokens(generated.tolist())
    explicit = llm.attribute(inp, target=generated, n_steps=8)
    assert torch.equal(result.seq_interactions, explicit.seq_interactions)
    as_list = llm.attribute(inp, target=generated.tolist(), n_steps=8)
    assert torch.equal(result.seq_interactions, as_list.seq_interactions)


@pytest.mark.filterwarnings("ignore:the interactions add up")  # few path points on purpose
def test_internal_batch_size_bounds_work_without_changing_the_result(tokenizer, gpt2):
    llm = LLMInteractionAttribution(gpt2, tokenizer)
    inp = TextTokenInput("the cat sat on a mat", tokenizer, skip_tokens=["<bos>"])
    full = llm.attribute(inp, target="not good", n_steps=2, per_output_token=True)
    chunked = llm.attribute(inp, target="not good", n_steps=2, per_output_token=True,
                            internal_batch_size=3)
    assert llm.last_call_cost.batches > 1
    assert relative(chunked.token_interactions, full.token_interactions) < 1e-12


@pytest.mark.filterwarnings("ignore:the interactions add up")  # the in-dtype Hessian
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_upcast_for_the_hessian_and_restored(half, tokenizer):
    model = tiny_llama(len(WORDS), tokenizer, dtype=half)
    before = state(model)
    inp = TextTokenInput("the cat sat on the mat", tokenizer, skip_tokens=["<bos>"])
    default = LLMInteractionAttribution(model, tokenizer).attribute(inp, target="a dog", n_steps=8)
    assert default.seq_interactions.dtype == torch.float32  # the default compute dtype
    assert same_state(model, before) and all(p.dtype == half for p in model.parameters())
    # the same (half-precision) weights, Hessian in float64: the reference
    reference = LLMInteractionAttribution(model, tokenizer, compute_dtype=torch.float64).attribute(
        inp, target="a dog", n_steps=8)
    assert same_state(model, before)
    upcast_error = relative(default.seq_interactions.double(), reference.seq_interactions)
    assert upcast_error < 1e-4
    # in the model's own dtype the Hessian is far less accurate: why the default upcasts
    in_dtype = LLMInteractionAttribution(model, tokenizer, compute_dtype=half).attribute(
        inp, target="a dog", n_steps=8)
    in_dtype_error = relative(in_dtype.seq_interactions.double(), reference.seq_interactions)
    assert in_dtype_error > 10 * upcast_error
    assert same_state(model, before)
    # restored when the call raises after the cast, too
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="no second derivative"):
            LLMInteractionAttribution(model, tokenizer).attribute(inp, target="a dog")
    finally:
        model.config._attn_implementation = "sdpa"
    assert same_state(model, before) and all(p.dtype == half for p in model.parameters())


def test_trained_lm_ranks_the_planted_negation_pair_first():
    model, tokenizer, loss = train_negation_lm()
    assert loss < 0.01
    llm = LLMInteractionAttribution(model, tokenizer, compute_dtype=torch.float64)
    for prompt, planted in [("the movie was not good", ("not", "good")),
                            ("a book is very bad", ("very", "bad"))]:
        inp = TextTokenInput(prompt, tokenizer, baselines="<pad>", skip_tokens=["<bos>"])
        # the trained model switches sharply along the path from the all-<pad>
        # prompt: 128 points resolve it (completeness to 1e-5; 32 points miss by ~100%)
        result = llm.attribute(inp, target="sad", n_steps=128)
        change = float((result.output_log_probs - result.baseline_log_probs).sum())
        assert abs(result.seq_delta) < 1e-4 * abs(change)
        (first, second, value), runner_up = result.top_pairs(2)
        assert (first, second) == planted
        assert abs(value) > 5 * abs(runner_up[2])


@pytest.mark.filterwarnings("ignore:the interactions add up")
def test_result_conversions_and_plots(tokenizer, gpt2):
    llm = LLMInteractionAttribution(gpt2, tokenizer)
    inp = TextTokenInput("the cat sat on a mat", tokenizer, skip_tokens=["<bos>"])
    result = llm.attribute(inp, target="not good", n_steps=4, per_output_token=True)
    seq, per_token = result.to_tensor()
    assert seq is result.seq_interactions and per_token.shape == (2, 6, 6)
    captum = result.to_llm_attribution_result()
    assert isinstance(captum, LLMAttributionResult)
    assert torch.equal(captum.seq_attr, result.seq_attr)
    assert torch.equal(captum.token_attr, result.token_attr)
    assert torch.allclose(captum.output_probs, result.output_log_probs.exp())
    pairs, indices = result.top_pairs(3), result.top_pair_indices(3)
    matrix = result.seq_interactions
    i, j, value = indices[0]
    assert pairs[0] == (result.input_tokens[i], result.input_tokens[j], value)
    assert i < j and value == pytest.approx(float(matrix[i, j] + matrix[j, i]))
    off_diagonal = (matrix + matrix.T).triu(1).abs().max()
    assert abs(pairs[0][2]) == pytest.approx(float(off_diagonal))
    for fig, _ in [result.plot_interactions(use_pyplot=False),
                   result.plot_interactions(output_token=1, use_pyplot=False),
                   result.plot_top_pairs(3, use_pyplot=False),
                   result.plot_token_interactions(k=3, use_pyplot=False),
                   result.plot_seq_attr(), result.plot_token_attr()]:
        assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="output_token"):
        result.interactions(2)
    seq_only = llm.attribute(inp, target="not good", n_steps=2)
    with pytest.raises(ValueError, match="per_output_token=True"):
        seq_only.plot_token_interactions(use_pyplot=False)
    repeated = llm.attribute(TextTokenInput("the cat sat on the mat", tokenizer,
                                            skip_tokens=["<bos>"]), target="not", n_steps=2)
    _, ax = repeated.plot_interactions(use_pyplot=False)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["the@0", "cat", "sat", "on", "the@4", "mat"]


def test_bad_arguments_raise_clear_errors(tokenizer, gpt2):
    llm = LLMInteractionAttribution(gpt2, tokenizer)
    inp = TextTokenInput("the cat sat", tokenizer, skip_tokens=["<bos>"])
    with pytest.raises(TypeError, match="TextTokenInput or TextTemplateInput"):
        llm.attribute("the cat sat", target="a")
    with pytest.raises(ValueError, match="gen_args"):
        llm.attribute(inp, target="a", gen_args={"max_new_tokens": 2})
    with pytest.raises(TypeError, match="baselines"):
        llm.attribute(inp, target="a", baselines=0)
    with pytest.raises(ValueError, match="non-empty"):
        llm.attribute(inp, target="")
    with pytest.raises(ValueError, match=r"in \[0, 17\)"):
        llm.attribute(inp, target=[3, 99])
    with pytest.raises(ValueError, match="no interpretable token"):
        llm.attribute(TextTokenInput("the the", tokenizer, skip_tokens=["<bos>", "the"]),
                      target="a")
    with pytest.raises(ValueError, match="baseline_token"):
        llm.attribute(inp, target="a", baseline_token=0)
    with pytest.raises(ValueError, match="callable template"):
        llm.attribute(TextTemplateInput(lambda a: f"the {a}", values=["cat"]), target="a")
    with pytest.raises(ValueError, match="multiply_by_inputs"):
        LLMInteractionAttribution(LayerIntegratedHessians(
            gpt2, gpt2.get_input_embeddings(), multiply_by_inputs=False), tokenizer)
    with pytest.raises(TypeError, match="compute_dtype"):
        LLMInteractionAttribution(gpt2, tokenizer, compute_dtype=torch.int64)
    before = state(gpt2)
    gpt2.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="set_attn_implementation"):
            llm.attribute(inp, target="a")
    finally:
        gpt2.config._attn_implementation = "eager"
    assert no_hooks(gpt2) and same_state(gpt2, before)


def test_training_mode_with_dropout_warns(tokenizer):
    model = tiny_gpt2(len(WORDS), tokenizer).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    inp = TextTokenInput("the cat", tokenizer, skip_tokens=["<bos>"])
    with pytest.warns(UserWarning, match="model.eval"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the interactions add up")
        LLMInteractionAttribution(model, tokenizer).attribute(inp, target="sat", n_steps=2)
    assert model.training


def test_narrower_compute_dtype_keeps_and_restores_the_original_weights(tokenizer, gpt2):
    before = state(gpt2)
    inp = TextTokenInput("the cat sat on a mat", tokenizer, skip_tokens=["<bos>"])
    exact = LLMInteractionAttribution(gpt2, tokenizer).attribute(inp, target="not", n_steps=8)
    single = LLMInteractionAttribution(gpt2, tokenizer, compute_dtype=torch.float32).attribute(
        inp, target="not", n_steps=8)
    assert single.seq_interactions.dtype == torch.float32
    assert relative(single.seq_interactions.double(), exact.seq_interactions) < 1e-4
    assert same_state(gpt2, before) and all(p.dtype == torch.float64 for p in gpt2.parameters())


def test_non_finite_interactions_raise_and_name_the_fix(tokenizer):
    model = tiny_gpt2(len(WORDS), tokenizer, dtype=torch.float16)
    inp = TextTokenInput("the cat sat on the mat", tokenizer, skip_tokens=["<bos>"])
    # GPT-2's float16 second derivatives overflow here (measured: NaN entries)
    with pytest.raises(FloatingPointError, match="compute_dtype"):
        LLMInteractionAttribution(model, tokenizer, compute_dtype=torch.float16).attribute(
            inp, target="a dog", n_steps=8)
    result = LLMInteractionAttribution(model, tokenizer).attribute(inp, target="a dog", n_steps=8)
    assert torch.isfinite(result.seq_interactions).all()


@pytest.mark.slow
def test_demo_section_writes_figures_with_captions_from_the_numbers(tmp_path):
    from captum_interactions._demo_llm import llm_section

    section = llm_section(str(tmp_path), quick=True)
    assert section["method"] == "LLMInteractionAttribution"
    assert len(section["figures"]) == 2
    for figure in section["figures"]:
        assert (tmp_path / figure["file"]).stat().st_size > 0
    assert "The strongest pair is 'not' x 'good'" in section["figures"][0]["caption"]


def test_eager_and_sdpa_attention_give_the_same_interactions(tokenizer):
    inp = TextTokenInput("the cat sat on the mat", tokenizer, skip_tokens=["<bos>"])
    results = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_llama(len(WORDS), tokenizer, attn_implementation=implementation,
                           dtype=torch.float64)  # same seed: same weights
        results[implementation] = LLMInteractionAttribution(model, tokenizer).attribute(
            inp, target="a dog", n_steps=8).seq_interactions
        assert model.config._attn_implementation == implementation  # left as it was
    # eager Llama attention takes its softmax in float32: float32 round-off
    assert relative(results["eager"], results["sdpa"]) < 1e-5


def test_frozen_weights_and_no_grad_context_give_the_same_result(tokenizer):
    model = tiny_gpt2(len(WORDS), tokenizer, dtype=torch.float64)
    inp = TextTokenInput("the cat sat on a mat", tokenizer, skip_tokens=["<bos>"])
    llm = LLMInteractionAttribution(model, tokenizer)
    expected = llm.attribute(inp, target="not", n_steps=4).seq_interactions
    model.requires_grad_(False)  # inference setups freeze the weights
    with torch.no_grad():
        frozen = llm.attribute(inp, target="not", n_steps=4).seq_interactions
    assert relative(frozen, expected) < 1e-12  # float64 round-off (another graph)
    assert not any(p.requires_grad for p in model.parameters())
