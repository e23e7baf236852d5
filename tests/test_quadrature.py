"""Quadrature rules for the -ln(t) weight and the adaptive (completeness_tol) mode."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from captum_interactions import IntegratedHessians, LayerIntegratedHessians
from captum_interactions._utils import quadrature
from captum_interactions._utils.quadrature import (
    FIXED_METHODS,
    GRADED_MIN_STEPS,
    composite_gauss_log_rule,
    gauss_log_rule,
    graded_log_weight_rule,
    log_weight_rule,
    panel_completeness,
    panel_rules,
)

DTYPE = torch.float64
# integral_0^1 -ln(t) e^t dt = Ein(1) = sum_k 1 / (k k!)
EIN_1 = sum(1.0 / (k * math.factorial(k)) for k in range(1, 30))


def log_moment_errors(rule, degree):
    """max_k |sum w t^k - integral_0^1 -ln(t) t^k dt| for k <= degree (= 1/(k+1)^2)."""
    t, w = map(np.array, rule)
    return max(abs((w * t**k).sum() - 1.0 / (k + 1) ** 2) for k in range(degree + 1))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 33, 64, 258, 300, 1024])
def test_gauss_log_exact_for_polynomials_of_degree_2n_minus_1(n):
    rule = gauss_log_rule(n)
    assert len(rule[0]) == n
    assert log_moment_errors(rule, min(2 * n - 1, 200)) < 1e-14
    if n <= 8:  # not exact one degree higher: the rule is Gauss, not better
        t, w = map(np.array, rule)
        assert abs((w * t ** (2 * n)).sum() - 1.0 / (2 * n + 1) ** 2) > 1e-12


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13, 16, 64, 100, 1024])
@pytest.mark.parametrize("per_panel", [2, 4, 8])
def test_composite_exact_for_polynomials_up_to_the_smallest_panel_degree(n, per_panel):
    rule = composite_gauss_log_rule(n, per_panel)
    sizes = quadrature._panel_sizes(n, per_panel)
    assert sum(sizes) == n == len(rule[0]) and max(sizes) - min(sizes) <= 1
    assert log_moment_errors(rule, 2 * min(sizes) - 1) < 1e-14
    t, w = map(np.array, rule)
    # a closed form that is not a polynomial, within the Gauss error bound
    # max|f^(2p)| / (2p)! * sum over panels of integral -ln(t) pi_p(t)^2 <= e h^(2p) / (2p)!
    p, h = min(sizes), 1.0 / len(sizes)
    bound = math.e * h ** (2 * p) / math.factorial(2 * p)
    assert abs((w * np.exp(t)).sum() - EIN_1) <= bound + 1e-14


def test_composite_panels_nest_and_the_first_panel_carries_the_log():
    t16, w16 = map(np.array, composite_gauss_log_rule(16, 4))
    # 4 panels of 4 points, one panel each quarter of [0, 1]
    assert all(((t16[4 * k : 4 * k + 4] > k / 4) & (t16[4 * k : 4 * k + 4] < (k + 1) / 4)).all()
               for k in range(4))
    # each panel integrates -ln t exactly: the weights of [0, a] sum to a (1 - ln a)
    for k in range(4):
        a, b = k / 4, (k + 1) / 4
        exact = (b - b * math.log(b)) - (a - a * math.log(a) if a > 0 else 0.0)
        assert w16[4 * k : 4 * k + 4].sum() == pytest.approx(exact, rel=1e-14)
    # one panel: the global Gauss rule for the log weight
    np.testing.assert_allclose(composite_gauss_log_rule(4, 4)[0], gauss_log_rule(4)[0], rtol=1e-13)


def test_every_rule_is_valid_for_n_steps_1_to_1024():
    """No overflow, nodes inside (0, 1), positive weights; Gauss-type weights sum to 1."""
    steps = list(range(1, 1025))
    for method in FIXED_METHODS:
        # global Gauss rules cost O(n^2) to O(n^3) to build: a sample (around
        # the old overflow at 258); the others every n
        ns = (list(range(1, 65)) + [100, 255, 256, 257, 258, 259, 300, 500, 512, 1000, 1024]
              if method in ("gausslog", "gausslegendre") else steps)
        for n in ns:
            t, w = map(np.array, log_weight_rule(method, n))
            assert t.shape == w.shape == (n,), (method, n)
            assert np.isfinite(t).all() and np.isfinite(w).all(), (method, n)
            assert (t > 0).all() and (t < 1).all() and (w > 0).all(), (method, n)
            if method in ("gausslog", "gausslog_composite"):
                assert abs(w.sum() - 1.0) < 1e-13, (method, n)
            else:  # the log folded into the weights: the sum converges to 1
                assert abs(w.sum() - 1.0) < 1.0 / n, (method, n)


def log_integral_of_kink(c):
    """integral_0^1 -ln(t) |t - c| dt in closed form."""
    def anti_log(x):  # antiderivative of -ln(t): t - t ln t
        return x - x * math.log(x)

    def anti_log_t(x):  # antiderivative of -ln(t) t: t^2/4 - t^2 ln(t)/2
        return x * x / 4 - x * x * math.log(x) / 2

    return (c * anti_log(c) - anti_log_t(c)) + (
        (anti_log_t(1) - anti_log_t(c)) - c * (anti_log(1) - anti_log(c)))


def log_integral_of_jump(c):
    """integral_0^1 -ln(t) [t > c] dt."""
    return 1.0 - (c - c * math.log(c))


@pytest.mark.parametrize("method", ["gausslog_composite", "gausslog"])
def test_error_on_kinks_and_jumps_does_not_grow_with_steps(method):
    """Worst case and mean over 181 positions of a kink |t - c| (second order in
    h) and of a jump [t > c] (first order), for n_steps 8 ... 1024.

    For one fixed position the error of any rule depends on where the kink
    falls between nodes, and can grow from one n to the next; over the
    positions it falls.
    """
    positions = np.linspace(0.05, 0.95, 181) + 1.234e-3
    kink_exact = np.array([log_integral_of_kink(c) for c in positions])
    jump_exact = np.array([log_integral_of_jump(c) for c in positions])
    kink, jump = [], []
    for n in [8, 16, 32, 64, 128, 256, 512, 1024]:
        t, w = map(np.array, log_weight_rule(method, n))
        kink_err = np.abs(np.abs(t[None] - positions[:, None]) @ w - kink_exact)
        jump_err = np.abs((t[None] > positions[:, None]).astype(float) @ w - jump_exact)
        kink.append((kink_err.max(), kink_err.mean()))
        jump.append((jump_err.max(), jump_err.mean()))
    for errors in (kink, jump):
        for a, b in zip(errors, errors[1:]):
            assert b[0] <= a[0] and b[1] <= a[1], errors
    # the expected orders: h^2 for a kink, h for a jump (7 doublings)
    assert kink[-1][1] < kink[0][1] / 4**6 and jump[-1][1] < jump[0][1] / 2**6


def sharp_mlp(beta=40.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Softplus(beta=beta), nn.Linear(16, 1)).to(DTYPE)


def test_integrated_hessians_error_does_not_grow_with_steps_on_a_sharp_softplus():
    model = sharp_mlp()
    torch.manual_seed(1)
    x = 2 * torch.randn(3, 4, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with torch.no_grad():
        change = (model(x) - model(torch.zeros_like(x)))[:, 0]
    errors = []
    for n in [8, 16, 32, 64, 128, 256]:
        _, delta = ih.attribute(x, n_steps=n, return_convergence_delta=True)
        errors.append((delta.abs() / change.abs()).max().item())
    assert all(b <= a or b < 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_adaptive_mode_reaches_tol_records_steps_and_matches_fixed_steps():
    model = sharp_mlp()
    torch.manual_seed(1)
    x = 2 * torch.randn(3, 4, dtype=DTYPE)
    base = torch.randn(3, 4, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gamma, delta = ih.attribute(x, base, completeness_tol=1e-6, return_convergence_delta=True)
    with torch.no_grad():
        change = (model(x) - model(base))[:, 0]
    assert ((delta.abs() / change.abs()) <= 1e-6).all()
    steps = ih.last_call_steps
    assert steps.shape == (3,) and steps.dtype == torch.long
    assert all(s >= quadrature.DEFAULT_N_STEPS for s in steps.tolist())
    assert len(set(steps.tolist())) > 1  # examples refine independently
    torch.testing.assert_close(delta, gamma.sum((1, 2)) - change, rtol=0, atol=1e-12)
    # each example's result is the fixed-step result at its recorded steps
    for i, s in enumerate(steps.tolist()):
        fixed = ih.attribute(x[i : i + 1], base[i : i + 1], n_steps=s)
        torch.testing.assert_close(gamma[i : i + 1], fixed, rtol=0, atol=1e-12)
        # and the level before did not meet the tolerance
        if s > quadrature.DEFAULT_N_STEPS:
            _, d = ih.attribute(x[i : i + 1], base[i : i + 1], n_steps=s // 2,
                                return_convergence_delta=True)
            assert d.abs().item() > 1e-6 * change[i].abs().item()
    # a plain call records the fixed steps
    ih.attribute(x, base, n_steps=8)
    assert ih.last_call_steps.tolist() == [8, 8, 8]


def test_adaptive_subsets_per_example_targets_args_and_masks():
    """Refining a subset of examples keeps their targets, extra args and masks."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = sharp_mlp()
            self.out = nn.Linear(1, 2).to(DTYPE)

        def forward(self, x, scale):
            return self.out(self.net(x * scale))

    model = TwoHeads()
    torch.manual_seed(3)
    x = 2 * torch.randn(4, 4, dtype=DTYPE)
    scale = torch.tensor([[1.0], [0.2], [1.5], [0.1]], dtype=DTYPE)
    target = [0, 1, 1, 0]
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    ih = IntegratedHessians(model)
    gamma = ih.attribute(x, target=target, additional_forward_args=(scale,),
                         feature_mask=mask, completeness_tol=1e-7)
    steps = ih.last_call_steps.tolist()
    assert len(set(steps)) > 1, steps
    for i, s in enumerate(steps):
        fixed = ih.attribute(x[i : i + 1], target=target[i], additional_forward_args=(scale[i : i + 1],),
                             feature_mask=mask[i : i + 1], n_steps=s)
        torch.testing.assert_close(gamma[i : i + 1], fixed, rtol=0, atol=1e-12)


