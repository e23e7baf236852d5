import math

import pytest
import torch
import torch.nn.functional as F

from captum_interactions._utils.jets import Jet, UnsupportedJetOperation, make_jet

DTYPE = torch.float64


def nested_taylor(f, x0, order):
    """Normalized Taylor coefficients of a scalar function by nested autograd."""
    x = torch.tensor(x0, dtype=DTYPE, requires_grad=True)
    out, g = [f(x)], f(x)
    for k in range(1, order + 1):
        if g.requires_grad:
            (g,) = torch.autograd.grad(g, x, create_graph=True, allow_unused=True)
            g = torch.zeros((), dtype=DTYPE) if g is None else g
        else:
            g = torch.zeros((), dtype=DTYPE)
        out.append(g / math.factorial(k))
    return torch.stack([o.detach() for o in out])


def _stack3(t):
    return torch.stack([t, torch.sin(t), t * t])


FUNCTIONS = {
    "exp": torch.exp,
    "log": torch.log,
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": lambda t: F.softplus(3 * t - 2, beta=2.0),
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "elu": lambda t: F.elu(t - 1.0),
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "pow_real": lambda t: t**1.5,
    "pow_int": lambda t: t**3,
    "rpow": lambda t: 2**t,
    "reciprocal": lambda t: 1 / t,
    "div": lambda t: torch.sin(t) / (t * t + 1),
    "erf": torch.erf,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "rsub": lambda t: 3 - t * t,
    "softmax": lambda t: torch.softmax(_stack3(t), 0)[1],
    "log_softmax": lambda t: F.log_softmax(_stack3(t), 0)[2],
    "layer_norm_composed": lambda t: (
        lambda v: ((v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + 1e-5))[0]
    )(_stack3(t)),
    "leaky_relu": lambda t: F.leaky_relu(2 * t - 1.5, 0.2) * t,
    "relu_product": lambda t: torch.relu(t - 1.0) * torch.sin(t),
    "clamp": lambda t: torch.clamp(t * t, 0.1, 5.0),
    "abs": lambda t: torch.abs(torch.sin(3 * t)),
    "where": lambda t: torch.where(t > 1, t * t, torch.sin(t)),
    "matmul": lambda t: (
        torch.stack([t, t * t]).reshape(1, 2) @ torch.stack([torch.sin(t), t]).reshape(2, 1)
    )[0, 0],
    "cat_sum": lambda t: (
        torch.cat([(t * t).reshape(1), torch.ones(1, dtype=DTYPE)]) * torch.stack([t, t])
    ).sum(),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("x0", [0.7, 1.3])
def test_elementwise_rules_match_nested_autograd_to_order_7(name, x0):
    f = FUNCTIONS[name]
    ref = nested_taylor(f, x0, 7)
    jet = make_jet(torch.tensor(x0, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE), 7)
    got = f(jet).coefficients
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_layer_norm_rule_matches_composition_and_finite_differences():
    # torch's own autograd of F.layer_norm is wrong beyond order 2 (seen on
    # torch 2.13 CPU), so the reference is the composed formula plus a finite
    # difference of the third derivative.
    def f(t):
        return F.layer_norm(_stack3(t), (3,))[0]

    jet = make_jet(torch.tensor(0.7, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE), 6)
    got = f(jet).coefficients
    ref = FUNCTIONS["layer_norm_composed"](jet).coefficients
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    x, h = torch.tensor(0.7, dtype=DTYPE), 1e-3
    third = (f(x + 2 * h) - 2 * f(x + h) + 2 * f(x - h) - f(x - 2 * h)) / (2 * h**3)
    assert abs(got[3].item() - third.item() / 6) < 1e-4 * abs(got[3].item()) + 1e-6


def test_batched_directions_conv_pool_net_match_directional_autograd():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(3, 2, 3), torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(2, 1),
    ).to(DTYPE)
    x0 = torch.randn(1, 1, 6, 6, dtype=DTYPE)
    dirs = torch.randn(4, 1, 6, 6, dtype=DTYPE)
    K = 4
    jet = Jet(torch.cat([x0.expand(4, -1, -1, -1)[None], dirs[None],
                         torch.zeros(K - 1, 4, 1, 6, 6, dtype=DTYPE)]))
    got = net(jet).coefficients[:, :, 0]
    for q in range(4):
        ref = nested_taylor(lambda t: net(x0 + t * dirs[q : q + 1])[0, 0], 0.0, K)
        torch.testing.assert_close(got[:, q], ref, rtol=1e-9, atol=1e-11)


