"""Captum idioms with this library's methods, written as a Captum user writes them.

Output layouts, ``captum.attr.visualization`` on row sums (image and text),
``TokenReferenceBase`` baselines, ``configure_interpretable_embedding_layer``
pipelines, ``captum.metrics.sensitivity_max``, and evaluating a Taylor
polynomial at a batch of points.
"""
import os

import numpy as np
import pytest
import torch
from captum.attr import (
    IntegratedGradients,
    LayerIntegratedGradients,
    TokenReferenceBase,
    configure_interpretable_embedding_layer,
    remove_interpretable_embedding_layer,
)
from captum.attr import visualization as viz
from captum.metrics import sensitivity_max
from matplotlib.figure import Figure
from torch import nn

from captum_interactions import (
    HOPE,
    ExpectedHessians,
    IntegratedHessians,
    LayerIntegratedHessians,
    SmoothHess,
)

DTYPE = torch.float64
PAD, VOCAB, LENGTH, DIM = 0, 30, 6, 4


# -- models -------------------------------------------------------------------


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(2 * 3 + 2, 6)
        self.out = nn.Linear(6, 2)
        self.to(DTYPE)

    def forward(self, a, b):
        x = torch.cat([a.flatten(1), b], dim=1)
        return self.out(torch.tanh(self.hidden(x)))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
        self.to(DTYPE)

    def forward(self, x):
        return self.head(self.conv(x))