def test_budget_warning_names_examples_error_and_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Softplus(beta=200.0), nn.Linear(8, 1)).to(DTYPE)
    x = 5 * torch.randn(2, 3, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with pytest.warns(UserWarning, match=r"completeness_tol=1e-10 not reached within max_steps=32") as rec:
        _, delta = ih.attribute(x, completeness_tol=1e-10, max_steps=32,
                                return_convergence_delta=True)
    message = str(rec[0].message)
    assert "example index: 0: " in message and "max_steps" in message and "beta" in message
    assert ih.last_call_steps.tolist() == [32, 32]
    assert torch.isfinite(delta).all()


def test_layer_integrated_hessians_adaptive_matches_integrated_hessians():
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embedding = nn.Embedding(12, 3)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Softplus(beta=30.0),
                                      nn.Linear(8, 1))
            self.to(DTYPE)

        def forward(self, ids):
            return self.head(self.embedding(ids))

    model = Text()
    ids = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 11], [4, 8, 6, 10]])
    lih = LayerIntegratedHessians(model, model.embedding)
    gamma, delta = lih.attribute(ids, completeness_tol=1e-8, return_convergence_delta=True)
    with torch.no_grad():
        change = (model(ids) - model(torch.zeros_like(ids)))[:, 0]
    assert ((delta.abs() / change.abs()) <= 1e-8).all()
    steps = lih.last_call_steps.tolist()
    with torch.no_grad():
        emb, emb0 = model.embedding(ids), model.embedding(torch.zeros_like(ids))
    token_mask = torch.arange(4).view(1, 4, 1)
    ih = IntegratedHessians(lambda e: model.head(e))
    for i, s in enumerate(steps):
        expected = ih.attribute(emb[i : i + 1], emb0[i : i + 1], n_steps=s, feature_mask=token_mask)
        torch.testing.assert_close(gamma[i : i + 1], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(completeness_tol=0.0), "completeness_tol"),
        (dict(completeness_tol=float("nan")), "completeness_tol"),
        (dict(completeness_tol="1e-4"), "completeness_tol"),
        (dict(completeness_tol=1e-4, max_steps=8), "max_steps"),
        (dict(completeness_tol=1e-4, max_steps=64.0), "max_steps"),
        (dict(method="gauss"), "method"),
    ],
)
def test_bad_adaptive_arguments_raise(kwargs, match):
    ih = IntegratedHessians(sharp_mlp())
    with pytest.raises(ValueError, match=match):
        ih.attribute(torch.randn(2, 4, dtype=DTYPE), **kwargs)


