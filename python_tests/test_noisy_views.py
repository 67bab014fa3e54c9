"""drs_ext.noisy_views against drs_ext.reference and against fills written out by hand.

Covers every partition × fill on several shapes, the sigma forms, custom streams, large offsets,
16-bit outputs, chunk and batch independence, determinism, and torch.library.opcheck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from conftest import (
    FILLS,
    MAX_SEED,
    PARTITIONS,
    SAMPLE_SPACE,
    assert_close_to,
    branches,
    kept_mask,
    noise_planes,
    random_images,
    reference_atol,
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


def sigma_for(partition: str) -> float | tuple[float, float]:
    """A different sigma per branch where there are two branches."""
    return (0.25, 0.75) if partition == "diag" else 0.5


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
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = {"num": num, "seed": seed, "offset": offset, "stream": stream}
    kwargs |= {"partition": partition, "out_dtype": out_dtype}
    out = drs_ext.noisy_views(x, sigma, fill=fill, **kwargs)  # type: ignore[arg-type]
    ref = reference.noisy_views(x, sigma, fill_mode=fill, **kwargs)  # type: ignore[arg-type]
    return out, ref


def shape_cases() -> list[tuple[str, str, tuple[int, int, int, int]]]:
    cases = [("diag", f, s) for f in FILLS for s in DIAG_SHAPES]
    return cases + [("none", f, s) for f in FILLS for s in NONE_SHAPES]


@pytest.mark.parametrize(("partition", "fill", "shape"), shape_cases())
def test_kernel_equals_reference(
    partition: str, fill: str, shape: tuple[int, int, int, int]
) -> None:
    x = random_images(shape, seed=sum(shape))
    sigma = sigma_for(partition)
    out, ref = run_both(x, sigma, num=3, seed=20240611, offset=5, partition=partition, fill=fill)
    n, c, h, w = shape
    assert out.shape == (n, branches(partition), 3, c, h, w)
    assert_close_to(out, ref, reference_atol(x, sigma))


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32 + 7, MAX_SEED])
def test_kernel_equals_reference_for_every_key_word(partition: str, seed: int) -> None:
    x = random_images((2, 2, 4, 6), seed=3)
    sigma = sigma_for(partition)
    out, ref = run_both(x, sigma, num=2, seed=seed, partition=partition)
    assert_close_to(out, ref, reference_atol(x, sigma))


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize(
    "offset", [0, 1, 2**32 - 2, 2**40 - 3, 2**40 + 12345, 2**55 + 3, SAMPLE_SPACE - 4]
)
def test_kernel_equals_reference_at_large_offsets(partition: str, offset: int) -> None:
    """Sample indices crossing 2^32 use the counter's third word (below the branch byte)."""
    x = random_images((2, 3, 4, 6), seed=4)
    sigma = sigma_for(partition)
    out, ref = run_both(x, sigma, num=4, seed=77, offset=offset, partition=partition)
    assert_close_to(out, ref, reference_atol(x, sigma))


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("fill", FILLS)
def test_custom_stream_ids(partition: str, fill: str) -> None:
    x = random_images((3, 3, 5, 4), seed=5)
    stream = torch.tensor([17, 2**32 - 1, 0], dtype=torch.int64)
    sigma = sigma_for(partition)
    out, ref = run_both(x, sigma, num=2, seed=9, stream=stream, partition=partition, fill=fill)
    assert_close_to(out, ref, reference_atol(x, sigma))


def test_sigma_forms_are_equivalent() -> None:
    x = random_images((2, 3, 4, 6), seed=6)
    kw = {"num": 3, "seed": 11, "partition": "diag"}
    scalar = drs_ext.noisy_views(x, 0.5, **kw)  # type: ignore[arg-type]
    for form in ([0.5], (0.5, 0.5), [0.5, 0.5], torch.tensor([0.5, 0.5])):
        assert torch.equal(drs_ext.noisy_views(x, form, **kw), scalar)  # type: ignore[arg-type]
    none = drs_ext.noisy_views(x, 0.5, num=3, seed=11, partition="none")
    assert torch.equal(drs_ext.noisy_views(x, [0.5], num=3, seed=11, partition="none"), none)


