"""``drs certify --sequential``: each image draws only the samples its answer needs
(drs_ext/smoothing/sequential.py, at_radius.py), with the model's batches packed across images
(packed.py).

    drs certify --data digits --checkpoint rs.pt --sequential --tol 0.01 --out rs_seq.tsv
    drs certify --data digits --checkpoint rs.pt --sequential --radii 0 0.25 0.5 --out grid.tsv

Two questions:
- without --radii, a certified radius (RadiusEstimate): --n is the most estimation draws per
  branch, and an image stops once more draws could raise its radius by at most --tol;
- with --radii, "is g constant on the ball of each radius?" (RadiusTest, the grid claimed in
  order): the TSV's radius is the largest certified radius of the grid, 0 (abstain) if none.

Either way the certificate holds at level --alpha whenever the image stops (anytime-valid
statistics), and it depends only on (--seed, the image's index): not on --batch, the shard, a
resume, or which images shared a batch. The TSV keeps Cohen et al.'s six columns and adds
``samples``, the image's forward passes (selection draws included, all branches); the rows are
written in index order as images finish, so --resume and --shard work as for a fixed n.

With --estimator (σ-routing) each image's two stages run sequentially in the same packed
batches (sigma_routing_sequential.py); the TSV adds sigma, radius_sigma, radius_c and samples.
With --selector both stages of the σ-selector run sequentially in the same packed batches
(sigma_selector_sequential.py; --n-selector is then the most selector draws); the TSV adds
sigma, lam, selector_samples and samples.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..io.data import ImageDataset
from ..io.results import TsvWriter
from ..smoothing import BranchSmoothing, DualSmoothedClassifier, SmoothedClassifier
from ..smoothing.at_radius import RadiusTest
from ..smoothing.packed import certify_packed
from ..smoothing.sequential import RadiusEstimate
from ..smoothing.sigma_routing import SigmaRoutedClassifier
from ..smoothing.sigma_routing_sequential import (
    RoutedEstimate,
    RoutedRadiusTest,
    certify_routed_packed,
)
from ..smoothing.sigma_selector import SigmaSelectorClassifier
from ..smoothing.sigma_selector_sequential import SelectorTask, certify_selector_packed
from .common import check_done

SEQUENTIAL_FIELDS = ("samples",)
DEFAULT_TOL = 0.01
SELECTOR_SEQUENTIAL_FIELDS = ("sigma", "lam", "selector_samples", "samples")


def add_sequential_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "sequential certification (anytime-valid: fewer draws per image; --n is the most)"
    )
    g.add_argument(
        "--sequential",
        action="store_true",
        help="draw in growing looks and stop each image once its answer is clear",
    )
    g.add_argument(
        "--tol",
        type=float,
        help="radius estimate: stop once more draws could raise the radius by at most this "
        f"({DEFAULT_TOL})",
    )
    g.add_argument(
        "--radii",
        type=float,
        nargs="+",
        help="certify at these radii instead (increasing; the TSV radius is the largest certified)",
    )
    g.add_argument(
        "--beta",
        type=float,
        help="--radii: level of the futility test that stops hopeless images (default --alpha; "
        "σ-routing: for each stage)",
    )


def validate_sequential(args: argparse.Namespace) -> None:
    """The sequential flags, before anything is loaded; fills in --tol's default for the radius
    estimate and --beta's (--alpha) for the radius test, so that what runs is what the settings
    file records."""
    given = [f"--{f}" for f in ("tol", "radii", "beta") if getattr(args, f) is not None]
    if not args.sequential:
        if given:
            raise ValueError(f"{given[0]} applies with --sequential only")
        return
    if args.cuda_graph:
        raise ValueError(
            "--cuda-graph does not apply with --sequential: it captures a graph per batch "
            "shape, and packed batches change shape as images finish"
        )
    if args.no_prefetch:
        raise ValueError(
            "--no-prefetch does not apply with --sequential: its packed batches draw the noise "
            "of all their images in one call on the model's stream already"
        )
    if args.selector and args.radii is not None:
        raise ValueError("--radii does not apply with --selector: the σ-selector estimates R")
    if args.radii is not None:
        if args.tol is not None:
            raise ValueError("--tol applies to the radius estimate; with --radii leave it out")
        if not all(math.isfinite(r) and r >= 0 for r in args.radii):
            raise ValueError(f"--radii must be finite numbers >= 0, got {args.radii}")
        if any(b <= a for a, b in zip(args.radii[:-1], args.radii[1:], strict=True)):
            raise ValueError(f"--radii must be strictly increasing, got {args.radii}")
        if args.beta is not None and not 0.0 < args.beta < 1.0:
            raise ValueError(f"--beta must lie in the open interval (0, 1), got {args.beta}")
        args.beta = args.alpha if args.beta is None else args.beta
        return
    if args.beta is not None:
        raise ValueError("--beta is the level of the radius test's futility stop: give --radii")
    args.tol = DEFAULT_TOL if args.tol is None else args.tol
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise ValueError(f"--tol must be a finite number >= 0, got {args.tol}")


def sequential_method_args(args: argparse.Namespace) -> dict:
    """What the settings sidecar records (and --resume compares) about the procedure; --n is
    recorded as usual and means the most draws per branch."""
    if args.radii is not None:
        return {"sequential": "radius-test", "radii": list(args.radii), "beta": args.beta}
    return {"sequential": "radius-estimate", "tol": args.tol}


def packed_plan(args: argparse.Namespace, smoothed: object) -> tuple[Callable, Callable]:
    """(the packed certifier, a fresh task per image) for RS, DRS, σ-routing or the σ-selector."""
    if isinstance(smoothed, SigmaSelectorClassifier):  # validate_sequential refuses --radii
        task = functools.partial(
            SelectorTask,
            smoothed,
            args.n0,
            args.n,
            args.alpha,
            lam=args.lam,
            max_n_h=args.n_selector,
            tol=args.tol,
        )
        return certify_selector_packed, task
    if isinstance(smoothed, SigmaRoutedClassifier):
        packer, estimate, test = certify_routed_packed, RoutedEstimate, RoutedRadiusTest
    elif isinstance(smoothed, (SmoothedClassifier, DualSmoothedClassifier)):
        packer, estimate, test = certify_packed, RadiusEstimate, RadiusTest
    else:
        raise TypeError(f"no packed sequential procedure for {type(smoothed).__name__}")
    if args.radii is not None:
        task = functools.partial(
            test, smoothed, args.radii, args.n0, args.n, args.alpha, beta=args.beta
        )
    else:
        task = functools.partial(estimate, smoothed, args.n0, args.n, args.alpha, tol=args.tol)
    return packer, task


def selector_sequential_columns(cert) -> tuple[float, float, int]:
    """SELECTOR_SEQUENTIAL_FIELDS of a row but the last (samples, which the loop adds): the level
    certified constant on the D-ball (nan when none was), λ, the selector's forward passes."""
    return (cert.sigma, cert.lam, cert.selector_forward_passes)


