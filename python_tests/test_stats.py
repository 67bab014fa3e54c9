"""drs_ext.stats against scipy oracles, closed forms and exact coverage enumeration."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import betaln, comb
from scipy.stats import beta, binom, binomtest, multinomial

from drs_ext.stats import (
    MixturePrior,
    binom_test_p_value,
    lower_confidence_bound,
    mixture_log_e_value,
    mixture_lower_bound,
    mixture_rejects,
    mixture_upper_bound,
    upper_confidence_bound,
)

CASES = [(1, 10, 0.05), (5, 10, 0.05), (9, 10, 0.001), (37, 100, 0.01), (999, 1000, 0.001)]


@pytest.mark.parametrize(("k", "n", "alpha"), CASES)
def test_bounds_match_beta_ppf(k: int, n: int, alpha: float) -> None:
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(
        beta.ppf(alpha, k, n - k + 1), rel=1e-12
    )
    assert upper_confidence_bound(k, n, alpha) == pytest.approx(
        beta.ppf(1 - alpha, k + 1, n - k), rel=1e-12
    )


@pytest.mark.parametrize("n", [1, 2, 10, 100_000])
@pytest.mark.parametrize("alpha", [1e-6, 0.001, 0.05, 0.5])
def test_closed_forms_at_extreme_counts(n: int, alpha: float) -> None:
    assert lower_confidence_bound(0, n, alpha) == 0.0
    assert lower_confidence_bound(n, n, alpha) == alpha ** (1 / n)
    assert upper_confidence_bound(n, n, alpha) == 1.0
    assert upper_confidence_bound(0, n, alpha) == 1 - alpha ** (1 / n)


@pytest.mark.parametrize(("n", "alpha"), [(20, 0.05), (100, 0.001), (7, 0.3)])
def test_lower_and_upper_bounds_are_mirror_images(n: int, alpha: float) -> None:
    for k in range(n + 1):
        lcb = lower_confidence_bound(k, n, alpha)
        assert lcb == pytest.approx(1 - upper_confidence_bound(n - k, n, alpha), abs=1e-12)
        assert 0.0 <= lcb <= k / n <= upper_confidence_bound(k, n, alpha) <= 1.0


def test_lower_bound_increases_with_k_and_alpha() -> None:
    lcbs = [lower_confidence_bound(k, 50, 0.01) for k in range(51)]
    assert np.all(np.diff(lcbs) > 0)
    assert lower_confidence_bound(30, 50, 0.001) < lower_confidence_bound(30, 50, 0.1)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_exact_coverage_by_enumeration(alpha: float) -> None:
    n = 20
    ks = np.arange(n + 1)
    lcb = np.array([lower_confidence_bound(int(k), n, alpha) for k in ks])
    ucb = np.array([upper_confidence_bound(int(k), n, alpha) for k in ks])
    # Include the bounds themselves: coverage is tightest just above / below them.
    grid = np.unique(np.concatenate([np.linspace(0, 1, 401), lcb, ucb, lcb + 1e-12, ucb - 1e-12]))
    for p in grid[(grid >= 0) & (grid <= 1)]:
        pmf = binom.pmf(ks, n, p)
        assert pmf[lcb > p].sum() <= alpha + 1e-12
        assert pmf[ucb < p].sum() <= alpha + 1e-12


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        (0, 5, 0.5),
        (3, 5, 0.5),
        (5, 5, 0.5),
        (60, 100, 0.5),
        (7, 30, 0.1),
        (1, 1, 0.0),
        (0, 4, 1.0),
        (4, 4, 1.0),
    ],
)
def test_p_value_matches_scipy(k: int, n: int, p: float) -> None:
    expected = binomtest(k, n, p, alternative="greater").pvalue
    assert binom_test_p_value(k, n, p) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert binom_test_p_value(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-12)


def test_p_value_default_is_fair_coin_and_below_two_sided() -> None:
    n = 40
    for k in range(n // 2, n + 1):
        one_sided = binom_test_p_value(k, n)
        assert one_sided == pytest.approx(binom.sf(k - 1, n, 0.5), rel=1e-12)
        assert one_sided <= binomtest(k, n, 0.5).pvalue + 1e-15
    assert binom_test_p_value(0, n) == 1.0


@pytest.mark.parametrize(
    "probs", [(0.34, 0.33, 0.33), (0.41, 0.40, 0.19), (0.5, 0.45, 0.05), (0.6, 0.2, 0.2)]
)
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_top_two_test_is_valid_by_enumeration(probs: tuple[float, ...], alpha: float) -> None:
    # Exact over every multinomial outcome: P(the test names a class other than class 0, the
    # true top class, and does not abstain) <= alpha (Hung & Fithian 2019).
    n = 30
    error = 0.0
    for c0 in range(n + 1):
        for c1 in range(n + 1 - c0):
            counts = np.array([c0, c1, n - c0 - c1])
            top, runner_up = np.argsort(-counts, kind="stable")[:2]
            n_a, n_b = int(counts[top]), int(counts[runner_up])
            if top != 0 and binom_test_p_value(n_a, n_a + n_b) <= alpha:
                error += multinomial.pmf(counts, n, probs)
    assert error <= alpha


BAD_N = [0, -3, 2.0, math.nan, True, "5", None]
BAD_ALPHA = [0.0, 1.0, -0.1, 1.5, math.nan, math.inf, "0.05", None]


@pytest.mark.parametrize("fn", [lower_confidence_bound, upper_confidence_bound])
@pytest.mark.parametrize("n", BAD_N)
def test_bounds_reject_bad_n(fn: Callable[..., float], n: object) -> None:
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
        fn(0, n, 0.05)


@pytest.mark.parametrize("fn", [lower_confidence_bound, upper_confidence_bound])
@pytest.mark.parametrize("k", [-1, 11, 3.0, math.nan, False, None])
def test_bounds_reject_bad_k(fn: Callable[..., float], k: object) -> None:
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, n\]"):
        fn(k, 10, 0.05)


@pytest.mark.parametrize("fn", [lower_confidence_bound, upper_confidence_bound])
@pytest.mark.parametrize("alpha", BAD_ALPHA)
def test_bounds_reject_bad_alpha(fn: Callable[..., float], alpha: object) -> None:
    with pytest.raises(ValueError, match=r"alpha must be .*\(0, 1\)"):
        fn(3, 10, alpha)


def test_p_value_rejects_bad_arguments() -> None:
    for n in BAD_N:
        with pytest.raises(ValueError, match=r"n must be an integer >= 1"):
            binom_test_p_value(0, n)
    for k in [-1, 11, 2.5, math.nan]:
        with pytest.raises(ValueError, match=r"k must be an integer in \[0, n\]"):
            binom_test_p_value(k, 10)
    for p in [-0.01, 1.01, math.nan, "0.5"]:
        with pytest.raises(ValueError, match=r"p must be a real number in \[0, 1\]"):
            binom_test_p_value(3, 10, p)


def test_numpy_scalars_are_accepted() -> None:
    k, n = np.int64(7), np.int32(10)
    assert lower_confidence_bound(k, n, np.float64(0.05)) == lower_confidence_bound(7, 10, 0.05)
    assert upper_confidence_bound(k, n, 0.05) == upper_confidence_bound(7, 10, 0.05)
    assert binom_test_p_value(k, n, np.float32(0.5)) == binom_test_p_value(7, 10)
    assert isinstance(lower_confidence_bound(k, n, 0.05), float)


# ----------------------------------------------------------------------------------------------
# Anytime-valid mixture tests and confidence sequences.

PRIORS = [MixturePrior(), MixturePrior(1.0, 1.0, 0.0), MixturePrior(2.0, 0.7, 0.2)]
E_CASES = [(0, 0, 0.5), (7, 10, 0.5), (10, 10, 0.8), (0, 12, 0.3), (45, 50, 0.95), (3, 40, 0.2)]


def quadrature_e_value(k: int, n: int, p0: float, alternative: str, prior: MixturePrior) -> float:
    """E_n(p0) integrated numerically: the prior restricted to the alternative, renormalised."""
    f = n - k
    if alternative == "greater":
        law, lo, hi, atom_term = beta(prior.a, prior.b), p0, 1.0, float(f == 0) * p0**-n
        mass = prior.atom + (1 - prior.atom) * law.sf(p0)
    else:
        law, lo, hi, atom_term = beta(prior.a, prior.b), 0.0, p0, float(k == 0) * (1 - p0) ** -n
        mass = prior.atom + (1 - prior.atom) * law.cdf(p0)

    def ratio(q: float) -> float:
        return law.pdf(q) * (q / p0) ** k * ((1 - q) / (1 - p0)) ** f

    integral = quad(ratio, lo, hi, epsabs=0, epsrel=1e-11, limit=200)[0]
    return (prior.atom * atom_term + (1 - prior.atom) * integral) / mass


@pytest.mark.parametrize("prior", PRIORS, ids=["default", "uniform", "skewed"])
@pytest.mark.parametrize(("k", "n", "p0"), E_CASES)
@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_e_value_matches_quadrature(
    k: int, n: int, p0: float, alternative: str, prior: MixturePrior
) -> None:
    expected = quadrature_e_value(k, n, p0, alternative, prior)
    assert math.exp(mixture_log_e_value(k, n, p0, alternative, prior)) == pytest.approx(
        expected, rel=1e-7
    )


@pytest.mark.parametrize("n", [1, 20, 200])
def test_uniform_prior_e_value_is_a_binomial_tail(n: int) -> None:
    # Uniform prior on [p0, 1]: ∫ q^k (1-q)^f dq = B(k+1, f+1) P(Binomial(n+1, p0) <= k).
    prior, p0 = MixturePrior(1.0, 1.0, 0.0), 0.3
    ks = np.arange(n + 1)
    log_e = np.asarray(mixture_log_e_value(ks, n, p0, "greater", prior))
    expected = (
        binom.logcdf(ks, n + 1, p0)
        - np.log((n + 1) * comb(n, ks))
        - np.log1p(-p0)
        - ks * np.log(p0)
        - (n - ks) * np.log1p(-p0)
    )
    np.testing.assert_allclose(log_e, expected, rtol=1e-9, atol=1e-9)


def test_time_zero_and_mirror_symmetry() -> None:
    assert mixture_log_e_value(0, 0, 0.7) == pytest.approx(0.0, abs=1e-12)
    assert mixture_log_e_value(0, 0, 0.7, "less") == pytest.approx(0.0, abs=1e-12)
    prior = MixturePrior(2.0, 0.7, 0.2)
    ks = np.arange(31)
    np.testing.assert_allclose(
        mixture_log_e_value(ks, 30, 0.35, "less", prior),
        mixture_log_e_value(30 - ks, 30, 0.65, "greater", prior.mirrored()),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        mixture_upper_bound(ks, 30, 0.05), 1 - mixture_lower_bound(30 - ks, 30, 0.05), atol=1e-15
    )


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_rejects_exactly_at_one_over_alpha(alternative: str) -> None:
    # A level-alpha test compares log E with log(1/alpha) of the alpha given, not log(1/(2 alpha))
    # or log(2/alpha): alpha a hair above 1/E rejects, a hair below does not.
    k, n, p0 = (40, 50, 0.6) if alternative == "greater" else (10, 50, 0.4)
    log_e = mixture_log_e_value(k, n, p0, alternative)
    assert log_e > 1.0
    assert mixture_rejects(k, n, p0, math.exp(-log_e) * 1.001, alternative)
    assert not mixture_rejects(k, n, p0, math.exp(-log_e) * 0.999, alternative)


@pytest.mark.parametrize("prior", PRIORS, ids=["default", "uniform", "skewed"])
@pytest.mark.parametrize("n", [1, 7, 1000, 100_000])
def test_lower_bound_closed_form_at_unanimous_votes(n: int, prior: MixturePrior) -> None:
    marginal = prior.atom + (1 - prior.atom) * math.exp(
        betaln(prior.a + n, prior.b) - betaln(prior.a, prior.b)
    )
    expected = (0.001 * marginal) ** (1 / n)
    assert mixture_lower_bound(n, n, 0.001, prior) == pytest.approx(expected, rel=1e-14)
    lower = mixture_lower_bound(n, n, 0.001, prior)
    assert math.log(marginal) - n * math.log(lower) >= math.log(1 / 0.001) - 1e-12  # rejected
    # Unanimous votes: within log(1/atom) of Clopper-Pearson, never above it.
    assert mixture_lower_bound(n, n, 0.001) <= lower_confidence_bound(n, n, 0.001)


@pytest.mark.parametrize(("k", "n"), [(1, 5), (7, 10), (60, 100), (990, 1000), (99_000, 100_000)])
def test_lower_bound_is_the_root_of_the_mixture(k: int, n: int) -> None:
    # L is the largest p with M_n(p) >= 1/alpha; M_n(L) = 1/alpha, and M_n falls below it above.
    alpha, prior = 0.01, MixturePrior()
    lower = mixture_lower_bound(k, n, alpha)

    def log_m(p: float) -> float:
        beta_part = math.log1p(-prior.atom) + betaln(0.5 + k, 0.5 + n - k) - betaln(0.5, 0.5)
        return beta_part - k * math.log(p) - (n - k) * math.log1p(-p)

    assert log_m(lower) == pytest.approx(math.log(1 / alpha), abs=1e-6)
    assert log_m(lower) >= math.log(1 / alpha) - 1e-12  # up to the rounding of log_m itself
    assert log_m(lower * (1 + 1e-9)) < math.log(1 / alpha)
    assert 0 < lower < k / n < mixture_upper_bound(k, n, alpha) < 1


def test_bounds_are_monotone_and_vectorised() -> None:
    ks = np.arange(0, 201)
    lower = mixture_lower_bound(ks, 200, 0.05)
    upper = mixture_upper_bound(ks, 200, 0.05)
    assert lower.shape == upper.shape == (201,)
    assert lower[0] == 0.0 and upper[-1] == 1.0
    assert np.all(np.diff(lower) > 0) and np.all(np.diff(upper) > 0)
    assert np.all(lower <= ks / 200) and np.all(upper >= ks / 200)
    # A smaller alpha widens the sequence; so does a larger n at the same frequency only a bit.
    assert np.all(mixture_lower_bound(ks[1:], 200, 0.001) < lower[1:])
    assert mixture_lower_bound(0, 0, 0.05) == 0.0 and mixture_upper_bound(0, 0, 0.05) == 1.0
    # Scalars take a plain-float path, arrays a numpy one: the same bisection.
    one_by_one = [mixture_lower_bound(int(k), 200, 0.05) for k in ks]
    np.testing.assert_allclose(one_by_one, lower, rtol=0, atol=1e-15)


def first_crossing_probability(rejected, p: float, horizon: int) -> float:
    """Exactly P(rejected(S_n, n) for some n <= horizon) for S_n ~ Binomial(n, p), looking after
    every draw: dynamic programming over the paths not yet rejected."""
    alive, crossed = np.array([1.0]), 0.0
    for n in range(1, horizon + 1):
        step = np.zeros(n + 1)
        step[:-1] += alive * (1 - p)
        step[1:] += alive * p
        hit = rejected(np.arange(n + 1), n)
        crossed += step[hit].sum()
        step[hit] = 0.0
        alive = step
    return crossed


def repeated_clopper_pearson(ks: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The fixed-n one-sided Clopper-Pearson lower bound, vectorised (0 at k = 0)."""
    return np.where(ks > 0, beta.ppf(alpha, np.maximum(ks, 1), n - ks + 1), 0.0)


