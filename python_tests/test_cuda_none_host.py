"""The CUDA kernel noisy_views for partition "none", run on the host, against the CPU kernel.

CI has no GPU, so test_cuda.py never runs there. The per-thread code of the CUDA kernel,
none::write_group in csrc/cuda/noisy_views_none.cuh (one Philox element group: 4 normals, one
vector load of x and one vector store where aligned, element by element otherwise), is plain
DRS_HOST_DEVICE C++: python_tests/host/none_host.cpp runs it for every group of every plane with
the launcher's choice of the vector path. Its output must equal the CPU kernel's (float32 within
the CPU-vs-CUDA tolerance, 16-bit outputs within one ulp of it and equal to the float32 output
rounded) on test_cuda.py's shapes, aligned or not. The harness also fails on a write outside the
output, an output never written (NaN-filled output) and a vector access not aligned to its size.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close_to,
    assert_within_ulp,
    load_host_harness,
    parity_atol,
    random_images,
    reference_atol,
)
from test_cuda import NONE_SHAPES as CUDA_NONE_SHAPES

import drs_ext  # noqa: F401  (registers torch.ops.drs_ext)
from drs_ext import reference

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# test_cuda.py's shapes, plus C·H·W below one group (3) and a multiple of 4 with N > 1.
SHAPES: list[tuple[int, int, int, int]] = [*CUDA_NONE_SHAPES, (1, 1, 1, 3), (3, 2, 2, 6)]
SIGMA, SEED, OFFSET = [0.5], 20240611, 5


@pytest.fixture(scope="module")
def none_kernel(tmp_path_factory: pytest.TempPathFactory) -> object:
    """torch.ops.drs_host_none, compiled from the harness once for this module."""
    return load_host_harness(
        "none_host.cpp", "drs_host_none", tmp_path_factory.mktemp("drs_host_none")
    )


def inputs(shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """x, num and stream ids as test_cuda.py draws them."""
    x = random_images(shape, seed=sum(shape))
    num = 2 if shape[-1] * shape[-2] > 10_000 else 3
    return x, num, torch.arange(shape[0], dtype=torch.int64) * 7 + 3


def run_host(
    none_kernel: object, x: torch.Tensor, num: int, stream: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, int]]:
    out, stats = none_kernel.run(x, SIGMA, num, SEED, OFFSET, stream, out_dtype)  # type: ignore[attr-defined]
    assert bool(torch.isfinite(out).all()), "NaN outputs: never written"
    return out, dict(zip(("vec_accesses", "vectorize"), stats.tolist(), strict=True))


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
        cpu = run_cpu(x, num, stream, out_dtype)
        for x_in in (x, unaligned(x)):
            host, stats = run_host(none_kernel, x_in, num, stream, out_dtype)
            assert host.shape == cpu.shape == (shape[0], 1, num, *shape[1:])
            plane = shape[1] * shape[2] * shape[3]
            vector_path = plane % 4 == 0 and x_in.data_ptr() % 16 == 0
            assert stats["vectorize"] == vector_path
            # A load and a store per group on the vector path; none off it.
            groups = shape[0] * num * (plane // 4)
            assert stats["vec_accesses"] == (2 * groups if vector_path else 0)
            if out_dtype == torch.float32:
                assert_close_to(host, cpu, parity_atol(x, SIGMA))
            else:
                assert_within_ulp(host, cpu, parity_atol(x, SIGMA))
                host32, _ = run_host(none_kernel, x_in, num, stream, torch.float32)
                assert torch.equal(host, host32.to(out_dtype))


def test_host_none_kernel_equals_reference(none_kernel: object) -> None:
    """Against the independent float64 oracle, not only against the CPU kernel."""
    x, num, stream = inputs((2, 3, 6, 10))
    host, _ = run_host(none_kernel, x, num, stream, torch.float32)
    ref = reference.noisy_views(
        x, SIGMA, num=num, seed=SEED, offset=OFFSET, stream=stream, partition="none"
    )
    assert_close_to(host, ref, reference_atol(x, SIGMA))
