"""SmoothHess's exact variance reductions: input-subspace projection and the
first-layer ReLU control variate (``input_subspace``, ``control_variate``).

Both must keep the estimator unbiased (mean over seeds within its standard
error of a closed form) and the reported standard error honest (95% intervals
cover 90-99%)."""
import math
import warnings

import pytest
import torch
from torch import nn

from captum_interactions import SmoothHess
from tests.test_smooth_hess import assert_unbiased

DTYPE = torch.float64
SQRT2PI = math.sqrt(2 * math.pi)


class Square(nn.Module):
    def forward(self, x):
        return x * x


def squared_relu_net(d, k, seed):
    """f(x) = sum_j c_j relu(w_j . x + b_j)^2: a first Linear + ReLU whose
    smoothed Hessian is known but is not the surrogate's (v depends on x)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, k), nn.ReLU(), Square(), nn.Linear(k, 1, bias=False))
    net = net.to(DTYPE)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return net


def squared_relu_closed_form(net, x, sigma):
    """E[relu(u + s e)^2]'' = 2 Phi(u/s), ' = 2 (s phi(u/s) + u Phi(u/s))."""
    w, b, c = net[0].weight.detach(), net[0].bias.detach(), net[3].weight.detach()[0]
    u = x @ w.T + b
    s = sigma * w.norm(dim=1)
    t = u / s
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    pdf = torch.exp(-0.5 * t * t) / SQRT2PI
    hess = torch.einsum("k,nk,ki,kj->nij", c, 2 * cdf, w, w)
    grad = (c * 2 * (s * pdf + u * cdf)) @ w
    return hess, grad


def relu_net(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, k), nn.ReLU(), nn.Linear(k, 2)).to(DTYPE)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return net


def relu_net_closed_form(net, x, sigma, output):
    w, b, a = net[0].weight.detach(), net[0].bias.detach(), net[2].weight.detach()[output]
    u = x.reshape(x.shape[0], -1) @ w.T + b
    s = sigma * w.norm(dim=1)
    t = u / s
    pdf = torch.exp(-0.5 * t * t) / SQRT2PI
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return torch.einsum("k,nk,ki,kj->nij", a, pdf / s, w, w), (a * cdf) @ w


def test_one_hidden_layer_is_exact_with_the_control_variate():
    # f = a.relu(Wx + b) + c is its own surrogate: f - g is constant, so any
    # sample count returns the closed form (checks the surrogate's exact
    # smoothed Hessian and gradient, a wrong phi/s or Phi fails by far)
    net = relu_net(d=7, k=4, seed=0)
    x = torch.randn(3, 7, dtype=DTYPE)
    hess_true, grad_true = relu_net_closed_form(net, x, 0.3, output=1)
    sh = SmoothHess(net)
    torch.manual_seed(0)
    h, g = sh.attribute(x, target=1, n_samples=4, stdevs=0.3, return_smoothgrad=True)
    assert sh.last_call_control_variate and sh.last_call_subspace_rank == 4
    torch.testing.assert_close(h, hess_true, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g, grad_true, atol=1e-10, rtol=1e-10)
    # one extra gradient row per example for the surrogate's slopes
    assert sh.last_call_cost.gradient_rows == 3 * 4 + 3
    # without it the same model is a noisy estimate
    torch.manual_seed(0)
    h_plain = sh.attribute(x, target=1, n_samples=4, stdevs=0.3, control_variate=None)
    assert (h_plain - hess_true).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["orthogonal", "sobol", "gaussian"])
def test_projection_and_control_variate_are_unbiased(sampler):
    # rank-5 projection of 12 features + a surrogate that is not exact: the
    # mean over seeds stays within its standard error of the closed form (a
    # projection onto the wrong subspace, or a control variate without its
    # exact mean, fails by far more)
    net = squared_relu_net(d=12, k=5, seed=3)
    x = torch.randn(2, 12, dtype=DTYPE)
    hess_true, grad_true = squared_relu_closed_form(net, x, 0.4)
    sh = SmoothHess(net)
    runs, grads = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        h, g = sh.attribute(
            x, n_samples=24, stdevs=0.4, sampler=sampler, return_smoothgrad=True
        )
        runs.append(h)
        grads.append(g)
    assert sh.last_call_subspace_rank == 5 and sh.last_call_control_variate
    runs, grads = torch.stack(runs), torch.stack(grads)
    assert_unbiased(runs, hess_true)
    assert_unbiased(grads, grad_true)


