"""Certified radii of RS and DRS and their upper bounds (Xia et al., ICLR 2024, Eq. 3, 4, 13, 15).

Radius convention: a radius <= 0 (including -inf) means abstain. The functions never clip, so
the caller's single test ``radius <= 0`` covers p_lower <= 1/2 (RS) and a_l + a_r <= 0 (DRS).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from scipy.stats import chi2, norm

__all__ = [
    "curse_of_dimensionality_curve",
    "drs_radius",
    "drs_radius_upper_bound",
    "rs_radius",
    "rs_radius_upper_bound",
]

# Wu et al. (2021)'s margin between estimated and true probability in Eq. 4 / Eq. 15.
_WU_MARGIN = 5e-7


def _check_probability(value: float, name: str) -> float:
    # NaN fails both comparisons, so it is rejected here too.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    return float(value)


def _check_sigma(value: float, name: str) -> float:
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0.0
    )
    if not ok:
        raise ValueError(f"{name} must be a finite real number > 0, got {value!r}")
    return float(value)


def _check_dim(value: int, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def rs_radius(p_lower: float, sigma: float) -> float:
    """Cohen et al.'s radius σ·Φ⁻¹(p_lower) (Xia et al., Eq. 3).

    Negative values mean abstain; 0 at p_lower = 1/2 means abstain too; -inf at p_lower = 0.
    """
    p_lower = _check_probability(p_lower, "p_lower")
    sigma = _check_sigma(sigma, "sigma")
    return sigma * float(norm.ppf(p_lower))


def drs_radius(p_lower_l: float, p_lower_r: float, sigma_l: float, sigma_r: float) -> float:
    """DRS radius (Φ⁻¹(p̲ₗ) + Φ⁻¹(p̲ᵣ)) / √(σₗ⁻² + σᵣ⁻²) (Xia et al., Eq. 13 for σₗ = σᵣ).

    The attack must satisfy ‖δₗ‖/σₗ + ‖δᵣ‖/σᵣ >= aₗ + aᵣ, and the smallest ‖δ‖ on that line is
    this radius. Non-positive values mean abstain. p = 1 gives +inf (Clopper-Pearson never
    returns 1); p = 0 on either branch gives -inf.
    """
    p_lower_l = _check_probability(p_lower_l, "p_lower_l")
    p_lower_r = _check_probability(p_lower_r, "p_lower_r")
    sigma_l = _check_sigma(sigma_l, "sigma_l")
    sigma_r = _check_sigma(sigma_r, "sigma_r")
    if p_lower_l == 0.0 or p_lower_r == 0.0:
        # Abstain: otherwise p = 0 on one branch and p = 1 on the other gives -inf + inf = NaN.
        return -math.inf
    # Keep a negative term as it is and sum before dividing: clipping aₚ at 0, or using
    # √(rₗ² + rᵣ²) with rₚ = σₚaₚ, both over-certify.
    a_sum = float(norm.ppf(p_lower_l)) + float(norm.ppf(p_lower_r))
    return a_sum / math.hypot(1.0 / sigma_l, 1.0 / sigma_r)


def _wu_bound(p: float, sigma: float, d: int) -> float:
    """5/√d · Ψ⁻¹(p / (1 - 5e-7); N(0, σ² I_d)) for validated arguments."""
    t = p / (1.0 - _WU_MARGIN)
    if t >= 1.0:
        # No finite ball holds all of a Gaussian's mass.
        return math.inf
    # ‖z‖²/σ² ~ χ²_d, so Ψ(r) = chi2.cdf(r²/σ², d) and Ψ⁻¹(t) = σ·√chi2.ppf(t, d).
    return 5.0 / math.sqrt(d) * sigma * math.sqrt(float(chi2.ppf(t, d)))


def rs_radius_upper_bound(p: float, sigma: float, d: int) -> float:
    """Wu et al.'s upper bound on any RS radius with N(0, σ² I_d) noise (Xia et al., Eq. 4).

    ``p`` is the top-class smoothed probability.
    """
    return _wu_bound(_check_probability(p, "p"), _check_sigma(sigma, "sigma"), _check_dim(d, "d"))


def drs_radius_upper_bound(
    p_l: float, p_r: float, sigma_l: float, sigma_r: float, m: int, n: int
) -> float:
    """Upper bound on the DRS radius, branches of dimension m and n (Xia et al., Eq. 15)."""
    p_l = _check_probability(p_l, "p_l")
    p_r = _check_probability(p_r, "p_r")
    sigma_l = _check_sigma(sigma_l, "sigma_l")
    sigma_r = _check_sigma(sigma_r, "sigma_r")
    m = _check_dim(m, "m")
    n = _check_dim(n, "n")
    # 5/√(2m)·Ψ⁻¹ = (5/√m·Ψ⁻¹)/√2: Eq. 14 applied to the per-branch bounds of Eq. 4.
    return (_wu_bound(p_l, sigma_l, m) + _wu_bound(p_r, sigma_r, n)) / math.sqrt(2.0)


def curse_of_dimensionality_curve(
    dims: Sequence[int] | np.ndarray, p: float = 0.999
) -> dict[str, np.ndarray]:
    """RS and DRS radius upper bounds against dimension d (Xia et al., Figure 1(b)).

    σ = 1/√d on every branch, smoothed probability p on every branch, DRS branches of
    m = ⌊d/2⌋ and n = d - m dimensions (m = n = d/2 for even d).
    """
    d = np.asarray(dims)
    if d.ndim != 1 or d.size == 0 or not np.issubdtype(d.dtype, np.integer) or np.any(d < 2):
        raise ValueError(f"dims must be a non-empty 1-D sequence of integers >= 2, got {dims!r}")
    p = _check_probability(p, "p")
    rs, drs = [], []
    for dim in d.tolist():
        sigma = 1.0 / math.sqrt(dim)
        m = dim // 2
        rs.append(rs_radius_upper_bound(p, sigma, dim))
        drs.append(drs_radius_upper_bound(p, p, sigma, sigma, m, dim - m))
    return {"d": d.astype(np.int64), "rs": np.asarray(rs), "drs": np.asarray(drs)}
