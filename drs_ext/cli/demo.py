"""``drs demo``: RS, DRS, σ-routing and the σ-selector on scikit-learn's bundled handwritten
digits, end to end.

Pre-train a small CNN; fine-tune it into RS models at each level σ ∈ Σ and into the two DRS
branch models at σ/√2; train a σ-estimator by Sun et al.'s recipe and route each digit to one
of the RS models; fine-tune a universal-σ model and train a σ-selector for it (Hase et al.,
demo_selector.py); certify test digits with every model; attack RS and the σ-selector; print
the tables and save the plots."""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..io.checkpoint import BranchSpec, load_branch
from ..io.data import ImageDataset, load_dataset
from ..io.results import TsvWriter
from ..ops import FILLS
from ..smoothing import SmoothedClassifier
from ..smoothing.sigma_routing import SigmaRoutedClassifier, check_levels
from ..train import RECIPES, TrainConfig, Trainer, finetune_branches, make_recipe
from ..train.sigma_estimator import train_estimator
from .analyze import analyze
from .certify import build_smoothed, certify_images
from .common import add_common, default_device, select_indices, show_progress
from .demo_selector import (
    DEMO_SELECTOR,
    add_demo_selector_args,
    attack_table,
    certify_selector,
    check_demo_selector_args,
    selector_files,
    selector_note,
    train_selector_models,
)
from .routed import ROUTED_FIELDS, routed_columns, routing_diagnostics