@pytest.mark.parametrize("sampler", ["orthogonal", "gaussian"])
def test_reported_stderr_covers_95_percent_with_variance_reduction(sampler):
    net = squared_relu_net(d=12, k=5, seed=1)
    x = torch.randn(3, 12, dtype=DTYPE)
    hess_true, grad_true = squared_relu_closed_form(net, x, 0.4)
    sh = SmoothHess(net)
    covered, covered_g = [], []
    for seed in range(120):
        torch.manual_seed(seed)
        h, g, se, se_g = sh.attribute(
            x, n_samples=512, stdevs=0.4, sampler=sampler, return_smoothgrad=True,
            return_stderr=True,
        )
        # entries outside the projected subspace are exactly 0 with SE 0
        inside = se > 0
        covered.append(((h - hess_true).abs() <= 1.96 * se)[inside].double().mean())
        covered_g.append(((g - grad_true).abs() <= 1.96 * se_g).double().mean())
    coverage = torch.stack(covered).mean().item()
    coverage_g = torch.stack(covered_g).mean().item()
    assert 0.90 <= coverage <= 0.99, coverage
    assert 0.90 <= coverage_g <= 0.99, coverage_g


def test_variance_reduction_on_a_two_layer_relu_net():
    # the error spread over seeds (no closed form needed: the estimators are
    # unbiased) at equal gradient calls, i.i.d. antithetic pairs vs the default
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    ).to(DTYPE)
    x = torch.randn(2, 40, dtype=DTYPE)
    sh = SmoothHess(net)

    def spread(**options):
        runs = []
        for seed in range(12):
            torch.manual_seed(100 + seed)
            runs.append(sh.attribute(x, n_samples=512, stdevs=0.5, **options))
        runs = torch.stack(runs)
        return (runs - runs.mean(0)).pow(2).sum().sqrt().item(), runs.mean(0)

    reference, ref_mean = spread(sampler="gaussian", input_subspace=None, control_variate=None)
    default, default_mean = spread()
    assert sh.last_call_subspace_rank == 16 and sh.last_call_control_variate
    assert default < 0.5 * reference, (default, reference)
    # and they estimate the same matrix
    diff = (default_mean - ref_mean).norm() / ref_mean.norm()
    assert diff < 3 * reference / math.sqrt(12) / ref_mean.norm(), diff


def test_explicit_subspace_unbiased_and_wrong_one_raises():
    from tests.test_smooth_hess import ReluSum, closed_form

    model = ReluSum(d=9, k=3, seed=5)  # not a Sequential: "auto" sees nothing
    x = torch.randn(2, 9, dtype=DTYPE)
    hess_true, _ = closed_form(model, x, 0.5)
    sh = SmoothHess(model)
    torch.manual_seed(0)
    sh.attribute(x, n_samples=8, stdevs=0.5)
    assert sh.last_call_subspace_rank is None and not sh.last_call_control_variate
    runs = []
    for seed in range(40):
        torch.manual_seed(seed)
        runs.append(sh.attribute(x, n_samples=32, stdevs=0.5, input_subspace=model.w))
    assert sh.last_call_subspace_rank == 3
    runs = torch.stack(runs)
    assert_unbiased(runs, hess_true)
    # a subspace the model does not live in is caught before sampling
    wrong = torch.randn(3, 9, dtype=DTYPE)
    with pytest.raises(ValueError, match="outside `input_subspace`"):
        sh.attribute(x, n_samples=8, stdevs=0.5, input_subspace=wrong)
    # a full-rank map changes nothing: same draws, same numbers
    full = torch.randn(9, 9, dtype=DTYPE)
    torch.manual_seed(1)
    a = sh.attribute(x, n_samples=8, stdevs=0.5, input_subspace=full)
    assert sh.last_call_subspace_rank is None
    torch.manual_seed(1)
    b = sh.attribute(x, n_samples=8, stdevs=0.5, input_subspace=None)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        sh.attribute(x, n_samples=8, input_subspace=torch.randn(3, 8, dtype=DTYPE))
    with pytest.raises(ValueError, match="input_subspace"):
        sh.attribute(x, n_samples=8, input_subspace="first_layer")
    with pytest.raises(ValueError, match="control_variate"):
        sh.attribute(x, n_samples=8, control_variate="surrogate")


