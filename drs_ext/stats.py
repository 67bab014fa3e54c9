"""Binomial confidence bounds and tests used by PREDICT and CERTIFY (docs/design.md §2.4)."""

from __future__ import annotations

import numbers

from scipy.stats import beta, binom

__all__ = ["binom_test_p_value", "lower_confidence_bound", "upper_confidence_bound"]


def _is_int(value: object) -> bool:
    # numpy integers register as numbers.Integral; bool does too but is never a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_counts(k: int, n: int) -> tuple[int, int]:
    """Validate a success count k out of n trials; return them as Python ints."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not _is_int(k) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, n] = [0, {int(n)}], got {k!r}")
    return int(k), int(n)


def _check_alpha(alpha: float) -> float:
    # NaN fails both comparisons, so it is rejected here too.
    if not _is_real(alpha) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a real number in the open interval (0, 1), got {alpha!r}")
    return float(alpha)


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound on p from k successes in n trials.

    P(bound > p) <= alpha for every p. Equals Beta⁻¹(alpha; k, n - k + 1), 0 for k = 0.
    """
    k, n = _check_counts(k, n)
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.0
    if k == n:
        # Beta(n, 1) has CDF x**n; the closed form avoids ppf round-off at the most common
        # count of a confident certificate.
        return alpha ** (1.0 / n)
    return float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound on p from k successes in n trials.

    P(bound < p) <= alpha for every p. Equals Beta⁻¹(1 - alpha; k + 1, n - k), 1 for k = n.
    """
    k, n = _check_counts(k, n)
    alpha = _check_alpha(alpha)
    if k == n:
        return 1.0
    if k == 0:
        # Beta(1, n) has CDF 1 - (1 - x)**n.
        return 1.0 - alpha ** (1.0 / n)
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def binom_test_p_value(k: int, n: int, p: float = 0.5) -> float:
    """One-sided p-value P(Binomial(n, p) >= k).

    PREDICT's top-two test calls this with k = n_A, n = n_A + n_B (the two largest vote counts)
    and p = 1/2, and abstains unless the p-value is <= alpha. Hung & Fithian (2019, "Rank
    verification for exponential families", Ann. Statist.) prove that this one-sided test,
    conditional on n_A + n_B, returns a class other than the true top class with probability
    at most alpha. Cohen et al. (2019) call scipy's two-sided binom_test, which for n_A >= n_B
    is min(1, 2 x this p-value): valid too, only more conservative.
    """
    k, n = _check_counts(k, n)
    if not _is_real(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a real number in [0, 1], got {p!r}")
    # sf(k - 1) = P(X > k - 1) = P(X >= k); k = 0 gives sf(-1) = 1.
    return float(binom.sf(k - 1, n, float(p)))
