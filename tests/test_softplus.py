import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_interactions import (
    IntegratedHessians,
    NonSmoothModelWarning,
    replace_relu_with_softplus,
)

DTYPE = torch.float64


class FunctionalRelu(nn.Module):
    """ReLU through modules, F.relu, torch.relu, Tensor.relu and an in-place call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h)) + self.fc2(h).relu()
        h = self.act(h)
        h = F.relu(h, inplace=True)
        return self.fc3(h)


def softplus_reference(model, beta):
    def forward(x):
        sp = lambda v: F.softplus(v, beta=beta)  # noqa: E731
        h = sp(model.fc1(x))
        h = sp(model.fc2(h)) + sp(model.fc2(h))
        return model.fc3(sp(sp(h)))

    return forward


def test_swaps_modules_and_functional_calls_and_restores():
    model = FunctionalRelu().to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)
    relu_out = model(x)
    with replace_relu_with_softplus(model, beta=4.0) as swapped:
        assert swapped is model and isinstance(model.act, nn.Softplus)
        assert model.act.beta == 4.0
        torch.testing.assert_close(model(x), softplus_reference(model, 4.0)(x))
        # functional relu outside the model's forward is untouched
        assert torch.equal(F.relu(torch.tensor([-1.0])), torch.tensor([0.0]))
        gamma = IntegratedHessians(model).attribute(x)
    expected = IntegratedHessians(softplus_reference(model, 4.0)).attribute(x)
    torch.testing.assert_close(gamma, expected, rtol=1e-12, atol=1e-12)
    assert type(model.act) is nn.ReLU
    assert not model._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(model(x), relu_out)


def test_restores_after_an_exception_inside_the_block():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(RuntimeError, match="boom"):
        with replace_relu_with_softplus(model, beta=2.0):
            assert isinstance(model[1], nn.Softplus)
            raise RuntimeError("boom")
    assert type(model[1]) is nn.ReLU
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_restores_after_the_forward_raises():
    class Broken(nn.Module):
        def forward(self, x):
            F.relu(x)
            raise RuntimeError("inside forward")

    model = Broken()
    with replace_relu_with_softplus(model):
        with pytest.raises(RuntimeError, match="inside forward"):
            model(torch.zeros(1))
        # the mode left no trace: relu outside the forward is plain relu
        assert F.relu(torch.tensor([-1.0])).item() == 0.0


def test_relu_network_hessian_is_zero_until_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1)).to(DTYPE)
    x = torch.randn(3, 2, dtype=DTYPE)
    with pytest.warns(NonSmoothModelWarning, match="relu"):
        relu_gamma = IntegratedHessians(model).attribute(x)
    assert relu_gamma[:, 0, 1].abs().max() == 0
    with replace_relu_with_softplus(model, beta=10.0):
        smooth_gamma = IntegratedHessians(model).attribute(x)
    assert smooth_gamma[:, 0, 1].abs().max() > 1e-3


def test_large_beta_approaches_relu_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1)).to(DTYPE)
    x = torch.randn(50, 2, dtype=DTYPE)
    errors = []
    for beta in (1.0, 10.0, 100.0):
        with replace_relu_with_softplus(model, beta=beta):
            errors.append((model(x) - model[2](torch.relu(model[0](x)))).abs().max().item())
    assert errors[0] > errors[1] > errors[2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        with replace_relu_with_softplus(nn.ReLU(), beta=0):
            pass
    with pytest.raises(TypeError, match="model"):
        with replace_relu_with_softplus(lambda x: x):
            pass