def test_auto_rule_detection_and_opt_out():
    net = relu_net(d=6, k=3, seed=2)
    x = torch.randn(2, 6, dtype=DTYPE)
    sh = SmoothHess(net)
    # opting out equals a wrapped model "auto" cannot see into
    torch.manual_seed(0)
    off = sh.attribute(x, target=0, n_samples=16, input_subspace=None, control_variate=None)
    assert sh.last_call_subspace_rank is None and not sh.last_call_control_variate
    wrapped = SmoothHess(lambda v: net(v))
    torch.manual_seed(0)
    torch.testing.assert_close(
        wrapped.attribute(x, target=0, n_samples=16), off, atol=0, rtol=0
    )
    # each part on its own
    sh.attribute(x, target=0, n_samples=16, control_variate=None)
    assert sh.last_call_subspace_rank == 3 and not sh.last_call_control_variate
    sh.attribute(x, target=0, n_samples=16, input_subspace=None)
    assert sh.last_call_subspace_rank is None and sh.last_call_control_variate
    # a forward hook on the first layer could use the input: no detection
    handle = net[0].register_forward_pre_hook(lambda m, inp: None)
    try:
        sh.attribute(x, target=0, n_samples=16)
        assert sh.last_call_subspace_rank is None and not sh.last_call_control_variate
    finally:
        handle.remove()
    # Flatten then Linear on image-shaped inputs; more units than features
    image_net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 1))
    image_net = image_net.to(DTYPE)
    sh_img = SmoothHess(image_net)
    sh_img.attribute(torch.randn(2, 1, 4, 4, dtype=DTYPE), n_samples=8)
    assert sh_img.last_call_subspace_rank == 5 and sh_img.last_call_control_variate
    wide = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 1)).to(DTYPE)
    sh_wide = SmoothHess(wide)
    sh_wide.attribute(torch.randn(2, 4, dtype=DTYPE), n_samples=8)
    assert sh_wide.last_call_subspace_rank is None and sh_wide.last_call_control_variate
    # no ReLU after the first Linear: projection only
    tanh_net = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)).to(DTYPE)
    sh_tanh = SmoothHess(tanh_net)
    sh_tanh.attribute(x, n_samples=8)
    assert sh_tanh.last_call_subspace_rank == 3 and not sh_tanh.last_call_control_variate


def test_auto_falls_back_with_a_warning_when_the_check_fails():
    # a global pre-hook makes the first Linear see x + x^2: the structure
    # looks right, the one-forward check sees the output move off the subspace
    net = relu_net(d=6, k=3, seed=2)
    x = torch.randn(2, 6, dtype=DTYPE)

    def distort(module, inputs):
        if isinstance(module, nn.Linear) and module.in_features == 6:
            return (inputs[0] + inputs[0] ** 2,)
        return None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(distort)
    try:
        sh = SmoothHess(net)
        with pytest.warns(UserWarning, match="outside `input_subspace`"):
            sh.attribute(x, target=0, n_samples=8)
        assert sh.last_call_subspace_rank is None and not sh.last_call_control_variate
    finally:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sh.attribute(x, target=0, n_samples=8)
    assert sh.last_call_subspace_rank == 3


