"""σ-selector: the noise level proposed per input by a network and made provably constant by
median smoothing (Hase, Wang, Koike-Akino, Liu, Parsons, "Variational Randomized Smoothing for
Sample-Wise Adversarial Robustness", arXiv 2407.11844, their "VRS"; docs/methods.md §2).

The classifier. A selector h(x, λ) proposes a noise level. For a fixed λ the level of x is

    σ(x) = Q(G_½(x)),   G_½(x) = the median of h(x + ε, λ), ε ~ N(0, s² I),

with Q the monotone quantiser onto the grid Σ = levels (nearest level, a value halfway between
two levels going to the lower one; values beyond the ends go to the end levels, which is the
clipping). The smoothed classifier is g(x) = g_σ(x)(x), where g_σ is the base classifier smoothed
at σ (RS, or any smoothed classifier a factory builds per level). σ(·) is the exact median
function, never a sampled estimate, so g is a fixed function of x.

CERTIFY. N_h selector samples give y₍k_l₎ <= G_½(x') <= y₍k_u₎ for all x' in the ball of radius
D (drs_ext/median.py). If Q(y₍k_l₎) = Q(y₍k_u₎) = q, Q's monotonicity gives σ(x') = q on the
whole D-ball, so there g = g_q; certifying g_q at x with radius R_c gives R = min(D, R_c)
(Sun, Mao, Vechev's argument for a locally constant σ, docs/methods.md §1). Otherwise abstain.
Both stages sequential, with anytime-valid tests: sigma_selector_sequential.py.

PREDICT. The same with D = 0: [y₍k_l₎, y₍k_u₎] is a confidence interval of G_½(x) itself; if
both ends quantise to q then σ(x) = q (unless the interval failed) and Cohen et al.'s PREDICT
runs on g_q; otherwise abstain. The sample median alone would name a level with no guarantee
that it is σ(x), and PREDICT's error bound would then be about another classifier.

Noise. The selector's samples use the caller's (seed, stream) at the sample indices of
drs_ext/median.py ([2^55, 2^55 + 2^48) for CERTIFY, the next 2^48 for PREDICT); the classifier
stage uses the same (seed, stream) in its own ranges (below 2^49 + 2^48). No noise value serves
both stages, and the whole result is reproducible from (seed, stream).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..median import (
    MEDIAN_CERTIFY_OFFSET,
    MEDIAN_PREDICT_OFFSET,
    bounds_from_samples,
    median_interval_indices,
    order_statistic_bounds,
    sample_outputs,
)
from .rs import SmoothedClassifier
from .sampling import (
    BranchSmoothing,
    Classifier,
    check_alpha,
    check_positive_int,
    check_sigma,
    eval_mode,
)

__all__ = [
    "SelectorCertificate",
    "SelectorPrediction",
    "SigmaSelectorClassifier",
    "check_lambda",
    "quantize",
]


def check_lambda(lam: float) -> float:
    """λ, the selector's trade-off input: a real number in [0, 1]."""
    ok = isinstance(lam, (int, float, np.floating)) and not isinstance(lam, bool)
    if not ok or not 0.0 <= lam <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"lam (the selector's λ) must be a number in [0, 1], got {lam!r}")
    return float(lam)


def level_midpoints(levels: Sequence[float]) -> np.ndarray:
    """(L − 1,) m_q halfway between levels q and q + 1, in float64: quantize(v) = q iff
    m_{q-1} < v <= m_q."""
    return (np.asarray(levels[1:], dtype=np.float64) + np.asarray(levels[:-1])) / 2


def quantize(values: np.ndarray | float, levels: Sequence[float]) -> np.ndarray:
    """Index of Q(value) in levels: the nearest level, halfway values to the lower one.

    Monotone (non-decreasing) in value, which is what makes σ constant on the D-ball once both
    bounds land on the same level.
    """
    # side="left": the number of midpoints strictly below the value.
    midpoints = level_midpoints(levels)
    return np.searchsorted(midpoints, np.asarray(values, dtype=np.float64), side="left")


