"""σ-routing (Sun, Mao, Vechev): the two-stage certificate, its α split, and its errors.

Soundness by simulation: an estimator and per-level classifiers that vote at random with known
probabilities, so the true radius of each stage is known in closed form, R_σ = σ_e Φ⁻¹(p_e) and
R_c = σ̂ Φ⁻¹(p_c), and a certificate is false when its class is wrong, its level is not the
estimator's true top level, or its radius exceeds min(R_σ, R_c).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import RandomVoter, binomial_ceiling
from scipy.stats import norm
from torch import nn

from drs_ext import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.smoothing.sigma_routing import SigmaRoutedClassifier, estimator_seed

ALPHA = 0.1
REPS = 300
LEVELS = [0.25, 0.5, 1.0]
IMAGE = torch.zeros(1, 2, 2)


def routed(p_level: list[float], p_class: list[float], sigma_e: float = 1.0):
    """A router whose estimator votes for level i with probability p_level[i] and whose
    classifiers (one RS model per level) vote for class c with probability p_class[c]."""
    experts = [
        SmoothedClassifier(RandomVoter(p_class, seed=10 + i), len(p_class), s)
        for i, s in enumerate(LEVELS)
    ]
    return SigmaRoutedClassifier(RandomVoter(p_level, seed=1), LEVELS, sigma_e, experts)


def false_rate(router: SigmaRoutedClassifier, top_level: int, p_e: float, p_c: float) -> float:
    """Share of REPS certificates that are false (class 0 and level top_level are the truth)."""
    truth_sigma = router.estimator_sigma * norm.ppf(p_e)
    truth_c = LEVELS[top_level] * norm.ppf(p_c)
    false = 0
    for rep in range(REPS):
        cert = router.certify_details(IMAGE, 20, 100, ALPHA, 1000, seed=rep)
        if cert.prediction == router.ABSTAIN:
            continue
        wrong = cert.prediction != 0 or cert.level != top_level
        false += wrong or cert.radius > min(truth_sigma, truth_c)
    return false / REPS


@pytest.mark.parametrize(
    ("p_level", "p_class"),
    [
        ([0.1, 0.75, 0.15], [0.8, 0.1, 0.1]),  # both stages confident
        ([0.05, 0.52, 0.43], [0.9, 0.05, 0.05]),  # estimator's top level just above 1/2
        ([0.05, 0.9, 0.05], [0.45, 0.3, 0.25]),  # classifier stage below 1/2: must abstain
    ],
    ids=["confident", "estimator-near-half", "classifier-below-half"],
)
def test_false_certificates_at_most_alpha(p_level, p_class) -> None:
    router = routed(p_level, p_class)
    rate = false_rate(router, int(np.argmax(p_level)), max(p_level), p_class[0])
    assert rate <= binomial_ceiling(ALPHA, REPS)


def test_negative_control_estimator_point_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimator's point estimate k/n in place of its bound certifies R_σ too large about
    half the time (the classifier stage, at p = 0.99, is not the bottleneck): the simulation
    must see it."""
    router = routed([0.1, 0.6, 0.3], [0.99, 0.005, 0.005])
    monkeypatch.setattr(router.estimator, "lower_bounds", lambda counts, n, alpha: counts / n)
    assert false_rate(router, 1, 0.6, 0.99) > binomial_ceiling(ALPHA, REPS)


def test_each_stage_is_certified_at_half_alpha() -> None:
    """The routed certificate equals the estimator's and the level classifier's own certificates
    at alpha/2, with the estimator's key derived from the seed: R = min(R_σ, R_c). (The voters
    draw from their own generators, so each comparison gets a fresh router.)"""

    def router():
        return routed([0.05, 0.9, 0.05], [0.95, 0.03, 0.02])

    cert = router().certify_details(IMAGE, 20, 200, 0.01, 64, seed=3, stream=5)
    est = router().estimator.certify_details(
        IMAGE, 20, 200, 0.005, 64, seed=estimator_seed(3), stream=5
    )
    clf = router().classifiers[1].certify_details(IMAGE, 20, 200, 0.005, 64, seed=3, stream=5)
    assert (cert.level, cert.sigma) == (est.prediction, 0.5) == (1, 0.5)
    assert cert.radius_sigma == est.radius and cert.radius_c == clf.radius
    assert cert.radius == min(est.radius, clf.radius) and cert.prediction == clf.prediction == 0
    assert router().certify(IMAGE, 20, 200, 0.01, 64, seed=3, stream=5) == (0, cert.radius)
    assert estimator_seed(3) != 3 and estimator_seed(3) == estimator_seed(3)


