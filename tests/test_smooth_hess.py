import math

import pytest
import torch
from torch import nn

from captum_interactions import SmoothHess, replace_relu_with_softplus

DTYPE = torch.float64


def cpu_randn(gen, *shape):
    """Seeded CPU draw moved to the default device (CUDA test mode included)."""
    return torch.randn(*shape, generator=gen, dtype=DTYPE, device="cpu").to(
        torch.get_default_device()
    )


class ReluSum(nn.Module):
    """f(x) = sum_k a_k relu(w_k . x + b_k (+ shift)), optionally several outputs."""

    def __init__(self, d=5, k=8, outputs=1, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(cpu_randn(gen, k, d))
        self.b = nn.Parameter(cpu_randn(gen, k))
        self.a = nn.Parameter(cpu_randn(gen, k, outputs))

    def forward(self, x, shift=None):
        pre = x.reshape(x.shape[0], -1) @ self.w.T + self.b
        if shift is not None:
            pre = pre + shift[:, None]
        out = torch.relu(pre) @ self.a
        return out[:, 0] if out.shape[1] == 1 else out


def closed_form(model, x, sigma_per_feature, output=0, shift=None):
    """Smoothed Hessian and gradient of a ReluSum under N(0, diag(sigma^2)).

    w.e ~ N(0, s^2) with s^2 = sum_i w_i^2 sigma_i^2, so
    H = sum_k a_k phi(mu_k/s_k)/s_k w_k w_k^T and g = sum_k a_k Phi(mu_k/s_k) w_k.
    """
    w, b, a = model.w.detach(), model.b.detach(), model.a.detach()[:, output]
    mu = x.reshape(x.shape[0], -1) @ w.T + b
    if shift is not None:
        mu = mu + shift[:, None]
    s = ((w * sigma_per_feature) ** 2).sum(1).sqrt()
    t = mu / s
    phi = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    hess = torch.einsum("k,nk,ki,kj->nij", a, phi / s, w, w)
    grad = (a * cdf) @ w
    return hess, grad


def rms_error(
    model, x, sigma, n_samples, seeds, antithetic=True, sampler="gaussian", **options
):
    hess_true, _ = closed_form(model, x, sigma)
    errors = []
    for seed in seeds:
        torch.manual_seed(seed)
        h = SmoothHess(model).attribute(
            x, n_samples=n_samples, stdevs=sigma, antithetic=antithetic, sampler=sampler,
            **options,
        )
        errors.append(((h - hess_true) ** 2).sum())
    return torch.stack(errors).mean().sqrt().item()


def assert_unbiased(runs, truth):
    """The mean of independent runs (stacked on dim 0) within 4.5 of its
    standard errors of ``truth``, in every entry."""
    se = runs.std(0) / math.sqrt(runs.shape[0])
    assert ((runs.mean(0) - truth).abs() < 4.5 * se + 1e-12).all()


def test_relu_sum_closed_form_hessian_gradient_and_stderr():
    model = ReluSum()
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=DTYPE)
    sigma = 0.7
    hess_true, grad_true = closed_form(model, x, sigma)
    torch.manual_seed(1)
    hess, grad, hess_se, grad_se = SmoothHess(model).attribute(
        x, n_samples=40000, stdevs=sigma, return_smoothgrad=True, return_stderr=True
    )
    assert hess.shape == (3, 5, 5) and grad.shape == (3, 5)
    torch.testing.assert_close(hess, hess.transpose(1, 2), rtol=0, atol=1e-14)
    # the standard error is honest: z-scores are O(1), their mean square near 1
    z_hess = (hess - hess_true) / hess_se
    z_grad = (grad - grad_true) / grad_se
    assert z_hess.abs().max() < 4.5 and z_grad.abs().max() < 4.5
    assert 0.4 < z_hess.pow(2).mean() < 1.8
    # and small enough to catch a wrong factor (1/sigma, 1/2, sigma^2 vs sigma)
    scale = hess_true.abs().max()
    assert (hess - hess_true).abs().max() < 0.05 * scale
    assert (grad - grad_true).abs().max() < 0.02 * grad_true.abs().max()


