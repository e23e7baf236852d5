"""How TaylorPolynomial prints: unit coefficients left out, signs joined,
significant digits, centers, batches."""
import pytest
import torch

from captum_interactions._utils.taylor_polynomial import TaylorPolynomial, monomials

# exponents of every monomial in two variables up to degree 3 (the layout HOPE returns)
EXPONENTS = torch.tensor([m for d in range(4) for m in monomials(2, d)])
INDEX = {tuple(m): n for n, m in enumerate(EXPONENTS.tolist())}


def poly(terms, center=(0.0, 0.0), names=("a", "b")):
    coefficients = torch.zeros(1, len(INDEX), dtype=torch.float64)
    for monomial, value in terms.items():
        coefficients[0, INDEX[monomial]] = value
    return TaylorPolynomial(EXPONENTS, coefficients, torch.tensor(center, dtype=torch.float64),
                            list(names))


def test_unit_coefficients_are_left_out_and_signs_join_terms():
    p = poly({(2, 0): 1.0, (1, 1): -1.0, (0, 3): 0.5, (1, 0): -1.0})
    assert str(p) == "-a + a^2 - a*b + 0.5*b^3"
    assert "+ -" not in str(p)


def test_significant_digits_and_constant():
    p = poly({(0, 0): 2.0, (1, 1): 0.5, (2, 0): -1.23456, (0, 2): 1.5e-5})
    assert p.to_string() == "2 - 1.23*a^2 + 0.5*a*b + 1.5e-5*b^2"
    assert p.to_string(precision=2) == "2 - 1.2*a^2 + 0.5*a*b + 1.5e-5*b^2"
    assert p.to_string(precision=5) == "2 - 1.2346*a^2 + 0.5*a*b + 1.5e-5*b^2"
    # a coefficient that rounds to 1 at the precision asked is printed as 1, i.e. left out
    assert poly({(2, 0): 0.9999}).to_string(precision=2) == "a^2"
    assert poly({(2, 0): 0.9999}).to_string(precision=4) == "0.9999*a^2"


def test_top_min_abs_zero_and_center():
    p = poly({(1, 0): 3.0, (0, 1): -0.2, (2, 0): 0.01})
    assert p.to_string(top=2) == "3*a - 0.2*b"
    assert p.to_string(min_abs=0.1) == "3*a - 0.2*b"
    assert poly({}).to_string() == "0"
    shifted = poly({(2, 0): -1.0, (1, 1): 2.0}, center=(0.4, -0.3))
    assert shifted.to_string() == "-(a - 0.4)^2 + 2*(a - 0.4)*(b + 0.3)"
    with pytest.raises(ValueError, match="precision"):
        p.to_string(precision=0)


def test_batch_prints_one_line_per_polynomial():
    coefficients = torch.zeros(2, len(INDEX), dtype=torch.float64)
    coefficients[0, INDEX[(1, 0)]] = 1.0
    coefficients[1, INDEX[(0, 1)]] = -2.0
    p = TaylorPolynomial(EXPONENTS, coefficients, torch.zeros(2, 2, dtype=torch.float64))
    assert str(p) == "x1\n-2*x2"


def test_derivative_tensor_does_not_depend_on_the_order_of_the_monomials():
    """Entry (i_1..i_k) of the k-th derivative tensor is j! T_j for the monomial
    j counting the i's, whichever order the exponents are stored in."""
    import itertools
    import math

    gen = torch.Generator().manual_seed(0)
    exps = [m for d in range(5) for m in monomials(3, d)]
    coeffs = torch.randn(2, len(exps), generator=gen, dtype=torch.float64)
    shuffle = torch.randperm(len(exps), generator=gen)
    center = torch.zeros(2, 3, dtype=torch.float64)
    graded = TaylorPolynomial(torch.tensor(exps), coeffs, center)
    shuffled = TaylorPolynomial(torch.tensor(exps)[shuffle], coeffs[:, shuffle], center)
    for k in range(5):
        got, other = graded.derivative_tensor(k), shuffled.derivative_tensor(k)
        assert torch.equal(got, other)
        for idx in itertools.product(range(3), repeat=k):
            j = tuple(idx.count(v) for v in range(3))
            factorial = math.prod(math.factorial(e) for e in j)
            assert torch.equal(got[(slice(None),) + idx], coeffs[:, exps.index(j)] * factorial)
