"""Sequential CERTIFY for the σ-selector (sigma_selector.py; docs/methods.md §2, §3): the level
is shown constant on the budget ball by two anytime-valid binomial tests on the selector's
outputs, then the classifier at that level is certified by RadiusEstimate (sequential.py), each
stage drawing only as many samples as its answer needs.

Notation (median.py). F(t) = P(h(x + ε, λ) <= t), ε ~ N(0, s² I); G_p(x) = inf{t : F(t) >= p};
p̲ = Φ(−D/s), p̄ = Φ(D/s). The levels' midpoints m_0 < ... < m_{L-2} (m_q halfway between levels
q and q + 1, as quantize computes them) give Q(v) = q iff m_{q-1} < v <= m_q, with m_{-1} = −∞
and m_{L-1} = +∞ (a value halfway between two levels goes to the lower one).

Stage 1: when is σ(x') = Q(G_½(x')) equal to q on the whole D-ball? For ‖x' − x‖ <= D,
Φ⁻¹(F_x'(t)) differs from Φ⁻¹(F_x(t)) by at most D/s at every t (median.py), so
  (U) F_x(m_q) >= p̄      ⇒ F_x'(m_q) >= ½     ⇒ G_½(x') <= m_q       (G_½ is an inf over such t);
  (L) F_x(m_{q-1}) < p̲   ⇒ F_x'(m_{q-1}) < ½  ⇒ G_½(x') > m_{q-1}   (F is right-continuous, so
      G_½(x') <= m_{q-1} would give F_x'(m_{q-1}) >= ½).
(U) and (L) give m_{q-1} < G_½(x') <= m_q, i.e. σ(x') = q, on the whole ball; they are
G_p̄(x) <= m_q and G_p̲(x) > m_{q-1}, the fixed-n method's condition on its order statistics. At
an end level the missing side holds trivially (q = 0: no (L); q = L − 1: no (U)).

The tests. Fresh draws y_j = h(x + ε_j) give i.i.d. indicators 1{y_j <= m}, Bernoulli(F_x(m)):
  lower: H0_l: F(m_{q-1}) >= p̲, the mixture test with alternative "less" at α_l, on
         k_l = #{y_j <= m_{q-1}} (the null includes equality: (L) needs F < p̲ strictly);
  upper: H0_u: F(m_q) < p̄, through the mixture test of the larger null F(m_q) <= p̄ (alternative
         "greater") at α_u, on k_u = #{y_j <= m_q} (values equal to m_q count: Q(m_q) = q).
Each is a nonnegative supermartingale under its null, so by Ville's inequality it rejects a true
null at some look, whatever the looks and the stopping rule, with probability at most its level.
q is certified once both have rejected. If σ is not q everywhere on the ball, (U) or (L) fails
at x, so H0_u or H0_l is true and its test rejected: probability <= α_u or α_l. q is Q of the
sample median of n0 selection draws in a sample-index range of their own (MEDIAN_SELECTION_OFFSET),
independent of the test draws, so the nulls are fixed given q. (The claim needs only the test
whose null is true, Berger's intersection-union argument, so max(α_l, α_u) would do; the split of
SigmaSelectorClassifier.alphas is kept so that the fixed-n and the sequential certificates spend
α alike.) Futility: the opposite nulls (F(m_{q-1}) <= p̲, F(m_q) >= p̄) tested at beta stop an
input whose level cannot be certified; that only abstains, so it spends none of α.

Stage 2: RadiusEstimate on g_q at α_c with cap = D: it stops once its radius reaches D, since
R = min(D, R_c) gains nothing beyond. Its draws are the classifier's own ranges (below 2^49 +
2^48), apart from the selector's (from 2^55 on): the stages never share a noise value, and the
whole result depends only on (seed, stream).

Union bound: a false certificate needs σ not constant q on the D-ball (at most α_l + α_u) or the
radius of g_q failing for the q the stage ran at (at most α_c, given q), so it has probability at
most α_l + α_u + α_c = α.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ..median import MEDIAN_CERTIFY_OFFSET, MEDIAN_SELECTION_OFFSET
from ..stats import DEFAULT_PRIOR, MixturePrior, mixture_rejects
from .sampling import MAX_DRAWS, check_positive_int, check_sigma, resolve_seed
from .sequential import (
    FIRST_LOOK,
    GROWTH,
    RadiusEstimate,
    Request,
    _check_growth,
    look_schedule,
    run,
)
from .sigma_selector import SigmaSelectorClassifier, check_lambda, quantize

__all__ = [
    "CERTIFIED",
    "FUTILE",
    "UNDECIDED",
    "LevelResult",
    "SelectorLevelTest",
    "SequentialSelectorCertificate",
    "certify_selector_sequential",
    "level_midpoints",
]

ABSTAIN = SigmaSelectorClassifier.ABSTAIN
CERTIFIED, FUTILE, UNDECIDED = "certified", "futile", "undecided"
N0_H, MAX_N_H = 16, 1000


def level_midpoints(levels: Sequence[float]) -> np.ndarray:
    """(L − 1,) m_q halfway between levels q and q + 1, in float64 exactly as quantize computes
    them, so that quantize(v) = q iff m_{q-1} < v <= m_q."""
    return (np.asarray(levels[1:], dtype=np.float64) + np.asarray(levels[:-1])) / 2


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_level(name: str, value: object) -> float:
    if not _is_real(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a real number in the open interval (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LevelResult:
    """Stage 1's answer. level: the index of the level certified constant on the D-ball, or -1;
    candidate: the level the selection draws picked (-1 before they ran); outcome CERTIFIED,
    FUTILE (a futility test stopped it) or UNDECIDED (max_n spent). median: the selection draws'
    sample median (a diagnostic with no guarantee; nan without selection draws). below_lower,
    below_upper: the test draws at or below m_{q-1} and m_q (k_l, k_u), counted until that
    side's test decided (0 for a side that holds trivially)."""

    level: int
    candidate: int
    outcome: str
    median: float
    n0: int
    draws: int
    below_lower: int
    below_upper: int

    @property
    def forward_passes(self) -> int:
        return self.n0 + self.draws


