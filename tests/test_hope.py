import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_interactions import HOPE, NonSmoothModelWarning, TaylorPolynomial
from captum_interactions._utils.jets import UnsupportedJetOperation

DTYPE = torch.float64


def nested_derivative(f, x, k):
    """Full k-th derivative tensor (p,)*k of scalar f at x (1-D) by nested autograd."""
    x = x.detach().clone().requires_grad_(True)
    tensor = f(x).reshape(())
    for _ in range(k):
        flat = tensor.reshape(-1)
        rows = []
        for g in flat:
            (row,) = torch.autograd.grad(g, x, create_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if row is None else row)
        tensor = torch.stack(rows).reshape(tensor.shape + x.shape)
    return tensor.detach()


class Composed(nn.Module):
    def __init__(self, inner, outer):
        super().__init__()
        self.inner, self.outer = inner, outer

    def forward(self, x):
        return self.outer(self.inner(x))


def test_deep_linear_then_sin_counterexample_orders_1_to_8():
    torch.manual_seed(3)
    linear = nn.Sequential(nn.Linear(1, 8), nn.Linear(8, 8), nn.Linear(8, 1)).to(DTYPE)
    model = Composed(linear, torch.sin)
    c = (linear[2].weight @ linear[1].weight @ linear[0].weight).item()
    x = torch.tensor([[0.3], [-1.1]], dtype=DTYPE)
    s = linear(x)[:, 0].detach()
    poly = HOPE(model).expand(x, order=8)
    for k in range(1, 9):
        expected = torch.sin(s + k * math.pi / 2) * c**k
        got = poly.derivative_tensor(k).reshape(2)
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("psi,dpsi", [
    (torch.sin, lambda m, k: torch.sin(m + k * math.pi / 2)),
    (torch.exp, lambda m, k: torch.exp(m)),
])
def test_one_hidden_layer_closed_form(psi, dpsi):
    torch.manual_seed(1)
    hidden = nn.Linear(3, 5).to(DTYPE)
    a = torch.randn(5, dtype=DTYPE)
    model = Composed(hidden, lambda h: psi(h) @ a)
    x = torch.randn(2, 3, dtype=DTYPE) * 0.5
    poly = HOPE(model).expand(x, order=5)
    w = hidden.weight.detach()
    mu = hidden(x).detach()  # (N, 5)
    for k in range(1, 6):
        outer = w
        for _ in range(k - 1):
            outer = outer[..., None] * w.reshape((5,) + (1,) * (outer.dim() - 1) + (3,))
        expected = torch.einsum("j,nj,j...->n...", a, dpsi(mu, k), outer)
        torch.testing.assert_close(poly.derivative_tensor(k), expected, rtol=1e-11, atol=1e-12)


class ExplicitPolynomial(nn.Module):
    """f = 2 + 3 x1^2 x2 - x3 + 0.5 x1 x2 x3 - x2^4."""

    def forward(self, x):
        x1, x2, x3 = x[:, 0], x[:, 1], x[:, 2]
        return 2 + 3 * x1 * x1 * x2 - x3 + 0.5 * x1 * x2 * x3 - x2**4


TRUE_TERMS = {(0, 0, 0): 2.0, (2, 1, 0): 3.0, (0, 0, 1): -1.0, (1, 1, 1): 0.5, (0, 4, 0): -1.0}


def test_explicit_polynomial_recovered_exactly_and_recentered():
    model = ExplicitPolynomial()
    poly = HOPE(model).expand(torch.zeros(1, 3, dtype=DTYPE), order=7)
    for exps, coeff in zip(poly.exponents.tolist(), poly.coefficients[0].tolist()):
        assert coeff == pytest.approx(TRUE_TERMS.get(tuple(exps), 0.0), abs=1e-12)
    assert {t[0] for t in poly.terms(min_abs=1e-10)} == set(TRUE_TERMS)
    # expansion at another point equals the exact re-expansion of the polynomial
    x1 = torch.tensor([[0.4, -1.2, 0.7]], dtype=DTYPE)
    at_x1 = HOPE(model).expand(x1, order=7)
    torch.testing.assert_close(poly.recenter(x1).coefficients, at_x1.coefficients,
                               rtol=1e-12, atol=1e-12)
    pts = torch.randn(1, 5, 3, dtype=DTYPE)
    torch.testing.assert_close(at_x1.evaluate(pts), model(pts[0])[None], rtol=1e-12, atol=1e-12)
    text = poly.to_string(min_abs=1e-10)
    assert text == "2 - x3 + 3*x1^2*x2 + 0.5*x1*x2*x3 - x2^4"


