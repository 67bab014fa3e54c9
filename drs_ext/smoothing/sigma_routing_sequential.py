"""Sequential certification for σ-routing (docs/methods.md §1 and §3): each of the two stages
is one of sequential.py's procedures, so an image draws only what its answer needs, and many
images share full model batches (packed.py) with the certificate each gets alone.

RoutedEstimate (a radius, as `certify`):
1. Estimator: RadiusEstimate on the estimator's smoothed classifier at alpha/2, its draws keyed
   estimator_seed(seed). Its class is the level σ̂, its radius R_σ; if it abstains, so does the
   image. It also stops once R_σ reaches the largest radius σ̂'s classifier could report with
   max_n draws: the answer is min(R_σ, R_c), so more estimator draws would be wasted.
2. Classifier at σ̂: RadiusEstimate at alpha/2 under the caller's seed (the draws a plain
   classifier at σ̂ would make), capped at R_σ for the same reason. Answer: (ĉ, min(R_σ, R_c)).
RoutedRadiusTest (a grid r₁ < r₂ < ..., as `certify_radius`): RadiusTest on the estimator at
alpha/2 over the grid, then RadiusTest on the classifier at σ̂ at alpha/2 over the radii the
estimator certified; a radius is certified when both stages certify it.

Why alpha/2 per stage is sound. Let σ* be the estimator's smoothed top level. Stage 1's claim
(a lower confidence sequence, or the fixed-sequence tests of a grid) is wrong with probability
at most alpha/2 whatever stops it (Ville's inequality: sequential.py, at_radius.py). When it is
right and certifies, σ̂ = σ* and σ(·) = σ* on the ball, so stage 2 runs on one fixed classifier,
that of σ*, whose claim is again wrong with probability at most alpha/2 whatever stops it (the
cap taken from stage 1 changes only when it stops, the grid only which radii it may claim). A
false routed certificate needs one of these two events: probability at most alpha by a union
bound, with no independence of the stages needed. docs/methods.md §1 has the certificate itself
(Sun et al., Theorems 4.1 and 4.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..stats import DEFAULT_PRIOR, MixturePrior, mixture_lower_bound
from .at_radius import ROBUST, RadiusResult, RadiusTest
from .packed import PackedResult, Task, certify_packed
from .sampling import BranchSmoothing, check_alpha
from .sequential import (
    ABSTAIN,
    FIRST_LOOK,
    GROWTH,
    EstimateResult,
    RadiusEstimate,
    StageRequest,
    run,
)
from .sigma_routing import SigmaRoutedClassifier, estimator_seed


def _check_router(router: object) -> SigmaRoutedClassifier:
    if not isinstance(router, SigmaRoutedClassifier):
        raise TypeError(f"router must be a SigmaRoutedClassifier, got {type(router).__name__}")
    return router


class _RoutedTask:
    """The two stages as one task for a sampler (packed.certify_packed, run_routed): stage 1
    draws from the estimator under estimator_seed(seed), stage 2 from the chosen level's
    classifier under the seed itself; each request names its classifier and key."""

    def __init__(self, router: SigmaRoutedClassifier, first: RadiusEstimate | RadiusTest) -> None:
        self.router = router
        self.first = first
        self.second: RadiusEstimate | RadiusTest | None = None
        self.level = ABSTAIN
        self._stage = first

    def request(self) -> StageRequest | None:
        if self._stage is None:
            return None
        wanted = self._stage.request()
        if self._stage is self.first:
            source, key = self.router.estimator, estimator_seed
        else:
            source, key = self.router.classifiers[self.level], None
        return StageRequest(wanted.offset, wanted.draws, smoothed=source, key=key)

    def observe(self, counts: np.ndarray) -> None:
        if self._stage is None:
            raise RuntimeError("observe() called on a finished task")
        self._stage.observe(counts)
        if self._stage.request() is not None:
            return
        if self._stage is self.first and self.first.result().prediction != ABSTAIN:
            self.level = self.first.result().prediction
            self.second = self._second(self.first.result())
            self._stage = self.second
        else:
            self._stage = None

    def _second(self, first: EstimateResult | RadiusResult) -> RadiusEstimate | RadiusTest:
        raise NotImplementedError

    def _stages(self):
        if self._stage is not None:
            raise RuntimeError("result() called before the task finished")
        return self.first.result(), None if self.second is None else self.second.result()


@dataclass(frozen=True)
class RoutedEstimateResult:
    """A sequential routed radius: prediction (ABSTAIN when either stage abstains) and radius
    min(R_σ, R_c) as `certify` returns them; level is σ̂'s index in Σ (-1, sigma and radius_c
    nan, when the estimator abstains and the classifier stage is not run); the stages' own
    results, with their draws."""

    prediction: int
    radius: float
    level: int
    sigma: float
    radius_sigma: float
    radius_c: float
    estimator: EstimateResult
    classifier: EstimateResult | None

    @property
    def draws_sigma(self) -> tuple[int, ...]:
        return self.estimator.draws

    @property
    def draws_c(self) -> tuple[int, ...]:
        return () if self.classifier is None else self.classifier.draws

    @property
    def forward_passes(self) -> int:
        """Every draw of both stages, selection included."""
        second = 0 if self.classifier is None else self.classifier.forward_passes
        return self.estimator.forward_passes + second


class RoutedEstimate(_RoutedTask):
    """A certified radius of the routed classifier, each stage a RadiusEstimate at alpha/2
    (module docstring); tol, first_look, growth and prior as RadiusEstimate's, for both stages."""

    def __init__(
        self,
        router: SigmaRoutedClassifier,
        n0: int,
        max_n: int,
        alpha: float,
        *,
        tol: float = 0.01,
        first_look: int = FIRST_LOOK,
        growth: float = GROWTH,
        prior: MixturePrior = DEFAULT_PRIOR,
    ) -> None:
        router = _check_router(router)
        # Union bound over the two stages: each claim wrong with probability <= alpha/2.
        self.stage_alpha = check_alpha(alpha) / 2
        self._options = dict(tol=tol, first_look=first_look, growth=growth, prior=prior)
        first = _EstimatorStage(
            router.classifiers, router.estimator, n0, max_n, self.stage_alpha, **self._options
        )
        super().__init__(router, first)

    def _second(self, first: EstimateResult) -> RadiusEstimate:
        clf = self.router.classifiers[self.level]
        # min(R_σ, R_c) cannot exceed R_σ: draws that would raise R_c beyond it are wasted.
        return RadiusEstimate(
            clf,
            self.first.n0,
            self.first.max_n,
            self.stage_alpha,
            cap=first.radius,
            **self._options,
        )

    def result(self) -> RoutedEstimateResult:
        est, clf = self._stages()
        if clf is None:
            return RoutedEstimateResult(ABSTAIN, 0.0, -1, math.nan, est.radius, math.nan, est, None)
        certified = clf.prediction != ABSTAIN
        return RoutedEstimateResult(
            prediction=clf.prediction if certified else ABSTAIN,
            radius=min(est.radius, clf.radius) if certified else 0.0,
            level=self.level,
            sigma=self.router.levels[self.level],
            radius_sigma=est.radius,
            radius_c=clf.radius,
            estimator=est,
            classifier=clf,
        )


