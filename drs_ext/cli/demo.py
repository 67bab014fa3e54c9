"""``drs demo``: RS at σ against DRS at σ/√2 per branch on scikit-learn's bundled handwritten
digits, end to end: pre-train a small CNN, fine-tune it into the RS model and the two DRS branch
models, certify test digits with both, print the table and save the plot."""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from ..io.checkpoint import BranchSpec
from ..io.data import ImageDataset, load_dataset
from ..io.results import TsvWriter
from ..ops import FILLS
from ..train import RECIPES, TrainConfig, Trainer, finetune_branches, make_recipe
from .analyze import analyze
from .certify import build_smoothed, certify_images
from .common import DEFAULT_RADII, add_common, default_device, select_indices, show_progress

DEMO_FILES = (
    "base/model.pt",
    "rs/model.pt",
    "drs/branch0.pt",
    "drs/branch1.pt",
    "rs.tsv",
    "drs.tsv",
)
# Pre-training: SGD as in Cohen et al.; fine-tuning: Adam at 1e-3 as in Xia et al.
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
            progress=show_progress(args),
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
        f"{sigma_drs:.3f} (the same total noise energy, as Xia et al. pair them)"
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


def run(args: argparse.Namespace) -> int:
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
        f"RS σ={args.sigma:g}": (["rs/model.pt"], "rs.tsv"),
        f"DRS σ={sigma_drs:.3f}/branch": (["drs/branch0.pt", "drs/branch1.pt"], "drs.tsv"),
    }
    caps = {}
    for name, (checkpoints, tsv) in runs.items():
        smoothed, _ = build_smoothed([str(out / c) for c in checkpoints], None, device)
        caps[name] = smoothed.max_radius(args.n, args.alpha)
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
                progress=show_progress(args),
                desc=f"certify {name}",
            )
    print("[4/4] results")
    plot = out / "certified_accuracy.png"
    title = (
        f"{len(indices)} test digits, n0 = {args.n0}, n = {args.n}, α = {args.alpha:g}\n"
        "dotted: the largest radius n draws can certify"
    )
    tsvs = [out / tsv for _, tsv in runs.values()]
    table = analyze(tsvs, args.radii, plot, names=list(runs), title=title, radius_caps=caps)
    cap_text = ", ".join(f"{name}: {cap:.2f}" for name, cap in caps.items())
    note = (
        f"With n = {args.n} estimation draws no radius above the cap can be certified "
        f"({cap_text}), so every curve falls to 0 there; a larger --n raises the cap."
    )
    (out / "summary.md").write_text(table + "\n\n" + note + "\n")
    print(table)
    print(note)
    print(f"plot: {plot}; table: {out / 'summary.md'}; total {time.perf_counter() - started:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="RS vs DRS on scikit-learn's digits, end to end")
    p.add_argument("--sigma", type=float, default=0.5, help="RS σ; DRS uses σ/√2 per branch")
    p.add_argument("--recipe", default="gaussian", choices=sorted(RECIPES))
    p.add_argument("--fill", default="neighbors", choices=FILLS)
    p.add_argument("--width", type=int, default=16, help="CNN width")
    p.add_argument("--epochs", type=int, default=20, help="pre-training epochs")
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--num-test", type=int, default=200, help="test images to certify")
    p.add_argument("--n0", "--N0", type=int, default=100)
    p.add_argument("--n", "--N", type=int, default=2000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII))
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--overwrite", action="store_true", help="start over in --out-dir")
    add_common(p)
    p.set_defaults(func=run)
