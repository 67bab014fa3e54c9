"""The σ-selector and the attack table of ``drs demo`` (demo.py runs the rest).

A universal-σ model (σ drawn per image over the levels' range) is fine-tuned from the demo's
pre-trained CNN; a selector is trained against it (Hase et al.'s objective); test digits are
certified at each λ of ``--lams``; then PGD attacks RS at σ and the σ-selector at λ =
``--attack-lam`` (both threat models) over ``--epsilons``, and every attack is checked against
the certificates of the same model and image.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..attack import SelectorTarget, SmoothedTarget
from ..attack.results import AttackWriter, accuracy_table, contradiction_report, plot_attack
from ..io.checkpoint import load_branch
from ..io.data import ImageDataset
from ..io.results import TsvWriter, read_tsv
from ..median import order_statistic_bounds
from ..models import SigmaSelectorCNN
from ..smoothing import SigmaSelectorClassifier, SmoothedClassifier
from ..train import SelectorTrainer, TrainConfig, Trainer, UniversalSigma
from ..train.sigma_selector import load_selector
from .attack import attack_images
from .certify import certify_images
from .selected import SELECTOR_FIELDS, selector_columns, selector_diagnostics

SELECTOR_FILES = ("universal/model.pt", "selector/selector.pt", "attack.png")
# Adam at 1e-2 with no weight decay: the selector is small and trains in seconds per epoch.
DEMO_SELECTOR = {"lr": 1e-2, "optimizer": "adam", "weight_decay": 0.0}


def selector_files(args: argparse.Namespace) -> list[str]:
    """Every file of this part of the demo (for --overwrite)."""
    tsvs = [f"selector_{lam:g}.tsv" for lam in args.lams]
    tsvs += [f"attack_{name}.tsv" for name in ("rs", "selector_classifier", "selector_pipeline")]
    return [*SELECTOR_FILES, *tsvs]


def add_demo_selector_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("σ-selector (Hase et al.) and attacks")
    g.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="λ to certify")
    g.add_argument("--selector-epochs", type=int, default=30)
    g.add_argument("--selector-noise", type=float, default=0.25, help="s (0.25)")
    g.add_argument("--budget", type=float, default=0.25, help="D (0.25)")
    g.add_argument("--n-selector", type=int, default=100, help="N_h (100)")
    g.add_argument("--attack-lam", type=float, default=0.5, help="the σ-selector's λ attacked")
    g.add_argument("--epsilons", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    g.add_argument("--attack-steps", type=int, default=10, help="PGD steps (10)")
    g.add_argument("--attack-num", type=int, default=200, help="test digits attacked (200)")
    g.add_argument("--attack-n", type=int, default=1000, help="PREDICT's draws (1000)")


def train_selector_models(
    args: argparse.Namespace,
    out: Path,
    train: ImageDataset,
    test: ImageDataset,
    config: TrainConfig,
    selector_config: TrainConfig,
    levels: Sequence[float],
) -> SigmaSelectorClassifier:
    """The universal model (fine-tuned from base/model.pt over [min Σ, max Σ]) and the selector
    trained against it; returns the σ-selector classifier over the levels."""
    low, high = min(levels), max(levels)
    base_model, base = load_branch(out / "base/model.pt")
    print(f"fine-tuning a universal model (σ drawn per digit from U({low:g}, {high:g}))")
    model = copy.deepcopy(base_model)
    spec = replace(base, sigma=args.sigma if low <= args.sigma <= high else high)
    path = out / "universal/model.pt"
    Trainer(model, spec, UniversalSigma(low, high), train, config, path, eval_data=test).fit(
        resume=True
    )
    model, _ = load_branch(path)
    print(f"training the σ-selector against it ({args.selector_epochs} epochs, λ ~ U(0, 1))")
    kwargs = dict(in_channels=base.input_shape[0], width=8, sigma_min=low, sigma_max=high)
    selector = SigmaSelectorCNN(**kwargs)
    SelectorTrainer(
        selector, model, train, selector_config, out / "selector/selector.pt", arch_kwargs=kwargs
    ).fit(resume=True)
    selector, _ = load_selector(out / "selector/selector.pt")
    return SigmaSelectorClassifier(
        selector,
        model,
        base.num_classes,
        levels,
        selector_noise=args.selector_noise,
        budget=args.budget,
    )


def certify_selector(
    args: argparse.Namespace,
    out: Path,
    model: SigmaSelectorClassifier,
    test: ImageDataset,
    indices: Sequence[int],
    common: dict,
) -> tuple[dict[str, tuple[list, str]], dict[str, float], list[str]]:
    """Certify at each λ; returns the table's runs, their radius caps and the diagnostics."""
    runs, caps, notes = {}, {}, []
    for lam in args.lams:
        name, tsv = f"σ-selector λ={lam:g}", f"selector_{lam:g}.tsv"
        with TsvWriter(out / tsv, resume=True, extra_fields=SELECTOR_FIELDS) as writer:
            certify_images(
                model,
                test,
                indices,
                writer,
                columns=selector_columns,
                lam=lam,
                n_h=args.n_selector,
                desc=f"certify {name}",
                **common,
            )
        runs[name] = ([], tsv)
        caps[name] = model.max_radius(args.n, args.alpha)
        notes.append(selector_diagnostics(out / tsv, model.levels, model.budget))
    return runs, caps, notes