@pytest.mark.parametrize("fill", FILLS)
def test_sigma_pair_applies_per_branch(fill: str) -> None:
    """Branch p of a (σ0, σ1) call equals branch p of a call with σp for both branches."""
    x = random_images((2, 1, 4, 6), seed=7)
    kw = {"num": 2, "seed": 5, "partition": "diag", "fill": fill}
    pair = drs_ext.noisy_views(x, (0.2, 1.3), **kw)  # type: ignore[arg-type]
    assert torch.equal(pair[:, 0], drs_ext.noisy_views(x, 0.2, **kw)[:, 0])  # type: ignore[arg-type]
    assert torch.equal(pair[:, 1], drs_ext.noisy_views(x, 1.3, **kw)[:, 1])  # type: ignore[arg-type]
    _, ref = run_both(x, (0.2, 1.3), **kw)  # type: ignore[arg-type]
    assert_close_to(pair, ref, reference_atol(x, 1.3))


def test_noise_scales_linearly_with_sigma() -> None:
    """x = 0: out = σ·ε exactly, so σ = 2 gives twice the σ = 1 output, bit for bit."""
    x = torch.zeros(2, 3, 4, 6)
    for partition, fill in [("none", "zeros"), ("diag", "zeros"), ("diag", "pair")]:
        kw = {"num": 3, "seed": 8, "partition": partition, "fill": fill}
        one = drs_ext.noisy_views(x, 1.0, **kw)  # type: ignore[arg-type]
        two = drs_ext.noisy_views(x, 2.0, **kw)  # type: ignore[arg-type]
        assert torch.equal(two, 2.0 * one)
        assert float(one.abs().max()) > 0.5


def float_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at |t| (float32 tensor of the same shape)."""
    info = torch.finfo(t.dtype)
    mag = t.float().abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("partition", "fill"), [("diag", f) for f in FILLS] + [("none", "pair")])
def test_16_bit_outputs(out_dtype: torch.dtype, partition: str, fill: str) -> None:
    """A 16-bit output is the float32 result rounded: within 1 ulp of the reference's cast."""
    x = random_images((2, 3, 5, 6), seed=9, scale=1.0)
    sigma = sigma_for(partition)
    out, ref32 = run_both(x, sigma, num=3, seed=3, partition=partition, fill=fill)
    out16 = drs_ext.noisy_views(
        x, sigma, num=3, seed=3, partition=partition, fill=fill, out_dtype=out_dtype
    )
    assert out16.dtype == out_dtype and out16.shape == out.shape
    ref16 = ref32.to(out_dtype)
    ulp = torch.maximum(float_ulp(ref16), float_ulp(out16))
    err = (out16.float() - ref16.float()).abs()
    assert bool((err <= ulp).all()), f"max error in ulps {float((err / ulp).max())}"
    # The 16-bit output is exactly the cast of the kernel's own float32 result.
    assert torch.equal(out16, out.to(out_dtype))
    explicit = drs_ext.noisy_views(
        x, sigma, num=3, seed=3, partition=partition, fill=fill, out_dtype=torch.float32
    )
    assert torch.equal(explicit, out)


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("fill", FILLS)
def test_chunks_concatenate_bit_for_bit(partition: str, fill: str) -> None:
    x = random_images((2, 3, 5, 6), seed=10)
    sigma = sigma_for(partition)
    stream = torch.tensor([4, 1000])
    for base in (0, 7, 2**32 - 6, 2**40):
        kw = {"seed": 21, "stream": stream, "partition": partition, "fill": fill}
        whole = drs_ext.noisy_views(x, sigma, num=12, offset=base, **kw)  # type: ignore[arg-type]
        first = drs_ext.noisy_views(x, sigma, num=5, offset=base, **kw)  # type: ignore[arg-type]
        rest = drs_ext.noisy_views(x, sigma, num=7, offset=base + 5, **kw)  # type: ignore[arg-type]
        assert torch.equal(whole, torch.cat([first, rest], dim=2))
        single = drs_ext.noisy_views(x, sigma, num=1, offset=base + 11, **kw)  # type: ignore[arg-type]
        assert torch.equal(whole[:, :, 11:], single)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_views_do_not_depend_on_the_batch(partition: str) -> None:
    x = random_images((4, 3, 4, 6), seed=11)
    sigma = sigma_for(partition)
    kw = {"num": 3, "seed": 31, "partition": partition}
    stream = torch.tensor([5, 17, 9, 2**32 - 1])
    batch = drs_ext.noisy_views(x, sigma, stream=stream, **kw)  # type: ignore[arg-type]
    for n in range(4):
        alone = drs_ext.noisy_views(x[n : n + 1], sigma, stream=stream[n : n + 1], **kw)  # type: ignore[arg-type]
        assert torch.equal(batch[n : n + 1], alone)
    # Reordering the batch (with its stream ids) reorders the output.
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = drs_ext.noisy_views(x[perm], sigma, stream=stream[perm], **kw)  # type: ignore[arg-type]
    assert torch.equal(shuffled, batch[perm])
    # The default stream is the index in the batch.
    default = drs_ext.noisy_views(x, sigma, **kw)  # type: ignore[arg-type]
    for n in range(4):
        alone = drs_ext.noisy_views(x[n : n + 1], sigma, stream=torch.tensor([n]), **kw)  # type: ignore[arg-type]
        assert torch.equal(default[n : n + 1], alone)


