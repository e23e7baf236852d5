#!/usr/bin/env python3
"""The demo's section on generative language models (LLMInteractionAttribution).

``llm_section(out_dir, quick, device)`` trains a tiny GPT-2 on text with a
planted negation interaction, explains one prompt with
:class:`~captum_interactions.LLMInteractionAttribution` (and with Captum's
``LLMGradientAttribution(LayerIntegratedGradients)`` for comparison), runs the
per-output-token view on a random-weight Llama (grouped-query attention), saves
the figures in ``out_dir`` and returns the section as plain data, with
captions computed from the numbers they describe.
"""
import os
import time
from typing import Any, Dict, Union

import torch


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def llm_section(
    out_dir: str, quick: bool = False, device: Union[None, str, torch.device] = None
) -> Dict[str, Any]:
    """Run the section; returns ``{"title", "method", "seconds", "figures": [{"file",
    "title", "caption"}, ...]}`` (files relative to ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    from captum_interactions import LLMInteractionAttribution
    from captum_interactions._utils.tiny_lm import (
        tiny_llama,
        train_negation_lm,
        word_level_tokenizer,
    )

    start = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device("cpu")
    os.makedirs(out_dir, exist_ok=True)
    figures = []

    def save(fig: Any, name: str) -> str:
        fig.savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")
        plt.close(fig)
        return name

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add overhead
    try:
        model, tokenizer, loss = train_negation_lm()
        model = model.to(device)
        n_steps = 64 if quick else 128
        prompt, target = "the movie was not good", "sad"
        inp = TextTokenInput(prompt, tokenizer, baselines="<pad>", skip_tokens=["<bos>"])
        llm = LLMInteractionAttribution(model, tokenizer, compute_dtype=torch.float64)
        result = llm.attribute(inp, target=target, n_steps=n_steps)
        first_order = LLMGradientAttribution(
            LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer
        ).attribute(inp, target=target, n_steps=200)
        gap = float((result.seq_attr - first_order.seq_attr.to(result.seq_attr)).abs().max())
        change = float((result.output_log_probs - result.baseline_log_probs).sum())
        (a, b, value), (c, d, runner_up) = result.top_pairs(2)
        fig, _ = result.plot_interactions(mask_diagonal=True, use_pyplot=False, fig_size=(6, 5),
                                          title=f"'{prompt}' -> '{target}'")
        figures.append(dict(
            file=save(fig, "llm_negation_interactions.png"),
            title="Token interactions of a generative LM",
            caption=(
                f"LLMInteractionAttribution on a 2-layer GPT-2 trained here (label cross-entropy "
                f"{_fmt(loss)}) on sentences whose last word is 'sad' or 'happy' by an XOR of "
                f"the modifier ('not'/'very') and the adjective: the interactions of the prompt "
                f"'{prompt}' for log p('{target}'), from a baseline of <pad> tokens, "
                f"{n_steps} path points, {result.hvps} Hessian-vector products. The strongest "
                f"pair is '{a}' x '{b}' (pair total Γij + Γji = {_fmt(value)}, so each of "
                f"its two cells shows {_fmt(value / 2)}), next '{c}' x '{d}' "
                f"({_fmt(runner_up)}); its row sums differ from Captum's "
                f"LLMGradientAttribution(LayerIntegratedGradients) seq_attr by at most "
                f"{_fmt(gap)}."
            ),
            convergence=(
                f"Completeness error |Σ Γ − (change in log-probability)| = "
                f"{_fmt(abs(result.seq_delta))} against |change| = {_fmt(abs(change))}, "
                f"with n_steps = {n_steps}."
            ),
        ))

        words = ("<unk>", "<pad>", "<bos>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran")
        small_tokenizer = word_level_tokenizer(words)
        llama = tiny_llama(len(words), small_tokenizer).to(device)
        per_token = LLMInteractionAttribution(llama, small_tokenizer).attribute(
            TextTokenInput("the cat sat on the mat", small_tokenizer, skip_tokens=["<bos>"]),
            target="a dog ran", n_steps=8 if quick else 16, per_output_token=True)
        sum_gap = float((per_token.token_interactions.sum(0) - per_token.seq_interactions)
                        .abs().max())
        fig, _ = per_token.plot_token_interactions(k=5, use_pyplot=False)
        figures.append(dict(
            file=save(fig, "llm_per_output_token.png"),
            title="Per output token",
            caption=(
                "The strongest prompt-token pairs of log p('a dog ran' | 'the cat sat on the "
                "mat') split by output token, on a random-weight Llama configuration "
                "(grouped-query attention with 4 query and 2 key/value heads, RoPE, RMSNorm, "
                f"SDPA run with torch's math backend): {len(per_token.output_tokens)} matrices "
                f"of {len(per_token.input_tokens)} x {len(per_token.input_tokens)}, "
                f"{per_token.hvps} Hessian-vector products; they add up to the sequence matrix "
                f"up to {_fmt(sum_gap)}."
            ),
            convergence=(
                f"Completeness error of the sequence matrix: "
                f"{_fmt(float(abs(per_token.seq_delta)))}, with "
                f"n_steps = {8 if quick else 16}."
            ),
        ))
    finally:
        torch.set_num_threads(threads)
    return dict(
        title="Token interactions of a generative language model",
        method="LLMInteractionAttribution",
        seconds=time.perf_counter() - start,
        figures=figures,
    )


def llm_section_for_demo(ctx: Any, section_class: Any, figure_class: Any) -> Any:
    """Adapter for ``captum_interactions.demo``: builds its ``Section``/``Figure``."""
    data = llm_section(ctx.out_dir, ctx.quick, getattr(ctx, "device", None))
    section = section_class(data["title"], data["method"])
    section.figures = [figure_class(**f) for f in data["figures"]]
    return section


__all__ = ["llm_section", "llm_section_for_demo"]