def lower_exceeds(p: float, alpha: float):
    """rejected(k, n) = L_n > p; only k > p n can qualify (L_n <= k/n), so only those are
    computed."""

    def rejected(ks: np.ndarray, n: int) -> np.ndarray:
        hit = np.zeros(ks.shape, dtype=bool)
        above = ks > p * n
        hit[above] = mixture_lower_bound(ks[above], n, alpha) > p
        return hit

    return rejected


HORIZON = 600


@pytest.mark.parametrize(
    ("p0", "p"), [(0.5, 0.5), (0.9, 0.9), (0.99, 0.99), (0.97, 0.97), (0.9, 0.85)]
)
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_mixture_test_is_valid_under_continuous_monitoring(p0: float, p: float, alpha: float):
    """Ville, exactly: looked at after every one of HORIZON draws, the test of H0: p <= p0 rejects
    with probability at most alpha under any p <= p0, and its mirror under any p >= 1 - p0.
    (At p = p0 the rates are 0.72-0.97 alpha: near p0 = 1 the prior's atom at q = 1 spends
    almost all of alpha on the unanimous paths, which is what makes it fast.)"""
    greater = first_crossing_probability(lambda k, n: mixture_rejects(k, n, p0, alpha), p, HORIZON)
    less = first_crossing_probability(
        lambda k, n: mixture_rejects(k, n, 1 - p0, alpha, "less"), 1 - p, HORIZON
    )
    assert greater <= alpha and less <= alpha
    assert less == pytest.approx(greater, rel=1e-9)


