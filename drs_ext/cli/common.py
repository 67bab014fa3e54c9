"""What the `drs` subcommands share: the device, sharding, image selection and common flags."""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import _C
from ..io.data import ImageDataset
from ..io.results import TsvWriter

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def default_device() -> str:
    """cuda:LOCAL_RANK when a GPU and the CUDA kernels are both there, else cpu."""
    if torch.cuda.is_available():
        if _C.built_with_cuda:
            return f"cuda:{_env_int(os.environ, 'LOCAL_RANK', 0) or 0}"
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


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``K/N`` from --shard, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1)
    if text is not None:
        if world is not None and world > 1:
            raise ValueError(
                f"--shard {text} given under torchrun (WORLD_SIZE={world}): every process would "
                "certify the same shard; drop --shard and let RANK/WORLD_SIZE pick each one's"
            )
        try:
            k, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must be K/N with integers, e.g. 0/4, got {text!r}") from None
        if n < 1 or not 0 <= k < n:
            raise ValueError(f"--shard K/N needs N >= 1 and 0 <= K < N, got {text!r}")
        return k, n
    rank = _env_int(env, "RANK", 0)
    if rank is not None and world is None:
        raise ValueError(
            f"RANK={rank} is set but WORLD_SIZE is not; launch with torchrun (which sets both), "
            "set both, or give --shard K/N"
        )
    if world is not None and world > 1 and rank is None:
        raise ValueError(f"WORLD_SIZE={world} is set but RANK is not; set both or neither")
    world, rank = world or 1, rank or 0
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE) = [0, {world})")
    return rank, world


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    """An integer environment variable (None when unset), as torchrun sets it."""
    text = env.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(
            f"environment variable {name} must be an integer >= {minimum} (torchrun sets it), "
            f"got {text!r}"
        )
    return value


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


def check_done(writer: TsvWriter, dataset: ImageDataset, indices: Sequence[int]) -> list[int]:
    """The indices still to certify, after checking that the rows already in ``writer`` are the
    first ones of this selection, with this data set's labels."""
    done = [row.idx for row in writer.done]
    if done != list(indices[: len(done)]):
        raise ValueError(
            f"{writer.path} holds rows for idx {done[:3]}... but this run selects "
            f"{list(indices[:3])}...; it was written with other --skip/--max/--shard"
        )
    for row in writer.done:
        if row.label != dataset[row.idx][1]:
            raise ValueError(
                f"{writer.path}: idx {row.idx} has label {row.label} but the data set says "
                f"{dataset[row.idx][1]}; was it written for another --data?"
            )
    return list(indices[len(done) :])
