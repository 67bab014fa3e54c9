"""Universal-σ Gaussian augmentation: the base classifier of the σ-selector (Hase et al.,
"Variational Randomized Smoothing for Sample-Wise Adversarial Robustness", their "universal
σ_a" training), one model for every noise level the selector may pick."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ops import noisy_views
from ..noise import NoisyBranch
from .base import Recipe


def standard_normals(
    branch: NoisyBranch, shape: tuple[int, ...], num: int, device: torch.device
) -> torch.Tensor:
    """(B, num, *shape[1:]) N(0, 1) draws of the branch's training key at fresh sample indices
    (reserved from branch.noise_offset, so a resumed run draws exactly what it would have)."""
    zeros = torch.zeros(shape, device=device)
    stream = torch.arange(shape[0], device=device)
    offset = branch.reserve(num)
    return noisy_views(
        zeros, 1.0, num=num, seed=branch.seed, offset=offset, stream=stream, partition="none"
    )[:, 0]


@dataclass
class UniversalSigma(Recipe):
    """Gaussian augmentation with σ drawn per image uniformly from [sigma_min, sigma_max].

    Every image gets its own σ_i and one noisy view of the branch at σ_i (x + σ_i ε for a whole
    image model; a DRS branch's filled sub-image with σ_i on that branch). ε and the uniform
    behind σ_i are standard normals of the branch's training key (σ_i = sigma_min +
    (sigma_max − sigma_min) Φ(z_i)), so training is reproducible and resumes exactly. The
    σ-selector smooths whole images; a universal DRS branch serves σ-routing's levels with one
    pair of models.
    """

    sigma_min: float = 0.12
    sigma_max: float = 1.0
    name = "universal"

    def __post_init__(self) -> None:
        pair = (self.sigma_min, self.sigma_max)
        ok = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in pair)
        if not ok or not 0.0 < self.sigma_min <= self.sigma_max < math.inf:
            raise ValueError(
                "universal σ needs 0 < sigma_min <= sigma_max < inf, got "
                f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}"
            )

    def covers(self, sigma: float) -> bool:
        """Whether σ lies in the trained range (a checkpoint's σ must)."""
        return self.sigma_min <= sigma <= self.sigma_max

    def sample_sigmas(self, branch: NoisyBranch, images: int, device: torch.device):
        """(B,) σ_i, uniform on [sigma_min, sigma_max]."""
        u = torch.special.ndtr(standard_normals(branch, (images, 1, 1, 1), 1, device)).flatten()
        return self.sigma_min + (self.sigma_max - self.sigma_min) * u

    def __call__(self, branch, x, y):
        sigma = self.sample_sigmas(branch, x.shape[0], x.device)
        views = noisy_views(
            x,
            sigma,  # one σ per image, every branch (the other branch's views are dropped)
            num=1,
            seed=branch.seed,
            offset=branch.reserve(1),
            stream=torch.arange(x.shape[0], device=x.device),
            partition=branch.partition,
            fill=branch.fill,
        )[:, branch.branch]
        logits = branch.model(views[:, 0])[:, None]
        return F.cross_entropy(logits[:, 0], y), logits
