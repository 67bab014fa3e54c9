r"""The ``drs`` command: train, certify, merge, analyze, bench, demo.

    drs train    --data digits --arch digits_cnn --recipe gaussian --sigma 0.25 --out runs/rs
    drs train    --data digits --pretrained runs/rs/model.pt --partition diag --both-branches \
                 --sigma 0.18 --optimizer adam --lr 1e-3 --epochs 40 --out runs/drs
    drs certify  --data digits --checkpoint runs/rs/model.pt --out rs.tsv
    drs certify  --data digits --checkpoint runs/drs/branch0.pt runs/drs/branch1.pt --out drs.tsv
    drs merge    all.tsv part.shard0of2.tsv part.shard1of2.tsv
    drs analyze  rs.tsv drs.tsv --radii 0 0.25 0.5 --plot curves.png
    drs bench    --shape 3 224 224 --num 100 --out-dtype float16
    drs demo

``certify`` writes Cohen et al.'s TSV format (drs_ext/results.py). Sharding: ``--shard K/N``, or
the torchrun variables RANK / WORLD_SIZE / LOCAL_RANK, give worker K every N-th of the selected
images (position j in the --skip/--max selection goes to worker j mod N) and the output file
``<out stem>.shard<K>of<N><suffix>``; ``drs merge`` joins them.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import _C
from .bench import (
    OUT_DTYPES,
    CheckFailed,
    bench_views,
    copy_bandwidth,
    device_description,
    report,
)
from .checkpoint import BranchSpec, check_drs_pair, check_sigma, load_branch
from .data import ImageDataset, load_dataset
from .ops import FILLS
from .results import (
    TsvWriter,
    markdown_table,
    merge_tsv,
    plot_certified_accuracy,
    read_tsv,
    summarize,
)
from .smoothing import DualSmoothedClassifier, SmoothedClassifier
from .training import RECIPES, TrainConfig, Trainer, finetune_branches, make_recipe

__all__ = ["analyze", "build_parser", "build_smoothed", "certify_images", "main", "select_indices"]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


# -- helpers ---------------------------------------------------------------------------------


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


def _key_values(pairs: Sequence[str], flag: str) -> dict:
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


# -- certify ---------------------------------------------------------------------------------


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def model_call_options(args: argparse.Namespace) -> dict:
    """The classifiers' keyword options for how views go through the model (drs_ext.model_call,
    drs_ext.prefetch): they change timing, and with --autocast the model's own logits."""
    return {
        "autocast_dtype": AUTOCAST_DTYPES[args.autocast] if args.autocast else None,
        "channels_last": args.channels_last,
        "cuda_graph": args.cuda_graph,
        "prefetch_noise": not args.no_prefetch,
    }


def build_smoothed(
    checkpoints: Sequence[str], sigma: float | None, device: str, **options: object
) -> tuple[SmoothedClassifier | DualSmoothedClassifier, BranchSpec]:
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
    smoothed: SmoothedClassifier | DualSmoothedClassifier,
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


def cmd_certify(args: argparse.Namespace) -> int:
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
            progress=not args.no_progress,
            desc=f"certify {out.name}",
        )
        total = len(writer.done)
    print(f"{out}: {total} rows ({spec.describe()}, shard {shard}/{shards})")
    return 0


# -- merge / analyze -------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    rows = merge_tsv(args.output, args.inputs)
    print(f"{args.output}: {rows} rows merged from {len(args.inputs)} files")
    return 0


def _names(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def analyze(
    paths: Sequence[str | Path],
    radii: Sequence[float],
    plot: str | Path | None = None,
    names: Sequence[str] | None = None,
) -> str:
    """Markdown table of the result files (and the plot, when asked); returns the table."""
    names = list(names) if names else _names([str(p) for p in paths])
    if len(names) != len(paths):
        raise ValueError(f"--names needs one name per file ({len(paths)}), got {len(names)}")
    rows = {name: read_tsv(path) for name, path in zip(names, paths, strict=True)}
    table = markdown_table([summarize(name, r, radii) for name, r in rows.items()])
    if plot:
        plot_certified_accuracy(rows, plot)
    return table


def cmd_analyze(args: argparse.Namespace) -> int:
    print(analyze(args.tsv, args.radii, args.plot, args.names))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


# -- train -----------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        milestones=args.milestones,
        seed=args.seed,
        device=args.device or default_device(),
        num_workers=args.workers,
        progress=not args.no_progress,
    )


def _channel_stats(dataset: ImageDataset, limit: int = 10_000) -> dict:
    images = torch.stack([dataset[i][0] for i in range(min(len(dataset), limit))])
    return {
        "mean": images.mean(dim=(0, 2, 3)).tolist(),
        "std": images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
    }


