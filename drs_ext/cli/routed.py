"""σ-routing on the command line: build a SigmaRoutedClassifier from checkpoint files.

    drs certify --data digits --estimator runs/est/estimator.pt \
                --checkpoint runs/rs025/model.pt runs/rs05/model.pt runs/rs1/model.pt --out r.tsv

The estimator checkpoint names its levels Σ; the classifier checkpoints are either one per level
(RS models at σ, or DRS branch pairs at σ/√2 or σ per branch, matched to the levels by their σ)
or one model (an RS model or a DRS pair) used at every level.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io.checkpoint import BranchSpec, check_drs_pair, load_branch
from ..io.data import load_dataset
from ..io.results import read_tsv
from ..smoothing import DualSmoothedClassifier, SmoothedClassifier
from ..smoothing.sampling import BranchSmoothing
from ..smoothing.sigma_routing import RoutedCertificate, SigmaRoutedClassifier, check_levels
from ..train import TrainConfig
from ..train.recipes import Recipe
from ..train.sigma_estimator import EstimatorConsistency, finetune_experts, train_estimator
from .common import key_values

ROUTED_FIELDS = ("sigma", "radius_sigma", "radius_c")


def _group(
    loaded: list[tuple[torch.nn.Module, BranchSpec, str]],
) -> list[tuple[float, list[tuple[torch.nn.Module, BranchSpec, str]]]]:
    """The classifiers as (σ per branch, members): an RS model alone, DRS branches by pairs."""
    groups: dict[tuple[str, float], list] = {}
    for item in loaded:
        spec = item[1]
        if spec.levels is not None:
            raise ValueError(f"{item[2]} is a σ-estimator; pass it with --estimator")
        key = (spec.partition, round(spec.sigma, 9))
        groups.setdefault(key, []).append(item)
    out = []
    for (partition, sigma), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        if partition == "none" and len(members) > 1:
            names = ", ".join(m[2] for m in members)
            raise ValueError(f"two RS classifiers at σ = {sigma:g} ({names}); give one per level")
        if partition == "diag":
            if len(members) != 2:
                names = ", ".join(m[2] for m in members)
                raise ValueError(f"DRS branches at σ = {sigma:g} must come in pairs, got {names}")
            order = check_drs_pair(members[0][1], members[1][1], (members[0][2], members[1][2]))
            members = [members[i] for i in order]
        out.append((sigma, members))
    return out


def _smoothed(members, level: float, **options: object) -> BranchSmoothing:
    spec = members[0][1]
    if spec.partition == "none":
        return SmoothedClassifier(members[0][0], spec.num_classes, level, **options)
    per_branch = spec.sigma if math.isclose(spec.sigma, level, rel_tol=1e-6) else level / 2**0.5
    models = [m[0] for m in members]
    return DualSmoothedClassifier(*models, spec.num_classes, per_branch, spec.fill, **options)


def level_experts(
    levels: Sequence[float], checkpoints: Sequence[str], device: str, **options: object
) -> list[tuple[BranchSmoothing, list[tuple[torch.nn.Module, BranchSpec, str]]]]:
    """One smoothed classifier per level from classifier checkpoints (one per level, matched by
    σ, or one for all), each with its loaded (model, spec, path) members."""
    loaded = [(*load_branch(p, map_location=device), p) for p in checkpoints]
    groups = _group(loaded)
    if len(groups) == 1:  # one model (or DRS pair) for every level
        return [(_smoothed(groups[0][1], level, **options), groups[0][1]) for level in levels]
    if len(groups) != len(levels):
        raise ValueError(
            f"{len(groups)} classifiers for {len(levels)} levels: give one per level or one"
        )
    experts = []
    for level in levels:
        match = [
            members
            for sigma, members in groups
            if any(math.isclose(sigma * f, level, rel_tol=1e-6) for f in (1.0, 2**0.5))
            and (members[0][1].partition == "diag" or math.isclose(sigma, level, rel_tol=1e-6))
        ]
        if len(match) != 1:
            found = ", ".join(f"{s:g}" for s, _ in groups)
            raise ValueError(
                f"level σ = {level:g} needs exactly one classifier (RS at σ, or a DRS pair at σ "
                f"or σ/√2 per branch); the checkpoints have σ {found}"
            )
        experts.append((_smoothed(match[0], level, **options), match[0]))
    return experts


def build_router(
    estimator_path: str, checkpoints: Sequence[str], device: str, **options: object
) -> tuple[SigmaRoutedClassifier, BranchSpec]:
    """The σ-routed classifier of an estimator checkpoint and classifier checkpoints, checked
    to fit together (levels, classes, input shape); returns it with the estimator's spec."""
    estimator, est_spec = load_branch(estimator_path, map_location=device)
    if est_spec.levels is None:
        raise ValueError(f"--estimator {estimator_path} is a classifier, not a σ-estimator")
    experts = level_experts(list(est_spec.levels), checkpoints, device, **options)
    for _, members in experts:
        for _, spec, path in members:
            if tuple(spec.input_shape) != tuple(est_spec.input_shape):
                raise ValueError(
                    f"{path} takes images {tuple(spec.input_shape)}, the estimator "
                    f"{tuple(est_spec.input_shape)}"
                )
    smoothed = [clf for clf, _ in experts]
    router = SigmaRoutedClassifier(estimator, est_spec.levels, est_spec.sigma, smoothed, **options)
    return router, est_spec


