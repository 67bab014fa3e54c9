"""σ-routing: the noise level chosen per input by a smoothed σ-estimator (Sun, Mao, Vechev,
"Dual Randomized Smoothing: Beyond Global Noise Variance", ICLR 2026, their "Dual RS"; not to be
confused with DRS, the spatial dual smoothing of smoothing/drs.py).

Two stages. The estimator is a smoothed classifier over a finite set Σ of noise levels, smoothed
at its own σ_e; the classifier stage is, per level, a smoothed classifier at that level (one
expert per level, or one σ-aware model for all of them; RS or a DRS pair). The routed classifier
is g(x) = g_{σ(x)}(x) with σ(x) the estimator's smoothed top level.

Certificate (docs/methods.md §1): if σ(·) is constant on B(x, R_σ) and g_σ̂ is constant on
B(x, R_c), then g is constant on B(x, min(R_σ, R_c)). Each stage is certified at α/2, so both
certificates hold at once with probability at least 1 − α (a union bound: no independence of the
stages is needed). Either stage abstaining abstains.

Noise counters: the classifier stage draws with the caller's seed (so its certificate is the one
a plain classifier at σ̂ would give), the estimator with a key derived from it
(`estimator_seed`), so the two stages never share a Philox counter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rs import SmoothedClassifier
from .sampling import BranchSmoothing, check_alpha, check_sigma, resolve_seed


def estimator_seed(seed: int) -> int:
    """The 63-bit Philox key of the estimator's draws for a user seed: a hash, so it equals no
    small user seed and no classifier-stage key."""
    digest = hashlib.blake2b(f"drs_ext.sigma-routing.estimator:{seed}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def check_levels(levels: Sequence[float]) -> list[float]:
    """Σ: a non-empty, strictly increasing sequence of finite σ > 0."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"levels must be a non-empty sequence of σ values, got {levels!r}")
    values = [check_sigma(s, f"levels[{i}]") for i, s in enumerate(levels)]
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(
            f"levels must be strictly increasing (sorted, no duplicates), got {values}"
        )
    return values


@dataclass(frozen=True)
class RoutedCertificate:
    """What each stage certified. prediction = ABSTAIN (-1) when either stage abstains;
    level is the index of σ̂ in Σ (-1 when the estimator abstains, and then the classifier stage
    is not run: radius_c and p_lower_c are nan)."""

    prediction: int
    radius: float
    level: int
    sigma: float
    radius_sigma: float
    radius_c: float
    p_lower_sigma: tuple[float, ...]
    p_lower_c: tuple[float, ...]


