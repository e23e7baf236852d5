"""The batched scrambled Sobol sequences behind SmoothHess's "sobol" sampler."""
import pytest
import torch

from captum_interactions._utils import sobol


def test_every_sequence_keeps_the_net_property():
    """Scrambled by a unit lower-triangular matrix and a digital shift, the
    first 2^m points of every sequence still hold one point per elementary
    interval: per coordinate (one per 1/64) and on the first two coordinates
    (a (0, 6, 2)-net: one point per 2^-i x 2^-(6 - i) box)."""
    torch.manual_seed(0)
    u = sobol.scrambled_sobol(64, 6, 5)
    assert u.shape == (64, 6, 5) and u.dtype == torch.float64
    assert 0 <= u.min() and u.max() < 1
    for s in range(6):
        for d in range(5):
            assert sorted((u[:, s, d] * 64).floor().long().tolist()) == list(range(64))
        for i in range(7):
            boxes = (u[:, s, 0] * 2**i).floor().long() * 2 ** (6 - i) + (
                u[:, s, 1] * 2 ** (6 - i)).floor().long()
            assert sorted(boxes.tolist()) == list(range(64))


def test_without_scrambling_the_points_are_torchs_sobol_sequence(monkeypatch):
    """With every random bit zero (identity matrix, no shift) the points are
    torch's unscrambled sequence, in its order: the direction numbers and the
    Gray-code order are right."""
    monkeypatch.setattr(sobol.torch, "randint",
                        lambda low, high, size: torch.zeros(size, dtype=torch.int64))
    got = sobol.scrambled_sobol(40, 2, 7)
    expected = torch.quasirandom.SobolEngine(7, scramble=False).draw(40, dtype=torch.float64)
    assert torch.equal(got[:, 0], expected) and torch.equal(got[:, 1], expected)


def test_points_are_uniform_and_sequences_independent():
    """Every point is uniform on the cube (the estimators stay unbiased) and
    sequences and coordinates are independent: means, variances and
    correlations over 4,000 sequences within 5 standard errors."""
    torch.manual_seed(1)
    count = 4000
    u = sobol.scrambled_sobol(5, count, 3)  # (points, sequences, dims)
    se_mean = (1 / 12) ** 0.5 / count**0.5
    assert ((u.mean(1) - 0.5).abs() < 5 * se_mean).all()
    assert ((u.var(1) - 1 / 12).abs() < 5 * 0.0745 / count**0.5).all()  # sd of (u - 1/2)^2
    centred = u - 0.5
    across_dims = (centred[:, :, 0] * centred[:, :, 1]).mean(1) * 12
    across_sequences = (centred[:, :-1] * centred[:, 1:]).mean(1) * 12
    assert (across_dims.abs() < 5 / count**0.5).all()
    assert (across_sequences.abs() < 5 / count**0.5).all()
    # within a sequence the points are dependent by design: the first two
    # lie in opposite halves of every coordinate
    assert torch.equal((u[0] < 0.5), ~(u[1] < 0.5))


def test_reproducible_under_manual_seed():
    torch.manual_seed(3)
    a = sobol.scrambled_sobol(9, 4, 2)
    torch.manual_seed(3)
    b = sobol.scrambled_sobol(9, 4, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])


@pytest.mark.parametrize("points", [1, 2, 3])
def test_few_points(points):
    torch.manual_seed(4)
    u = sobol.scrambled_sobol(points, 3, 2)
    assert u.shape == (points, 3, 2)
