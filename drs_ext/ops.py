"""Python entry points of the drs_ext operators: the wrappers, fake impls and autograd.

The kernels are torch.ops.drs_ext.noisy_views / vote_counts (csrc/); loading `_C` registers them.
The op validates its own arguments, once, in C++ (csrc/noisy_views_args.h, csrc/vote_counts_args.h;
docs/design.md §4), also when called directly or from a CPU-only build given CUDA tensors. The
wrappers only bring Python values to the schema's types, and reject those that would reach the op
changed (a bool is an int) or be refused by torch's schema in cryptic words (an int beyond int64:
"expected 'int' but found 'int'"; an out_dtype that is not a dtype: "expected 'Optional[int]'").
They read no tensor data (a tensor sigma goes to the op as its tensor `sigma_per_image`), so a
call traces into one graph under torch.compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (registers the ops)

PARTITIONS = ("diag", "none")
FILLS = ("neighbors", "pair", "bilinear", "zeros")


def num_branches(partition: str) -> int:
    return 2 if partition == "diag" else 1


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sigma_args(
    sigma: float | Sequence[float] | torch.Tensor, images: int
) -> tuple[list[float], torch.Tensor | None]:
    """The op's (sigma, sigma_per_image): a float or a sequence of floats is the list (one
    value, or one per branch); a tensor goes as it is (a 0-d one expanded to (N,), a view) with
    the list empty. The op checks counts, shapes, dtypes, devices and values.

    A bool (an int to Python and to the schema) would reach the op as σ = 1.0, and a string is a
    sequence, so both are rejected here.
    """
    if isinstance(sigma, torch.Tensor):
        return [], sigma.expand(images) if sigma.dim() == 0 else sigma
    if _is_real(sigma):
        return [float(sigma)], None
    if isinstance(sigma, Sequence) and not isinstance(sigma, (str, bytes)):
        if all(_is_real(s) for s in sigma):
            return [float(s) for s in sigma], None
    raise TypeError(
        f"noisy_views: sigma must be a float, a sequence of floats or a tensor, got {sigma!r}"
    )


def _int_arg(name: str, value: int) -> int:
    """`value` as the schema's int: a bool would reach the op as 0 or 1, and torch refuses an int
    beyond int64 without naming the range. The op checks the range it needs."""
    if isinstance(value, bool):
        raise TypeError(f"noisy_views: {name} must be an int, got bool ({value})")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        bound = "< 2^63" if value > 0 else ">= -2^63"
        raise ValueError(f"noisy_views: {name} must fit in int64 ({bound}), got {value}")
    return value


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
    """Noisy full-resolution views of every image, branch and sample, in one fused kernel.

    x: (N, C, H, W) float32. Returns (N, P, num, C, H, W) with P = 2 for partition="diag" and
    P = 1 for "none": out[n, p, s] = fill_p(sub_p(x[n]) + sigma[n, p] * eps(seed, stream[n], p,
    offset + s)). `stream` (N,) int64 holds per-image ids (default arange(N)), so an image's
    noise does not depend on the batch it sits in. `fill` is ignored for partition="none".

    sigma is one float (every image and branch), a sequence of 1 or P floats (per branch), or a
    tensor on x's device, float32 or float64: shape (N,) for one σ per image (every branch),
    (N, P) for one per image and branch, or 0-d for one σ for all. Each σ is used as float32
    (float64 values are rounded once, as a float is), so every form holding the same values
    gives bit-identical views. Gradients flow to x and to a tensor sigma that requires them:
    the views are affine in x and linear in σ (out = A x + σ·fill(z)).

    The accepted arguments are listed in docs/design.md §4; a bad one raises a RuntimeError that
    names it. x must be finite, stream ids must lie in [0, 2^32) and a tensor sigma must be
    finite and > 0 in float32. On CUDA, where checking values would cost a host
    synchronisation, a NaN or Inf in x, a stream id out of range or a bad σ in a tensor sigma
    stops the kernel with a device-side assert (fatal to the CUDA context); the CPU kernel
    raises.
    """
    if not isinstance(x, torch.Tensor):  # read below for the default stream
        raise TypeError(f"noisy_views: x must be a torch.Tensor, got {type(x).__name__}")
    images = x.shape[0] if x.dim() > 0 else 0
    if stream is None:
        stream = torch.arange(images, device=x.device)
    sigma_list, sigma_per_image = _sigma_args(sigma, images)
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):  # schema: "Optional[int]"
        raise TypeError(f"noisy_views: out_dtype must be None or a torch.dtype, got {out_dtype!r}")
    return torch.ops.drs_ext.noisy_views.default(
        x,
        sigma_list,
        _int_arg("num", num),
        _int_arg("seed", seed),
        _int_arg("offset", offset),
        stream,
        partition,
        fill,
        out_dtype,
        sigma_per_image,
    )


def vote_counts(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) logits -> (G, K) int64 counts of each row's argmax (first maximum).

    logits may be float32, float64, float16 or bfloat16. A row with a NaN votes for no class
    (conservative: it never adds to a certified class).
    """
    return torch.ops.drs_ext.vote_counts.default(logits)


