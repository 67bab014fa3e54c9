"""Soundness by simulation: base classifiers with known class probabilities.

With known probabilities the true certified radius is known in closed form, so over many
repetitions the fraction of certificates that claim more than the truth must stay at most alpha
(up to binomial error). Two kinds of base classifier:
- voters that ignore their input and vote at random (a randomised base classifier is allowed by
  the theory): they test the statistics and the α split, but cannot see the noise;
- classifiers that threshold one kept pixel of their view, whose vote probability through the
  real noise path (noisy_views, the fill, the counters) is Φ((x − t)/σ).
Negative controls show each check can fail: the point estimate k/n in place of the
Clopper–Pearson bound, a bound at a much larger alpha, and views drawn with half the noise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import RandomVoter, binomial_ceiling
from scipy.stats import norm
from torch import nn

import drs_ext.smoothing.sampling as sampling
from drs_ext import DualSmoothedClassifier, SmoothedClassifier, stats

ALPHA = 0.1
REPS = 300
IMAGE = torch.zeros(1, 2, 2)  # the classifiers ignore their input


def rs_false_rate(p_a: float, sigma: float, n: int) -> float:
    truth = sigma * norm.ppf(p_a)
    voter = RandomVoter([p_a, (1 - p_a) / 2, (1 - p_a) / 2], seed=1)
    smoothed = SmoothedClassifier(voter, 3, sigma)
    false = 0
    for rep in range(REPS):
        c, r = smoothed.certify(IMAGE, 20, n, ALPHA, 1000, seed=rep)
        false += c != smoothed.ABSTAIN and (c != 0 or r > truth)
    return false / REPS


def drs_false_rate(p_l: float, p_r: float, sigmas: tuple[float, float], n: int) -> float:
    truth = (norm.ppf(p_l) + norm.ppf(p_r)) / math.hypot(1 / sigmas[0], 1 / sigmas[1])
    voter_l = RandomVoter([p_l, 1 - p_l - 0.05, 0.05], seed=2)
    voter_r = RandomVoter([p_r, 0.05, 1 - p_r - 0.05], seed=3)
    smoothed = DualSmoothedClassifier(voter_l, voter_r, 3, sigmas)
    false = 0
    for rep in range(REPS):
        c, r = smoothed.certify(IMAGE, 20, n, ALPHA, 1000, seed=rep)
        false += c != smoothed.ABSTAIN and (c != 0 or r > truth)
    return false / REPS


def test_rs_certify_false_certificates_at_most_alpha() -> None:
    assert rs_false_rate(0.8, 0.5, 200) <= binomial_ceiling(ALPHA, REPS)


def test_drs_certify_false_certificates_at_most_alpha() -> None:
    assert drs_false_rate(0.75, 0.65, (0.5, 0.35), 200) <= binomial_ceiling(ALPHA, REPS)


def test_drs_certify_near_the_abstain_boundary() -> None:
    # One branch below 1/2: its negative Φ⁻¹ must count against the other (never clipped).
    assert drs_false_rate(0.85, 0.3, (0.5, 0.5), 200) <= binomial_ceiling(ALPHA, REPS)


def point_estimate(k: int, n: int, alpha: float) -> float:
    return min(k / n, 1 - 1e-9)


def replace_lower_bound(
    monkeypatch: pytest.MonkeyPatch, bound: Callable[[int, int, float], float]
) -> None:
    """bound in place of the Clopper–Pearson bound wherever the smoothing modules use it."""
    monkeypatch.setattr(stats, "lower_confidence_bound", bound)
    for name, module in list(sys.modules.items()):
        if name.startswith("drs_ext.smoothing") and hasattr(module, "lower_confidence_bound"):
            monkeypatch.setattr(module, "lower_confidence_bound", bound)


def test_negative_control_point_estimate_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    replace_lower_bound(monkeypatch, point_estimate)
    assert rs_false_rate(0.8, 0.5, 200) > binomial_ceiling(ALPHA, REPS)
    assert drs_false_rate(0.75, 0.65, (0.5, 0.35), 200) > binomial_ceiling(ALPHA, REPS)


def predict_outcomes(smoothed, n: int) -> np.ndarray:
    return np.array([smoothed.predict(IMAGE, n, ALPHA, 1000, seed=rep) for rep in range(REPS)])


def test_rs_predict_on_a_tie_returns_each_class_at_most_alpha() -> None:
    # With pA = pB the smoothed classifier's class is a tie-break; any answer but ABSTAIN is
    # wrong for one of the two readings, so each class may come back at most alpha of the time.
    outcomes = predict_outcomes(SmoothedClassifier(RandomVoter([0.4, 0.4, 0.2], 4), 3, 0.5), 200)
    for c in (0, 1):
        assert np.mean(outcomes == c) <= binomial_ceiling(ALPHA, REPS)
    assert np.mean(outcomes == 2) == 0.0


def test_drs_predict_on_a_mixture_tie_returns_each_class_at_most_alpha() -> None:
    # The branches disagree (each alone would predict confidently) but the mixture ties.
    voter_l = RandomVoter([0.6, 0.2, 0.2], 5)
    voter_r = RandomVoter([0.2, 0.6, 0.2], 6)
    outcomes = predict_outcomes(DualSmoothedClassifier(voter_l, voter_r, 3, 0.5), 200)
    for c in (0, 1):
        assert np.mean(outcomes == c) <= binomial_ceiling(ALPHA, REPS)


def test_drs_predict_finds_a_clear_winner() -> None:
    voter_l = RandomVoter([0.7, 0.2, 0.1], 7)
    voter_r = RandomVoter([0.6, 0.1, 0.3], 8)
    outcomes = predict_outcomes(DualSmoothedClassifier(voter_l, voter_r, 3, 0.5), 200)
    assert np.mean(outcomes == 0) > 0.9
    assert np.all((outcomes == 0) | (outcomes == DualSmoothedClassifier.ABSTAIN))


# ----------------------------------------------------------------------------------------------
# Through the real noise path: a base classifier that thresholds one pixel of its view.
# On a (1, 2, 2) image, branch l keeps pixels (0, 0) and (1, 1), branch r (0, 1) and (1, 0)
# (docs/design.md §2.1), and the "neighbors" fill leaves kept pixels in place, so pixel (0, 0)
# of an l view is x[0, 0, 0] + σₗ ε and pixel (0, 1) of an r view is x[0, 0, 1] + σᵣ ε.


class PixelThreshold(nn.Module):
    """Class 0 when the view's pixel (0, i, j) exceeds t, else class 1: for a view x + σε of
    that pixel, P(class 0) = Φ((x − t)/σ)."""

    def __init__(self, i: int, j: int, threshold: float) -> None:
        super().__init__()
        self.i, self.j, self.threshold = i, j, threshold

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        margin = views[:, 0, self.i, self.j] - self.threshold
        return torch.stack([margin, -margin], dim=1)


PIXEL_IMAGE = torch.tensor([[[0.3, -0.2], [0.1, 0.4]]])  # (1, 2, 2)
PIXEL_REPS = 1000  # about 0.6 ms per certificate


def threshold_for(p: float, pixel: float, sigma: float) -> float:
    """The t with Φ((pixel − t)/σ) = p."""
    return pixel - sigma * float(norm.ppf(p))


def pixel_false_rate(smoothed, truth: float, alpha: float, device: torch.device | str) -> float:
    """Share of PIXEL_REPS certificates of PIXEL_IMAGE (class 0 is g's class) that are false: a
    wrong class, or a radius above the true radius `truth`."""
    image, false, certified = PIXEL_IMAGE.to(device), 0, 0
    for rep in range(PIXEL_REPS):
        c, r = smoothed.certify(image, 20, 200, alpha, 1000, seed=rep, stream=rep % 7)
        certified += c != smoothed.ABSTAIN
        false += c != smoothed.ABSTAIN and (c != 0 or r > truth)
    assert certified > PIXEL_REPS / 2, "the simulation needs mostly non-abstaining certificates"
    return false / PIXEL_REPS


def rs_pixel_false_rate(
    p_a: float, sigma: float, alpha: float, device: torch.device | str = "cpu"
) -> float:
    """False-certificate rate of RS over PIXEL_REPS seeds; the true radius of the smoothed
    classifier is σΦ⁻¹(p_a) (= x − t: it is the distance to the half-space)."""
    pixel = float(PIXEL_IMAGE[0, 0, 0])
    smoothed = SmoothedClassifier(PixelThreshold(0, 0, threshold_for(p_a, pixel, sigma)), 2, sigma)
    truth = sigma * norm.ppf(p_a)
    return pixel_false_rate(smoothed, truth, alpha, device)


def drs_pixel_false_rate(
    p_l: float,
    p_r: float,
    sigmas: tuple[float, float],
    alpha: float,
    device: torch.device | str = "cpu",
) -> float:
    """False-certificate rate of DRS over PIXEL_REPS seeds, against the radius of the exact branch
    probabilities (Φ⁻¹(p_l) + Φ⁻¹(p_r)) / √(σₗ⁻² + σᵣ⁻²); class 0 is g's class (p_l + p_r > 1)."""
    assert p_l + p_r > 1
    left = PixelThreshold(0, 0, threshold_for(p_l, float(PIXEL_IMAGE[0, 0, 0]), sigmas[0]))
    right = PixelThreshold(0, 1, threshold_for(p_r, float(PIXEL_IMAGE[0, 0, 1]), sigmas[1]))
    smoothed = DualSmoothedClassifier(left, right, 2, sigmas, fill="neighbors")
    truth = (norm.ppf(p_l) + norm.ppf(p_r)) / math.hypot(1 / sigmas[0], 1 / sigmas[1])
    return pixel_false_rate(smoothed, truth, alpha, device)


def test_rs_pixel_classifier_false_certificates_at_most_alpha(device: torch.device) -> None:
    assert rs_pixel_false_rate(0.8, 0.5, ALPHA, device) <= binomial_ceiling(ALPHA, PIXEL_REPS)


@pytest.mark.parametrize(
    ("p_l", "p_r", "sigmas"),
    [(0.75, 0.65, (0.5, 0.35)), (0.85, 0.3, (0.5, 0.5))],
    ids=["both-above-half", "one-below-half"],
)
def test_drs_pixel_classifiers_false_certificates_at_most_alpha(
    device: torch.device, p_l: float, p_r: float, sigmas: tuple[float, float]
) -> None:
    ceiling = binomial_ceiling(ALPHA, PIXEL_REPS)
    assert drs_pixel_false_rate(p_l, p_r, sigmas, ALPHA, device) <= ceiling


def test_negative_control_pixel_classifiers_catch_a_larger_alpha() -> None:
    """The same simulations with bounds at alpha = 0.9 (nearly the point estimate): the rate
    of false certificates then exceeds the ceiling of ALPHA (RS about 0.9, DRS about 0.4; the
    DRS certificate is conservative, with the α/2 split and a bound per branch, so at alpha
    = 0.5 it still stays near 0.15)."""
    ceiling = binomial_ceiling(ALPHA, PIXEL_REPS)
    assert rs_pixel_false_rate(0.8, 0.5, 0.9) > ceiling
    assert drs_pixel_false_rate(0.75, 0.65, (0.5, 0.35), 0.9) > ceiling


def test_negative_control_pixel_classifiers_catch_too_little_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Views drawn with half the σ the certificate assumes: the base classifiers are right more
    often than Φ((x − t)/σ), and the simulations see the over-certification. (The voters that
    ignore their input cannot.)"""
    real = sampling.noisy_views

    def half_noise(x: torch.Tensor, sigma: list[float], **kw: object) -> torch.Tensor:
        return real(x, [s / 2 for s in sigma], **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling, "noisy_views", half_noise)
    ceiling = binomial_ceiling(ALPHA, PIXEL_REPS)
    assert rs_pixel_false_rate(0.8, 0.5, ALPHA) > ceiling
    assert drs_pixel_false_rate(0.75, 0.65, (0.5, 0.35), ALPHA) > ceiling