class SelectorLevelTest:
    """Stage 1 as a state machine fed with selector outputs: request() names the sample indices
    wanted next (Request(offset, (num,))), observe() takes their values h(x + ε_j), until
    request() returns None; result() is then the answer (module docstring for the tests).

    n0 selection draws pick the candidate q = Q(sample median); the test draws follow in looks
    of growing size (sequential.look_schedule) up to max_n, each look taking the next unused
    indices from MEDIAN_CERTIFY_OFFSET. beta: the futility tests' level (None: each side's own
    alpha). With a single level σ is constant everywhere and no draw is needed.
    """

    def __init__(
        self,
        levels: Sequence[float],
        budget: float,
        noise: float,
        n0: int,
        max_n: int,
        alpha_lower: float,
        alpha_upper: float,
        *,
        beta: float | None = None,
        first_look: int = FIRST_LOOK,
        growth: float = GROWTH,
        prior: MixturePrior = DEFAULT_PRIOR,
    ) -> None:
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
            raise ValueError(f"levels must be a non-empty sequence of σ values, got {levels!r}")
        self.levels = [check_sigma(s, f"levels[{i}]") for i, s in enumerate(levels)]
        if any(b <= a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"levels must be strictly increasing, got {self.levels}")
        self.budget = check_sigma(budget, "budget (D)")
        self.noise = check_sigma(noise, "noise (s)")
        self.n0 = check_positive_int("n0_h (selection draws of the selector)", n0, MAX_DRAWS)
        self.max_n = check_positive_int("max_n_h (test draws of the selector)", max_n, MAX_DRAWS)
        self.alpha_lower = _check_level("alpha_lower", alpha_lower)
        self.alpha_upper = _check_level("alpha_upper", alpha_upper)
        self.beta_lower = self.alpha_lower if beta is None else _check_level("beta", beta)
        self.beta_upper = self.alpha_upper if beta is None else self.beta_lower
        if not isinstance(prior, MixturePrior):
            raise ValueError(f"prior must be a drs_ext.stats.MixturePrior, got {prior!r}")
        self.prior = prior
        self.looks = look_schedule(
            self.max_n, check_positive_int("first_look", first_look), _check_growth(growth)
        )
        ratio = self.budget / self.noise
        self.p_low, self.p_high = float(norm.sf(ratio)), float(norm.cdf(ratio))
        if self.p_high >= 1.0 and len(self.levels) > 1:
            # Rounding p̄ down would make the upper test unsound; no sample size could reach it.
            raise ValueError(
                f"budget (D) / noise (s) = {ratio:g} is too large: p̄ = Φ(D/s) rounds to 1, so no "
                "number of selector draws can certify a level (D/s must be below about 8)"
            )
        self.midpoints = level_midpoints(self.levels)
        self.candidate = -1
        self.median = math.nan
        self.used = self.below_lower = self.below_upper = 0
        self.lower_ok = self.upper_ok = self.futile = False
        self.finished = False
        self._looks_done = 0
        self._next: Request | None = Request(MEDIAN_SELECTION_OFFSET, (self.n0,))
        if len(self.levels) == 1:  # nothing to test: σ is the one level everywhere
            self.candidate, self.n0 = 0, 0
            self.lower_ok = self.upper_ok = self.finished = True

    def request(self) -> Request | None:
        return None if self.finished else self._next

    def observe(self, values: np.ndarray) -> None:
        """The selector's outputs (num,) at the sample indices of the last request."""
        if self.finished:
            raise RuntimeError("observe() called on a finished test")
        values = np.asarray(values, dtype=np.float64)
        wanted = self._next.draws[0]
        if values.shape != (wanted,):
            raise ValueError(
                f"values must be the {wanted} selector outputs requested, shape ({wanted},), "
                f"got shape {values.shape}"
            )
        if not np.isfinite(values).all():
            raise ValueError("values must be finite selector outputs, found NaN or Inf")
        if self.candidate < 0:
            self._select(values)
        else:
            self._test(values)
        if self.finished:
            return
        drawn = self.looks[self._looks_done - 1] if self._looks_done else 0
        step = self.looks[self._looks_done] - drawn
        self._next = Request(MEDIAN_CERTIFY_OFFSET + drawn, (step,))

    def _select(self, values: np.ndarray) -> None:
        # Selection draws only pick q; they never enter a test.
        self.median = float(np.median(values))
        self.candidate = int(quantize(self.median, self.levels))
        self.lower_ok = self.candidate == 0  # no m_{-1}: (L) holds trivially
        self.upper_ok = self.candidate == len(self.levels) - 1  # no m_{L-1}: (U) does

    def _test(self, values: np.ndarray) -> None:
        q = self.candidate
        if not self.lower_ok:
            self.below_lower += int(np.count_nonzero(values <= self.midpoints[q - 1]))
        if not self.upper_ok:
            self.below_upper += int(np.count_nonzero(values <= self.midpoints[q]))
        self.used += values.size
        self._looks_done += 1
        k_l, k_u, n, prior = self.below_lower, self.below_upper, self.used, self.prior
        # The futility tests (the opposite nulls, at beta) only ever abstain: they spend no α.
        if not self.lower_ok:
            # H0_l: F(m_{q-1}) >= p̲ rejected at α_l: (L) holds unless this test erred.
            self.lower_ok = mixture_rejects(k_l, n, self.p_low, self.alpha_lower, "less", prior)
            self.futile |= not self.lower_ok and mixture_rejects(
                k_l, n, self.p_low, self.beta_lower, "greater", prior
            )
        if not self.upper_ok:
            # H0: F(m_q) <= p̄ (which contains H0_u: F(m_q) < p̄) rejected at α_u: (U) holds.
            self.upper_ok = mixture_rejects(k_u, n, self.p_high, self.alpha_upper, "greater", prior)
            self.futile |= not self.upper_ok and mixture_rejects(
                k_u, n, self.p_high, self.beta_upper, "less", prior
            )
        done = self.lower_ok and self.upper_ok
        self.finished = done or self.futile or self._looks_done >= len(self.looks)

    def result(self) -> LevelResult:
        if not self.finished:
            raise RuntimeError("result() called before the test finished")
        certified = self.lower_ok and self.upper_ok
        outcome = CERTIFIED if certified else FUTILE if self.futile else UNDECIDED
        return LevelResult(
            level=self.candidate if certified else -1,
            candidate=self.candidate,
            outcome=outcome,
            median=self.median,
            n0=self.n0,
            draws=self.used,
            below_lower=self.below_lower,
            below_upper=self.below_upper,
        )


