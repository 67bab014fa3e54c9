"""Sequential CERTIFY for the σ-selector (sigma_selector.py; docs/methods.md §2, §3): the level
is shown constant on the budget ball by two anytime-valid binomial tests on the selector's
outputs, then the classifier at that level is certified by RadiusEstimate (sequential.py), each
stage drawing only as many samples as its answer needs.

Stage 1 (selector_level.py): n0_h selection draws of the selector pick a candidate level q;
two anytime-valid tests on fresh draws, at α_l and α_u, show σ = q on the whole D-ball.

Stage 2: RadiusEstimate on g_q at α_c with cap = D: it stops once its radius reaches D, since
R = min(D, R_c) gains nothing beyond. Its draws are the classifier's own ranges (below 2^49 +
2^48), apart from the selector's (from 2^55 on): the stages never share a noise value, and the
whole result depends only on (seed, stream).

Draws. The selector's draws are votes of its level cells (selector_level.level_cells), so
both stages are requests of a smoothed classifier (sequential.StageRequest) under the caller's seed:
one image runs them through the samplers' own loops (certify_selector_sequential), and many
share full model batches (certify_selector_packed) with the same certificate.

Union bound: a false certificate needs σ not constant q on the D-ball (at most α_l + α_u) or the
radius of g_q failing for the q the stage ran at (at most α_c, given q), so it has probability at
most α_l + α_u + α_c = α.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..stats import DEFAULT_PRIOR, MixturePrior
from .packed import PackedResult, certify_packed
from .sampling import MAX_DRAWS, check_positive_int, is_real
from .selector_level import (
    CERTIFIED,
    FUTILE,
    MAX_N_H,
    N0_H,
    UNDECIDED,
    LevelResult,
    SelectorLevelTest,
    level_cells,
    level_midpoints,
)
from .sequential import FIRST_LOOK, GROWTH, RadiusEstimate, StageRequest, run
from .sigma_selector import SigmaSelectorClassifier, check_lambda

__all__ = [
    "CERTIFIED",
    "FUTILE",
    "UNDECIDED",
    "LevelResult",
    "SelectorLevelTest",
    "SelectorTask",
    "SequentialSelectorCertificate",
    "certify_selector_packed",
    "certify_selector_sequential",
    "level_cells",
    "level_midpoints",
]

ABSTAIN = SigmaSelectorClassifier.ABSTAIN


@dataclass(frozen=True)
class SequentialSelectorCertificate:
    """What each stage of the sequential CERTIFY found.

    prediction is ABSTAIN (-1) with radius 0.0 when either stage abstains. sigma: the level q
    certified constant on the D-ball (nan when stage 1 did not certify one; stage 2 then did not
    run and radius_c is nan). radius_c: the classifier stage's radius at q (radius = min(D,
    radius_c) when it is > 0). selector: stage 1's LevelResult (outcome, selection, draws);
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