@pytest.mark.parametrize("importance", [None, 1.7])
def test_stderr_matches_explicit_per_sample_matrices(importance):
    model = ReluSum(d=3, k=4)
    x = torch.randn(2, 3, dtype=DTYPE)
    sigma, n = 0.5, 40
    torch.manual_seed(5)
    hess, grad, hess_se, grad_se = SmoothHess(model).attribute(
        x, n_samples=n, stdevs=sigma, return_smoothgrad=True, return_stderr=True,
        sampler="gaussian", importance=importance,
    )
    # redraw the same noise and build every pair's symmetric matrix explicitly;
    # with importance sampling z ~ N(0, tau^2 I) and each term is weighted by
    # the density ratio N(z; 0, I) / N(z; 0, tau^2 I)
    torch.manual_seed(5)
    z = torch.randn(n // 2, 2, 3, dtype=DTYPE)
    tau = 1.0 if importance is None else importance
    z = tau * z
    log_ratio = (
        -0.5 * (z * z).sum(-1) + 0.5 * (z * z).sum(-1) / tau**2 + 3 * math.log(tau)
    )
    weight = log_ratio.exp()[..., None]  # (units, N, 1)
    mats, grads = [], []
    for u in range(n // 2):
        xp = (x + sigma * z[u]).requires_grad_(True)
        xm = (x - sigma * z[u]).requires_grad_(True)
        gp = torch.autograd.grad(model(xp).sum(), xp)[0]
        gm = torch.autograd.grad(model(xm).sum(), xm)[0]
        m = weight[u][:, :, None] * z[u][:, :, None] * (gp - gm)[:, None, :] / (2 * sigma)
        mats.append(0.5 * (m + m.transpose(1, 2)))
        grads.append(weight[u] * 0.5 * (gp + gm))
    mats, grads = torch.stack(mats), torch.stack(grads)
    torch.testing.assert_close(hess, mats.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grads.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hess_se, mats.std(0) / math.sqrt(n // 2), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad_se, grads.std(0) / math.sqrt(n // 2), rtol=1e-8, atol=1e-12)


def test_per_input_stdevs_anisotropic_closed_form():
    model = ReluSum(d=5, k=6, seed=3)
    x = torch.randn(4, 5, dtype=DTYPE)
    x1, x2 = x[:, :2], x[:, 2:]
    sigmas = (0.3, 1.2)
    per_feature = torch.tensor([0.3, 0.3, 1.2, 1.2, 1.2], dtype=DTYPE)
    hess_true, grad_true = closed_form(model, x, per_feature)
    torch.manual_seed(2)
    hess, grad, hess_se, _ = SmoothHess(lambda a, b: model(torch.cat([a, b], 1))).attribute(
        (x1, x2), n_samples=40000, stdevs=sigmas, return_smoothgrad=True, return_stderr=True
    )
    full = torch.cat([torch.cat(row, dim=2) for row in hess], dim=1)
    full_se = torch.cat([torch.cat(row, dim=2) for row in hess_se], dim=1)
    assert ((full - hess_true) / full_se).abs().max() < 4.5
    assert (full - hess_true).abs().max() < 0.06 * hess_true.abs().max()
    torch.testing.assert_close(torch.cat(grad, 1), grad_true, rtol=0, atol=0.03)
    # the isotropic formula with either sigma is clearly wrong here
    for s in sigmas:
        assert (closed_form(model, x, s)[0] - hess_true).abs().max() > 0.2 * hess_true.abs().max()


def test_error_falls_like_inverse_sqrt_n():
    model = ReluSum(d=4, k=6, seed=1)
    x = torch.randn(2, 4, dtype=DTYPE)
    seeds = range(12)
    small = rms_error(model, x, 0.6, 100, seeds)
    large = rms_error(model, x, 0.6, 1600, seeds)
    # 16x the samples: sqrt(16) = 4x smaller error (12 seeds: generous band)
    assert 2.8 < small / large < 5.6, small / large


def test_antithetic_pairs_lower_the_error_at_equal_cost():
    model = ReluSum(d=4, k=6, seed=2)
    x = torch.randn(2, 4, dtype=DTYPE)
    seeds = range(8)
    antithetic = rms_error(model, x, 0.5, 400, seeds, antithetic=True)
    naive = rms_error(model, x, 0.5, 400, seeds, antithetic=False)
    assert antithetic < 0.7 * naive, (antithetic, naive)
    # the naive estimator is unbiased too (odd n_samples allowed)
    torch.manual_seed(0)
    h = SmoothHess(model).attribute(
        x, n_samples=60001, stdevs=0.5, antithetic=False, sampler="gaussian"
    )
    hess_true, _ = closed_form(model, x, 0.5)
    assert (h - hess_true).abs().max() < 0.1 * hess_true.abs().max()


def test_grouped_equals_summed_full_matrix_shared_and_per_example_masks():
    model = ReluSum(d=6, k=8)
    x = torch.randn(3, 6, dtype=DTYPE)
    shared = torch.tensor([[0, 0, 2, 2, 5, 0]])
    per_example = torch.tensor([[0, 1, 1, 2, 2, 2], [3, 3, 0, 0, 1, 1], [0, 1, 2, 3, 4, 5]])
    sh = SmoothHess(model)
    torch.manual_seed(4)
    full, full_grad = sh.attribute(x, n_samples=64, stdevs=0.4, return_smoothgrad=True)
    for mask in (shared, per_example):
        torch.manual_seed(4)
        grouped, grouped_grad = sh.attribute(
            x, n_samples=64, stdevs=0.4, feature_mask=mask, return_smoothgrad=True
        )
        m = mask.expand(3, 6)
        ids = torch.unique(mask)
        onehot = (m[:, :, None] == ids).to(DTYPE)  # (N, D, G)
        expected = onehot.transpose(1, 2) @ full @ onehot
        assert grouped.shape == (3, len(ids), len(ids))
        torch.testing.assert_close(grouped, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            grouped_grad, (full_grad[:, :, None] * onehot).sum(1), rtol=1e-10, atol=1e-12
        )


def test_tuple_inputs_equal_concatenated_input_and_image_layout():
    model = ReluSum(d=6, k=8)
    x = torch.randn(2, 6, dtype=DTYPE)
    torch.manual_seed(7)
    full, grad = SmoothHess(model).attribute(x, n_samples=32, stdevs=0.3, return_smoothgrad=True)
    x_img, x_vec = x[:, :4].reshape(2, 2, 2), x[:, 4:]
    torch.manual_seed(7)
    blocks, grads = SmoothHess(
        lambda a, b: model(torch.cat([a.reshape(a.shape[0], 4), b], 1))
    ).attribute((x_img, x_vec), n_samples=32, stdevs=0.3, return_smoothgrad=True)
    assert blocks[0][0].shape == (2, 2, 2, 2, 2) and blocks[0][1].shape == (2, 2, 2, 2)
    assert blocks[1][0].shape == (2, 2, 2, 2) and blocks[1][1].shape == (2, 2, 2)
    sizes = (4, 2)
    flat = torch.cat(
        [
            torch.cat([b.reshape(2, sizes[i], sizes[j]) for j, b in enumerate(row)], dim=2)
            for i, row in enumerate(blocks)
        ],
        dim=1,
    )
    torch.testing.assert_close(flat, full, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(
        torch.cat([grads[0].reshape(2, 4), grads[1]], 1), grad, rtol=1e-12, atol=1e-13
    )
    # tuple inputs with a feature mask: one (N, G, G) tensor
    torch.manual_seed(7)
    grouped = SmoothHess(
        lambda a, b: model(torch.cat([a.reshape(a.shape[0], 4), b], 1))
    ).attribute(
        (x_img, x_vec), n_samples=32, stdevs=0.3,
        feature_mask=(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[1, 0]])),
    )
    onehot = torch.tensor([0, 0, 0, 0, 1, 0])[:, None] == torch.arange(2)
    onehot = onehot.to(DTYPE)
    torch.testing.assert_close(grouped, onehot.T @ full @ onehot, rtol=1e-10, atol=1e-12)


def test_internal_batch_size_target_and_additional_args_give_same_numbers():
    model = ReluSum(d=4, k=6, outputs=3)
    x = torch.randn(5, 4, dtype=DTYPE)
    shift = torch.randn(5, dtype=DTYPE)
    targets = [0, 2, 1, 1, 0]
    sh = SmoothHess(model)
    results = []
    for ibs in (None, 1, 3, 7, 64):
        torch.manual_seed(3)
        results.append(
            sh.attribute(
                x, target=targets, additional_forward_args=(shift,), n_samples=20,
                stdevs=0.5, internal_batch_size=ibs, return_smoothgrad=True,
                return_stderr=True,
            )
        )
        assert sh.last_call_cost.gradient_rows == 5 * 20
    for res in results[1:]:
        for a, b in zip(res, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # the target / shift reach the right examples: closed form per example
    torch.manual_seed(3)
    hess, se = sh.attribute(
        x, target=targets, additional_forward_args=(shift,), n_samples=20000, stdevs=0.5,
        internal_batch_size=4000, return_stderr=True,
    )
    for n, t in enumerate(targets):
        expected, _ = closed_form(model, x[n : n + 1], 0.5, output=t, shift=shift[n : n + 1])
        wrong, _ = closed_form(model, x[n : n + 1], 0.5, output=(t + 1) % 3)
        assert ((hess[n] - expected[0]).abs() < 4.5 * se[n] + 1e-12).all()
        assert ((hess[n] - wrong[0]).abs() > 4.5 * se[n]).any()


def test_model_unchanged_float32_and_log_usage_wrapper():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 2))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3)
    sh = SmoothHess(model)
    hess = sh.attribute(x, target=1, n_samples=16, stdevs=0.2)
    assert hess.dtype == torch.float32 and hess.shape == (4, 3, 3)
    assert hess.device == x.device
    with pytest.raises(ValueError):
        sh.attribute(x, n_samples=16)  # two outputs, no target
    assert model.training and all(m.training for m in model.modules())
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q) and p.grad is None
    assert all(p.grad is None for p in model.parameters())
    assert hasattr(SmoothHess.attribute, "__wrapped__")
    with torch.no_grad():  # NoiseTunnel-style callers
        hess_ng = sh.attribute(x, target=1, n_samples=16, stdevs=0.2)
    assert hess_ng.abs().sum() > 0