@pytest.mark.parametrize("p0", [0.5, 0.9])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_negative_control_repeated_clopper_pearson_test(p0: float, alpha: float) -> None:
    """The fixed-n Clopper-Pearson test recomputed after every draw at the full alpha rejects a
    true H0: p <= p0 with probability well above alpha (3-6 alpha here); the mixture test of the
    same H0 above stays below alpha."""
    naive = first_crossing_probability(
        lambda k, n: repeated_clopper_pearson(k, n, alpha) > p0, p0, HORIZON
    )
    assert naive > 1.5 * alpha


def test_mixture_test_has_power() -> None:
    # Unanimous votes against p0 = 0.9 reject once 0.9^-n / (mass term) passes 1/alpha; a true p
    # of 0.97 is detected within the horizon almost surely.
    detect = first_crossing_probability(lambda k, n: mixture_rejects(k, n, 0.9, 0.01), 0.97, 400)
    assert detect > 0.95
    n_first = next(n for n in range(1, 200) if mixture_rejects(n, n, 0.9, 0.01))
    assert n_first <= math.ceil(math.log(2 / 0.01) / math.log(1 / 0.9))


@pytest.mark.parametrize("p", [0.3, 0.9, 0.995])
def test_lower_confidence_sequence_covers_under_continuous_monitoring(p: float) -> None:
    """P(L_n > p for some n <= HORIZON) <= alpha, exactly; near p = 1 the unanimous counts (the
    prior's atom) are where it could fail."""
    alpha = 0.1
    assert first_crossing_probability(lower_exceeds(p, alpha), p, HORIZON) <= alpha


