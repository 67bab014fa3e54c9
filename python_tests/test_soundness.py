"""Soundness by simulation: base classifiers that vote at random with known class probabilities.

A randomised base classifier is allowed by the theory, and with known probabilities the true
certified radius is known in closed form, so over many repetitions the fraction of certificates
that claim more than the truth must stay at most alpha (up to binomial error). Negative controls
show the check can fail: plugging in the point estimate k/n instead of the Clopper-Pearson bound
is caught.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

import drs_ext.smoothing as smoothing
from drs_ext import DualSmoothedClassifier, SmoothedClassifier

ALPHA = 0.1
REPS = 300
IMAGE = torch.zeros(1, 2, 2)  # the classifiers ignore their input


class RandomVoter(nn.Module):
    """Votes for class c with probability probs[c], independently for every view."""

    def __init__(self, probs: list[float], seed: int) -> None:
        super().__init__()
        self.probs = torch.tensor(probs, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        votes = torch.multinomial(self.probs, views.shape[0], replacement=True, generator=self.gen)
        return nn.functional.one_hot(votes, self.probs.numel()).float()


def binomial_ceiling(rate: float, reps: int) -> float:
    """rate plus 3 binomial standard errors: the tolerance of an observed frequency."""
    return rate + 3.0 * math.sqrt(rate * (1.0 - rate) / reps)


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


def test_negative_control_point_estimate_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smoothing, "lower_confidence_bound", point_estimate)
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
