"""``drs train``: train an RS model, or DRS branch models (one branch, or both fine-tuned from
one pre-trained model as Xia et al. do), with one of the recipes of drs_ext.train; or the
second stage of an input-dependent σ: a σ-estimator or level experts (routed.py), a σ-selector
(selected.py).

With ``--recipe universal`` (σ drawn per image uniformly over [sigma_min, sigma_max]) ``--sigma``
must lie in that range: it is the σ the checkpoint records, the one a plain ``drs certify`` of
it uses; ``drs certify --sigma`` may pick any other σ of the range."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from ..io.checkpoint import BranchSpec, load_branch
from ..io.data import ImageDataset, load_dataset
from ..ops import FILLS, PARTITIONS
from ..train import RECIPES, TrainConfig, Trainer, UniversalSigma, finetune_branches, make_recipe
from .common import add_common, default_device, key_values, show_progress
from .routed import finetune_level_experts, train_sigma_estimator
from .selected import train_selector


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


def validate(args: argparse.Namespace) -> None:
    """The arguments, checked before any data is loaded or any epoch runs."""
    for flag, value in (("--epochs", args.epochs), ("--batch", args.batch)):
        if value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.selector and (args.sigma_estimator or args.finetune_experts):
        raise ValueError("--selector, --sigma-estimator and --finetune-experts are three modes")
    if args.sigma is None and not args.selector:
        raise ValueError("--sigma is required (the noise σ of the model, branch or estimator)")
    if args.selector and args.sigma is not None:
        raise ValueError("--sigma does not apply with --selector: the selector picks σ")
    for flag, value in (("--sigma", args.sigma), ("--lr", args.lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be finite and > 0, got {value}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")


def run(args: argparse.Namespace) -> int:
    validate(args)
    if args.sigma_estimator:
        return train_sigma_estimator(args, _train_config(args))
    if args.selector:
        return train_selector(args, _train_config(args))
    recipe = make_recipe(args.recipe, **key_values(args.recipe_arg, "--recipe-arg"))
    if isinstance(recipe, UniversalSigma) and not recipe.covers(args.sigma):
        raise ValueError(
            f"--sigma {args.sigma:g} must lie in the universal recipe's range "
            f"[{recipe.sigma_min:g}, {recipe.sigma_max:g}]: it is the σ the checkpoint records"
        )
    config = _train_config(args)
    if args.finetune_experts:
        return finetune_level_experts(args, recipe, config)
    data = load_dataset(args.data, "train", download=args.download)
    eval_data = load_dataset(args.data, "test", download=args.download) if args.eval else None
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
    trainer = Trainer(model, spec, recipe, data, config, path, eval_data=eval_data)
    trainer.fit(resume=args.resume)
    print(f"{path}: {spec.describe()}, recipe {args.recipe}, {trainer.epoch} epochs")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an RS model or DRS branch models")
    p.add_argument("--data", required=True, help="data set spec (its train split is used)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--arch", help="digits_cnn | cifar_resnet (default: --pretrained's)")
    p.add_argument("--arch-arg", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. depth=110")
    p.add_argument("--recipe", default="gaussian", choices=sorted(RECIPES))
    p.add_argument("--recipe-arg", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. lam=10")
    p.add_argument(
        "--sigma", type=float, help="noise σ of this model / branch (required but for --selector)"
    )
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
    routing = p.add_argument_group(
        "σ-routing (Sun, Mao, Vechev): --sigma is then the estimator's σ_e",
    )
    mode = routing.add_mutually_exclusive_group()
    mode.add_argument(
        "--sigma-estimator",
        action="store_true",
        help="train a σ-estimator on radius labels of --classifiers (--recipe-arg m, lam, eta)",
    )
    mode.add_argument(
        "--finetune-experts",
        action="store_true",
        help="fine-tune --classifiers on the images --estimator routes to their level",
    )
    routing.add_argument("--levels", type=float, nargs="+", help="the levels Σ, increasing")
    routing.add_argument("--classifiers", nargs="+", help="one classifier per level, or one")
    routing.add_argument("--estimator", help="a σ-estimator checkpoint (--finetune-experts)")
    routing.add_argument("--label-n", type=int, default=100, help="draws per label (100)")
    routing.add_argument(
        "--no-balance", action="store_true", help="no class-balance weights on the labels"
    )
    p.add_argument_group(
        "σ-selector (Hase et al.): --arch-arg width, hidden, sigma_min, sigma_max; --recipe-arg "
        "target_mean, target_std, num_noise, lambda_groups"
    ).add_argument(
        "--selector",
        action="store_true",
        help="train a σ-selector against the frozen base classifier --classifiers (one RS model, "
        "e.g. --recipe universal); writes OUT/selector.pt",
    )
    add_common(p)
    p.set_defaults(func=run)
