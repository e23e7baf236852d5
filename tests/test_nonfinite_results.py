"""Every method warns (NonFiniteResultWarning) when its result holds NaN or inf,
naming the examples concerned, and stays silent on finite results; HOPE keeps
the finite orders below an overflow."""
import warnings

import pytest
import torch
from torch import nn

from captum_interactions import (
    AgglomerativeContextualDecomposition,
    ContextualDecomposition,
    ExpectedHessians,
    HOPE,
    IntegratedHessians,
    LayerIntegratedHessians,
    NonFiniteResultWarning,
    SmoothHess,
    explain_dataset,
)

DTYPE = torch.float64


class LogOfFirst(nn.Module):
    """log(x_0) * (1 + x_1^2) after a (identity) linear layer: not finite where
    x_0 <= 0 is reached."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2, dtype=DTYPE)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(2, dtype=DTYPE))
            self.linear.bias.zero_()

    def forward(self, x):
        h = self.linear(x)
        return (torch.log(h[:, :1]) * (1 + h[:, 1:] ** 2))


# example 0 stays at x_0 > 0 (also along its path from the baseline and under
# the noise below); example 1 has x_0 < 0
INPUTS = torch.tensor([[2.0, 0.5], [-1.0, 0.5]], dtype=DTYPE)
BASELINE = torch.tensor([[1.0, 0.0]], dtype=DTYPE)


def _nonfinite_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in caught if issubclass(w.category, NonFiniteResultWarning)]


CALLS = {
    "IntegratedHessians": lambda m, x: IntegratedHessians(m).attribute(x, BASELINE),
    "LayerIntegratedHessians": lambda m, x: LayerIntegratedHessians(m, m.linear).attribute(
        x, BASELINE),
    "ExpectedHessians": lambda m, x: ExpectedHessians(m).attribute(
        x, BASELINE.expand(3, -1), n_samples=8),
    "SmoothHess": lambda m, x: SmoothHess(m).attribute(x, n_samples=64, stdevs=0.1),
    "HOPE.expand": lambda m, x: HOPE(m).expand(x, order=3).coefficients,
    "HOPE.attribute": lambda m, x: HOPE(m).attribute(x, order=2),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_warns_naming_the_nonfinite_example_only(name):
    torch.manual_seed(0)
    model = LogOfFirst().eval()
    out, caught = _nonfinite_warnings(lambda: CALLS[name](model, INPUTS))
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[0]).all()
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith(name.split(".")[0] + ":")
    assert "1 of 2 examples (index 1)" in message
    assert "float64" in message


@pytest.mark.parametrize("name", sorted(CALLS))
def test_silent_on_finite_results(name):
    torch.manual_seed(0)
    model = LogOfFirst().eval()
    out, caught = _nonfinite_warnings(lambda: CALLS[name](model, INPUTS[:1]))
    assert torch.isfinite(out).all()
    assert caught == []


def test_hope_names_the_overflow_of_high_orders_and_keeps_the_lower_ones():
    # tanh(1e4 x) at 0 in float32: the order-k input term is (1e4)^k, past
    # float32's 3.4e38 at k = 10; the coefficients of orders <= 9 (at most
    # 2.2e34) stay finite and must keep their values
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh())
    with torch.no_grad():
        model[0].weight.fill_(1e4)
        model[0].bias.zero_()
    x = torch.zeros(1, 1)
    lower, finite = _nonfinite_warnings(lambda: HOPE(model).expand(x, order=9))
    assert finite == [] and torch.isfinite(lower.coefficients).all()
    poly, caught = _nonfinite_warnings(lambda: HOPE(model).expand(x, order=10))
    assert not torch.isfinite(poly.coefficients[:, 10]).any()
    torch.testing.assert_close(poly.coefficients[:, :10], lower.coefficients, rtol=0, atol=0)
    assert len(caught) == 1 and "lower `order`" in str(caught[0].message)


def test_contextual_decomposition_warns_on_an_overflowing_model():
    model = nn.Sequential(nn.Linear(2, 1, dtype=DTYPE))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1e308]], dtype=DTYPE))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [1.0, 10.0]], dtype=DTYPE)  # example 1: 1e309 = inf
    out, caught = _nonfinite_warnings(lambda: ContextualDecomposition(model).attribute(x))
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()
    assert len(caught) == 1
    assert "ContextualDecomposition: " in str(caught[0].message)
    assert "1 of 2 examples (index 1)" in str(caught[0].message)


def test_explain_dataset_names_them_once_by_dataset_index(tmp_path):
    data = torch.utils.data.TensorDataset(torch.cat([INPUTS[:1]] * 3 + [INPUTS[1:]]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model = LogOfFirst().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explain_dataset(
            IntegratedHessians(model), loader, tmp_path / "run",
            attribute_kwargs={"baselines": BASELINE}, progress=False)
    # the run's own summary warning, by dataset index, not the method's per batch
    assert result.nonfinite_examples == [3]
    assert not [w for w in caught if issubclass(w.category, NonFiniteResultWarning)]
    assert [w for w in caught if "explain_dataset: 1 of 4 examples" in str(w.message)
            and "(examples 3)" in str(w.message)]


def test_agglomerative_cd_names_the_example_once():
    model = nn.Sequential(nn.Linear(4, 1, dtype=DTYPE))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1e308]], dtype=DTYPE))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 10.0]], dtype=DTYPE)
    _, caught = _nonfinite_warnings(
        lambda: AgglomerativeContextualDecomposition(model).attribute(x, structure="sequence"))
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith("AgglomerativeContextualDecomposition: ")
    assert "1 of 2 examples (index 1)" in message
    _, none = _nonfinite_warnings(
        lambda: AgglomerativeContextualDecomposition(model).attribute(x[:1], structure="sequence"))
    assert none == []


def test_row_sums_stand_for_the_result_only_where_they_are_finite():
    """warn_if_nonfinite(row_sums=...) skips the full scan only when the sums
    are finite, which a NaN or an infinity among their terms rules out (inf and
    -inf in one row sum to NaN); non-finite sums of a finite result (an
    overflow, or a non-finite f(x) - f(x') in the delta) fall back to the scan
    and stay silent."""
    from captum_interactions._utils.common import warn_if_nonfinite

    def caught_for(result, row_sums):
        return _nonfinite_warnings(lambda: warn_if_nonfinite(
            result, "IntegratedHessians", "somewhere", row_sums=row_sums))[1]

    finite = torch.ones(3, 2, 2, dtype=DTYPE)
    assert caught_for(finite, finite.sum(dim=(1, 2))) == []
    for bad in (float("nan"), float("inf"), -float("inf")):
        result = finite.clone()
        result[1, 0, 1] = bad
        caught = caught_for(result, result.sum(dim=(1, 2)) - 1.0)
        assert len(caught) == 1 and "1 of 3 examples (index 1)" in str(caught[0].message)
    both = finite.clone()
    both[2, 0, 0], both[2, 1, 1] = float("inf"), -float("inf")
    sums = both.sum(dim=(1, 2))
    assert torch.isnan(sums[2])
    caught = caught_for(both, sums)
    assert len(caught) == 1 and "(index 2)" in str(caught[0].message)
    huge = torch.full((2, 2, 2), 1e308, dtype=DTYPE)  # finite entries, sums overflow
    assert not torch.isfinite(huge.sum(dim=(1, 2))).any()
    assert caught_for(huge, huge.sum(dim=(1, 2))) == []
    change = torch.tensor([1.0, float("nan"), 2.0], dtype=DTYPE)  # f(x) - f(x') not finite
    assert caught_for(finite, finite.sum(dim=(1, 2)) - change) == []
