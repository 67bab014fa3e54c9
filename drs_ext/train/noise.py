"""Noisy inputs for training: a model fed the noisy views of one branch, as it is certified.

A DRS branch classifier sees its noisy sub-image brought back to full resolution by a fill
(docs/design.md §2.3); `NoisyBranch` draws exactly those views with `drs_ext.noisy_views`, so a
model is trained on the inputs it is certified on. Partition "none" is plain RS training (the
whole image plus N(0, σ² I) noise).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..ops import noisy_views, num_branches

__all__ = ["NoisyBranch", "training_seed"]


def training_seed(seed: int, purpose: str = "train") -> int:
    """A 63-bit Philox key for training noise, derived from a user seed.

    Certification uses small seeds (0, 1, ...). If a model were trained on the very noise
    vectors later used to certify, the certificate's probability statement (over noise drawn
    independently of the model) would no longer hold, so training keys are hashed away from them.
    """
    digest = hashlib.blake2b(f"drs_ext.{purpose}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class NoisyBranch(nn.Module):
    """A model fed noisy views of one branch: model(fill(sub_p(x) + N(0, σ² I))).

    Each call draws fresh noise: the Philox key is fixed and the sample offset advances by the
    number of views drawn (``noise_offset``), so training noise differs every step, is
    reproducible, and resumes exactly when ``noise_offset`` is restored.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float,
        *,
        partition: str = "none",
        branch: int = 0,
        fill: str = "neighbors",
        seed: int = 0,
        purpose: str = "train",
    ) -> None:
        super().__init__()
        if branch not in range(num_branches(partition)):
            raise ValueError(f"branch {branch} does not exist for partition {partition!r}")
        self.model = model
        self.sigma = float(sigma)
        self.partition = partition
        self.branch = branch
        self.fill = fill
        self.seed = training_seed(seed, purpose)
        self.noise_offset = 0

    def reserve(self, num: int) -> int:
        """Reserve ``num`` fresh sample indices; returns the first (for reusing one noise draw)."""
        offset = self.noise_offset
        self.noise_offset += num
        return offset

    def views(self, x: torch.Tensor, num: int = 1, offset: int | None = None) -> torch.Tensor:
        """(B, num, C, H, W) noisy views of this branch; fresh noise unless ``offset`` is given."""
        if offset is None:
            offset = self.reserve(num)
        # The kernel draws every branch of the partition; the other one is dropped (cheap next
        # to the model), and its noise never meets this branch's counters.
        sigmas = [self.sigma] * num_branches(self.partition)
        stream = torch.arange(x.shape[0], device=x.device)
        out = noisy_views(
            x,
            sigmas,
            num=num,
            seed=self.seed,
            offset=offset,
            stream=stream,
            partition=self.partition,
            fill=self.fill,
        )
        return out[:, self.branch]

    def logits(self, x: torch.Tensor, num: int = 1, offset: int | None = None) -> torch.Tensor:
        """(B, num, K) logits of ``num`` noisy views of every image."""
        views = self.views(x, num, offset)
        return self.model(views.flatten(0, 1)).unflatten(0, views.shape[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of one fresh noisy view of every image."""
        return self.logits(x, 1)[:, 0]
