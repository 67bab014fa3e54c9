"""The CUDA kernel noisy_views for partition "none", run on the host, against the CPU kernel.

Lab tests (`pytest -m lab`): they run device code where there is no GPU. The per-thread code of
the CUDA kernel, none::write_chunk_group in csrc/cuda/noisy_views_none.cuh, is plain
DRS_HOST_DEVICE C++: one thread takes one Philox element group of every plane of a chunk of up to
`samples` consecutive samples of one image, loads x's 4 elements once (one vector load where
aligned) and, per sample, draws 4 normals and writes them (one vector store where aligned, element
by element otherwise). python_tests/lab/none_host.cpp runs the kernel's loop, every group of every
chunk, with the launcher's choice of the vector path. Tested here:

- its output equals the CPU kernel's (float32 within the CPU-vs-CUDA tolerance, 16-bit outputs
  within one ulp of it and equal to the float32 output rounded) on the CUDA tests' shapes, aligned
  or not, for chunks of 1, 2, 3 and 16 samples: with num = 5 a chunk of 2 or 3 leaves the last
  chunk of each row short, and 16 is more than num; the float32 output is bit-identical whatever
  the chunk size;
- the vector stores, exactly: on the vector path one per plane and group, none off it;
- the harness fails on a write outside the output, an output never written (NaN-filled output), a
  vector store outside the output or not aligned to its size;
- none::chunk_samples, the launcher's chunk size, against a Python computation of its rule;
- the output against the float64 oracle drs_ext.reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from lab_support import (
    DTYPES,
    NONE_SHAPES,
    assert_close_to,
    assert_within_ulp,
    load_host_harness,
    parity_atol,
    random_images,
    reference_atol,
)

import drs_ext  # noqa: F401  (registers torch.ops.drs_ext)
from drs_ext import reference

pytestmark = pytest.mark.lab

# The CUDA tests' shapes, plus C·H·W below one group (3) and a multiple of 4 with N > 1.
SHAPES: list[tuple[int, int, int, int]] = [*NONE_SHAPES, (1, 1, 1, 3), (3, 2, 2, 6)]
# Samples per chunk: one, two and three (neither divides num = 5: a short last chunk per row),
# and kMaxChunkSamples, more than num.
CHUNK_SAMPLES: tuple[int, ...] = (1, 2, 3, 16)
MAX_CHUNK_SAMPLES = 16  # none::kMaxChunkSamples
SIGMA, SEED, OFFSET = [0.5], 20240611, 5


@pytest.fixture(scope="module")
def none_kernel(tmp_path_factory: pytest.TempPathFactory) -> object:
    """torch.ops.drs_host_none, compiled from the harness once for this module."""
    return load_host_harness(
        "none_host.cpp", "drs_host_none", tmp_path_factory.mktemp("drs_host_none")
    )


def inputs(shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """x, num and stream ids: num = 5 (short last chunks), 3 on ImageNet-sized images (cheap,
    still a short last chunk for chunks of 2)."""
    x = random_images(shape, seed=sum(shape))
    num = 3 if shape[-1] * shape[-2] > 10_000 else 5
    return x, num, torch.arange(shape[0], dtype=torch.int64) * 7 + 3


def run_host(
    none_kernel: object,
    x: torch.Tensor,
    num: int,
    stream: torch.Tensor,
    out_dtype: torch.dtype,
    samples: int,
) -> tuple[torch.Tensor, dict[str, int]]:
    out, stats = none_kernel.run(x, SIGMA, num, SEED, OFFSET, stream, out_dtype, samples)  # type: ignore[attr-defined]
    assert bool(torch.isfinite(out).all()), "NaN outputs: never written"
    return out, dict(zip(("stores", "vectorize"), stats.tolist(), strict=True))


def run_cpu(
    x: torch.Tensor, num: int, stream: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return torch.ops.drs_ext.noisy_views(
        x, SIGMA, num, SEED, OFFSET, stream, "none", "neighbors", out_dtype
    )


def unaligned(x: torch.Tensor) -> torch.Tensor:
    """x's values in a contiguous tensor that starts one float past a 16-byte boundary."""
    storage = torch.empty(x.numel() + 1)
    view = storage[1:].view(x.shape)
    view.copy_(x)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_host_none_kernel_equals_cpu_kernel(none_kernel: object, out_dtype: torch.dtype) -> None:
    for shape in SHAPES:
        x, num, stream = inputs(shape)
        images, plane = shape[0], shape[1] * shape[2] * shape[3]
        cpu = run_cpu(x, num, stream, out_dtype)
        for x_in in (x, unaligned(x)):
            vector_path = plane % 4 == 0 and x_in.data_ptr() % 16 == 0
            # Every chunk size must give the same float32 values, bit for bit.
            host32, _ = run_host(none_kernel, x_in, num, stream, torch.float32, 1)
            for samples in CHUNK_SAMPLES:
                host, stats = run_host(none_kernel, x_in, num, stream, out_dtype, samples)
                assert host.shape == cpu.shape == (images, 1, num, *shape[1:])
                assert stats["vectorize"] == vector_path
                # On the vector path a store per (plane, group); no vector store off it.
                groups = plane // 4
                assert stats["stores"] == (images * num * groups if vector_path else 0), samples
                if out_dtype == torch.float32:
                    assert_close_to(host, cpu, parity_atol(x, SIGMA))
                    assert torch.equal(host, host32), samples
                else:
                    assert_within_ulp(host, cpu, parity_atol(x, SIGMA))
                    assert torch.equal(host, host32.to(out_dtype)), samples