def test_deep_tanh_mlp_mixed_partials_match_nested_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).to(DTYPE)
    x = torch.randn(2, 3, dtype=DTYPE)
    poly = HOPE(net).expand(x, order=4, target=1)
    for n in range(2):
        for k in range(1, 5):
            ref = nested_derivative(lambda z: net(z)[1], x[n], k)
            torch.testing.assert_close(poly.derivative_tensor(k)[n], ref, rtol=1e-10, atol=1e-12)
    # attribute(order=k) gives the same tensors, layout (N, *F x k)
    torch.testing.assert_close(HOPE(net).attribute(x, order=3, target=1),
                               poly.derivative_tensor(3), rtol=1e-12, atol=1e-14)


def test_hessian_layouts_tuple_inputs_and_groups():
    torch.manual_seed(2)
    lin = nn.Linear(5, 4).to(DTYPE)

    def model(a, b):
        z = torch.cat([a.flatten(1), b], dim=1)
        return torch.nn.functional.gelu(lin(z)).sum(1) * torch.sigmoid(z[:, 0])

    a, b = torch.randn(3, 1, 2, dtype=DTYPE), torch.randn(3, 3, dtype=DTYPE)
    out = HOPE(model).attribute((a, b))
    for n in range(3):
        full = torch.autograd.functional.hessian(
            lambda z: model(z[:2].reshape(1, 1, 2), z[2:].reshape(1, 3))[0],
            torch.cat([a[n].flatten(), b[n]]))
        torch.testing.assert_close(out[0][0][n], full[:2, :2].reshape(1, 2, 1, 2))
        torch.testing.assert_close(out[0][1][n], full[:2, 2:].reshape(1, 2, 3))
        torch.testing.assert_close(out[1][1][n], full[2:, 2:])
    mask = (torch.tensor([[[0, 1]]]), torch.tensor([[1, 2, 2]]))
    grouped = HOPE(model).attribute((a, b), feature_mask=mask)
    assert grouped.shape == (3, 3, 3)
    ind = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=DTYPE)
    for n in range(3):
        full = torch.autograd.functional.hessian(
            lambda z: model(z[:2].reshape(1, 1, 2), z[2:].reshape(1, 3))[0],
            torch.cat([a[n].flatten(), b[n]]))
        torch.testing.assert_close(grouped[n], ind @ full @ ind.T)


def test_remainder_shrinks_like_delta_to_the_k_plus_1():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, 1)).to(DTYPE)
    x0 = torch.tensor([[0.2, -0.4]], dtype=DTYPE)
    direction = torch.tensor([0.6, 0.8], dtype=DTYPE)
    for K in (1, 2, 3, 4):
        poly = HOPE(net).expand(x0, order=K)
        errs = []
        for h in (0.02, 0.01):
            point = x0 + h * direction
            errs.append((net(point)[0, 0] - poly.evaluate(point)[0]).abs().item())
        ratio = errs[0] / errs[1]
        assert 2 ** (K + 1) * 0.8 < ratio < 2 ** (K + 1) * 1.25, (K, ratio)


def test_sine_mlp_1d_order_10_demo():
    torch.manual_seed(5)
    layers = [nn.Linear(1, 32)]
    for _ in range(2):
        layers += [Sin(), nn.Linear(32, 32)]
    layers += [Sin(), nn.Linear(32, 1)]
    net = nn.Sequential(*layers).to(DTYPE)
    x = torch.tensor([[0.25]], dtype=DTYPE)
    poly = HOPE(net).expand(x, order=10)
    ref = [nested_derivative(lambda z: net(z[None])[0, 0], x[0], k).item() for k in (2, 6, 10)]
    got = [poly.derivative_tensor(k).item() for k in (2, 6, 10)]
    for r, g in zip(ref, got):
        assert g == pytest.approx(r, rel=1e-9)
    # the polynomial approximates the net near x
    pts = x[:, None, :] + torch.linspace(-0.05, 0.05, 5, dtype=DTYPE)[None, :, None]
    torch.testing.assert_close(poly.evaluate(pts), net(pts[0]).reshape(1, -1), rtol=1e-9, atol=1e-9)