def routed_columns(cert: RoutedCertificate) -> tuple[float, float, float]:
    """A σ-routed row's extra columns (ROUTED_FIELDS): the chosen σ (nan when the estimator
    abstains), R_σ and R_c; for certify_images(columns=...)."""
    return (cert.sigma, cert.radius_sigma, cert.radius_c)


def routing_diagnostics(path: str | Path, levels: Sequence[float]) -> str:
    """How the routed file's images were routed and which stage bounded their radius."""
    rows = read_tsv(path)
    sigmas = [row.extra[0] for row in rows]
    counts = ", ".join(f"σ = {lv:g}: {sum(math.isclose(s, lv) for s in sigmas)}" for lv in levels)
    abstained = sum(math.isnan(s) for s in sigmas)
    both = [r for r in rows if r.predict != -1]
    bound_by_sigma = sum(r.extra[1] < r.extra[2] for r in both)
    return (
        f"σ-routing: images routed {counts}, estimator abstained on {abstained}; of the "
        f"{len(both)} certified, R_σ < R_c (the estimator bounds the radius) for "
        f"{bound_by_sigma}."
    )


def train_sigma_estimator(args: argparse.Namespace, config: TrainConfig) -> int:
    """`drs train --sigma-estimator`: radius labels of the level classifiers, then the
    estimator (Sun et al.'s recipe, drs_ext.train.sigma_estimator)."""
    if not args.levels or not args.classifiers or not args.arch:
        raise ValueError("--sigma-estimator needs --levels, --classifiers and --arch")
    if args.label_n < 1:
        raise ValueError(f"--label-n must be an integer >= 1, got {args.label_n}")
    levels = check_levels(args.levels)
    params = key_values(args.recipe_arg, "--recipe-arg")
    unknown = sorted(set(params) - {"m", "lam", "eta"})
    if unknown:
        raise ValueError(f"the σ-estimator's --recipe-arg takes m, lam, eta; got {unknown}")
    recipe = EstimatorConsistency(**params)
    experts = level_experts(levels, args.classifiers, config.device)
    data = load_dataset(args.data, "train", download=args.download)
    spec = BranchSpec(
        arch=args.arch,
        num_classes=len(levels),
        input_shape=tuple(data.input_shape),
        sigma=args.sigma,
        arch_kwargs=key_values(args.arch_arg, "--arch-arg"),
    )
    out = Path(args.out)
    train_estimator(
        [clf for clf, _ in experts],
        levels,
        data,
        spec,
        config,
        out,
        recipe=recipe,
        label_n=args.label_n,
        balance=not args.no_balance,
        resume=args.resume,
    )
    print(f"{out / 'estimator.pt'}: σ-estimator over {levels} at σ_e {args.sigma:g}")
    return 0


def finetune_level_experts(args: argparse.Namespace, recipe: Recipe, config: TrainConfig) -> int:
    """`drs train --finetune-experts`: each level's classifier fine-tuned on the training images
    the frozen estimator routes to its level."""
    if not args.estimator or not args.classifiers:
        raise ValueError("--finetune-experts needs --estimator and --classifiers (one per level)")
    estimator, est_spec = load_branch(args.estimator, map_location=config.device)
    if est_spec.levels is None:
        raise ValueError(f"--estimator {args.estimator} is a classifier, not a σ-estimator")
    experts = level_experts(list(est_spec.levels), args.classifiers, config.device)
    if len({id(members[0][0]) for _, members in experts}) != len(experts):
        raise ValueError("--finetune-experts needs one classifier per level, not one for all")
    data = load_dataset(args.data, "train", download=args.download)
    members = [[(m, spec) for m, spec, _ in group] for _, group in experts]
    out = Path(args.out)
    routed = finetune_experts(
        estimator, est_spec.sigma, members, data, recipe, config, out, resume=args.resume
    )
    shares = ", ".join(
        f"σ = {lv:g}: {len(i)}" for lv, i in zip(est_spec.levels, routed, strict=True)
    )
    print(f"{out}: experts fine-tuned on the images routed to them ({shares})")
    return 0