def certify_images_sequential(
    smoothed: BranchSmoothing,
    dataset: ImageDataset,
    indices: Sequence[int],
    writer: TsvWriter,
    *,
    plan: tuple[Callable, Callable[[], Any]],
    batch: int,
    seed: int,
    device: str,
    progress: bool = True,
    desc: str = "certify",
    columns: Callable[[Any], tuple] | None = None,
) -> None:
    """Certify ``dataset[i]`` for each i of ``indices`` not yet in ``writer``, many images per
    model batch (plan = packed_plan(...)); a row is written (and flushed) as soon as that image
    and every one before it have finished, so an interrupted run loses only the images in
    flight. The noise stream of image i is i, as in cli/certify.certify_images. The extra
    columns are columns(result), if given, then the forward passes."""
    todo = check_done(writer, dataset, indices)
    images = (dataset[i][0] for i in todo)
    packer, new_task = plan
    results = packer(smoothed, images, new_task, batch, seed=seed, streams=todo, device=device)
    bar = tqdm(total=len(todo), desc=desc, disable=not progress, dynamic_ncols=True)
    with bar:
        for i, out in zip(todo, results, strict=True):
            label = dataset[i][1]
            cert = out.result
            writer.write(
                i,
                label,
                cert.prediction,
                cert.radius,
                cert.prediction == label,
                out.seconds,
                extra=(*(columns(cert) if columns else ()), cert.forward_passes),
            )
            bar.update()