@dataclass(frozen=True)
class SequentialSelectorCertificate:
    """What each stage of the sequential CERTIFY found.

    prediction is ABSTAIN (-1) with radius 0.0 when either stage abstains. sigma: the level q
    certified constant on the D-ball (nan when stage 1 did not certify one; stage 2 then did not
    run and radius_c is nan). radius_c: the classifier stage's radius at q (radius = min(D,
    radius_c) when it is > 0). selector: stage 1's LevelResult (outcome, median, draws);
    classifier_n0 and classifier_draws: stage 2's selection draws per branch and estimation
    draws of each branch (0 and () when it did not run).
    """

    prediction: int
    radius: float
    lam: float
    budget: float
    sigma: float
    radius_c: float
    selector: LevelResult
    classifier_n0: int
    classifier_draws: tuple[int, ...]

    @property
    def selector_forward_passes(self) -> int:
        """Selector calls: selection draws plus test draws."""
        return self.selector.forward_passes

    @property
    def classifier_forward_passes(self) -> int:
        """Base-classifier calls over all branches: n0 per branch plus the estimation draws."""
        return self.classifier_n0 * len(self.classifier_draws) + sum(self.classifier_draws)

    @property
    def forward_passes(self) -> int:
        return self.selector_forward_passes + self.classifier_forward_passes


