"""drs_ext.stats against scipy oracles, closed forms and exact coverage enumeration."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import beta, binom, binomtest, multinomial

from drs_ext.stats import binom_test_p_value, lower_confidence_bound, upper_confidence_bound

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
