#!/usr/bin/env python3
r"""Token (and template-feature) interactions for generative language models.

:class:`LLMInteractionAttribution` joins Captum's LLM family
(:class:`captum.attr.LLMAttribution`, :class:`captum.attr.LLMGradientAttribution`):
it takes Captum's :class:`~captum.attr.TextTokenInput` /
:class:`~captum.attr.TextTemplateInput`, a target string (or token ids, or
``None`` to generate one) and explains the log-probability of the target with
:class:`~captum_interactions.LayerIntegratedHessians` on the model's input
embeddings. The answer, an :class:`LLMInteractionResult`, is the feature x
feature interaction matrix of log p(target | prompt) (and, on request, one
matrix per output token), whose row sums are the first-order sequence
attribution that ``LLMGradientAttribution(LayerIntegratedGradients(...))``
gives for the same input.
"""
import contextlib
import inspect
import warnings
from copy import copy
from dataclasses import dataclass, field
from string import Formatter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.typing import TokenizerLike
from captum.attr._core.llm_attr import (
    BaseLLMAttribution,
    LLMAttributionResult,
    _convert_ids_to_pretty_tokens,
)
from captum.attr._utils.interpretable_input import (
    InterpretableInput,
    TextTemplateInput,
    TextTokenInput,
)
from captum.log import log_usage
from torch import Tensor, nn

from captum_interactions._core.layer.layer_integrated_hessians import (
    LayerIntegratedHessians,
)
from captum_interactions._utils.common import NonFiniteResultWarning

#: Keyword arguments of LayerIntegratedHessians.attribute that this class sets itself.
_RESERVED_KWARGS = (
    "inputs",
    "baselines",
    "target",
    "additional_forward_args",
    "feature_mask",
    "return_convergence_delta",
    "attribute_to_layer_input",
)

#: Attention implementations whose backward is twice differentiable as run here.
_EAGER_ATTENTION = ("eager",)
_SDPA_ATTENTION = ("sdpa",)

#: |sum Gamma - (f(x) - f(x'))| above this fraction of |f(x) - f(x')| is reported.
COMPLETENESS_WARNING_TOLERANCE = 1e-2


class _TargetLogProbs(nn.Module):
    """log p(target | prompt) of a causal LM: (rows, 1 + K) = [total, per token].

    One forward over the prompt followed by the K target tokens (teacher
    forcing). For a causal model the logits at position P - 1 + k depend on
    the prompt and the first k target tokens only, so column 1 + k equals the
    log-probability that Captum's ``LLMGradientAttribution`` computes with one
    forward over ``prompt + target[:k]``.
    """

    def __init__(self, model: nn.Module, prompt_length: int, target_ids: Tensor) -> None:
        super().__init__()
        self.model = model
        self.prompt_length = prompt_length
        self.register_buffer("target_ids", target_ids, persistent=False)
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        # the vocabulary projection of the prompt positions is never used: models
        # that can skip it (Hugging Face's `logits_to_keep`) compute K + 1 positions
        self.keeps_logits = "logits_to_keep" in parameters

    def forward(self, input_ids: Tensor) -> Tensor:
        count = self.target_ids.shape[0]
        if self.keeps_logits:
            # the last K + 1 positions are P - 1, ..., P + K - 1; the first K predict the target
            logits = self.model(input_ids=input_ids, logits_to_keep=count + 1).logits
            start = 0
        else:
            logits = self.model(input_ids=input_ids).logits
            start = self.prompt_length - 1
        if logits.dim() == 4:  # (rows, 1, L, V) heads, as Captum handles for Llama 4
            logits = logits[:, 0]
        log_probs = torch.log_softmax(logits[:, start : start + count], dim=-1)
        index = self.target_ids.view(1, count, 1).expand(logits.shape[0], count, 1)
        per_token = log_probs.gather(-1, index).squeeze(-1)  # (rows, K)
        return torch.cat([per_token.sum(dim=1, keepdim=True), per_token], dim=1)