def test_bad_inputs_give_clear_errors():
    model = ReluSum(d=3, k=2)
    x = torch.randn(2, 3, dtype=DTYPE)
    sh = SmoothHess(model)
    with pytest.raises(ValueError, match="n_samples"):
        sh.attribute(x, n_samples=1)
    with pytest.raises(ValueError, match="n_samples"):
        sh.attribute(x, n_samples=7)  # odd with antithetic pairs
    with pytest.raises(ValueError, match="stdevs"):
        sh.attribute(x, stdevs=0.0)
    with pytest.raises(ValueError, match="stdevs"):
        sh.attribute(x, stdevs=-1.0)
    with pytest.raises(ValueError, match="stdevs"):
        sh.attribute((x, x), stdevs=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="return_stderr"):
        sh.attribute(x, n_samples=2, return_stderr=True)
    with pytest.raises(ValueError, match="require grad"):
        SmoothHess(lambda v: (v.detach() ** 2).sum(1)).attribute(x, n_samples=4)
    with pytest.raises(ValueError, match="internal_batch_size"):
        sh.attribute(x, n_samples=4, internal_batch_size=0)
    with pytest.raises(TypeError, match="inputs"):
        sh.attribute([x], n_samples=4)


# --- four-quadrant experiment (SmoothHess paper, sec. 5.1), test-sized -------


