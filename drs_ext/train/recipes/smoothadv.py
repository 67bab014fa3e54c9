"""SmoothAdv: Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers", NeurIPS 2019."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..noise import NoisyBranch
from .base import Recipe, mean_softmax


@dataclass
class SmoothAdv(Recipe):
    """SmoothAdv (Salman et al. 2019): ℓ2 PGD against the soft smoothed classifier.

    As in their code: one perturbation per image shared by its m noise draws, step size
    2ε/steps with normalised gradients, projection onto the ε-ball and [0, 1], the attack run
    in eval mode, ε ramped linearly over the first ``warmup`` epochs, and the training loss the
    cross-entropy of the m noisy adversarial views with the attack's own noise.
    """

    m: int = 2
    epsilon: float = 0.5
    steps: int = 2
    warmup: int = 10
    name = "smoothadv"

    def __post_init__(self) -> None:
        self.current_epsilon = self.epsilon  # not a field: schedule state, not a setting

    def start_epoch(self, epoch: int) -> None:
        self.current_epsilon = min(self.epsilon, (epoch + 1) * self.epsilon / max(self.warmup, 1))

    def attack(
        self, branch: NoisyBranch, x: torch.Tensor, y: torch.Tensor, offset: int, epsilon: float
    ) -> torch.Tensor:
        """x + δ, ‖δ‖₂ ≤ ε, maximising -log mean_i softmax(f(view_i(x + δ)))_y."""
        delta = torch.zeros_like(x, requires_grad=True)
        step = 2.0 * epsilon / self.steps
        for _ in range(self.steps):
            prob = mean_softmax(branch.logits(x + delta, self.m, offset))
            loss = F.nll_loss(prob.clamp_min(1e-20).log(), y)
            (grad,) = torch.autograd.grad(loss, [delta])
            norms = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            # A zero gradient (saturated softmax) gets a random direction, as in Salman et al.
            grad = torch.where(norms > 0, grad / norms.clamp_min(1e-12), torch.randn_like(grad))
            with torch.no_grad():
                delta.add_(step * grad)
                delta.copy_((x + delta).clamp_(0.0, 1.0) - x)
                delta.copy_(delta.renorm(p=2, dim=0, maxnorm=epsilon))
        return (x + delta).detach()

    def __call__(self, branch, x, y):
        offset = branch.reserve(self.m)
        was_training = branch.training
        branch.eval()
        try:
            x_adv = self.attack(branch, x, y, offset, self.current_epsilon)
        finally:
            branch.train(was_training)
        logits = branch.logits(x_adv, self.m, offset)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(self.m)), logits
