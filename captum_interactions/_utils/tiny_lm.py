#!/usr/bin/env python3
"""Small offline causal language models for tests, benchmarks, tutorials and the demo.

Nothing is downloaded: a word-level tokenizer is built with ``tokenizers`` and
wrapped in ``transformers.PreTrainedTokenizerFast``; GPT-2 and Llama models are
built from small configs with random weights, or trained here in a few
seconds on generated text with a planted interaction (a negation that flips
the sentiment word following an adjective).
"""
import itertools
from typing import Any, List, Optional, Sequence, Tuple

import torch

#: The planted-interaction corpus: "<det> <noun> <verb> <modifier> <adjective> <label>",
#: label = "happy" when (adjective is "good") XOR (modifier is "not"), else "sad".
DETERMINERS = ("the", "a")
NOUNS = ("movie", "film", "book")
VERBS = ("was", "is")
MODIFIERS = ("not", "very")
ADJECTIVES = ("good", "bad")
LABELS = ("happy", "sad")
SPECIAL_TOKENS = ("<unk>", "<pad>", "<bos>")
NEGATION_VOCABULARY = SPECIAL_TOKENS + DETERMINERS + NOUNS + VERBS + MODIFIERS + ADJECTIVES + LABELS


def word_level_tokenizer(words: Sequence[str] = NEGATION_VOCABULARY, add_bos: bool = True) -> Any:
    """A fast word-level tokenizer over ``words`` (whitespace and punctuation split).

    The first three words must be ``<unk>``, ``<pad>`` and ``<bos>``; with
    ``add_bos`` every encoded text starts with ``<bos>`` (as Llama's tokenizer
    does), which ``TextTokenInput(..., skip_tokens=["<bos>"])`` can skip.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if tuple(words[:3]) != SPECIAL_TOKENS:
        raise ValueError(f"`words` must start with {SPECIAL_TOKENS}, got {tuple(words[:3])}")
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
        eos_token="<bos>",
    )


def _special_ids(tokenizer: Any) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def tiny_gpt2(
    vocab_size: int,
    tokenizer: Any = None,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 64,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_inner: Optional[int] = None,
) -> Any:
    """A GPT-2 with random weights, no dropout, in eval mode (MLP width
    ``n_inner``, default 2 x n_embd; GPT-2's own is 4 x n_embd)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=n_inner or 2 * n_embd,
        vocab_size=vocab_size, n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation=attn_implementation,
        **(_special_ids(tokenizer) if tokenizer is not None else {}),
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(
    vocab_size: int,
    tokenizer: Any = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Any:
    """A Llama (RoPE, RMSNorm, SiLU MLP, grouped-query attention) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
        max_position_embeddings=128, attn_implementation=attn_implementation,
        **(_special_ids(tokenizer) if tokenizer is not None else {}),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def negation_sentences() -> List[Tuple[str, str]]:
    """Every (prompt, label) of the planted-interaction corpus (48 sentences)."""
    sentences = []
    for det, noun, verb, modifier, adjective in itertools.product(
        DETERMINERS, NOUNS, VERBS, MODIFIERS, ADJECTIVES
    ):
        label = "happy" if (adjective == "good") != (modifier == "not") else "sad"
        sentences.append((f"{det} {noun} {verb} {modifier} {adjective}", label))
    return sentences


def train_negation_lm(
    tokenizer: Optional[Any] = None,
    max_steps: int = 400,
    lr: float = 3e-3,
    seed: int = 0,
) -> Tuple[Any, Any, float]:
    """Train a 2-layer GPT-2 to predict the label of the planted corpus.

    The label is an XOR of the modifier and the adjective, so log p(label)
    is a pure interaction of those two words. Training stops when the
    cross-entropy of the label falls below 0.01 (about 130 Adam steps,
    a few seconds on one CPU thread).

    Returns:
        (**model**, **tokenizer**, **loss**): the model in eval mode (float32)
        and the final label cross-entropy.
    """
    tokenizer = tokenizer if tokenizer is not None else word_level_tokenizer()
    pairs = negation_sentences()
    ids = torch.tensor([tokenizer.encode(f"{p} {label}") for p, label in pairs])
    model = tiny_gpt2(len(tokenizer), tokenizer, n_positions=16, seed=seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("inf"))
    for _ in range(max_steps):
        logits = model(input_ids=ids[:, :-1]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, ids[:, -1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return model.eval(), tokenizer, float(loss.detach())