def cmd_train(args: argparse.Namespace) -> int:
    data = load_dataset(args.data, "train", download=args.download)
    eval_data = load_dataset(args.data, "test", download=args.download) if args.eval else None
    recipe = make_recipe(args.recipe, **_key_values(args.recipe_arg, "--recipe-arg"))
    config = _train_config(args)
    out = Path(args.out)
    if args.pretrained:
        model, base = load_branch(args.pretrained)
        if args.arch and args.arch != base.arch:
            raise ValueError(f"--arch {args.arch} differs from the pretrained {base.arch}")
    else:
        if not args.arch:
            raise ValueError("--arch is required unless --pretrained gives the architecture")
        arch_kwargs = _key_values(args.arch_arg, "--arch-arg")
        base = BranchSpec(
            arch=args.arch,
            num_classes=data.num_classes,
            input_shape=tuple(data.input_shape),
            sigma=args.sigma,
            arch_kwargs=arch_kwargs,
            normalization=_channel_stats(data) if args.normalize else None,
        )
        torch.manual_seed(args.seed)
        model = base.build_model()
    if tuple(data.input_shape) != tuple(base.input_shape):
        raise ValueError(f"data images {data.input_shape} differ from model's {base.input_shape}")
    if args.partition == "diag" and args.both_branches:
        finetune_branches(
            model,
            base,
            recipe,
            data,
            config,
            out,
            sigma=args.sigma,
            fill=args.fill,
            resume=args.resume,
            eval_data=eval_data,
        )
        print(f"{out}: branch0.pt, branch1.pt ({args.recipe}, sigma {args.sigma:g})")
        return 0
    if args.partition == "none" and (args.both_branches or args.branch != 0):
        raise ValueError("--branch 1 and --both-branches need --partition diag")
    branch = args.branch if args.partition == "diag" else 0
    spec = replace(base, sigma=args.sigma, partition=args.partition, branch=branch, fill=args.fill)
    path = out / ("model.pt" if args.partition == "none" else f"branch{branch}.pt")
    Trainer(model, spec, recipe, data, config, path, eval_data=eval_data).fit(resume=args.resume)
    print(f"{path}: {spec.describe()}, recipe {args.recipe}")
    return 0


# -- bench -----------------------------------------------------------------------------------