class TinyText(nn.Module):
    """Embedding -> tanh -> attention-like pooling over tokens -> 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.mix = nn.Linear(DIM, DIM)
        self.score = nn.Linear(DIM, 1)
        self.head = nn.Linear(DIM, 2)
        self.to(DTYPE)

    def forward(self, ids):
        hidden = torch.tanh(self.mix(self.embedding(ids)))
        weights = self.score(hidden).squeeze(-1).softmax(-1)
        return self.head((weights[..., None] * hidden).sum(1))


def tabular():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 3, generator=g, dtype=DTYPE)
    b = torch.randn(3, 2, generator=g, dtype=DTYPE)
    background = (torch.randn(5, 2, 3, generator=g, dtype=DTYPE),
                  torch.randn(5, 2, generator=g, dtype=DTYPE))
    return (a, b), background


# -- output layouts -------------------------------------------------------------


def test_output_layouts_hold_the_same_matrix():
    model = TwoInputNet()
    inputs, _ = tabular()
    ih = IntegratedHessians(model)
    nested = ih.attribute(inputs, target=1, n_steps=16)
    per_input = ih.attribute(inputs, target=1, n_steps=16, output_layout="per_input")
    flat = ih.attribute(inputs, target=1, n_steps=16, output_layout="flat")
    n, d = 3, 8
    assert flat.shape == (n, d, d)
    assert [p.shape for p in per_input] == [(n, 2, 3, d), (n, 2, d)]
    assembled = torch.cat(
        [torch.cat([blk.reshape(n, x.shape[1:].numel(), -1) for blk in row], dim=2)
         for row, x in zip(nested, inputs)], dim=1)
    torch.testing.assert_close(flat, assembled, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.cat([p.reshape(n, -1, d) for p in per_input], dim=1), flat, rtol=0, atol=0)
    # row sums of the per-input layout are shaped like the inputs and are
    # Captum's Integrated Gradients (the IH row-sum axiom)
    ig = IntegratedGradients(model).attribute(inputs, target=1, n_steps=64,
                                              method="gausslegendre")
    for rows, attr in zip(per_input, ig):
        assert rows.sum(-1).shape == attr.shape
        torch.testing.assert_close(rows.sum(-1), attr, rtol=1e-8, atol=1e-10)
    # grouped output is one tensor whatever the layout
    mask = (torch.tensor([[[0, 0, 1], [1, 2, 2]]]), torch.tensor([[3, 3]]))
    grouped = ih.attribute(inputs, target=1, n_steps=6, feature_mask=mask)
    for layout in ("per_input", "flat"):
        torch.testing.assert_close(
            ih.attribute(inputs, target=1, n_steps=6, feature_mask=mask, output_layout=layout),
            grouped, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_layout"):
        ih.attribute(inputs, target=1, output_layout="rows")
    # SmoothHess: the Hessian and its standard error in the layout, SmoothGrad per input
    torch.manual_seed(0)
    hess, grad, hess_se, grad_se = SmoothHess(model).attribute(
        inputs, target=1, n_samples=8, output_layout="per_input",
        return_smoothgrad=True, return_stderr=True)
    torch.manual_seed(0)
    hess_flat, _, se_flat, _ = SmoothHess(model).attribute(
        inputs, target=1, n_samples=8, output_layout="flat",
        return_smoothgrad=True, return_stderr=True)
    torch.testing.assert_close(torch.cat([h.reshape(n, -1, d) for h in hess], 1), hess_flat,
                               rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([h.reshape(n, -1, d) for h in hess_se], 1), se_flat,
                               rtol=0, atol=0)
    assert [g.shape for g in grad] == [x.shape for x in inputs]


@pytest.mark.parametrize("order", [2, 3])
def test_hope_layouts_hold_the_same_derivative_tensor(order):
    model = TwoInputNet()
    inputs, _ = tabular()
    hope = HOPE(model)
    flat = hope.attribute(inputs, order=order, target=1, output_layout="flat")
    per_input = hope.attribute(inputs, order=order, target=1, output_layout="per_input")
    assert flat.shape == (3,) + (8,) * order
    assert per_input[0].shape == (3, 2, 3) + (8,) * (order - 1)
    torch.testing.assert_close(
        torch.cat([p.reshape((3, -1) + (8,) * (order - 1)) for p in per_input], dim=1),
        flat, rtol=0, atol=0)
    if order == 2:
        nested = hope.attribute(inputs, order=2, target=1)
        torch.testing.assert_close(nested[1][0], flat[:, 6:, :6].reshape(3, 2, 2, 3))
        # the Hessian against autograd
        a, b = inputs
        for n in range(3):
            full = torch.autograd.functional.hessian(
                lambda v: model(v[:6].reshape(1, 2, 3), v[6:].reshape(1, 2))[0, 1],
                torch.cat([a[n].reshape(-1), b[n]]))
            torch.testing.assert_close(flat[n], full, rtol=1e-10, atol=1e-12)


# -- captum.attr.visualization on row sums -----------------------------------------


def image_methods(model, images):
    background = torch.randn(4, *images.shape[1:], generator=torch.Generator().manual_seed(3),
                             dtype=DTYPE)
    return {
        "IntegratedHessians": lambda: IntegratedHessians(model).attribute(
            images, target=0, n_steps=4, output_layout="per_input"),
        "ExpectedHessians": lambda: ExpectedHessians(model).attribute(
            images, baselines=background, target=0, n_samples=8, output_layout="per_input"),
        "SmoothHess": lambda: SmoothHess(model).attribute(
            images, target=0, n_samples=8, output_layout="per_input"),
        "HOPE": lambda: HOPE(model).attribute(images, target=0, output_layout="per_input"),
        "LayerIntegratedHessians": lambda: LayerIntegratedHessians(model, model.conv).attribute(
            images, target=0, n_steps=4, grouping="full", output_layout="per_input"),
    }


@pytest.mark.parametrize("name", ["IntegratedHessians", "ExpectedHessians", "SmoothHess",
                                  "HOPE", "LayerIntegratedHessians"])
def test_visualize_image_attr_on_row_sums(name):
    model = TinyCNN()
    images = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    torch.manual_seed(0)
    rows = image_methods(model, images)[name]()
    row_sums = rows.sum(-1)  # (N, C, H, W): the layer's or the image's shape
    expected_shape = (2, 2, 4, 4) if name == "LayerIntegratedHessians" else images.shape
    assert row_sums.shape == expected_shape
    attr = np.transpose(row_sums[0].detach().numpy(), (1, 2, 0))
    fig, ax = viz.visualize_image_attr(
        attr[..., :1], np.transpose(images[0].numpy(), (1, 2, 0)),
        method="blended_heat_map", sign="all", use_pyplot=False, show_colorbar=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # image + colorbar
    fig2, _ = viz.visualize_image_attr_multiple(
        attr[..., :1], np.transpose(images[0].numpy(), (1, 2, 0)),
        ["original_image", "heat_map"], ["all", "all"], use_pyplot=False)
    assert isinstance(fig2, Figure)


def test_token_reference_base_layer_ih_row_sums_match_layer_ig_and_visualize_text():
    model = TinyText()
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4))
    reference = TokenReferenceBase(reference_token_idx=PAD).generate_reference(
        LENGTH, device=ids.device).unsqueeze(0)  # (1, T), Captum's text baseline
    lih = LayerIntegratedHessians(model, model.embedding)
    gamma, delta = lih.attribute(ids, baselines=reference, target=1, n_steps=16,
                                 return_convergence_delta=True)
    assert gamma.shape == (2, LENGTH, LENGTH)
    assert delta.abs().max() < 1e-8
    lig = LayerIntegratedGradients(model, model.embedding)
    ig = lig.attribute(ids, baselines=reference, target=1, n_steps=64,
                       method="gausslegendre").sum(-1)
    torch.testing.assert_close(gamma.sum(-1), ig, rtol=1e-7, atol=1e-9)
    # visualize_text on the token row sums, as for LayerIntegratedGradients
    with torch.no_grad():
        probs = model(ids).softmax(-1)
    row_sums = gamma.sum(-1)
    records = [
        viz.VisualizationDataRecord(
            row_sums[n] / row_sums[n].abs().max(), probs[n].max().item(),
            int(probs[n].argmax()), 1, 1, row_sums[n].sum().item(),
            [f"tok{int(t)}" for t in ids[n]], delta[n].item())
        for n in range(2)
    ]
    html = viz.visualize_text(records)
    assert "tok" in html.data and html.data.count("<tr>") >= 3


def test_interpretable_embedding_pipeline_equals_layer_integrated_hessians():
    """configure_interpretable_embedding_layer + IntegratedHessians on the embeddings
    with token groups = LayerIntegratedHessians on the embedding layer."""
    model = TinyText()
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    reference = TokenReferenceBase(reference_token_idx=PAD).generate_reference(
        LENGTH, device=ids.device).unsqueeze(0)
    expected = LayerIntegratedHessians(model, model.embedding).attribute(
        ids, baselines=reference, target=0, n_steps=8)
    with pytest.warns(UserWarning):  # Captum's own warning about the swapped layer
        interpretable = configure_interpretable_embedding_layer(model, "embedding")
    try:
        embeds = interpretable.indices_to_embeddings(ids)
        ref_embeds = interpretable.indices_to_embeddings(reference)
        token_groups = torch.arange(LENGTH).view(1, LENGTH, 1)
        gamma = IntegratedHessians(model).attribute(
            embeds, baselines=ref_embeds, target=0, n_steps=8, feature_mask=token_groups)
        full = IntegratedHessians(model).attribute(
            embeds, baselines=ref_embeds, target=0, n_steps=8)
    finally:
        remove_interpretable_embedding_layer(model, interpretable)
    assert isinstance(model.embedding, nn.Embedding)
    torch.testing.assert_close(gamma, expected, rtol=1e-10, atol=1e-12)
    assert full.shape == (2, LENGTH, DIM, LENGTH, DIM)
    torch.testing.assert_close(full.sum(dim=(2, 4)), expected, rtol=1e-10, atol=1e-12)


# -- captum.metrics.sensitivity_max -------------------------------------------------------


def offsets_perturbation(inputs, radius=0.05):
    """Deterministic perturbations (sensitivity_max repeats each example per sample)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    out = []
    for k, x in enumerate(inputs):
        steps = torch.linspace(-1.0, 1.0, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
        signs = torch.cos(torch.arange(x.shape[0], dtype=x.dtype) * (k + 1.3))
        out.append(x + radius * signs.view((-1,) + (1,) * (x.dim() - 1)) * steps)
    return tuple(out)


def sensitivity_methods(model, background):
    lih = LayerIntegratedHessians(model, model.hidden)

    def layer_explanation(inputs, **kwargs):
        # sensitivity_max expects the explanation's tuple structure to follow the
        # inputs'; a layer result is one tensor (as Captum's LayerIntegratedGradients'
        # is), so wrap it in a 1-tuple
        return (lih.attribute(inputs, **kwargs),)

    return {
        "IntegratedHessians": (IntegratedHessians(model).attribute, {"n_steps": 4}),
        "ExpectedHessians": (ExpectedHessians(model).attribute,
                             {"baselines": background, "n_samples": 6}),
        "SmoothHess": (SmoothHess(model).attribute, {"n_samples": 6}),
        "HOPE": (HOPE(model).attribute, {}),
        "LayerIntegratedHessians": (layer_explanation, {"n_steps": 4}),
    }


@pytest.mark.parametrize("name", ["IntegratedHessians", "ExpectedHessians", "SmoothHess",
                                  "HOPE", "LayerIntegratedHessians"])
def test_sensitivity_max_over_each_method_output(name):
    model = TwoInputNet()
    inputs, background = tabular()
    explain, kwargs = sensitivity_methods(model, background)[name]
    samples = 3
    torch.manual_seed(8)
    sens = sensitivity_max(explain, inputs, perturb_func=offsets_perturbation,
                           n_perturb_samples=samples, target=1, output_layout="per_input",
                           **kwargs)
    assert sens.shape == (3,)
    # the same number by hand, with the same random stream for the randomized methods
    torch.manual_seed(8)
    at_x = explain(inputs, target=1, output_layout="per_input", **kwargs)
    repeated = tuple(x.repeat_interleave(samples, dim=0) for x in inputs)
    # sensitivity_max passes its perturb_radius (default 0.02) to a 2-argument perturb_func
    at_perturbed = explain(offsets_perturbation(repeated, 0.02), target=1,
                                    output_layout="per_input", **kwargs)
    flat = lambda out: torch.cat([o.reshape(o.shape[0], -1) for o in (  # noqa: E731
        out if isinstance(out, tuple) else (out,))], dim=1)
    base = flat(at_x)
    change = (flat(at_perturbed) - base.repeat_interleave(samples, dim=0)).norm(dim=1)
    expected = (change.view(3, samples) / base.norm(dim=1, keepdim=True)).max(dim=1).values
    torch.testing.assert_close(sens, expected, rtol=1e-9, atol=1e-12)
    assert (sens > 0).all()


def test_sensitivity_max_of_ih_row_sums_equals_integrated_gradients():
    """A Captum pipeline with IG swapped for IH row sums gives the same metric."""
    model = TwoInputNet()
    inputs, _ = tabular()
    ih = IntegratedHessians(model)

    def ih_row_sums(inp, **kwargs):
        return tuple(r.sum(-1) for r in ih.attribute(inp, output_layout="per_input", **kwargs))

    ig = IntegratedGradients(model)
    ours = sensitivity_max(ih_row_sums, inputs, perturb_func=offsets_perturbation,
                           n_perturb_samples=4, target=0, n_steps=16)
    theirs = sensitivity_max(ig.attribute, inputs, perturb_func=offsets_perturbation,
                             n_perturb_samples=4, target=0, n_steps=64,
                             method="gausslegendre")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    # single-tensor inputs: sensitivity_max passes a 1-tuple, for which the
    # nested layout is a tuple of tuples; per_input works there too
    x = inputs[1]
    single = IntegratedHessians(lambda v: model(inputs[0][:1].expand(v.shape[0], 2, 3), v))
    sens = sensitivity_max(single.attribute, x, perturb_func=offsets_perturbation,
                           n_perturb_samples=2, target=0, n_steps=4, output_layout="per_input")
    assert sens.shape == (3,) and torch.isfinite(sens).all()


# -- docs/captum_parity.rst runs as written ------------------------------------------------

PARITY_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "docs", "captum_parity.rst")


