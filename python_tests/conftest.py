"""Shared fixtures and helpers of the test suite.

`device` runs a test once on the CPU and once on CUDA, the CUDA run skipped (with the reason)
where there is no GPU or drs_ext was built without its CUDA kernels; `requires_cuda` marks the
tests that only mean something on a GPU (CUDA against CPU parity, launch shapes, CUDA graphs).
The helpers are plain functions imported by the test modules (`from conftest import ...`); the
oracles they compare against are drs_ext.reference, scipy, closed forms and known-answer vectors,
never stored outputs of our own kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

import drs_ext
from drs_ext.ops import num_branches

PARTITIONS: tuple[str, ...] = ("diag", "none")
FILLS: tuple[str, ...] = ("neighbors", "pair", "bilinear", "zeros")
# Every (partition, fill) that computes something different: the fill is ignored for "none"
# (test_noisy_views.test_fill_is_ignored_without_a_partition checks that once).
CASES: list[tuple[str, str]] = [("diag", f) for f in FILLS] + [("none", "neighbors")]
MAX_SEED = 2**63 - 1
SAMPLE_SPACE = 2**56  # sample indices offset .. offset+num-1 must lie in [0, 2^56)

CUDA_READY = torch.cuda.is_available() and drs_ext.built_with_cuda
requires_cuda = pytest.mark.skipif(
    not CUDA_READY,
    reason=(
        "needs a CUDA GPU and drs_ext built with its CUDA kernels "
        f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
        f"drs_ext.built_with_cuda={drs_ext.built_with_cuda})"
    ),
)


DEVICE_PARAMS = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a test runs on: the CPU, and the current CUDA device (with its index, as
    tensors report it) where CUDA_READY."""
    if request.param == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_torch() -> Iterator[None]:
    """Every test starts from the same global torch RNG state (reproducible random inputs)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(shape: Sequence[int], seed: int, scale: float = 2.0) -> torch.Tensor:
    """Float32 images with values of both signs, a few units in size (any finite x is valid)."""
    gen = make_generator(seed)
    return torch.randn(*shape, generator=gen) * scale + 0.5


branches = num_branches


def reference_atol(x: torch.Tensor, sigma: float | Sequence[float]) -> float:
    """Kernel vs reference tolerance 2e-6·(1 + max|x| + 7·max σ).

    The kernels use float32 polynomials for ln and sincos, the reference float64 libm; a standard
    normal from Box–Muller with u in (0, 1] never exceeds sqrt(66 ln 2) < 7 in magnitude.
    """
    sig = [float(sigma)] if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    return 2e-6 * (1.0 + float(x.abs().max()) + 7.0 * max(sig))


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Same shape and dtype, all finite, max |actual - expected| <= atol (any devices)."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert bool(torch.isfinite(actual).all()), "non-finite values in the kernel output"
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3e} > tolerance {atol:.3e}"


def parity_atol(x: torch.Tensor, sigma: Sequence[float]) -> float:
    """Float32 outputs of two kernels that evaluate the same float32 formulas (drs/normal.h), up
    to FMA contraction (CPU vs CUDA, CPU vs the CUDA tiling run on the host): they agree to a few
    ulp of the largest value |x| + 7σ."""
    return 1e-5 * (1.0 + float(x.abs().max()) + 6.0 * max(sigma))


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at |t|, subnormals included, as float32."""
    info = torch.finfo(t.dtype)
    mag = t.float().abs().clamp(min=info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_within_ulp(actual: torch.Tensor, expected: torch.Tensor, atol32: float) -> None:
    """16-bit outputs: each is its float32 value rounded once, and the float32 values differ by
    at most atol32, so the two differ by at most atol32 + 1 ulp of the 16-bit dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    actual, expected = actual.cpu(), expected.cpu()
    err = (actual.float() - expected.float()).abs()
    bound = torch.maximum(ulp(actual), ulp(expected)) + atol32
    assert bool((err <= bound).all()), f"max error / bound {float((err / bound).max()):.3f}"


def kept_mask(height: int, width: int, branch: int) -> torch.Tensor:
    """(H, W) bool mask of the pixels (i, j) with (i + j) mod 2 == branch (docs/design.md §2.1)."""
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return (rows + cols) % 2 == branch


def packed(full: torch.Tensor, branch: int) -> torch.Tensor:
    """(..., H, W) -> (..., H, W/2): sub[..., i, k] = full[..., i, 2k + (i + branch) mod 2].

    Written with explicit row slicing (independent of drs_ext.reference.sub_image).
    """
    rows = [full[..., i, (i + branch) % 2 :: 2] for i in range(full.shape[-2])]
    return torch.stack(rows, dim=-2)


def noise_planes(
    *,
    device: torch.device | str = "cpu",
    seed: int = 1,
    stream: int = 0,
    offset: int = 0,
    partition: str = "none",
    num: int = 2,
    shape: tuple[int, int, int] = (3, 4, 6),
) -> list[torch.Tensor]:
    """x = 0, σ = 1: per branch, the standard normals (num, m) in sub-image element order, on
    the CPU whatever device drew them."""
    out = drs_ext.noisy_views(
        torch.zeros(1, *shape, device=device),
        1.0,
        num=num,
        seed=seed,
        offset=offset,
        stream=torch.tensor([stream], device=device),
        partition=partition,
        fill="zeros",
    ).cpu()
    if partition == "none":
        return [out[0, 0].reshape(num, -1)]
    return [packed(out[0, p], p).reshape(num, -1) for p in range(2)]


class MeanMargin(nn.Module):
    """Three classes by the sign of mean(x) - 1/2, computed in float64: the vote of a view
    flips between devices only if its mean lies within ~1e-9 of 1/2."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        t = (v.double().mean(dim=(1, 2, 3)) - 0.5) * 100.0
        return torch.stack([t, torch.zeros_like(t), -t], dim=1).float()


def bincount_oracle(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) -> (G, K): counts of torch.argmax over the rows without NaN, on the CPU."""
    logits = logits.cpu()
    groups, rows, classes = logits.shape
    counts = torch.zeros(groups, classes, dtype=torch.int64)
    if rows == 0:
        return counts
    valid = ~torch.isnan(logits).any(dim=-1)
    return counts.scatter_add_(1, torch.argmax(logits, dim=-1), valid.long())


def tied_logits(groups: int, rows: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Few distinct values (many ties), some rows with a NaN, some with ±inf."""
    gen = make_generator(groups * 1000 + rows + classes)
    logits = torch.randint(-2, 3, (groups, rows, classes), generator=gen).to(dtype)
    pick = torch.rand(groups, rows, generator=gen)
    cols = torch.randint(0, classes, (groups, rows), generator=gen)
    g, s = torch.nonzero(pick < 0.05, as_tuple=True)
    logits[g, s, cols[g, s]] = float("nan")
    g, s = torch.nonzero((pick >= 0.05) & (pick < 0.08), as_tuple=True)
    logits[g, s, cols[g, s]] = float("inf")
    g, s = torch.nonzero((pick >= 0.08) & (pick < 0.1), as_tuple=True)
    logits[g, s] = float("-inf")
    return logits


class RandomVoter(nn.Module):
    """Votes for class c with probability probs[c], independently for every view."""

    def __init__(self, probs: list[float], seed: int) -> None:
        super().__init__()
        self.probs = torch.tensor(probs, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        votes = torch.multinomial(self.probs, views.shape[0], replacement=True, generator=self.gen)
        return nn.functional.one_hot(votes, self.probs.numel()).float()


def binomial_ceiling(rate: float, reps: int) -> float:
    """rate plus 3 binomial standard errors: the tolerance of an observed frequency."""
    return rate + 3.0 * math.sqrt(rate * (1.0 - rate) / reps)