def test_unsupported_operation_is_named():
    jet = make_jet(torch.ones(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE), 2)
    with pytest.raises(UnsupportedJetOperation, match="prod"):
        torch.prod(jet)
    with pytest.raises(ValueError, match="Supported operations"):
        torch.atan(jet)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus", "sin", "cos", "exp"])
def test_recurrences_agree_with_and_without_autograd_and_above_the_loop_size(name):
    """The series recurrences write into preallocated buffers where autograd
    allows it and copy otherwise, and switch to a multiply-add loop for large
    coefficients: every path gives the same, exact coefficients."""
    f = FUNCTIONS[name]
    x0 = torch.linspace(0.2, 1.8, 9000, dtype=DTYPE)  # above _DOT_LOOP_NUMEL
    direction = torch.linspace(-1.0, 1.0, 9000, dtype=DTYPE)
    big = f(make_jet(x0, direction, 6)).coefficients
    small = f(make_jet(x0[::1000], direction[::1000], 6)).coefficients
    torch.testing.assert_close(big[:, ::1000], small, rtol=1e-13, atol=1e-13)
    leaf = direction[::1000].clone().requires_grad_(True)
    with_grad = f(make_jet(x0[::1000], leaf, 6)).coefficients
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), small, rtol=1e-13, atol=1e-13)
    for i, (x, v) in enumerate(zip(x0[::1000].tolist(), direction[::1000].tolist())):
        ref = nested_taylor(lambda t: f(x + v * t), 0.0, 6)
        torch.testing.assert_close(small[:, i], ref, rtol=1e-10, atol=1e-10)


def test_softplus_past_its_threshold_follows_torch():
    """torch.nn.functional.softplus is the identity where beta * x > threshold:
    those elements get the input's coefficients, the others the series."""
    x0 = torch.tensor([0.3, 1.2, 2.6], dtype=DTYPE)  # beta * x0^2 = 0.18, 2.88, 13.52
    v = torch.tensor([1.0, -0.5, 2.0], dtype=DTYPE)
    square = make_jet(x0, v, 6) * make_jet(x0, v, 6)
    got = F.softplus(square, beta=2.0, threshold=4.0).coefficients
    for i in range(3):
        ref = nested_taylor(
            lambda t: F.softplus((x0[i] + v[i] * t) ** 2, beta=2.0, threshold=4.0), 0.0, 6)
        torch.testing.assert_close(got[:, i], ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[:, 2], square.coefficients[:, 2], rtol=0, atol=0)
    assert got[3:, :2].abs().min() > 1e-3  # the series parts do not truncate