BENCH_SIGMA = 0.5  # the timing does not depend on σ; the tolerance of the check does, a little
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def _bench_device(text: str | None) -> torch.device:
    """--device as a torch.device with an index on CUDA, or a ValueError naming --device."""
    name = text or default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name}: drs bench runs on cpu or cuda, got {device.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible to torch")
    if not _C.built_with_cuda:
        raise ValueError(
            f"--device {name}: drs_ext was built without CUDA kernels; rebuild where nvcc is on "
            "PATH (pip install --no-build-isolation -e .)"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _bench_settings(args: argparse.Namespace) -> tuple[torch.device, list[str], torch.dtype]:
    """Checks every option before anything runs; each error names its option."""
    channels, height, width = args.shape
    if min(args.shape) < 1:
        raise ValueError(f"--shape C H W must be >= 1 each, got {' '.join(map(str, args.shape))}")
    partitions = ["diag", "none"] if args.partition == "both" else [args.partition]
    if "diag" in partitions and width % 2:
        raise ValueError(
            f"--shape {channels} {height} {width} has an odd width W={width}, but --partition "
            f"{args.partition} runs partition diag, which needs an even W (use --partition "
            "none, or an even W)"
        )
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    name = DTYPE_ALIASES.get(args.out_dtype.lower(), args.out_dtype.lower())
    if name not in OUT_DTYPES:
        raise ValueError(
            f"--out-dtype must be one of {', '.join(OUT_DTYPES)} (what noisy_views writes on "
            f"CPU and CUDA), got {args.out_dtype!r}"
        )
    return _bench_device(args.device), partitions, OUT_DTYPES[name]


def cmd_bench(args: argparse.Namespace) -> int:
    """Time drs_ext.noisy_views against the plain pipeline on this machine (DESIGN.md §5):
    `pip install` does not ship the repository's benchmarks/, and a GPU's figures are only
    known on that GPU."""
    device, partitions, out_dtype = _bench_settings(args)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (15 if cuda else 11)
    description = device_description(device)
    try:
        copy_bw = None
        if cuda:
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(2**30, free // 4)  # 1 GiB as benchmarks/bench_cuda.py, if it fits
            copy_bw = copy_bandwidth(warmup, repeats, device, nbytes)
        results = [
            bench_views(
                args.shape,
                args.num,
                partition,
                out_dtype=out_dtype,
                device=device,
                sigma=BENCH_SIGMA,
                warmup=warmup,
                repeats=repeats,
                copy_bw=copy_bw,
            )
            for partition in partitions
        ]
    except torch.cuda.OutOfMemoryError:
        raise ValueError(
            f"--num {args.num} with --shape {' '.join(map(str, args.shape))} does not fit in "
            f"{device}'s memory; use a smaller --num"
        ) from None
    except CheckFailed as err:
        print(f"drs bench: check failed: {err}", file=sys.stderr)
        return 1
    print(report(results, description, warmup, repeats, copy_bw, BENCH_SIGMA))
    return 0


# -- demo ------------------------------------------------------------------------------------

DEMO_FILES = (
    "base/model.pt",
    "rs/model.pt",
    "drs/branch0.pt",
    "drs/branch1.pt",
    "rs.tsv",
    "drs.tsv",
)
# Pre-training: SGD as in Cohen et al.; fine-tuning: Adam at 1e-3 as in paper 002.
DEMO_PRETRAIN = {"lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-4}
DEMO_FINETUNE = {"lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0}


def _demo_dir(args: argparse.Namespace) -> Path:
    """The output directory; a rerun with the same settings resumes, other settings refuse."""
    out = Path(args.out_dir)
    ignored = ("func", "command", "out_dir", "overwrite", "device", "no_progress")
    settings = {k: v for k, v in vars(args).items() if k not in ignored}
    config_file = out / "demo_config.json"
    if args.overwrite:
        for name in DEMO_FILES:
            (out / name).unlink(missing_ok=True)
    elif config_file.exists() and json.loads(config_file.read_text()) != settings:
        raise ValueError(
            f"{out} holds a demo run with other settings ({config_file}); use another "
            "--out-dir or --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(settings, indent=1))
    return out


def _demo_train(
    args: argparse.Namespace, out: Path, device: str, train: ImageDataset, test: ImageDataset
) -> float:
    """Pre-train one model, fine-tune it into RS (σ) and the DRS pair (σ/√2); returns σ/√2."""
    base = BranchSpec(
        arch="digits_cnn",
        num_classes=train.num_classes,
        input_shape=tuple(train.input_shape),
        sigma=args.sigma,
        arch_kwargs={"width": args.width},
    )
    recipe = make_recipe(args.recipe)

    def config(epochs: int, settings: dict) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            batch_size=64,
            seed=args.seed,
            device=device,
            progress=not args.no_progress,
            **settings,
        )

    print(f"[1/4] pre-training a {base.arch} on {len(train)} digits with noise σ = {args.sigma:g}")
    torch.manual_seed(args.seed)
    model = base.build_model()
    pretrain = config(args.epochs, DEMO_PRETRAIN)
    Trainer(model, base, recipe, train, pretrain, out / "base/model.pt", eval_data=test).fit(
        resume=True
    )
    sigma_drs = args.sigma / math.sqrt(2.0)
    print(
        f"[2/4] fine-tuning RS at σ = {args.sigma:g} and both DRS branches at σ/√2 = "
        f"{sigma_drs:.3f} (same total noise energy, paper 002)"
    )
    finetune = config(args.finetune_epochs, DEMO_FINETUNE)
    rs_model = copy.deepcopy(model)  # `model` keeps the pre-trained weights for the branches
    Trainer(rs_model, base, recipe, train, finetune, out / "rs/model.pt", eval_data=test).fit(
        resume=True
    )
    finetune_branches(
        model,
        base,
        recipe,
        train,
        finetune,
        out / "drs",
        sigma=sigma_drs,
        fill=args.fill,
        resume=True,
        eval_data=test,
    )
    return sigma_drs


def cmd_demo(args: argparse.Namespace) -> int:
    """RS at σ against DRS at σ/√2 per branch on scikit-learn's digits, end to end."""
    started = time.perf_counter()
    out = _demo_dir(args)
    device = args.device or default_device()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    sigma_drs = _demo_train(args, out, device, train, test)
    indices = select_indices(len(test), max_index=args.num_test)
    print(
        f"[3/4] certifying {len(indices)} test digits with each (n0 = {args.n0}, n = {args.n}, "
        f"α = {args.alpha:g})"
    )
    runs = {
        "RS": (["rs/model.pt"], "rs.tsv"),
        "DRS": (["drs/branch0.pt", "drs/branch1.pt"], "drs.tsv"),
    }
    for name, (checkpoints, tsv) in runs.items():
        smoothed, _ = build_smoothed([str(out / c) for c in checkpoints], None, device)
        with TsvWriter(out / tsv, resume=True) as writer:
            certify_images(
                smoothed,
                test,
                indices,
                writer,
                n0=args.n0,
                n=args.n,
                alpha=args.alpha,
                batch=args.batch,
                seed=args.seed,
                device=device,
                progress=not args.no_progress,
                desc=f"certify {name}",
            )
    print("[4/4] results")
    names = [f"RS σ={args.sigma:g}", f"DRS σ={sigma_drs:.3f}/branch"]
    plot = out / "certified_accuracy.png"
    table = analyze([out / "rs.tsv", out / "drs.tsv"], args.radii, plot, names=names)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"plot: {plot}; table: {out / 'summary.md'}; total {time.perf_counter() - started:.0f} s")
    return 0


# -- argument parsing ------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if usable, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drs",
        description="Certified robustness by randomized smoothing (RS) and Dual Randomized "
        "Smoothing (DRS): train base classifiers, certify, merge shards, analyze, benchmark.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certify", help="certify a data set with RS (1 checkpoint) or DRS (2)")
    p.add_argument(
        "--data", required=True, help="digits | npz:FILE | folder:DIR | torchvision:NAME:ROOT"
    )
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--checkpoint", nargs="+", required=True, help="RS model, or DRS branch 0 and 1")
    p.add_argument("--sigma", type=float, help="must equal the checkpoints' σ (default: theirs)")
    p.add_argument("--n0", type=int, default=100, help="selection draws (default 100)")
    p.add_argument("--n", type=int, default=100_000, help="estimation draws (default 100000)")
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
    _add_common(p)
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("merge", help="join shard TSVs into one file in idx order")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("analyze", help="certified accuracy table, ACR, abstain rate, plot")
    p.add_argument("tsv", nargs="+")
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII))
    p.add_argument("--plot", help="write a PNG of certified accuracy against radius")
    p.add_argument("--names", nargs="+", help="column names (default: file names)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("train", help="train an RS model or DRS branch models")
    p.add_argument("--data", required=True, help="data set spec (its train split is used)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--arch", help="digits_cnn | cifar_resnet (default: --pretrained's)")
    p.add_argument("--arch-arg", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. depth=110")
    p.add_argument("--recipe", default="gaussian", choices=sorted(RECIPES))
    p.add_argument("--recipe-arg", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. lam=10")
    p.add_argument("--sigma", type=float, required=True, help="noise σ of this model / branch")
    p.add_argument("--partition", default="none", choices=("none", "diag"))
    branch = p.add_mutually_exclusive_group()
    branch.add_argument("--branch", type=int, default=0, choices=(0, 1))
    branch.add_argument("--both-branches", action="store_true", help="train branch 0 then 1")
    p.add_argument("--fill", default="neighbors", choices=FILLS)
    p.add_argument("--pretrained", help="checkpoint to fine-tune (paper 002: one model, 2 copies)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--milestones", type=int, nargs="*", help="lr ×0.1 epochs (default 50%%, 75%%)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--normalize", action="store_true", help="normalise inputs inside the model")
    p.add_argument("--eval", action="store_true", help="log noisy accuracy on the test split")
    p.add_argument("--out", required=True, help="output directory for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "bench",
        help="time drs_ext.noisy_views against the plain-PyTorch pipeline on this machine",
        description="Times drs_ext.noisy_views against the plain-PyTorch pipeline (x.repeat + "
        "torch.randn_like + indexing + 4-neighbour fill) for one image, alternately in one run, "
        "after checking the op against drs_ext.reference; on CUDA also the write bandwidth and "
        "its fraction of the device-to-device copy bandwidth. Prints a markdown table.",
    )
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if usable, else cpu)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[3, 32, 32],
        metavar=("C", "H", "W"),
        help="image shape (default 3 32 32)",
    )
    p.add_argument("--num", type=int, default=1000, help="noise draws per branch (default 1000)")
    p.add_argument("--partition", default="both", choices=("none", "diag", "both"))
    p.add_argument(
        "--out-dtype",
        default="float32",
        help=f"dtype of the views: {', '.join(OUT_DTYPES)} (default float32; 16-bit output "
        "halves the bytes written, which matters on a GPU)",
    )
    p.add_argument("--repeats", type=int, help="timed runs, median reported (default 11; GPU 15)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 2; GPU 3)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="RS vs DRS on scikit-learn's digits, end to end")
    p.add_argument("--sigma", type=float, default=0.5, help="RS σ; DRS uses σ/√2 per branch")
    p.add_argument("--recipe", default="gaussian", choices=sorted(RECIPES))
    p.add_argument("--fill", default="neighbors", choices=FILLS)
    p.add_argument("--width", type=int, default=16, help="CNN width")
    p.add_argument("--epochs", type=int, default=20, help="pre-training epochs")
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--num-test", type=int, default=200, help="test images to certify")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII))
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--overwrite", action="store_true", help="start over in --out-dir")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"drs {args.command}: error: {err}", file=sys.stderr)
        return 2