@pytest.mark.parametrize("p", [0.02, 0.3])
def test_upper_confidence_sequence_covers_under_continuous_monitoring(p: float) -> None:
    alpha = 0.1

    def rejected(ks: np.ndarray, n: int) -> np.ndarray:
        hit = np.zeros(ks.shape, dtype=bool)
        below = ks < p * n
        hit[below] = mixture_upper_bound(ks[below], n, alpha) < p
        return hit

    assert first_crossing_probability(rejected, p, HORIZON) <= alpha


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_negative_control_repeated_clopper_pearson_bound(p: float) -> None:
    alpha = 0.1
    naive = first_crossing_probability(
        lambda k, n: repeated_clopper_pearson(k, n, alpha) > p, p, HORIZON
    )
    assert naive > 1.5 * alpha


def test_mixture_functions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"k must lie in \[0, n\]"):
        mixture_lower_bound(11, 10, 0.05)
    with pytest.raises(ValueError, match=r"n must be >= 0"):
        mixture_log_e_value(0, -1, 0.5)
    with pytest.raises(ValueError, match=r"k must be an integer"):
        mixture_lower_bound(2.0, 10, 0.05)
    with pytest.raises(ValueError, match=r"n must be an integer"):
        mixture_upper_bound(2, True, 0.05)
    for p0 in [0.0, 1.0, math.nan, "0.5", None]:
        with pytest.raises(ValueError, match=r"p0 must"):
            mixture_log_e_value(3, 10, p0)
    for alpha in [0.0, 1.0, -0.1, math.nan, None]:
        with pytest.raises(ValueError, match=r"alpha must"):
            mixture_rejects(3, 10, 0.5, alpha)
        with pytest.raises(ValueError, match=r"alpha must"):
            mixture_lower_bound(3, 10, alpha)
    with pytest.raises(ValueError, match=r"alternative must be 'greater' or 'less'"):
        mixture_log_e_value(3, 10, 0.5, "two-sided")
    with pytest.raises(ValueError, match=r"prior must be a MixturePrior"):
        mixture_lower_bound(3, 10, 0.05, prior=(0.5, 0.5))
    for kwargs in [{"a": 0.0}, {"b": math.inf}, {"atom": 1.0}, {"atom": -0.1}]:
        with pytest.raises(ValueError, match=r"MixturePrior\.(a|b|atom) must"):
            MixturePrior(**kwargs)