def test_affine_layers_skip_the_zero_coefficients_of_a_line():
    """A jet marked as a line (degree 1) gives the same coefficients through
    conv and linear layers as the unmarked jet, zeros above order 1 included."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).to(DTYPE)
    lin = torch.nn.Linear(3 * 5 * 5, 2).to(DTYPE)
    x0, v = torch.randn(4, 2, 5, 5, dtype=DTYPE), torch.randn(4, 2, 5, 5, dtype=DTYPE)
    line = make_jet(x0, v, 5)
    assert line.degree == 1
    plain = Jet(line.coefficients.clone())
    assert plain.degree is None
    for model in (conv, lambda t: lin(conv(t).flatten(1))):
        got, ref = model(line).coefficients, model(plain).coefficients
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # tanh of a line multiplies powers of a_1 only (the general composition
    # forms every partition): the same coefficients up to round-off
    through_tanh = lambda t: lin(torch.tanh(conv(t)).flatten(1))  # noqa: E731
    got, ref = through_tanh(line).coefficients, through_tanh(plain).coefficients
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-15)
    out = lin(conv(line).flatten(1))
    assert out.degree == 1 and out.coefficients[2:].abs().max() == 0
    expected = lin(conv(x0 + 0.1 * v).flatten(1))
    torch.testing.assert_close(out.coefficients[0] + 0.1 * out.coefficients[1], expected)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("path", ["line", "composition", "recurrence"])
def test_tanh_sigmoid_softplus_series_match_nested_autograd_orders_1_to_7(name, path, monkeypatch):
    """Every path of the three series (a line: powers of a_1 only; a full series
    by composition over partitions; the recurrence used for large tensors) at
    random points, saturated ones included, against float64 nested autograd."""
    import captum_interactions._utils.jets as jets

    if path == "recurrence":
        monkeypatch.setattr(jets, "_COMPOSE_NUMEL", 0)
    f = {"tanh": torch.tanh, "sigmoid": torch.sigmoid,
         "softplus": lambda t: F.softplus(t, beta=1.5)}[name]
    gen = torch.Generator().manual_seed(7)
    x0 = torch.cat([torch.tensor([-12.0, -3.0, 6.0, 11.0], dtype=DTYPE),
                    torch.randn(4, generator=gen, dtype=DTYPE)])
    for order in (1, 3, 7):
        coeffs = torch.randn((order + 1, 8), generator=gen, dtype=DTYPE) * 0.7
        coeffs[0] = x0
        if path == "line":
            coeffs[2:] = 0
        jet = Jet(coeffs, degree=1 if path == "line" else None)
        assert jet.degree == (1 if path == "line" and order > 1 else None)
        got = f(jet).coefficients
        for i in range(8):
            ref = nested_taylor(
                lambda t: f(sum(coeffs[k, i] * t**k for k in range(order + 1))), 0.0, order)
            torch.testing.assert_close(got[:, i], ref, rtol=1e-12,
                                       atol=1e-14 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("path", ["line", "composition", "recurrence"])
def test_overflow_at_the_top_order_leaves_the_lower_orders_exact(name, path, monkeypatch):
    """a_1 = 1e80 at order 4: the order-4 coefficient overflows float64 (its
    a_1^4 term is ~1e320), orders 1-3 do not and must keep their closed forms
    (c1 = f' a1, c2 = f' a2 + f''/2 a1^2, c3 = f' a3 + f'' a1 a2 + f'''/6 a1^3).
    A rule that mixes the orders (e.g. summing them with one dense product,
    0 * inf = NaN) would lose the lower orders to the top one."""
    import captum_interactions._utils.jets as jets

    if path == "recurrence":
        monkeypatch.setattr(jets, "_COMPOSE_NUMEL", 0)
    f = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus}[name]
    x0 = torch.tensor([0.3, -1.2], dtype=DTYPE)
    coeffs = torch.zeros(5, 2, dtype=DTYPE)
    coeffs[0], coeffs[1] = x0, 1e80
    if path != "line":
        coeffs[2], coeffs[3], coeffs[4] = 1e40, 2.0, -1.0
    got = f(Jet(coeffs, degree=1 if path == "line" else None)).coefficients
    # derivatives of f at x0 by nested autograd (tiny numbers, no overflow)
    d = [nested_taylor(f, float(x), 3) * torch.tensor([1.0, 1.0, 2.0, 6.0], dtype=DTYPE)
         for x in x0]
    for i in range(2):
        f1, f2, f3 = d[i][1], d[i][2], d[i][3]
        a1, a2, a3 = coeffs[1, i], coeffs[2, i], coeffs[3, i]
        expected = torch.stack([f1 * a1, f1 * a2 + f2 / 2 * a1**2,
                                f1 * a3 + f2 * a1 * a2 + f3 / 6 * a1**3])
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(got[1:4, i], expected, rtol=1e-12, atol=0.0)
        assert not torch.isfinite(got[4, i])  # the top order did overflow


def test_q_basis_rows_are_the_derivatives_of_tanh():
    """tanh^(m)(u) = A_m(q) + y B_m(q) (y = tanh u, q = 1 - y^2) equals the
    polynomial P_m(y) of P_0 = y, P_{m+1} = (1 - y^2) P_m', in exact rational
    arithmetic at several y, for every m up to 12."""
    from fractions import Fraction

    from captum_interactions._utils.jets import _q_basis_rows

    order = 12
    half = (order + 1) // 2
    rows = _q_basis_rows(order)
    assert len(rows) == order + 1 and all(len(r) == 2 * half + 2 for r in rows)
    poly = [0, 1]  # P_0 = y, coefficients of y^0, y^1, ...
    for m in range(order + 1):
        for y in (Fraction(0), Fraction(1, 3), Fraction(-5, 7), Fraction(9, 10), Fraction(2)):
            q = 1 - y * y
            in_q = sum(c * q**i for i, c in enumerate(rows[m][: half + 1])) + y * sum(
                c * q**i for i, c in enumerate(rows[m][half + 1 :]))
            assert in_q == sum(c * y**j for j, c in enumerate(poly)), (m, y)
        derivative = [j * c for j, c in enumerate(poly)][1:] + [0, 0]
        poly = [derivative[j] - (derivative[j - 2] if j >= 2 else 0)
                for j in range(len(derivative))]  # (1 - y^2) P'


def test_monomial_tree_covers_every_composition_once():
    """The rows of the product tree are the partitions of k <= K; their
    multinomial counts add up to the C(k-1, m-1) compositions of k into m parts
    (the terms of [delta^m]_k), and every row is the product of its factors."""
    from captum_interactions._utils.jets import _monomial_tree

    for order, degree in ((6, 6), (8, 3), (10, 10)):
        stages, ks, parts, counts = _monomial_tree(order, degree)
        for k in range(1, order + 1):
            for m in range(1, k + 1):
                total = sum(c for kk, mm, c in zip(ks, parts, counts) if (kk, mm) == (k, m))
                # parts <= degree: the compositions with no part above it
                expected = math.comb(k - 1, m - 1) if degree == order else sum(
                    1 for c in _compositions(k, m) if max(c) <= degree)
                assert total == expected, (order, degree, k, m)
        filled = degree
        for left, right in stages:
            assert max(left + right) < filled
            for l_row, r_row, row in zip(left, right, range(filled, filled + len(left))):
                assert ks[l_row] + ks[r_row] == ks[row]
                assert parts[l_row] + parts[r_row] == parts[row]
            filled += len(left)
        assert filled == len(ks)


def _compositions(k, m):
    if m == 1:
        return [(k,)]
    return [(j,) + rest for j in range(1, k) for rest in _compositions(k - j, m - 1)]


def test_dense_conv_path_matches_the_direct_conv_and_follows_weight_updates():
    """Conv layers on many rows of a small input run as one product with the
    conv's dense matrix (cached per weight): the same coefficients as the direct
    call for conv1d/2d/3d with stride, padding, dilation and groups, and a new
    matrix once the weight changes in place."""
    import captum_interactions._utils.jets as jets

    torch.manual_seed(5)
    cases = [
        (torch.nn.Conv1d(2, 4, 3, stride=2, padding=1), (2, 9)),
        (torch.nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2), (4, 5, 5)),
        (torch.nn.Conv3d(1, 2, 2), (1, 3, 3, 3)),
    ]
    for conv, shape in cases:
        conv = conv.to(DTYPE)
        rows = 2 * math.prod(shape)  # enough rows for the dense path
        jet = Jet(torch.randn((3, rows) + shape, dtype=DTYPE))
        jets.clear_caches()
        got = conv(jet).coefficients
        assert [entry[2] is not None for entry in jets._DENSE_CONV.values()] == [True]
        with torch.no_grad():
            ref = torch.stack([conv._conv_forward(c, conv.weight, None)
                               for c in jet.coefficients])
        ref[0] += conv.bias.reshape((-1,) + (1,) * (len(shape) - 1))
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
        with torch.no_grad():
            conv.weight.mul_(2.0)
        twice = conv(jet).coefficients
        torch.testing.assert_close(twice[1:], 2 * ref[1:], rtol=1e-13, atol=1e-13)
    few = Jet(torch.randn(3, 2, 2, 9, dtype=DTYPE))  # too few rows for the matrix: direct
    jets.clear_caches()
    cases[0][0].to(DTYPE)(few)
    assert len(jets._DENSE_CONV) == 0


def test_dense_conv_matrix_waits_for_a_second_call_below_in_numel_rows():
    """Between in_numel / 2 and in_numel rows, building the matrix (a conv of
    in_numel rows) costs more than the call: the first call is direct, the
    next one builds and uses the matrix; both give the direct coefficients."""
    import captum_interactions._utils.jets as jets

    torch.manual_seed(6)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).to(DTYPE)
    shape = (2, 4, 4)  # in_numel = 32
    jet = Jet(torch.randn(3, 8, *shape, dtype=DTYPE))  # 3 x 8 = 24 rows
    with torch.no_grad():
        ref = torch.stack([conv._conv_forward(c, conv.weight, None) for c in jet.coefficients])
    ref[0] += conv.bias.reshape(-1, 1, 1)
    jets.clear_caches()
    first = conv(jet).coefficients
    assert [entry[2] is jets._PENDING for entry in jets._DENSE_CONV.values()] == [True]
    second = conv(jet).coefficients
    assert [isinstance(entry[2], torch.Tensor) for entry in jets._DENSE_CONV.values()] == [True]
    for got in (first, second):
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)


def test_line_stored_as_two_rows_gives_the_full_line_results():
    """A line may store only its rows x0 and v (order given): rules that know
    the degree never make the zero rows, the others make them on first use of
    ``coefficients``; every result equals that of the fully stored line."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(12, 5),
    ).to(DTYPE)
    x0, v = torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.randn(3, 2, 4, 4, dtype=DTYPE)
    order = 5
    short = Jet(torch.stack([x0, v]), degree=1, order=order)
    assert short.order == order and short.low.shape[0] == 2
    full = make_jet(x0, v, order)
    torch.testing.assert_close(short.coefficients, full.coefficients, rtol=0, atol=0)
    heads = {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus,
        "relu": torch.relu, "sin": torch.sin, "square": lambda t: t * t,
    }
    for name, head in heads.items():
        short = Jet(torch.stack([x0, v]), degree=1, order=order)
        got, ref = head(net(short)), head(net(full))
        assert got.order == order
        torch.testing.assert_close(got.coefficients, ref.coefficients, rtol=0, atol=0,
                                   msg=name)
    hidden = net(Jet(torch.stack([x0, v]), degree=1, order=order))
    assert hidden.degree == 1 and hidden._stored.shape[0] == 2  # the zero rows never made
    with pytest.raises(ValueError, match="rows 0..degree"):
        Jet(torch.stack([x0, v, v]), degree=1, order=order)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("path", ["line", "composition", "recurrence"])
