"""Shared by the benchmarks: the plain-PyTorch pipeline they compare with, and RESULTS.md output."""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of the four 4-connected neighbours of every pixel, zero outside the image."""
    p = F.pad(t, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


class PlainViews:
    """Noisy views of one image (C, H, W) the way a user writes them today, without drs_ext:
    torch's own RNG (randn_like), indexing and shifts, on the image's device."""

    def __init__(self, x: torch.Tensor, partition: str) -> None:
        self.x = x
        self.partition = partition
        _, height, width = x.shape
        rows = torch.arange(height, device=x.device)[:, None]
        cols = torch.arange(width, device=x.device)[None, :]
        # Branch p keeps the pixels with (i + j) % 2 == p (the two diagonals of each 2x2 block).
        self.masks = [(rows + cols) % 2 == p for p in range(2)]
        self.kept = [m.flatten().nonzero().squeeze(1) for m in self.masks]
        self.subs = [x.flatten(1)[:, k] for k in self.kept]  # (C, H*W/2) per branch
        self.counts = [neighbour_sum(m.float()[None, None])[0, 0] for m in self.masks]

    def branch(self, p: int, num: int, sigma: float) -> torch.Tensor:
        """(num, C, H, W) float32 views of branch p (for "none": the whole image)."""
        x = self.x
        if self.partition == "none":
            batch = x.repeat(num, 1, 1, 1)
            return batch + torch.randn_like(batch) * sigma
        channels, height, width = x.shape
        sub = self.subs[p].repeat(num, 1, 1)  # noise lives in sub-image space
        noisy = sub + torch.randn_like(sub) * sigma
        placed = sub.new_zeros(num, channels, height * width)
        placed[:, :, self.kept[p]] = noisy
        placed = placed.view(num, channels, height, width)
        average = neighbour_sum(placed) / self.counts[p]  # fill "neighbors"
        return torch.where(self.masks[p], placed, average)

    def views(
        self, num: int, sigma: float, dtype: torch.dtype = torch.float32
    ) -> list[torch.Tensor]:
        """One (num, C, H, W) tensor per branch."""
        branches = 1 if self.partition == "none" else 2
        return [self.branch(p, num, sigma).to(dtype) for p in range(branches)]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(title: str, body: str) -> None:
    """Replace (or add) section `## title` of RESULTS.md; the other sections stay as they are."""
    text = "# drs_ext benchmark results\n\n"
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            text = f.read()
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + section
    with open(RESULTS, "w") as f:
        f.write(text.rstrip() + "\n")
