"""Median smoothing (drs_ext/median.py): the order-statistic ranks against their binomial
definitions, their coverage against the closed form and by simulation, the negative control of
the 0-based off-by-one, the noise counters against drs_ext.reference, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import binomial_ceiling
from scipy.stats import binom, norm

from drs_ext import reference
from drs_ext.median import (
    MEDIAN_CERTIFY_OFFSET,
    MEDIAN_PREDICT_OFFSET,
    bounds_from_samples,
    median_interval_indices,
    min_samples,
    order_statistic_bounds,
    sample_outputs,
    smooth_median,
)
from drs_ext.smoothing.sampling import MAX_DRAWS, PREDICT_OFFSET

# (N, D, s, α_l, α_u): the paper's N_h = 100 at D = s = 0.25, an uneven split, a small N.
CONFIGS = [
    (100, 0.25, 0.25, 0.025, 0.025),
    (50, 0.25, 0.25, 0.09, 0.01),
    (20, 0.1, 0.5, 0.1, 0.1),
]
TRIALS = 20_000


def ranks_by_definition(n, budget, noise, alpha_l, alpha_u):
    """k_u = min{k : BinomCDF(k−1; N, p̄) >= 1 − α_u}, k_l = max{k : BinomCDF(k−1; N, p̲) <= α_l}
    over k = 1..N, by exhaustive search (None when a set is empty)."""
    p_low, p_high = norm.cdf(-budget / noise), norm.cdf(budget / noise)
    k = np.arange(1, n + 1)
    upper = k[binom.cdf(k - 1, n, p_high) >= 1 - alpha_u]
    lower = k[binom.cdf(k - 1, n, p_low) <= alpha_l]
    if upper.size == 0 or lower.size == 0:
        return None
    return int(lower.max()), int(upper.min())


def closed_form_coverage(n, r, u, p_low, p_high):
    """P(y₍r₎ <= G_p̲ and y₍u₎ >= G_p̄) for i.i.d. continuous samples: with i samples at or
    below G_p̲ and j between, the event is i >= r and i + j <= u − 1 (a trinomial sum)."""
    i = np.arange(r, u)
    inner = (p_high - p_low) / (1 - p_low)
    return float(np.sum(binom.pmf(i, n, p_low) * binom.cdf(u - 1 - i, n - i, inner)))


def simulated_coverage(n, r, u, p_low, p_high, seed):
    """The same event over TRIALS sets of N standard normals (G_p = Φ⁻¹(p) for them; order
    statistics are distribution-free, so any continuous law gives the same coverage)."""
    y = np.sort(np.random.default_rng(seed).standard_normal((TRIALS, n)), axis=1)
    return float(np.mean((y[:, r - 1] <= norm.ppf(p_low)) & (y[:, u - 1] >= norm.ppf(p_high))))


def test_ranks_of_the_worked_example():
    # docs/methods.md §2: N_h = 1000, D = s = 0.25, α_u = α_l = 0.0005.
    assert order_statistic_bounds(1000, 0.25, 0.25, 0.0005, 0.0005) == (122, 879)


@pytest.mark.parametrize("n", [10, 37, 100, 1000])
@pytest.mark.parametrize(
    ("budget", "noise", "alpha_l", "alpha_u"),
    [(0.25, 0.25, 0.01, 0.01), (0.1, 0.5, 0.09, 0.01), (0.5, 0.25, 0.001, 0.004)],
)
def test_ranks_match_their_definition(n, budget, noise, alpha_l, alpha_u):
    want = ranks_by_definition(n, budget, noise, alpha_l, alpha_u)
    if want is None:
        with pytest.raises(ValueError, match="too few"):
            order_statistic_bounds(n, budget, noise, alpha_l, alpha_u)
    else:
        assert order_statistic_bounds(n, budget, noise, alpha_l, alpha_u) == want


@pytest.mark.parametrize(
    ("budget", "noise", "alpha"), [(0.25, 0.25, 0.001), (0.5, 0.25, 0.05), (0.05, 1.0, 0.1)]
)
def test_min_samples_is_the_smallest_that_works(budget, noise, alpha):
    need = min_samples(budget, noise, alpha / 2, alpha / 2)
    assert ranks_by_definition(need, budget, noise, alpha / 2, alpha / 2) is not None
    assert ranks_by_definition(need - 1, budget, noise, alpha / 2, alpha / 2) is None
    order_statistic_bounds(need, budget, noise, alpha / 2, alpha / 2)
    with pytest.raises(ValueError, match=f"the smallest n that works is {need}"):
        order_statistic_bounds(need - 1, budget, noise, alpha / 2, alpha / 2)


def test_median_interval_needs_log2_of_one_over_alpha_samples():
    # D = 0: both ends need (1/2)^N <= α_side, N >= log2(1/α_side).
    assert median_interval_indices(12, 2**-12, 2**-12) == (1, 12)
    with pytest.raises(ValueError, match="the smallest n that works is 12"):
        median_interval_indices(11, 2**-12, 2**-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"N{c[0]}-D{c[1]}-s{c[2]}")
def test_coverage_is_at_least_one_minus_alpha(config):
    n, budget, noise, alpha_l, alpha_u = config
    k_l, k_u = order_statistic_bounds(n, budget, noise, alpha_l, alpha_u)
    p_low, p_high = norm.cdf(-budget / noise), norm.cdf(budget / noise)
    exact = closed_form_coverage(n, k_l, k_u, p_low, p_high)
    assert exact >= 1 - alpha_l - alpha_u
    sim = simulated_coverage(n, k_l, k_u, p_low, p_high, seed=n)
    se = math.sqrt(exact * (1 - exact) / TRIALS)
    assert abs(sim - exact) <= 4 * se, (sim, exact)


def test_negative_control_zero_based_off_by_one_loses_coverage():
    """sorted[k] with the 1-based k (the public reference code's indexing) is y₍k+1₎: the lower
    end moves up one rank. At N = 50, D = s = 0.25, α_l = 0.09, α_u = 0.01 its coverage is
    0.824 (closed form) against the 0.906 of the right ranks and the 0.9 promised."""
    n, budget, noise, alpha_l, alpha_u = CONFIGS[1]
    k_l, k_u = order_statistic_bounds(n, budget, noise, alpha_l, alpha_u)
    p_low, p_high = norm.cdf(-budget / noise), norm.cdf(budget / noise)
    exact = closed_form_coverage(n, k_l + 1, min(k_u + 1, n), p_low, p_high)
    assert exact < 1 - alpha_l - alpha_u - 0.05
    sim = simulated_coverage(n, k_l + 1, min(k_u + 1, n), p_low, p_high, seed=7)
    floor = 1 - alpha_l - alpha_u - 3 * math.sqrt((alpha_l + alpha_u) * 0.9 / TRIALS)
    assert sim < floor, sim


def test_bounds_from_samples_takes_sorted_k_minus_one():
    b = bounds_from_samples(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), 2, 4)
    assert (b.lower, b.upper, b.median, b.n) == (2.0, 4.0, 3.0, 5)


class Linear(torch.nn.Module):
    """h(v) = a + w·v: under N(0, s² I) noise h(x + ε) ~ N(a + w·x, s²‖w‖²), and its median at
    x' is a + w·x', so over the D-ball the medians fill [a + w·x ± D‖w‖]."""

    def __init__(self, w: torch.Tensor, a: float) -> None:
        super().__init__()
        self.w, self.a = w, a

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.a + (v.double() * self.w.double()).flatten(1).sum(dim=1)


def test_samples_are_h_of_the_documented_noise():
    x = torch.rand(1, 3, 4)
    h = Linear(torch.randn(1, 3, 4), 0.1)
    got = sample_outputs(
        h, x, 10, 0.3, batch_size=4, seed=5, stream=9, offset=MEDIAN_PREDICT_OFFSET
    )
    z = reference.standard_normals(5, 9, 0, torch.arange(10) + MEDIAN_PREDICT_OFFSET, 12)
    want = h((x.double().flatten() + 0.3 * z).view(10, 1, 3, 4).float())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_sample_ranges_are_apart_from_the_classifiers():
    assert PREDICT_OFFSET + MAX_DRAWS <= MEDIAN_CERTIFY_OFFSET
    assert MEDIAN_CERTIFY_OFFSET + MAX_DRAWS <= MEDIAN_PREDICT_OFFSET
    assert MEDIAN_PREDICT_OFFSET + MAX_DRAWS <= 2**56


def test_smooth_median_covers_a_linear_function_through_the_noise_op():
    """Through noisy_views: the claimed interval contains every median on the D-ball (here
    [a + w·x − D‖w‖, a + w·x + D‖w‖]) in at least 1 − α of the streams."""
    x = torch.rand(1, 2, 2)
    w = torch.tensor([[[1.0, -0.5], [0.25, 2.0]]])
    h = Linear(w, 0.2)
    center = 0.2 + float((w * x).sum())
    reach = 0.25 * float(w.norm())
    reps, alpha = 400, 0.1
    hits = 0
    for stream in range(reps):
        b = smooth_median(
            h, x, 40, 0.25, 0.25, alpha / 2, alpha / 2, batch_size=40, seed=3, stream=stream
        )
        hits += b.lower <= center - reach and b.upper >= center + reach
    assert 1 - hits / reps <= binomial_ceiling(alpha, reps)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(noise=0.0), "noise s must be a finite number > 0"),
        (dict(noise=-1.0), "noise s must be a finite number > 0"),
        (dict(budget=0.0), "budget D must be a finite number > 0"),
        (dict(budget=-0.1), "budget D must be a finite number > 0"),
        (dict(budget=math.nan), "budget D must be a finite number > 0"),
        (dict(alpha_lower=0.0), "alpha_lower must be in the open interval"),
        (dict(alpha_upper=1.0), "alpha_upper must be in the open interval"),
        (dict(alpha_lower=0.6, alpha_upper=0.5), "must be < 1"),
        (dict(n=0), "n \\(samples of h\\) must be an integer >= 1"),
        (dict(n=10), "the smallest n that works is 44"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    args = dict(n=100, budget=0.25, noise=0.25, alpha_lower=0.0005, alpha_upper=0.0005)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        order_statistic_bounds(**args)


def test_non_finite_outputs_and_bad_shapes_are_errors():
    x = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="returned 3 non-finite values"):
        sample_outputs(lambda v: torch.full((v.shape[0],), math.nan), x, 3, 0.5, batch_size=8)
    with pytest.raises(ValueError, match="one value per view"):
        sample_outputs(lambda v: v.flatten(1), x, 3, 0.5, batch_size=8)
    with pytest.raises(ValueError, match="one float32 image"):
        sample_outputs(lambda v: v.sum((1, 2, 3)), x[None], 3, 0.5, batch_size=8)


def test_a_budget_beyond_float_precision_is_refused_by_name() -> None:
    # Φ(9) rounds to 1 in float64: no sample size bounds the median on that ball.
    for call in (
        lambda: order_statistic_bounds(1000, 9.0, 1.0, 0.001, 0.001),
        lambda: min_samples(9.0, 1.0, 0.001, 0.001),
    ):
        with pytest.raises(ValueError, match="budget D = 9 is too large for noise s = 1"):
            call()