class _EstimatorStage(RadiusEstimate):
    """Stage 1 of RoutedEstimate: once the selection draws have chosen σ̂, capped at the largest
    radius σ̂'s classifier could report in stage 2 (at the same max_n and alpha), which bounds
    min(R_σ, R_c)."""

    def __init__(self, classifiers: Sequence[BranchSmoothing], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._classifiers = classifiers

    def _start(self, selection_votes: np.ndarray) -> None:
        clf = self._classifiers[self.c_hat]
        reach = reachable_radius(clf, self.max_n, self.alpha, self.prior)
        self.cap = reach if reach > 0 else math.inf  # reach <= 0: stage 2 cannot certify anyway


def reachable_radius(
    smoothed: BranchSmoothing, max_n: int, alpha: float, prior: MixturePrior = DEFAULT_PRIOR
) -> float:
    """The largest radius RadiusEstimate(smoothed, ..., max_n, alpha) can report: every one of
    max_n draws per branch a vote for ĉ, each branch's sequence at alpha/P as there."""
    branches = len(smoothed.sigmas)
    full = np.full(branches, max_n)
    return smoothed.radius_from_bounds(mixture_lower_bound(full, full, alpha / branches, prior))


@dataclass(frozen=True)
class RoutedRadiusResult:
    """A routed radius test's answer per radius of the grid: ROBUST where both stages certified
    it, else the outcome of the stage that did not (at_radius's NOT_ROBUST / UNDECIDED). level
    is -1 (sigma nan, classifier None) when the estimator certified no radius."""

    level: int
    sigma: float
    radii: tuple[float, ...]
    outcomes: tuple[str, ...]
    estimator: RadiusResult
    classifier: RadiusResult | None

    @property
    def radius(self) -> float:
        """The largest radius both stages certified; 0.0 when none is (prediction abstains)."""
        certified = [r for r, o in zip(self.radii, self.outcomes, strict=True) if o == ROBUST]
        return certified[-1] if certified else 0.0

    @property
    def prediction(self) -> int:
        return self.classifier.c_hat if ROBUST in self.outcomes else ABSTAIN

    @property
    def radius_sigma(self) -> float:
        return self.estimator.radius

    @property
    def radius_c(self) -> float:
        return math.nan if self.classifier is None else self.classifier.radius

    @property
    def forward_passes(self) -> int:
        second = 0 if self.classifier is None else self.classifier.forward_passes
        return self.estimator.forward_passes + second


class RoutedRadiusTest(_RoutedTask):
    """Is the routed classifier constant with class ĉ on the ball of each radius of a grid?
    Each stage a RadiusTest at alpha/2 (module docstring); beta (default: each stage's alpha)
    is the level of their futility tests, which never certify and so spend none of alpha."""

    def __init__(
        self,
        router: SigmaRoutedClassifier,
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
        router = _check_router(router)
        # Union bound over the two stages: each one's curve wrong with probability <= alpha/2.
        self.stage_alpha = check_alpha(alpha) / 2
        if beta is not None:
            check_alpha(beta, "beta")
        self._options = dict(beta=beta, first_look=first_look, growth=growth, prior=prior)
        first = RadiusTest(router.estimator, radii, n0, max_n, self.stage_alpha, **self._options)
        super().__init__(router, first)

    def _second(self, first: RadiusResult) -> RadiusTest:
        # Only the radii at which σ(·) is certified constant can be certified at all.
        front = first.outcomes.count(ROBUST)
        clf = self.router.classifiers[self.level]
        return RadiusTest(
            clf,
            first.radii[:front],
            self.first.n0,
            self.first.max_n,
            self.stage_alpha,
            **self._options,
        )

    def result(self) -> RoutedRadiusResult:
        est, clf = self._stages()
        if clf is None:
            return RoutedRadiusResult(-1, math.nan, est.radii, est.outcomes, est, None)
        front = len(clf.radii)
        return RoutedRadiusResult(
            self.level,
            self.router.levels[self.level],
            est.radii,
            clf.outcomes + est.outcomes[front:],
            est,
            clf,
        )


RoutedTask = RoutedEstimate | RoutedRadiusTest


def run_routed(
    router: SigmaRoutedClassifier,
    x: torch.Tensor,
    task: RoutedTask,
    batch_size: int,
    *,
    seed: int | None = None,
    stream: int = 0,
):
    """Runs one image's routed task, each stage through its classifier's own sampling loop, and
    returns task.result(); seed and stream as in `certify` (None: a fresh seed)."""
    router = _check_router(router)
    if not isinstance(task, _RoutedTask) or task.router is not router:
        raise ValueError(
            f"task must be a RoutedEstimate or RoutedRadiusTest of router, got {task!r}"
        )
    return run(router.estimator, x, task, batch_size, seed=seed, stream=stream)


def certify_routed_sequential(
    router: SigmaRoutedClassifier,
    x: torch.Tensor,
    n0: int,
    max_n: int,
    alpha: float,
    batch_size: int,
    *,
    tol: float = 0.01,
    seed: int | None = None,
    stream: int = 0,
    first_look: int = FIRST_LOOK,
    growth: float = GROWTH,
    prior: MixturePrior = DEFAULT_PRIOR,
) -> RoutedEstimateResult:
    """The routed `certify` with at most n0 + max_n draws per branch and stage, stopping early
    (RoutedEstimate): g is constant on the ball of the radius with probability >= 1 - alpha."""
    task = RoutedEstimate(
        router, n0, max_n, alpha, tol=tol, first_look=first_look, growth=growth, prior=prior
    )
    return run_routed(router, x, task, batch_size, seed=seed, stream=stream)


def certify_routed_radius(
    router: SigmaRoutedClassifier,
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
) -> RoutedRadiusResult:
    """Is the routed g constant with class ĉ on the ball of `radius` (or of each radius of a
    grid)? Certified answers are wrong with probability at most alpha in all (RoutedRadiusTest)."""
    task = RoutedRadiusTest(
        router,
        radius,
        n0,
        max_n,
        alpha,
        beta=beta,
        first_look=first_look,
        growth=growth,
        prior=prior,
    )
    return run_routed(router, x, task, batch_size, seed=seed, stream=stream)


def certify_routed_packed(
    router: SigmaRoutedClassifier,
    images: Iterable[torch.Tensor],
    new_task: Callable[[], Task],
    batch_size: int,
    *,
    seed: int | None = None,
    streams: Iterable[int] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[PackedResult]:
    """packed.certify_packed for routed tasks (new_task e.g. functools.partial(RoutedEstimate,
    router, n0, max_n, alpha)): images at either stage and routed to any level share model
    batches, and each gets the certificate run_routed gives it alone."""
    router = _check_router(router)
    return certify_packed(
        router.estimator,
        images,
        new_task,
        batch_size,
        seed=seed,
        streams=streams,
        device=device,
    )