def test_grouped_and_anisotropic_control_variate_match_the_full_matrix():
    # tuple inputs with one sigma each cannot use "auto" (one input tensor);
    # one input with a feature mask: group sums of the full estimate, same draws
    net = squared_relu_net(d=8, k=3, seed=4)
    x = torch.randn(2, 8, dtype=DTYPE)
    mask = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    sh = SmoothHess(net)
    torch.manual_seed(0)
    full, full_g = sh.attribute(x, n_samples=64, stdevs=0.4, return_smoothgrad=True)
    torch.manual_seed(0)
    grouped, grouped_g = sh.attribute(
        x, n_samples=64, stdevs=0.4, return_smoothgrad=True, feature_mask=mask
    )
    assert sh.last_call_control_variate
    onehot = torch.nn.functional.one_hot(mask[0], 4).to(DTYPE)  # (D, G)
    torch.testing.assert_close(grouped, onehot.T @ full @ onehot, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grouped_g, full_g @ onehot, atol=1e-10, rtol=1e-10)


def test_explicit_subspace_with_tuple_inputs_and_one_sigma_each():
    # in z's coordinates the model sees W diag(sigma) z: the basis must be that
    # matrix's row space (W's own differs when the sigmas differ)
    from tests.test_smooth_hess import ReluSum, closed_form

    model = ReluSum(d=9, k=3, seed=6)
    x1, x2 = torch.randn(2, 4, dtype=DTYPE), torch.randn(2, 5, dtype=DTYPE)
    sigmas = (0.3, 0.8)
    sigma_per_feature = torch.tensor([0.3] * 4 + [0.8] * 5, dtype=DTYPE)
    hess_true, _ = closed_form(model, torch.cat([x1, x2], 1), sigma_per_feature)
    sh = SmoothHess(lambda a, b: model(torch.cat([a, b], 1)))
    runs = []
    for seed in range(40):
        torch.manual_seed(seed)
        h = sh.attribute(
            (x1, x2), n_samples=32, stdevs=sigmas, input_subspace=model.w.detach(),
            output_layout="flat",
        )
        runs.append(h)
    assert sh.last_call_subspace_rank == 3
    runs = torch.stack(runs)
    assert_unbiased(runs, hess_true)


def test_subspace_follows_in_place_changes_of_the_weight():
    # the basis (an SVD of W) is reused across calls only while W is unchanged
    net = relu_net(d=6, k=3, seed=2)
    x = torch.randn(2, 6, dtype=DTYPE)
    sh = SmoothHess(net)
    sh.attribute(x, target=0, n_samples=8)
    assert sh.last_call_subspace_rank == 3
    sh.attribute(x, target=0, n_samples=8)
    assert sh.last_call_subspace_rank == 3
    with torch.no_grad():
        net[0].weight[2].zero_()  # in place: a new version of the same tensor
    sh.attribute(x, target=0, n_samples=8)
    assert sh.last_call_subspace_rank == 2
    with torch.no_grad():
        net[0].weight = nn.Parameter(torch.randn(1, 6, dtype=DTYPE))
        net[0].bias = nn.Parameter(torch.randn(1, dtype=DTYPE))
        net[2].weight = nn.Parameter(torch.randn(2, 1, dtype=DTYPE))
    sh.attribute(x, target=0, n_samples=8)
    assert sh.last_call_subspace_rank == 1
    # the result follows the new weights (one hidden unit: exact)
    hess_true, _ = relu_net_closed_form(net, x, 0.1, output=0)
    torch.testing.assert_close(
        sh.attribute(x, target=0, n_samples=4), hess_true, atol=1e-10, rtol=1e-10
    )


def test_attribute_to_stderr_with_variance_reduction_is_honest():
    net = squared_relu_net(d=12, k=5, seed=7)
    x = torch.randn(3, 12, dtype=DTYPE)
    hess_true, _ = squared_relu_closed_form(net, x, 0.4)
    sh = SmoothHess(net)
    torch.manual_seed(0)
    hess, se = sh.attribute_to_stderr(x, rel_stderr=0.02, stdevs=0.4, initial_samples=64)
    assert sh.last_call_subspace_rank == 5 and sh.last_call_control_variate
    rel_se = se.flatten(1).norm(dim=1) / hess.flatten(1).norm(dim=1)
    assert (rel_se <= 0.02).all()
    rel_err = (hess - hess_true).flatten(1).norm(dim=1) / hess_true.flatten(1).norm(dim=1)
    assert (rel_err < 3 * 0.02).all(), rel_err