class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def test_function_discovery_trained_net_reads_half_x2_plus_half_x1_squared():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        x = torch.rand(256, 2) * 2 - 1
        y = (x[:, 0] ** 2 + x[:, 1]) / 2
        loss = ((net(x)[:, 0] - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    poly = HOPE(net.double()).expand(torch.zeros(1, 2, dtype=DTYPE), order=3)
    assert poly.coefficient((0, 1)).item() == pytest.approx(0.5, abs=0.08)
    assert poly.coefficient((2, 0)).item() == pytest.approx(0.5, abs=0.15)
    for small in ((1, 0), (1, 1), (0, 2)):
        assert abs(poly.coefficient(small).item()) < 0.1
    top_two = {t[0] for t in poly.terms(top=2)}
    assert top_two == {(0, 1), (2, 0)}
    # global view over several points: recentered mean keeps the structure
    pts = torch.tensor([[0.2, 0.1], [-0.2, -0.1], [0.1, -0.2], [-0.1, 0.2]], dtype=DTYPE)
    combined = HOPE(net).expand(pts, order=3).aggregate("combined", center=torch.zeros(2))
    assert combined.coefficient((0, 1)).item() == pytest.approx(0.5, abs=0.08)
    assert combined.coefficient((2, 0)).item() == pytest.approx(0.5, abs=0.15)


def test_aggregate_modes_and_polynomial_api():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)
    pts = torch.randn(3, 2, dtype=DTYPE) * 0.3
    poly = HOPE(net).expand(pts, order=3)
    assert len(poly) == 3 and isinstance(poly[1], TaylorPolynomial)
    center = torch.zeros(2, dtype=DTYPE)
    local = poly.aggregate("local", center=center)
    # recentering is exact for the polynomial: same values everywhere
    probe = torch.randn(3, 4, 2, dtype=DTYPE)
    torch.testing.assert_close(local.evaluate(probe), poly.evaluate(probe))
    combined = poly.aggregate("combined", center=center)
    torch.testing.assert_close(combined.coefficients[0], local.coefficients.mean(0))
    mean = poly.aggregate("mean")
    torch.testing.assert_close(mean.coefficients[0], poly.coefficients.mean(0))
    with pytest.raises(ValueError, match="example"):
        poly.terms()
    assert len(poly.terms(top=3, example=1)) == 3
    h = poly.derivative_tensor(2)
    torch.testing.assert_close(h, h.transpose(1, 2))
    with pytest.raises(ValueError, match="mode"):
        poly.aggregate("bogus")


def test_target_internal_batch_size_and_errors_leave_model_unchanged():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 6), nn.Softplus(), nn.Dropout(0.2), nn.Linear(6, 3)).to(DTYPE)
    net.eval()
    x = torch.randn(4, 3, dtype=DTYPE)
    hope = HOPE(net)
    a = hope.expand(x, order=3, target=[0, 1, 2, 1])
    b = hope.expand(x, order=3, target=[0, 1, 2, 1], internal_batch_size=5)
    torch.testing.assert_close(a.coefficients, b.coefficients, rtol=1e-13, atol=1e-14)
    c = hope.expand(x[1:2], order=3, target=1)
    torch.testing.assert_close(a.coefficients[1], c.coefficients[0], rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="target"):
        hope.expand(x, order=2)
    with pytest.raises(ValueError, match="order"):
        hope.attribute(x, order=0, target=0)
    net.train()
    with pytest.raises(ValueError, match="dropout"):
        hope.expand(x, order=2, target=0)
    assert net.training and all(m.training for m in net.modules())
    assert not net[1]._forward_hooks and not net[1]._forward_pre_hooks

    class Bad(nn.Module):
        def forward(self, x):
            return torch.atan(x).sum(1)

    model = nn.Sequential(nn.Linear(3, 3), Bad()).to(DTYPE)
    with pytest.raises(UnsupportedJetOperation, match=r"atan.*Bad"):
        HOPE(model).expand(x, order=2)
    assert HOPE.get_name() == "HOPE"


@pytest.mark.parametrize("num_variables,order", [(1, 10), (3, 6), (5, 5), (8, 4)])
def test_recovery_plan_inverts_the_univariate_map_for_every_support(num_variables, order):
    """c_d(v) = sum_{|j|=d} T_j v^j computed directly, then recovered exactly."""
    from captum_interactions._utils.taylor_polynomial import RecoveryPlan, monomials

    gen = torch.Generator().manual_seed(num_variables * 100 + order)
    orders = list(range(order + 1))
    plan = RecoveryPlan(num_variables, orders)
    directions = plan.direction_matrix(DTYPE, torch.device("cpu"))  # (n_dir, p)
    truth, univariate = {}, torch.zeros(order + 1, directions.shape[0], 2, dtype=DTYPE)
    for d in orders:
        exps = torch.tensor(monomials(num_variables, d), dtype=DTYPE).reshape(-1, num_variables)
        truth[d] = torch.randn(2, exps.shape[0], generator=gen, dtype=DTYPE)
        powers = (directions[:, None, :] ** exps[None]).prod(-1)  # (n_dir, M_d)
        univariate[d] = powers @ truth[d].T
    recovered = plan.recover(univariate)
    for d in orders:
        torch.testing.assert_close(recovered[d], truth[d], rtol=1e-9, atol=1e-9)