@dataclass(frozen=True)
class SelectorCertificate:
    """What each stage of CERTIFY found.

    prediction is ABSTAIN (-1) with radius 0.0 when either stage abstains. sigma is the level q
    the selector certified constant on the budget ball (nan when its bounds quantise to
    different levels; the classifier stage then does not run and radius_c is nan). sigma_lower
    and sigma_upper are the order statistics y₍k_l₎, y₍k_u₎ of the selector's samples (before
    quantisation), sigma_median their sample median (a diagnostic with no guarantee).
    """

    prediction: int
    radius: float
    lam: float
    budget: float
    sigma: float
    sigma_lower: float
    sigma_upper: float
    sigma_median: float
    radius_c: float


@dataclass(frozen=True)
class SelectorPrediction:
    """What PREDICT found: the class (or ABSTAIN), the level q it was predicted at (nan when the
    selector's interval straddles two levels), and the interval's ends and sample median."""

    prediction: int
    lam: float
    sigma: float
    sigma_lower: float
    sigma_upper: float
    sigma_median: float


class SigmaSelectorClassifier:
    """g(x) = g_σ(x)(x), σ(x) the quantised median of a selector h(·, λ) under N(0, s² I).

    selector: an nn.Module called as selector(views (B, C, H, W), lam (B,)) -> (B,) σ.
    classifier: the base classifier (an nn.Module or a list of them, an ensemble), smoothed by RS
    at each level; or a factory level -> smoothed classifier (e.g. a DRS pair at level/√2 per
    branch, or one expert per level), called once per level. levels: Σ, increasing. s =
    selector_noise; D = budget. selector_share of α goes to the selector's two bounds (half
    each), the rest to the classifier stage. model_call_options go to the RS classifiers.
    """

    ABSTAIN = -1

    def __init__(
        self,
        selector: nn.Module,
        classifier: Classifier | Callable[[float], BranchSmoothing],
        num_classes: int,
        levels: Sequence[float],
        *,
        selector_noise: float,
        budget: float,
        selector_share: float = 0.5,
        **model_call_options: object,
    ) -> None:
        if not isinstance(selector, nn.Module):
            raise TypeError(f"selector must be an nn.Module, got {type(selector).__name__}")
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
            raise ValueError(f"levels must be a non-empty sequence of σ values, got {levels!r}")
        self.levels = [check_sigma(s, f"levels[{i}]") for i, s in enumerate(levels)]
        if any(b <= a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"levels must be strictly increasing, got {self.levels}")
        self.selector = selector
        self.selector_noise = check_sigma(selector_noise, "selector_noise (s)")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"budget (D) must be a number > 0, got {budget!r}")
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget (D) must be finite and > 0, got {budget}")
        self.budget = float(budget)
        share_ok = isinstance(selector_share, (int, float)) and not isinstance(selector_share, bool)
        if not share_ok or not 0.0 < selector_share < 1.0:
            raise ValueError(f"selector_share must be in (0, 1), got {selector_share!r}")
        self.selector_share = float(selector_share)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if isinstance(classifier, nn.Module) or (
            isinstance(classifier, Sequence) and all(isinstance(m, nn.Module) for m in classifier)
        ):
            base = classifier

            def factory(level: float) -> BranchSmoothing:
                return SmoothedClassifier(base, self.num_classes, level, **model_call_options)

        elif callable(classifier):
            factory = classifier
        else:
            raise TypeError(
                "classifier must be an nn.Module, a list of them, or a factory "
                f"level -> smoothed classifier; got {type(classifier).__name__}"
            )
        self._factory = factory
        self._smoothed: dict[int, BranchSmoothing] = {}

    # -- pieces ----------------------------------------------------------------------------------

    def smoothed_at(self, level: int) -> BranchSmoothing:
        """The smoothed classifier g_σ at levels[level] (built once)."""
        if level not in self._smoothed:
            clf = self._factory(self.levels[level])
            if not isinstance(clf, BranchSmoothing):
                raise TypeError(f"the factory returned {clf!r}, not a smoothed classifier")
            if clf.num_classes != self.num_classes:
                raise ValueError(
                    f"the smoothed classifier at level {self.levels[level]:g} has "
                    f"{clf.num_classes} classes, expected {self.num_classes}"
                )
            self._smoothed[level] = clf
        return self._smoothed[level]

    def settings(self) -> dict:
        """What a result file records (drs_ext/io/settings.py): the levels Σ, D, s, the share of
        α the selector gets, and each level's classifier's own settings. λ and N_h are
        arguments of each call; the command line records them next to these."""
        return {
            "method": "sigma-selector",
            "levels": list(self.levels),
            "budget": self.budget,
            "selector_noise": self.selector_noise,
            "selector_share": self.selector_share,
            "classifiers": [self.smoothed_at(i).settings() for i in range(len(self.levels))],
        }

    def max_radius(self, n: int, alpha: float) -> float:
        """The largest radius `certify` can return with n classifier draws: D, or less when no
        level's classifier can certify D with n draws at its share α_c."""
        alpha_c = self.alphas(alpha)[2]
        caps = [self.smoothed_at(i).max_radius(n, alpha_c) for i in range(len(self.levels))]
        return min(self.budget, max(caps))

    def alphas(self, alpha: float) -> tuple[float, float, float]:
        """(α_l, α_u, α_c): the selector's lower and upper bound get selector_share·α/2 each,
        the classifier stage the rest; they sum to α (the union bound of certify/predict)."""
        alpha = check_alpha(alpha)
        side = self.selector_share * alpha / 2
        return side, side, alpha - 2 * side

    def selector_samples(
        self,
        x: torch.Tensor,
        n_h: int,
        lam: float,
        batch_size: int,
        *,
        seed: int,
        stream: int,
        offset: int,
    ) -> np.ndarray:
        """(n_h,) selector outputs h(x + s·z_j, λ), j over the sample indices from `offset`."""
        lam = check_lambda(lam)

        def h(views: torch.Tensor) -> torch.Tensor:
            return self.selector(views, torch.full((views.shape[0],), lam, device=views.device))

        with eval_mode(self.selector):
            return sample_outputs(
                h,
                x,
                n_h,
                self.selector_noise,
                batch_size=batch_size,
                seed=seed,
                stream=stream,
                offset=offset,
                name="the selector (its σ)",
            )

    # -- CERTIFY and PREDICT ---------------------------------------------------------------------

    def certify_details(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        lam: float,
        n_h: int = 100,
        seed: int = 0,
        stream: int = 0,
    ) -> SelectorCertificate:
        """Both stages of CERTIFY; `certify` returns (prediction, radius) of it.

        Union bound over three events, each of probability at most its share of alpha:
        y₍k_l₎ > G_p̲(x) (α_l), y₍k_u₎ < G_p̄(x) (α_u), and the classifier certificate of
        g_σ(x) failing (α_c). Outside all three the selector's ends quantise to q = σ(x') for
        every x' in the D-ball (in particular q = σ(x), a fixed level), and g_q is constant on
        the R_c-ball, so g is constant on the min(D, R_c)-ball. No independence between the
        stages is needed: on the first two events' complement the level is not random.
        """
        lam = check_lambda(lam)
        alpha_l, alpha_u, alpha_c = self.alphas(alpha)
        k_l, k_u = order_statistic_bounds(n_h, self.budget, self.selector_noise, alpha_l, alpha_u)
        samples = self.selector_samples(
            x, n_h, lam, batch_size, seed=seed, stream=stream, offset=MEDIAN_CERTIFY_OFFSET
        )
        ends = bounds_from_samples(samples, k_l, k_u)
        low, high = quantize([ends.lower, ends.upper], self.levels).tolist()
        stage = dict(
            lam=lam,
            budget=self.budget,
            sigma_lower=ends.lower,
            sigma_upper=ends.upper,
            sigma_median=ends.median,
        )
        if low != high:
            return SelectorCertificate(
                self.ABSTAIN, 0.0, sigma=math.nan, radius_c=math.nan, **stage
            )
        c_hat, radius_c = self.smoothed_at(low).certify(
            x, n0, n, alpha_c, batch_size, seed=seed, stream=stream
        )
        certified = c_hat != self.ABSTAIN and radius_c > 0
        return SelectorCertificate(
            c_hat if certified else self.ABSTAIN,
            min(self.budget, radius_c) if certified else 0.0,
            sigma=self.levels[low],
            radius_c=radius_c,
            **stage,
        )

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        lam: float,
        n_h: int = 100,
        seed: int = 0,
        stream: int = 0,
    ) -> tuple[int, float]:
        """(class, radius) such that g is constant on the l2 ball of that radius with
        probability at least 1 - alpha, or (ABSTAIN, 0.0). The radius never exceeds D."""
        cert = self.certify_details(
            x, n0, n, alpha, batch_size, lam=lam, n_h=n_h, seed=seed, stream=stream
        )
        return cert.prediction, cert.radius

    def predict_details(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        lam: float,
        n_h: int = 100,
        seed: int = 0,
        stream: int = 0,
    ) -> SelectorPrediction:
        """PREDICT with the level it used; `predict` returns its class.

        Union bound: the interval [y₍k_l₎, y₍k_u₎] misses G_½(x) with probability at most
        α_l + α_u; when it holds and both ends quantise to q, q = σ(x), and Cohen et al.'s
        PREDICT on g_σ(x) at α_c returns a class other than g(x) with probability at most α_c.
        """
        lam = check_lambda(lam)
        alpha_l, alpha_u, alpha_c = self.alphas(alpha)
        k_l, k_u = median_interval_indices(n_h, alpha_l, alpha_u)
        samples = self.selector_samples(
            x, n_h, lam, batch_size, seed=seed, stream=stream, offset=MEDIAN_PREDICT_OFFSET
        )
        ends = bounds_from_samples(samples, k_l, k_u)
        low, high = quantize([ends.lower, ends.upper], self.levels).tolist()
        stage = dict(lam=lam, sigma_lower=ends.lower, sigma_upper=ends.upper)
        if low != high:
            return SelectorPrediction(
                self.ABSTAIN, sigma=math.nan, sigma_median=ends.median, **stage
            )
        c_hat = self.smoothed_at(low).predict(x, n, alpha_c, batch_size, seed=seed, stream=stream)
        return SelectorPrediction(c_hat, sigma=self.levels[low], sigma_median=ends.median, **stage)

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        lam: float,
        n_h: int = 100,
        seed: int = 0,
        stream: int = 0,
    ) -> int:
        """g(x), or ABSTAIN; a class other than g(x) with probability at most alpha."""
        return self.predict_details(
            x, n, alpha, batch_size, lam=lam, n_h=n_h, seed=seed, stream=stream
        ).prediction

    def sigma_estimate(
        self,
        x: torch.Tensor,
        *,
        lam: float,
        n_h: int = 100,
        batch_size: int = 1000,
        seed: int = 0,
        stream: int = 0,
    ) -> float:
        """Q(sample median of h): the level x most likely gets, as a point estimate with no
        guarantee. The attack's fixed-σ threat model holds σ there (drs_ext/attack.py)."""
        samples = self.selector_samples(
            x, n_h, lam, batch_size, seed=seed, stream=stream, offset=MEDIAN_PREDICT_OFFSET
        )
        return self.levels[int(quantize(np.median(samples), self.levels))]
