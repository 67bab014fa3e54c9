"""``drs certify``: certify a data set with RS (one checkpoint), DRS (a branch pair),
σ-routing (``--estimator`` plus classifiers per level, drs_ext/cli/routed.py) or the σ-selector
(``--selector`` plus the base classifier, drs_ext/cli/selected.py).

Writes Cohen et al.'s TSV (drs_ext/io/results.py), one flushed row per image. Sharding:
``--shard K/N``, or torchrun's RANK / WORLD_SIZE, gives worker K every N-th of the selected
images and the output file ``<out stem>.shard<K>of<N><suffix>``; ``drs merge`` joins them.
The settings of the run go to ``<out>.settings.json`` (drs_ext/io/settings.py); ``--resume``
refuses a file made with other settings.

Under torchrun, put the command after ``--no-python --``, so torchrun's own parser never sees
its flags (``--n`` would be an ambiguous prefix of ``--nnodes``/``--nproc-per-node``)::

    torchrun --standalone --nproc_per_node=8 --no-python -- drs certify --data … --out drs.tsv

Every flag also has a spelling that is no prefix of a torchrun option (``--N`` or
``--num-samples`` for ``--n``, ``--max-index`` for ``--max``), for the form
``torchrun … $(which drs) certify …``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io.checkpoint import BranchSpec, check_drs_pair, check_sigma, load_branch
from ..io.data import ImageDataset, load_dataset
from ..io.results import TsvWriter
from ..io.settings import now, run_settings
from ..smoothing import BranchSmoothing, DualSmoothedClassifier, SmoothedClassifier
from ..smoothing.sampling import MAX_DRAWS
from ..train import UniversalSigma
from .common import (
    add_common,
    check_done,
    default_device,
    parse_shard,
    select_indices,
    shard_path,
    show_progress,
)
from .routed import ROUTED_FIELDS, build_router, routed_columns
from .selected import (
    SELECTOR_FIELDS,
    add_selector_args,
    build_selected,
    selector_columns,
    selector_method_args,
    validate_selector,
)
from .sequential import (
    SELECTOR_SEQUENTIAL_FIELDS,
    SEQUENTIAL_FIELDS,
    add_sequential_args,
    certify_images_sequential,
    packed_plan,
    selector_sequential_columns,
    sequential_method_args,
    validate_sequential,
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


def certify_sigma(spec: BranchSpec, sigma: float | None, name: str) -> float:
    """The σ to certify a checkpoint at: its own, or for a model trained with the universal
    recipe (σ drawn per image over [sigma_min, sigma_max]) any --sigma in that range."""
    recipe = spec.recipe or {}
    if sigma is not None and recipe.get("name") == UniversalSigma.name:
        low, high = recipe["sigma_min"], recipe["sigma_max"]
        if not low <= sigma <= high:
            raise ValueError(
                f"--sigma {sigma:g} lies outside [{low:g}, {high:g}], the range of σ the "
                f"{name} was trained on (universal recipe)"
            )
        return sigma
    return check_sigma(spec, sigma, name)


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
        rs_sigma = certify_sigma(spec, sigma, path)
        return SmoothedClassifier(model, spec.num_classes, rs_sigma, **options), spec
    if len(loaded) != 2:
        raise ValueError(f"--checkpoint takes one (RS) or two (DRS) files, got {len(loaded)}")
    (m0, s0), (m1, s1) = loaded
    order = check_drs_pair(s0, s1, names=(checkpoints[0], checkpoints[1]))
    models = [(m0, m1)[i] for i in order]
    spec = (s0, s1)[order[0]]
    drs_sigma = certify_sigma(spec, sigma, "DRS checkpoints")
    smoothed = DualSmoothedClassifier(
        models[0], models[1], spec.num_classes, drs_sigma, spec.fill, **options
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
    columns: Callable[[Any], tuple] | None = None,
    **certify_options: object,
) -> None:
    """Certify ``dataset[i]`` for each i of ``indices`` not yet in ``writer``, one row each.

    The noise stream of image i is i itself, so its certificate does not depend on the shard,
    the batch size or whether the run was resumed. Any smoothed classifier with a
    ``certify_details`` serves (RS, DRS, σ-routing, σ-selector); ``certify_options`` go to it
    (the σ-selector's lam, n_h), and ``columns(certificate)`` gives the values of the writer's
    extra columns (routed.routed_columns, selected.selector_columns).
    """
    todo = check_done(writer, dataset, indices)
    for i in tqdm(todo, desc=desc, disable=not progress, dynamic_ncols=True):
        x, label = dataset[i]
        start = time.perf_counter()
        cert = smoothed.certify_details(
            x.to(device), n0, n, alpha, batch, seed=seed, stream=i, **certify_options
        )
        seconds = time.perf_counter() - start
        extra = columns(cert) if columns else ()
        writer.write(
            i, label, cert.prediction, cert.radius, cert.prediction == label, seconds, extra=extra
        )


def validate(args: argparse.Namespace) -> None:
    """Every argument checked before anything is loaded or any file touched."""
    for flag, value, upper in (
        ("--n0", args.n0, MAX_DRAWS),
        ("--n", args.n, MAX_DRAWS),
        ("--batch", args.batch, None),
        ("--skip", args.skip, None),
    ):
        if value < 1 or (upper is not None and value > upper):
            bound = f" and at most {upper}" if upper else ""
            raise ValueError(f"{flag} must be an integer >= 1{bound}, got {value}")
    if args.max == 0 or args.max < -1:
        raise ValueError(
            f"--max must be -1 (no limit) or an image index >= 1 to stop before, got {args.max}"
        )
    if not 0.0 < args.alpha < 1.0:
        raise ValueError(f"--alpha must lie in the open interval (0, 1), got {args.alpha}")
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma > 0):
        raise ValueError(f"--sigma must be finite and > 0, got {args.sigma}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.estimator and args.sigma is not None:
        raise ValueError("--sigma does not apply with --estimator: the levels come from it")
    validate_selector(args)
    validate_sequential(args)


def run(args: argparse.Namespace) -> int:
    validate(args)
    device = args.device or default_device()
    shard, shards = parse_shard(args.shard)
    out = shard_path(Path(args.out), shard, shards)
    if out.exists() and not (args.resume or args.overwrite):
        raise FileExistsError(
            f"{out} exists; pass --resume to continue it or --overwrite to replace it"
        )
    method_args, extra_fields, certify_options = None, (), {}
    if args.estimator:
        smoothed, spec = build_router(
            args.estimator, args.checkpoint, device, **model_call_options(args)
        )
        checkpoints = [args.estimator, *args.checkpoint]
        extra_fields, certify_options = ROUTED_FIELDS, {"columns": routed_columns}
        if args.sequential:  # packed batches across images, both stages sequential
            extra_fields = (*ROUTED_FIELDS, *SEQUENTIAL_FIELDS)
    elif args.selector:
        smoothed, spec = build_selected(args, device, **model_call_options(args))
        checkpoints = [args.selector, *args.checkpoint]
        method_args, extra_fields = selector_method_args(args), SELECTOR_FIELDS
        certify_options = {"columns": selector_columns, "lam": args.lam, "n_h": args.n_selector}
        if args.sequential:  # packed batches across images, both stages sequential
            extra_fields = SELECTOR_SEQUENTIAL_FIELDS
            certify_options["columns"] = selector_sequential_columns
    else:
        smoothed, spec = build_smoothed(
            args.checkpoint, args.sigma, device, **model_call_options(args)
        )
        checkpoints = list(args.checkpoint)
        if args.sequential:  # packed batches across images
            extra_fields = SEQUENTIAL_FIELDS
    if args.sequential:
        method_args = {**(method_args or {}), **sequential_method_args(args)}
    dataset = load_dataset(args.data, args.split, download=args.download)
    if tuple(dataset.input_shape) != tuple(spec.input_shape):
        raise ValueError(
            f"data set images are {tuple(dataset.input_shape)} but the checkpoint expects "
            f"{tuple(spec.input_shape)}"
        )
    indices = select_indices(len(dataset), args.skip, args.max, shard, shards)
    settings = run_settings(
        smoothed,
        checkpoints=checkpoints,
        data=args.data,
        split=args.split,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        seed=args.seed,
        skip=args.skip,
        max_index=args.max,
        shard=shard,
        shards=shards,
        autocast=args.autocast,
        method_args=method_args,
    )
    run_info = {
        "checkpoints": [str(Path(c).resolve()) for c in checkpoints],
        "selected": len(indices),
        "images": len(dataset),
        "batch": args.batch,
        "device": device,
        "started": now(),
    }
    writer = TsvWriter(
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        settings=settings,
        run_info=run_info,
        extra_fields=extra_fields,
    )
    with writer:
        if writer.dropped is not None:
            print(f"{out}: redoing the half-written last line {writer.dropped!r}", file=sys.stderr)
        # The per-image loop of a fixed n, or the packed loop of the sequential procedures.
        if args.sequential:
            loop = functools.partial(
                certify_images_sequential,
                plan=packed_plan(args, smoothed),
                columns=certify_options.get("columns"),
            )
        else:
            loop = functools.partial(
                certify_images, n0=args.n0, n=args.n, alpha=args.alpha, **certify_options
            )
        loop(
            smoothed,
            dataset,
            indices,
            writer,
            batch=args.batch,
            seed=args.seed,
            device=device,
            progress=show_progress(args),
            desc=f"certify {out.name}",
        )
        total = len(writer.done)
    what = spec.describe()
    if args.selector:
        what = f"σ-selector at λ = {args.lam:g} over levels {args.levels}, classifier {what}"
    print(f"{out}: {total} rows ({what}, shard {shard}/{shards})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certify",
        help="certify a data set with RS (1 checkpoint), DRS (2), σ-routing or the σ-selector",
    )
    p.add_argument(
        "--data", required=True, help="digits | npz:FILE | folder:DIR | torchvision:NAME:ROOT"
    )
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--checkpoint", nargs="+", required=True, help="RS model, or DRS branch 0 and 1")
    p.add_argument(
        "--sigma",
        type=float,
        help="must equal the checkpoints' σ (default: theirs), or lie in a universal model's range",
    )
    p.add_argument(
        "--estimator",
        help="σ-routing: a σ-estimator checkpoint (drs train --sigma-estimator); --checkpoint "
        "then gives one classifier per level (RS, or DRS pairs) or one for all levels",
    )
    add_selector_args(p)
    add_sequential_args(p)
    # --N0 / --N: the flag names of Cohen et al.'s certify.py.
    # --num-samples / --max-index: spellings that are no prefix of a torchrun option.
    p.add_argument("--n0", "--N0", type=int, default=100, help="selection draws (default 100)")
    p.add_argument(
        "--n", "--N", "--num-samples", type=int, default=100_000, help="estimation draws (100000)"
    )
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noisy views per forward pass")
    p.add_argument("--skip", type=int, default=1, help="certify every skip-th image")
    p.add_argument(
        "--max", "--max-index", type=int, default=-1, help="stop before this index (-1: none)"
    )
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
    mode.add_argument(
        "--overwrite", action="store_true", help="replace an existing file (with the first row)"
    )
    add_common(p)
    p.set_defaults(func=run)
