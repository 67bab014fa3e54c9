"""Stage 1 of the σ-selector's sequential CERTIFY (sigma_selector_sequential.py): is the level
σ(x') = Q(median of h(x' + ε, λ)) the same q on the whole budget ball around x? Answered by two
anytime-valid binomial tests on the selector's draws, which vote for their level cells.

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
lower sample median y₍⌈n0/2⌉₎ of n0 selection draws in a sample-index range of their own
(MEDIAN_SELECTION_OFFSET), independent of the test draws, so the nulls are fixed given q.
(The claim needs only the test whose null is true, Berger's intersection-union argument, so
max(α_l, α_u) would do; the split of SigmaSelectorClassifier.alphas is kept so that the fixed-n
and the sequential certificates spend α alike.) Futility: the opposite nulls (F(m_{q-1}) <= p̲,
F(m_q) >= p̄) tested at beta stop an input whose level cannot be certified; that only abstains,
so it spends none of α.

Votes. A view v votes for the cell Q(h(v, λ)) (SelectorCells, compared in float64 as quantize
does), so n draws give the counts #{Q(y_j) = c}, and k = #{y_j <= m_q} = Σ_{c <= q} votes[c]
exactly. Through level_cells the selector is a smoothed classifier over the L cells, whose draws
go through the samplers of a base classifier (sequential.run, packed.certify_packed). A view
whose output is not finite raises: counting it for no cell would lower k_l, which the lower
side's test must not see.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from ..median import MEDIAN_CERTIFY_OFFSET, MEDIAN_SELECTION_OFFSET
from ..stats import DEFAULT_PRIOR, MixturePrior, mixture_rejects
from .rs import SmoothedClassifier
from .sampling import MAX_DRAWS, check_positive_int, check_sigma, is_real
from .sequential import FIRST_LOOK, GROWTH, Request, _check_growth, look_schedule
from .sigma_selector import SigmaSelectorClassifier, check_lambda, level_midpoints


class SelectorCells(nn.Module):
    """views (B, C, H, W) -> one-hot (B, L) of the level cell of h(view, λ)."""

    def __init__(self, selector: nn.Module, levels, lam: float) -> None:
        super().__init__()
        self.selector = selector
        self.lam = check_lambda(lam)
        self.num_levels = len(levels)
        self.register_buffer(
            "midpoints", torch.from_numpy(level_midpoints(levels)), persistent=False
        )

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        lam = torch.full((views.shape[0],), self.lam, device=views.device)
        values = self.selector(views, lam)
        if values.shape != (views.shape[0],):
            raise ValueError(
                f"the selector must return one value per view, shape ({views.shape[0]},), got "
                f"{tuple(values.shape)}"
            )
        if not bool(torch.isfinite(values).all()):
            raise ValueError("the selector (its σ) gave a non-finite output for a noisy view")
        midpoints = self.midpoints.to(views.device)
        # right=False: the number of midpoints strictly below the value, as quantize's "left".
        cells = torch.searchsorted(midpoints, values.double().contiguous(), right=False)
        return nn.functional.one_hot(cells, self.num_levels).float()


_CELLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def level_cells(model: SigmaSelectorClassifier, lam: float) -> SmoothedClassifier:
    """The smoothed classifier that draws the selector's views (noise s, sample indices as in
    median.sample_outputs) and votes their level cells at λ; one per (model, λ), so that the
    images of a packed batch share its model call."""
    if not isinstance(model, SigmaSelectorClassifier):
        raise TypeError(f"model must be a SigmaSelectorClassifier, got {type(model).__name__}")
    lam = check_lambda(lam)
    per_model = _CELLS.setdefault(model, {})
    if lam not in per_model:
        cells = SelectorCells(model.selector, model.levels, lam)
        per_model[lam] = SmoothedClassifier(cells, len(model.levels), model.selector_noise)
    return per_model[lam]


CERTIFIED, FUTILE, UNDECIDED = "certified", "futile", "undecided"
N0_H, MAX_N_H = 16, 1000


def _check_level(name: str, value: object) -> float:
    if not is_real(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a real number in the open interval (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LevelResult:
    """Stage 1's answer. level: the index of the level certified constant on the D-ball, or -1;
    candidate: the level the selection draws picked (-1 before they ran); outcome CERTIFIED,
    FUTILE (a futility test stopped it) or UNDECIDED (max_n spent). selection: the selection
    draws per level cell (empty without selection draws). below_lower, below_upper: the test
    draws at or below m_{q-1} and m_q (k_l, k_u), counted until that side's test decided (0 for
    a side that holds trivially)."""

    level: int
    candidate: int
    outcome: str
    selection: tuple[int, ...]
    n0: int
    draws: int
    below_lower: int
    below_upper: int

    @property
    def forward_passes(self) -> int:
        return self.n0 + self.draws


class SelectorLevelTest:
    """Stage 1 as a state machine fed with the selector's votes: request() names the sample
    indices wanted next (Request(offset, (num,))), observe() takes their votes per level cell
    (1, L) (the counts of Q(h(x + ε_j)), SelectorCells), until request() returns None;
    result() is then the answer (module docstring for the tests).

    n0 selection draws pick the candidate q = Q(lower sample median); the test draws follow in looks
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
        self.selection: tuple[int, ...] = ()
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

    def observe(self, counts: np.ndarray) -> None:
        """The votes (1, L) per level cell of the draws of the last request."""
        if self.finished:
            raise RuntimeError("observe() called on a finished test")
        counts = np.asarray(counts)
        wanted = self._next.draws[0]
        if (
            counts.shape != (1, len(self.levels))
            or not np.issubdtype(counts.dtype, np.integer)
            or (counts < 0).any()
            or counts.sum() != wanted
        ):
            raise ValueError(
                f"counts must be the votes per level cell of the {wanted} draws requested: "
                f"integers >= 0 of shape (1, {len(self.levels)}) summing to {wanted}, got "
                f"{counts.dtype} {counts.shape} summing to {counts.sum()}"
            )
        votes = counts[0].astype(np.int64)
        if self.candidate < 0:
            self._select(votes)
        else:
            self._test(votes)
        if self.finished:
            return
        drawn = self.looks[self._looks_done - 1] if self._looks_done else 0
        step = self.looks[self._looks_done] - drawn
        self._next = Request(MEDIAN_CERTIFY_OFFSET + drawn, (step,))

    def _select(self, votes: np.ndarray) -> None:
        # Selection draws only pick q; they never enter a test. Q(y₍⌈n0/2⌉₎): Q is monotone, so
        # the cell holding the lower median is the first whose cumulative count reaches ⌈n0/2⌉.
        self.selection = tuple(votes.tolist())
        self.candidate = int(np.searchsorted(np.cumsum(votes), (self.n0 + 1) // 2))
        self.lower_ok = self.candidate == 0  # no m_{-1}: (L) holds trivially
        self.upper_ok = self.candidate == len(self.levels) - 1  # no m_{L-1}: (U) does

    def _test(self, votes: np.ndarray) -> None:
        q = self.candidate
        # #{y <= m_q} = the votes of cells 0..q (Q(y) <= q iff y <= m_q).
        if not self.lower_ok:
            self.below_lower += int(votes[:q].sum())
        if not self.upper_ok:
            self.below_upper += int(votes[: q + 1].sum())
        self.used += int(votes.sum())
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
            selection=self.selection,
            n0=self.n0,
            draws=self.used,
            below_lower=self.below_lower,
            below_upper=self.below_upper,
        )
