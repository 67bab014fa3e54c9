"""What the host runs of the CUDA kernels share: building a harness, inputs and comparisons.

The tolerances and comparisons are the main suite's (python_tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import (  # noqa: F401  (re-exported to the lab tests)
    assert_close_to,
    assert_within_ulp,
    bincount_oracle,
    parity_atol,
    random_images,
    reference_atol,
    tied_logits,
)
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"

FILLS: tuple[str, ...] = ("neighbors", "pair", "bilinear", "zeros")
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# (N, C, H, W) for "diag". Tiling (csrc/cuda/noisy_views_diag.cuh): W/2 <= 128 gives whole-row
# tiles of about 4096 packed elements, wider sub-images column tiles of at most 128 columns.
DIAG_SHAPES: list[tuple[int, int, int, int]] = [
    (1, 3, 32, 32),  # CIFAR: one tile per plane, spanning the 3 channels
    (2, 1, 6, 10),  # N > 1, C = 1, H != W, W/2 = 5 odd, m = 30 not a multiple of 4
    (3, 3, 7, 14),  # odd H and W/2
    (1, 3, 70, 40),  # two row tiles, the boundary inside a channel (halo rows)
    (1, 1, 5, 600),  # three column tiles (halo columns)
    (2, 2, 11, 262),  # column tiles of 66 columns, rows spanning channels
    (1, 1, 1, 2),  # a single packed pixel
    (1, 3, 224, 224),  # ImageNet: 19 row tiles
]
NONE_SHAPES: list[tuple[int, int, int, int]] = [
    (1, 3, 32, 32),
    (2, 1, 5, 7),  # m = 35: partial last group, unaligned planes
    (3, 1, 3, 5),
    (1, 3, 224, 224),
]


def load_host_harness(source: str, namespace: str, build_dir: Path) -> object:
    """torch.ops.<namespace>, registered by python_tests/lab/<source>: a host run of CUDA device
    code, compiled with the kernels' include paths (csrc, csrc/include, csrc/cuda)."""
    cpp_extension.load(
        name=namespace,
        sources=[str(HERE / source)],
        extra_include_paths=[str(CSRC), str(CSRC / "include"), str(CSRC / "cuda")],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, namespace)