@dataclass
class LLMInteractionResult:
    r"""
    Interactions of the prompt's features for the log-probability of a target.

    Attributes:
        input_tokens (list[str]): labels of the F interpretable features (the
            prompt tokens of a :class:`~captum.attr.TextTokenInput`, the
            segment values of a :class:`~captum.attr.TextTemplateInput`).
        output_tokens (list[str]): the K target tokens.
        seq_interactions (Tensor): (F, F) interactions for
            log p(target | prompt), the sum over the target tokens. Row = the
            feature explained, column = the feature it interacts with; the
            diagonal holds the main effects, so the row sums are the
            first-order (Integrated Gradients) attributions.
        token_interactions (Tensor or None): (K, F, F), one matrix per output
            token (log p(y_k | prompt, y_<k)), when requested with
            ``per_output_token=True``; their sum is ``seq_interactions``.
        output_log_probs (Tensor): (K,) log p(y_k | prompt, y_<k) at the prompt.
        baseline_log_probs (Tensor): (K,) the same at the baseline prompt.
        seq_delta (float): completeness error
            sum(seq_interactions) - (log p(target | prompt) - log p(target | baseline)).
        token_delta (Tensor or None): (K,) the same per output token.
        hvps (int): Hessian-vector products the call evaluated.
        inp (InterpretableInput or None): the input that was explained.
    """

    input_tokens: List[str]
    output_tokens: List[str]
    seq_interactions: Tensor
    output_log_probs: Tensor
    baseline_log_probs: Tensor
    seq_delta: float
    token_interactions: Optional[Tensor] = None
    token_delta: Optional[Tensor] = None
    hvps: int = 0
    inp: Optional[InterpretableInput] = field(default=None, repr=False)

    @property
    def seq_attr(self) -> Tensor:
        """(F,) first-order attribution of log p(target): the row sums."""
        return self.seq_interactions.sum(dim=-1)

    @property
    def token_attr(self) -> Optional[Tensor]:
        """(K, F) first-order attribution of each output token, or None."""
        if self.token_interactions is None:
            return None
        return self.token_interactions.sum(dim=-1)

    def to_tensor(self) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The (F, F) sequence matrix; with per-token matrices, ``(seq, (K, F, F))``."""
        if self.token_interactions is None:
            return self.seq_interactions
        return self.seq_interactions, self.token_interactions

    def interactions(self, output_token: Optional[int] = None) -> Tensor:
        """The (F, F) matrix of the whole target (None) or of output token k."""
        if output_token is None:
            return self.seq_interactions
        if self.token_interactions is None:
            raise ValueError(
                "per-output-token interactions were not computed: call attribute "
                "with `per_output_token=True`"
            )
        count = len(self.output_tokens)
        if isinstance(output_token, bool) or not isinstance(output_token, int) or not (
            -count <= output_token < count
        ):
            raise ValueError(
                f"`output_token` must be an integer in [-{count}, {count}), got "
                f"{output_token!r}"
            )
        return self.token_interactions[output_token]

    def top_pair_indices(
        self, k: int = 10, output_token: Optional[int] = None, include_diagonal: bool = False
    ) -> List[Tuple[int, int, float]]:
        """The k pairs (i, j), i <= j, of largest |interaction|, strongest first.

        As feature indices (tokens may repeat, indices do not).

        A pair's value is Gamma_ij + Gamma_ji (the whole interaction of the two
        features); with ``include_diagonal`` the main effects Gamma_ii compete too.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
        matrix = self.interactions(output_token).detach().to("cpu", torch.float64)
        size = matrix.shape[0]
        rows, cols = torch.triu_indices(size, size, 0 if include_diagonal else 1)
        values = torch.where(
            rows == cols, matrix[rows, cols], matrix[rows, cols] + matrix[cols, rows]
        )
        order = torch.argsort(-values.abs(), stable=True)[:k]
        return [(int(rows[o]), int(cols[o]), float(values[o])) for o in order.tolist()]

    def top_pairs(
        self, k: int = 10, output_token: Optional[int] = None, include_diagonal: bool = False
    ) -> List[Tuple[str, str, float]]:
        """:meth:`top_pair_indices` with the features' labels: (label_i, label_j, value)."""
        return [
            (self.input_tokens[i], self.input_tokens[j], value)
            for i, j, value in self.top_pair_indices(k, output_token, include_diagonal)
        ]

    def to_llm_attribution_result(self) -> LLMAttributionResult:
        """Captum's :class:`~captum.attr.LLMAttributionResult` of the row sums.

        ``seq_attr`` (and ``token_attr`` when the per-token matrices were
        computed) are the first-order attributions, so Captum's
        ``plot_seq_attr`` / ``plot_token_attr`` work on them. For a template
        with a ``mask``, the attributions are spread back to the segments as
        Captum's ``format_attr`` does.
        """
        seq_attr, token_attr = self.seq_attr, self.token_attr
        input_tokens = list(self.input_tokens)
        if isinstance(self.inp, TextTemplateInput) and self.inp.mask is not None:
            seq_attr = self.inp.format_attr(seq_attr.unsqueeze(0))[0]
            if token_attr is not None:
                token_attr = self.inp.format_attr(token_attr)
            input_tokens = list(self.inp.values)
        return LLMAttributionResult(
            input_tokens=input_tokens,
            output_tokens=list(self.output_tokens),
            seq_attr=seq_attr,
            token_attr=token_attr,
            output_probs=self.output_log_probs.exp(),
            inp=self.inp,
        )

    def plot_interactions(self, output_token: Optional[int] = None, **kwargs: Any) -> Any:
        """Heatmap of the interaction matrix with token labels.

        See :func:`captum_interactions.visualization.visualize_llm_interactions`."""
        from captum_interactions import visualization

        return visualization.visualize_llm_interactions(self, output_token=output_token, **kwargs)

    def plot_top_pairs(
        self, k: int = 10, output_token: Optional[int] = None, **kwargs: Any
    ) -> Any:
        """Bar chart of the k strongest pairs.

        See :func:`captum_interactions.visualization.visualize_llm_top_pairs`."""
        from captum_interactions import visualization

        return visualization.visualize_llm_top_pairs(
            self, k=k, output_token=output_token, **kwargs
        )

    def plot_token_interactions(self, k: int = 8, **kwargs: Any) -> Any:
        """Heatmap of output tokens x the strongest pairs.

        See :func:`captum_interactions.visualization.visualize_llm_token_interactions`."""
        from captum_interactions import visualization

        return visualization.visualize_llm_token_interactions(self, k=k, **kwargs)

    def plot_seq_attr(self, show: bool = False) -> Any:
        """Captum's sequence attribution bar plot of the row sums."""
        return self.to_llm_attribution_result().plot_seq_attr(show=show)

    def plot_token_attr(self, show: bool = False) -> Any:
        """Captum's output token x input token heatmap of the per-token row sums."""
        return self.to_llm_attribution_result().plot_token_attr(show=show)


