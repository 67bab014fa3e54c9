"""Binomial confidence bounds and tests used by PREDICT and CERTIFY (docs/design.md §2.4), and
their anytime-valid counterparts for sequential certification (docs/methods.md §3).

Fixed n: Clopper–Pearson bounds and the binomial test hold for a sample size chosen in advance.
Recomputed after every look of a growing sample at the same alpha they no longer hold: the
chance that one of the looks errs grows with the number of looks.

Anytime-valid: the Beta-mixture likelihood ratio (Robbins, "Statistical methods related to the
law of the iterated logarithm", Ann. Math. Statist. 1970). For Bernoulli(p) draws with k
successes in n, and a prior π on the alternative q,

    E_n(p0) = ∫ (q/p0)^k ((1-q)/(1-p0))^(n-k) dπ(q)

is, under p = p0, a nonnegative martingale in n with E_0 = 1 (each ratio is one, and a mixture of
martingales is one). Ville's inequality, P(sup_n E_n >= 1/alpha) <= alpha, then bounds the chance
that E ever reaches 1/alpha, so a test or a confidence sequence built on it is valid at whatever
time the caller stops, by whatever rule, and may be looked at after every draw.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.special import betainc, betaln
from scipy.stats import beta, binom

__all__ = [
    "DEFAULT_PRIOR",
    "MixturePrior",
    "binom_test_p_value",
    "lower_confidence_bound",
    "mixture_log_e_value",
    "mixture_lower_bound",
    "mixture_rejects",
    "mixture_upper_bound",
    "upper_confidence_bound",
]


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


# ----------------------------------------------------------------------------------------------
# Anytime-valid: Beta-mixture likelihood ratios (the module docstring gives the argument).


@dataclass(frozen=True)
class MixturePrior:
    """The prior π over the alternative q of a mixture likelihood ratio: weight 1 - atom on
    Beta(a, b), and weight `atom` on the far end of the side it gathers evidence for: q = 1 for
    evidence that p is large (alternative "greater", lower bounds), q = 0 for evidence that p is
    small ("less", upper bounds).

    Why an atom: the votes of a confidently classified image are mostly unanimous. With k = n
    the atom's term is p^-n, so the lower bound pays only log(1/atom) over Clopper–Pearson's
    (1 - L = (log(1/alpha) + log 2)/n at the default 1/2, against log(1/alpha)/n), where a Beta
    law alone pays about (1/2) log n. Any fixed prior keeps the martingale property; the prior
    only changes how fast the bounds tighten.
    """

    a: float = 0.5
    b: float = 0.5
    atom: float = 0.5

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MixturePrior.{name} must be a finite real > 0, got {value!r}")
        if not _is_real(self.atom) or not 0.0 <= self.atom < 1.0:
            raise ValueError(f"MixturePrior.atom must be a real in [0, 1), got {self.atom!r}")

    def mirrored(self) -> MixturePrior:
        """The same prior as a law of 1 - q (Beta(b, a)): the "less" side of k successes is the
        "greater" side of the n - k failures under it."""
        return MixturePrior(self.b, self.a, self.atom)


DEFAULT_PRIOR = MixturePrior()


def _count_arrays(k: object, n: object) -> tuple[np.ndarray, np.ndarray]:
    """k, n as broadcast int64 arrays with 0 <= k <= n (n = 0 is time zero of a sequence)."""
    arrays = {}
    for name, value in (("n", n), ("k", k)):
        arr = np.asarray(value)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer or an array of integers, got {value!r}")
        arrays[name] = arr.astype(np.int64)
    if np.any(arrays["n"] < 0):
        raise ValueError(f"n must be >= 0, got {n!r}")
    k_arr, n_arr = np.broadcast_arrays(arrays["k"], arrays["n"])
    if np.any((k_arr < 0) | (k_arr > n_arr)):
        raise ValueError(f"k must lie in [0, n], got k = {k!r}, n = {n!r}")
    return k_arr, n_arr


def _open_unit_array(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a real number in (0, 1) or an array, got {value!r}")
    arr = arr.astype(np.float64)
    # NaN fails both comparisons, so it is rejected here too.
    if not np.all((arr > 0.0) & (arr < 1.0)):
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return arr


def _out(values: np.ndarray) -> float | np.ndarray:
    return float(values) if np.ndim(values) == 0 else values


def _check_alternative(alternative: str) -> None:
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")


def _check_prior(prior: MixturePrior) -> None:
    if not isinstance(prior, MixturePrior):
        raise ValueError(f"prior must be a MixturePrior, got {prior!r}")


def _log_e_greater(k: np.ndarray, n: np.ndarray, p0: np.ndarray, prior: MixturePrior):
    """log E_n(p0) for H0: p <= p0, the prior restricted to q >= p0 (validated arrays)."""
    f = n - k
    a, b, atom = prior.a, prior.b, prior.atom
    with np.errstate(divide="ignore"):
        # ∫_{q >= p0} q^k (1-q)^f dBeta(a, b) = B(a+k, b+f)/B(a, b) · P(Beta(a+k, b+f) >= p0),
        # and P(Beta(x, y) >= p0) = I_{1-p0}(y, x).
        log_beta = (
            np.log1p(-atom)
            + betaln(a + k, b + f)
            - betaln(a, b)
            + np.log(betainc(b + f, a + k, 1.0 - p0))
        )
        log_atom = np.where(f == 0, np.log(atom), -np.inf)
        log_mass = np.log(atom + (1.0 - atom) * betainc(b, a, 1.0 - p0))
    log_null = k * np.log(p0) + f * np.log1p(-p0)
    return np.logaddexp(log_atom, log_beta) - log_mass - log_null


def mixture_log_e_value(
    k: object,
    n: object,
    p0: object,
    alternative: str = "greater",
    prior: MixturePrior = DEFAULT_PRIOR,
) -> float | np.ndarray:
    """log E_n, the Beta-mixture likelihood ratio against the composite null H0: p <= p0
    (alternative "greater") or H0: p >= p0 ("less"), after k successes in n draws.

    For "greater" the prior is restricted to q >= p0 and renormalised. Then each term
    (q/p0)^k ((1-q)/(1-p0))^(n-k) is a supermartingale under every p <= p0, not only at p0: a
    draw multiplies it by p q/p0 + (1-p)(1-q)/(1-p0), which grows with p when q >= p0 and is 1
    at p = p0. So E is a nonnegative supermartingale with E_0 = 1 under the whole null, and
    P(E_n >= 1/alpha for some n) <= alpha (Ville). "less" is the mirror image (k -> n - k,
    p0 -> 1 - p0, the prior as a law of 1 - q). Vectorised over k, n, p0 (broadcast). The value
    is -inf where the Beta part underflows float64, which takes p0 above the vote frequency,
    where E <= 1.
    """
    k_arr, n_arr = _count_arrays(k, n)
    p0_arr = _open_unit_array(p0, "p0")
    _check_alternative(alternative)
    _check_prior(prior)
    if alternative == "greater":
        return _out(_log_e_greater(k_arr, n_arr, p0_arr, prior))
    return _out(_log_e_greater(n_arr - k_arr, n_arr, 1.0 - p0_arr, prior.mirrored()))


def mixture_rejects(
    k: object,
    n: object,
    p0: object,
    alpha: object,
    alternative: str = "greater",
    prior: MixturePrior = DEFAULT_PRIOR,
) -> bool | np.ndarray:
    """Whether the mixture test rejects its null at level alpha: E_n(p0) >= 1/alpha.

    Ville's inequality makes it a level-alpha test at every n at once: however many looks and
    whatever the stopping rule, P(it ever rejects | H0) <= alpha. The threshold is log(1/alpha)
    of exactly the alpha passed: a caller splitting a budget passes the share (alpha / 2), not
    the budget.
    """
    log_threshold = -np.log(_open_unit_array(alpha, "alpha"))
    result = np.asarray(mixture_log_e_value(k, n, p0, alternative, prior)) >= log_threshold
    return bool(result) if result.ndim == 0 else result


def _log_marginal(k: np.ndarray, n: np.ndarray, prior: MixturePrior) -> np.ndarray:
    """log ∫ q^k (1-q)^(n-k) dπ(q) over the whole prior (atom at q = 1, Beta(a, b))."""
    f = n - k
    with np.errstate(divide="ignore"):
        log_atom = np.where(f == 0, np.log(prior.atom), -np.inf)
        log_beta = np.log1p(-prior.atom) + betaln(prior.a + k, prior.b + f)
    return np.logaddexp(log_atom, log_beta - betaln(prior.a, prior.b))


def _lower_bound(
    k: np.ndarray, n: np.ndarray, log_alpha: np.ndarray, prior: MixturePrior
) -> np.ndarray:
    # p is rejected when M_n(p) >= 1/alpha, i.e. k log p + (n-k) log(1-p) <= c:
    c = _log_marginal(k, n, prior) + log_alpha
    k, n, c = np.broadcast_arrays(k, n, c)
    out = np.zeros(k.shape)
    full = (k == n) & (n > 0)
    # Closed form p^n = e^c; one float step down keeps it at or below the exact root.
    out[full] = np.nextafter(np.exp(c[full] / n[full]), 0.0)
    inner = (k > 0) & (k < n)
    if inner.any():
        out[inner] = _bisect(k[inner], n[inner] - k[inner], c[inner])
    return out


def _bisect(k: np.ndarray, f: np.ndarray, c: np.ndarray) -> np.ndarray:
    """For 0 < k < k + f: the low end of a bracket of the root of k log p + f log(1-p) = c
    below k/(k+f). The bracket [lo, hi] keeps lo rejected (p = 0 always is) and hi = k/n never
    (M_n(k/n) <= 1); the rejected p below k/n are an interval (0, root], since the left side is
    concave with its maximum at k/n. 64 halvings reach adjacent floats."""
    if k.size <= 8:  # a look of a few branches: plain floats are ~50x faster than numpy here
        return np.array([_bisect_one(*args) for args in zip(k, f, c, strict=True)])
    lo, hi = np.zeros(k.shape), k / (k + f)
    with np.errstate(divide="ignore"):
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            rejected = k * np.log(mid) + f * np.log1p(-mid) <= c
            lo, hi = np.where(rejected, mid, lo), np.where(rejected, hi, mid)
    return lo


def _bisect_one(k: int, f: int, c: float) -> float:
    k, f, c = float(k), float(f), float(c)
    lo, hi = 0.0, k / (k + f)
    for _ in range(64):
        mid = 0.5 * (lo + hi)  # >= (k/n) 2^-65 > 0: log(mid) is finite
        if k * math.log(mid) + f * math.log1p(-mid) <= c:
            lo = mid
        else:
            hi = mid
    return lo


def mixture_lower_bound(
    k: object, n: object, alpha: object, prior: MixturePrior = DEFAULT_PRIOR
) -> float | np.ndarray:
    """Anytime-valid lower confidence sequence for p from k successes in n draws:
    P(L_n > p for some n) <= alpha, for every p, whatever rule decides when to stop.

    L_n = inf{p : M_n(p) < 1/alpha} with M_n(p) = ∫ (q/p)^k ((1-q)/(1-p))^(n-k) dπ(q) over the
    whole prior (atom at q = 1 plus Beta(a, b)). Under the true p, M_n(p) is a martingale with
    M_0 = 1, and L_n > p implies M_n(p) >= 1/alpha (every p below L_n is rejected), so Ville's
    inequality gives the bound. The running maximum max_{m <= n} L_m is valid too (its failure
    is the same event). L_n = 0 for k = 0; for k = n, L_n = (alpha ∫ q^n dπ)^(1/n). The value
    returned is the low end of a bisection bracket, so rounding never lifts it above the root.
    Vectorised over k, n, alpha (broadcast).
    """
    k_arr, n_arr = _count_arrays(k, n)
    log_alpha = np.log(_open_unit_array(alpha, "alpha"))
    _check_prior(prior)
    return _out(_lower_bound(k_arr, n_arr, log_alpha, prior))


def mixture_upper_bound(
    k: object, n: object, alpha: object, prior: MixturePrior = DEFAULT_PRIOR
) -> float | np.ndarray:
    """Anytime-valid upper confidence sequence: P(U_n < p for some n) <= alpha. The mirror
    image of mixture_lower_bound (1 minus the lower bound of 1 - p from the n - k failures,
    the prior as a law of 1 - q, so its atom sits at q = 0), rounded up."""
    k_arr, n_arr = _count_arrays(k, n)
    log_alpha = np.log(_open_unit_array(alpha, "alpha"))
    _check_prior(prior)
    lower = _lower_bound(n_arr - k_arr, n_arr, log_alpha, prior.mirrored())
    return _out(np.minimum(np.nextafter(1.0 - lower, 2.0), 1.0))
