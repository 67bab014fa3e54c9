"""``drs certify``: certify a data set with RS (one checkpoint) or DRS (a branch pair).

Writes Cohen et al.'s TSV (drs_ext/io/results.py), one flushed row per image. Sharding:
``--shard K/N``, or torchrun's RANK / WORLD_SIZE, gives worker K every N-th of the selected
images and the output file ``<out stem>.shard<K>of<N><suffix>``; ``drs merge`` joins them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io.checkpoint import BranchSpec, check_drs_pair, check_sigma, load_branch
from ..io.data import ImageDataset, load_dataset
from ..io.results import TsvWriter
from ..smoothing import BranchSmoothing, DualSmoothedClassifier, SmoothedClassifier
from .common import (
    add_common,
    default_device,
    parse_shard,
    select_indices,
    shard_path,
    show_progress,
)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def model_call_options(args: argparse.Namespace) -> dict:
    """The classifiers' keyword options for how views go through the model: they change timing,
    and with --autocast the model's own logits, never the noise or the counting."""
    return {
        "autocast_dtype": AUTOCAST_DTYPES[args.autocast] if args.autocast else None,
        "channels_last": args.channels_last,
        "cuda_graph": args.cuda_graph,
        "prefetch_noise": not args.no_prefetch,
    }


def build_smoothed(
    checkpoints: Sequence[str], sigma: float | None, device: str, **options: object
) -> tuple[BranchSmoothing, BranchSpec]:
    """RS from one checkpoint or DRS from a branch-0/branch-1 pair, checked for consistency.
    `options` go to the classifier (model_call_options); channels_last also converts the model's
    weights, which is where cuDNN's speed-up comes from."""
    loaded = [load_branch(path, map_location=device) for path in checkpoints]
    if options.get("channels_last"):
        for model, _ in loaded:
            model.to(memory_format=torch.channels_last)
    if len(loaded) == 1:
        (model, spec), path = loaded[0], checkpoints[0]
        if spec.partition != "none":
            raise ValueError(
                f"{path} is DRS branch {spec.branch}; certify DRS with both branch checkpoints "
                "(--checkpoint branch0.pt branch1.pt)"
            )
        rs_sigma = check_sigma(spec, sigma, path)
        return SmoothedClassifier(model, spec.num_classes, rs_sigma, **options), spec
    if len(loaded) != 2:
        raise ValueError(f"--checkpoint takes one (RS) or two (DRS) files, got {len(loaded)}")
    (m0, s0), (m1, s1) = loaded
    order = check_drs_pair(s0, s1, names=(checkpoints[0], checkpoints[1]))
    models = [(m0, m1)[i] for i in order]
    spec = (s0, s1)[order[0]]
    check_sigma(spec, sigma, "DRS checkpoints")
    smoothed = DualSmoothedClassifier(
        models[0], models[1], spec.num_classes, spec.sigma, spec.fill, **options
    )
    return smoothed, spec


def certify_images(
    smoothed: BranchSmoothing,
    dataset: ImageDataset,
    indices: Sequence[int],
    writer: TsvWriter,
    *,
    n0: int,
    n: int,
    alpha: float,
    batch: int,
    seed: int,
    device: str,
    progress: bool = True,
    desc: str = "certify",
) -> None:
    """Certify ``dataset[i]`` for each i of ``indices`` not yet in ``writer``, one row each.

    The noise stream of image i is i itself, so its certificate does not depend on the shard,
    the batch size or whether the run was resumed.
    """
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
    todo = list(indices[len(done) :])
    for i in tqdm(todo, desc=desc, disable=not progress, dynamic_ncols=True):
        x, label = dataset[i]
        start = time.perf_counter()
        prediction, radius = smoothed.certify(
            x.to(device), n0, n, alpha, batch, seed=seed, stream=i
        )
        writer.write(i, label, prediction, radius, prediction == label, time.perf_counter() - start)


def run(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    smoothed, spec = build_smoothed(args.checkpoint, args.sigma, device, **model_call_options(args))
    dataset = load_dataset(args.data, args.split, download=args.download)
    if tuple(dataset.input_shape) != tuple(spec.input_shape):
        raise ValueError(
            f"data set images are {tuple(dataset.input_shape)} but the checkpoint expects "
            f"{tuple(spec.input_shape)}"
        )
    shard, shards = parse_shard(args.shard)
    indices = select_indices(len(dataset), args.skip, args.max, shard, shards)
    out = shard_path(Path(args.out), shard, shards)
    with TsvWriter(out, resume=args.resume, overwrite=args.overwrite) as writer:
        if writer.dropped is not None:
            print(f"{out}: redoing the half-written last line {writer.dropped!r}", file=sys.stderr)
        certify_images(
            smoothed,
            dataset,
            indices,
            writer,
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            batch=args.batch,
            seed=args.seed,
            device=device,
            progress=show_progress(args),
            desc=f"certify {out.name}",
        )
        total = len(writer.done)
    print(f"{out}: {total} rows ({spec.describe()}, shard {shard}/{shards})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certify a data set with RS (1 checkpoint) or DRS (2)")
    p.add_argument(
        "--data", required=True, help="digits | npz:FILE | folder:DIR | torchvision:NAME:ROOT"
    )
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--checkpoint", nargs="+", required=True, help="RS model, or DRS branch 0 and 1")
    p.add_argument("--sigma", type=float, help="must equal the checkpoints' σ (default: theirs)")
    # --N0 / --N: the flag names of Cohen et al.'s certify.py.
    p.add_argument("--n0", "--N0", type=int, default=100, help="selection draws (default 100)")
    p.add_argument("--n", "--N", type=int, default=100_000, help="estimation draws (100000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noisy views per forward pass")
    p.add_argument("--skip", type=int, default=1, help="certify every skip-th image")
    p.add_argument("--max", type=int, default=-1, help="stop before this image index")
    p.add_argument("--shard", help="K/N: this worker's share (default: torchrun RANK/WORLD_SIZE)")
    p.add_argument("--out", required=True, help="output TSV (Cohen et al.'s format)")
    speed = p.add_argument_group("model call (GPU speed; the noise and the counting are unchanged)")
    speed.add_argument(
        "--autocast", choices=sorted(AUTOCAST_DTYPES), help="run the model under torch.autocast"
    )
    speed.add_argument("--channels-last", action="store_true", help="channels_last model+views")
    speed.add_argument(
        "--cuda-graph", action="store_true", help="capture the model call in a CUDA graph"
    )
    speed.add_argument(
        "--no-prefetch", action="store_true", help="draw noise on the model's stream only"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted file")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing file")
    add_common(p)
    p.set_defaults(func=run)
