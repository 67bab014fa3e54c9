"""The smoothed classifiers under attack: each target gives PGD (pgd.py) a differentiable soft
classifier and judges the attacked input with the real classifier's PREDICT.

The soft classifier is the expected softmax over m noise draws, differentiable in x through
drs_ext.noisy_views (Salman et al., "Provably Robust Deep Learning via Adversarially Trained
Smoothed Classifiers", NeurIPS 2019): for RS E[softmax f(x + ε)], for DRS the mean of the two
branches' expected softmaxes over their noisy views, for an input-dependent σ the one at the
level the pipeline picks.

Two threat models for the methods whose σ depends on the input (docs/methods.md §1, §2):
- "classifier": σ held at the clean input's level, the attack sees only the classifier;
- "pipeline": gradients through the choice of σ as well. σ-selector: the level is the
  quantised median of the selector over its own noise draws (torch.median passes the gradient
  to the median sample), used as σ through a straight-through quantiser (the forward pass uses
  the grid level, the backward pass the median's gradient). σ-routing: the estimator's soft
  level choice (its expected softmax over the levels) through a straight-through argmax: the
  forward pass is the soft classifier of the top level, the backward pass adds the gradient of
  Σ_l w_l(x)·soft_l(x), so the attack also steers the routing.
Either way the attacked input is judged by the real pipeline's PREDICT, which picks its σ
afresh.

The attacker's noise is keyed by hashes of the seed (training_seed(seed, "attack"), ...), not
by the seed that PREDICT and CERTIFY use: the attack does not know the defender's noise draws.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..ops import noisy_views
from ..smoothing.sampling import BranchSmoothing, check_alpha, check_positive_int, eval_mode
from ..smoothing.sigma_routing import SigmaRoutedClassifier, estimator_seed
from ..smoothing.sigma_selector import SigmaSelectorClassifier, check_lambda, quantize
from ..train.noise import training_seed

__all__ = [
    "THREATS",
    "RoutedTarget",
    "SelectorTarget",
    "SmoothedTarget",
    "soft_probabilities",
]

THREATS = ("classifier", "pipeline")


def check_threat(threat: str) -> str:
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {THREATS}, got {threat!r}")
    return threat


def _branch_views(smoothed, x, streams, num, seed, offset, scale):
    """(B, P, num, C, H, W) views of smoothed's branches; each branch σ times scale (B,) when
    given (differentiable in scale: the views are A_p x + σ_p·scale·fill_p(z))."""
    ones = [1.0] * len(smoothed.branches)
    kw = dict(num=num, seed=seed, offset=offset, stream=streams, partition=smoothed.partition)
    if scale is None:
        return noisy_views(x, smoothed.sigmas, fill=smoothed.fill, **kw)
    noise = noisy_views(torch.zeros_like(x), ones, fill=smoothed.fill, **kw)
    if smoothed.partition == "none":
        clean = x[:, None, None]
    else:  # the op is affine in x: A_p x = views(x, σ = 1) − views(0, σ = 1), same counters
        clean = noisy_views(x, ones, fill=smoothed.fill, **kw) - noise
    sigmas = torch.tensor(smoothed.sigmas, device=x.device)
    return clean + (scale[:, None] * sigmas).view(*scale.shape, -1, 1, 1, 1, 1) * noise


def soft_probabilities(
    smoothed: BranchSmoothing,
    x: torch.Tensor,
    streams: torch.Tensor,
    *,
    num: int,
    seed: int,
    offset: int = 0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) expected softmax of the smoothed classifier over num noise draws per branch,
    averaged over the branches; differentiable in x (and in scale, a per-image factor on σ)."""
    views = _branch_views(smoothed, x, streams, num, seed, offset, scale)
    probs = 0.0
    with contextlib.ExitStack() as modes:
        for branch in smoothed.branches:
            modes.enter_context(eval_mode(branch))
        for p, branch in enumerate(smoothed.branches):
            flat = views[:, p].flatten(0, 1)
            if getattr(branch, "takes_sigma", False):
                sigma = torch.full((flat.shape[0],), smoothed.sigmas[p], device=x.device)
                logits = branch(flat, sigma)
            else:
                logits = branch(flat)
            shape = (views.shape[0], views.shape[2])  # (B, num)
            probs = probs + F.softmax(logits.float(), dim=-1).unflatten(0, shape).mean(1)
    return probs / len(smoothed.branches)


