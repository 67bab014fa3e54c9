"""ℓ2 PGD on a smoothed soft classifier and the attack evaluation built on it: every image
at every ε of a grid, judged by the smoothed classifier's PREDICT; accuracies per ε; and the
check that no attack lands inside a certified radius of the same model and image.

PGD (Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers", NeurIPS 2019, their SmoothAdv attack) maximises −log of the soft classifier's
probability of the label (targets.py), with fresh noise every step, normalised gradient steps
of 2ε/steps, projection onto the ε-ball and onto the image range [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..smoothing.sampling import check_positive_int

__all__ = [
    "ATTACK_FIELDS",
    "AttackRow",
    "Target",
    "accuracy_by_epsilon",
    "attack_contradictions",
    "check_epsilon",
    "check_steps",
    "evaluate_attack",
    "pgd_attack",
]


class Target(Protocol):
    """A smoothed classifier under attack (targets.py): `prepare` once per batch of clean
    images, `soft` the differentiable (B, K) soft classifier at PGD step `step`, `predict` the
    verdict (class or ABSTAIN, the σ it used) on one image with noise stream `stream`."""

    num_classes: int
    attack_seed: int

    def prepare(self, x: torch.Tensor, streams: torch.Tensor) -> object: ...

    def soft(
        self, x: torch.Tensor, streams: torch.Tensor, step: int, context: object
    ) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor, stream: int) -> tuple[int, float]: ...


def check_epsilon(epsilon: float) -> float:
    """ε, the attack's ℓ2 budget: a finite number >= 0."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    return float(epsilon)


def check_steps(steps: int) -> int:
    """PGD's number of steps: an integer >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def pgd_attack(
    target: Target,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    *,
    steps: int,
    streams: torch.Tensor | None = None,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """x + δ with ‖δ‖₂ <= epsilon per image, maximising −log of the soft smoothed classifier's
    probability of y. x (B, C, H, W), y (B,); streams (B,) pick each image's attack noise
    (default arange(B)); clamp keeps x + δ in the image range (None: no clamp)."""
    epsilon = check_epsilon(epsilon)
    steps = check_steps(steps)
    if streams is None:
        streams = torch.arange(x.shape[0], device=x.device)
    if epsilon == 0:
        return x.detach().clone()
    step = 2.0 * epsilon / steps if step_size is None else float(step_size)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step_size must be finite and > 0, got {step_size}")
    context = target.prepare(x, streams)
    fallback = torch.Generator(device=x.device).manual_seed(target.attack_seed)
    delta = torch.zeros_like(x)
    for t in range(steps):
        delta.requires_grad_(True)
        probs = target.soft(x + delta, streams, t, context)
        loss = F.nll_loss(probs.clamp_min(1e-30).log(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [delta])
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            # A saturated softmax gives no gradient: step in a random direction instead.
            random = torch.randn(x.shape, generator=fallback, device=x.device)
            grad = torch.where(norms > 0, grad, random)
            grad = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta.detach() + step * grad
            if clamp is not None:
                delta = (x + delta).clamp(*clamp) - x
            delta = delta.renorm(p=2, dim=0, maxnorm=epsilon)
    return (x + delta).detach()


ATTACK_FIELDS = ("idx", "label", "epsilon", "predict", "correct", "delta_norm", "sigma")


@dataclass(frozen=True)
class AttackRow:
    """One image at one ε: PREDICT on the attacked input, ‖δ‖ and the σ PREDICT used."""

    idx: int
    label: int
    epsilon: float
    predict: int
    correct: bool
    delta_norm: float
    sigma: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_attack(
    target: Target,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: Iterable[float],
    *,
    steps: int,
    indices: Sequence[int] | None = None,
    batch_size: int = 16,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = False,
) -> list[AttackRow]:
    """Rows for every image and every ε (ε = 0, the clean input, always included): PGD at ε,
    then PREDICT on the result. indices are the images' data-set indices (their noise streams;
    default 0..N-1), so image i's verdict uses the same noise as a CERTIFY or PREDICT of it."""
    grid = sorted({0.0, *(check_epsilon(e) for e in epsilons)})
    steps = check_steps(steps)
    batch_size = check_positive_int("batch_size", batch_size)
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be (N, C, H, W) with labels (N,), got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    idx = list(range(images.shape[0])) if indices is None else [int(i) for i in indices]
    if len(idx) != images.shape[0]:
        raise ValueError(f"indices has {len(idx)} entries for {images.shape[0]} images")
    rows: list[AttackRow] = []
    work = [(e, s) for e in grid for s in range(0, images.shape[0], batch_size)]
    for eps, start in tqdm(work, desc="attack", disable=not progress, dynamic_ncols=True):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size].to(x.device)
        streams = torch.tensor(idx[start : start + batch_size], device=x.device)
        x_adv = pgd_attack(
            target, x, y, eps, steps=steps, streams=streams, step_size=step_size, clamp=clamp
        )
        norms = (x_adv - x).flatten(1).norm(dim=1).tolist()
        for j in range(x.shape[0]):
            pred, sigma = target.predict(x_adv[j], int(streams[j]))
            label = int(y[j])
            rows.append(
                AttackRow(int(streams[j]), label, eps, pred, pred == label, norms[j], sigma)
            )
    return rows


def accuracy_by_epsilon(rows: Iterable[AttackRow]) -> dict[float, float]:
    """ε -> share of images whose PREDICT on the attacked input is the label (ε = 0: clean
    accuracy). An abstention counts as wrong."""
    hits: dict[float, list[bool]] = {}
    for row in rows:
        hits.setdefault(row.epsilon, []).append(row.correct)
    return {eps: float(np.mean(v)) for eps, v in sorted(hits.items())}


def attack_contradictions(
    rows: Iterable[AttackRow], certificates: Mapping[int, tuple[int, float]]
) -> list[tuple[AttackRow, int, float]]:
    """The attacks that beat a certificate: rows whose PREDICT names a class other than the
    class certified for that image (certificates[idx] = (class, radius)) although ‖δ‖ is below
    the certified radius. Each certificate and each PREDICT errs with probability at most its
    alpha, so with sound methods this list is empty but for such rare events."""
    found = []
    for row in rows:
        if row.idx not in certificates:
            continue
        cls, radius = certificates[row.idx]
        if cls < 0 or row.predict < 0:
            continue  # nothing certified, or PREDICT abstained: no class to contradict
        if row.predict != cls and row.delta_norm < radius:
            found.append((row, cls, radius))
    return found