# --- importance sampling (any model, no structure) ---------------------------


def _cdf(t):
    return 0.5 * (1 + torch.erf(t / math.sqrt(2)))


def _pdf(t):
    return torch.exp(-0.5 * t * t) / SQRT2PI


def max_closed_form(x, sigma):
    """max(x1, x2) = x2 + relu(x1 - x2): a smoothed relu along (1, -1)."""
    direction = torch.tensor([1.0, -1.0], dtype=x.dtype)
    s = sigma * math.sqrt(2.0)
    u = x @ direction
    hess = (_pdf(u / s) / s)[:, None, None] * torch.outer(direction, direction)
    grad = torch.stack([_cdf(u / s), 1 - _cdf(u / s)], dim=1)
    return hess, grad


def relu_product_closed_form(x, sigma):
    """relu(x1) relu(x2): the product of two independent smoothed relus."""
    t = x / sigma
    m = sigma * _pdf(t) + x * _cdf(t)  # E relu(x_i + sigma e)
    c, p = _cdf(t), _pdf(t) / sigma
    hess = torch.stack(
        [
            torch.stack([p[:, 0] * m[:, 1], c[:, 0] * c[:, 1]], -1),
            torch.stack([c[:, 0] * c[:, 1], p[:, 1] * m[:, 0]], -1),
        ],
        -2,
    )
    grad = torch.stack([c[:, 0] * m[:, 1], m[:, 0] * c[:, 1]], dim=1)
    return hess, grad


# plain functions (the importance sampler needs no structure), one example
# near the kink and one 2.5 sigma away from it (a rare-event example)
BLACK_BOX = {
    "max": (
        lambda v: torch.maximum(v[:, 0], v[:, 1]),
        max_closed_form,
        torch.tensor([[0.05, 0.1], [0.3, -0.05]], dtype=DTYPE),
        0.1,
    ),
    "relu_product": (
        lambda v: torch.relu(v[:, 0]) * torch.relu(v[:, 1]),
        relu_product_closed_form,
        torch.tensor([[-0.1, 0.2], [0.3, -0.05]], dtype=DTYPE),
        0.1,
    ),
}


@pytest.mark.parametrize("importance", ["auto", 2.0])
@pytest.mark.parametrize("sampler", ["sobol", "gaussian", "orthogonal"])
@pytest.mark.parametrize("case", ["max", "relu_product"])
def test_importance_sampling_is_unbiased_on_black_box_closed_forms(case, sampler, importance):
    # mean over seeds within its own standard error of the closed form, for
    # the Hessian and SmoothGrad (a missing or wrong weight p/q, e.g. tau^r
    # dropped, or an unweighted SmoothGrad, fails by far more)
    forward, closed_form, x, sigma = BLACK_BOX[case]
    hess_true, grad_true = closed_form(x, sigma)
    sh = SmoothHess(forward)
    runs, grads = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        h, g = sh.attribute(
            x, n_samples=32, stdevs=sigma, sampler=sampler, importance=importance,
            return_smoothgrad=True,
        )
        runs.append(h)
        grads.append(g)
    expected = math.sqrt(1 + 2.5 / 2) if importance == "auto" else importance
    assert sh.last_call_importance_scale == pytest.approx(expected)
    runs, grads = torch.stack(runs), torch.stack(grads)
    assert_unbiased(runs, hess_true)
    assert_unbiased(grads, grad_true)