class SmoothedTarget:
    """RS or DRS under attack: soft classifier for the gradients, PREDICT (n draws at alpha,
    the caller's seed, stream = image index) for the verdict."""

    def __init__(
        self,
        smoothed: BranchSmoothing,
        *,
        n: int,
        alpha: float,
        batch_size: int = 1000,
        seed: int = 0,
        num_noise: int = 8,
    ) -> None:
        self.smoothed = smoothed
        self.num_classes = smoothed.num_classes
        self.n = check_positive_int("n", n)
        self.alpha = check_alpha(alpha)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = seed
        self.num_noise = check_positive_int("num_noise", num_noise)
        self.attack_seed = training_seed(seed, "attack")

    def prepare(self, x: torch.Tensor, streams: torch.Tensor) -> object:
        return None

    def soft(self, x: torch.Tensor, streams: torch.Tensor, step: int, context: object):
        offset = step * self.num_noise
        return soft_probabilities(
            self.smoothed, x, streams, num=self.num_noise, seed=self.attack_seed, offset=offset
        )

    def predict(self, x: torch.Tensor, stream: int) -> tuple[int, float]:
        """(PREDICT's class or ABSTAIN, the σ it used)."""
        c = self.smoothed.predict(
            x, self.n, self.alpha, self.batch_size, seed=self.seed, stream=stream
        )
        return c, self.smoothed.sigmas[0]


class SelectorTarget:
    """The σ-selector under attack in one of THREATS (module docstring); the verdict is
    SigmaSelectorClassifier.predict at λ = lam with n_h selector samples."""

    def __init__(
        self,
        model: SigmaSelectorClassifier,
        *,
        lam: float,
        threat: str,
        n: int,
        alpha: float,
        n_h: int = 100,
        batch_size: int = 1000,
        seed: int = 0,
        num_noise: int = 8,
        num_selector: int = 16,
    ) -> None:
        check_threat(threat)
        self.model = model
        self.num_classes = model.num_classes
        self.lam = check_lambda(lam)
        self.threat = threat
        self.n = check_positive_int("n", n)
        self.alpha = check_alpha(alpha)
        self.n_h = check_positive_int("n_h", n_h)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = seed
        self.num_noise = check_positive_int("num_noise", num_noise)
        self.num_selector = check_positive_int("num_selector", num_selector)
        self.attack_seed = training_seed(seed, "attack")
        self.selector_seed = training_seed(seed, "attack-selector")

    def prepare(self, x: torch.Tensor, streams: torch.Tensor) -> object:
        """The clean inputs' levels (indices into model.levels) for the "classifier" threat."""
        if self.threat == "pipeline":
            return None
        est = [
            self.model.sigma_estimate(
                xi,
                lam=self.lam,
                n_h=self.n_h,
                batch_size=self.batch_size,
                seed=self.seed,
                stream=int(s),
            )
            for xi, s in zip(x, streams.tolist(), strict=True)
        ]
        return torch.tensor([self.model.levels.index(e) for e in est])

    def selector_sigma(self, x: torch.Tensor, streams: torch.Tensor, step: int) -> torch.Tensor:
        """(B,) median of the selector over num_selector noisy copies: differentiable in x."""
        z = noisy_views(
            torch.zeros_like(x),
            self.model.selector_noise,
            num=self.num_selector,
            seed=self.selector_seed,
            offset=step * self.num_selector,
            stream=streams,
            partition="none",
        )[:, 0]
        copies = (x[:, None] + z).flatten(0, 1)
        lam = torch.full((copies.shape[0],), self.lam, device=x.device)
        with eval_mode(self.model.selector):
            sigma = self.model.selector(copies, lam).view(x.shape[0], self.num_selector)
        return sigma.median(dim=1).values

    def soft(self, x: torch.Tensor, streams: torch.Tensor, step: int, context: object):
        levels = torch.tensor(self.model.levels, device=x.device)
        if self.threat == "classifier":
            index, scale = context.to(x.device), None
        else:
            median = self.selector_sigma(x, streams, step)
            index = torch.as_tensor(quantize(median.detach().cpu().numpy(), self.model.levels))
            index = index.to(x.device)
            q = levels[index]
            # Straight-through: the value is the level q, the gradient that of the median.
            scale = (median + (q - median).detach()) / q
        probs = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        for level in index.unique().tolist():
            rows = index == level
            probs[rows] = soft_probabilities(
                self.model.smoothed_at(level),
                x[rows],
                streams[rows],
                num=self.num_noise,
                seed=self.attack_seed,
                offset=step * self.num_noise,
                scale=None if scale is None else scale[rows],
            )
        return probs

    def predict(self, x: torch.Tensor, stream: int) -> tuple[int, float]:
        out = self.model.predict_details(
            x,
            self.n,
            self.alpha,
            self.batch_size,
            lam=self.lam,
            n_h=self.n_h,
            seed=self.seed,
            stream=stream,
        )
        return out.prediction, out.sigma


