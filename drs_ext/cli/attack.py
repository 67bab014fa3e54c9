"""``drs attack``: clean and robust accuracy of a smoothed model over an ε grid, under ℓ2 PGD on
its soft classifier (drs_ext/attack), for RS, DRS, σ-routing and the σ-selector.

    drs attack --data digits --checkpoint runs/rs/model.pt --epsilons 0.25 0.5 1 --out rs_atk.tsv
    drs attack --data digits --selector runs/sel/selector.pt --checkpoint runs/base/model.pt \
               --lam 0.5 --levels 0.25 0.5 1.0 --threat pipeline --out sel_atk.tsv \
               --certificates sel.tsv

Writes one row per image and ε (drs_ext/attack/results.py) with a settings sidecar, resumable
with ``--resume``; prints the accuracy table and saves a plot. ``--certificates`` checks the
attacks against a certification file of the same model: an attack that changes PREDICT's class
within the certified radius of its image contradicts the certificate (possible only with
probability α per certificate and per PREDICT); the command then exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attack import (
    THREATS,
    RoutedTarget,
    SelectorTarget,
    SmoothedTarget,
    Target,
    check_epsilon,
    evaluate_attack,
)
from ..attack.results import (
    AttackWriter,
    accuracy_table,
    certificates_of,
    contradiction_report,
    plot_attack,
)
from ..io.data import ImageDataset, load_dataset
from ..io.settings import now, run_settings
from ..smoothing.sampling import MAX_DRAWS
from .certify import build_smoothed
from .common import add_common, check_done, default_device, select_indices, show_progress
from .routed import build_router
from .selected import add_selector_args, build_selected, selector_method_args, validate_selector


def attack_images(
    target: Target,
    dataset: ImageDataset,
    indices: Sequence[int],
    writer: AttackWriter,
    *,
    epsilons: Sequence[float],
    steps: int,
    step_size: float | None,
    images_per_batch: int,
    device: str,
    progress: bool = True,
    desc: str = "attack",
) -> None:
    """Attack ``dataset[i]`` at every ε for each i of ``indices`` not yet in ``writer``, a
    batch of images at a time; image i's verdicts use noise stream i, as its certificate."""
    todo = check_done(writer, dataset, indices)
    bar = tqdm(total=len(todo), desc=desc, disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, len(todo), images_per_batch):
            ids = todo[start : start + images_per_batch]
            items = [dataset[i] for i in ids]
            x = torch.stack([item[0] for item in items]).to(device)
            y = torch.tensor([int(item[1]) for item in items], device=device)
            rows = evaluate_attack(
                target,
                x,
                y,
                epsilons,
                steps=steps,
                indices=ids,
                batch_size=images_per_batch,
                step_size=step_size,
            )
            writer.write(rows)
            bar.update(len(ids))


def build_target(args: argparse.Namespace, device: str) -> tuple[Target, object, list[str], str]:
    """(target, the smoothed model, its checkpoint files, a name for tables)."""
    common = dict(n=args.n, alpha=args.alpha, batch_size=args.batch, seed=args.seed)
    common["num_noise"] = args.num_noise
    threat = args.threat or "pipeline"
    if args.estimator:
        model, _ = build_router(args.estimator, args.checkpoint, device)
        target = RoutedTarget(model, threat=threat, **common)
        return target, model, [args.estimator, *args.checkpoint], f"σ-routing ({threat})"
    if args.selector:
        model, _ = build_selected(args, device)
        target = SelectorTarget(model, lam=args.lam, threat=threat, n_h=args.n_selector, **common)
        name = f"σ-selector λ={args.lam:g} ({threat})"
        return target, model, [args.selector, *args.checkpoint], name
    model, spec = build_smoothed(args.checkpoint, args.sigma, device)
    name = f"RS σ={model.sigmas[0]:g}"
    if len(args.checkpoint) == 2:
        name = f"DRS σ={model.sigmas[0]:.3f}/branch"
    return SmoothedTarget(model, **common), model, list(args.checkpoint), name