def test_host_none_kernel_rejects_empty_chunks(none_kernel: object) -> None:
    x, num, stream = inputs((1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="samples per chunk must be >= 1"):
        run_host(none_kernel, x, num, stream, torch.float32, 0)


def expected_chunk_samples(images: int, num: int, blocks_per_chunk: int, min_blocks: int) -> int:
    """The launcher's rule: the largest s <= 16 whose chunks give at least min_blocks blocks,
    images * ceil(num / s) chunks of blocks_per_chunk blocks each; else 1."""
    enough = [
        s
        for s in range(1, MAX_CHUNK_SAMPLES + 1)
        if images * -(-num // s) * blocks_per_chunk >= min_blocks
    ]
    return max(enough, default=1)


def test_chunk_samples(none_kernel: object) -> None:
    def chunk_samples(images: int, num: int, blocks_per_chunk: int, min_blocks: int) -> int:
        return none_kernel.chunk_samples(images, num, blocks_per_chunk, min_blocks)  # type: ignore[attr-defined]

    # Plenty of blocks: the largest chunk (ImageNet-sized images: 147 blocks per chunk, the
    # minimum of an H100, 32 blocks per multiprocessor).
    assert chunk_samples(1, 100_000, 147, 32 * 132) == MAX_CHUNK_SAMPLES
    assert chunk_samples(64, 16, 1, 0) == MAX_CHUNK_SAMPLES
    # The largest chunk that gives the launch min_blocks blocks, not only a halving of 16:
    # 17 and 20 chunks for 6 and 5 samples, 12 and 13 for 9 and 8.
    assert chunk_samples(1, 100, 1, 20) == 5
    assert chunk_samples(1, 100, 1, 13) == 8
    # Exactly min_blocks is enough: 2 images, 2 chunks of 16 each, 3 blocks per chunk; one more
    # and 3 chunks of 15 each (18 blocks) are needed.
    assert chunk_samples(2, 32, 3, 12) == 16
    assert chunk_samples(2, 32, 3, 13) == 15
    # Not enough even with one sample per chunk: 1.
    assert chunk_samples(1, 3, 1, 1000) == 1
    assert chunk_samples(0, 5, 1, 1) == 1
    # Against the rule over a grid.
    for images, num, blocks_per_chunk, min_blocks in itertools.product(
        (0, 1, 2, 3, 7), (1, 2, 3, 5, 16, 17, 33, 100), (1, 2, 5), (0, 1, 4, 10, 33, 64, 200)
    ):
        got = chunk_samples(images, num, blocks_per_chunk, min_blocks)
        want = expected_chunk_samples(images, num, blocks_per_chunk, min_blocks)
        assert got == want, (images, num, blocks_per_chunk, min_blocks)


def test_host_none_kernel_equals_reference(none_kernel: object) -> None:
    """Against the independent float64 oracle, not only against the CPU kernel (chunks of 3 of
    num = 5 samples: a short last chunk)."""
    x, num, stream = inputs((2, 3, 6, 10))
    host, _ = run_host(none_kernel, x, num, stream, torch.float32, 3)
    ref = reference.noisy_views(
        x, SIGMA, num=num, seed=SEED, offset=OFFSET, stream=stream, partition="none"
    )
    assert_close_to(host, ref, reference_atol(x, SIGMA))


def test_host_none_kernel_with_sigma_per_image(none_kernel: object) -> None:
    """σ per image: every thread of a chunk reads its row's σ (locate, once per chunk). Chunks
    of every size equal the CPU kernel given the same tensor."""
    x, num, stream = inputs((3, 1, 3, 5))
    sigma = torch.tensor([0.25, 1.5, 0.75], dtype=torch.float64)
    cpu = torch.ops.drs_ext.noisy_views(
        x, [], num, SEED, OFFSET, stream, "none", "neighbors", None, sigma
    )
    for samples in CHUNK_SAMPLES:
        host, _ = none_kernel.run(  # type: ignore[attr-defined]
            x, [], num, SEED, OFFSET, stream, None, samples, sigma[:, None]
        )
        assert_close_to(host, cpu, parity_atol(x, sigma.tolist()))