DEMO_RADII = tuple(0.25 * i for i in range(9))  # 0 to 2
DEMO_FILES = (
    "base/model.pt",
    "rs/model.pt",
    "drs/branch0.pt",
    "drs/branch1.pt",
    "drs.tsv",
    "router/labels.pt",
    "router/estimator.pt",
    "routed.tsv",
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
        per_level = [f"rs_{lv:g}/model.pt" for lv in args.levels]
        per_level += [f"rs_{lv:g}.tsv" for lv in args.levels]
        for name in (*DEMO_FILES, *per_level, *selector_files(args)):
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
        return _config(args, device, epochs, settings)

    print(f"[1/8] pre-training a {base.arch} on {len(train)} digits with noise σ = {args.sigma:g}")
    torch.manual_seed(args.seed)
    model = base.build_model()
    pretrain = config(args.epochs, DEMO_PRETRAIN)
    Trainer(model, base, recipe, train, pretrain, out / "base/model.pt", eval_data=test).fit(
        resume=True
    )
    sigma_drs = args.sigma / math.sqrt(2.0)
    print(
        f"[2/8] fine-tuning RS at σ = {args.sigma:g} and both DRS branches at σ/√2 = "
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


def _expert_path(args: argparse.Namespace, level: float) -> str:
    return "rs/model.pt" if math.isclose(level, args.sigma) else f"rs_{level:g}/model.pt"


def _demo_routing(
    args: argparse.Namespace, out: Path, device: str, train: ImageDataset, test: ImageDataset
) -> SigmaRoutedClassifier:
    """An RS expert per level (fine-tuned from the pre-trained model), then the σ-estimator
    trained by Sun et al.'s recipe on their radius labels; returns the σ-routed classifier."""
    levels = check_levels(args.levels)
    base_model, base = load_branch(out / "base/model.pt")
    recipe = make_recipe(args.recipe)
    finetune = _config(args, device, args.finetune_epochs, DEMO_FINETUNE)
    print(f"[3/8] fine-tuning an RS expert at each level Σ = {{{', '.join(map(str, levels))}}}")
    for level in levels:
        path = out / _expert_path(args, level)
        spec = replace(base, sigma=level)
        model = copy.deepcopy(base_model)
        Trainer(model, spec, recipe, train, finetune, path, eval_data=test).fit(resume=True)
    experts = [
        SmoothedClassifier(load_branch(out / _expert_path(args, lv))[0], base.num_classes, lv)
        for lv in levels
    ]
    print(
        f"[4/8] σ-estimator at σ_e = {args.estimator_sigma:g}: radius labels of "
        f"{len(train)} training digits (n = {args.label_n}), then soft labels and training"
    )
    spec = replace(base, num_classes=len(levels), sigma=args.estimator_sigma)
    estimator_config = _config(args, device, args.estimator_epochs, DEMO_FINETUNE)
    estimator = train_estimator(
        experts,
        levels,
        train,
        spec,
        estimator_config,
        out / "router",
        label_n=args.label_n,
        resume=True,
    )
    return SigmaRoutedClassifier(estimator, levels, args.estimator_sigma, experts)


def _config(args: argparse.Namespace, device: str, epochs: int, settings: dict) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=64,
        seed=args.seed,
        device=device,
        progress=show_progress(args),
        **settings,
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    check_demo_selector_args(args)
    out = _demo_dir(args)
    device = args.device or default_device()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    sigma_drs = _demo_train(args, out, device, train, test)
    router = _demo_routing(args, out, device, train, test)
    print("[5/8] σ-selector (Hase et al.): ", end="")
    selector = train_selector_models(
        args,
        out,
        train,
        test,
        _config(args, device, args.finetune_epochs, DEMO_FINETUNE),
        _config(args, device, args.selector_epochs, DEMO_SELECTOR),
        router.levels,
    )
    indices = select_indices(len(test), max_index=args.num_test)
    print(
        f"[6/8] certifying {len(indices)} test digits with each (n0 = {args.n0}, n = {args.n}, "
        f"α = {args.alpha:g}; σ-routing: α/2 per stage; σ-selector at λ ∈ {args.lams})"
    )
    runs = {f"RS σ={lv:g}": ([_expert_path(args, lv)], f"rs_{lv:g}.tsv") for lv in router.levels}
    runs[f"DRS σ={sigma_drs:.3f}/branch"] = (["drs/branch0.pt", "drs/branch1.pt"], "drs.tsv")
    caps = {}
    common = dict(
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch=args.batch,
        seed=args.seed,
        device=device,
        progress=show_progress(args),
    )
    for name, (checkpoints, tsv) in runs.items():
        smoothed, _ = build_smoothed([str(out / c) for c in checkpoints], None, device)
        caps[name] = smoothed.max_radius(args.n, args.alpha)
        with TsvWriter(out / tsv, resume=True) as writer:
            certify_images(smoothed, test, indices, writer, desc=f"certify {name}", **common)
    routed_name = "σ-routed"
    caps[routed_name] = router.max_radius(args.n, args.alpha)
    with TsvWriter(out / "routed.tsv", resume=True, extra_fields=ROUTED_FIELDS) as writer:
        certify_images(
            router, test, indices, writer, desc="certify σ-routed", columns=routed_columns, **common
        )
    runs[routed_name] = ([], "routed.tsv")
    selector_runs, selector_caps, selector_notes = certify_selector(
        args, out, selector, test, indices, common
    )
    runs.update(selector_runs)
    caps.update(selector_caps)
    rs, _ = build_smoothed([str(out / _expert_path(args, args.sigma))], args.sigma, device)
    print(
        f"[7/8] attacking RS σ = {args.sigma:g} and the σ-selector at λ = {args.attack_lam:g} "
        f"(ℓ2 PGD, ε ∈ {args.epsilons}, {args.attack_steps} steps; PREDICT with n = "
        f"{args.attack_n})"
    )
    attacks = attack_table(args, out, rs, selector, test, device, show_progress(args))
    print("[8/8] results")
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
        f"({cap_text}), so every curve falls to 0 there; a larger --n raises the cap.\n"
        + routing_diagnostics(out / "routed.tsv", router.levels)
        + "\n"
        + "\n".join([selector_note(args), *selector_notes])
    )
    attacks = "Accuracy under attack (an abstention counts as wrong):\n\n" + attacks
    (out / "summary.md").write_text(table + "\n\n" + note + "\n\n" + attacks + "\n")
    print(table)
    print(note)
    print(attacks)
    plots = f"plots: {plot}, {out / 'attack.png'}"
    print(f"{plots}; tables: {out / 'summary.md'}; total {time.perf_counter() - started:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="RS, DRS, σ-routing and the σ-selector on scikit-learn's digits, end to end"
    )
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
    p.add_argument("--radii", type=float, nargs="+", default=list(DEMO_RADII))
    routing = p.add_argument_group("σ-routing (Sun, Mao, Vechev)")
    routing.add_argument(
        "--levels", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="the levels Σ"
    )
    routing.add_argument("--estimator-sigma", type=float, default=1.0, help="σ_e (default 1.0)")
    routing.add_argument("--estimator-epochs", type=int, default=20)
    routing.add_argument("--label-n", type=int, default=100, help="draws per label radius")
    add_demo_selector_args(p)
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--overwrite", action="store_true", help="start over in --out-dir")
    add_common(p)
    p.set_defaults(func=run)