def smoothed_quadrant_interaction(x, sigma):
    """d^2/dx1 dx2 of sign(x1) sign(x2) convolved with N(0, sigma^2 I)."""
    phi = torch.exp(-0.5 * (x / sigma) ** 2) / math.sqrt(2 * math.pi)
    return 4 * phi[:, 0] * phi[:, 1] / sigma**2


def train_four_quadrant_net(seed=0, steps=300):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 1)
    ).to(DTYPE)
    data = torch.rand(512, 2, dtype=DTYPE) * 4 - 2
    labels = torch.sign(data[:, 0] * data[:, 1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(data)[:, 0] - labels) ** 2).mean()
        loss.backward()
        opt.step()
    return net.eval(), loss.item()


def softplus_copy(net, beta):
    """The Softplus(beta) net built by hand (independent of replace_relu_with_softplus)."""
    layers = [nn.Softplus(beta=beta) if isinstance(m, nn.ReLU) else m for m in net]
    return nn.Sequential(*layers)


def test_four_quadrant_smoothhess_follows_sigma_softplus_follows_beta_erratically():
    net, loss = train_four_quadrant_net()
    assert loss < 0.1
    points = torch.tensor([[0.0, 0.0], [0.3, 0.2], [-0.2, 0.4]], dtype=DTYPE)
    sigmas = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    sh = SmoothHess(net)
    curve = []
    for sigma in sigmas:
        torch.manual_seed(1)
        hess, se = sh.attribute(points, n_samples=2000, stdevs=sigma, return_stderr=True)
        curve.append(hess[:, 0, 1])
        torch.manual_seed(2)
        reference = sh.attribute(points, n_samples=1 << 15, stdevs=sigma)[:, 0, 1]
        # the estimate agrees with a 16x longer run within its standard error
        assert ((hess[:, 0, 1] - reference).abs() < 4.5 * se[:, 0, 1]).all()
        # the smoothed net's interaction tracks the smoothed four-quadrant label;
        # at sigma = 0.2 the net's learned boundary is blurrier than the label's
        # near (-0.2, 0.4) (2.64 there vs 1.31 for the label, 2^17 samples), so
        # that point is checked from sigma = 0.3 on
        target = smoothed_quadrant_interaction(points, sigma)
        checked = slice(None) if sigma >= 0.3 else slice(0, 2)
        assert ((reference - target).abs() < 0.25 * target)[checked].all()
    curve = torch.stack(curve)  # (sigmas, points)
    assert (curve > 0).all()
    # at the origin the interaction decays with sigma, like 2 / (pi sigma^2)
    assert (curve[1:, 0] < curve[:-1, 0]).all()

    betas = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
    softplus_curve = []
    for beta in betas:
        copy = softplus_copy(net, beta)
        hess = torch.stack([
            torch.autograd.functional.hessian(lambda v: copy(v[None])[0, 0], p)
            for p in points
        ])
        with replace_relu_with_softplus(net, beta):
            swapped = torch.stack([
                torch.autograd.functional.hessian(lambda v: net(v[None])[0, 0], p)
                for p in points
            ])
        torch.testing.assert_close(swapped, hess, rtol=1e-10, atol=1e-12)
        softplus_curve.append(hess[:, 0, 1])
    softplus_curve = torch.stack(softplus_curve)
    assert all(isinstance(m, nn.ReLU) for m in net if not isinstance(m, nn.Linear))
    # the paper's observation: away from the origin the Softplus Hessian's
    # interaction changes sign as beta grows (it probes the kinks of the
    # piecewise-linear net, not the smoothed label), while SmoothHess stays positive
    off_origin = softplus_curve[:, 1:]
    assert ((off_origin.amax(0) > 0) & (off_origin.amin(0) < 0)).any()


