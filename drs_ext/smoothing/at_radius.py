"""Certify at a radius: "is g constant with class ĉ on the l2 ball of radius r?", answered by an
anytime-valid sequential test that stops as soon as the answer is clear (docs/methods.md §3), for
one radius or a grid. RS (P = 1) and DRS (P = 2); the draws and looks are sequential.py's.

The α accounting (the tests are drs_ext.stats's mixture tests, valid at every look by Ville):

RS. One test per radius of H0: p(ĉ) <= Φ(r/σ) at level alpha.
DRS. g is robust at r iff aₗ + aᵣ > s = r·√(σₗ⁻² + σᵣ⁻²), aₚ = Φ⁻¹(pₚ(ĉ)) (docs/design.md §2.4).
  Thresholds tₗ + tᵣ = s are fixed from the selection draws, which are independent of the
  estimation draws; branch p tests H0ₚ: aₚ <= tₚ at level alpha, and r is certified when both
  reject. If in truth aₗ + aᵣ <= s, then aₗ <= tₗ or aᵣ <= tᵣ: one of the two nulls is true, and
  both reject only if that one does, with probability <= alpha. This is the intersection-union
  test (Berger, "Multiparameter hypothesis testing and acceptance sampling", Technometrics 1982):
  a union bound over the two branches in which the branch whose null holds carries the whole
  alpha, so neither branch needs alpha/2.
Grid r₁ < r₂ < ...: the nulls are nested (a true null at rⱼ is true at every larger radius), so
  the radii are claimed in order (fixed-sequence testing): rⱼ is certified only when every rᵢ,
  i <= j, is. A false claim anywhere needs a rejection of the first true null in that order,
  which has probability <= alpha: the whole curve holds at level alpha, with no split.
NOT_ROBUST. A futility test of the opposite null (pₚ(ĉ) >= Φ(tₚ)) at level beta stops an image
  whose certificate at r cannot be reached: for RS it says p(ĉ) < Φ(r/σ) (wrong with probability
  <= beta); for DRS, that a branch misses its threshold of this split. It never claims that an
  adversarial example exists, and it spends none of the certificate's alpha: stopping early only
  removes chances to certify.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ..stats import DEFAULT_PRIOR, MixturePrior, mixture_log_e_value
from .sampling import BranchSmoothing, check_alpha
from .sequential import ABSTAIN, FIRST_LOOK, GROWTH, SequentialTask, run

ROBUST, NOT_ROBUST, UNDECIDED = "robust", "not_robust", "undecided"


def split_threshold(s: float, votes: np.ndarray, n0: int) -> np.ndarray:
    """Thresholds tₚ with Σ tₚ = s for the per-branch tests of a DRS radius test, from the
    selection votes for ĉ of each branch (n0 draws each); for RS, t = s.

    Any function of the selection draws keeps the test sound (module docstring); this one aims
    at a split that the true aₚ clear even though the selection only estimates them. From the
    estimates âₚ = Φ⁻¹((votes + 1)/(n0 + 2)) (add-one, so that unanimous votes stay finite and
    are not overrated), the slack m = Σ âₚ - s is shared in proportion to each estimate's
    standard error, √(p̂(1 - p̂)/n0) / φ(âₚ): tₚ = âₚ - m·seₚ/Σ se. A branch whose estimate is
    less certain (typically a unanimous one, where φ is small) gets the larger share. The same
    formula spreads a shortfall (m < 0), where certifying r is unlikely anyway.
    """
    if len(votes) == 1:
        return np.array([float(s)])
    p_hat = (np.asarray(votes, dtype=np.float64) + 1.0) / (n0 + 2.0)
    a_hat = norm.ppf(p_hat)
    se = np.sqrt(p_hat * (1.0 - p_hat) / n0) / norm.pdf(a_hat)
    return a_hat - (a_hat.sum() - s) * se / se.sum()


@dataclass(frozen=True)
class RadiusResult:
    """A radius test's answer: the class tested and, per radius, ROBUST (certified at level
    alpha), NOT_ROBUST (stopped by the futility test) or UNDECIDED (budget spent)."""

    c_hat: int
    radii: tuple[float, ...]
    outcomes: tuple[str, ...]
    draws: tuple[int, ...]  # estimation draws per branch
    n0: int

    @property
    def radius(self) -> float:
        """The largest certified radius of the grid; 0.0 when none is (then prediction abstains)."""
        certified = [r for r, o in zip(self.radii, self.outcomes, strict=True) if o == ROBUST]
        return certified[-1] if certified else 0.0

    @property
    def prediction(self) -> int:
        return self.c_hat if ROBUST in self.outcomes else ABSTAIN

    @property
    def forward_passes(self) -> int:
        return self.n0 * len(self.draws) + sum(self.draws)


class RadiusTest(SequentialTask):
    """Certify at a radius, or at each radius of a grid claimed in order (module docstring)."""

    def __init__(
        self,
        smoothed: BranchSmoothing,
        radii: float | Sequence[float],
        n0: int,
        max_n: int,
        alpha: float,
        *,
        beta: float | None = None,
        first_look: int = FIRST_LOOK,
        growth: float = GROWTH,
        prior: MixturePrior = DEFAULT_PRIOR,
    ) -> None:
        super().__init__(smoothed, n0, max_n, first_look, growth, prior)
        grid = [radii] if isinstance(radii, numbers.Real) else list(radii)
        ok = all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in grid)
        if not grid or not ok or not all(math.isfinite(r) and r >= 0 for r in grid):
            raise ValueError(f"radii must be finite numbers >= 0, got {radii!r}")
        if any(b <= a for a, b in zip(grid[:-1], grid[1:], strict=True)):
            raise ValueError(f"radii must be strictly increasing, got {radii!r}")
        self.radii = tuple(float(r) for r in grid)
        self.alpha = check_alpha(alpha)
        self.beta = self.alpha if beta is None else check_alpha(beta, "beta")
        # Robust at r iff Σ aₚ > s(r) = r·√(Σ σₚ⁻²): σΦ⁻¹(p) > r for RS, §2.4's R > r for DRS.
        self._sums = np.array(self.radii) * math.sqrt(float((self.sigmas**-2).sum()))
        shape = (len(self.sigmas), len(self.radii))
        self.robust = np.zeros(shape, dtype=bool)  # branch p's test at radius j has rejected
        self.futile = np.zeros(shape, dtype=bool)  # its futility test has
        self.p0 = np.full(shape, 0.5)

    def _start(self, selection_votes: np.ndarray) -> None:
        thresholds = np.stack(
            [split_threshold(s, selection_votes, self.n0) for s in self._sums], axis=1
        )
        # Clipping Φ(t) up to the smallest float only makes H0: p <= p0 larger (still sound);
        # Φ(t) = 1 in float64 (t > 8.2) is beyond any sample size: futile from the start.
        self.p0 = np.maximum(norm.cdf(thresholds), np.finfo(np.float64).tiny)
        self.futile |= self.p0 >= 1.0
        self.p0 = np.minimum(self.p0, np.nextafter(1.0, 0.0))  # changes only futile cells
        self._settle()

    def _update(self) -> None:
        front = self._frontier()
        columns = np.arange(len(self.radii)) >= front
        open_ = self.active[:, None] & columns[None, :] & ~self.robust & ~self.futile
        if open_.any():
            k = np.broadcast_to(self.votes[:, None], self.p0.shape)
            n = np.broadcast_to(self.used[:, None], self.p0.shape)
            greater = mixture_log_e_value(k, n, self.p0, "greater", self.prior)
            less = mixture_log_e_value(k, n, self.p0, "less", self.prior)
            # Each side at its own level, log(1/level) of exactly that level.
            self.robust |= open_ & (greater >= math.log(1.0 / self.alpha))
            self.futile |= open_ & (less >= math.log(1.0 / self.beta))
        self._settle()

    def _frontier(self) -> int:
        """How many leading radii are certified (every branch's test has rejected)."""
        certified = self.robust.all(axis=0)
        return len(certified) if certified.all() else int(np.argmin(certified))

    def _stop_column(self, front: int) -> int:
        """The first radius from the frontier on with a futile branch: it and every larger
        radius cannot be claimed (the claims go in order)."""
        futile = self.futile[:, front:].any(axis=0)
        return front + int(np.argmax(futile)) if futile.any() else len(self.radii)

    def _settle(self) -> None:
        front = self._frontier()
        stop = self._stop_column(front)
        if front == len(self.radii) or stop == front:
            self.finished = True
            return
        # A branch keeps drawing while one of its tests in play is open; never switched back on.
        self.active &= (~self.robust[:, front:stop]).any(axis=1)

    def result(self) -> RadiusResult:
        if not self.finished:
            raise RuntimeError("result() called before the task finished")
        front = self._frontier()
        stop = self._stop_column(front)
        outcomes = [ROBUST] * front + [UNDECIDED] * (stop - front)
        outcomes += [NOT_ROBUST] * (len(self.radii) - stop)
        return RadiusResult(
            int(self.c_hat), self.radii, tuple(outcomes), tuple(self.used.tolist()), self.n0
        )


def certify_radius(
    smoothed: BranchSmoothing,
    x: torch.Tensor,
    radius: float | Sequence[float],
    n0: int,
    max_n: int,
    alpha: float,
    batch_size: int,
    *,
    beta: float | None = None,
    seed: int | None = None,
    stream: int = 0,
    first_look: int = FIRST_LOOK,
    growth: float = GROWTH,
    prior: MixturePrior = DEFAULT_PRIOR,
) -> RadiusResult:
    """Is g constant with class ĉ on the l2 ball of `radius` (or of each radius of a grid)?
    Certified answers are wrong with probability at most alpha in all (RadiusTest); beta
    (default alpha) is the level of the futility test that stops hopeless images."""
    task = RadiusTest(
        smoothed,
        radius,
        n0,
        max_n,
        alpha,
        beta=beta,
        first_look=first_look,
        growth=growth,
        prior=prior,
    )
    return run(smoothed, x, task, batch_size, seed=seed, stream=stream)
