"""The recipe interface: ``recipe(branch, x, y) -> (loss, logits (B, m, K))`` over a NoisyBranch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..noise import NoisyBranch


@dataclass
class Recipe:
    """Base of the loss recipes: ``recipe(branch, x, y) -> (loss, logits (B, m, K))``."""

    name = "recipe"

    def __call__(
        self, branch: NoisyBranch, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Hook for schedules that depend on the (0-based) epoch; most recipes have none."""

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        """How many of the views' logits (B, m, K) pick their image's label y (B,)."""
        return int((logits.argmax(-1) == y[:, None]).sum())

    def to_dict(self) -> dict:
        """Name and hyper-parameters, as stored in checkpoints."""
        return {"name": self.name, **asdict(self)}


def mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=-1).mean(dim=1)