def test_importance_sampling_is_unbiased_in_more_dimensions():
    # 6 features, a plain callable around a ReLU sum (tau^2 = 1 + 2.5/6), and
    # with an explicit input subspace (the weight uses its rank r, not D)
    from tests.test_smooth_hess import ReluSum, closed_form

    model = ReluSum(d=6, k=8, seed=4)
    x = torch.randn(2, 6, dtype=DTYPE)
    hess_true, _ = closed_form(model, x, 0.5)
    sh = SmoothHess(lambda v: model(v))
    runs = []
    for seed in range(60):
        torch.manual_seed(seed)
        runs.append(sh.attribute(x, n_samples=24, stdevs=0.5, sampler="orthogonal"))
    assert sh.last_call_importance_scale == pytest.approx(math.sqrt(1 + 2.5 / 6))
    runs = torch.stack(runs)
    assert_unbiased(runs, hess_true)

    net = squared_relu_net(d=12, k=5, seed=3)
    x = torch.randn(2, 12, dtype=DTYPE)
    hess_true, _ = squared_relu_closed_form(net, x, 0.4)
    sh = SmoothHess(net)
    runs = []
    for seed in range(60):
        torch.manual_seed(seed)
        runs.append(sh.attribute(x, n_samples=24, stdevs=0.4, importance=1.5))
    assert sh.last_call_subspace_rank == 5
    runs = torch.stack(runs)
    assert_unbiased(runs, hess_true)


@pytest.mark.parametrize("sampler", ["sobol", "gaussian"])
@pytest.mark.parametrize("case", ["max", "relu_product"])
def test_reported_stderr_covers_95_percent_with_importance_sampling(case, sampler):
    # nominal 95% intervals over repeated seeds: coverage in [90%, 99%], also
    # for the rare-event example (2.5 sigma from the kink), whose weighted
    # terms are the most skewed (orthogonal frames with importance sampling:
    # the default in test_smooth_hess.py::test_reported_stderr_covers_95_percent)
    forward, closed_form, x, sigma = BLACK_BOX[case]
    hess_true, grad_true = closed_form(x, sigma)
    sh = SmoothHess(forward)
    covered, covered_g = [], []
    for seed in range(120):
        torch.manual_seed(seed)
        h, g, se, se_g = sh.attribute(
            x, n_samples=256, stdevs=sigma, sampler=sampler, return_smoothgrad=True,
            return_stderr=True,
        )
        covered.append(((h - hess_true).abs() <= 1.96 * se).double().mean())
        covered_g.append(((g - grad_true).abs() <= 1.96 * se_g).double().mean())
    assert sh.last_call_importance_scale is not None
    coverage = torch.stack(covered).mean().item()
    coverage_g = torch.stack(covered_g).mean().item()
    assert 0.90 <= coverage <= 0.99, coverage
    assert 0.90 <= coverage_g <= 0.99, coverage_g


@pytest.mark.parametrize("sampler, factor", [("sobol", 0.6), ("gaussian", 0.85)])
def test_importance_sampling_lowers_the_error_far_from_the_kink(sampler, factor):
    # max(x1, x2) at 2.5 sigma from its kink: the Stein terms are rare events
    # under N(0, I); the wider proposal meets the kink more often
    forward, closed_form, x, sigma = BLACK_BOX["max"]
    x = x[1:]
    hess_true, _ = closed_form(x, sigma)
    errors = {}
    for importance in (None, "auto"):
        sq = []
        for seed in range(16):
            torch.manual_seed(seed)
            h = SmoothHess(forward).attribute(
                x, n_samples=1024, stdevs=sigma, sampler=sampler, importance=importance
            )
            sq.append(((h - hess_true).norm() / hess_true.norm()) ** 2)
        errors[importance] = torch.stack(sq).mean().sqrt().item()
    assert errors["auto"] < factor * errors[None], errors