def test_shipped_block_inverses_are_the_exact_inverses():
    """The table read at run time holds, bit for bit, the exact rational
    inverses rounded once (recomputed here), and each is B^{-1} to round-off."""
    import numpy as np
    from captum_interactions._utils import taylor_polynomial as tp

    shipped = np.load(tp._TABLE_PATH)
    assert np.array_equal(shipped, tp.block_inverse_table_values())
    for (s, d), inverse in tp._block_inverse_table().items():
        full = tp._compositions(d, s)
        block = tp._power_table(full, full, d)
        np.testing.assert_allclose(inverse @ block, np.eye(len(full)), rtol=0, atol=1e-9)


def test_exponent_table_holds_the_tables_a_polynomial_derives():
    """HOPE's graded exponent table carries the degrees, the order and each
    order's positions (known from the counts); they equal what a polynomial
    reads back from the exponents themselves, and so do the derivative tensors."""
    from captum_interactions._core.hope import _exponent_table
    from captum_interactions._utils.taylor_polynomial import TaylorPolynomial

    gen = torch.Generator().manual_seed(0)
    for p, order in ((1, 3), (2, 0), (2, 4), (3, 5), (4, 2)):
        exponents, tables = _exponent_table(p, order)
        coefficients = torch.randn(2, exponents.shape[0], generator=gen, dtype=DTYPE)
        center = torch.zeros(2, p, dtype=DTYPE)
        derived = TaylorPolynomial(exponents.clone(), coefficients, center)  # own tables
        given = TaylorPolynomial(exponents, coefficients, center, _tables=tables)
        assert torch.equal(tables["degrees"], exponents.sum(1))
        assert tables["order"] == derived.order == order
        for k in range(order + 1):
            for got, expected in zip(given.coefficients_of_order(k),
                                     derived.coefficients_of_order(k)):
                assert torch.equal(got, expected)
            assert torch.equal(given.derivative_tensor(k), derived.derivative_tensor(k))


def test_shipped_recovery_maps_equal_the_block_solves():
    """The recovery maps read at run time (p <= 4, d <= 8) are those the block
    solves make, the maps read up to an order are the matching slices of the
    file, and a plan of any orders places the rows at its own directions."""
    import numpy as np
    from captum_interactions._utils import taylor_polynomial as tp

    shipped = np.fromfile(tp._RECOVERY_TABLE_PATH, dtype="<f8")
    expected = tp.recovery_table_values()
    assert shipped.shape == expected.shape  # no more, no fewer values than the layout
    np.testing.assert_allclose(shipped, expected, rtol=1e-13, atol=1e-13)
    for (p, d), (offset, count) in tp._recovery_table_offsets().items():
        block = shipped[offset : offset + count * count].reshape(count, count)
        for top in (d, 8, 11):
            assert np.array_equal(tp._recovery_table_maps(p, top)[d], block)
        assert d + 1 not in tp._recovery_table_maps(p, d)
    assert tp._recovery_table_maps(5, 2) == {} and 9 not in tp._recovery_table_maps(2, 9)
    for p in (2, 3, 4):
        for orders in [(0, 1, 2, 3, 4, 5, 6, 7, 8), (2,), (0, 3), (1, 4, 8), (2, 5, 6), (3, 7)]:
            plan = tp.RecoveryPlan(p, orders)
            solved = {d: plan._dense_map(d) for d in plan.orders if d != 0}
            for d, dense in plan._dense_arrays().items():
                np.testing.assert_allclose(dense, solved[d], rtol=1e-13, atol=1e-13)
            # the stacked map: the same maps on its block diagonal, zero elsewhere
            n, top = len(plan.directions), max(orders)
            stacked = plan._stacked_map(top + 1, torch.device("cpu"), torch.float64)
            total = sum(m.shape[1] for m in solved.values()) + (plan.orders[0] == 0)
            if (top + 1) * n * total > plan._STACKED_MAX_ENTRIES:  # p = 4, orders to 8
                assert stacked is None
                continue
            stacked = stacked.numpy()
            expected, offset = np.zeros((top + 1, n, stacked.shape[1])), 0
            for d in plan.orders:
                if d == 0:
                    expected[0, 0, 0], offset = 1, 1
                else:
                    count = solved[d].shape[1]
                    expected[d, :, offset : offset + count] = solved[d]
                    offset += count
            assert offset == stacked.shape[1]
            np.testing.assert_allclose(stacked, expected.reshape(stacked.shape),
                                       rtol=1e-13, atol=1e-13)


