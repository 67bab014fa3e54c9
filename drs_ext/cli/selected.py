"""The σ-selector on the command line (Hase et al., "Variational Randomized Smoothing for
Sample-Wise Adversarial Robustness"; drs_ext/smoothing/sigma_selector.py).

    drs train --data digits --arch digits_cnn --recipe universal \
              --recipe-arg sigma_min=0.25 sigma_max=1.0 --sigma 0.5 --out runs/base
    drs train --data digits --selector --classifiers runs/base/model.pt --out runs/sel \
              --epochs 10 --optimizer adam --lr 3e-3 --weight-decay 0
    drs certify --data digits --selector runs/sel/selector.pt --checkpoint runs/base/model.pt \
                --lam 0.5 --levels 0.25 0.5 1.0 --out sel.tsv

The classifier checkpoints are one model used at every level (best trained with the universal
recipe, σ drawn per image over the levels' range) or one per level (RS at σ, or DRS pairs at σ
or σ/√2 per branch), matched as σ-routing matches them (routed.level_experts).
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..io.checkpoint import BranchSpec, load_branch
from ..io.data import load_dataset
from ..io.results import read_tsv
from ..io.settings import file_sha256
from ..median import order_statistic_bounds
from ..models import SELECTOR_ARCHS
from ..smoothing.sigma_routing import check_levels
from ..smoothing.sigma_selector import SigmaSelectorClassifier, check_lambda
from ..smoothing.sigma_selector_sequential import MAX_N_H
from ..train import SelectorObjective, SelectorTrainer, TrainConfig, UniversalSigma
from ..train.sigma_selector import load_selector
from .common import key_values
from .routed import level_experts

SELECTOR_FIELDS = ("sigma", "sigma_lower", "sigma_upper", "lam")
N_H = 100  # the fixed-n default of the command line: the demo's N_h


def add_selector_args(p: argparse.ArgumentParser) -> None:
    """The flags that turn `drs certify` / `drs attack` into the σ-selector's."""
    g = p.add_argument_group("σ-selector (Hase et al., Variational RS)")
    g.add_argument(
        "--selector",
        help="a σ-selector checkpoint (drs train --selector); --checkpoint then gives the base "
        "classifier for every level (e.g. --recipe universal) or one per level",
    )
    g.add_argument("--lam", type=float, help="λ in [0, 1], the selector's trade-off input")
    g.add_argument("--levels", type=float, nargs="+", help="the levels Σ σ is quantised onto")
    g.add_argument(
        "--selector-noise", type=float, default=0.25, help="s: the median smoothing's σ (0.25)"
    )
    g.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="D: σ is certified constant on this radius, the largest radius certified (0.25)",
    )
    g.add_argument(
        "--n-selector",
        type=int,
        help=f"N_h selector samples ({N_H}; with --sequential the most, {MAX_N_H})",
    )
    g.add_argument(
        "--selector-share", type=float, default=0.5, help="share of α for the selector (0.5)"
    )


