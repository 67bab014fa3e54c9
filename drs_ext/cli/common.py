"""What the `drs` subcommands share: the device, sharding, image selection and common flags."""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import _C

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def default_device() -> str:
    """cuda:LOCAL_RANK when a GPU and the CUDA kernels are both there, else cpu."""
    if torch.cuda.is_available():
        if _C.built_with_cuda:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        print(
            "warning: a GPU is visible but drs_ext was built without CUDA kernels; using the "
            "CPU (rebuild with pip install --no-build-isolation -e . where nvcc is on PATH)",
            file=sys.stderr,
        )
    return "cpu"


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless --no-progress, and only on a terminal: a captured log would
    otherwise fill with bar redraws."""
    return not args.no_progress and sys.stderr.isatty()


def parse_shard(text: str | None) -> tuple[int, int]:
    """``K/N`` from --shard, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", 1))
        return int(os.environ.get("RANK", 0)), world
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, e.g. 0/4, got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard K/N needs N >= 1 and 0 <= K < N, got {text!r}")
    return k, n


def shard_path(out: Path, shard: int, shards: int) -> Path:
    return out if shards == 1 else out.with_name(f"{out.stem}.shard{shard}of{shards}{out.suffix}")


def select_indices(
    num_images: int, skip: int = 1, max_index: int = -1, shard: int = 0, shards: int = 1
) -> list[int]:
    """Cohen et al.'s selection (i % skip == 0 and i < max), then every shards-th from shard.

    Sharding goes by position in the selection, not by i itself: with --skip 20 every i is a
    multiple of 20, so ``i % N`` would leave some workers with nothing.
    """
    if skip < 1:
        raise ValueError(f"--skip must be >= 1, got {skip}")
    stop = num_images if max_index < 0 else min(max_index, num_images)
    return list(range(0, stop, skip))[shard::shards]


def key_values(pairs: Sequence[str], flag: str) -> dict:
    """``["lam=10", "m=4"]`` -> {"lam": 10, "m": 4} (values parsed as Python literals)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return params


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if usable, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument(
        "--no-progress", action="store_true", help="hide progress bars (hidden off a terminal)"
    )