def _doc_snippets():
    snippets, current = [], None
    for line in open(PARITY_DOC, encoding="utf-8").read().splitlines():
        if line.startswith(".. code-block:: python"):
            current = []
            snippets.append(current)
        elif current is not None:
            if line and not line.startswith("   "):
                current = None
            else:
                current.append(line[3:])
    return ["\n".join(s) for s in snippets]


def test_captum_parity_doc_snippets_run():
    snippets = _doc_snippets()
    assert len(snippets) == 3
    for snippet in snippets:
        torch.manual_seed(0)
        exec(compile(snippet, PARITY_DOC, "exec"), {"__name__": "__doc__"})


# -- TaylorPolynomial.evaluate on a batch of points ---------------------------------------


def test_taylor_polynomial_evaluates_any_batch_of_points_within_the_taylor_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)
    x0 = torch.tensor([[0.3, -0.2, 0.5]], dtype=DTYPE)
    order = 3
    poly = HOPE(net).expand(x0, order=order)
    directions = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    directions = directions / directions.norm(dim=1, keepdim=True)
    errors = []
    for radius in (0.2, 0.1, 0.05):
        points = x0 + radius * directions  # (M, D)
        values = poly.evaluate(points)
        assert values.shape == (40,)
        # the old (1, P, D) form gives the same numbers
        torch.testing.assert_close(values, poly.evaluate(points[None])[0], rtol=0, atol=0)
        with torch.no_grad():
            errors.append((values - net(points)[:, 0]).abs().max().item())
    # remainder O(r^(K+1)): halving r divides the error by about 2^4 = 16
    assert errors[0] / errors[1] > 10 and errors[1] / errors[2] > 10
    assert errors[2] < 1e-4
    # a grid (G1, G2, D) -> (G1, G2); one point (D,) -> (1,)
    grid = x0 + 0.05 * torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(2),
                                   dtype=DTYPE)
    assert poly.evaluate(grid).shape == (4, 5)
    torch.testing.assert_close(poly.evaluate(grid).reshape(-1),
                               poly.evaluate(grid.reshape(-1, 3)), rtol=0, atol=0)
    assert poly.evaluate(x0[0]).shape == (1,)
    # N expansion points keep the (N, P, D) form, each polynomial at its points
    centers = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    polys = HOPE(net).expand(centers, order=order)
    near = centers[:, None] + 0.01 * directions[None, :5]
    both = polys.evaluate(near)
    assert both.shape == (2, 5)
    torch.testing.assert_close(both[1], polys[1].evaluate(near[1]), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"poly\[i\]"):
        polys.evaluate(torch.zeros(5, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="last axis"):
        poly.evaluate(torch.zeros(5, 4, dtype=DTYPE))
