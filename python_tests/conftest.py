"""Shared helpers of the kernel tests (noisy_views, vote_counts, Philox).

The helpers are plain functions imported by the test modules (`from conftest import ...`); the
oracles they compare against are drs_ext.reference, scipy, closed forms and known-answer vectors,
never stored outputs of our own kernels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import drs_ext

PARTITIONS: tuple[str, ...] = ("diag", "none")
FILLS: tuple[str, ...] = ("neighbors", "pair", "bilinear", "zeros")
MAX_SEED = 2**63 - 1
SAMPLE_SPACE = 2**56  # sample indices offset .. offset+num-1 must lie in [0, 2^56)


@pytest.fixture(autouse=True)
def _seed_torch() -> Iterator[None]:
    """Every test starts from the same global torch RNG state (reproducible random inputs)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def load_host_harness(source: str, namespace: str, build_dir: Path) -> object:
    """torch.ops.<namespace>, registered by python_tests/host/<source>: a host run of CUDA
    device code, compiled with the kernels' include paths (csrc, csrc/include, csrc/cuda)."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    cpp_extension.load(
        name=namespace,
        sources=[str(Path(__file__).resolve().parent / "host" / source)],
        extra_include_paths=[str(csrc), str(csrc / "include"), str(csrc / "cuda")],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, namespace)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(shape: Sequence[int], seed: int, scale: float = 2.0) -> torch.Tensor:
    """Float32 images with values of both signs, a few units in size (any finite x is valid)."""
    gen = make_generator(seed)
    return torch.randn(*shape, generator=gen) * scale + 0.5


def branches(partition: str) -> int:
    return 2 if partition == "diag" else 1


def reference_atol(x: torch.Tensor, sigma: float | Sequence[float]) -> float:
    """Kernel vs reference tolerance 2e-6·(1 + max|x| + 7·max σ).

    The kernels use float32 polynomials for ln and sincos, the reference float64 libm; a standard
    normal from Box–Muller with u in (0, 1] never exceeds sqrt(66 ln 2) < 7 in magnitude.
    """
    sig = [float(sigma)] if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    return 2e-6 * (1.0 + float(x.abs().max()) + 7.0 * max(sig))


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Same shape and dtype, all finite, max |actual - expected| <= atol."""
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
    """(H, W) bool mask of the pixels (i, j) with (i + j) mod 2 == branch (DESIGN.md §2.1)."""
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
    seed: int = 1,
    stream: int = 0,
    offset: int = 0,
    partition: str = "none",
    num: int = 2,
    shape: tuple[int, int, int] = (3, 4, 6),
) -> list[torch.Tensor]:
    """x = 0, σ = 1: per branch, the standard normals (num, m) in sub-image element order."""
    out = drs_ext.noisy_views(
        torch.zeros(1, *shape),
        1.0,
        num=num,
        seed=seed,
        offset=offset,
        stream=torch.tensor([stream]),
        partition=partition,
        fill="zeros",
    )
    if partition == "none":
        return [out[0, 0].reshape(num, -1)]
    return [packed(out[0, p], p).reshape(num, -1) for p in range(2)]