def test_same_image_gets_the_same_views_under_the_same_stream_id() -> None:
    """Two copies of one image with the same stream id get identical views (pure function)."""
    x = random_images((1, 3, 4, 6), seed=12).expand(2, -1, -1, -1)
    out = drs_ext.noisy_views(x, 0.5, num=4, seed=1, stream=torch.tensor([42, 42]))
    assert torch.equal(out[0], out[1])


def test_non_contiguous_input() -> None:
    base = random_images((2, 6, 3, 5), seed=13)
    x = base.permute(0, 2, 3, 1)[:, :, :, :4]  # (2, 3, 5, 4) with odd strides
    assert not x.is_contiguous()
    out = drs_ext.noisy_views(x, 0.5, num=2, seed=3)
    assert torch.equal(out, drs_ext.noisy_views(x.contiguous(), 0.5, num=2, seed=3))


def test_non_contiguous_stream() -> None:
    x = random_images((2, 3, 4, 6), seed=20)
    stream = torch.tensor([5, 0, 17, 0])[::2]
    assert not stream.is_contiguous()
    out = drs_ext.noisy_views(x, 0.5, num=2, seed=3, stream=stream)
    assert torch.equal(out, drs_ext.noisy_views(x, 0.5, num=2, seed=3, stream=stream.contiguous()))


@pytest.mark.parametrize("partition", PARTITIONS)
def test_independent_of_the_number_of_threads(partition: str) -> None:
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


def test_deterministic() -> None:
    x = random_images((2, 3, 6, 8), seed=14)
    for partition in PARTITIONS:
        a = drs_ext.noisy_views(x, 0.5, num=64, seed=99, partition=partition)
        b = drs_ext.noisy_views(x, 0.5, num=64, seed=99, partition=partition)
        assert torch.equal(a, b)


def differ_almost_everywhere(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a != b).double().mean()) > 0.99


def test_different_seeds_streams_samples_and_branches_give_different_noise() -> None:
    (base,) = noise_planes()
    assert differ_almost_everywhere(base, noise_planes(seed=2)[0])
    assert differ_almost_everywhere(base, noise_planes(seed=1 + 2**32)[0])  # high key word
    assert differ_almost_everywhere(base, noise_planes(stream=1)[0])
    assert differ_almost_everywhere(base, noise_planes(offset=2)[0])
    assert differ_almost_everywhere(base, noise_planes(offset=2**32)[0])  # high sample word
    assert differ_almost_everywhere(base[0], base[1])  # consecutive samples
    left, right = noise_planes(partition="diag")
    assert differ_almost_everywhere(left, right)