def test_adaptive_needs_multiply_by_inputs():
    ih = IntegratedHessians(sharp_mlp(), multiply_by_inputs=False)
    with pytest.raises(ValueError, match="multiply_by_inputs"):
        ih.attribute(torch.randn(2, 4, dtype=DTYPE), completeness_tol=1e-4)


def test_fixed_steps_warn_when_completeness_is_missed_and_stay_quiet_otherwise():
    model = sharp_mlp(beta=200.0)
    torch.manual_seed(1)
    x = 3 * torch.randn(3, 4, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with pytest.warns(UserWarning, match=r"miss completeness by more than 0.01 .* n_steps=4") as rec:
        _, delta = ih.attribute(x, n_steps=4, return_convergence_delta=True)
    with torch.no_grad():
        change = (model(x) - model(torch.zeros_like(x)))[:, 0]
    bad = [i for i in range(3) if delta[i].abs() > 1e-2 * change[i].abs()]
    assert bad and all(f"{i}: " in str(rec[0].message) for i in bad)
    assert "completeness_tol" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IntegratedHessians(sharp_mlp(beta=1.0)).attribute(x, n_steps=16)
        # without the Delta factors completeness is not expected: no check
        IntegratedHessians(model, multiply_by_inputs=False).attribute(x, n_steps=4)


class SharpPath:
    """F(t) = sum_k a_k softplus_beta(t - c_k) + t^2 / 2 per example: sharp layers
    at the c_k, with F, F', F'' in closed form (``path_values`` of the graded rule)."""

    def __init__(self, centers, heights, beta):
        self.c = np.asarray(centers, float)[:, None, :]  # (N, 1, K)
        self.a = np.asarray(heights, float)[:, None, :]
        self.beta = beta

    def __call__(self, t):
        u = self.beta * (t[:, :, None] - self.c)
        sig = 1.0 / (1.0 + np.exp(-u))
        f = (self.a * np.logaddexp(0.0, u) / self.beta).sum(-1) + t**2 / 2
        df = (self.a * sig).sum(-1) + t
        ddf = (self.a * self.beta * sig * (1 - sig)).sum(-1) + 1.0
        return f, df, ddf

    def completeness_errors(self, nodes, weights):
        """|sum_k w_k (t F')'(t_k) - (F(1) - F(0))| per example."""
        f, df, ddf = self(nodes)
        ends = self(np.tile([[0.0, 1.0]], (nodes.shape[0], 1)))[0]
        return np.abs(((df + nodes * ddf) * weights).sum(1) - (ends[:, 1] - ends[:, 0]))


def sharp_path(beta=400.0):
    rng = np.random.default_rng(0)
    return SharpPath(rng.uniform(0.05, 0.95, (5, 4)), rng.uniform(-2, 2, (5, 4)), beta)


def test_panel_completeness_is_the_exact_integral_of_the_scalar_integrand():
    path = sharp_path(beta=3.0)  # smooth enough for a 60-point rule per panel
    left = np.array([[0.0, 0.25, 0.5]] * 5)
    right = np.array([[0.25, 0.5, 1.0]] * 5)
    nodes, weights = panel_rules(60, left, right)
    f, df, ddf = path(nodes.reshape(5, -1))
    numeric = ((df + nodes.reshape(5, -1) * ddf).reshape(nodes.shape) * weights).sum(-1)
    f_l, df_l, _ = path(left)
    f_r, df_r, _ = path(right)
    exact = panel_completeness(left, right, (f_l, df_l), (f_r, df_r))
    np.testing.assert_allclose(numeric, exact, rtol=1e-12, atol=1e-13)
    # the panels add up to F(1) - F(0)
    ends = path(np.tile([[0.0, 1.0]], (5, 1)))[0]
    np.testing.assert_allclose(exact.sum(1), ends[:, 1] - ends[:, 0], rtol=1e-13)


@pytest.mark.parametrize("n", [32, 37, 64, 100, 256])
def test_graded_rule_is_a_positive_rule_exact_for_low_degrees(n):
    """Whatever partition it picks: n points in (0, 1), positive weights, and
    every panel exact for polynomials of degree 2 * 4 - 1 times -ln t."""
    path = sharp_path()
    nodes, weights, panels = graded_log_weight_rule(n, path, 5)
    assert nodes.shape == weights.shape == (5, n)
    assert ((nodes > 0) & (nodes < 1)).all() and (weights > 0).all()
    # per example one Gauss-log panel or the graded partition, whichever bound is smaller
    assert set(panels.tolist()) <= {1, n // quadrature.GRADED_POINTS_PER_PANEL}
    assert (panels > 1).any()
    for k in range(2 * quadrature.GRADED_POINTS_PER_PANEL):
        np.testing.assert_allclose((weights * nodes**k).sum(1), 1.0 / (k + 1) ** 2, rtol=1e-12)


def test_graded_rule_error_falls_with_every_doubling_and_beats_one_gauss_rule():
    """Sharp layers (width 1/400 of the path, four per example): once the
    graded partition is used (32 points on), the completeness error falls with
    every doubling, and per example it is never above one Gauss rule's.

    At 8-32 points nothing resolves these layers: every rule's error is O(1)
    there and can rise or fall by chance (one Gauss rule here: 0.92 at 16,
    0.99 at 32 for example 0, which the graded rule keeps).
    """
    path = sharp_path()
    graded, single = [], []
    for n in [8, 16, 32, 64, 128, 256, 512, 1024]:
        nodes, weights, _ = graded_log_weight_rule(n, path, 5)
        graded.append(path.completeness_errors(nodes, weights))
        t, w = map(np.array, gauss_log_rule(n))
        single.append(path.completeness_errors(np.tile(t, (5, 1)), np.tile(w, (5, 1))))
    worst = [g.max() for g in graded]
    assert all(b <= a for a, b in zip(worst[2:], worst[3:])), worst
    assert all((g <= s * (1 + 1e-9) + 1e-12).all() for g, s in zip(graded, single))
    assert worst[5] < 1e-6 and min(s.min() for s in single[:6]) > 1e-4  # up to n = 256
    assert worst[-1] < 1e-11, worst


def test_graded_rule_keeps_one_gauss_panel_on_smooth_paths():
    """On an analytic path one Gauss-log panel wins the comparison of bounds
    (the rule is then "gausslog"); below GRADED_MIN_STEPS nothing is evaluated."""
    smooth = SharpPath(np.full((3, 2), 0.5), np.ones((3, 2)), beta=1.0)
    for n in [GRADED_MIN_STEPS, 64]:
        nodes, weights, panels = graded_log_weight_rule(n, smooth, 3)
        assert (panels == 1).all()
        np.testing.assert_array_equal(nodes, np.tile(gauss_log_rule(n)[0], (3, 1)))

    def never(t):
        raise AssertionError("evaluated below GRADED_MIN_STEPS")

    nodes, _, panels = graded_log_weight_rule(GRADED_MIN_STEPS - 1, never, 2)
    assert (panels == 1).all() and nodes.shape == (2, GRADED_MIN_STEPS - 1)


def test_graded_entries_converge_not_only_their_total():
    """Every entry of Gamma (not just sum Gamma, which picks the partition)
    agrees with a converged reference; and below GRADED_MIN_STEPS the default
    rule is "gausslog" to the bit."""
    model = sharp_mlp(beta=1000.0)
    torch.manual_seed(1)
    x = 2 * torch.randn(3, 4, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ih.attribute(x, n_steps=4096, method="gausslog_composite")
        graded = ih.attribute(x, n_steps=256)
        single = ih.attribute(x, n_steps=256, method="gausslog")
    scale = reference.abs().max().item()
    # measured: 1.6e-6 against 2.3e-2 for one Gauss rule of as many points
    assert (graded - reference).abs().max().item() < 1e-5 * scale
    assert (single - reference).abs().max().item() > 1e-3 * scale
    torch.testing.assert_close(
        ih.attribute(x, n_steps=16), ih.attribute(x, n_steps=16, method="gausslog"),
        rtol=0, atol=0,
    )


def test_graded_rule_counts_its_pilot_and_respects_internal_batch_size():
    model = sharp_mlp()
    torch.manual_seed(1)
    x = 2 * torch.randn(3, 4, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = ih.attribute(x, n_steps=64)
        cost = ih.last_call_cost
        chunked = ih.attribute(x, n_steps=64, internal_batch_size=7)
    torch.testing.assert_close(full, chunked, rtol=0, atol=1e-12)
    # 64 points x 4 features x 3 examples, plus the pilot's single-direction HVPs
    pilot = cost.hvps - 64 * 4 * 3
    assert pilot > 0 and cost.gradient_rows == 64 * 3 + pilot


def test_graded_rule_of_an_example_does_not_depend_on_its_batch():
    """Each example's partition comes from its own path alone: a batch gives the
    same interactions as the examples one by one (float64 round-off)."""
    model = sharp_mlp(beta=200.0)
    torch.manual_seed(3)
    x = 2 * torch.randn(6, 4, dtype=DTYPE)
    ih = IntegratedHessians(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = ih.attribute(x, n_steps=64)
        alone = torch.cat([ih.attribute(x[i : i + 1], n_steps=64) for i in range(6)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12 * batch.abs().max().item())