def certify_selector_sequential(
    model: SigmaSelectorClassifier,
    x: torch.Tensor,
    n0: int,
    max_n: int,
    alpha: float,
    batch_size: int,
    *,
    lam: float,
    n0_h: int = N0_H,
    max_n_h: int = MAX_N_H,
    tol: float = 0.01,
    beta: float | None = None,
    seed: int | None = None,
    stream: int = 0,
    first_look: int = FIRST_LOOK,
    growth: float = GROWTH,
    prior: MixturePrior = DEFAULT_PRIOR,
) -> SequentialSelectorCertificate:
    """model.certify_details with both stages sequential: g is constant with the returned class
    on the l2 ball of the returned radius (<= D) with probability at least 1 - alpha.

    Stage 1 (SelectorLevelTest): n0_h selection draws of the selector, then at most max_n_h
    test draws at α_l + α_u; beta is its futility level (None: each side's α). Stage 2: at most
    max_n estimation draws per branch of the classifier at the certified level (after its n0
    selection draws), RadiusEstimate at α_c with tolerance tol and cap D. (α_l, α_u, α_c) =
    model.alphas(alpha). seed and stream key every draw of both stages (seed None: one fresh
    seed from torch's default generator for the whole call); first_look, growth and prior
    apply to both stages.
    """
    if not isinstance(model, SigmaSelectorClassifier):
        raise TypeError(f"model must be a SigmaSelectorClassifier, got {type(model).__name__}")
    lam = check_lambda(lam)
    # α_l + α_u + α_c = alpha: the union bound of the module docstring.
    alpha_l, alpha_u, alpha_c = model.alphas(alpha)
    # Stage 2's own arguments are checked before stage 1 spends any draw.
    check_positive_int("n0", n0, MAX_DRAWS)
    check_positive_int("max_n", max_n, MAX_DRAWS)
    batch_size = check_positive_int("batch_size", batch_size)
    if not _is_real(tol) or not tol >= 0:
        raise ValueError(f"tol must be a real number >= 0, got {tol!r}")
    seed = resolve_seed(seed)
    level_test = SelectorLevelTest(
        model.levels,
        model.budget,
        model.selector_noise,
        n0_h,
        max_n_h,
        alpha_l,
        alpha_u,
        beta=beta,
        first_look=first_look,
        growth=growth,
        prior=prior,
    )
    while (wanted := level_test.request()) is not None:
        values = model.selector_samples(
            x, wanted.draws[0], lam, batch_size, seed=seed, stream=stream, offset=wanted.offset
        )
        level_test.observe(values)
    stage1 = level_test.result()
    common = dict(lam=lam, budget=model.budget, selector=stage1)
    if stage1.level < 0:
        return SequentialSelectorCertificate(
            ABSTAIN,
            0.0,
            sigma=math.nan,
            radius_c=math.nan,
            classifier_n0=0,
            classifier_draws=(),
            **common,
        )
    smoothed = model.smoothed_at(stage1.level)
    task = RadiusEstimate(
        smoothed,
        n0,
        max_n,
        alpha_c,
        tol=tol,
        cap=model.budget,
        first_look=first_look,
        growth=growth,
        prior=prior,
    )
    estimate = run(smoothed, x, task, batch_size, seed=seed, stream=stream)
    certified = estimate.prediction != ABSTAIN  # RadiusEstimate abstains exactly when R_c <= 0
    return SequentialSelectorCertificate(
        estimate.prediction if certified else ABSTAIN,
        min(model.budget, estimate.radius) if certified else 0.0,
        sigma=model.levels[stage1.level],
        radius_c=estimate.radius,
        classifier_n0=estimate.n0,
        classifier_draws=estimate.draws,
        **common,
    )
