"""Philox4x32-10 known-answer vectors (Random123) for the reference and the kernels of every
device.

The kernels expose no raw Philox, so the kernel path is checked through noisy_views with x = 0 and
sigma = 1: its output is then the standard normals themselves. The expected normals come from an
independent numpy Philox (uint64 arithmetic) written here, which must first pass the Random123
vectors, followed by Box–Muller in float64. Counter layout (csrc/include/drs/philox.h):
ctr = (element // 4, sample mod 2^32, (sample >> 32) | branch << 24, stream), key = (seed mod 2^32,
seed >> 32), normals 4g .. 4g+3 = BM(lane 0, lane 1), BM(lane 2, lane 3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import MAX_SEED, SAMPLE_SPACE, noise_planes, packed

import drs_ext
from drs_ext import reference

MASK32 = 0xFFFFFFFF

# (counter, key, expected output) from Random123's kat_vectors for philox4x32_10.
RANDOM123_KAT: list[tuple[tuple[int, ...], tuple[int, int], tuple[int, ...]]] = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (MASK32, MASK32, MASK32, MASK32),
        (MASK32, MASK32),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def numpy_philox(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of counters (..., 4) (uint32 values) under key (k0, k1), in uint64 numpy."""
    u32 = np.uint64(MASK32)
    c = [np.asarray(ctr, dtype=np.uint64)[..., i] for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # exact: both factors < 2^32
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & u32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & u32,
        ]
        k0 = (k0 + np.uint64(0x9E3779B9)) & u32
        k1 = (k1 + np.uint64(0xBB67AE85)) & u32
    return np.stack(c, axis=-1)


def numpy_box_muller(words: np.ndarray) -> np.ndarray:
    """(..., 4) Philox words -> (..., 4) standard normals.

    u = float32(v) * 2^-32 + 2^-33 in float32, a value in (0, 1] (the kernels' convention), then
    Box–Muller in float64: z0, z1 = r cos, r sin (r from lane 0, angle from lane 1); same for 2, 3.
    """
    v = np.asarray(words, dtype=np.uint64).astype(np.float32)
    u = (v * np.float32(2.0**-32) + np.float32(2.0**-33)).astype(np.float64)
    out = np.empty(u.shape, dtype=np.float64)
    for a in (0, 2):
        r = np.sqrt(-2.0 * np.log(u[..., a]))
        theta = 2.0 * math.pi * u[..., a + 1]
        out[..., a] = r * np.cos(theta)
        out[..., a + 1] = r * np.sin(theta)
    return out


def seed_of_key(key: tuple[int, int]) -> int:
    return (key[1] << 32) | key[0]


def expected_normals(seed: int, stream: int, branch: int, sample: int, m: int) -> np.ndarray:
    """The m standard normals of one (seed, stream, branch, sample), from the numpy Philox."""
    groups = np.arange((m + 3) // 4, dtype=np.uint64)
    ctr = np.zeros((groups.size, 4), dtype=np.uint64)
    ctr[:, 0] = groups
    ctr[:, 1] = sample & MASK32
    ctr[:, 2] = (sample >> 32) | (branch << 24)
    ctr[:, 3] = stream
    words = numpy_philox(ctr, (seed & MASK32, seed >> 32))
    return numpy_box_muller(words).reshape(-1)[:m]


def kernel_normals(
    seed: int,
    stream: int,
    sample: int,
    partition: str,
    shape: tuple[int, int, int],
    device: torch.device,
) -> list[np.ndarray]:
    """Per branch, the kernel's standard normals of one sample in sub-image element order."""
    planes = noise_planes(
        device=device,
        seed=seed,
        stream=stream,
        offset=sample,
        partition=partition,
        num=1,
        shape=shape,
    )
    return [plane[0].double().numpy() for plane in planes]


@pytest.mark.parametrize(("ctr", "key", "expected"), RANDOM123_KAT)
def test_numpy_philox_passes_random123_vectors(
    ctr: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]
) -> None:
    got = numpy_philox(np.array(ctr, dtype=np.uint64), key)
    assert [int(w) for w in got] == list(expected)


@pytest.mark.parametrize(("ctr", "key", "expected"), RANDOM123_KAT)
def test_reference_philox_passes_random123_vectors(
    ctr: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]
) -> None:
    got = reference.philox4x32_10(torch.tensor([ctr], dtype=torch.int64), key)
    assert got.dtype == torch.int64
    assert got[0].tolist() == list(expected)