class RoutedTarget:
    """σ-routing under attack in one of THREATS (module docstring); the verdict is the routed
    classifier's PREDICT (n draws per stage at alpha/2 each, the caller's seed)."""

    def __init__(
        self,
        router: SigmaRoutedClassifier,
        *,
        threat: str,
        n: int,
        alpha: float,
        batch_size: int = 1000,
        seed: int = 0,
        num_noise: int = 8,
    ) -> None:
        self.router = router
        self.threat = check_threat(threat)
        self.num_classes = router.num_classes
        self.n = check_positive_int("n", n)
        self.alpha = check_alpha(alpha)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = seed
        self.num_noise = check_positive_int("num_noise", num_noise)
        self.attack_seed = training_seed(seed, "attack")
        self.estimator_attack_seed = training_seed(seed, "attack-estimator")

    def level(self, x: torch.Tensor, stream: int) -> int:
        """The estimator's PREDICT, exactly as SigmaRoutedClassifier.predict runs it (its α/2,
        its key): the level the routed classifier uses for x, or ABSTAIN."""
        return self.router.estimator.predict(
            x,
            self.n,
            self.alpha / 2,
            self.batch_size,
            seed=estimator_seed(self.seed),
            stream=stream,
        )

    def _soft_levels(self, x: torch.Tensor, streams: torch.Tensor, step: int) -> torch.Tensor:
        """(B, L) the estimator's expected softmax over the levels, differentiable in x."""
        return soft_probabilities(
            self.router.estimator,
            x,
            streams,
            num=self.num_noise,
            seed=self.estimator_attack_seed,
            offset=step * self.num_noise,
        )

    def prepare(self, x: torch.Tensor, streams: torch.Tensor) -> object:
        """The clean inputs' levels for the "classifier" threat: the estimator's PREDICT, or its
        soft top level where PREDICT abstains (the attack needs some level to hold)."""
        if self.threat == "pipeline":
            return None
        levels = [self.level(xi, int(s)) for xi, s in zip(x, streams.tolist(), strict=True)]
        if any(lv < 0 for lv in levels):
            with torch.no_grad():
                top = self._soft_levels(x, streams, 0).argmax(1).tolist()
            levels = [lv if lv >= 0 else t for lv, t in zip(levels, top, strict=True)]
        return torch.tensor(levels, device=x.device)

    def _soft_at(self, level: int, x, streams, step) -> torch.Tensor:
        return soft_probabilities(
            self.router.classifiers[level],
            x,
            streams,
            num=self.num_noise,
            seed=self.attack_seed,
            offset=step * self.num_noise,
        )

    def soft(self, x: torch.Tensor, streams: torch.Tensor, step: int, context: object):
        if self.threat == "classifier":
            index = context.to(x.device)
            probs = torch.zeros(x.shape[0], self.num_classes, device=x.device)
            for level in index.unique().tolist():
                rows = index == level
                probs[rows] = self._soft_at(level, x[rows], streams[rows], step)
            return probs
        weights = self._soft_levels(x, streams, step)
        hard = F.one_hot(weights.argmax(1), weights.shape[1]).to(weights.dtype)
        # Straight-through: the value is the top level's soft classifier, the gradient also
        # that of the soft mixture Σ_l w_l(x) soft_l(x) (how the routing moves with x).
        route = hard + weights - weights.detach()
        every = [self._soft_at(lv, x, streams, step) for lv in range(len(self.router.levels))]
        return torch.einsum("bl,lbk->bk", route, torch.stack(every))

    def predict(self, x: torch.Tensor, stream: int) -> tuple[int, float]:
        """SigmaRoutedClassifier.predict with the level it used (nan when the estimator
        abstains): the estimator's PREDICT, then the level's classifier at alpha/2."""
        level = self.level(x, stream)
        if level < 0:
            return SigmaRoutedClassifier.ABSTAIN, math.nan
        clf = self.router.classifiers[level]
        c = clf.predict(x, self.n, self.alpha / 2, self.batch_size, seed=self.seed, stream=stream)
        return c, self.router.levels[level]
