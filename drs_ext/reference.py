"""Plain-PyTorch versions of every drs_ext op: the oracle the tests compare the kernels with.

Written from docs/design.md §2 without looking at the kernels' arithmetic: Philox4x32-10 runs on
int64 tensors with 16-bit limb products, Box–Muller uses float64 libm (the kernels use float32
polynomials), and the fills use tensor ops (shifts, `repeat_interleave`, `F.interpolate`). It is
slow and meant for small inputs; it is not a baseline for benchmarks. The functions named after
the ops take the ops' exact arguments and keywords, and assume them valid (the ops validate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a constant a and a uint32-valued int64 tensor b."""
    p_lo = (a & 0xFFFF) * b  # < 2^48: no int64 overflow
    p_hi = (a >> 16) * b
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(ctr: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of counters `ctr` (..., 4) (uint32 values in int64) under `key` (k0, k1)."""
    c0, c1, c2, c3 = (ctr[..., i].to(torch.int64) for i in range(4))
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _uniform(v: torch.Tensor) -> torch.Tensor:
    """uniform(v) = float32(v) * 2^-32 + 2^-33 in float32: a value in (0, 1]."""
    return v.to(torch.float32) * 2.0**-32 + 2.0**-33


def standard_normals(
    seed: int, stream: int, branch: int, samples: torch.Tensor, m: int
) -> torch.Tensor:
    """The kernels' N(0, 1) draws for `samples` (S,) of one (seed, stream, branch): (S, m)."""
    groups = torch.arange((m + 3) // 4, dtype=torch.int64)
    s = samples.to(torch.int64)[:, None].expand(-1, groups.numel())
    g = groups[None, :].expand(s.shape[0], -1)
    ctr = torch.stack(
        [g, s & _MASK32, (s >> 32) | (branch << 24), torch.full_like(g, stream)], dim=-1
    )
    bits = philox4x32_10(ctr, (seed & _MASK32, seed >> 32))
    u = _uniform(bits).to(torch.float64)
    r = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # lanes 0 and 2
    theta = 2.0 * math.pi * u[..., 1::2]  # lanes 1 and 3
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)  # (S, G, 2, 2)
    return z.reshape(s.shape[0], -1)[:, :m].to(torch.float32)


def kept_columns(height: int, width: int, branch: int) -> torch.Tensor:
    """(H, W/2) column index of x that each packed pixel of branch `branch` comes from."""
    rows = torch.arange(height)[:, None]
    return 2 * torch.arange(width // 2)[None, :] + (rows + branch) % 2


def sub_image(x: torch.Tensor, branch: int) -> torch.Tensor:
    """sub_p(x): (..., C, H, W) -> (..., C, H, W/2)."""
    idx = kept_columns(x.shape[-2], x.shape[-1], branch).to(x.device)
    return torch.gather(x, -1, idx.expand(*x.shape[:-1], -1))


def _place(sub: torch.Tensor, branch: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept pixels at their full-resolution positions (zeros elsewhere), and the kept mask."""
    height = sub.shape[-2]
    idx = kept_columns(height, width, branch).to(sub.device).expand_as(sub)
    placed = torch.zeros(*sub.shape[:-1], width, dtype=sub.dtype, device=sub.device)
    placed.scatter_(-1, idx, sub)
    mask = torch.zeros(height, width, dtype=sub.dtype, device=sub.device)
    mask.scatter_(-1, idx[(0,) * (sub.dim() - 2)], 1.0)
    return placed, mask


def _shift_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of the four 4-connected neighbours of every pixel, zero outside the image."""
    p = F.pad(t, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


def fill(sub: torch.Tensor, branch: int, width: int, mode: str) -> torch.Tensor:
    """Full-resolution image (..., C, H, W) from a (noisy) packed sub-image (..., C, H, W/2)."""
    if mode == "pair":
        return sub.repeat_interleave(2, dim=-1)
    if mode == "bilinear":
        flat = sub.reshape(-1, *sub.shape[-3:])
        up = F.interpolate(flat, size=(sub.shape[-2], width), mode="bilinear", align_corners=False)
        return up.reshape(*sub.shape[:-1], width)
    placed, mask = _place(sub, branch, width)
    if mode == "zeros":
        return placed
    if mode == "neighbors":
        average = _shift_sum(placed) / _shift_sum(mask)
        return torch.where(mask.bool(), placed, average)
    raise ValueError(f"fill must be 'neighbors', 'pair', 'bilinear' or 'zeros', got {mode!r}")


_fill = fill  # noisy_views takes the op's keyword `fill`, which hides this function there


def _sigma_table(
    sigma: float | Sequence[float] | torch.Tensor, images: int, branches: int
) -> list[list[float]]:
    """σ of every (image, branch), each rounded to float32 as the op computes with it."""
    if isinstance(sigma, torch.Tensor):
        table = sigma.detach().cpu().to(torch.float32)
        if table.dim() < 2:  # () or (N,): the same σ for every branch of an image
            table = table.reshape(-1, 1).expand(images, branches)
    else:
        values = [float(sigma)] if isinstance(sigma, (int, float)) else list(sigma)
        table = torch.tensor(values * (branches // len(values)), dtype=torch.float32)
        table = table.expand(images, branches)
    return table.tolist()


def noisy_views(
    x: torch.Tensor,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    num: int,
    seed: int,
    offset: int = 0,
    stream: torch.Tensor | None = None,
    partition: str = "diag",
    fill: str = "neighbors",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """drs_ext.noisy_views for valid arguments (docs/design.md §4), on the CPU.

    sigma takes the op's forms: a float, 1 or P floats (per branch), or a tensor of shape ()
    (all), (N,) (per image) or (N, P) (per image and branch). An unknown partition (or, for
    "diag", fill) raises ValueError rather than a silently wrong layout. Other arguments are not
    checked.
    """
    if partition not in ("diag", "none"):
        raise ValueError(f"partition must be 'diag' or 'none', got {partition!r}")
    n_img, channels, height, width = x.shape
    branches = 2 if partition == "diag" else 1
    sigmas = _sigma_table(sigma, n_img, branches)
    streams = torch.arange(n_img) if stream is None else stream.cpu()
    samples = torch.arange(offset, offset + num, dtype=torch.int64)
    out = torch.empty(n_img, branches, num, channels, height, width)
    x = x.detach().cpu().float()
    for n in range(n_img):
        for p in range(branches):
            if partition == "none":
                z = standard_normals(seed, int(streams[n]), p, samples, x[n].numel())
                out[n, p] = x[n] + sigmas[n][p] * z.reshape(num, channels, height, width)
                continue
            sub = sub_image(x[n], p)
            z = standard_normals(seed, int(streams[n]), p, samples, sub.numel())
            noisy = sub + sigmas[n][p] * z.reshape(num, *sub.shape)
            out[n, p] = _fill(noisy, p, width, fill)
    return out.to(out_dtype or torch.float32)


def vote_counts(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) logits -> (G, K) int64 counts of first-maximum votes; NaN rows vote for none."""
    groups, _, classes = logits.shape
    winners = logits.double().argmax(dim=-1)  # first maximum among equal values
    valid = ~torch.isnan(logits).any(dim=-1)
    counts = torch.zeros(groups, classes, dtype=torch.int64, device=logits.device)
    counts.scatter_add_(1, winners, valid.to(torch.int64))
    return counts
