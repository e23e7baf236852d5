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
