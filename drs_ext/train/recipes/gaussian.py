"""Gaussian data augmentation: Cohen, Rosenfeld, Kolter, ICML 2019."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import Recipe


@dataclass
class Gaussian(Recipe):
    """Gaussian data augmentation (Cohen et al. 2019)."""

    name = "gaussian"

    def __call__(self, branch, x, y):
        logits = branch.logits(x, 1)
        return F.cross_entropy(logits[:, 0], y), logits