class SelectorTask:
    """Both stages of the sequential CERTIFY as one task for a sampler (sequential.run,
    packed.certify_packed): stage 1 (SelectorLevelTest) draws the selector's votes per level
    cell (selector_level.level_cells), stage 2 (RadiusEstimate at α_c, cap D) the certified
    level's classifier; every request names its classifier (sequential.StageRequest), all under the
    caller's seed (the stages' sample indices never meet: module docstring).

    (α_l, α_u, α_c) = model.alphas(alpha): the union bound of the module docstring. Stage 1
    takes n0_h selection draws and at most max_n_h test draws, beta its futility level (None:
    each side's α); stage 2 n0 selection draws and at most max_n estimation draws per branch,
    tolerance tol. first_look, growth and prior apply to both stages.
    """

    def __init__(
        self,
        model: SigmaSelectorClassifier,
        n0: int,
        max_n: int,
        alpha: float,
        *,
        lam: float,
        n0_h: int = N0_H,
        max_n_h: int = MAX_N_H,
        tol: float = 0.01,
        beta: float | None = None,
        first_look: int = FIRST_LOOK,
        growth: float = GROWTH,
        prior: MixturePrior = DEFAULT_PRIOR,
    ) -> None:
        self.cells = level_cells(model, lam)  # checks model and λ
        self.model, self.lam = model, check_lambda(lam)
        # α_l + α_u + α_c = alpha: the union bound of the module docstring.
        alpha_l, alpha_u, self.alpha_c = model.alphas(alpha)
        # Stage 2's own arguments are checked before stage 1 spends any draw.
        self.n0 = check_positive_int("n0", n0, MAX_DRAWS)
        self.max_n = check_positive_int("max_n", max_n, MAX_DRAWS)
        if not is_real(tol) or not tol >= 0:
            raise ValueError(f"tol must be a real number >= 0, got {tol!r}")
        self.tol, self.looks = float(tol), dict(first_look=first_look, growth=growth, prior=prior)
        self.first = SelectorLevelTest(
            model.levels,
            model.budget,
            model.selector_noise,
            n0_h,
            max_n_h,
            alpha_l,
            alpha_u,
            beta=beta,
            **self.looks,
        )
        self.second: RadiusEstimate | None = None

    def request(self) -> StageRequest | None:
        wanted = self.first.request()
        if wanted is not None:
            return StageRequest(wanted.offset, wanted.draws, smoothed=self.cells)
        level = self.first.result().level
        if level < 0:
            return None
        if self.second is None:
            self.second = RadiusEstimate(
                self.model.smoothed_at(level),
                self.n0,
                self.max_n,
                self.alpha_c,
                tol=self.tol,
                cap=self.model.budget,
                **self.looks,
            )
        wanted = self.second.request()
        if wanted is None:
            return None
        return StageRequest(wanted.offset, wanted.draws, smoothed=self.model.smoothed_at(level))

    def observe(self, counts: np.ndarray) -> None:
        if self.first.request() is not None:
            self.first.observe(counts)
        elif self.second is not None and self.second.request() is not None:
            self.second.observe(counts)
        else:
            raise RuntimeError("observe() called on a finished task")

    def result(self) -> SequentialSelectorCertificate:
        if self.request() is not None:
            raise RuntimeError("result() called before the task finished")
        stage1 = self.first.result()
        common = dict(lam=self.lam, budget=self.model.budget, selector=stage1)
        if self.second is None:
            return SequentialSelectorCertificate(
                ABSTAIN,
                0.0,
                sigma=math.nan,
                radius_c=math.nan,
                classifier_n0=0,
                classifier_draws=(),
                **common,
            )
        estimate = self.second.result()
        certified = estimate.prediction != ABSTAIN  # RadiusEstimate abstains exactly when R_c <= 0
        return SequentialSelectorCertificate(
            estimate.prediction if certified else ABSTAIN,
            min(self.model.budget, estimate.radius) if certified else 0.0,
            sigma=self.model.levels[stage1.level],
            radius_c=estimate.radius,
            classifier_n0=estimate.n0,
            classifier_draws=estimate.draws,
            **common,
        )


def certify_selector_sequential(
    model: SigmaSelectorClassifier,
    x: torch.Tensor,
    n0: int,
    max_n: int,
    alpha: float,
    batch_size: int,
    *,
    lam: float,
    seed: int | None = None,
    stream: int = 0,
    **options,
) -> SequentialSelectorCertificate:
    """model.certify_details with both stages sequential (SelectorTask; options: its n0_h,
    max_n_h, tol, beta, first_look, growth, prior): g is constant with the returned class on
    the l2 ball of the returned radius (<= D) with probability at least 1 - alpha. seed and
    stream key every draw of both stages (seed None: one fresh seed from torch's default
    generator for the whole call)."""
    task = SelectorTask(model, n0, max_n, alpha, lam=lam, **options)
    batch_size = check_positive_int("batch_size", batch_size)
    return run(task.cells, x, task, batch_size, seed=seed, stream=stream)


def certify_selector_packed(
    model: SigmaSelectorClassifier,
    images: Iterable[torch.Tensor],
    new_task: Callable[[], SelectorTask],
    batch_size: int,
    *,
    seed: int | None = None,
    streams: Iterable[int] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[PackedResult]:
    """packed.certify_packed for the σ-selector (new_task e.g. functools.partial(SelectorTask,
    model, n0, max_n, alpha, lam=λ)): images at either stage and at any level share model
    batches, and each gets the certificate certify_selector_sequential gives it alone."""
    if not isinstance(model, SigmaSelectorClassifier):
        raise TypeError(f"model must be a SigmaSelectorClassifier, got {type(model).__name__}")
    return certify_packed(
        model.smoothed_at(0),  # checks the images; every request names its own classifier
        images,
        new_task,
        batch_size,
        seed=seed,
        streams=streams,
        device=device,
    )
