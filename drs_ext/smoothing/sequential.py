"""Sequential certification: confidence sequences and tests that hold whenever they stop, so
each image draws only the noisy samples its answer needs (docs/methods.md §3). RS (P = 1) and
DRS (P = 2).

A procedure is a state machine fed with votes (`SequentialTask.request` / `observe`), so that one
image runs alone through the classifier's own sampling loop (`run`) or many share full model
batches (packed.py), with the same certificate either way. Two procedures:
- RadiusEstimate (here): a certified radius from anytime-valid lower confidence sequences on the
  branches' probabilities of ĉ, stopping once more draws would barely raise it;
- RadiusTest (at_radius.py): "is g constant with class ĉ on the ball of radius r?", for one
  radius or a grid.

Draws. ĉ is the top class of n0 selection draws per branch (sample indices from SELECTION_OFFSET),
never the label. The estimation draws of branch p are the sample indices ESTIMATION_OFFSET + 0,
1, ..., taken in looks of growing size (first_look, then x growth, up to max_n): a look draws
the next unused indices, so no counter is used twice and the result depends only on
(seed, stream), not on how draws are batched. A branch that has stopped draws no more.

Soundness. The statistics (drs_ext.stats) are nonnegative supermartingales under the null, so
by Ville's inequality each rejects a true null at some look, however many looks there are and
whatever rule ends them, with probability at most its level. RadiusEstimate: branch p's lower
confidence sequence at level alpha/P (union bound: all P hold at every look at once with
probability >= 1 - alpha); on that event the radius of their running maxima (rs_radius,
drs_radius, docs/design.md §2.4) is valid at whatever look the procedure stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..stats import DEFAULT_PRIOR, MixturePrior, mixture_lower_bound
from .drs import DualSmoothedClassifier
from .rs import SmoothedClassifier
from .sampling import (
    ESTIMATION_OFFSET,
    MAX_DRAWS,
    SELECTION_OFFSET,
    BranchSmoothing,
    check_alpha,
    check_positive_int,
    resolve_seed,
)

ABSTAIN = BranchSmoothing.ABSTAIN
FIRST_LOOK, GROWTH = 16, 1.25


@dataclass(frozen=True)
class Request:
    """The draws a task wants next: draws[p] views of branch p, sample indices offset, offset+1,
    ... (0 for a branch that has stopped)."""

    offset: int
    draws: tuple[int, ...]


MAX_KEY = 2**63  # Philox keys are 63-bit, as seeds are (BranchSmoothing._check_call)


@dataclass(frozen=True)
class StageRequest(Request):
    """A Request whose draws come from `smoothed` (None: the sampler's own classifier) under
    the Philox key key(seed), seed being the sampler's (None: the seed itself). A function of
    the seed rather than a number, so that a task built before the seed is drawn (seed=None)
    still names its stage's noise."""

    smoothed: BranchSmoothing | None = None
    key: Callable[[int], int] | None = None


def look_schedule(max_n: int, first_look: int = FIRST_LOOK, growth: float = GROWTH) -> list[int]:
    """The draws per branch after each look: first_look, then x growth (rounded up), ending at
    max_n. An answer found between two looks waits for the next one, so growth bounds the
    overshoot; more looks cost nothing in validity."""
    looks = [min(first_look, max_n)]
    while looks[-1] < max_n:
        looks.append(min(max_n, max(looks[-1] + 1, math.ceil(looks[-1] * growth))))
    return looks


def _check_classifier(smoothed: object) -> None:
    # The radius conditions below are those of §2.4 for one branch and for the DRS pair.
    if not isinstance(smoothed, (SmoothedClassifier, DualSmoothedClassifier)):
        raise TypeError(
            "smoothed must be a SmoothedClassifier or a DualSmoothedClassifier, got "
            f"{type(smoothed).__name__}"
        )


def _check_growth(growth: float) -> float:
    if isinstance(growth, bool) or not isinstance(growth, (int, float)):
        raise ValueError(f"growth must be a real number > 1, got {growth!r}")
    if not (math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be a finite real number > 1, got {growth!r}")
    return float(growth)


class SequentialTask:
    """One image's procedure: n0 selection draws per branch, then looks until it decides.

    A sampler calls request() for the draws wanted next, draws them and hands their votes (P, K)
    to observe(), until request() returns None; result() is then the answer.
    """

    def __init__(
        self,
        smoothed: BranchSmoothing,
        n0: int,
        max_n: int,
        first_look: int,
        growth: float,
        prior: MixturePrior,
    ) -> None:
        _check_classifier(smoothed)
        if not isinstance(prior, MixturePrior):
            raise ValueError(f"prior must be a drs_ext.stats.MixturePrior, got {prior!r}")
        self.sigmas = np.array(smoothed.sigmas, dtype=np.float64)
        self.num_classes = smoothed.num_classes
        branches = len(self.sigmas)
        self.n0 = check_positive_int("n0", n0, MAX_DRAWS)
        self.max_n = check_positive_int("max_n", max_n, MAX_DRAWS)
        self.looks = look_schedule(
            self.max_n, check_positive_int("first_look", first_look), _check_growth(growth)
        )
        self.prior = prior
        self.c_hat: int | None = None
        self.votes = np.zeros(branches, dtype=np.int64)  # estimation votes for ĉ per branch
        self.used = np.zeros(branches, dtype=np.int64)  # estimation draws per branch
        self.active = np.ones(branches, dtype=bool)
        self.finished = False
        self._looks_done = 0
        self._next: Request = Request(SELECTION_OFFSET, (self.n0,) * branches)

    def request(self) -> Request | None:
        return None if self.finished else self._next

    def observe(self, counts: np.ndarray) -> None:
        """Votes (P, K) of the draws of the last request (a NaN view votes for no class, which
        only lowers the counts: the bounds stay valid)."""
        if self.finished:
            raise RuntimeError("observe() called on a finished task")
        counts = np.asarray(counts)
        if counts.shape != (len(self.sigmas), self.num_classes):
            raise ValueError(
                f"counts must have shape (branches, classes) = "
                f"{(len(self.sigmas), self.num_classes)}, got {counts.shape}"
            )
        if self.c_hat is None:
            self.c_hat = int(counts.sum(axis=0).argmax())
            self._start(counts[:, self.c_hat])
            # No selection draw voted (every logit NaN): abstain, as the fixed-n certify does.
            self.finished |= not counts.any()
        else:
            self.votes += counts[:, self.c_hat]
            self.used += np.asarray(self._next.draws)
            self._looks_done += 1
            self._update()
        if self._looks_done >= len(self.looks) or not self.active.any():
            self.finished = True
        if self.finished:
            return
        drawn = self.looks[self._looks_done - 1] if self._looks_done else 0
        step = self.looks[self._looks_done] - drawn
        self._next = Request(ESTIMATION_OFFSET + drawn, tuple(step * self.active.astype(int)))

    # what a procedure supplies
    def _start(self, selection_votes: np.ndarray) -> None:
        """Called once with the selection votes for ĉ per branch."""

    def _update(self) -> None:
        """Called after each look; sets `finished` and may switch branches off in `active`."""
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


@dataclass(frozen=True)
class EstimateResult:
    """A sequential radius: (prediction, radius) as `certify` returns them, with the draws."""

    prediction: int
    radius: float
    c_hat: int
    draws: tuple[int, ...]
    n0: int

    @property
    def forward_passes(self) -> int:
        return self.n0 * len(self.draws) + sum(self.draws)


class RadiusEstimate(SequentialTask):
    """A certified radius from the branches' lower confidence sequences, stopping when the
    radius they would give at max_n, if the votes kept their current frequency, exceeds the
    current one by at most tol, or once the radius reaches cap (a caller that reports
    min(radius, cap), as the input-dependent methods do with their σ stage's radius, gains
    nothing from more draws; while that projection clears the cap by more than tol, the image
    draws on until it reaches the cap). While the radius is <= 0 (the image would abstain)
    the projection starts from each branch's upper confidence bound at level beta/P (default
    alpha/P) instead of the frequency, so that a few unlucky early draws do not end an image
    that more draws would certify. The stopping rule only saves draws: the radius is valid at
    level alpha whenever it stops (module docstring)."""

    def __init__(
        self,
        smoothed: BranchSmoothing,
        n0: int,
        max_n: int,
        alpha: float,
        *,
        tol: float = 0.01,
        cap: float = math.inf,
        beta: float | None = None,
        first_look: int = FIRST_LOOK,
        growth: float = GROWTH,
        prior: MixturePrior = DEFAULT_PRIOR,
    ) -> None:
        super().__init__(smoothed, n0, max_n, first_look, growth, prior)
        self.alpha = check_alpha(alpha)
        beta = self.alpha if beta is None else check_alpha(beta, "beta")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol must be a real number >= 0, got {tol!r}")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ValueError(f"cap must be a real number > 0 (or math.inf), got {cap!r}")
        self.tol = float(tol)
        self.cap = float(cap)
        self.alpha_branch = self.alpha / len(self.sigmas)  # union bound over the P sequences
        self.beta_branch = beta / len(self.sigmas)  # the stopping rule's: spends no alpha
        self.lowers = np.zeros(len(self.sigmas))
        self.radius = -math.inf
        # The method's own radius of its branch bounds (§2.4): σΦ⁻¹(p̲) for RS, DRS's formula.
        self._radius_from_bounds = smoothed.radius_from_bounds

    def _update(self) -> None:
        now = mixture_lower_bound(self.votes, self.used, self.alpha_branch, self.prior)
        self.lowers = np.maximum(self.lowers, now)  # the running maximum is valid too
        self.radius = self._radius_from_bounds(self.lowers)
        if self.used.max() >= self.max_n or self.radius >= self.cap:
            self.finished = True
            return
        if self.radius > 0:
            frequency = self.votes / self.used
        else:  # abstaining so far: only an optimistic projection may confirm it
            misses = self.used - self.votes
            frequency = 1.0 - mixture_lower_bound(misses, self.used, self.beta_branch, self.prior)
        at_max = np.rint(frequency * self.max_n).astype(np.int64)
        ahead = mixture_lower_bound(at_max, self.max_n, self.alpha_branch, self.prior)
        reach = self._radius_from_bounds(np.maximum(self.lowers, ahead))
        # A cap that the projection clears by more than tol is worth reaching: the caller
        # reports min(radius, cap), which a fixed n that reaches the cap would beat.
        if reach >= self.cap + self.tol:
            return
        self.finished = max(min(reach, self.cap), 0.0) - max(self.radius, 0.0) <= self.tol

    def result(self) -> EstimateResult:
        if not self.finished:
            raise RuntimeError("result() called before the task finished")
        certified = self.radius > 0  # a radius <= 0 abstains (§2.4), never clipped before
        return EstimateResult(
            int(self.c_hat) if certified else ABSTAIN,
            float(self.radius) if certified else 0.0,
            int(self.c_hat),
            tuple(self.used.tolist()),
            self.n0,
        )


def draw_source(
    wanted: Request, smoothed: BranchSmoothing, seed: int
) -> tuple[BranchSmoothing, int]:
    """The classifier and Philox key of a request's draws (StageRequest), else (smoothed, seed)."""
    source = getattr(wanted, "smoothed", None)
    derive = getattr(wanted, "key", None)
    if source is None:
        source = smoothed
    elif not isinstance(source, BranchSmoothing):
        raise TypeError(f"a request's smoothed must be a smoothed classifier, got {source!r}")
    key = seed if derive is None else derive(seed)
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < MAX_KEY:
        raise ValueError(f"a request's key(seed) must be an integer in [0, 2**63), got {key!r}")
    return source, int(key)


def run(
    smoothed: BranchSmoothing,
    x: torch.Tensor,
    task,
    batch_size: int,
    *,
    seed: int | None = None,
    stream: int = 0,
):
    """Runs one image's task through the classifier's own sampling loop (sample_counts) and
    returns task.result(); seed and stream as in `certify` (seed None: a fresh one from torch's
    default generator). A task's StageRequests are drawn from the classifier and key they name
    (a staged task: σ-routing, the σ-selector); its plain Requests from `smoothed` under seed."""
    seed = resolve_seed(seed)
    x = smoothed._check_call(x, seed, stream)
    while (wanted := task.request()) is not None:
        source, key = draw_source(wanted, smoothed, seed)
        counts = source.sample_counts(
            x, list(wanted.draws), batch_size, seed=key, stream=stream, offset=wanted.offset
        )
        task.observe(counts)
    return task.result()


def certify_sequential(
    smoothed: BranchSmoothing,
    x: torch.Tensor,
    n0: int,
    max_n: int,
    alpha: float,
    batch_size: int,
    *,
    tol: float = 0.01,
    cap: float = math.inf,
    beta: float | None = None,
    seed: int | None = None,
    stream: int = 0,
    first_look: int = FIRST_LOOK,
    growth: float = GROWTH,
    prior: MixturePrior = DEFAULT_PRIOR,
) -> EstimateResult:
    """`certify` with at most max_n estimation draws per branch, stopping early (RadiusEstimate):
    (prediction, radius) with g constant on the ball with probability >= 1 - alpha."""
    task = RadiusEstimate(
        smoothed,
        n0,
        max_n,
        alpha,
        tol=tol,
        cap=cap,
        beta=beta,
        first_look=first_look,
        growth=growth,
        prior=prior,
    )
    return run(smoothed, x, task, batch_size, seed=seed, stream=stream)


def certified_accuracy(
    results: Sequence[object], labels: Sequence[int], radii: Sequence[float]
) -> np.ndarray:
    """The fraction of images whose prediction is their label with a certified radius >= r, for
    each r: results are RadiusResult / EstimateResult objects or (prediction, radius) pairs (as
    `certify` returns them). A radius test counts its largest certified grid radius, so ask it
    at the radii of its grid."""
    if len(results) != len(labels) or not results:
        raise ValueError(
            f"results and labels must be non-empty and of one length, got {len(results)} "
            f"and {len(labels)}"
        )
    pairs = [(r.prediction, r.radius) if hasattr(r, "radius") else tuple(r) for r in results]
    prediction = np.array([p for p, _ in pairs])
    radius = np.array([r for _, r in pairs], dtype=np.float64)
    correct = (prediction == np.asarray(labels)) & (prediction != ABSTAIN)
    return np.array([np.mean(correct & (radius >= r)) for r in radii])