# --- variance-reduced samplers ------------------------------------------------


@pytest.mark.parametrize("sampler", ["orthogonal", "sobol", "gaussian"])
def test_samplers_are_unbiased_against_the_closed_form(sampler):
    # mean over seeds within its own standard error (a biased sampler, e.g.
    # fixed-norm directions, or a missing 1/sigma, fails by far more)
    model = ReluSum(d=6, k=8, seed=4)
    x = torch.randn(2, 6, dtype=DTYPE)
    hess_true, grad_true = closed_form(model, x, 0.5)
    runs, grads = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        h, g = SmoothHess(model).attribute(
            x, n_samples=24, stdevs=0.5, sampler=sampler, return_smoothgrad=True
        )
        runs.append(h)
        grads.append(g)
    runs, grads = torch.stack(runs), torch.stack(grads)
    assert_unbiased(runs, hess_true)
    assert_unbiased(grads, grad_true)


@pytest.mark.parametrize(
    "sampler, d", [("orthogonal", 6), ("sobol", 3), ("sobol", 6), ("gaussian", 6)]
)
def test_reported_stderr_covers_95_percent(sampler, d):
    # nominal 95% intervals (+-1.96 SE) over repeated seeds: coverage in [90%, 99%]
    model = ReluSum(d=d, k=8, seed=1)
    x = torch.randn(3, d, dtype=DTYPE)
    hess_true, grad_true = closed_form(model, x, 0.5)
    covered, covered_g = [], []
    for seed in range(120):
        torch.manual_seed(seed)
        h, g, se, se_g = SmoothHess(model).attribute(
            x, n_samples=512, stdevs=0.5, sampler=sampler, return_smoothgrad=True,
            return_stderr=True,
        )
        covered.append(((h - hess_true).abs() <= 1.96 * se).double().mean())
        covered_g.append(((g - grad_true).abs() <= 1.96 * se_g).double().mean())
    coverage = torch.stack(covered).mean().item()
    coverage_g = torch.stack(covered_g).mean().item()
    assert 0.90 <= coverage <= 0.99, coverage
    assert 0.90 <= coverage_g <= 0.99, coverage_g