def attack_table(
    args: argparse.Namespace,
    out: Path,
    rs: SmoothedClassifier,
    model: SigmaSelectorClassifier,
    test: ImageDataset,
    device: str,
    progress: bool,
) -> str:
    """Clean and robust accuracy of RS at σ and of the σ-selector at λ = --attack-lam under
    both threat models, the plot, and the check against the certificates of the same images."""
    indices = list(range(min(args.attack_num, args.num_test, len(test))))
    common = dict(n=args.attack_n, alpha=args.alpha, batch_size=args.batch, seed=args.seed)
    lam = args.attack_lam
    targets = {
        f"RS σ={args.sigma:g}": ("rs", SmoothedTarget(rs, **common), f"rs_{args.sigma:g}.tsv"),
    }
    for threat, label in (("classifier", "σ fixed"), ("pipeline", "pipeline")):
        target = SelectorTarget(model, lam=lam, threat=threat, n_h=args.n_selector, **common)
        name = f"σ-selector λ={lam:g} ({label})"
        targets[name] = (f"selector_{threat}", target, f"selector_{lam:g}.tsv")
    grid = sorted({0.0, *args.epsilons})
    results, checks = {}, []
    for name, (key, target, cert_tsv) in targets.items():
        settings = {"model": name, "epsilons": grid, "steps": args.attack_steps, **common}
        with AttackWriter(out / f"attack_{key}.tsv", grid, resume=True, settings=settings) as w:
            attack_images(
                target,
                test,
                indices,
                w,
                epsilons=grid,
                steps=args.attack_steps,
                step_size=None,
                images_per_batch=25,
                device=device,
                progress=progress,
                desc=f"attack {name}",
            )
        results[name] = w.rows
        if (out / cert_tsv).exists():
            certs = {r.idx: (r.predict, r.radius) for r in read_tsv(out / cert_tsv)}
            report, _ = contradiction_report(w.rows, certs)
            checks.append(f"{name}: {report}")
    plot_attack(
        results,
        out / "attack.png",
        title=f"{len(indices)} test digits, {args.attack_steps} PGD steps, n = {args.attack_n}",
    )
    return accuracy_table(results) + "\n\n" + "\n".join(checks)


def selector_note(args: argparse.Namespace) -> str:
    budget = f"D = {args.budget:g}, s = {args.selector_noise:g}, N_h = {args.n_selector}"
    return (
        f"The σ-selector certifies at most the radius D ({budget}); α is split α/4 + α/4 over "
        "the selector's bounds and α/2 for the classifier."
    )


def check_demo_selector_args(args: argparse.Namespace) -> None:
    for lam in [*args.lams, args.attack_lam]:
        if not (math.isfinite(lam) and 0 <= lam <= 1):
            raise ValueError(f"--lams and --attack-lam must lie in [0, 1], got {lam}")
    for eps in args.epsilons:
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"--epsilons must be finite numbers >= 0, got {eps}")
    side = args.alpha / 4  # SigmaSelectorClassifier's default split: α/4 per bound
    order_statistic_bounds(args.n_selector, args.budget, args.selector_noise, side, side)
    for flag, value in (
        ("--attack-steps", args.attack_steps),
        ("--attack-num", args.attack_num),
        ("--attack-n", args.attack_n),
        ("--selector-epochs", args.selector_epochs),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value}")