def test_stages_draw_from_disjoint_noise() -> None:
    """The estimator and the classifier stage never see the same noise vector."""
    seen = {"est": [], "clf": []}

    class Recorder(nn.Module):
        def __init__(self, name: str, classes: int) -> None:
            super().__init__()
            self.name, self.classes = name, classes

        def forward(self, views: torch.Tensor) -> torch.Tensor:
            seen[self.name].append(views.flatten(1).clone())
            out = torch.zeros(views.shape[0], self.classes)
            out[:, 0] = 1.0
            return out

    experts = [SmoothedClassifier(Recorder("clf", 2), 2, s) for s in LEVELS]
    router = SigmaRoutedClassifier(Recorder("est", 3), LEVELS, 0.25, experts)
    router.certify(IMAGE, 10, 30, 0.1, 64, seed=0, stream=0)
    est, clf = torch.cat(seen["est"]) / 0.25, torch.cat(seen["clf"]) / LEVELS[0]
    assert est.shape == clf.shape == (40, 4)
    assert not any(torch.allclose(e, c) for e in est for c in clf)


def test_predict_routes_to_the_level_and_abstains_when_the_estimator_does() -> None:
    router = routed([0.05, 0.9, 0.05], [0.05, 0.9, 0.05])
    assert router.predict(IMAGE, 200, 0.01, 64, seed=1) == 1
    undecided = routed([0.34, 0.33, 0.33], [0.9, 0.05, 0.05])
    assert undecided.predict(IMAGE, 200, 0.01, 64, seed=1) == undecided.ABSTAIN


def test_drs_pairs_serve_as_experts() -> None:
    pairs = [
        DualSmoothedClassifier(
            RandomVoter([0.9, 0.1], 1), RandomVoter([0.9, 0.1], 2), 2, s / 2**0.5
        )
        for s in LEVELS
    ]
    router = SigmaRoutedClassifier(RandomVoter([0.05, 0.05, 0.9], 3), LEVELS, 1.0, pairs)
    cert = router.certify_details(IMAGE, 20, 200, 0.01, 64)
    assert cert.level == 2 and cert.prediction == 0 and len(cert.p_lower_c) == 2
    assert math.isfinite(cert.radius) and cert.radius > 0


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ([], "non-empty"),
        ([0.5, 0.25, 1.0], "strictly increasing"),
        ([0.25, 0.25, 1.0], "strictly increasing"),
        ([0.25, -0.5, 1.0], r"levels\[1\]"),
        ([0.25, float("nan"), 1.0], r"levels\[1\]"),
    ],
)
def test_bad_levels(levels, message) -> None:
    with pytest.raises(ValueError, match=message):
        SigmaRoutedClassifier(nn.Identity(), levels, 1.0, [])


def test_bad_arguments_name_what_is_wrong() -> None:
    experts = [SmoothedClassifier(nn.Identity(), 2, s) for s in LEVELS]
    with pytest.raises(ValueError, match="estimator_sigma"):
        SigmaRoutedClassifier(nn.Identity(), LEVELS, 0.0, experts)
    with pytest.raises(ValueError, match="one smoothed classifier per level"):
        SigmaRoutedClassifier(nn.Identity(), LEVELS, 1.0, experts[:2])
    with pytest.raises(ValueError, match="its level is 0.5"):
        SigmaRoutedClassifier(nn.Identity(), LEVELS, 1.0, [experts[0], experts[0], experts[2]])
    mixed = [*experts[:2], SmoothedClassifier(nn.Identity(), 3, 1.0)]
    with pytest.raises(ValueError, match="number of classes"):
        SigmaRoutedClassifier(nn.Identity(), LEVELS, 1.0, mixed)


def test_an_estimator_with_the_wrong_output_size_is_refused() -> None:
    experts = [SmoothedClassifier(RandomVoter([1.0, 0.0], i), 2, s) for i, s in enumerate(LEVELS)]
    router = SigmaRoutedClassifier(RandomVoter([0.5, 0.5], 0), LEVELS, 1.0, experts)
    with pytest.raises(ValueError, match="3"):
        router.certify(IMAGE, 10, 20, 0.1, 64)


def test_models_that_take_sigma_are_told_each_stages_sigma() -> None:
    """A base classifier declaring takes_sigma (a denoiser in front) is called with the σ of the
    views it is given: σ_e in the estimator, the routed level in the classifier stage."""
    told = []

    class Denoised(nn.Module):
        takes_sigma = True

        def __init__(self, vote: int, classes: int) -> None:
            super().__init__()
            self.vote, self.classes = vote, classes

        def forward(self, views: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            assert sigma.shape == views.shape[:1]
            told.append((self.classes, float(sigma.unique())))
            return nn.functional.one_hot(
                torch.full((views.shape[0],), self.vote), self.classes
            ).float()

    experts = [SmoothedClassifier(Denoised(0, 2), 2, s) for s in LEVELS]
    router = SigmaRoutedClassifier(Denoised(2, 3), LEVELS, 0.75, experts)
    assert router.certify(IMAGE, 10, 30, 0.1, 64)[0] == 0
    assert {s for c, s in told if c == 3} == {0.75} and {s for c, s in told if c == 2} == {1.0}
    with pytest.raises(ValueError, match="all take sigma"):
        SmoothedClassifier([Denoised(0, 2), nn.Identity()], 2, 0.5)