def test_orthogonal_noise_blocks_are_orthogonal_with_gaussian_marginals():
    from captum_interactions._utils.stein import draw_noise, noise_block_sizes

    assert noise_block_sizes("orthogonal", 1000, 2, 50) == [50] * 20
    assert noise_block_sizes("orthogonal", 100, 2, 50) == [7] * 14 + [2]
    assert noise_block_sizes("sobol", 100, 2, 3) == [13] * 7 + [9]  # 8 blocks
    torch.manual_seed(0)
    z = draw_noise("orthogonal", 8, 3, 8, DTYPE, torch.device("cpu"))  # (units, N, D)
    for n in range(3):
        gram = z[:, n] @ z[:, n].T
        off = gram - torch.diag_embed(torch.diagonal(gram))
        assert off.abs().max() < 1e-12  # orthogonal within a block
    # marginals: E[z z^T] = I and E|z|^2 = D (chi radii), over many blocks
    torch.manual_seed(1)
    zs = torch.cat([draw_noise("orthogonal", 4, 50, 4, DTYPE, torch.device("cpu"))
                    for _ in range(200)]).reshape(-1, 4)
    second = zs.T @ zs / zs.shape[0]
    torch.testing.assert_close(second, torch.eye(4, dtype=DTYPE), atol=0.05, rtol=0)
    torch.manual_seed(2)
    u = draw_noise("sobol", 64, 2, 3, DTYPE, torch.device("cpu")).reshape(-1, 3)
    torch.testing.assert_close(u.mean(0), torch.zeros(3, dtype=DTYPE), atol=0.05, rtol=0)
    torch.testing.assert_close(u.var(0), torch.ones(3, dtype=DTYPE), atol=0.15, rtol=0)
    with pytest.raises(ValueError, match="sampler"):
        SmoothHess(ReluSum()).attribute(torch.randn(1, 5, dtype=DTYPE), sampler="halton")


def test_variance_reduction_at_equal_cost():
    # each structured sampler beats i.i.d. pairs where "auto" picks it: Sobol in
    # 2 features, orthogonal frames in 20 (full frames: 2048 calls = 16 x 64
    # pairs >= 16 frames of 20); benchmarks/bench_smooth_hess_samplers.py has
    # the full error-vs-calls table
    seeds = range(8)
    small = ReluSum(d=2, k=6, seed=2)
    x = torch.randn(2, 2, dtype=DTYPE)
    gaussian = rms_error(small, x, 0.3, 4096, seeds)
    sobol = rms_error(small, x, 0.3, 4096, seeds, sampler="sobol")
    assert sobol < 0.5 * gaussian, (sobol, gaussian)
    wide = ReluSum(d=20, k=32, seed=2)
    x = torch.randn(2, 20, dtype=DTYPE)
    # the samplers alone (in 20 features "auto" would also fit a surrogate)
    gaussian = rms_error(wide, x, 0.5, 2048, seeds, control_variate=None)
    orthogonal = rms_error(
        wide, x, 0.5, 2048, seeds, sampler="orthogonal", control_variate=None
    )
    assert orthogonal < 0.75 * gaussian, (orthogonal, gaussian)