def test_reference_philox_equals_numpy_philox_on_random_counters() -> None:
    rng = np.random.default_rng(12345)
    ctr = rng.integers(0, 2**32, size=(2000, 4), dtype=np.uint64)
    ctr[:10] = MASK32  # extreme words as well
    for key in [(0, 0), (MASK32, MASK32), (0xA4093822, 0x299F31D0), (1, 0x7FFFFFFF)]:
        expected = numpy_philox(ctr, key).astype(np.int64)
        got = reference.philox4x32_10(torch.from_numpy(ctr.astype(np.int64)), key).numpy()
        np.testing.assert_array_equal(got, expected)


def test_kernel_reproduces_random123_vector_zero(device: torch.device) -> None:
    """KAT 1 (ctr 0, key 0) is reachable: seed 0, stream 0, sample 0, branch 0, group 0."""
    ctr, key, words = RANDOM123_KAT[0]
    expected = numpy_box_muller(np.array(words, dtype=np.uint64))
    (none,) = kernel_normals(seed_of_key(key), 0, 0, "none", (1, 1, 4), device)
    np.testing.assert_allclose(none, expected, rtol=0, atol=1e-5)
    # Branch 0 of the diagonal partition uses the same counters: sub-image elements 0..3.
    diag_l, _ = kernel_normals(seed_of_key(key), 0, 0, "diag", (1, 1, 8), device)
    np.testing.assert_allclose(diag_l, expected, rtol=0, atol=1e-5)


# KATs 2 and 3 are unreachable by the layout (element group >= 2^29, branch byte 0xff / 0x13).
# KAT-style vectors of our own: (seed, stream, sample, partition, (C, H, W), branch, group).
# The first reuses Random123 KAT 3's key, stream and sample words with branch 1 and group 5.
KERNEL_VECTORS: list[tuple[int, int, int, str, tuple[int, int, int], int, int]] = [
    (
        seed_of_key((0xA4093822, 0x299F31D0)),
        0x03707344,
        ((0x13198A2E & 0xFFFFFF) << 32) | 0x85A308D3,
        "diag",
        (1, 4, 12),
        1,
        5,
    ),
    (MAX_SEED, MASK32, SAMPLE_SPACE - 1, "diag", (1, 2, 14), 1, 3),
    (MAX_SEED, MASK32, SAMPLE_SPACE - 1, "diag", (1, 2, 14), 0, 3),
    (2**32 + 1, 12345, 2**40 + 7, "none", (3, 2, 2), 0, 2),
    (0xDEADBEEF, 0, 2**32, "none", (1, 1, 5), 0, 1),
]


@pytest.mark.parametrize(
    ("seed", "stream", "sample", "partition", "shape", "branch", "group"), KERNEL_VECTORS
)
def test_kernel_matches_independent_philox_box_muller(
    device: torch.device,
    seed: int,
    stream: int,
    sample: int,
    partition: str,
    shape: tuple[int, int, int],
    branch: int,
    group: int,
) -> None:
    ctr = np.array(
        [group, sample & MASK32, (sample >> 32) | (branch << 24), stream], dtype=np.uint64
    )
    words = numpy_philox(ctr, (seed & MASK32, seed >> 32))
    expected = numpy_box_muller(words)
    got = kernel_normals(seed, stream, sample, partition, shape, device)[branch]
    lanes = got[4 * group : 4 * group + 4]  # the last group of an image may be cut short
    np.testing.assert_allclose(lanes, expected[: lanes.size], rtol=0, atol=1e-5)
    # Every other element of the sub-image as well.
    full = expected_normals(seed, stream, branch, sample, got.size)
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("partition", ["diag", "none"])
def test_kernel_and_reference_normals_match_numpy_on_a_whole_batch(
    device: torch.device, partition: str
) -> None:
    seed, offset, num = 987654321987, 2**33 - 2, 4
    streams = torch.tensor([3, 0, 2**31 + 5])
    x = torch.zeros(3, 3, 5, 6, device=device)
    out = drs_ext.noisy_views(
        x,
        1.0,
        num=num,
        seed=seed,
        offset=offset,
        stream=streams.to(device),
        partition=partition,
        fill="zeros",
    ).cpu()
    for n, stream in enumerate(streams.tolist()):
        for p in range(2 if partition == "diag" else 1):
            for s in range(num):
                plane = out[n, p, s] if partition == "none" else packed(out[n, p, s], p)
                got = plane.reshape(-1).double().numpy()
                expected = expected_normals(seed, stream, p, offset + s, got.size)
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
                ref = reference.standard_normals(
                    seed, stream, p, torch.tensor([offset + s]), got.size
                )[0]
                np.testing.assert_allclose(ref.double().numpy(), expected, rtol=0, atol=1e-5)
