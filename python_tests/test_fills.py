"""The fills (docs/design.md §2.3) against fills written out pixel by pixel, in the noise-free
limit of noisy_views on every device and in drs_ext.reference itself."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import FILLS, kept_mask, random_images

import drs_ext
from drs_ext import reference

FILL_SHAPES: list[tuple[int, int, int, int]] = [
    (2, 2, 5, 6),
    (1, 1, 1, 2),
    (1, 3, 4, 2),
    (1, 1, 3, 8),
]


def hand_fill(x: np.ndarray, branch: int, mode: str) -> np.ndarray:
    """fill_p(sub_p(x)) of one (C, H, W) image, pixel by pixel (docs/design.md §2.1, §2.3)."""
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


def image(shape: tuple[int, int, int, int]) -> torch.Tensor:
    return random_images(shape, seed=15, scale=1.0)


@functools.cache
def hand_filled(shape: tuple[int, int, int, int], fill: str) -> torch.Tensor:
    """(N, 2, C, H, W) float64: hand_fill of every image of image(shape) and both branches."""
    x = image(shape).double().numpy()
    return torch.stack(
        [
            torch.stack([torch.from_numpy(hand_fill(x[n], p, fill)) for p in range(2)])
            for n in range(shape[0])
        ]
    )


@pytest.mark.parametrize("fill", FILLS)
def test_fill_in_the_noise_free_limit(device: torch.device, fill: str) -> None:
    for shape in FILL_SHAPES:
        x = image(shape).to(device)
        out = drs_ext.noisy_views(x, 1e-6, num=2, seed=4, partition="diag", fill=fill).cpu()
        expected = hand_filled(shape, fill)[:, :, None].expand(-1, -1, 2, -1, -1, -1)
        err = float((out.double() - expected).abs().max())
        assert err <= 1e-5, (shape, err)
        if fill == "zeros":  # dropped pixels are exactly zero whatever the noise
            for p in range(2):
                dropped = ~kept_mask(shape[2], shape[3], p)
                assert bool((out[:, p, :, :, dropped] == 0).all()), shape
        none = drs_ext.noisy_views(x, 1e-6, num=2, seed=4, partition="none", fill=fill)
        assert float((none - x[:, None, None]).abs().max()) <= 1e-5, shape


@pytest.mark.parametrize("fill", FILLS)
def test_reference_fill_matches_hand_fill(fill: str) -> None:
    """The oracle's fill itself, checked against the explicit loops (exactly, in float64)."""
    for shape in FILL_SHAPES:
        x = image(shape).double()
        got = torch.stack(
            [reference.fill(reference.sub_image(x, p), p, shape[3], fill) for p in range(2)], dim=1
        )
        torch.testing.assert_close(got, hand_filled(shape, fill), rtol=0, atol=1e-12)


def test_kept_pixels_carry_the_noise_of_the_packed_sub_image(device: torch.device) -> None:
    """Every fill keeps or copies the noisy packed values: "neighbors" and "zeros" keep them in
    place, "pair" holds each twice; all three agree on the kept pixels."""
    x = random_images((2, 3, 5, 6), seed=17).to(device)
    kw = {"num": 3, "seed": 2, "partition": "diag"}
    outs = {f: drs_ext.noisy_views(x, 0.4, fill=f, **kw).cpu() for f in FILLS}  # type: ignore[arg-type]
    for p in range(2):
        mask = kept_mask(5, 6, p)
        kept = outs["zeros"][:, p][..., mask]
        assert torch.equal(outs["neighbors"][:, p][..., mask], kept)
        assert torch.equal(outs["pair"][:, p][..., mask], kept)
        pair = outs["pair"][:, p]
        assert torch.equal(pair[..., 0::2], pair[..., 1::2])
