"""Python entry points of the drs_ext operators: argument handling, fake impls and autograd.

The kernels are torch.ops.drs_ext.noisy_views / vote_counts (csrc/); loading `_C` registers them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C

PARTITIONS = ("diag", "none")
FILLS = ("neighbors", "pair", "bilinear", "zeros")
_MAX_SEED = 2**63
_MAX_SAMPLES = 2**56  # sample indices offset .. offset+num-1 (csrc/include/drs/philox.h)


def num_branches(partition: str) -> int:
    return 2 if partition == "diag" else 1


def _sigma_list(sigma: float | Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.tolist()
    if isinstance(sigma, (int, float)):
        values = [sigma]
    elif isinstance(sigma, Sequence):
        values = list(sigma)
    else:
        raise TypeError(f"sigma must be a float or a sequence of floats, got {sigma!r}")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in values):
        raise TypeError(f"sigma must be a float or a sequence of floats, got {sigma!r}")
    return [float(s) for s in values]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f">= {low} and < {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
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
    x must be finite and stream ids must lie in [0, 2^32). On CUDA, where checking would cost a
    host synchronisation, a NaN or Inf in x or a stream id out of range stops the kernel with a
    device-side assert (fatal to the CUDA context); the CPU kernel raises a RuntimeError.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_device(x)
    sigmas = _sigma_list(sigma)
    num = _check_int("num", num, 1, _MAX_SAMPLES + 1)
    seed = _check_int("seed", seed, 0, _MAX_SEED)
    offset = _check_int("offset", offset, 0, _MAX_SAMPLES)
    # Stream ids are range-checked by the kernels (reading them here would cost a host sync on
    # CUDA and break torch.compile, which cannot branch on tensor data).
    if stream is None:
        stream = torch.arange(x.shape[0] if x.dim() > 0 else 0, device=x.device)
    return torch.ops.drs_ext.noisy_views.default(
        x, sigmas, num, seed, offset, stream, partition, fill, out_dtype
    )


def vote_counts(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) logits -> (G, K) int64 counts of each row's argmax (first maximum).

    A row with a NaN votes for no class (conservative: it never adds to a certified class).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    _check_device(logits)
    return torch.ops.drs_ext.vote_counts.default(logits)


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
# Autograd. The views are affine in x: out[n, p, s] = A_p x[n] + noise with A_p = fill_p ∘ sub_p,
# so dL/dx[n] = sum_p sub_p^T fill_p^T sum_s dL/dout[n, p, s]. The adjoints below use only
# shape-generic tensor ops (no caches, no data-dependent masks) so that the backward traces under
# torch.compile / AOT autograd with symbolic shapes.


def _kept_index(height: int, width: int, branch: int, device: torch.device) -> torch.Tensor:
    """(H, W/2) column of x that each packed pixel of the branch comes from (DESIGN.md §2.1)."""
    rows = torch.arange(height, device=device)[:, None]
    return 2 * torch.arange(width // 2, device=device)[None, :] + (rows + branch) % 2


def _neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the in-image 4-neighbours of every pixel (zero padding)."""
    p = torch.nn.functional.pad(t, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


def _fill_adjoint(g: torch.Tensor, branch: int, fill: str) -> torch.Tensor:
    """fill_p^T: full-resolution (..., H, W) gradient -> packed (..., H, W/2) gradient."""
    height, width = g.shape[-2], g.shape[-1]
    idx = _kept_index(height, width, branch, g.device).expand(*g.shape[:-1], -1)
    if fill == "pair":  # out[2k] = out[2k+1] = y[k]
        return g[..., 0::2] + g[..., 1::2]
    if fill == "bilinear":
        # out[2t] = y[t-1]/4 + 3y[t]/4 (out[0] = y[0]); out[2t+1] = 3y[t]/4 + y[t+1]/4, the
        # last one clamped to y[W/2-1]. Each y[t] collects its weights from both parities.
        even, odd = g[..., 0::2], g[..., 1::2]
        t = torch.arange(width // 2, device=g.device)
        first, last = (t == 0).to(g.dtype), (t == width // 2 - 1).to(g.dtype)
        pad = torch.nn.functional.pad
        return (
            0.75 * (even + odd)
            + 0.25 * (pad(even[..., 1:], (0, 1)) + pad(odd[..., :-1], (1, 0)))
            + 0.25 * (first * even + last * odd)
        )
    if fill == "neighbors":
        # A dropped pixel is the mean of its in-image 4-neighbours, all of them kept.
        rows = torch.arange(height, device=g.device)[:, None]
        cols = torch.arange(width, device=g.device)[None, :]
        kept = ((rows + cols) % 2 == branch).to(g.dtype)
        count = _neighbour_sum(torch.ones(height, width, dtype=g.dtype, device=g.device))
        g = g + _neighbour_sum(g * (1 - kept) / count)
    return torch.gather(g, -1, idx)  # "zeros" and the kept part of "neighbors"


def noisy_views_input_grad(grad_out: torch.Tensor, partition: str, fill: str) -> torch.Tensor:
    """A^T applied to grad_out (N, P, S, C, H, W): the gradient with respect to x (N, C, H, W)."""
    summed = grad_out.float().sum(dim=2)  # (N, P, C, H, W)
    if partition == "none":
        return summed[:, 0]
    height, width = summed.shape[-2], summed.shape[-1]
    grad_x = torch.zeros_like(summed[:, 0])
    for p in range(summed.shape[1]):
        idx = _kept_index(height, width, p, summed.device).expand_as(grad_x[..., : width // 2])
        grad_x = grad_x.scatter_add(-1, idx, _fill_adjoint(summed[:, p], p, fill))
    return grad_x


def _setup_context(ctx, inputs, output):
    _, _, _, _, _, _, partition, fill, _ = inputs
    ctx.geometry = (partition, fill)


def _backward(ctx, grad_out):
    grad_x = noisy_views_input_grad(grad_out, *ctx.geometry)
    return grad_x, None, None, None, None, None, None, None, None


torch.library.register_autograd("drs_ext::noisy_views", _backward, setup_context=_setup_context)
