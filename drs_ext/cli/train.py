"""``drs train``: train an RS model, or DRS branch models (one branch, or both fine-tuned from
one pre-trained model as Xia et al. do), with one of the recipes of drs_ext.train."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from ..io.checkpoint import BranchSpec, load_branch
from ..io.data import ImageDataset, load_dataset
from ..ops import FILLS, PARTITIONS
from ..train import RECIPES, TrainConfig, Trainer, finetune_branches, make_recipe
from .common import add_common, default_device, key_values, show_progress


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
        progress=show_progress(args),
    )


def _channel_stats(dataset: ImageDataset, limit: int = 10_000) -> dict:
    images = torch.stack([dataset[i][0] for i in range(min(len(dataset), limit))])
    return {
        "mean": images.mean(dim=(0, 2, 3)).tolist(),
        "std": images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
    }


def run(args: argparse.Namespace) -> int:
    data = load_dataset(args.data, "train", download=args.download)
    eval_data = load_dataset(args.data, "test", download=args.download) if args.eval else None
    recipe = make_recipe(args.recipe, **key_values(args.recipe_arg, "--recipe-arg"))
    config = _train_config(args)
    out = Path(args.out)
    if args.pretrained:
        model, base = load_branch(args.pretrained)
        if args.arch and args.arch != base.arch:
            raise ValueError(f"--arch {args.arch} differs from the pretrained {base.arch}")
    else:
        if not args.arch:
            raise ValueError("--arch is required unless --pretrained gives the architecture")
        base = BranchSpec(
            arch=args.arch,
            num_classes=data.num_classes,
            input_shape=tuple(data.input_shape),
            sigma=args.sigma,
            arch_kwargs=key_values(args.arch_arg, "--arch-arg"),
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an RS model or DRS branch models")
    p.add_argument("--data", required=True, help="data set spec (its train split is used)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--arch", help="digits_cnn | cifar_resnet (default: --pretrained's)")
    p.add_argument("--arch-arg", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. depth=110")
    p.add_argument("--recipe", default="gaussian", choices=sorted(RECIPES))
    p.add_argument("--recipe-arg", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. lam=10")
    p.add_argument("--sigma", type=float, required=True, help="noise σ of this model / branch")
    p.add_argument("--partition", default="none", choices=sorted(PARTITIONS))
    branch = p.add_mutually_exclusive_group()
    branch.add_argument("--branch", type=int, default=0, choices=(0, 1))
    branch.add_argument("--both-branches", action="store_true", help="train branch 0 then 1")
    p.add_argument("--fill", default="neighbors", choices=FILLS)
    p.add_argument("--pretrained", help="checkpoint to fine-tune (Xia et al.: one model, 2 copies)")
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
    add_common(p)
    p.set_defaults(func=run)