class SigmaRoutedClassifier:
    """g(x) = g_{σ(x)}(x): the estimator's smoothed top level σ(x) ∈ Σ routes x to the smoothed
    classifier at that level.

    estimator: a base classifier with len(levels) outputs (class i = levels[i]), smoothed with
    N(0, estimator_sigma² I) noise; a list of models is an ensemble. classifiers: one smoothed
    classifier per level (SmoothedClassifier or DualSmoothedClassifier, each at its level's σ).
    """

    ABSTAIN = -1

    def __init__(
        self,
        estimator: torch.nn.Module | Sequence[torch.nn.Module],
        levels: Sequence[float],
        estimator_sigma: float,
        classifiers: Sequence[BranchSmoothing],
        **model_call_options: object,
    ) -> None:
        self.levels = check_levels(levels)
        self.estimator_sigma = check_sigma(estimator_sigma, "estimator_sigma")
        if len(classifiers) != len(self.levels):
            raise ValueError(
                f"classifiers must hold one smoothed classifier per level ({len(self.levels)}), "
                f"got {len(classifiers)}"
            )
        for i, (clf, level) in enumerate(zip(classifiers, self.levels, strict=True)):
            if not isinstance(clf, BranchSmoothing):
                raise TypeError(f"classifiers[{i}] must be a smoothed classifier, got {clf!r}")
            if not _stands_for(clf, level):
                raise ValueError(
                    f"classifiers[{i}] smooths at σ = {clf.sigmas} per branch, but its level is "
                    f"{level:g} (a DRS pair stands for level σ at σ or σ/√2 per branch)"
                )
        classes = {clf.num_classes for clf in classifiers}
        if len(classes) != 1:
            raise ValueError(f"the classifiers disagree on the number of classes: {classes}")
        self.num_classes = classes.pop()
        self.classifiers = list(classifiers)
        self.estimator = SmoothedClassifier(
            estimator, len(self.levels), self.estimator_sigma, **model_call_options
        )

    def settings(self) -> dict:
        """What a result file records (drs_ext/io/settings.py): the levels, σ_e, and each
        level's classifier's own settings."""
        return {
            "method": "sigma-routing",
            "levels": list(self.levels),
            "estimator_sigma": self.estimator_sigma,
            "classifiers": [clf.settings() for clf in self.classifiers],
        }

    def max_radius(self, n: int, alpha: float) -> float:
        """The largest radius n draws per stage can certify: min of the stages' caps at α/2."""
        caps = [clf.max_radius(n, alpha / 2) for clf in self.classifiers]
        return min(self.estimator.max_radius(n, alpha / 2), max(caps))

    def certify_details(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int | None = None,
        stream: int = 0,
    ) -> RoutedCertificate:
        """Both stages' certificates; `certify` returns (prediction, radius) of it. seed=None
        draws the seed from torch's default generator (fresh noise per call, repeatable under
        torch.manual_seed), as the single-stage classifiers do."""
        alpha = check_alpha(alpha)
        seed = resolve_seed(seed)
        # Union bound: the estimator's and the classifier's certificates each fail with
        # probability at most alpha/2, so both hold with probability at least 1 - alpha.
        stage_alpha = alpha / 2
        est = self.estimator.certify_details(
            x, n0, n, stage_alpha, batch_size, seed=estimator_seed(seed), stream=stream
        )
        if est.prediction == self.ABSTAIN:
            nan = (math.nan,)
            return RoutedCertificate(
                self.ABSTAIN, 0.0, -1, math.nan, 0.0, math.nan, est.p_lower, nan
            )
        level = est.prediction
        clf = self.classifiers[level].certify_details(
            x, n0, n, stage_alpha, batch_size, seed=seed, stream=stream
        )
        certified = clf.prediction != self.ABSTAIN
        return RoutedCertificate(
            prediction=clf.prediction if certified else self.ABSTAIN,
            radius=min(est.radius, clf.radius) if certified else 0.0,
            level=level,
            sigma=self.levels[level],
            radius_sigma=est.radius,
            radius_c=clf.radius,
            p_lower_sigma=est.p_lower,
            p_lower_c=clf.p_lower,
        )

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int | None = None,
        stream: int = 0,
        sequential: bool = False,
        tol: float = 0.01,
    ) -> tuple[int, float]:
        """(class, radius) such that g is constant on the l2 ball of that radius with
        probability at least 1 - alpha, or (ABSTAIN, 0.0). Costs 2 (n0 + n) draws per branch.

        sequential=True: n is the most estimation draws per branch and stage (max_n); each
        stage draws in growing looks that stop once more draws could raise its radius by at most
        tol, or once that radius could no longer lower min(R_σ, R_c); anytime-valid bounds at
        alpha/2 per stage (sigma_routing_sequential.RoutedEstimate)."""
        if sequential:
            # sigma_routing_sequential imports this module
            from .sigma_routing_sequential import certify_routed_sequential

            est = certify_routed_sequential(
                self, x, n0, n, alpha, batch_size, tol=tol, seed=seed, stream=stream
            )
            return est.prediction, est.radius
        cert = self.certify_details(x, n0, n, alpha, batch_size, seed=seed, stream=stream)
        return cert.prediction, cert.radius

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int | None = None,
        stream: int = 0,
    ) -> int:
        """g(x), or ABSTAIN; wrong with probability at most alpha.

        Cohen et al.'s PREDICT on the estimator at alpha/2 returns a level other than σ(x) with
        probability at most alpha/2; given the right level, PREDICT of that level's classifier
        at alpha/2 is wrong with probability at most alpha/2. A union bound gives alpha.
        """
        alpha = check_alpha(alpha)
        seed = resolve_seed(seed)
        level = self.estimator.predict(
            x, n, alpha / 2, batch_size, seed=estimator_seed(seed), stream=stream
        )
        if level == self.ABSTAIN:
            return self.ABSTAIN
        return self.classifiers[level].predict(
            x, n, alpha / 2, batch_size, seed=seed, stream=stream
        )


def _stands_for(clf: BranchSmoothing, level: float) -> bool:
    """Whether a smoothed classifier serves level σ: σ on every branch, or, for a DRS pair,
    σ/√2 per branch (Xia et al.'s pairing: the same total noise energy as RS at σ)."""
    scales = (1.0, math.sqrt(len(clf.sigmas)))
    return any(
        all(math.isclose(s * scale, level, rel_tol=1e-6) for s in clf.sigmas) for scale in scales
    )
