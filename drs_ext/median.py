"""Median smoothing of a scalar function (Chiang, Curry, Abdelkader, Kumar, Dickerson, Goldstein,
"Detection as Regression: Certified Object Detection by Median Smoothing", NeurIPS 2020).

h maps an image to a real number. Smoothed with noise ε ~ N(0, s² I), its p-quantile at x is
G_p(x) = inf{t : P(h(x + ε) <= t) >= p}. For every x' with ‖x' − x‖ <= D the median of h at x'
lies between two quantiles at x:

    G_p̲(x) <= G_½(x') <= G_p̄(x),   p̲ = Φ(−D/s),  p̄ = Φ(D/s),

because t ↦ Φ⁻¹(P(h(x + ε) <= t)) is (1/s)-Lipschitz in x (the argument of Cohen et al.'s
radius, applied to the events {h <= t}). Both quantiles are bounded by order statistics of N
i.i.d. samples y₁..y_N of h(x + ε), sorted y₍1₎ <= ... <= y₍N₎ (1-based):

    k_u = min{k : BinomCDF(k − 1; N, p̄) >= 1 − α_u}   P(y₍k_u₎ < G_p̄(x)) <= α_u
    k_l = max{k : BinomCDF(k − 1; N, p̲) <= α_l}       P(y₍k_l₎ > G_p̲(x)) <= α_l

(y₍k₎ < G_p means at least k samples fall below G_p, each with probability <= p; y₍k₎ > G_p
means at most k − 1 samples fall at or below it, each with probability >= p.) So with
probability at least 1 − α_l − α_u (a union bound) the median of h stays in [y₍k_l₎, y₍k_u₎]
on the whole D-ball. In a 0-based array y₍k₎ is sorted[k − 1]; indexing sorted[k] with the
1-based k moves the lower end up one rank and loses the guarantee (python_tests/test_median.py
shows its coverage falling below 1 − α).

Noise. The samples are drawn by drs_ext.noisy_views with partition "none", keyed by the caller's
(seed, stream), from sample indices of their own: [2^55, 2^55 + 2^48) for certificates,
[2^55 + 2^48, 2^55 + 2^49) for predictions, and [2^55 + 2^49, 2^55 + 2^49 + 2^48) for the
selection draws of a sequential certificate, which pick what to test and never enter a bound
(smoothing/sigma_selector_sequential.py). Smoothed classifiers draw below 2^49 + 2^48
(drs_ext/smoothing/sampling.py), so a median-smoothed function and a classifier certified with
the same seed never share a noise value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom, norm

from .ops import noisy_views
from .smoothing.sampling import MAX_DRAWS, check_positive_int, eval_mode

__all__ = [
    "MEDIAN_CERTIFY_OFFSET",
    "MEDIAN_PREDICT_OFFSET",
    "MEDIAN_SELECTION_OFFSET",
    "MedianBounds",
    "median_interval_indices",
    "min_samples",
    "order_statistic_bounds",
    "sample_outputs",
    "smooth_median",
]

MEDIAN_CERTIFY_OFFSET = 1 << 55
MEDIAN_PREDICT_OFFSET = (1 << 55) + (1 << 48)
MEDIAN_SELECTION_OFFSET = (1 << 55) + (1 << 49)

ScalarFunction = Callable[[torch.Tensor], torch.Tensor]


def _check_positive(name: str, value: float) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_alphas(alpha_lower: float, alpha_upper: float) -> tuple[float, float]:
    for name, a in (("alpha_lower", alpha_lower), ("alpha_upper", alpha_upper)):
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a < 1.0:
            raise ValueError(f"{name} must be in the open interval (0, 1), got {a!r}")
    if alpha_lower + alpha_upper >= 1.0:
        raise ValueError(
            f"alpha_lower + alpha_upper must be < 1, got {alpha_lower} + {alpha_upper}"
        )
    return float(alpha_lower), float(alpha_upper)


def _largest(n: int, pred: Callable[[int], bool]) -> int:
    """The largest j in [0, n − 1] with pred(j), pred true on a prefix; −1 when pred(0) fails."""
    lo, hi = -1, n - 1  # pred(lo) holds by convention; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _indices(n: int, p_low: float, p_high: float, alpha_lower: float, alpha_upper: float):
    """1-based (k_l, k_u), or None when N = n is too small for either end."""
    # k_l − 1 = the largest j with BinomCDF(j; n, p̲) <= α_l.
    j_low = _largest(n, lambda j: binom.cdf(j, n, p_low) <= alpha_lower)
    # k_u − 1 = the smallest j with BinomCDF(j; n, p̄) >= 1 − α_u, i.e. P(Bin >= j + 1) <= α_u
    # (the survival function avoids the cancellation in 1 − α_u).
    j_high = _largest(n, lambda j: binom.sf(j, n, p_high) > alpha_upper) + 1
    if j_low < 0 or j_high > n - 1:
        return None
    return j_low + 1, j_high + 1


def _quantile_levels(budget: float, noise: float) -> tuple[float, float]:
    ratio = budget / noise
    p_low, p_high = float(norm.sf(ratio)), float(norm.cdf(ratio))  # p̲ = Φ(−D/s), p̄ = Φ(D/s)
    if p_high >= 1.0:  # Φ(D/s) rounds to 1 in float64 (D/s > 8.2): no sample size reaches it
        raise ValueError(
            f"budget D = {budget:g} is too large for noise s = {noise:g}: with D/s = {ratio:g} "
            "> 8.2 no number of samples bounds the median on the D-ball"
        )
    return p_low, p_high


def _min_n(p_low: float, p_high: float, alpha_lower: float, alpha_upper: float) -> int:
    # Both ends exist iff p̄^N <= min(α_l, α_u) (k_l = 1 needs (1 − p̲)^N <= α_l, k_u = N needs
    # p̄^N <= α_u); start from that closed form and settle it with the same test as _indices.
    guess = max(1, math.ceil(math.log(min(alpha_lower, alpha_upper)) / math.log(p_high)))
    while guess > 1 and _indices(guess - 1, p_low, p_high, alpha_lower, alpha_upper):
        guess -= 1
    while not _indices(guess, p_low, p_high, alpha_lower, alpha_upper):
        guess += 1
    return guess


def min_samples(budget: float, noise: float, alpha_lower: float, alpha_upper: float) -> int:
    """The smallest N for which order_statistic_bounds(N, budget, noise, ...) exists."""
    budget = _check_positive("budget D", budget)
    noise = _check_positive("noise s", noise)
    alpha_lower, alpha_upper = _check_alphas(alpha_lower, alpha_upper)
    return _min_n(*_quantile_levels(budget, noise), alpha_lower, alpha_upper)


def order_statistic_bounds(
    n: int, budget: float, noise: float, alpha_lower: float, alpha_upper: float
) -> tuple[int, int]:
    """1-based ranks (k_l, k_u): with N = n samples of h at noise s, [y₍k_l₎, y₍k_u₎] contains
    the median of h at every point of the ball of radius D = budget, with probability at least
    1 − alpha_lower − alpha_upper. Raises ValueError, naming the smallest N that works, when n
    is too small."""
    n = check_positive_int("n (samples of h)", n, MAX_DRAWS)
    budget = _check_positive("budget D", budget)
    noise = _check_positive("noise s", noise)
    alpha_lower, alpha_upper = _check_alphas(alpha_lower, alpha_upper)
    p_low, p_high = _quantile_levels(budget, noise)
    ranks = _indices(n, p_low, p_high, alpha_lower, alpha_upper)
    if ranks is None:
        need = _min_n(p_low, p_high, alpha_lower, alpha_upper)
        raise ValueError(
            f"n = {n} samples of h are too few for budget D = {budget:g} at noise s = "
            f"{noise:g} with alpha_lower = {alpha_lower:g}, alpha_upper = {alpha_upper:g}: "
            f"the smallest n that works is {need}"
        )
    return ranks


def median_interval_indices(n: int, alpha_lower: float, alpha_upper: float) -> tuple[int, int]:
    """1-based ranks (k_l, k_u) of a confidence interval for the median of h at x itself (the
    budget D = 0 case, p̲ = p̄ = ½): P(median < y₍k_l₎) <= α_l, P(median > y₍k_u₎) <= α_u."""
    n = check_positive_int("n (samples of h)", n, MAX_DRAWS)
    alpha_lower, alpha_upper = _check_alphas(alpha_lower, alpha_upper)
    ranks = _indices(n, 0.5, 0.5, alpha_lower, alpha_upper)
    if ranks is None:
        need = _min_n(0.5, 0.5, alpha_lower, alpha_upper)
        raise ValueError(
            f"n = {n} samples of h are too few for a confidence interval of the median with "
            f"alpha_lower = {alpha_lower:g}, alpha_upper = {alpha_upper:g}: the smallest n "
            f"that works is {need}"
        )
    return ranks


@dataclass(frozen=True)
class MedianBounds:
    """lower = y₍k_lower₎, upper = y₍k_upper₎ (1-based ranks of n samples); median is the sample
    median, a point estimate with no guarantee (a diagnostic)."""

    lower: float
    upper: float
    median: float
    k_lower: int
    k_upper: int
    n: int


def sample_outputs(
    h: ScalarFunction,
    x: torch.Tensor,
    n: int,
    noise: float,
    *,
    batch_size: int,
    seed: int = 0,
    stream: int = 0,
    offset: int = MEDIAN_CERTIFY_OFFSET,
    name: str = "h",
) -> np.ndarray:
    """(n,) float64 values h(x + s·z_j), z_j the noise of sample index offset + j of (seed,
    stream). h takes a batch (B, C, H, W) and returns (B,) values; an nn.Module runs in eval
    mode (restored afterwards), so the samples are i.i.d. A non-finite value raises a
    ValueError that calls the function `name`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype != torch.float32:
        raise ValueError(f"x must be one float32 image (C, H, W), got {_describe(x)}")
    # Checked on the host: on CUDA the op would stop at a device-side assert instead.
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite, found NaN or Inf in the input image")
    for label, value, upper in (("seed", seed, 2**63), ("stream", stream, 2**32)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{label} must be an integer, got {value!r}")
        if not 0 <= value < upper:
            raise ValueError(f"{label} must be in [0, {upper}), got {value}")
    n = check_positive_int("n (samples of h)", n, MAX_DRAWS)
    noise = _check_positive("noise s", noise)
    batch_size = check_positive_int("batch_size", batch_size)
    stream_ids = torch.full((1,), stream, dtype=torch.int64, device=x.device)
    chunks = []
    mode = eval_mode(h) if isinstance(h, torch.nn.Module) else contextlib.nullcontext()
    with torch.inference_mode(), mode:
        for start in range(0, n, batch_size):
            num = min(batch_size, n - start)
            views = noisy_views(
                x[None],
                noise,
                num=num,
                seed=seed,
                offset=offset + start,
                stream=stream_ids,
                partition="none",
            )[0, 0]
            values = h(views)
            if values.shape != (num,):
                raise ValueError(
                    f"{name} must return one value per view, shape ({num},), got "
                    f"{tuple(values.shape)}"
                )
            chunks.append(values.detach().double().cpu())
    out = torch.cat(chunks).numpy()
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise ValueError(f"{name} returned {bad} non-finite values (NaN or Inf) out of {n}")
    return out


def bounds_from_samples(samples: np.ndarray, k_lower: int, k_upper: int) -> MedianBounds:
    """The order statistics y₍k_lower₎ = sorted[k_lower − 1], y₍k_upper₎ = sorted[k_upper − 1]."""
    y = np.sort(np.asarray(samples, dtype=np.float64))
    return MedianBounds(
        lower=float(y[k_lower - 1]),
        upper=float(y[k_upper - 1]),
        median=float(np.median(y)),
        k_lower=k_lower,
        k_upper=k_upper,
        n=y.size,
    )


def smooth_median(
    h: ScalarFunction,
    x: torch.Tensor,
    n: int,
    noise: float,
    budget: float,
    alpha_lower: float,
    alpha_upper: float,
    *,
    batch_size: int,
    seed: int = 0,
    stream: int = 0,
    offset: int = MEDIAN_CERTIFY_OFFSET,
) -> MedianBounds:
    """Bounds [lower, upper] on the median of h(x' + ε), ε ~ N(0, s² I), that hold for every x'
    with ‖x' − x‖ <= budget, with probability at least 1 − alpha_lower − alpha_upper. The ranks
    are checked before any sample is drawn."""
    k_lower, k_upper = order_statistic_bounds(n, budget, noise, alpha_lower, alpha_upper)
    samples = sample_outputs(
        h, x, n, noise, batch_size=batch_size, seed=seed, stream=stream, offset=offset
    )
    return bounds_from_samples(samples, k_lower, k_upper)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