@pytest.mark.parametrize("grad", [False, True])
def test_periodic_value_rows_give_the_plain_results(name, path, grad, monkeypatch):
    """A jet whose value repeats along its rows (HOPE's lines all pass through
    the points) marked with ``period``: the derivatives are made once per
    period and broadcast, with the same coefficients as the unmarked jet on
    every path (a line, the composition, the recurrence at order 8), written
    in place or not (autograd), through a threshold crossing for softplus."""
    import captum_interactions._utils.jets as jets

    if path == "recurrence":
        monkeypatch.setattr(jets, "_COMPOSE_NUMEL", 0)
    f = {"tanh": torch.tanh, "sigmoid": torch.sigmoid,
         "softplus": lambda t: F.softplus(t, beta=1.5, threshold=4.0)}[name]
    gen = torch.Generator().manual_seed(11)
    period, copies, order = 3, 4, 8 if path == "recurrence" else 5
    value = torch.cat([torch.tensor([[-6.0, 3.5]], dtype=DTYPE),  # 1.5 * 3.5 > 4: linear
                       torch.randn(period - 1, 2, generator=gen, dtype=DTYPE)])
    coeffs = torch.randn((order + 1, period * copies, 2), generator=gen, dtype=DTYPE)
    coeffs[0] = value.repeat(copies, 1)
    if path == "line":
        coeffs[2:] = 0
    with torch.set_grad_enabled(grad):
        if grad:
            coeffs.requires_grad_(True)
        degree = 1 if path == "line" else None
        marked = Jet(coeffs, degree=degree, period=period)
        assert marked.period == period
        got = f(marked)
        ref = f(Jet(coeffs, degree=degree)).coefficients
    assert got.period == period  # passed on: the value still repeats
    assert got.coefficients.requires_grad == grad
    torch.testing.assert_close(got.coefficients.detach(), ref.detach(), rtol=1e-15, atol=1e-15)
    # the rows really are shared: every copy of the value equals the first
    torch.testing.assert_close(got.coefficients[0].detach().reshape(copies, period, 2),
                               f(value).expand(copies, period, 2), rtol=1e-15, atol=0)


def test_period_is_kept_by_row_wise_layers_and_dropped_by_the_others():
    """Affine layers on batched values and the three activations keep the
    period; an unbatched conv, linear on a 1-D value and any other rule drop it
    (the rows are no longer the examples' copies)."""
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(2, 3, 3).to(DTYPE)
    lin = torch.nn.Linear(12, 4).to(DTYPE)
    x0 = torch.randn(2, 2, 4, 4, dtype=DTYPE).repeat(3, 1, 1, 1)
    line = Jet(torch.stack([x0, torch.randn_like(x0)]), degree=1, order=4, period=2)
    hidden = torch.tanh(conv(line))
    assert hidden.period == 2
    assert F.softplus(lin(hidden.flatten(1))).period is None  # flatten drops it
    unbatched = Jet(torch.randn(5, 2, 4, 4, dtype=DTYPE), period=1)
    assert conv(unbatched).period is None
    one_dim = Jet(torch.randn(5, 12, dtype=DTYPE), period=4)
    assert one_dim.period == 4 and lin(one_dim).period is None
    assert Jet(torch.randn(5, 6, 2, dtype=DTYPE), period=4).period is None  # 6 % 4 != 0
