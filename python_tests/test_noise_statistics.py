"""Statistics of the kernels' noise on every device: N(0, σ²), independent across everything
that should be.

About 10^6 draws per test; bounds are 6 standard errors for means, variances and tail fractions,
5/sqrt(N) for correlations, and p > 1e-3 for the goodness-of-fit tests (all with fixed seeds, so
the outcome is deterministic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICE_PARAMS, kept_mask, packed, random_images
from scipy import stats

import drs_ext

SIGMA = 0.5
N_IMAGES, NUM, HEIGHT, WIDTH = 4, 1000, 16, 16
MAX_RADIUS = math.sqrt(-2.0 * math.log(2.0**-33))  # Box–Muller radius at the smallest u


@pytest.fixture(scope="module", params=DEVICE_PARAMS)
def standard(request: pytest.FixtureRequest) -> np.ndarray:
    """x = 0, partition "none": (images/streams, samples, H, W) standard normals, float64."""
    x = torch.zeros(N_IMAGES, 1, HEIGHT, WIDTH, device=request.param)
    out = drs_ext.noisy_views(x, SIGMA, num=NUM, seed=2024, partition="none", fill="zeros")
    return (out[:, 0, :, 0].cpu() / SIGMA).double().numpy()  # dividing by 0.5 is exact


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def assert_uncorrelated(a: np.ndarray, b: np.ndarray, what: str) -> None:
    n = a.size
    assert a.shape == b.shape and n >= 10_000
    c = corr(a, b)
    assert abs(c) < 5.0 / math.sqrt(n), f"{what}: corr {c:.4g} with {n} pairs"


def assert_standard_normal_moments(z: np.ndarray, sigma: float = 1.0) -> None:
    n = z.size
    mean, var = float(z.mean()), float(z.var(ddof=1))
    assert abs(mean) < 6 * sigma / math.sqrt(n), mean
    assert abs(var - sigma**2) < 6 * sigma**2 * math.sqrt(2.0 / (n - 1)), var


def test_mean_and_variance(standard: np.ndarray) -> None:
    assert standard.size >= 10**6
    assert_standard_normal_moments(standard)
    # Third and fourth moments: skewness 0 (sd sqrt(6/n)) and kurtosis 3 (sd sqrt(24/n)).
    n = standard.size
    assert abs(stats.skew(standard, axis=None)) < 6 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(standard, axis=None)) < 6 * math.sqrt(24 / n)


def test_kolmogorov_smirnov(standard: np.ndarray) -> None:
    result = stats.kstest(standard.reshape(-1), "norm")
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("threshold", [1.0, 2.0, 3.0, 4.0])
def test_tail_fractions(standard: np.ndarray, threshold: float) -> None:
    n = standard.size
    expected = 2.0 * stats.norm.sf(threshold)
    frac = float((np.abs(standard) > threshold).mean())
    assert abs(frac - expected) < 6 * math.sqrt(expected * (1 - expected) / n), (frac, expected)


def test_values_are_bounded_by_the_box_muller_radius(standard: np.ndarray) -> None:
    """u lies in (0, 1], so |z| <= sqrt(-2 ln 2^-33) ~= 6.77; no NaN or Inf from log(0)."""
    assert np.isfinite(standard).all()
    assert float(np.abs(standard).max()) <= MAX_RADIUS * (1 + 1e-6)


def test_every_pixel_and_sample_is_unbiased(standard: np.ndarray) -> None:
    """Per-pixel means over samples and per-sample means over pixels: chi-square consistent."""
    flat = standard.reshape(N_IMAGES, NUM, -1)
    for axis, count in ((1, NUM), (2, HEIGHT * WIDTH)):
        means = flat.mean(axis=axis)
        statistic = float((means**2).sum() * count)
        dof = means.size
        p = stats.chi2.sf(statistic, dof)
        assert 1e-4 < p < 1 - 1e-4, (axis, statistic, dof)


def test_no_correlation_between_streams(standard: np.ndarray) -> None:
    for a, b in ((0, 1), (1, 2), (0, 3)):
        assert_uncorrelated(standard[a], standard[b], f"streams {a}, {b}")


def test_no_correlation_between_consecutive_samples(standard: np.ndarray) -> None:
    assert_uncorrelated(standard[:, :-1], standard[:, 1:], "samples s, s+1")


def test_no_correlation_between_neighbouring_pixels(standard: np.ndarray) -> None:
    assert_uncorrelated(standard[..., :, :-1], standard[..., :, 1:], "horizontal neighbours")
    assert_uncorrelated(standard[..., :-1, :], standard[..., 1:, :], "vertical neighbours")
    flat = standard.reshape(N_IMAGES, NUM, -1)
    assert_uncorrelated(flat[..., :-4], flat[..., 4:], "adjacent Philox groups, same lane")


def test_no_dependence_between_the_lanes_of_a_philox_group(standard: np.ndarray) -> None:
    lanes = standard.reshape(N_IMAGES, NUM, -1, 4)  # elements 4g .. 4g+3
    for a in range(4):
        for b in range(a + 1, 4):
            assert_uncorrelated(lanes[..., a], lanes[..., b], f"lanes {a}, {b}")
    # Box–Muller pairs (0, 1) and (2, 3) share a radius: their squares must be uncorrelated too.
    for a, b in ((0, 1), (2, 3), (0, 2)):
        assert_uncorrelated(lanes[..., a] ** 2, lanes[..., b] ** 2, f"squares of lanes {a}, {b}")


@pytest.fixture(scope="module", params=DEVICE_PARAMS)
def branch_noise(request: pytest.FixtureRequest) -> tuple[list[np.ndarray], tuple[float, float]]:
    """Partition "diag", fill "zeros", random x, σ = (0.3, 1.2): per branch, out − x on the kept
    pixels in packed order, (images, samples, C·H·W/2)."""
    sigma = (0.3, 1.2)
    x = random_images((4, 2, 16, 16), seed=8, scale=0.5)
    views = drs_ext.noisy_views(
        x.to(request.param), sigma, num=250, seed=99, partition="diag", fill="zeros"
    )
    out = views.cpu()
    noise = []
    for p in range(2):
        diff = out[:, p] - x[:, None]
        assert bool((out[:, p][..., ~kept_mask(16, 16, p)] == 0).all())
        noise.append(packed(diff, p).reshape(4, 250, -1).double().numpy())
    return noise, sigma


def test_branches_get_their_own_sigma(
    branch_noise: tuple[list[np.ndarray], tuple[float, float]],
) -> None:
    noise, sigma = branch_noise
    for p in range(2):
        assert noise[p].size >= 2 * 10**5
        # out − x is rounded in float32 (error ~1e-7), far below these bounds.
        assert_standard_normal_moments(noise[p], sigma[p])
        assert stats.kstest(noise[p].reshape(-1) / sigma[p], "norm").pvalue > 1e-3


def test_no_correlation_between_branches(
    branch_noise: tuple[list[np.ndarray], tuple[float, float]],
) -> None:
    """Element e of branch 0 and of branch 1 differ only in the counter's branch byte."""
    noise, _ = branch_noise
    assert_uncorrelated(noise[0], noise[1], "branches")
    assert_uncorrelated(noise[0][:, :-1], noise[1][:, 1:], "branches, next sample")


