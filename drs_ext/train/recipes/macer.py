"""MACER: Zhai et al., "MACER: Attack-free and Scalable Robust Training via Maximizing Certified
Radius", ICLR 2020."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Recipe, mean_softmax


@dataclass
class Macer(Recipe):
    """MACER (Zhai et al. 2020) with their CIFAR-10 defaults m = 16, β = 16, γ = 8, λ = 12.

    loss = [NLL of the soft smoothed classifier + λ·σ/2·Σ max(γ - (Φ⁻¹(p̂_y) - Φ⁻¹(p̂_2)), 0)]
    / B, the hinge over images whose β-tempered soft smoothed top class is y. Per DRS branch it
    enlarges that branch's Φ⁻¹ margin, one of the two terms of the DRS radius.
    """

    m: int = 16
    beta: float = 16.0
    gamma: float = 8.0
    lam: float = 12.0
    name = "macer"

    def __call__(self, branch, x, y):
        logits = branch.logits(x, self.m)
        nll = F.nll_loss((mean_softmax(logits) + 1e-10).log(), y, reduction="sum")
        top2, top2_idx = mean_softmax(self.beta * logits).topk(2, dim=1)
        first, second = top2[top2_idx[:, 0] == y].unbind(dim=1)
        with torch.no_grad():
            margin = torch.special.ndtri(first) - torch.special.ndtri(second)
            active = torch.isfinite(margin) & (margin <= self.gamma)
        # Select before the differentiable Φ⁻¹: its infinite slope at 0 and 1 would turn the
        # masked-out entries' zero gradients into NaN.
        margin = torch.special.ndtri(first[active]) - torch.special.ndtri(second[active])
        hinge = (self.gamma - margin).sum() * branch.sigma / 2
        return (nll + self.lam * hinge) / x.shape[0], logits