def test_recovery_table_reads_the_same_bytes_without_pread(monkeypatch):
    """The shipped maps are read with os.pread where it exists and with a
    plain seek and read elsewhere (Windows): the same bytes as numpy reads."""
    import os

    import numpy as np
    from captum_interactions._utils import taylor_polynomial as tp

    whole = np.fromfile(tp._RECOVERY_TABLE_PATH, dtype="<f8")
    expected = whole[100:164].tobytes()
    assert tp._read_bytes(tp._RECOVERY_TABLE_PATH, 800, 512) == expected
    monkeypatch.delattr(os, "pread", raising=False)
    assert tp._read_bytes(tp._RECOVERY_TABLE_PATH, 800, 512) == expected
    # past the end: fewer bytes, which _recovery_table_maps reports as an error
    assert len(tp._read_bytes(tp._RECOVERY_TABLE_PATH, 8 * whole.size - 8, 64)) == 8


@pytest.mark.parametrize("num_variables,order", [(3, 9), (4, 6), (40, 2)])
def test_block_solves_equal_the_dense_maps(num_variables, order):
    """The two recoveries (block solves for large maps, dense maps otherwise)
    agree, past the shipped table (order 9: exact elimination at run time) and
    with the dictionary locator (40 variables: keys in base 3 overflow int64)."""
    from captum_interactions._utils.taylor_polynomial import RecoveryPlan

    plan = RecoveryPlan(num_variables, list(range(order + 1)))
    gen = torch.Generator().manual_seed(order)
    univariate = torch.randn(order + 1, len(plan.directions), 3, generator=gen, dtype=DTYPE)
    dense = plan.recover(univariate)
    blocks = plan._recover_blocks(univariate)
    for d in range(order + 1):
        torch.testing.assert_close(blocks[d], dense[d], rtol=1e-12, atol=1e-12)


def test_conv_net_four_groups_order_5_matches_nested_autograd():
    """Mixed partials over every support size (1..4 groups) through conv, tanh,
    softplus and pooling, against float64 nested autograd along the group directions."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3),
                        nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 1)).to(DTYPE)
    x = torch.randn(1, 1, 6, 6, dtype=DTYPE)
    mask = ((torch.arange(6)[:, None] // 3) * 2 + torch.arange(6)[None] // 3).view(1, 1, 6, 6)
    directions = torch.stack([(mask[0] == g).to(DTYPE) for g in range(4)])
    poly = HOPE(net).expand(x, order=5, feature_mask=mask)

    def along_groups(z):
        return net(x + (z.view(4, 1, 1, 1) * directions).sum(0, keepdim=True))[0, 0]

    # nested autograd over the unique (sorted) index tuples only: p^k would be slow
    z = torch.zeros(4, dtype=DTYPE, requires_grad=True)
    level = {(): along_groups(z)}
    for k in range(1, 6):
        nxt = {}
        for idx, value in level.items():
            (grad,) = torch.autograd.grad(value, z, create_graph=True)
            for j in range(idx[-1] if idx else 0, 4):
                nxt[idx + (j,)] = grad[j]
        level = nxt
        got = poly.derivative_tensor(k)[0]
        for idx, value in level.items():
            for perm in {idx, idx[::-1]}:  # the symmetric layout holds every order of idx
                assert got[perm].item() == pytest.approx(value.item(), rel=1e-9, abs=1e-12)


def test_cached_groups_follow_mask_changes_and_budgets():
    """The feature groups (and the directions built from them) are cached per
    mask tensor: a mask changed in place, a new mask, new input shapes and a
    budget that forces chunks all give the results of a fresh computation."""
    from captum_interactions import memory_budget
    from captum_interactions._core import hope as hope_module

    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).to(DTYPE)
    x = torch.randn(2, 6, dtype=DTYPE)
    mask = torch.tensor([[0, 0, 1, 1, 2, 2]])
    first = HOPE(net).expand(x, order=3, feature_mask=mask).coefficients
    mask[0, :3] = 5  # in place: groups {0 -> 5}, {1 -> 1 and 5}, {2}
    hope_module._GROUPS.clear()
    fresh = HOPE(net).expand(x, order=3, feature_mask=mask.clone()).coefficients
    hope_module._clear_caches()
    HOPE(net).expand(x, order=3, feature_mask=torch.tensor([[0, 0, 1, 1, 2, 2]]))
    changed = HOPE(net).expand(x, order=3, feature_mask=mask).coefficients
    assert not torch.allclose(first, fresh)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    again = HOPE(net).expand(x, order=3, feature_mask=mask).coefficients
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    wide = torch.randn(3, 6, dtype=DTYPE)  # new input shape, same mask
    ref = HOPE(net).expand(wide, order=3, feature_mask=mask.clone()).coefficients
    torch.testing.assert_close(
        HOPE(net).expand(wide, order=3, feature_mask=mask).coefficients, ref, rtol=0, atol=0)
    with memory_budget("20kB"):  # several chunks of directions
        chunked = HOPE(net).expand(x, order=3, feature_mask=mask).coefficients
    torch.testing.assert_close(chunked, fresh, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- kinks at the point
def _pool_windows_brute_force(a, out, kernel, stride, padding, dilation):
    """Per output position of a 2-D max pooling: is the maximum of a[0] tied with
    an element whose first-order coefficient differs from the chosen one's (loops)."""
    lead, (height, width) = a.shape[1:-2], a.shape[-2:]
    result = torch.zeros(out.shape[1:], dtype=torch.bool)
    for i, j in itertools.product(range(out.shape[-2]), range(out.shape[-1])):
        cells = [(i * stride[0] - padding[0] + dilation[0] * u,
                  j * stride[1] - padding[1] + dilation[1] * v)
                 for u in range(kernel[0]) for v in range(kernel[1])]
        cells = [(r, c) for r, c in cells if 0 <= r < height and 0 <= c < width]
        for index in itertools.product(*(range(n) for n in lead)):
            top = out[(0,) + index + (i, j)]
            tied = [a[(slice(None),) + index + cell] for cell in cells
                    if a[(0,) + index + cell] == top]
            chosen = out[(slice(None),) + index + (i, j)]
            result[index + (i, j)] = any(bool(t[1] != chosen[1]) for t in tied)
    return result


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode", [
    # windows that tile the input (a faster path): exact, partial (ceil), remainder
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 2), (3, 2), (0, 0), (1, 1), True),
    ((3, 3), (3, 3), (0, 0), (1, 1), False),
    # overlapping, padded, dilated
    ((3, 2), (1, 2), (1, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((2, 3), (2, 1), (0, 1), (2, 1), False),
    ((3, 2), (2, 3), (1, 1), (1, 2), True),
])
def test_tied_pooling_windows_match_a_loop_over_every_window(kernel, stride, padding, dilation,
                                                             ceil_mode):
    """Integer values make ties common; every window's verdict (tie with an element
    whose higher coefficients differ) equals a loop over its cells."""
    from captum_interactions._utils.jets import _switching_windows

    gen = torch.Generator().manual_seed(sum(kernel) + sum(stride) + sum(padding))
    a = torch.randint(0, 3, (3, 2, 2, 7, 8), generator=gen).double()
    a[1:, 0] = 1.0  # the first example moves every element alike: ties never switch
    out0, idx = F.max_pool2d(a[0], kernel, stride, padding, dilation, ceil_mode,
                             return_indices=True)
    index = idx.flatten(start_dim=2).unsqueeze(0).expand(3, -1, -1, -1)
    out = a.flatten(start_dim=3).gather(-1, index).reshape((3,) + out0.shape)
    found = _switching_windows(a, out, (kernel, stride, padding, dilation, ceil_mode), {}, 2)
    expected = _pool_windows_brute_force(a, out, kernel, stride, padding, dilation)
    assert expected.any() and not expected[0].any()
    assert torch.equal(found, expected)