def test_noise_is_a_function_of_branch_sample_and_element_only() -> None:
    """DESIGN.md §2.2: the noise value is a pure function of (seed, stream, branch, sample,
    element). Branch 0 of "diag" and the single branch of "none" therefore share their first
    m elements; the image layout (C, H, W) only decides how many elements are drawn."""
    (whole,) = noise_planes(partition="none", shape=(3, 4, 6))
    left, _ = noise_planes(partition="diag", shape=(3, 4, 6))
    assert torch.equal(left, whole[:, : left.shape[1]])
    (other,) = noise_planes(partition="none", shape=(1, 9, 8))
    assert torch.equal(other, whole)  # 72 elements either way


# ----------------------------------------------------------------------------------------------
# Fill semantics in the noise-free limit, against fills written out with explicit loops.


def hand_fill(x: np.ndarray, branch: int, mode: str) -> np.ndarray:
    """fill_p(sub_p(x)) of one (C, H, W) image, pixel by pixel (DESIGN.md §2.1, §2.3)."""
    channels, height, width = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    wp = width // 2

    def sub(c: int, i: int, k: int) -> float:
        return float(x[c, i, 2 * k + (i + branch) % 2])

    for c in range(channels):
        for i in range(height):
            for j in range(width):
                kept = (i + j) % 2 == branch
                if mode == "zeros":
                    out[c, i, j] = x[c, i, j] if kept else 0.0
                elif mode == "neighbors":
                    if kept:
                        out[c, i, j] = x[c, i, j]
                        continue
                    around = [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)]
                    inside = [x[c, a, b] for a, b in around if 0 <= a < height and 0 <= b < width]
                    out[c, i, j] = sum(inside) / len(inside)
                elif mode == "pair":
                    out[c, i, j] = sub(c, i, j // 2)
                elif mode == "bilinear":
                    # align_corners=False, scale 2 along W: source column j/2 - 1/4, clamped at 0.
                    src = max((j + 0.5) / 2.0 - 0.5, 0.0)
                    k0 = math.floor(src)
                    k1 = min(k0 + 1, wp - 1)
                    lam = src - k0
                    out[c, i, j] = (1.0 - lam) * sub(c, i, k0) + lam * sub(c, i, k1)
                else:
                    raise AssertionError(mode)
    return out


FILL_SHAPES: list[tuple[int, int, int, int]] = [
    (2, 2, 5, 6),
    (1, 1, 1, 2),
    (1, 3, 4, 2),
    (1, 1, 3, 8),
]


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("shape", FILL_SHAPES)
def test_fill_in_the_noise_free_limit(fill: str, shape: tuple[int, int, int, int]) -> None:
    x = random_images(shape, seed=15, scale=1.0)
    sigma = 1e-6
    out = drs_ext.noisy_views(x, sigma, num=2, seed=4, partition="diag", fill=fill)
    for n in range(shape[0]):
        for p in range(2):
            expected = torch.from_numpy(hand_fill(x[n].double().numpy(), p, fill))
            for s in range(2):
                err = float((out[n, p, s].double() - expected).abs().max())
                assert err <= 1e-5, (n, p, s, err)
    if fill == "zeros":  # dropped pixels are exactly zero whatever the noise
        for p in range(2):
            dropped = ~kept_mask(shape[2], shape[3], p)
            assert bool((out[:, p, :, :, dropped] == 0).all())
    none = drs_ext.noisy_views(x, sigma, num=2, seed=4, partition="none", fill=fill)
    assert float((none - x[:, None, None]).abs().max()) <= 1e-5


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("shape", FILL_SHAPES)
def test_reference_fill_matches_hand_fill(fill: str, shape: tuple[int, int, int, int]) -> None:
    """The oracle's fill itself, checked against the explicit loops (exactly, in float64)."""
    x = random_images(shape, seed=16, scale=1.0).double()
    for p in range(2):
        got = reference.fill(reference.sub_image(x, p), p, shape[3], fill)
        for n in range(shape[0]):
            expected = torch.from_numpy(hand_fill(x[n].numpy(), p, fill))
            torch.testing.assert_close(got[n], expected, rtol=0, atol=1e-12)


def test_kept_pixels_carry_the_noise_of_the_packed_sub_image() -> None:
    """Every fill keeps or copies the noisy packed values: "neighbors" and "zeros" keep them in
    place, "pair" holds each twice; all three agree on the kept pixels."""
    x = random_images((2, 3, 5, 6), seed=17)
    kw = {"num": 3, "seed": 2, "partition": "diag"}
    outs = {f: drs_ext.noisy_views(x, 0.4, fill=f, **kw) for f in FILLS}  # type: ignore[arg-type]
    for p in range(2):
        mask = kept_mask(5, 6, p)
        kept = outs["zeros"][:, p][..., mask]
        assert torch.equal(outs["neighbors"][:, p][..., mask], kept)
        assert torch.equal(outs["pair"][:, p][..., mask], kept)
        pair = outs["pair"][:, p]
        assert torch.equal(pair[..., 0::2], pair[..., 1::2])


# ----------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake (meta) impl, autograd registration, AOT dispatch.


@pytest.mark.parametrize(
    ("partition", "fill", "out_dtype"),
    [("diag", "neighbors", None), ("diag", "bilinear", torch.bfloat16), ("none", "zeros", None)],
)
def test_opcheck_noisy_views(partition: str, fill: str, out_dtype: torch.dtype | None) -> None:
    x = random_images((2, 3, 4, 6), seed=18)
    stream = torch.tensor([3, 8])
    args = (x, [0.5], 3, 7, 0, stream, partition, fill, out_dtype)
    torch.library.opcheck(torch.ops.drs_ext.noisy_views.default, args)


@pytest.mark.parametrize(("partition", "fill"), [("diag", "neighbors"), ("none", "zeros")])
def test_opcheck_noisy_views_with_grad(partition: str, fill: str) -> None:
    """x requiring grad: opcheck also traces the registered backward (AOT, static and dynamic)."""
    x = random_images((2, 3, 4, 6), seed=19).requires_grad_()
    stream = torch.tensor([3, 8])
    args = (x, [0.5], 3, 7, 0, stream, partition, fill, None)
    torch.library.opcheck(torch.ops.drs_ext.noisy_views.default, args)


@pytest.mark.parametrize("stream", [None, torch.tensor([3, 8])])
def test_public_call_compiles_as_one_graph(stream: torch.Tensor | None) -> None:
    """drs_ext.noisy_views under torch.compile(fullgraph=True): no check of the wrapper reads
    tensor data (which would break the graph), and the compiled views and gradient equal the
    eager ones."""
    x = random_images((2, 3, 4, 6), seed=20)

    def loss(x: torch.Tensor) -> torch.Tensor:
        views = drs_ext.noisy_views(x, [0.5, 0.25], num=3, seed=7, offset=2, stream=stream)
        return (views * views).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss, compiled):
        xg = x.clone().requires_grad_()
        value = fn(xg)
        value.backward()
        grads.append((value.detach(), xg.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_fake_impl_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 2, 4, 6)
        stream = torch.arange(3)
        for partition, p in (("diag", 2), ("none", 1)):
            for dtype in (None, torch.float16, torch.bfloat16):
                out = torch.ops.drs_ext.noisy_views(
                    x, [0.5], 5, 1, 0, stream, partition, "pair", dtype
                )
                assert out.shape == (3, p, 5, 2, 4, 6)
                assert out.dtype == (dtype or torch.float32)