def validate_selector(args: argparse.Namespace) -> None:
    """The selector's flags, before anything is loaded: λ, Σ, s, D, the α share, and N_h large
    enough for the bounds at this α (the error names the smallest N_h that works)."""
    given = [f for f in ("lam", "levels") if getattr(args, f) is not None]
    if not args.selector:
        if given:
            raise ValueError(f"--{given[0]} applies to the σ-selector: give --selector too")
        return
    if getattr(args, "estimator", None):
        raise ValueError("--selector and --estimator are two methods: give one")
    if getattr(args, "sigma", None) is not None:
        raise ValueError("--sigma does not apply with --selector: the levels come from --levels")
    if args.lam is None or args.levels is None:
        raise ValueError("--selector needs --lam (λ in [0, 1]) and --levels (the levels Σ)")
    try:
        check_lambda(args.lam)
    except ValueError:
        raise ValueError(f"--lam must be a number in [0, 1], got {args.lam}") from None
    check_levels(args.levels)
    for flag, value in (("--selector-noise", args.selector_noise), ("--budget", args.budget)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be finite and > 0, got {value}")
    if not 0.0 < args.selector_share < 1.0:
        raise ValueError(f"--selector-share must be in (0, 1), got {args.selector_share}")
    sequential = getattr(args, "sequential", False)
    if args.n_selector is None:
        args.n_selector = MAX_N_H if sequential else N_H
    if args.n_selector < 1:
        raise ValueError(f"--n-selector must be an integer >= 1, got {args.n_selector}")
    if sequential:  # the most draws of a sequential test: any number is sound
        return
    side = args.selector_share * args.alpha / 2
    try:
        order_statistic_bounds(args.n_selector, args.budget, args.selector_noise, side, side)
    except ValueError as err:
        raise ValueError(f"--n-selector: {err}") from None


def build_selected(
    args: argparse.Namespace, device: str, **options: object
) -> tuple[SigmaSelectorClassifier, BranchSpec]:
    """The σ-selector classifier of --selector and the --checkpoint classifiers, checked to fit
    together; returns it with the classifiers' spec."""
    selector, payload = load_selector(args.selector, map_location=device)
    levels = check_levels(args.levels)
    experts = level_experts(levels, args.checkpoint, device, **options)
    spec = experts[0][1][0][1]
    shape = tuple(payload.get("input_shape") or ())
    for _, members in experts:
        for _, member, path in members:
            if shape and tuple(member.input_shape) != shape:
                raise ValueError(
                    f"{path} takes images {tuple(member.input_shape)}, the selector {shape}"
                )
    trained_with = (payload.get("classifier") or {}).get("sha256")
    used = {file_sha256(p) for p in args.checkpoint}
    if trained_with and trained_with not in used:
        warnings.warn(
            f"{args.selector} was trained against another classifier than "
            f"{', '.join(args.checkpoint)}; its σ choices may not suit them",
            UserWarning,
            stacklevel=2,
        )
    by_level = {lv: clf for lv, (clf, _) in zip(levels, experts, strict=True)}
    model = SigmaSelectorClassifier(
        selector,
        by_level.__getitem__,
        spec.num_classes,
        levels,
        selector_noise=args.selector_noise,
        budget=args.budget,
        selector_share=args.selector_share,
    )
    return model, spec


def selector_method_args(args: argparse.Namespace) -> dict:
    """The selector's per-run settings for the sidecar: λ, N_h and the selector's digest."""
    return {
        "lam": float(args.lam),
        "n_selector": args.n_selector,
        "selector_sha256": file_sha256(args.selector),
    }


def selector_columns(cert) -> tuple[float, float, float, float]:
    """A σ-selector row's extra columns (SELECTOR_FIELDS): the certified level σ (nan when the
    selector's bounds straddle two levels), the bounds y₍k_l₎, y₍k_u₎ on the selector's median
    over the D-ball, and λ; for certify_images(columns=...)."""
    return (cert.sigma, cert.sigma_lower, cert.sigma_upper, cert.lam)


def selector_diagnostics(path: str | Path, levels: Sequence[float], budget: float) -> str:
    """Which levels the selector certified constant, and how often D capped the radius."""
    rows = read_tsv(path)
    sigmas = [row.extra[0] for row in rows]
    counts = ", ".join(f"σ = {lv:g}: {sum(math.isclose(s, lv) for s in sigmas)}" for lv in levels)
    straddled = sum(math.isnan(s) for s in sigmas)
    certified = [r for r in rows if r.predict != -1]
    capped = sum(r.radius >= budget * (1 - 1e-2) for r in certified)
    lam = rows[0].extra[3] if rows else math.nan
    return (
        f"σ-selector λ = {lam:g}: σ certified constant on the D = {budget:g} ball for "
        f"{len(rows) - straddled} of {len(rows)} images ({counts}); {len(certified)} certified, "
        f"{capped} of them at the cap D."
    )


def train_selector(args: argparse.Namespace, config: TrainConfig) -> int:
    """`drs train --selector`: the selector h(x, λ) against the frozen --classifiers model
    (drs_ext.train.sigma_selector); --arch-arg sets its architecture (width, hidden, sigma_min,
    sigma_max: by default the range of a universal classifier), --recipe-arg its objective
    (target_mean, target_std, num_noise, lambda_groups)."""
    if not args.classifiers or len(args.classifiers) != 1:
        raise ValueError("--selector needs --classifiers with one base classifier checkpoint")
    arch = args.arch or "sigma_selector_cnn"
    if arch not in SELECTOR_ARCHS:
        raise ValueError(f"--arch {arch!r} is no selector architecture: {sorted(SELECTOR_ARCHS)}")
    path = args.classifiers[0]
    classifier, spec = load_branch(path, map_location=config.device)
    if spec.partition != "none" or spec.levels is not None:
        raise ValueError(f"{path}: the selector's base classifier must be an RS model")
    kwargs = {"in_channels": spec.input_shape[0], **key_values(args.arch_arg, "--arch-arg")}
    if "sigma_min" not in kwargs or "sigma_max" not in kwargs:
        if spec.recipe.get("name") != UniversalSigma.name:
            raise ValueError(
                f"{path} was not trained with the universal recipe: give the selector's range "
                "with --arch-arg sigma_min=… sigma_max=…"
            )
        kwargs.setdefault("sigma_min", spec.recipe["sigma_min"])
        kwargs.setdefault("sigma_max", spec.recipe["sigma_max"])
    params = key_values(args.recipe_arg, "--recipe-arg")
    known = SelectorObjective.__dataclass_fields__
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"the selector's --recipe-arg takes {sorted(known)}; got {unknown}")
    try:
        objective = SelectorObjective(**params)
    except TypeError as err:
        raise ValueError(f"--recipe-arg: {err}") from None
    try:
        selector = SELECTOR_ARCHS[arch](**kwargs)
    except TypeError as err:
        raise ValueError(f"--arch-arg: {err}") from None
    data = load_dataset(args.data, "train", download=args.download)
    if tuple(data.input_shape) != tuple(spec.input_shape):
        raise ValueError(f"data images {data.input_shape} differ from {path}'s {spec.input_shape}")
    info = {"sha256": file_sha256(path), "sigma": spec.sigma, "recipe": spec.recipe}
    out = Path(args.out) / "selector.pt"
    trainer = SelectorTrainer(
        selector,
        classifier,
        data,
        config,
        out,
        arch=arch,
        arch_kwargs=kwargs,
        objective=objective,
        classifier_info=info,
    )
    trainer.fit(resume=args.resume)
    last = trainer.log[-1]
    print(
        f"{out}: σ-selector over [{kwargs['sigma_min']:g}, {kwargs['sigma_max']:g}], "
        f"{trainer.epoch} epochs, σ {last['sigma_mean']:.3f} ± {last['sigma_std']:.3f}"
    )
    return 0
