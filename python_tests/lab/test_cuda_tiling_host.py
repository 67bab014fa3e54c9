"""The CUDA kernel's "diag" tiling, run on the host, against the CPU kernel and drs_ext.reference.

Lab tests (`pytest -m lab`): they run device code where there is no GPU. The per-block code of the
CUDA kernel noisy_views for partition "diag", diag::run_tile in csrc/cuda/noisy_views_diag.cuh
(tiles of the packed plane drawn into a shared-memory window with their halo, then expanded by the
fill: items of 8 outputs inside one row through diag::fill_slot, the others pixel by pixel), is
plain DRS_HOST_DEVICE C++: python_tests/lab/diag_tiling_host.cpp compiles it for the host and
runs it chunk by chunk (a block's consecutive samples of one image and branch, a shared-memory
window each), tile by tile, with the items of each phase in a shuffled order (the threads of a
block run them in any order between two barriers). Its output must equal the CPU kernel's
(float32 within the CPU-vs-CUDA tolerance, 16-bit outputs within one ulp of it) for every fill ×
out dtype on the CUDA tests' shapes plus shapes reaching the tiling cases those miss, with chunks
of 1 and 2 samples and of the launcher's largest size, and must not depend on the item order or,
bit for bit, on the chunk size. The harness also fails on a write outside the output or the
window, on a window element read before phase 1 wrote it (NaN-filled window), on an output never
written (NaN-filled output), and on a vector store that is not 16-byte aligned.
"""

from __future__ import annotations

import pytest
import torch
from lab_support import (
    DIAG_SHAPES,
    DTYPES,
    FILLS,
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

# The CUDA tests' shapes, plus (tiling in csrc/cuda/noisy_views_diag.cuh):
SHAPES: list[tuple[int, int, int, int]] = [
    *DIAG_SHAPES,
    (2, 2, 32, 256),  # W/2 = 128, the widest whole rows: row tiles of exactly one channel
    (1, 2, 50, 300),  # column tiles (2 x 75) and row tiles of 54: spanning a channel, halo rows
    (1, 2, 32, 512),  # column tiles (2 x 128) and row tiles of 32 rows = one channel each
    (1, 1, 4100, 2),  # W/2 = 1: row tiles of 4096 rows, the second starting inside the channel
    (1, 2, 1, 16),  # H = 1: fill_slot's dropped pixels have no neighbour above or below
    (1, 1, 2, 24),  # H = 2: one vertical neighbour each, the "neighbors" divisor 3 inside a row
]
SIGMA = [0.25, 0.75]
ITEM_OUTPUTS = 8  # diag::kItemOutputs: outputs per phase-2 item
SEED, OFFSET = 20240611, 5
MAX_CHUNK_SAMPLES = 8  # diag::kMaxChunkSamples
MAX_WINDOWS_BYTES = 48 * 1024  # diag::kMaxWindowsBytes
STATS = (
    "vec_stores",
    "window_bytes",
    "tiles",
    "col_tiles",
    "span_channels",
    "row_halo",
    "channel_edge",
    "col_halo",
    "phased_planes",
)


@pytest.fixture(scope="module")
def tiling(tmp_path_factory: pytest.TempPathFactory) -> object:
    """torch.ops.drs_host_tiling, compiled from the harness once for this module."""
    return load_host_harness(
        "diag_tiling_host.cpp", "drs_host_tiling", tmp_path_factory.mktemp("drs_host_tiling")
    )


def inputs(shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """x, num and stream ids as the CUDA tests draw them. num >= 2: planes after the first start at
    a non-zero phase wherever C·H·W is not a multiple of the vector width (4 or 8 outputs); num is
    2 or 3, so chunks of 2 leave a short last chunk where num = 3 and chunks of the largest size
    hold a whole row."""
    x = random_images(shape, seed=sum(shape))
    num = 2 if shape[-1] * shape[-2] > 10_000 else 3
    stream = torch.arange(shape[0], dtype=torch.int64) * 7 + 3
    return x, num, stream


def run_host(
    tiling: object,
    x: torch.Tensor,
    num: int,
    stream: torch.Tensor,
    fill: str,
    out_dtype: torch.dtype,
    shuffle_seed: int = 0,
    samples: int = 1,
) -> tuple[torch.Tensor, dict[str, int]]:
    out, stats = tiling.run(  # type: ignore[attr-defined]
        x, SIGMA, num, SEED, OFFSET, stream, fill, out_dtype, samples, shuffle_seed
    )
    stats_dict = dict(zip(STATS, stats.tolist(), strict=True))
    # The harness NaN-fills the output and the window: a NaN is an output never written, or one
    # computed from a window element that phase 1 did not write.
    assert bool(torch.isfinite(out).all()), "NaN outputs: not written, or read unwritten window"
    return out, stats_dict


def chunk_sizes(tiling: object, shape: tuple[int, int, int, int]) -> list[int]:
    """Samples per chunk to run a shape with: 1, 2 and the launcher's largest, those it allows."""
    largest = tiling.max_chunk_samples(*shape[1:])  # type: ignore[attr-defined]
    return sorted({1, min(2, largest), largest})


def run_cpu(
    x: torch.Tensor, num: int, stream: torch.Tensor, fill: str, out_dtype: torch.dtype
) -> torch.Tensor:
    return torch.ops.drs_ext.noisy_views(
        x, SIGMA, num, SEED, OFFSET, stream, "diag", fill, out_dtype
    )


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fill", FILLS)
def test_host_tiling_equals_cpu_kernel(tiling: object, fill: str, out_dtype: torch.dtype) -> None:
    for shape in SHAPES:
        x, num, stream = inputs(shape)
        cpu = run_cpu(x, num, stream, fill, out_dtype)
        host32, _ = run_host(tiling, x, num, stream, fill, torch.float32)
        for samples in chunk_sizes(tiling, shape):
            host, _ = run_host(tiling, x, num, stream, fill, out_dtype, sum(shape), samples)
            assert host.shape == cpu.shape == (shape[0], 2, num, *shape[1:])
            if out_dtype == torch.float32:
                assert_close_to(host, cpu, parity_atol(x, SIGMA))
                # A chunk shares index math between its samples, never their noise: every chunk
                # size gives the same bits.
                assert torch.equal(host, host32), (shape, samples)
            else:
                assert_within_ulp(host, cpu, parity_atol(x, SIGMA))
                # The cast comes last: the 16-bit output is the float32 one rounded, also when
                # the vector stores (8 outputs instead of 4) fall differently.
                assert torch.equal(host, host32.to(out_dtype)), (shape, samples)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("shape", [(2, 1, 6, 10), (1, 2, 50, 300)], ids=str)
def test_host_tiling_equals_reference(
    tiling: object, fill: str, shape: tuple[int, int, int, int]
) -> None:
    """Against the independent float64 oracle, not only against the CPU kernel."""
    x, num, stream = inputs(shape)
    host, _ = run_host(tiling, x, num, stream, fill, torch.float32)
    ref = reference.noisy_views(
        x, SIGMA, num=num, seed=SEED, offset=OFFSET, stream=stream, fill=fill
    )
    assert_close_to(host, ref, reference_atol(x, SIGMA))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=str)
def test_item_order_does_not_matter(tiling: object, out_dtype: torch.dtype) -> None:
    """Items of a phase write disjoint locations: any order gives the same bits."""
    for shape in [(3, 3, 7, 14), (1, 2, 50, 300), (2, 2, 11, 262)]:
        x, num, stream = inputs(shape)
        for fill in FILLS:
            runs = [run_host(tiling, x, num, stream, fill, out_dtype, s)[0] for s in (1, 2)]
            assert torch.equal(runs[0], runs[1])


def test_max_chunk_samples(tiling: object) -> None:
    """The launcher's largest chunk: as many windows as fit in 48 KiB, up to 8, and 1 where C·H·W
    is not a multiple of the 8 outputs of a phase-2 item (the planes of a chunk share their
    items). The shapes above include chunks of 8, chunks bounded by the windows, short last
    chunks, and chunks of one for a C·H·W that is not a multiple of 8."""
    largest = {}
    for shape in SHAPES:
        _, channels, height, width = shape
        x, num, stream = inputs(shape)
        _, stats = run_host(tiling, x, num, stream, "neighbors", torch.float32)
        fit = MAX_WINDOWS_BYTES // stats["window_bytes"]
        want = 1 if channels * height * width % ITEM_OUTPUTS else min(fit, MAX_CHUNK_SAMPLES)
        largest[shape] = tiling.max_chunk_samples(channels, height, width)  # type: ignore[attr-defined]
        assert largest[shape] == want, shape
    assert any(n == MAX_CHUNK_SAMPLES for n in largest.values())
    assert any(1 < n < MAX_CHUNK_SAMPLES for n in largest.values())  # bounded by the windows
    assert any(n == 1 and s[1] * s[2] * s[3] % ITEM_OUTPUTS for s, n in largest.items())
    assert any(n > 2 and inputs(s)[1] % 2 for s, n in largest.items())  # a short last chunk
    # Known answers. A tile of whole channels takes no halo row: a CIFAR plane is one tile of 96
    # rows of 16 packed floats, a 6 KiB window, 8 of them in 48 KiB. An ImageNet tile is 36 rows
    # of 112 with its edges inside a channel: 38 rows with the halo, 17,024 bytes, 2 of them.
    assert tiling.max_chunk_samples(3, 32, 32) == 8  # type: ignore[attr-defined]
    assert tiling.max_chunk_samples(3, 224, 224) == 2  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="samples per chunk must lie in 1..8"):
        run_host(tiling, *inputs(SHAPES[0]), "neighbors", torch.float32, samples=9)


def test_divide_by_count_is_the_ieee_division(tiling: object) -> None:
    """The device's "neighbors" divisor, drs::divide_by_count (a multiply and a correction step,
    no division), against torch's float32 division: for count 3 every mantissa of one binade
    (away from the subnormals and overflow the rounding depends on the mantissa alone) and every
    subnormal, and for each count 2^20 random finite floats, all of both signs."""
    gen = torch.Generator().manual_seed(3)

    def floats(*ranges: tuple[int, int], random: int = 0) -> torch.Tensor:
        bits = [torch.arange(lo, hi) for lo, hi in ranges]
        bits.append(torch.randint(0, 0x7F800000, (random,), generator=gen))
        x = torch.cat(bits).to(torch.int32).view(torch.float32)
        return torch.cat([x, -x])

    every = floats((0x3F800000, 0x40000000), (0, 0x00800001))  # [1, 2); 0, subnormals, FLT_MIN
    extremes = torch.tensor([3.4028235e38, 1.1754942e-38, 1e-45, 0.0, 1.0, 3.0, 6.0])
    for count in (1, 2, 3, 4):
        x = floats(random=1 << 20)
        x = torch.cat([x, extremes, -extremes] + ([every] if count == 3 else []))
        got = tiling.divide_by_count(x, count)  # type: ignore[attr-defined]
        want = x / torch.full_like(x, float(count))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), count


def test_shapes_reach_every_tiling_case(tiling: object) -> None:
    """The shapes above reach each case of the tiling (so the comparisons exercise it)."""
    seen: dict[tuple[torch.dtype, tuple[int, int, int, int]], dict[str, int]] = {}
    for out_dtype in DTYPES:
        for shape in SHAPES:
            x, num, stream = inputs(shape)
            out, stats = run_host(tiling, x, num, stream, "neighbors", out_dtype)
            vec = 16 // out.element_size()
            stats["element_stores"] = out.numel() - vec * stats["vec_stores"]
            stats["col_tiled"] = int(stats["col_tiles"] > 1)
            stats["row_tiled"] = int(stats["tiles"] > stats["col_tiles"])
            assert stats["window_bytes"] <= 48 * 1024
            seen[out_dtype, shape] = stats

    def reached(**want: bool) -> bool:
        """Some run has each named count non-zero (True) or zero (False)."""
        return any(all((s[k] > 0) == v for k, v in want.items()) for s in seen.values())

    # Whole-row tiles: several per plane, spanning channels, an edge inside a channel (halo rows),
    # an edge on a channel boundary.
    assert reached(col_tiled=False, row_tiled=True, span_channels=True, row_halo=True)
    assert reached(col_tiled=False, channel_edge=True)
    # Column tiles (halo columns): one row tile, and several spanning channels with halo rows, and
    # an edge on a channel boundary.
    assert reached(col_tiled=True, row_tiled=False, col_halo=True)
    assert reached(col_tiled=True, row_tiled=True, col_halo=True, span_channels=True, row_halo=True)
    assert reached(col_tiled=True, channel_edge=True)
    # Planes at a non-zero phase, vector stores and element-wise stores, for every dtype.
    for out_dtype in DTYPES:
        stats = [s for (d, _), s in seen.items() if d == out_dtype]
        for key in ("phased_planes", "vec_stores", "element_stores"):
            assert any(s[key] > 0 for s in stats), (out_dtype, key)


def test_host_tiling_with_sigma_per_image(tiling: object) -> None:
    """σ per (image, branch): the kernel reads it once per chunk (diag::chunk_planes). Chunks of
    every size, on shapes with several images, row and column tiles, equal the CPU kernel given
    the same (N, P) tensor, and the (N,) form equals its (N, P) expansion bit for bit."""
    for shape in [(3, 3, 7, 14), (2, 2, 11, 262), (2, 1, 6, 10)]:
        x, num, stream = inputs(shape)
        images = shape[0]
        table = torch.tensor([[0.25, 1.5], [0.75, 0.125], [2.0, 0.5]])[:images]
        cpu = torch.ops.drs_ext.noisy_views(
            x, [], num, SEED, OFFSET, stream, "diag", "neighbors", None, table
        )
        for samples in chunk_sizes(tiling, shape):
            host, _ = tiling.run(  # type: ignore[attr-defined]
                x, [], num, SEED, OFFSET, stream, "neighbors", None, samples, 1, table
            )
            assert_close_to(host, cpu, parity_atol(x, table.flatten().tolist()))
            per_image = table[:, 0].double()
            host_n, _ = tiling.run(  # type: ignore[attr-defined]
                x, [], num, SEED, OFFSET, stream, "neighbors", None, samples, 1, per_image
            )
            both = table[:, :1].expand(images, 2).contiguous()
            expanded, _ = tiling.run(  # type: ignore[attr-defined]
                x, [], num, SEED, OFFSET, stream, "neighbors", None, samples, 1, both
            )
            assert torch.equal(host_n, expanded)