def validate(args: argparse.Namespace) -> None:
    """Every argument checked before anything is loaded or any file touched."""
    for eps in args.epsilons:
        try:
            check_epsilon(eps)
        except ValueError:
            raise ValueError(f"--epsilons must be finite numbers >= 0, got {eps}") from None
    for flag, value, upper in (
        ("--steps", args.steps, None),
        ("--n", args.n, MAX_DRAWS),
        ("--num-noise", args.num_noise, None),
        ("--batch", args.batch, None),
        ("--images-per-batch", args.images_per_batch, None),
        ("--skip", args.skip, None),
    ):
        if value < 1 or (upper is not None and value > upper):
            bound = f" and at most {upper}" if upper else ""
            raise ValueError(f"{flag} must be an integer >= 1{bound}, got {value}")
    if args.step_size is not None and not (math.isfinite(args.step_size) and args.step_size > 0):
        raise ValueError(f"--step-size must be finite and > 0, got {args.step_size}")
    if args.max == 0 or args.max < -1:
        raise ValueError(f"--max must be -1 (no limit) or an index >= 1, got {args.max}")
    if not 0.0 < args.alpha < 1.0:
        raise ValueError(f"--alpha must lie in the open interval (0, 1), got {args.alpha}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.threat and not (args.estimator or args.selector):
        raise ValueError("--threat applies to σ-routing (--estimator) and the σ-selector")
    if args.estimator and args.sigma is not None:
        raise ValueError("--sigma does not apply with --estimator: the levels come from it")
    validate_selector(args)


def run(args: argparse.Namespace) -> int:
    validate(args)
    device = args.device or default_device()
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        raise FileExistsError(
            f"{out} exists; pass --resume to continue it or --overwrite to replace it"
        )
    if args.certificates and not Path(args.certificates).is_file():
        raise FileNotFoundError(f"--certificates: results file not found: {args.certificates}")
    target, model, checkpoints, name = build_target(args, device)
    dataset = load_dataset(args.data, args.split, download=args.download)
    indices = select_indices(len(dataset), args.skip, args.max)
    grid = sorted({0.0, *(float(e) for e in args.epsilons)})
    method_args = selector_method_args(args) if args.selector else {}
    method_args["attack"] = {
        "epsilons": grid,
        "steps": args.steps,
        "step_size": args.step_size,
        "num_noise": args.num_noise,
        "threat": getattr(target, "threat", None),
    }
    settings = run_settings(
        model,
        checkpoints=checkpoints,
        data=args.data,
        split=args.split,
        n0=None,
        n=args.n,
        alpha=args.alpha,
        seed=args.seed,
        skip=args.skip,
        max_index=args.max,
        shard=0,
        shards=1,
        method_args=method_args,
    )
    run_info = {"selected": len(indices), "device": device, "started": now()}
    resume, overwrite = args.resume, args.overwrite
    writer = AttackWriter(
        out, grid, resume=resume, overwrite=overwrite, settings=settings, run_info=run_info
    )
    with writer:
        attack_images(
            target,
            dataset,
            indices,
            writer,
            epsilons=grid,
            steps=args.steps,
            step_size=args.step_size,
            images_per_batch=args.images_per_batch,
            device=device,
            progress=show_progress(args),
            desc=f"attack {out.name}",
        )
    rows = writer.rows
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = f"{len(indices)} images, {args.steps} PGD steps, m = {args.num_noise}, n = {args.n}"
    plot_attack({name: rows}, plot, title=title)
    print(accuracy_table({name: rows}))
    print(f"{out}: {len(rows)} rows; plot: {plot}")
    if args.certificates:
        report, found = contradiction_report(rows, certificates_of(args.certificates, settings))
        print(report)
        if found:
            print(f"drs attack: {found} attacks beat a certificate", file=sys.stderr)
            return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack", help="accuracy under ℓ2 PGD over an ε grid (RS, DRS, σ-routing, σ-selector)"
    )
    p.add_argument("--data", required=True, help="digits | npz:FILE | folder:DIR | …")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--checkpoint", nargs="+", required=True, help="as for drs certify")
    p.add_argument("--sigma", type=float, help="as for drs certify")
    p.add_argument("--estimator", help="σ-routing: a σ-estimator checkpoint (as drs certify)")
    add_selector_args(p)
    p.add_argument(
        "--threat",
        choices=THREATS,
        help="σ-routing / σ-selector: hold σ at the clean input's level (classifier) or "
        "differentiate through its choice (pipeline, the default)",
    )
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="ℓ2 budgets")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (10)")
    p.add_argument("--step-size", type=float, help="PGD step (default 2ε/steps)")
    p.add_argument("--num-noise", type=int, default=8, help="noise draws per soft step (8)")
    p.add_argument("--n", "--N", type=int, default=1000, help="PREDICT's draws (1000)")
    p.add_argument("--alpha", type=float, default=0.001, help="PREDICT's α (0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noisy views per forward pass")
    p.add_argument("--images-per-batch", type=int, default=16, help="images attacked at once")
    p.add_argument("--skip", type=int, default=1, help="attack every skip-th image")
    p.add_argument("--max", "--max-index", type=int, default=-1, help="stop before this index")
    p.add_argument("--out", required=True, help="output TSV (one row per image and ε)")
    p.add_argument("--plot", help="accuracy-vs-ε plot (default: the TSV's name with .png)")
    p.add_argument(
        "--certificates",
        help="a drs certify TSV of the same model: check that no attack beats a certificate",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted file")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing file")
    add_common(p)
    p.set_defaults(func=run)
