#!/usr/bin/env python3
"""The tutorial notebook on token interactions for generative language models.

``llm_notebook()`` returns the nbformat notebook (cells and metadata, not
executed); ``tutorials/make_tutorials.py`` writes and executes it. It reads
``CI_SMALL=1`` to shrink its settings. Nothing is downloaded: the models are
built from small configs (random weights) or trained in the notebook.
"""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

#: file name of the written notebook
NOTEBOOK_NAME = "LLM_token_interactions.ipynb"
#: public names the notebook uses (it is only written when they exist)
REQUIRES = ["LLMInteractionAttribution", "LayerIntegratedHessians"]
#: packages beyond the `tutorials` extra
REQUIRES_PACKAGES = ["transformers", "tokenizers"]


def _md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def _code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip("\n"))


def llm_cells() -> list:
    return [
        _md(r"""
# Token interactions for generative language models

Captum explains a language model's answer with
`LLMAttribution` / `LLMGradientAttribution`: how much each prompt token
contributes to the log-probability of the target text. Those are *first-order*
scores. When the answer depends on two words **together** (a negation flipping
an adjective, a subject agreeing with its verb), each word's score mixes the
pair's effect with its own and nothing says which words act together.

`LLMInteractionAttribution` is the second-order member of Captum's LLM family.
It wraps `LayerIntegratedHessians` on the model's input embeddings and explains

$$\log p(y \mid x) = \sum_k \log p(y_k \mid x, y_{<k})$$

with an $F \times F$ matrix $\Gamma$ over the $F$ prompt features (tokens of a
`TextTokenInput`, segments of a `TextTemplateInput`): $\Gamma_{ij} + \Gamma_{ji}$
is the part of the change in log-probability (from the baseline prompt to the
real one) that features $i$ and $j$ produce together, the diagonal holds the
main effects, **each row sums to the Integrated Gradients that Captum's
`LLMGradientAttribution(LayerIntegratedGradients)` reports**, and the whole
matrix sums to $\log p(y\mid x) - \log p(y \mid x')$. It costs $F$
Hessian-vector products per path point, not one per embedding coordinate.
"""),
        _md(r"""
**Note:** this tutorial needs the `tutorials` and `text` extras:
`pip install "captum-interactions[tutorials,text]"` (for `transformers`). It
runs on CPU in a minute or two; nothing is downloaded (the models are trained
here or built with random weights). Set `CI_SMALL=1` in the environment for a
quick smoke run with smaller settings.
"""),
        _code(r"""
%matplotlib inline
import os
import warnings

# tqdm.auto (imported by Captum) warns in notebooks without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt
import torch
from captum.attr import (LayerIntegratedGradients, LLMGradientAttribution, TextTemplateInput,
                         TextTokenInput)

from captum_interactions import LayerIntegratedHessians, LLMInteractionAttribution
from captum_interactions._utils.tiny_lm import (negation_sentences, tiny_llama,
                                                train_negation_lm, word_level_tokenizer)

SMALL = os.environ.get("CI_SMALL") == "1"  # the test suite runs every notebook small
N_STEPS = 64 if SMALL else 128
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: threads only add overhead
"""),
        _md(r"""
## A language model with a planted interaction

The training text is every sentence "*det noun verb modifier adjective label*"
of a small grammar, where the label is `happy` when the adjective is `good`
**xor** the modifier is `not`, and `sad` otherwise. So log p(`sad`) is, by
construction, an interaction of the modifier and the adjective: neither word
alone says anything about the label. A two-layer GPT-2 (word-level tokenizer,
random start) learns it in a few seconds.
"""),
        _code(r"""
for prompt, label in negation_sentences()[:4]:
    print(f"{prompt} -> {label}")
model, tokenizer, loss = train_negation_lm()
print(f"label cross-entropy after training: {loss:.4f}")
"""),
        _md(r"""
## First order: Captum's LLMGradientAttribution

Each prompt token is replaced by `<pad>` at the baseline (`TextTokenInput`'s
`baselines`); the `<bos>` token the tokenizer adds is skipped.
"""),
        _code(r"""
inp = TextTokenInput("the movie was not good", tokenizer, baselines="<pad>",
                     skip_tokens=["<bos>"])
lig = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()),
                             tokenizer)
first_order = lig.attribute(inp, target="sad", n_steps=200)
for token, value in first_order.seq_attr_dict.items():
    print(f"{token:>6s} {value:+.3f}")
first_order.plot_seq_attr(show=True)
"""),
        _md(r"""
## Second order: LLMInteractionAttribution

The same input, target and baseline. The class takes a
`LayerIntegratedHessians` on the input embeddings (as Captum's class takes a
`LayerIntegratedGradients`), or the model itself. The model runs in float32;
`compute_dtype=torch.float64` computes the Hessian in float64 (the weights are
cast for the call and restored bit for bit).
"""),
        _code(r"""
llm = LLMInteractionAttribution(
    LayerIntegratedHessians(model, model.get_input_embeddings()), tokenizer,
    compute_dtype=torch.float64)
result = llm.attribute(inp, target="sad", n_steps=N_STEPS)
change = float((result.output_log_probs - result.baseline_log_probs).sum())
print(f"log p(sad | prompt) - log p(sad | baseline) = {change:.4f}")
print(f"sum of all interactions                     = {float(result.seq_interactions.sum()):.4f}")
interaction_hvps = N_STEPS * len(result.input_tokens)
print(f"Hessian-vector products: {result.hvps} = {N_STEPS} path points x "
      f"{len(result.input_tokens)} tokens"
      + (f" + {result.hvps - interaction_hvps} single-direction ones that place the points"
         if result.hvps > interaction_hvps else ""))
row_sum_gap = (result.seq_attr - first_order.seq_attr.double()).abs().max()
print(f"largest |row sum - Captum's seq_attr|: {row_sum_gap:.2e}")
top = result.top_pairs(3)
for a, b, value in top:
    print(f"{a:>6s} x {b:<6s} {value:+.3f}")
"""),
        _code(r"""
# the planted pair is the strongest interaction (checked, so this text stays true)
assert top[0][:2] == ("not", "good") and abs(top[0][2]) > 5 * abs(top[1][2]), top
fig, ax = result.plot_interactions(mask_diagonal=True)
fig, ax = result.plot_top_pairs(k=5)
"""),
        _md(r"""
The first-order scores above spread the label's change over `not` and `good`
(and a little over the rest); the interaction matrix says that the two act
*together*: $\Gamma_{\text{not},\text{good}} + \Gamma_{\text{good},\text{not}}$
is the largest pair, more than five times the next one (checked above).

If completeness is off by more than 1% of the change in log-probability, the
call warns and names the fix (more `n_steps`): a trained model can switch
sharply along the path from the all-`<pad>` prompt, and a few path points
then miss the switch.

## Template features: interactions of phrases

With a `TextTemplateInput`, the segments are the features: a template with F
segments gives an F x F matrix at the cost of F Hessian-vector products per
path point, and the template's own text stays fixed. Segments with an empty
baseline (Captum's default, "remove the segment") have each token replaced by
`baseline_token`, since a path in embedding space cannot delete tokens; a
baseline string with as many tokens as the value is used token for token.
"""),
        _code(r"""
template = TextTemplateInput("{} was {} {}", values=["a book", "very", "bad"])
phrases = llm.attribute(template, target="sad", n_steps=N_STEPS, baseline_token="<pad>")
print(phrases.input_tokens, f"({phrases.hvps} Hessian-vector products)")
print(phrases.seq_interactions)
print("strongest pair:", phrases.top_pairs(1))
fig, ax = phrases.plot_interactions()
"""),
        _md(r"""
## Per output token, on a Llama-family model

`per_output_token=True` adds one matrix per target token (log p(y_k | x, y_<k)),
K times the cost; their sum is the sequence matrix. Here a Llama
configuration with grouped-query attention (4 query heads, 2 key/value
heads), RoPE, RMSNorm and a SiLU MLP, random weights, SDPA attention: the
class runs SDPA with torch's math backend for the call, the one SDPA kernel
with a second derivative.
"""),
        _code(r"""
words = ("<unk>", "<pad>", "<bos>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "away")
small_tokenizer = word_level_tokenizer(words)
llama = tiny_llama(len(words), small_tokenizer)
llama_llm = LLMInteractionAttribution(llama, small_tokenizer)
prompt = TextTokenInput("the cat sat on the mat", small_tokenizer, skip_tokens=["<bos>"])
per_token = llama_llm.attribute(prompt, target="a dog ran", n_steps=16, per_output_token=True)
print("output tokens:", per_token.output_tokens)
print("per-token matrices:", tuple(per_token.token_interactions.shape))
# the per-token matrices add up to the matrix of the whole target, computed on its own here
whole = llama_llm.attribute(prompt, target="a dog ran", n_steps=16).seq_interactions
gap = (per_token.token_interactions.sum(0) - whole).abs().max() / whole.abs().max()
print(f"relative gap between the summed per-token matrices and the sequence matrix: {gap:.1e}")
fig, ax = per_token.plot_token_interactions(k=6)
fig, ax = per_token.plot_token_attr()  # Captum's first-order view of the row sums
"""),
        _md(r"""
`target=None` generates the target first (`gen_args`, greedy by default, as
in Captum), in the model's own dtype:
"""),
        _code(r"""
generated = llama_llm.attribute(prompt, gen_args={"max_new_tokens": 2, "do_sample": False},
                                n_steps=8)
print("generated:", generated.output_tokens, " top pair:", generated.top_pairs(1))
"""),
        _md(r"""
## Practical notes

- **Cost.** F Hessian-vector products per path point (F = interpretable
  tokens or template features), times K with `per_output_token=True`.
  `internal_batch_size` bounds how many are evaluated at once, and so the
  memory, without changing the result: use it for long prompts.
- **Attention.** Eager attention works as is; SDPA runs with the math
  backend for the call; other implementations (flash-attention 2, ...) raise
  an error that names the fix (`model.set_attn_implementation("sdpa")`).
- **Precision.** float16/bfloat16 models are cast to float32 for the
  Hessian (`compute_dtype`), then restored bit for bit; in the model's own
  half precision the second derivatives lose most of their digits.
- **Baselines** are Captum's: `TextTokenInput(baselines=...)` (default id
  0), `skip_tokens` kept fixed, so the row sums match
  `LLMGradientAttribution(LayerIntegratedGradients(...))`.
- **Convert** with `result.to_llm_attribution_result()` to Captum's
  `LLMAttributionResult` of the row sums (`plot_seq_attr`, `plot_token_attr`).
"""),
    ]


def llm_notebook() -> nbformat.NotebookNode:
    """The notebook (not executed), with a Python 3 kernelspec."""
    notebook = new_notebook(cells=llm_cells())
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook
