"""drs_ext.noisy_views on every device: its values against drs_ext.reference, and the properties
a caller relies on (counters, sigma forms, 16-bit outputs, chunk and batch independence, input
layouts), plus the CUDA kernels against the CPU kernel where only a GPU can show a difference
(tiling cases, launches whose blocks share chunks of samples, device-side errors).

The fills in the noise-free limit are in test_fills.py; opcheck, torch.compile, fake tensors and
CUDA graphs in test_torch_integration.py; gradients in test_autograd.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest
import torch
from conftest import (
    CASES,
    FILLS,
    MAX_SEED,
    PARTITIONS,
    SAMPLE_SPACE,
    assert_close_to,
    assert_within_ulp,
    branches,
    noise_planes,
    parity_atol,
    random_images,
    reference_atol,
    requires_cuda,
)

import drs_ext
from drs_ext import reference

# (N, C, H, W): H != W, C = 1 and 3, N > 1, sub-image sizes m = C·H·W/2 not divisible by 4
# (45, 21, 90), H = 1, W = 2.
DIAG_SHAPES: list[tuple[int, int, int, int]] = [
    (2, 3, 5, 6),
    (1, 1, 4, 4),
    (3, 1, 1, 8),
    (2, 3, 7, 2),
    (1, 3, 6, 10),
]
# partition "none" has no parity constraint on W.
NONE_SHAPES: list[tuple[int, int, int, int]] = [*DIAG_SHAPES, (2, 1, 3, 5), (1, 3, 1, 1)]
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def sigma_for(partition: str) -> list[float]:
    """A different sigma per branch where there are two branches."""
    return [0.25, 0.75] if partition == "diag" else [0.5]


def run_both(
    x: torch.Tensor,
    sigma: float | Sequence[float],
    *,
    num: int,
    seed: int,
    offset: int = 0,
    stream: torch.Tensor | None = None,
    partition: str = "diag",
    fill: str = "neighbors",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on x's device and the reference on the CPU, with the same arguments."""
    kw = {"num": num, "seed": seed, "offset": offset, "partition": partition, "fill": fill}
    device_stream = None if stream is None else stream.to(x.device)
    out = drs_ext.noisy_views(x, sigma, stream=device_stream, **kw)  # type: ignore[arg-type]
    ref = reference.noisy_views(x.cpu(), sigma, stream=stream, **kw)  # type: ignore[arg-type]
    assert out.device == x.device
    return out, ref


def reference_cases() -> list[tuple[str, str, tuple[int, int, int, int]]]:
    cases = [("diag", f, s) for f in FILLS for s in DIAG_SHAPES]
    return cases + [("none", "neighbors", s) for s in NONE_SHAPES]


@pytest.mark.parametrize(("partition", "fill", "shape"), reference_cases())
def test_views_equal_the_reference(
    device: torch.device, partition: str, fill: str, shape: tuple[int, int, int, int]
) -> None:
    x = random_images(shape, seed=sum(shape))
    sigma = sigma_for(partition)
    out, ref = run_both(
        x.to(device), sigma, num=3, seed=20240611, offset=5, partition=partition, fill=fill
    )
    n, c, h, w = shape
    assert out.shape == (n, branches(partition), 3, c, h, w)
    assert_close_to(out, ref, reference_atol(x, sigma))


def test_fill_is_ignored_without_a_partition(device: torch.device) -> None:
    x = random_images((2, 1, 3, 5), seed=1).to(device)
    outs = [drs_ext.noisy_views(x, 0.5, num=3, seed=2, partition="none", fill=f) for f in FILLS]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


# Every word of the counter at its extremes: the key's high word (seeds >= 2^32), sample indices
# crossing 2^32 (the counter's third word, below the branch byte) up to the last one, and stream
# ids up to 2^32 - 1. Each image of the batch has its own stream.
COUNTERS: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (1, 1, 17),
    (2**32 + 7, 2**32 - 2, 2**32 - 1),
    (2**32 - 1, 2**40 - 3, 0),
    (MAX_SEED, 2**40 + 12345, 123456789),
    (77, 2**55 + 3, 5),
    (2**32 + 7, SAMPLE_SPACE - 4, 2**32 - 1),
    (MAX_SEED, SAMPLE_SPACE - 8, 123456789),
]


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize(("seed", "offset", "stream_id"), COUNTERS)
def test_views_equal_the_reference_at_extreme_counters(
    device: torch.device, partition: str, seed: int, offset: int, stream_id: int
) -> None:
    x = random_images((3, 3, 4, 6), seed=4)
    sigma = sigma_for(partition)
    stream = torch.tensor([stream_id, 17, 2**32 - 1 - stream_id])
    out, ref = run_both(
        x.to(device), sigma, num=4, seed=seed, offset=offset, stream=stream, partition=partition
    )
    assert_close_to(out, ref, reference_atol(x, sigma))


# (N, C, H, W) for "diag". Tiling (csrc/cuda/noisy_views_diag.cuh): W/2 <= 128 gives whole-row
# tiles of about 4096 packed elements, wider sub-images column tiles of at most 128 columns.
TILING_SHAPES: dict[str, list[tuple[int, int, int, int]]] = {
    "diag": [
        (1, 3, 32, 32),  # CIFAR: one tile per plane, spanning the 3 channels
        (2, 1, 6, 10),  # N > 1, C = 1, H != W, W/2 = 5 odd, m = 30 not a multiple of 4
        (3, 3, 7, 14),  # odd H and W/2
        (1, 3, 70, 40),  # two row tiles, the boundary inside a channel (halo rows)
        (1, 1, 5, 600),  # three column tiles (halo columns)
        (2, 2, 11, 262),  # column tiles of 66 columns, rows spanning channels
        (1, 1, 1, 2),  # a single packed pixel
        (1, 3, 224, 224),  # ImageNet: 19 row tiles
    ],
    "none": [
        (1, 3, 32, 32),
        (2, 1, 5, 7),  # m = 35: partial last group, unaligned planes
        (3, 1, 3, 5),
        (1, 3, 224, 224),
    ],
}


@requires_cuda
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_cuda_equals_cpu_on_every_tiling_case(
    partition: str, fill: str, out_dtype: torch.dtype
) -> None:
    """The two kernels evaluate the same float32 formulas: a few ulp apart, 16-bit outputs
    within one ulp more, on shapes that reach every tiling case of the CUDA kernels."""
    sigma = sigma_for(partition)
    for shape in TILING_SHAPES[partition]:
        x = random_images(shape, seed=sum(shape))
        num = 2 if shape[-1] * shape[-2] > 10_000 else 3
        stream = torch.arange(shape[0]) * 7 + 3
        kw = {"num": num, "seed": 20240611, "offset": 5, "partition": partition, "fill": fill}
        cpu = drs_ext.noisy_views(x, sigma, stream=stream, out_dtype=out_dtype, **kw)  # type: ignore[arg-type]
        cuda = drs_ext.noisy_views(x.cuda(), sigma, stream=stream.cuda(), out_dtype=out_dtype, **kw)  # type: ignore[arg-type]
        assert cuda.device == torch.device("cuda", torch.cuda.current_device())
        if out_dtype == torch.float32:
            assert_close_to(cuda, cpu, parity_atol(x, sigma))
        else:
            assert_within_ulp(cuda, cpu, parity_atol(x, sigma))
            # The cast comes after the noise: the 16-bit output is the float32 output rounded.
            cuda32 = drs_ext.noisy_views(x.cuda(), sigma, stream=stream.cuda(), **kw)  # type: ignore[arg-type]
            assert torch.equal(cuda, cuda32.to(out_dtype))


def test_sigma_forms_are_equivalent(device: torch.device) -> None:
    x = random_images((2, 3, 4, 6), seed=6).to(device)
    kw = {"num": 3, "seed": 11, "partition": "diag"}
    scalar = drs_ext.noisy_views(x, 0.5, **kw)  # type: ignore[arg-type]
    for form in ([0.5], (0.5, 0.5), [0.5, 0.5]):  # tensor forms: test_sigma_per_image.py
        assert torch.equal(drs_ext.noisy_views(x, form, **kw), scalar)  # type: ignore[arg-type]
    none = drs_ext.noisy_views(x, 0.5, num=3, seed=11, partition="none")
    assert torch.equal(drs_ext.noisy_views(x, [0.5], num=3, seed=11, partition="none"), none)


@pytest.mark.parametrize("fill", FILLS)
def test_sigma_pair_applies_per_branch(device: torch.device, fill: str) -> None:
    """Branch p of a (σ0, σ1) call equals branch p of a call with σp for both branches."""
    x = random_images((2, 1, 4, 6), seed=7)
    kw = {"num": 2, "seed": 5, "partition": "diag", "fill": fill}
    pair, ref = run_both(x.to(device), (0.2, 1.3), **kw)  # type: ignore[arg-type]
    assert torch.equal(pair[:, 0], drs_ext.noisy_views(x.to(device), 0.2, **kw)[:, 0])  # type: ignore[arg-type]
    assert torch.equal(pair[:, 1], drs_ext.noisy_views(x.to(device), 1.3, **kw)[:, 1])  # type: ignore[arg-type]
    assert_close_to(pair, ref, reference_atol(x, 1.3))


def test_noise_scales_linearly_with_sigma(device: torch.device) -> None:
    """x = 0: out = σ·ε exactly, so σ = 2 gives twice the σ = 1 output, bit for bit."""
    x = torch.zeros(2, 3, 4, 6, device=device)
    for partition, fill in [("none", "zeros"), ("diag", "zeros"), ("diag", "pair")]:
        kw = {"num": 3, "seed": 8, "partition": partition, "fill": fill}
        one = drs_ext.noisy_views(x, 1.0, **kw)  # type: ignore[arg-type]
        two = drs_ext.noisy_views(x, 2.0, **kw)  # type: ignore[arg-type]
        assert torch.equal(two, 2.0 * one)
        assert float(one.abs().max()) > 0.5


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_16_bit_outputs(
    device: torch.device, out_dtype: torch.dtype, partition: str, fill: str
) -> None:
    """A 16-bit output is the kernel's float32 result rounded once: exactly its cast, and
    within 1 ulp of the reference's cast."""
    x = random_images((2, 3, 5, 6), seed=9, scale=1.0)
    sigma = sigma_for(partition)
    out, ref32 = run_both(x.to(device), sigma, num=3, seed=3, partition=partition, fill=fill)
    kw = {"num": 3, "seed": 3, "partition": partition, "fill": fill}
    out16 = drs_ext.noisy_views(x.to(device), sigma, out_dtype=out_dtype, **kw)  # type: ignore[arg-type]
    assert out16.dtype == out_dtype and out16.shape == out.shape
    assert_within_ulp(out16, ref32.to(out_dtype), 0.0)
    assert torch.equal(out16, out.to(out_dtype))
    explicit = drs_ext.noisy_views(x.to(device), sigma, out_dtype=torch.float32, **kw)  # type: ignore[arg-type]
    assert torch.equal(explicit, out)


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_chunks_concatenate_bit_for_bit(device: torch.device, partition: str, fill: str) -> None:
    x = random_images((2, 3, 5, 6), seed=10).to(device)
    sigma = sigma_for(partition)
    stream = torch.tensor([4, 1000], device=device)
    kw = {"seed": 21, "stream": stream, "partition": partition, "fill": fill}
    for base in (0, 7, 2**32 - 6, 2**40):
        whole = drs_ext.noisy_views(x, sigma, num=12, offset=base, **kw)  # type: ignore[arg-type]
        first = drs_ext.noisy_views(x, sigma, num=5, offset=base, **kw)  # type: ignore[arg-type]
        rest = drs_ext.noisy_views(x, sigma, num=7, offset=base + 5, **kw)  # type: ignore[arg-type]
        assert torch.equal(whole, torch.cat([first, rest], dim=2))
        single = drs_ext.noisy_views(x, sigma, num=1, offset=base + 11, **kw)  # type: ignore[arg-type]
        assert torch.equal(whole[:, :, 11:], single)


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_views_do_not_depend_on_the_batch(device: torch.device, partition: str, fill: str) -> None:
    x = random_images((4, 3, 4, 6), seed=11).to(device)
    sigma = sigma_for(partition)
    kw = {"num": 3, "seed": 31, "partition": partition, "fill": fill}
    stream = torch.tensor([5, 17, 9, 2**32 - 1], device=device)
    batch = drs_ext.noisy_views(x, sigma, stream=stream, **kw)  # type: ignore[arg-type]
    assert torch.equal(drs_ext.noisy_views(x, sigma, stream=stream, **kw), batch)  # type: ignore[arg-type]
    for n in range(4):
        alone = drs_ext.noisy_views(x[n : n + 1], sigma, stream=stream[n : n + 1], **kw)  # type: ignore[arg-type]
        assert torch.equal(batch[n : n + 1], alone)
    # Reordering the batch (with its stream ids) reorders the output.
    perm = torch.tensor([2, 0, 3, 1], device=device)
    shuffled = drs_ext.noisy_views(x[perm], sigma, stream=stream[perm], **kw)  # type: ignore[arg-type]
    assert torch.equal(shuffled, batch[perm])
    # The default stream is the index in the batch.
    default = drs_ext.noisy_views(x, sigma, **kw)  # type: ignore[arg-type]
    for n in range(4):
        ids = torch.tensor([n], device=device)
        alone = drs_ext.noisy_views(x[n : n + 1], sigma, stream=ids, **kw)  # type: ignore[arg-type]
        assert torch.equal(default[n : n + 1], alone)


@requires_cuda
@pytest.mark.parametrize(
    ("partition", "fill", "out_dtype"),
    [(p, f, torch.float32) for p, f in CASES] + [("diag", "neighbors", torch.float16)],
)
def test_large_launches_share_chunks_and_equal_small_ones(
    partition: str, fill: str, out_dtype: torch.dtype
) -> None:
    """The launcher gives a block a chunk of several samples only when the launch has blocks to
    spare (at least 32 per multiprocessor; csrc/cuda/noisy_views_kernel.cu): never in the small
    calls above. 24 CIFAR images x 1000 draws get chunks of 2 or more on any GPU with up to 750
    multiprocessors (diag: 24,000 blocks at chunks of 2; an H100's 132 give chunks of 8 here,
    and the none kernel's chunks of 16); each image's own call gets chunks of 1 on any GPU with
    47 or more. Same views, bit for bit."""
    x = random_images((24, 3, 32, 32), seed=7).cuda()
    stream = torch.arange(24, device="cuda") * 5 + 1
    sigma = sigma_for(partition)
    kw = {"seed": 20240611, "partition": partition, "fill": fill, "out_dtype": out_dtype}
    whole = drs_ext.noisy_views(x, sigma, num=1000, stream=stream, **kw)  # type: ignore[arg-type]
    for n in range(24):
        alone = drs_ext.noisy_views(x[n : n + 1], sigma, num=1000, stream=stream[n : n + 1], **kw)  # type: ignore[arg-type]
        assert torch.equal(whole[n], alone[0]), n


@requires_cuda
def test_imagenet_launch_shares_chunks_and_equals_single_draws() -> None:
    """An ImageNet call of 250 draws (19 tiles with halo rows, 2 samples' windows per block on
    a GPU with up to 148 multiprocessors) equals 250 calls of one draw each, bit for bit."""
    x = random_images((1, 3, 224, 224), seed=8).cuda()
    kw = {"seed": 20240611, "stream": torch.tensor([3], device="cuda")}
    whole = drs_ext.noisy_views(x, [0.25, 0.75], num=250, offset=0, **kw)  # type: ignore[arg-type]
    for k in range(250):
        single = drs_ext.noisy_views(x, [0.25, 0.75], num=1, offset=k, **kw)  # type: ignore[arg-type]
        assert torch.equal(whole[:, :, k : k + 1], single), k


def test_same_image_gets_the_same_views_under_the_same_stream_id(device: torch.device) -> None:
    """Two copies of one image with the same stream id get identical views (pure function)."""
    x = random_images((1, 3, 4, 6), seed=12).to(device).expand(2, -1, -1, -1)
    out = drs_ext.noisy_views(x, 0.5, num=4, seed=1, stream=torch.tensor([42, 42], device=device))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_unaligned_and_non_contiguous_input(
    device: torch.device, partition: str, fill: str
) -> None:
    """x one float past a 16-byte boundary, and a permuted view: same output as a fresh copy."""
    shape = (2, 3, 8, 8)  # C·H·W a multiple of 4: the aligned fast path unless x is offset
    storage = random_images((2 * 3 * 8 * 8 + 1,), seed=4).to(device)
    x = storage[1:].view(shape)
    assert x.data_ptr() % 16 != 0
    sigma = sigma_for(partition)
    kw = {"num": 3, "seed": 3, "partition": partition, "fill": fill}
    assert torch.equal(
        drs_ext.noisy_views(x, sigma, **kw), drs_ext.noisy_views(x.clone(), sigma, **kw)
    )  # type: ignore[arg-type]
    permuted = random_images((2, 8, 8, 3), seed=5).to(device).permute(0, 3, 1, 2)
    sliced = random_images((2, 6, 3, 5), seed=13).to(device).permute(0, 2, 3, 1)[..., :4]
    for strided in (permuted, sliced):
        assert not strided.is_contiguous()
        expected = drs_ext.noisy_views(strided.contiguous(), sigma, **kw)  # type: ignore[arg-type]
        assert torch.equal(drs_ext.noisy_views(strided, sigma, **kw), expected)  # type: ignore[arg-type]


def test_non_contiguous_stream(device: torch.device) -> None:
    x = random_images((2, 3, 4, 6), seed=20).to(device)
    stream = torch.tensor([5, 0, 17, 0], device=device)[::2]
    assert not stream.is_contiguous()
    out = drs_ext.noisy_views(x, 0.5, num=2, seed=3, stream=stream)
    assert torch.equal(out, drs_ext.noisy_views(x, 0.5, num=2, seed=3, stream=stream.contiguous()))


def test_empty_batch(device: torch.device) -> None:
    x = torch.zeros(0, 3, 4, 6, device=device)
    for partition in PARTITIONS:
        out = drs_ext.noisy_views(x, 0.5, num=3, seed=1, partition=partition)
        assert out.shape == (0, branches(partition), 3, 3, 4, 6) and out.device == x.device


@pytest.mark.parametrize("partition", PARTITIONS)
def test_cpu_views_independent_of_the_number_of_threads(partition: str) -> None:
    """The parallel split over (image, branch, sample) planes must not change any value."""
    x = random_images((3, 3, 8, 8), seed=21)
    kw = {"num": 40, "seed": 5, "offset": 2**32 - 20, "partition": partition}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = drs_ext.noisy_views(x, 0.5, **kw)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(drs_ext.noisy_views(x, 0.5, **kw), serial)  # type: ignore[arg-type]


def differ_almost_everywhere(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a != b).double().mean()) > 0.99


def test_different_seeds_streams_samples_and_branches_give_different_noise(
    device: torch.device,
) -> None:
    (base,) = noise_planes(device=device)
    assert differ_almost_everywhere(base, noise_planes(device=device, seed=2)[0])
    assert differ_almost_everywhere(base, noise_planes(device=device, seed=1 + 2**32)[0])
    assert differ_almost_everywhere(base, noise_planes(device=device, stream=1)[0])
    assert differ_almost_everywhere(base, noise_planes(device=device, offset=2)[0])
    assert differ_almost_everywhere(base, noise_planes(device=device, offset=2**32)[0])
    assert differ_almost_everywhere(base[0], base[1])  # consecutive samples
    left, right = noise_planes(device=device, partition="diag")
    assert differ_almost_everywhere(left, right)


def test_noise_is_a_function_of_branch_sample_and_element_only(device: torch.device) -> None:
    """docs/design.md §2.2: the noise value is a pure function of (seed, stream, branch, sample,
    element). Branch 0 of "diag" and the single branch of "none" therefore share their first
    m elements; the image layout (C, H, W) only decides how many elements are drawn."""
    (whole,) = noise_planes(device=device, partition="none", shape=(3, 4, 6))
    left, _ = noise_planes(device=device, partition="diag", shape=(3, 4, 6))
    assert torch.equal(left, whole[:, : left.shape[1]])
    (other,) = noise_planes(device=device, partition="none", shape=(1, 9, 8))
    assert torch.equal(other, whole)  # 72 elements either way


@requires_cuda
def test_stream_on_another_device_is_an_error() -> None:
    x = random_images((1, 3, 4, 6), seed=6).cuda()
    with pytest.raises(RuntimeError, match="stream must be on x's device"):
        torch.ops.drs_ext.noisy_views(
            x, [0.5], 2, 0, 0, torch.tensor([0]), "diag", "neighbors", None
        )


@requires_cuda
@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_x_stops_the_cuda_kernel(partition: str, bad: str) -> None:
    """One NaN or Inf anywhere in x stops the call with the device-side assert of
    assert_inputs_kernel (in a subprocess: a device assert is fatal to the CUDA context), and the
    same x without it runs. (The CPU kernel raises a RuntimeError: test_op_errors.py.)"""
    code = textwrap.dedent(
        f"""
        import torch, drs_ext
        x = torch.rand(2, 3, 20, 24, device="cuda")
        drs_ext.noisy_views(x, 0.5, num=4, seed=1, partition="{partition}")
        torch.cuda.synchronize()
        print("finite x: ok", flush=True)
        x[1, 2, 19, 23] = float("{bad}")
        drs_ext.noisy_views(x, 0.5, num=4, seed=1, partition="{partition}")
        torch.cuda.synchronize()
        print("non-finite x: no error", flush=True)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert "finite x: ok" in run.stdout, output
    assert "non-finite x: no error" not in run.stdout, output
    assert run.returncode != 0, output
    assert "x must be finite" in output and "device-side assert" in output, output