def _blank_image_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Softplus(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(2 * 4 * 4, 1)).double()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)  # a blank image: every window ties
    x[0, 0, 2:5, 2:5] = torch.randn(3, 3, dtype=torch.float64)
    quadrants = (torch.arange(8)[None, :] // 4 + 2 * (torch.arange(8)[:, None] // 4))
    return net, x, quadrants.reshape(1, 1, 8, 8)


def test_expansion_on_a_pooling_tie_warns_and_off_it_is_silent():
    """On a blank region the pooled maximum is tied and switches element as the
    quadrants move: no side's derivative is HOPE's (one-sided differences show
    it), so HOPE warns. A point off every tie expands silently, and exactly."""
    net, x, mask = _blank_image_cnn()
    with pytest.warns(NonSmoothModelWarning, match=r"kink of max_pool2d"):
        gradient = HOPE(net).expand(x, order=2, feature_mask=mask).derivative_tensor(1)[0]
    f0, h = net(x).item(), 1e-7
    shifts = [(mask == g).double() for g in range(4)]
    right = torch.tensor([(net(x + h * s).item() - f0) / h for s in shifts], dtype=torch.float64)
    left = torch.tensor([(f0 - net(x - h * s).item()) / h for s in shifts], dtype=torch.float64)
    assert (right - left).abs().max() > 1e-2  # not differentiable at x
    assert min((gradient - right).abs().max(), (gradient - left).abs().max()) > 1e-3

    moved = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                   dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poly = HOPE(net).expand(moved, order=2, feature_mask=mask)
    hessian = torch.autograd.functional.hessian(
        lambda z: net(moved + sum(z[g] * shifts[g] for g in range(4))).sum(),
        torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(poly.derivative_tensor(2)[0], hessian, rtol=1e-10, atol=1e-12)


def test_ties_that_move_alike_and_constant_kinks_do_not_warn():
    """A blank image shifted as a whole moves every tied element alike (no
    padding: every conv output sees the same shift), and a ReLU whose input is
    0 and independent of the variables stays on its kink: both are exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(2 * 3 * 3, 1)).double()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    whole = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poly = HOPE(net).expand(x, order=3, feature_mask=whole)
    line = [net(x + t).item() for t in (-2e-3, -1e-3, 0.0, 1e-3, 2e-3)]
    second = (line[1] - 2 * line[2] + line[3]) / 1e-6  # f'' along the shift
    torch.testing.assert_close(poly.derivative_tensor(2)[0, 0, 0],
                               torch.tensor(second, dtype=torch.float64), rtol=1e-4, atol=1e-6)

    dead = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        dead[0].weight[0] = 0.0
        dead[0].bias[0] = 0.0  # unit 0: input exactly 0 whatever the variables
        dead[0].bias[1:] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HOPE(dead).expand(torch.zeros(1, 3, dtype=torch.float64), order=2)


@pytest.mark.parametrize("name, layer, break_point", [
    ("relu", nn.ReLU(), 0.0), ("leaky_relu", nn.LeakyReLU(0.1), 0.0), ("elu", nn.ELU(), 0.0),
    ("hardtanh", nn.Hardtanh(-1.0, 1.0), 1.0),
    ("hardtanh", nn.ReLU6(), 6.0),  # nn.ReLU6 calls F.hardtanh(x, 0, 6)
    ("clamp", None, -0.5),
    ("clamp", "tensor bound", -0.5),
])
def test_expansion_on_a_kink_of_an_activation_warns_naming_it(name, layer, break_point):
    """At x = 0 every hidden input equals the bias, set to a break point of the
    activation, and moves with the variables."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 5).double()
    with torch.no_grad():
        linear.bias.fill_(break_point)
    if layer is None:
        def net(x):
            return linear(x).clamp(min=break_point).sum(-1, keepdim=True)
    elif layer == "tensor bound":  # a bound that is a tensor: the general clamp rule
        def net(x):
            hidden = linear(x)
            return torch.clamp(hidden, min=torch.full_like(hidden, break_point)).sum(
                -1, keepdim=True)
    else:
        net = nn.Sequential(linear, layer, nn.Linear(5, 1).double())
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.warns(NonSmoothModelWarning, match=rf"kink of {name}\b"):
        HOPE(net).attribute(x, order=2)
    with warnings.catch_warnings():  # a point off the break points: silent
        warnings.simplefilter("error")
        HOPE(net).attribute(x + 0.01, order=2)


def test_integer_casts_are_piecewise_constant_and_float_casts_linear():
    """x.to(int64) has zero derivatives (it used to cast every Taylor coefficient,
    so a slope of 3 came out as 3); it jumps at nonzero integers, where the call
    warns. A float cast stays linear."""
    def model(x):
        return ((3 * x).to(torch.int64) + x.to(torch.float32).double() ** 2).sum(-1,
                                                                                 keepdim=True)

    x = torch.tensor([[0.1, 0.45]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poly = HOPE(model).expand(x, order=2)
    torch.testing.assert_close(poly.derivative_tensor(1)[0], 2 * x.float().double()[0])
    torch.testing.assert_close(poly.derivative_tensor(2)[0], 2 * torch.eye(2, dtype=torch.float64))
    assert poly.evaluate(x).item() == pytest.approx(model(x).item(), rel=1e-7)
    on_a_step = torch.tensor([[1.0, 0.45]], dtype=torch.float64)  # 3 x = 3: a jump
    with pytest.warns(NonSmoothModelWarning, match=r"kink of a cast to int64"):
        HOPE(model).expand(on_a_step, order=2)


@pytest.mark.parametrize("point, kinks", [
    ([0.3, 0.5], []), ([0.0, 0.5], ["a comparison (gt)", "sign"]),
    ([0.3, 0.2], ["a comparison (le)"]),
])
def test_masks_from_comparisons_warn_only_on_their_threshold(point, kinks):
    """Masks from comparisons (x > 0, x <= 0.2) and sign select pieces: exact off
    their thresholds (the Hessian of the pieces, here of x^2 terms), a kink on them."""
    def model(x):
        return (torch.where(x > 0, x * x, 0.1 * x) + x * x * (x <= 0.2)
                + torch.sign(x) * x).sum(-1, keepdim=True)

    x = torch.tensor([point], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        poly = HOPE(model).expand(x, order=2)
    messages = [str(w.message) for w in caught if w.category is NonSmoothModelWarning]
    if not kinks:
        assert not messages
        expected = torch.diag(2.0 * (x[0] > 0) + 2.0 * (x[0] <= 0.2)).double()
        torch.testing.assert_close(poly.derivative_tensor(2)[0], expected)
    else:
        assert len(messages) == 1
        assert all("kink of" in messages[0] and name in messages[0] for name in kinks)


def test_comparison_with_the_jet_as_a_keyword_argument():
    """torch.gt(c, other=x): the jet in a keyword (it recursed without end)."""
    def model(x):
        inside = torch.gt(torch.zeros((), dtype=x.dtype), other=x.sum(-1, keepdim=True) - 1)
        return (x * x * inside).sum(-1, keepdim=True)

    x = torch.tensor([[0.6, 0.5]], dtype=torch.float64)  # 0 > 0.1 is False: the zero piece
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HOPE(model).attribute(x, order=2).abs().max() == 0
    x = torch.tensor([[-0.5, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(HOPE(model).attribute(x, order=2)[0],
                               2 * torch.eye(2, dtype=torch.float64))
    with pytest.warns(NonSmoothModelWarning, match=r"a comparison \(gt\)"):
        HOPE(model).attribute(torch.tensor([[0.5, 0.5]], dtype=torch.float64), order=2)


@pytest.mark.parametrize("name", ["GPT2", "Bert", "Llama"])
def test_hugging_face_transformers_match_autograd_hessians(name):
    """Real HF architectures from small configs (random weights, float64): the
    grouped Hessian of one output equals nested autograd's. GPT-2 runs through
    addmm (its Conv1D) and Tensor.type; Llama computes its RMSNorm in float32
    even in a float64 model, so it agrees to float32 round-off only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "GPT2":
        model = transformers.GPT2Model(transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
            bos_token_id=0, eos_token_id=0))
    elif name == "Bert":
        model = transformers.BertModel(transformers.BertConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
            vocab_size=50, max_position_embeddings=16))
    else:
        model = transformers.LlamaModel(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32, vocab_size=50, max_position_embeddings=16))
    model = model.double().eval()
    model.set_attn_implementation("eager")
    tokens, width = 4, 16
    embeddings = 0.5 * torch.randn(1, tokens, width, dtype=torch.float64)

    def readout(e):
        return model(inputs_embeds=e).last_hidden_state[:, -1, :3].sum(-1, keepdim=True)

    # two groups per token (a token's whole vector would be LayerNorm's null direction)
    mask = (2 * torch.arange(tokens).view(1, tokens, 1)
            + (torch.arange(width) < 5).long().view(1, 1, width)).expand(1, tokens, width)
    hessian = HOPE(readout).expand(embeddings, order=2, feature_mask=mask).derivative_tensor(2)[0]
    shifts = torch.stack([(mask[0] == g).double() for g in range(2 * tokens)])
    reference = torch.autograd.functional.hessian(
        lambda z: readout(embeddings + (z.view(-1, 1, 1) * shifts).sum(0, keepdim=True)).sum(),
        torch.zeros(2 * tokens, dtype=torch.float64))
    assert reference.abs().max() > 1
    tolerance = 1e-5 if name == "Llama" else 1e-12
    torch.testing.assert_close(hessian, reference, rtol=tolerance, atol=tolerance)


def test_addmm_and_baddbmm_follow_beta_and_alpha():
    from captum_interactions._utils.jets import make_jet

    torch.manual_seed(0)
    bias, weight = torch.randn(3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x0, v = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    jet = make_jet(x0, v, 3)
    out = torch.addmm(bias, torch.tanh(jet), weight, beta=0.5, alpha=2.0)
    line = lambda t: torch.addmm(bias, torch.tanh(x0 + t * v), weight, beta=0.5, alpha=2.0)  # noqa: E731
    first = torch.autograd.functional.jvp(line, torch.zeros(()), torch.ones(()))[1]
    torch.testing.assert_close(out.coefficients[0], line(torch.zeros(())))
    torch.testing.assert_close(out.coefficients[1], first)
    batch_bias = torch.randn(2, 1, 3, dtype=torch.float64)
    out = torch.baddbmm(batch_bias, torch.tanh(jet).unsqueeze(1), weight.expand(2, 4, 3),
                        alpha=3.0)
    batched = lambda t: torch.baddbmm(  # noqa: E731
        batch_bias, torch.tanh(x0 + t * v).unsqueeze(1), weight.expand(2, 4, 3), alpha=3.0)
    first = torch.autograd.functional.jvp(batched, torch.zeros(()), torch.ones(()))[1]
    torch.testing.assert_close(out.coefficients[0], batched(torch.zeros(())))
    torch.testing.assert_close(out.coefficients[1], first)
