"""Sequential σ-routing's soundness by simulation (drs_ext/smoothing/sigma_routing_sequential.py).

Oracle: the tasks' state machines fed multinomial votes of known probabilities (so R_σ =
σ_e Φ⁻¹(p_e) and R_c are known in closed form), under optional stopping; the false-certificate
rate must stay within a binomial ceiling of alpha, and a negative control (Clopper–Pearson
recomputed at every look at each stage's level) must be caught by the same check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import binomial_ceiling
from scipy.stats import beta as beta_law
from scipy.stats import norm
from torch import nn

import drs_ext.smoothing.at_radius as at_radius
import drs_ext.smoothing.sequential as sequential
from drs_ext import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.radius import drs_radius
from drs_ext.smoothing.sequential import ABSTAIN
from drs_ext.smoothing.sigma_routing import SigmaRoutedClassifier
from drs_ext.smoothing.sigma_routing_sequential import RoutedEstimate, RoutedRadiusTest

ALPHA = 0.2  # large, so that false-certificate rates show with a few hundred repetitions
LEVELS = [0.25, 0.5, 1.0]
LOOKS = {"first_look": 8, "growth": 1.5}
REPS = 500


# ----------------------------------------------------------------------------------------------
# Soundness by simulation: the state machines fed votes of known probabilities


def voting_router(classes: int, drs_level: int | None = None) -> SigmaRoutedClassifier:
    """A router whose models never run (the simulation supplies the votes); σ_e = 1; the level
    drs_level is served by a DRS pair at σ/√2 per branch, the others by RS."""
    experts = [
        DualSmoothedClassifier(nn.Identity(), nn.Identity(), classes, s / math.sqrt(2))
        if i == drs_level
        else SmoothedClassifier(nn.Identity(), classes, s)
        for i, s in enumerate(LEVELS)
    ]
    return SigmaRoutedClassifier(nn.Identity(), LEVELS, 1.0, experts)


def simulate(router, make_task, p_level, p_class, reps: int, seed: int = 0) -> list:
    """The estimator votes level i with probability p_level[i]; every level's classifier votes
    class c with probability p_class[c] (p_class[p][c] on branch p of a DRS pair)."""
    rng, results = np.random.default_rng(seed), []
    for _ in range(reps):
        task = make_task(router)
        while (wanted := task.request()) is not None:
            if wanted.smoothed is router.estimator:
                probs = [p_level]
            else:
                assert wanted.smoothed in router.classifiers and wanted.key is None
                probs = p_class if np.ndim(p_class) == 2 else [p_class] * len(wanted.draws)
            votes = [rng.multinomial(d, p) for d, p in zip(wanted.draws, probs, strict=True)]
            task.observe(np.stack(votes))
        results.append(task.result())
    return results


def true_radius(router, p_level, p_class) -> tuple[int, float]:
    """σ(x)'s level and min(R_σ, R_c) for class 0 (the radii of the true probabilities)."""
    top = int(np.argmax(p_level))
    r_sigma = router.estimator_sigma * norm.ppf(p_level[top])
    clf = router.classifiers[top]
    if len(clf.sigmas) == 1:
        r_c = clf.sigmas[0] * norm.ppf(p_class[0])
    else:
        r_c = drs_radius(p_class[0][0], p_class[1][0], *clf.sigmas)
    return top, min(r_sigma, r_c)


def false_rate(results: list, top: int, truth: float) -> float:
    """Share of certificates with the wrong class, the wrong level, or a radius the truth does
    not reach (an estimate's R > truth; a radius test's certified r >= truth)."""

    def false(r) -> bool:
        if r.prediction == ABSTAIN:
            return False
        reach = r.radius >= truth if hasattr(r, "outcomes") else r.radius > truth
        return r.prediction != 0 or r.level != top or reach

    return float(np.mean([false(r) for r in results]))


def estimate(router):
    # tol = 0: every look up to max_n is a chance for a running maximum to overshoot.
    return RoutedEstimate(router, 20, 2000, ALPHA, tol=0.0, **LOOKS)


def radius_test(grid):
    # beta tiny: no futility stop, every look is a chance to reject a true null.
    return lambda router: RoutedRadiusTest(router, grid, 20, 2000, ALPHA, beta=1e-12, **LOOKS)


GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
P_075 = norm.cdf(0.75)  # σ_e Φ⁻¹(p) = 0.75: the estimator's null at r = 0.75 holds with equality
P_1 = norm.cdf(1.0)  # at σ = 0.5: the classifier's null at r = 0.5 holds with equality
SCENARIOS = {
    # R_σ = 0.84 < R_c = 1.55: the estimator is the bottleneck.
    "estimate-estimator-bottleneck": (estimate, [0.1, 0.8, 0.1], [0.999, 0.001], None),
    # R_c = 0.84 < R_σ = 1.88: the classifier at σ = 1 is, capped at R_σ.
    "estimate-classifier-bottleneck": (estimate, [0.01, 0.02, 0.97], [0.8, 0.2], None),
    # R_σ = R_c = 1.04: both stages near the truth.
    "estimate-both-near": (estimate, [0.1, 0.05, 0.85], [0.85, 0.1, 0.05], None),
    # The selection often picks level 2 (0.43): certifying it would name the wrong level.
    "estimate-level-near-half": (estimate, [0.05, 0.52, 0.43], [0.9, 0.1], None),
    # A DRS pair at σ/√2 serves level 1: R_c = 0.53 from (0.9, 0.8) per branch.
    "estimate-drs-expert": (estimate, [0.1, 0.85, 0.05], [[0.9, 0.1], [0.8, 0.2]], 1),
    "radius-estimator-boundary": (
        radius_test(GRID),
        [0.1, P_075, 0.9 - P_075],
        [0.999, 0.001],
        None,
    ),
    "radius-classifier-boundary": (radius_test(GRID[:4]), [0.01, 0.97, 0.02], [P_1, 1 - P_1], None),
}
CAUGHT = [  # where a stage's bound that ignores the looks overshoots often enough to be seen
    "estimate-estimator-bottleneck",
    "estimate-classifier-bottleneck",
    "radius-estimator-boundary",
    "radius-classifier-boundary",
]


def scenario_rate(name: str, reps: int = REPS) -> float:
    make_task, p_level, p_class, drs_level = SCENARIOS[name]
    classes = len(p_class) if np.ndim(p_class) == 1 else len(p_class[0])
    router = voting_router(classes, drs_level)
    results = simulate(router, make_task, p_level, p_class, reps, seed=len(name))
    assert np.mean([r.prediction != ABSTAIN for r in results]) > 0.5 or "half" in name
    return false_rate(results, *true_radius(router, p_level, p_class))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_false_certificates_at_most_alpha_under_optional_stopping(name: str) -> None:
    assert scenario_rate(name) <= binomial_ceiling(ALPHA, REPS)


def clopper_pearson_lower(k, n, alpha, prior=None) -> np.ndarray:
    """The fixed-n Clopper–Pearson lower bound at the level passed, as if n were fixed."""
    k, n = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    return np.where(k > 0, beta_law.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)


def clopper_pearson_test(k, n, p0, alternative="greater", prior=None) -> np.ndarray:
    """A stand-in for the mixture e-value: +inf where Clopper–Pearson at a stage's level
    (ALPHA/2) clears p0, so the test "rejects"; -inf elsewhere; no futility side."""
    k, n, p0 = np.broadcast_arrays(np.asarray(k), np.asarray(n), np.asarray(p0))
    if alternative == "less":
        return np.full(k.shape, -np.inf)
    return np.where(clopper_pearson_lower(k, n, ALPHA / 2) > p0, np.inf, -np.inf)


@pytest.mark.parametrize("name", CAUGHT)
def test_negative_control_repeated_clopper_pearson(monkeypatch, name: str) -> None:
    """Each stage's bound recomputed at every look at its own level (alpha/2, alpha/4 per DRS
    branch), as if n had been fixed: false certificates far above alpha (0.33-0.40 here), and
    the check above catches it."""
    monkeypatch.setattr(sequential, "mixture_lower_bound", clopper_pearson_lower)
    monkeypatch.setattr(at_radius, "mixture_log_e_value", clopper_pearson_test)
    assert scenario_rate(name) > binomial_ceiling(ALPHA, REPS)