# Fake impls describe the output of valid arguments for tracing (torch.compile, opcheck). They
# check only the rank they unpack; every other bad argument is left to the op itself, which runs
# its checks when the traced graph runs.
@torch.library.register_fake("drs_ext::noisy_views")
def _noisy_views_fake(
    x, sigma, num, seed, offset, stream, partition, fill, out_dtype, sigma_per_image=None
):
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
# so dL/dx[n] = sum_p sub_p^T fill_p^T sum_s dL/dout[n, p, s], whatever σ (also per image). The
# adjoints below use only shape-generic tensor ops (no caches, no data-dependent masks) so that
# the backward traces under torch.compile / AOT autograd with symbolic shapes.
#
# A σ tensor that requires grad gets its gradient too rather than a silent None: the fills are
# linear, so out[n, p, s] = A_p x[n] + σ[n, p] · fill_p(z[n, p, s]), and fill_p(z) is the op's
# own output for x = 0 and σ = 1 under the same counters (drawn again in the backward, only when
# that gradient is asked for).


def _kept_index(height: int, width: int, branch: int, device: torch.device) -> torch.Tensor:
    """(H, W/2) column of x that each packed pixel of branch p comes from (docs/design.md §2.1)."""
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
    x, _, num, seed, offset, stream, partition, fill, _, *rest = inputs
    ctx.geometry = (partition, fill)
    ctx.num_inputs = len(inputs)
    per_image = rest[0] if rest else None
    ctx.unit_noise = None  # what sigma_grad needs, when a σ tensor requires grad
    if per_image is not None and per_image.requires_grad:
        ctx.unit_noise = (x.shape, x.device, num, seed, offset, partition, fill, per_image.dim())
        ctx.save_for_backward(stream)


def sigma_grad(grad_out: torch.Tensor, stream: torch.Tensor, unit_noise: tuple) -> torch.Tensor:
    """dL/dσ of a σ tensor of `dim` dimensions: sum over samples and pixels of grad_out times
    fill_p(z), the views of x = 0 at σ = 1."""
    shape, device, num, seed, offset, partition, fill, dim = unit_noise
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    unit = torch.ops.drs_ext.noisy_views.default(
        zeros, [1.0], num, seed, offset, stream, partition, fill, None
    )
    grad = (grad_out.float() * unit).sum(dim=(2, 3, 4, 5))  # (N, P)
    return grad if dim == 2 else grad.sum(dim=1)


def _backward(ctx, grad_out):
    grad_x = noisy_views_input_grad(grad_out, *ctx.geometry) if ctx.needs_input_grad[0] else None
    grads = [grad_x] + [None] * (ctx.num_inputs - 1)
    if ctx.unit_noise is not None:
        (stream,) = ctx.saved_tensors
        grads[9] = sigma_grad(grad_out, stream, ctx.unit_noise)
    return tuple(grads)


torch.library.register_autograd("drs_ext::noisy_views", _backward, setup_context=_setup_context)