def test_attribute_to_stderr_reaches_the_target_and_pools_rounds():
    model = ReluSum(d=5, k=8, seed=1)
    x = torch.randn(3, 5, dtype=DTYPE)
    hess_true, _ = closed_form(model, x, 0.5)
    sh = SmoothHess(model)
    torch.manual_seed(0)
    hess, se = sh.attribute_to_stderr(x, rel_stderr=0.02, stdevs=0.5, initial_samples=64)
    rel_se = se.flatten(1).norm(dim=1) / hess.flatten(1).norm(dim=1)
    assert (rel_se <= 0.02).all()
    assert 64 < sh.last_call_samples <= 65536
    assert sh.last_call_cost.gradient_rows == 3 * sh.last_call_samples
    # the error is of the size the standard error says
    rel_err = (hess - hess_true).flatten(1).norm(dim=1) / hess_true.flatten(1).norm(dim=1)
    assert (rel_err < 3 * 0.02).all()
    # a budget too small warns, naming the examples short of the target
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="max_samples"):
        sh.attribute_to_stderr(x, rel_stderr=1e-4, stdevs=0.5, max_samples=256)
    assert sh.last_call_samples == 256
    with pytest.raises(ValueError, match="rel_stderr"):
        sh.attribute_to_stderr(x, rel_stderr=0.0)
    with pytest.raises(ValueError, match="n_samples"):
        sh.attribute_to_stderr(x, n_samples=10)


def test_blocks_that_fit_one_pass_share_it_with_the_same_estimate():
    """Small blocks (the Sobol and orthogonal samplers draw in blocks) run in
    one gradient pass, accumulated and closed block by block: the same
    estimate and standard error as one pass per block (forced by
    ``internal_batch_size``), with one pass counted instead of eight."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.ReLU(),
                              torch.nn.Linear(12, 1)).to(DTYPE)
    f = lambda v: net(v)  # noqa: E731  (a plain function: no first-layer reductions)
    x = torch.randn(3, 4, dtype=DTYPE)
    sh = SmoothHess(f)
    results = {}
    for label, batch in (("shared", None), ("per block", 2 * 3 * 12)):
        torch.manual_seed(5)
        results[label] = sh.attribute(x, n_samples=192, stdevs=0.3, return_stderr=True,
                                      sampler="sobol", internal_batch_size=batch)
        results[label + " passes"] = sh.last_call_cost.batches
        results[label + " rows"] = sh.last_call_cost.gradient_rows
    assert results["shared passes"] == 1 and results["per block passes"] == 8
    assert results["shared rows"] == results["per block rows"] == 192 * 3
    for shared, single in zip(results["shared"], results["per block"]):
        torch.testing.assert_close(shared, single, rtol=1e-12, atol=1e-15)


def test_jumps_warn_and_kinks_do_not():
    """Stein's identity on gradients needs a continuous model. A step
    (x > 0) has a smoothed second derivative -(x/sigma^2) phi(x/sigma)/sigma,
    but its gradient is zero wherever it exists: the estimate misses it (here
    it is the x^2 term's 2 alone), and the call warns naming the step. ReLU and
    max pooling are continuous: silent."""
    import warnings

    from captum_interactions import NonSmoothModelWarning

    def step(x):
        return ((x > 0).to(x.dtype) + x * x).sum(-1, keepdim=True)

    x = torch.tensor([[0.1]], dtype=torch.float64)
    sigma = 0.1
    with pytest.warns(NonSmoothModelWarning, match=r"masks .* \(gt \(used by"):
        estimate = SmoothHess(step).attribute(x, n_samples=256, stdevs=sigma)
    u = x.item() / sigma
    exact = 2 - u * math.exp(-u * u / 2) / math.sqrt(2 * math.pi) / sigma ** 2
    assert exact < -10  # the smoothed step dominates
    assert estimate.item() == pytest.approx(2.0, abs=0.2)  # the x^2 term only: the warning

    with pytest.warns(NonSmoothModelWarning, match=r"discontinuous in its inputs: round"):
        SmoothHess(lambda x: torch.round(3 * x).sum(-1, keepdim=True) + (x * x).sum(
            -1, keepdim=True)).attribute(torch.randn(2, 3), n_samples=16)
    with pytest.warns(NonSmoothModelWarning, match=r"gradient is cut .* by detach"):
        SmoothHess(lambda x: (x.detach() * x).sum(-1, keepdim=True)).attribute(
            torch.randn(2, 3), n_samples=16)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmoothHess(lambda x: net(x.unsqueeze(1)).squeeze(1)).attribute(
            torch.randn(2, 3), n_samples=16)