@pytest.mark.parametrize(
    ("offset", "stream", "seed"),
    [(2**40 - 100, 7, 1), (2**56 - 500, 2**32 - 1, 2**63 - 1), (2**32 - 250, 123, 2**32)],
)
def test_statistics_at_extreme_counters(
    device: torch.device, offset: int, stream: int, seed: int
) -> None:
    """Far sample indices (crossing 2^32), the largest stream id and seeds using the high key."""
    x = torch.zeros(1, 3, 16, 16, device=device)
    ids = torch.tensor([stream], device=device)
    out = drs_ext.noisy_views(
        x, 1.0, num=500, seed=seed, offset=offset, stream=ids, partition="none"
    )
    z = out.cpu().double().numpy().reshape(500, -1)
    assert_standard_normal_moments(z)
    assert stats.kstest(z.reshape(-1), "norm").pvalue > 1e-3
    assert_uncorrelated(z[:-1], z[1:], "consecutive samples")
    assert_uncorrelated(z[:, :-1], z[:, 1:], "consecutive elements")


def test_no_correlation_between_seeds(device: torch.device) -> None:
    x = torch.zeros(2, 3, 16, 16, device=device)

    def normals(seed: int) -> np.ndarray:
        return drs_ext.noisy_views(x, 1.0, num=200, seed=seed, partition="none").cpu().numpy()

    assert_uncorrelated(normals(5), normals(6), "seeds 5, 6")
    assert_uncorrelated(normals(5), normals(5 + 2**32), "seeds differing in the high key word")
