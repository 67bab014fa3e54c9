"""Consistency regularisation: Jeong & Shin, "Consistency Regularization for Certified
Robustness of Smoothed Classifiers", NeurIPS 2020."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import Recipe, mean_softmax


@dataclass
class Consistency(Recipe):
    """Consistency regularisation (Jeong & Shin 2020), their defaults m = 2, η = 0.5.

    λ = 10 is Xia et al.'s setting for both RS and DRS.
    """

    m: int = 2
    lam: float = 10.0
    eta: float = 0.5
    name = "consistency"

    def __call__(self, branch, x, y):
        logits = branch.logits(x, self.m)
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(self.m))
        mean_prob = mean_softmax(logits)
        log_probs = F.log_softmax(logits, dim=-1)
        # F.kl_div(log q, p) = KL(p ∥ q): the mean prediction is the target of every view.
        kl = F.kl_div(log_probs, mean_prob[:, None].expand_as(log_probs), reduction="none")
        kl = kl.sum(dim=-1).mean()
        entropy = -(mean_prob * mean_prob.clamp_min(1e-20).log()).sum(dim=-1).mean()
        return ce + self.lam * kl + self.eta * entropy, logits