def test_importance_option_is_validated_and_off_means_plain():
    forward, _, x, sigma = BLACK_BOX["max"]
    sh = SmoothHess(forward)
    with pytest.raises(ValueError, match="`importance`"):
        sh.attribute(x, importance="wide")
    for bad in (0.5, float("nan"), float("inf"), -2.0):
        with pytest.raises(ValueError, match="`importance`"):
            sh.attribute(x, importance=bad)
    for bad in (True, torch.tensor(2.0), [2.0]):
        with pytest.raises(TypeError, match="`importance`"):
            sh.attribute(x, importance=bad)
    # tau = 1 is no importance sampling, bit for bit
    torch.manual_seed(0)
    plain = sh.attribute(x, stdevs=sigma, importance=None)
    assert sh.last_call_importance_scale is None
    torch.manual_seed(0)
    one = sh.attribute(x, stdevs=sigma, importance=1.0)
    assert sh.last_call_importance_scale is None
    assert torch.equal(plain, one)
    # an explicit tau with weights up to tau^r > 100 warns
    wide = torch.randn(1, 20, dtype=DTYPE)
    with pytest.warns(UserWarning, match="importance"):
        SmoothHess(lambda v: v.relu().sum(1)).attribute(wide, importance=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmoothHess(lambda v: v.relu().sum(1)).attribute(wide)  # auto: no warning


# --- fitted ReLU surrogate (control_variate="fit"), cross-fitted -------------


@pytest.fixture
def quick_fit(monkeypatch):
    # the estimate is unbiased and its standard error honest whatever the fit:
    # few Adam steps keep these tests fast
    from captum_interactions._utils import stein_surrogate

    monkeypatch.setattr(stein_surrogate, "FIT_STEPS", 40)
    monkeypatch.setattr(stein_surrogate, "FIT_HIDDEN", 16)


def _relu_sum_black_box(d, k, seed):
    from tests.test_smooth_hess import ReluSum, closed_form

    model = ReluSum(d=d, k=k, seed=seed)
    return (lambda v: model(v)), (lambda x, sigma: closed_form(model, x, sigma))


@pytest.mark.parametrize("sampler", ["orthogonal", "gaussian", "sobol"])
@pytest.mark.parametrize("case", ["relu_sum", "max"])
def test_fitted_surrogate_is_unbiased(quick_fit, case, sampler):
    # cross-fitting: each fold is corrected by the surrogate fitted on the
    # other, plus its exact smoothed Hessian and gradient (a surrogate fitted
    # on its own fold, or a wrong exact value, fails by far more)
    if case == "max":
        forward, closed_form, x, sigma = BLACK_BOX["max"]
    else:
        forward, closed_form = _relu_sum_black_box(d=5, k=6, seed=4)
        x, sigma = torch.randn(2, 5, dtype=DTYPE), 0.5
    hess_true, grad_true = closed_form(x, sigma)
    sh = SmoothHess(forward)
    runs, grads = [], []
    for seed in range(40):
        torch.manual_seed(seed)
        h, g = sh.attribute(
            x, n_samples=48, stdevs=sigma, sampler=sampler, control_variate="fit",
            return_smoothgrad=True,
        )
        runs.append(h)
        grads.append(g)
    assert sh.last_call_fitted_surrogate and sh.last_call_control_variate
    runs, grads = torch.stack(runs), torch.stack(grads)
    assert_unbiased(runs, hess_true)
    assert_unbiased(grads, grad_true)


def test_fitted_surrogate_with_subspace_groups_and_anisotropic_sigma(quick_fit):
    # an explicit rank-5 subspace (the fit lives in its coordinates), and
    # per-feature sigmas through a tuple input with a feature mask
    net = squared_relu_net(d=12, k=5, seed=3)
    x = torch.randn(2, 12, dtype=DTYPE)
    hess_true, _ = squared_relu_closed_form(net, x, 0.4)
    sh = SmoothHess(net)
    runs = []
    for seed in range(40):
        torch.manual_seed(seed)
        runs.append(sh.attribute(x, n_samples=48, stdevs=0.4, control_variate="fit"))
    assert sh.last_call_subspace_rank == 5 and sh.last_call_fitted_surrogate
    runs = torch.stack(runs)
    assert_unbiased(runs, hess_true)

    from tests.test_smooth_hess import ReluSum, closed_form

    model = ReluSum(d=4, k=5, seed=2)
    x = torch.randn(2, 4, dtype=DTYPE)
    sigmas = torch.tensor([0.3, 0.3, 0.6, 0.6], dtype=DTYPE)
    hess_true, _ = closed_form(model, x, sigmas)
    # the same ids in both inputs: group 0 = features {0, 2} (the first of
    # each input), group 1 = {1, 3}
    mask = torch.tensor([[0, 1]])
    members = [[0, 2], [1, 3]]
    group_true = torch.stack(
        [
            torch.stack([hess_true[:, a][:, :, b].sum((1, 2)) for b in members], -1)
            for a in members
        ],
        -2,
    )
    sh = SmoothHess(lambda p, q: model(torch.cat([p, q], dim=1)))
    runs = []
    for seed in range(40):
        torch.manual_seed(seed)
        runs.append(
            sh.attribute(
                (x[:, :2], x[:, 2:]), n_samples=48, stdevs=(0.3, 0.6),
                control_variate="fit", feature_mask=(mask, mask),
            )
        )
    runs = torch.stack(runs)
    assert_unbiased(runs, group_true)


@pytest.mark.parametrize("sampler", ["orthogonal"])
def test_reported_stderr_covers_95_percent_with_the_fitted_surrogate(quick_fit, sampler):
    # (i.i.d. draws: the same cross-fitting; its unbiasedness is tested above,
    # a coverage run with them takes minutes)
    forward, closed_form = _relu_sum_black_box(d=5, k=6, seed=1)
    x = torch.randn(2, 5, dtype=DTYPE)
    hess_true, grad_true = closed_form(x, 0.5)
    sh = SmoothHess(forward)
    covered, covered_g = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        h, g, se, se_g = sh.attribute(
            x, n_samples=256, stdevs=0.5, sampler=sampler, control_variate="fit",
            return_smoothgrad=True, return_stderr=True,
        )
        covered.append(((h - hess_true).abs() <= 1.96 * se).double().mean())
        covered_g.append(((g - grad_true).abs() <= 1.96 * se_g).double().mean())
    coverage = torch.stack(covered).mean().item()
    coverage_g = torch.stack(covered_g).mean().item()
    assert 0.90 <= coverage <= 0.99, coverage
    assert 0.90 <= coverage_g <= 0.99, coverage_g


def test_fitted_surrogate_only_when_asked_and_validation(quick_fit):
    forward, _ = _relu_sum_black_box(d=20, k=8, seed=0)
    x = torch.randn(1, 20, dtype=DTYPE)
    sh = SmoothHess(forward)
    # "auto" never fits (a fit costs seconds per example, more than it saves
    # on a cheap model); a black box gets no control variate
    sh.attribute(x, n_samples=128, stdevs=0.5)
    assert not sh.last_call_fitted_surrogate and not sh.last_call_control_variate
    sh.attribute(x, n_samples=128, stdevs=0.5, control_variate="fit", sampler="sobol")
    assert sh.last_call_fitted_surrogate and sh.last_call_control_variate
    from captum_interactions import memory_budget

    with memory_budget("150kB"), pytest.raises(ValueError, match="memory budget"):
        sh.attribute(x, n_samples=512, stdevs=0.5, control_variate="fit")
    net = relu_net(d=20, k=30, seed=0)  # "auto": the first-layer rule
    sh3 = SmoothHess(net)
    sh3.attribute(torch.randn(1, 20, dtype=DTYPE), target=0, n_samples=64)
    assert sh3.last_call_control_variate and not sh3.last_call_fitted_surrogate
    with pytest.raises(ValueError, match="`control_variate`"):
        sh.attribute(x, control_variate="fitted")
    with pytest.raises(ValueError, match="`control_variate='fit'`"):
        sh.attribute(x, n_samples=6, control_variate="fit")


def test_fitted_surrogate_lowers_the_error_on_a_relu_sum():
    # a black-box sum of 32 ReLU units in 20 features, orthogonal frames:
    # the cross-fitted surrogate removes most of the kinks' variance
    forward, closed_form = _relu_sum_black_box(d=20, k=32, seed=2)
    x = torch.randn(1, 20, dtype=DTYPE)
    hess_true, _ = closed_form(x, 0.5)
    errors = {}
    for cv in (None, "fit"):
        sq = []
        for seed in range(3):
            torch.manual_seed(seed)
            h = SmoothHess(forward).attribute(
                x, n_samples=1024, stdevs=0.5, sampler="orthogonal", control_variate=cv
            )
            sq.append(((h - hess_true).norm() / hess_true.norm()) ** 2)
        errors[cv] = torch.stack(sq).mean().sqrt().item()
    assert errors["fit"] < 0.6 * errors[None], errors
