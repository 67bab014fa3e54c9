"""drs_ext.radius against closed forms, geometry and independent chi-square computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import gammainc
from scipy.stats import norm
from torch import nn

import drs_ext
from drs_ext.radius import (
    curse_of_dimensionality_curve,
    drs_radius,
    drs_radius_upper_bound,
    rs_radius,
    rs_radius_upper_bound,
)

SQRT2 = math.sqrt(2.0)


def test_rs_radius_closed_form_and_sign() -> None:
    for p, sigma in [(0.9, 0.25), (0.999, 1.0), (0.6, 0.5)]:
        assert rs_radius(p, sigma) == pytest.approx(sigma * norm.ppf(p), rel=1e-14)
        assert rs_radius(p, sigma) > 0
    assert rs_radius(0.5, 0.25) == 0.0
    assert rs_radius(0.3, 0.25) == pytest.approx(-0.25 * norm.ppf(0.7), rel=1e-14)
    assert rs_radius(0.0, 0.25) == -math.inf
    assert rs_radius(1.0, 0.25) == math.inf


@pytest.mark.parametrize(("p_l", "p_r"), [(0.9, 0.8), (0.99, 0.6), (0.7, 0.4), (0.999, 0.999)])
@pytest.mark.parametrize("sigma", [0.18, 0.5])
def test_drs_radius_equal_sigma_is_paper_eq13(p_l: float, p_r: float, sigma: float) -> None:
    expected = sigma * (norm.ppf(p_l) + norm.ppf(p_r)) / SQRT2
    assert drs_radius(p_l, p_r, sigma, sigma) == pytest.approx(expected, rel=1e-13)
    # Eq. 14: the mean of the per-branch RS radii, scaled by √2.
    assert drs_radius(p_l, p_r, sigma, sigma) == pytest.approx(
        (rs_radius(p_l, sigma) + rs_radius(p_r, sigma)) / SQRT2, rel=1e-13
    )


def test_drs_radius_with_one_uninformative_branch() -> None:
    # a = 0 on one branch: only the other branch certifies, through √(σₗ⁻² + σᵣ⁻²).
    assert drs_radius(0.5, 0.9, 0.25, 0.25) == pytest.approx(rs_radius(0.9, 0.25) / SQRT2)
    assert drs_radius(0.9, 0.5, 0.3, 0.4) == pytest.approx(norm.ppf(0.9) * 0.3 * 0.4 / 0.5)


@pytest.mark.parametrize(
    ("p_l", "p_r", "sigma_l", "sigma_r"),
    [(0.9, 0.8, 0.25, 0.5), (0.99, 0.7, 1.0, 0.1), (0.6, 0.95, 0.4, 0.3)],
)
def test_drs_radius_is_minimum_norm_on_the_attack_line(
    p_l: float, p_r: float, sigma_l: float, sigma_r: float
) -> None:
    # Independent geometry: min ‖(u, v)‖ over u/σₗ + v/σᵣ = aₗ + aᵣ, u, v >= 0, by brute force.
    s = norm.ppf(p_l) + norm.ppf(p_r)
    u = np.linspace(0.0, s * sigma_l, 200_001)
    v = sigma_r * (s - u / sigma_l)
    brute = np.hypot(u, v).min()
    radius = drs_radius(p_l, p_r, sigma_l, sigma_r)
    assert radius <= brute + 1e-12
    assert radius == pytest.approx(brute, rel=1e-6)


def test_drs_radius_never_clips_or_uses_root_sum_square() -> None:
    sigma = 0.25
    a_l, a_r = norm.ppf(0.4), norm.ppf(0.9)
    radius = drs_radius(0.4, 0.9, sigma, sigma)
    assert radius == pytest.approx(sigma * (a_l + a_r) / SQRT2)
    assert radius < sigma * (0.0 + a_r) / SQRT2  # clipping a_l to 0 would over-certify
    rss = math.hypot(rs_radius(0.99, sigma), rs_radius(0.7, sigma))
    assert drs_radius(0.99, 0.7, sigma, sigma) < rss  # √(rₗ² + rᵣ²) would over-certify


def test_drs_radius_abstain_signals() -> None:
    assert drs_radius(0.3, 0.7, 0.5, 0.5) == pytest.approx(0.0, abs=1e-15)
    assert drs_radius(0.2, 0.7, 0.5, 0.5) < 0
    assert drs_radius(0.0, 0.9, 0.5, 0.5) == -math.inf
    assert drs_radius(0.9, 0.0, 0.5, 0.5) == -math.inf
    assert drs_radius(0.0, 1.0, 0.5, 0.5) == -math.inf  # not NaN
    assert drs_radius(1.0, 0.9, 0.5, 0.5) == math.inf


def _psi_inverse_oracle(p: float, sigma: float, d: int) -> float:
    # Ψ(r) = P(‖z‖ < r) for z ~ N(0, σ² I_d) is the regularized lower gamma P(d/2, r²/(2σ²));
    # invert Ψ at p / (1 - 5e-7) by root finding instead of chi2.ppf.
    t = p / (1 - 5e-7)
    upper = sigma * (math.sqrt(d) + 20.0)
    return brentq(
        lambda r: gammainc(d / 2, r * r / (2 * sigma * sigma)) - t,
        0.0,
        upper,
        xtol=1e-14,
        rtol=1e-13,
    )


@pytest.mark.parametrize(
    ("p", "sigma", "d"), [(0.999, 0.25, 3072), (0.9, 0.5, 1), (0.6, 1.0, 2), (0.99, 0.12, 150528)]
)
def test_rs_upper_bound_is_eq4(p: float, sigma: float, d: int) -> None:
    expected = 5 / math.sqrt(d) * _psi_inverse_oracle(p, sigma, d)
    assert rs_radius_upper_bound(p, sigma, d) == pytest.approx(expected, rel=1e-8)


def test_upper_bounds_are_infinite_beyond_the_margin() -> None:
    assert rs_radius_upper_bound(1.0, 0.5, 10) == math.inf
    assert rs_radius_upper_bound(1 - 5e-7, 0.5, 10) == math.inf
    assert math.isfinite(rs_radius_upper_bound(1 - 1e-6, 0.5, 10))
    assert drs_radius_upper_bound(1.0, 0.9, 0.5, 0.5, 10, 10) == math.inf
    assert rs_radius_upper_bound(0.0, 0.5, 10) == 0.0


def test_drs_upper_bound_is_eq15() -> None:
    p_l, p_r, sigma_l, sigma_r, m, n = 0.99, 0.95, 0.25, 0.5, 1536, 1000
    expected = 5 / math.sqrt(2 * m) * _psi_inverse_oracle(p_l, sigma_l, m) + 5 / math.sqrt(
        2 * n
    ) * _psi_inverse_oracle(p_r, sigma_r, n)
    assert drs_radius_upper_bound(p_l, p_r, sigma_l, sigma_r, m, n) == pytest.approx(
        expected, rel=1e-8
    )


def test_curve_reproduces_figure_1b() -> None:
    dims = [2, 16, 128, 1024, 3072, 12288, 150528]
    curve = curse_of_dimensionality_curve(dims)
    d, rs, drs = curve["d"], curve["rs"], curve["drs"]
    np.testing.assert_array_equal(d, dims)
    for i, dim in enumerate(dims):
        sigma = 1 / math.sqrt(dim)
        assert rs[i] == pytest.approx(rs_radius_upper_bound(0.999, sigma, dim))
        assert drs[i] == pytest.approx(
            drs_radius_upper_bound(0.999, 0.999, sigma, sigma, dim // 2, dim // 2)
        )
    # RS: decreasing like 1/√d, √d·bound falls towards 5 (χ²_d quantile / d -> 1).
    assert np.all(np.diff(rs) < 0)
    scaled = rs * np.sqrt(d)
    assert np.all(np.diff(scaled) < 0)
    assert np.all(scaled > 5)
    assert scaled[-1] == pytest.approx(5, rel=0.01)
    # DRS: above RS at every d (the paper's claim), by a factor tending to √2.
    assert np.all(drs > rs)
    assert drs[-1] / rs[-1] == pytest.approx(SQRT2, rel=0.01)


def test_curve_splits_odd_dimensions_and_uses_p() -> None:
    curve = curse_of_dimensionality_curve(np.array([7]), p=0.9)
    sigma = 1 / math.sqrt(7)
    assert curve["drs"][0] == pytest.approx(drs_radius_upper_bound(0.9, 0.9, sigma, sigma, 3, 4))
    assert curve["rs"][0] == pytest.approx(rs_radius_upper_bound(0.9, sigma, 7))


BAD_P = [-0.1, 1.1, math.nan, math.inf, "0.9", None, True]
BAD_SIGMA = [0.0, -0.25, math.nan, math.inf, "0.25", None]
BAD_DIM = [0, -4, 3.0, math.nan, True, None]


@pytest.mark.parametrize("bad", BAD_P)
def test_radius_rejects_bad_probabilities(bad: object) -> None:
    with pytest.raises(ValueError, match=r"p_lower must be a real number in \[0, 1\]"):
        rs_radius(bad, 0.25)
    with pytest.raises(ValueError, match=r"p_lower_l must be"):
        drs_radius(bad, 0.9, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"p_lower_r must be"):
        drs_radius(0.9, bad, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"p must be a real number in \[0, 1\]"):
        rs_radius_upper_bound(bad, 0.25, 10)
    with pytest.raises(ValueError, match=r"p_l must be"):
        drs_radius_upper_bound(bad, 0.9, 0.25, 0.25, 5, 5)
    with pytest.raises(ValueError, match=r"p_r must be"):
        drs_radius_upper_bound(0.9, bad, 0.25, 0.25, 5, 5)
    with pytest.raises(ValueError, match=r"p must be"):
        curse_of_dimensionality_curve([4], p=bad)


@pytest.mark.parametrize("bad", BAD_SIGMA)
def test_radius_rejects_bad_sigma(bad: object) -> None:
    with pytest.raises(ValueError, match=r"sigma must be a finite real number > 0"):
        rs_radius(0.9, bad)
    with pytest.raises(ValueError, match=r"sigma_l must be a finite real number > 0"):
        drs_radius(0.9, 0.9, bad, 0.25)
    with pytest.raises(ValueError, match=r"sigma_r must be"):
        drs_radius(0.9, 0.9, 0.25, bad)
    with pytest.raises(ValueError, match=r"sigma must be"):
        rs_radius_upper_bound(0.9, bad, 10)
    with pytest.raises(ValueError, match=r"sigma_l must be"):
        drs_radius_upper_bound(0.9, 0.9, bad, 0.25, 5, 5)
    with pytest.raises(ValueError, match=r"sigma_r must be"):
        drs_radius_upper_bound(0.9, 0.9, 0.25, bad, 5, 5)


@pytest.mark.parametrize("bad", BAD_DIM)
def test_upper_bounds_reject_bad_dimensions(bad: object) -> None:
    with pytest.raises(ValueError, match=r"d must be an integer >= 1"):
        rs_radius_upper_bound(0.9, 0.25, bad)
    with pytest.raises(ValueError, match=r"m must be an integer >= 1"):
        drs_radius_upper_bound(0.9, 0.9, 0.25, 0.25, bad, 5)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1"):
        drs_radius_upper_bound(0.9, 0.9, 0.25, 0.25, 5, bad)


@pytest.mark.parametrize("bad", [[], [1], [4, 0], [2.0, 4.0], [[2, 4]], [True]])
def test_curve_rejects_bad_dims(bad: object) -> None:
    with pytest.raises(ValueError, match=r"dims must be a non-empty 1-D sequence of integers"):
        curse_of_dimensionality_curve(bad)


def test_numpy_scalars_are_accepted() -> None:
    assert rs_radius(np.float32(0.75), np.float64(0.5)) == pytest.approx(rs_radius(0.75, 0.5))
    assert rs_radius_upper_bound(0.9, 0.5, np.int64(10)) == rs_radius_upper_bound(0.9, 0.5, 10)
    assert isinstance(drs_radius(np.float64(0.9), 0.8, 0.5, 0.5), float)


def test_max_radius_is_the_radius_of_unanimous_votes():
    """The radius cap of n draws: RS σΦ⁻¹(α^(1/n)); DRS each branch at α/2 (Clopper–Pearson's
    bound for k = n is (α)^(1/n)), summed over √(σₗ⁻² + σᵣ⁻²)."""
    model = nn.Flatten()
    rs = drs_ext.SmoothedClassifier(model, num_classes=3, sigma=0.5)
    assert rs.max_radius(2000, 0.001) == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 2000)))
    drs = drs_ext.DualSmoothedClassifier(model, model, num_classes=3, sigma=(0.3, 0.4))
    a = norm.ppf(0.0005 ** (1 / 100))
    assert drs.max_radius(100, 0.001) == pytest.approx(2 * a / math.hypot(1 / 0.3, 1 / 0.4))