@dataclass
class _Prompt:
    """The prompt in token space: ids, baseline ids and the feature of every token."""

    input_ids: Tensor  # (P,)
    baseline_ids: Tensor  # (P,)
    feature_of_token: List[Optional[int]]  # feature index per prompt token, None if fixed
    feature_labels: List[str]  # F labels


def _attention_implementation(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@contextlib.contextmanager
def _twice_differentiable_attention(model: nn.Module) -> Iterator[None]:
    """Run attention with an implementation that has a double backward.

    Torch's fused SDPA kernels (flash, memory-efficient, and the CPU flash
    kernel) have no derivative of their backward; the math backend is the same
    function, written in differentiable operations, so SDPA models run with it.
    """
    implementation = _attention_implementation(model)
    if implementation is None or implementation in _EAGER_ATTENTION:
        yield
        return
    if implementation in _SDPA_ATTENTION:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    raise ValueError(
        f"the model's attention implementation {implementation!r} has no second "
        "derivative (its backward is a fused kernel). Switch the model to "
        "eager or SDPA attention, e.g. `model.set_attn_implementation('sdpa')`, "
        "or load it with `attn_implementation='eager'`; SDPA runs here with "
        "torch's math backend, which is twice differentiable"
    )


@contextlib.contextmanager
def _computed_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Cast the model's floating point parameters and buffers to ``dtype`` for
    the body; restore them bit for bit afterwards, even if the body raises.

    Widening casts (bf16/fp16 -> fp32/fp64, fp32 -> fp64) round-trip exactly,
    so parameters are converted in place (no second copy of the weights is
    kept); for other casts the original tensors are kept and put back.
    Buffers (small) are always put back as the original objects.
    """
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    buffers = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None and buf.is_floating_point() and buf.dtype != dtype
    ]
    if not params and not buffers:
        yield
        return
    restore: List[Tuple[nn.Parameter, Union[Tensor, torch.dtype]]] = []
    try:
        for param in params:
            original = param.data
            # a cast to more bits holds every value of the narrower type exactly
            exact = torch.finfo(dtype).bits > torch.finfo(original.dtype).bits
            restore.append((param, original.dtype if exact else original))
            param.data = original.to(dtype)
        for module, name, buf in buffers:
            module._buffers[name] = buf.to(dtype)
        yield
    finally:
        for param, original in restore:
            param.data = original if isinstance(original, Tensor) else param.data.to(original)
        for module, name, buf in buffers:
            module._buffers[name] = buf


def _template_segments(
    inp: TextTemplateInput, values: Sequence[str]
) -> Tuple[str, List[Tuple[int, int]]]:
    """The formatted text and the character span of every segment value."""
    template = inp.template
    if not isinstance(template, str):
        raise ValueError(
            "a TextTemplateInput with a callable template cannot be explained at "
            "token level (the position of each segment in the text is unknown); "
            "use a format string template such as '{} feels {}'"
        )
    formatter = Formatter()
    text, spans = "", [(-1, -1)] * len(values)
    auto_index = 0
    for literal, field_name, spec, conversion in formatter.parse(template):
        text += literal
        if field_name is None:
            continue
        if field_name == "":
            index = auto_index
            auto_index += 1
        elif field_name.isdigit():
            index = int(field_name)
        elif inp.dict_keys and field_name in inp.dict_keys:
            index = inp.dict_keys.index(field_name)
        else:
            raise ValueError(
                f"template field {{{field_name}}} is not supported at token level: "
                "use '{}', '{0}' or the names of the values' dict"
            )
        if spans[index] != (-1, -1):
            raise ValueError(
                f"template segment {index} appears twice in the template; each "
                "segment must appear once to be a feature group"
            )
        value = formatter.convert_field(values[index], conversion)
        value = formatter.format_field(value, spec or "")
        spans[index] = (len(text), len(text) + len(value))
        text += value
    missing = [i for i, s in enumerate(spans) if s == (-1, -1)]
    if missing:
        raise ValueError(f"template segments {missing} do not appear in the template")
    return text, spans


class LLMInteractionAttribution(BaseLLMAttribution):
    r"""
    Token x token interactions of a causal LM's prompt for the log-probability of a target.

    Integrated Hessians interactions of the prompt's tokens (or template
    features) for the log-probability a causal language model gives a target
    text, in Captum's LLM attribution family.

    It wraps :class:`~captum_interactions.LayerIntegratedHessians` on the
    model's input-embedding layer as Captum's
    :class:`~captum.attr.LLMGradientAttribution` wraps
    :class:`~captum.attr.LayerIntegratedGradients`: the embeddings of the
    prompt move on a straight line from the baseline tokens' embeddings to
    their own, and the explained output is

    .. math::
        \log p(y \mid x) = \sum_{k=1}^{K} \log p(y_k \mid x, y_{<k}),

    the log-probability of the whole target (teacher-forced, one forward pass
    over prompt + target), or of one output token at a time on request. For F
    interpretable features (tokens of a :class:`~captum.attr.TextTokenInput`,
    segments of a :class:`~captum.attr.TextTemplateInput`) the result is an
    F x F matrix at the cost of F Hessian-vector products per path point (not
    one per embedding coordinate); its row sums are the Integrated Gradients
    that ``LLMGradientAttribution(LayerIntegratedGradients(...))`` reports as
    ``seq_attr``, and all its entries add up to
    log p(y | x) - log p(y | baseline).

    **Baselines**, as Captum's gradient LLM attribution: every interpretable
    token is replaced by ``TextTokenInput``'s ``baselines`` token (default id
    0); tokens listed in ``skip_tokens`` keep their ids at the baseline, so
    they get no attribution. For a template, each segment's tokens are replaced
    by the tokens of its baseline string when that string has the same number
    of tokens in context, and by ``baseline_token`` (default id 0) otherwise
    (in particular for Captum's default empty-string baselines: an embedding
    path cannot delete tokens); the template's own text stays fixed.

    **Attention.** Second derivatives need an attention whose backward is
    differentiable: eager attention works as is; SDPA models run with torch's
    math SDPA backend for the call (the fused kernels have no double
    backward). Other implementations (e.g. flash-attention 2) raise a
    ``ValueError`` naming the fix.

    **Precision.** ``compute_dtype`` (default: the model's dtype for float32
    and float64 models, float32 for float16/bfloat16 ones) is the dtype of the
    Hessian computation. The model's floating point parameters and buffers are
    cast to it for the call (widening casts in place, so the weights are not
    held twice) and restored bit for bit afterwards. Target generation
    (``target=None``) runs in the model's own dtype, before the cast.

    Paper: https://jmlr.org/papers/v22/20-1223.html (arXiv:2002.04138)
    """

    SUPPORTED_METHODS = (LayerIntegratedHessians,)
    SUPPORTED_INPUTS = (TextTokenInput, TextTemplateInput)

    def __init__(
        self,
        attr_method: Union[LayerIntegratedHessians, nn.Module],
        tokenizer: TokenizerLike,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> None:
        r"""
        Args:
            attr_method (LayerIntegratedHessians or nn.Module): a
                :class:`~captum_interactions.LayerIntegratedHessians` built on
                a Hugging Face causal LM and its input-embedding layer, e.g.
                ``LayerIntegratedHessians(model, model.get_input_embeddings())``
                (as Captum's ``LLMGradientAttribution`` takes a
                ``LayerIntegratedGradients``), or the model itself, for which
                that instance is built.
            tokenizer (Tokenizer): the model's tokenizer (a fast tokenizer
                for :class:`~captum.attr.TextTemplateInput`, which needs
                character offsets).
            compute_dtype (torch.dtype, optional): floating point dtype of the
                Hessian computation; None chooses the model's dtype for
                float32/float64 models and float32 for half-precision ones.
                Default: None
        """
        if isinstance(attr_method, nn.Module):
            if not hasattr(attr_method, "get_input_embeddings"):
                raise TypeError(
                    "`attr_method` must be a LayerIntegratedHessians or a Hugging Face "
                    "causal LM (with `get_input_embeddings()`), got "
                    f"{type(attr_method).__name__}"
                )
            attr_method = LayerIntegratedHessians(attr_method, attr_method.get_input_embeddings())
        if not isinstance(attr_method, LayerIntegratedHessians):
            raise TypeError(
                "`attr_method` must be a LayerIntegratedHessians (on the model's input "
                f"embeddings) or the model, got {type(attr_method).__name__}"
            )
        if not isinstance(attr_method.forward_func, nn.Module):
            raise TypeError(
                "the LayerIntegratedHessians must be built on the language model "
                "itself (an nn.Module with `generate` and a `logits` output), got "
                f"{type(attr_method.forward_func).__name__}"
            )
        if not attr_method.multiplies_by_inputs:
            raise ValueError(
                "`attr_method` must multiply by inputs (multiply_by_inputs=True): "
                "without the Delta factors the interactions neither sum to the "
                "change in log-probability nor have Integrated Gradients row sums"
            )
        if compute_dtype is not None and (
            not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point
        ):
            raise TypeError(
                f"`compute_dtype` must be a floating point torch.dtype, got {compute_dtype!r}"
            )
        super().__init__(attr_method, tokenizer)
        # a shallow copy, as Captum does, so the user's instance is not changed
        self.attr_method: LayerIntegratedHessians = copy(attr_method)
        self.compute_dtype = compute_dtype
        self.last_call_cost = self.attr_method.last_call_cost

    def _compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        floats = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        model_dtype = floats[0] if floats else torch.float32
        return model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32

    def _target_ids(
        self,
        inp: InterpretableInput,
        target: Union[str, Tensor, Sequence[int], None],
        gen_args: Optional[Dict[str, Any]],
    ) -> Tensor:
        if target is not None and gen_args is not None:
            raise ValueError(
                "`gen_args` is only used to generate a target: pass it with target=None"
            )
        if isinstance(target, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
                raise TypeError("`target` as a list must hold integer token ids")
            target = torch.tensor(list(target), dtype=torch.long)
        if target is not None and not isinstance(target, (str, Tensor)):
            raise TypeError(
                "`target` must be a string, a tensor or list of token ids, or None "
                f"(generate), got {type(target).__name__}"
            )
        if target is None and not callable(getattr(self.model, "generate", None)):
            raise ValueError(
                "target=None generates the target with `model.generate`, which this "
                "model does not have: pass `target`"
            )
        with torch.no_grad():
            ids = self._get_target_tokens(inp, target, gen_args=gen_args)
        ids = torch.as_tensor(ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(
                "`target` must give a non-empty 1-D sequence of integer token ids, got "
                f"shape {tuple(ids.shape)} and dtype {ids.dtype}"
            )
        vocab = self.attr_method.layer.weight.shape[0] if hasattr(
            self.attr_method.layer, "weight") else None
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(
                f"`target` token ids must be in [0, {vocab}), got {ids.tolist()}"
            )
        return ids.long().to(self.device)

    def _prompt(self, inp: InterpretableInput, baseline_token: Union[int, str, None]) -> _Prompt:
        if isinstance(inp, TextTokenInput):
            if baseline_token is not None:
                raise ValueError(
                    "`baseline_token` applies to TextTemplateInput; for a TextTokenInput "
                    "set its `baselines` argument"
                )
            input_ids = inp.inp_tensor[0].to(self.device)
            if inp.itp_mask is None:
                interpretable = [True] * input_ids.shape[0]
            else:
                interpretable = inp.itp_mask[0].tolist()
            baseline_ids = input_ids.clone()
            baseline_ids[torch.tensor(interpretable, device=self.device)] = int(inp.baselines)
            features, count = [], 0
            for keep in interpretable:
                features.append(count if keep else None)
                count += int(keep)
            return _Prompt(input_ids, baseline_ids, features, list(inp.values))
        return self._template_prompt(inp, baseline_token)

    def _token_id(self, token: Union[int, str], name: str) -> int:
        if isinstance(token, str):
            converted = self.tokenizer.convert_tokens_to_ids([token])[0]
            if converted is None:
                raise ValueError(f"`{name}` {token!r} is not a token of the tokenizer")
            return int(converted)
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"`{name}` must be a token id (int) or a token (str), got {token!r}")
        return token

    def _encode_spans(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        try:
            encoded = self.tokenizer(text, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError) as err:
            raise ValueError(
                "TextTemplateInput needs a fast tokenizer (character offsets of the "
                f"tokens) to find each segment's tokens: {err}"
            ) from err
        ids = list(encoded["input_ids"])
        if ids != list(self.tokenizer.encode(text)):
            raise ValueError("the tokenizer's offsets do not match its `encode` of the text")
        return ids, [tuple(o) for o in encoded["offset_mapping"]]

    def _template_prompt(
        self, inp: TextTemplateInput, baseline_token: Union[int, str, None]
    ) -> _Prompt:
        fallback = self._token_id(0 if baseline_token is None else baseline_token, "baseline_token")
        text, spans = _template_segments(inp, inp.values)
        ids, offsets = self._encode_spans(text)
        segment_of_token: List[Optional[int]] = []
        for t, (start, end) in enumerate(offsets):
            hit = [s for s, (a, b) in enumerate(spans) if start < b and a < end and b > a]
            if len(hit) > 1:
                raise ValueError(
                    f"token {t} ({text[start:end]!r}) spans template segments {hit}: "
                    "segments merged into one token cannot be told apart at token "
                    "level; separate them in the template (e.g. with a space) or give "
                    "them one id in `mask`"
                )
            segment_of_token.append(hit[0] if hit else None)
        baseline_ids = list(ids)
        baselines = inp.baselines() if callable(inp.baselines) else inp.baselines
        if isinstance(baselines, dict):
            baselines = [baselines[k] for k in inp.dict_keys]
        if any(b != "" for b in baselines):
            base_text, base_spans = _template_segments(inp, baselines)
            base_ids, base_offsets = self._encode_spans(base_text)
            base_segments = [
                next(
                    (s for s, (a, b) in enumerate(base_spans) if o0 < b and a < o1 and b > a),
                    None,
                )
                for o0, o1 in base_offsets
            ]
            fixed = [i for i, seg in zip(ids, segment_of_token) if seg is None]
            base_fixed = [i for i, seg in zip(base_ids, base_segments) if seg is None]
            if fixed != base_fixed:
                raise ValueError(
                    "with the baseline strings in place, the template's own text is "
                    "tokenized differently than with the values, so the token positions "
                    "do not correspond; use baselines that keep the template's tokens "
                    "(e.g. the same leading spaces) or '' to use `baseline_token`"
                )
        for segment in range(len(inp.values)):
            positions = [t for t, s in enumerate(segment_of_token) if s == segment]
            replacement = [fallback] * len(positions)
            if baselines[segment] != "":
                base_positions = [t for t, s in enumerate(base_segments) if s == segment]
                if len(base_positions) != len(positions):
                    raise ValueError(
                        f"the baseline {baselines[segment]!r} of template segment "
                        f"{segment} has {len(base_positions)} tokens in context but the "
                        f"value {inp.values[segment]!r} has {len(positions)}: an embedding "
                        "path needs one baseline token per token. Give a baseline with "
                        "as many tokens, or '' to use `baseline_token`"
                    )
                replacement = [base_ids[t] for t in base_positions]
            for t, token in zip(positions, replacement):
                baseline_ids[t] = token
        feature_of_segment = inp.formatted_mask if inp.mask is not None else list(
            range(inp.n_features))
        features = [None if s is None else feature_of_segment[s] for s in segment_of_token]
        labels = []
        for f in range(inp.n_itp_features):
            members = [v for v, g in zip(inp.values, feature_of_segment) if g == f]
            labels.append(" + ".join(members))
        tensor = torch.tensor(ids, dtype=torch.long, device=self.device)
        return _Prompt(tensor, torch.tensor(baseline_ids, dtype=torch.long, device=self.device),
                       features, labels)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inp: InterpretableInput,
        target: Union[str, Tensor, Sequence[int], None] = None,
        gen_args: Optional[Dict[str, Any]] = None,
        per_output_token: bool = False,
        baseline_token: Union[int, str, None] = None,
        **kwargs: Any,
    ) -> LLMInteractionResult:
        r"""
        Interactions of the prompt's features for the log-probability of ``target``.

        Args:
            inp (TextTokenInput or TextTemplateInput): the prompt. Its
                interpretable features (tokens not in ``skip_tokens``, or
                template segments grouped by ``mask``) are the rows and
                columns of the result.
            target (str, Tensor, list[int] or None, optional): the response
                whose log-probability is explained: a string (tokenized without
                special tokens, as Captum does), token ids, or None to generate
                it with ``model.generate(**gen_args)``. Default: None
            gen_args (dict, optional): generation arguments when
                ``target=None``; None uses Captum's defaults (greedy, 25 new
                tokens). Default: None
            per_output_token (bool, optional): also compute one F x F matrix
                per output token (K times the cost; the sequence matrix is
                then their sum). Default: False
            baseline_token (int or str, optional): for a TextTemplateInput,
                the token that replaces each token of a segment whose
                baseline string is empty (or not given). None means id 0, as
                TextTokenInput's default. Default: None
            **kwargs: passed to
                :meth:`LayerIntegratedHessians.attribute
                <captum_interactions.LayerIntegratedHessians.attribute>`:
                ``n_steps`` (default 16), ``method`` (default ``"gausslog_graded"``),
                ``internal_batch_size`` (bounds the Hessian-vector products
                evaluated at once, hence memory, for long prompts), and any
                further option it has.

        Returns:
            **result** (LLMInteractionResult): the (F, F) interactions for
            log p(target | prompt) (and (K, F, F) per output token on
            request), row sums, completeness errors, labels and plots.

        Examples::

            >>> from captum.attr import TextTokenInput
            >>> from captum_interactions import LLMInteractionAttribution
            >>> from captum_interactions._utils.tiny_lm import tiny_gpt2, word_level_tokenizer
            >>> tokenizer = word_level_tokenizer()  # any Hugging Face tokenizer
            >>> model = tiny_gpt2(len(tokenizer), tokenizer)  # any HF causal LM
            >>> llm = LLMInteractionAttribution(model, tokenizer)
            >>> inp = TextTokenInput("the movie was not good", tokenizer,
            ...                      skip_tokens=["<bos>"])
            >>> result = llm.attribute(inp, target="sad", n_steps=8)
            >>> result.seq_interactions.shape  # (F, F) for F prompt tokens
            torch.Size([5, 5])
            >>> pairs = result.top_pairs(3)  # [(token, token, value), ...]
            >>> fig, ax = result.plot_interactions(use_pyplot=False)
        """
        if not isinstance(inp, self.SUPPORTED_INPUTS):
            raise TypeError(
                "`inp` must be a captum.attr.TextTokenInput or TextTemplateInput, got "
                f"{type(inp).__name__}"
            )
        reserved = [k for k in kwargs if k in _RESERVED_KWARGS]
        if reserved:
            raise TypeError(
                f"{reserved} are set by LLMInteractionAttribution and cannot be passed: "
                "baselines come from `inp` (and `baseline_token`), the target from "
                "`target`, the groups from the input's features"
            )
        if not isinstance(per_output_token, bool):
            raise TypeError(f"`per_output_token` must be a bool, got {per_output_token!r}")
        if self.model.training and any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.modules()
        ):
            warnings.warn(
                "the model is in training mode with active dropout: its log-probabilities "
                "are random, and so are the interactions. Call `model.eval()` first",
                stacklevel=3,  # the caller of the log_usage wrapper
            )
        prompt = self._prompt(inp, baseline_token)
        num_features = len(prompt.feature_labels)
        present = sorted({f for f in prompt.feature_of_token if f is not None})
        if not present:
            raise ValueError(
                "the prompt has no interpretable token (all of them are in "
                "`skip_tokens`, or the template's segments are empty)"
            )
        target_ids = self._target_ids(inp, target, gen_args)
        prompt_length = prompt.input_ids.shape[0]
        num_targets = target_ids.shape[0]
        input_ids = torch.cat([prompt.input_ids, target_ids]).unsqueeze(0)
        baseline_ids = torch.cat([prompt.baseline_ids, target_ids]).unsqueeze(0)
        # Positions whose embedding is the same at the input and the baseline
        # (skipped tokens, template text, the target) have Delta = 0, so they
        # add nothing to any group: they join the first feature's group
        # instead of costing a Hessian-vector product of their own.
        group_of_position = [present[0] if f is None else f for f in prompt.feature_of_token]
        group_of_position += [present[0]] * num_targets
        feature_mask = torch.tensor(group_of_position, device=self.device).view(1, -1, 1)

        forward = _TargetLogProbs(self.model, prompt_length, target_ids)
        self.attr_method.forward_func = forward
        dtype = self._compute_dtype()
        if per_output_token:
            rows = num_targets
            row_target: Any = list(range(1, num_targets + 1))
        else:
            rows, row_target = 1, 0
        try:
            with _computed_in(self.model, dtype), _twice_differentiable_attention(self.model), \
                    warnings.catch_warnings():
                # non-finite results raise below, with the log-probabilities
                warnings.simplefilter("ignore", NonFiniteResultWarning)
                interactions = self.attr_method.attribute(
                    input_ids.expand(rows, -1),
                    baselines=baseline_ids.expand(rows, -1),
                    target=row_target,
                    feature_mask=feature_mask,
                    **kwargs,
                )
                with torch.no_grad():
                    log_probs = forward(torch.cat([input_ids, baseline_ids]))
        except RuntimeError as err:
            if "derivative for" in str(err) and "not implemented" in str(err):
                raise RuntimeError(
                    f"{err}. An operation of the model has no second derivative in "
                    "torch; for attention, use `model.set_attn_implementation('eager')`"
                ) from err
            raise
        finally:
            self.attr_method.forward_func = self.model
        interactions = interactions.detach()
        self.last_call_cost = self.attr_method.last_call_cost
        if not torch.isfinite(interactions).all() or not torch.isfinite(log_probs).all():
            bad = int((~torch.isfinite(interactions)).sum())
            raise FloatingPointError(
                f"{bad} interaction entries are not finite (log-probabilities at the prompt "
                f"and the baseline: {log_probs[:, 0].tolist()}) computed in {dtype}. "
                + ("Half precision overflows in second derivatives: leave `compute_dtype` "
                   "at None (float32) or pass torch.float32."
                   if dtype in (torch.float16, torch.bfloat16) else
                   "Check the model's weights and the target (a token of probability 0 "
                   "has log-probability -inf).")
            )
        # scatter the groups present into F x F (a template segment may have no token)
        index = torch.tensor(present, device=interactions.device)
        full = interactions.new_zeros(rows, num_features, num_features)
        full[:, index.view(-1, 1), index.view(1, -1)] = interactions
        output_log_probs = log_probs[0, 1:].detach()
        baseline_log_probs = log_probs[1, 1:].detach()
        difference = (log_probs[0] - log_probs[1]).detach()
        if per_output_token:
            token_interactions = full
            seq_interactions = full.sum(dim=0)
            token_delta = full.sum(dim=(1, 2)) - difference[1:]
        else:
            token_interactions, token_delta = None, None
            seq_interactions = full[0]
        seq_delta = float(seq_interactions.sum() - difference[0])
        scale = float(difference[0].abs())
        if abs(seq_delta) > COMPLETENESS_WARNING_TOLERANCE * max(scale, 1e-6):
            warnings.warn(
                f"the interactions add up to {float(seq_interactions.sum()):.6g} but "
                f"log p(target | prompt) - log p(target | baseline) = {float(difference[0]):.6g} "
                f"(error {seq_delta:.3g}): the path integral is not resolved. Increase "
                "`n_steps`",
                stacklevel=3,  # the caller of the log_usage wrapper
            )
        return LLMInteractionResult(
            input_tokens=list(prompt.feature_labels),
            output_tokens=_convert_ids_to_pretty_tokens(target_ids.cpu(), self.tokenizer),
            seq_interactions=seq_interactions,
            token_interactions=token_interactions,
            output_log_probs=output_log_probs,
            baseline_log_probs=baseline_log_probs,
            seq_delta=seq_delta,
            token_delta=token_delta,
            hvps=self.last_call_cost.hvps,
            inp=inp,
        )

    def attribute_future(self) -> Any:
        r"""Not implemented, as for Captum's LLM attribution classes."""
        raise NotImplementedError(
            "attribute_future is not implemented for LLMInteractionAttribution"
        )
