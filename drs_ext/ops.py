"""Python entry points of the drs_ext operators: argument handling, fake impls and autograd.

The kernels are torch.ops.drs_ext.noisy_views / vote_counts (csrc/); loading `_C` registers them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _C

PARTITIONS = ("diag", "none")
FILLS = ("neighbors", "pair", "bilinear", "zeros")
_MAX_SEED = 2**63
_MAX_STREAM = 2**32


def num_branches(partition: str) -> int:
    return 2 if partition == "diag" else 1


def _sigma_list(sigma: float | Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.tolist()
    values = [sigma] if isinstance(sigma, (int, float)) else list(sigma)
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in values):
        raise TypeError(f"sigma must be a float or a sequence of floats, got {sigma!r}")
    return [float(s) for s in values]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_device(x: torch.Tensor) -> None:
    if x.is_cuda and not _C.built_with_cuda:
        raise RuntimeError(
            "drs_ext was built without CUDA kernels, so it cannot run on CUDA tensors. Rebuild "
            "where torch has CUDA and nvcc is on PATH (or with FORCE_CUDA=1 and "
            "TORCH_CUDA_ARCH_LIST set): pip install --no-build-isolation -e ."
        )


def noisy_views(
    x: torch.Tensor,
    sigma: float | Sequence[float],
    *,
    num: int,
    seed: int,
    offset: int = 0,
    stream: torch.Tensor | None = None,
    partition: str = "diag",
    fill: str = "neighbors",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Noisy full-resolution views of every image, branch and sample, in one fused kernel.

    x: (N, C, H, W) float32. Returns (N, P, num, C, H, W) with P = 2 for partition="diag" and
    P = 1 for "none": out[n, p, s] = fill_p(sub_p(x[n]) + sigma_p * eps(seed, stream[n], p,
    offset + s)). `stream` (N,) int64 holds per-image ids (default arange(N)), so an image's
    noise does not depend on the batch it sits in. `fill` is ignored for partition="none".
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_device(x)
    sigmas = _sigma_list(sigma)
    num = _check_int("num", num, 1)
    seed = _check_int("seed", seed, 0, _MAX_SEED)
    offset = _check_int("offset", offset, 0)
    if stream is None:
        stream = torch.arange(x.shape[0] if x.dim() > 0 else 0, device=x.device)
    elif isinstance(stream, torch.Tensor) and stream.numel() > 0 and not stream.is_cuda:
        lo, hi = int(stream.min()), int(stream.max())
        if lo < 0 or hi >= _MAX_STREAM:
            raise ValueError(f"stream ids must lie in [0, 2^32), got values in [{lo}, {hi}]")
    return torch.ops.drs_ext.noisy_views(
        x, sigmas, num, seed, offset, stream, partition, fill, out_dtype
    )


def vote_counts(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) logits -> (G, K) int64 counts of each row's argmax (first maximum).

    A row with a NaN votes for no class (conservative: it never adds to a certified class).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    _check_device(logits)
    return torch.ops.drs_ext.vote_counts(logits)


@torch.library.register_fake("drs_ext::noisy_views")
def _noisy_views_fake(x, sigma, num, seed, offset, stream, partition, fill, out_dtype):
    torch._check(
        x.dim() == 4, lambda: f"noisy_views: x must have shape (N, C, H, W), got {x.shape}"
    )
    n, c, h, w = x.shape
    shape = (n, num_branches(partition), num, c, h, w)
    return x.new_empty(shape, dtype=out_dtype or torch.float32)


@torch.library.register_fake("drs_ext::vote_counts")
def _vote_counts_fake(logits):
    torch._check(
        logits.dim() == 3, lambda: f"vote_counts: logits must be (G, S, K), got {logits.shape}"
    )
    return logits.new_empty((logits.shape[0], logits.shape[2]), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Autograd. The views are affine in x: out[n, p, s] = A_p x[n] + noise, with A_p = fill_p ∘ sub_p a
# fixed sparse matrix, so dL/dx[n] = sum_p A_p^T sum_s dL/dout[n, p, s]. A_p is stored as
# (output pixel, input pixel, weight) triplets per branch.


@functools.lru_cache(maxsize=64)
def _fill_triplets(
    height: int, width: int, partition: str, fill: str, branch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    pix = rows * width + cols
    if partition == "none":
        flat = pix.reshape(-1)
        return flat, flat, torch.ones(flat.numel())

    def kept(i: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # x pixel of packed (i, k)
        return i * width + 2 * k + (i + branch) % 2

    half = cols // 2
    if fill == "pair":
        terms = [(pix, kept(rows, half), torch.ones(height, width))]
    elif fill == "bilinear":
        odd = cols % 2 == 1
        wp = width // 2
        left = torch.where(odd, half, (half - 1).clamp(min=0))
        right = torch.where(odd, (half + 1).clamp(max=wp - 1), half)
        w_left = torch.where(odd, 0.75, torch.where(half == 0, 0.5, 0.25))
        terms = [(pix, kept(rows, left), w_left), (pix, kept(rows, right), 1.0 - w_left)]
    else:
        is_kept = (rows + cols) % 2 == branch
        terms = [(pix[is_kept], pix[is_kept], torch.ones(int(is_kept.sum())))]
        if fill == "neighbors":
            shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
            inside = [
                (rows + di >= 0) & (rows + di < height) & (cols + dj >= 0) & (cols + dj < width)
                for di, dj in shifts
            ]
            count = sum(m.to(torch.float32) for m in inside)
            for (di, dj), m in zip(shifts, inside, strict=True):
                sel = m & ~is_kept
                terms.append((pix[sel], (pix + di * width + dj)[sel], 1.0 / count[sel]))
    out_pix = torch.cat([t[0].reshape(-1) for t in terms])
    in_pix = torch.cat([t[1].reshape(-1) for t in terms])
    weight = torch.cat([torch.as_tensor(t[2]).expand_as(t[0]).reshape(-1) for t in terms])
    return out_pix, in_pix, weight.float()


def noisy_views_input_grad(
    grad_out: torch.Tensor, height: int, width: int, partition: str, fill: str
) -> torch.Tensor:
    """A^T applied to grad_out (N, P, S, C, H, W): the gradient with respect to x (N, C, H, W)."""
    summed = grad_out.float().sum(dim=2).flatten(-2)  # (N, P, C, H*W)
    grad_x = torch.zeros(*summed.shape[:1], summed.shape[2], height * width, device=summed.device)
    for p in range(summed.shape[1]):
        out_pix, in_pix, weight = (
            t.to(summed.device) for t in _fill_triplets(height, width, partition, fill, p)
        )
        grad_x.index_add_(-1, in_pix, summed[:, p].index_select(-1, out_pix) * weight)
    return grad_x.reshape(grad_x.shape[0], grad_x.shape[1], height, width)


def _setup_context(ctx, inputs, output):
    x, _, _, _, _, _, partition, fill, _ = inputs
    ctx.geometry = (x.shape[2], x.shape[3], partition, fill)


def _backward(ctx, grad_out):
    grad_x = noisy_views_input_grad(grad_out, *ctx.geometry)
    return grad_x, None, None, None, None, None, None, None, None


torch.library.register_autograd("drs_ext::noisy_views", _backward, setup_context=_setup_context)
