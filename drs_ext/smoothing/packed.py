"""Sequential certification of many images with the model's batch kept full.

A sequential test decides each image after its own number of draws, so one image alone would
send half-empty batches through the model. Here each model batch holds the next draws of
several images, the way an inference server packs requests: every image has its own stream id
and draws the next unused sample indices of its own request (sequential.py), its views are
drawn by one noisy_views call, the views of all images in the batch go through each branch's
model in one call, and vote_counts counts them per image. An image leaves when its task decides;
the next image takes its slots.

A draw is a pure function of (seed, stream, branch, sample index) (docs/design.md §2.2) and a
task sees only the total votes of each request, so every certificate is the one that image gets
alone (sequential.run), whatever the batch size and whichever images share its batches, as long
as the model's output for a view does not depend on the other views of its batch (eval mode).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops import noisy_views, vote_counts
from .at_radius import RadiusResult
from .sampling import BranchSmoothing, check_positive_int, eval_mode, resolve_seed
from .sequential import EstimateResult, Request, SequentialTask


@dataclass(frozen=True)
class PackedResult:
    """One image's answer; seconds is its share of the batches it was drawn in (by rows)."""

    stream: int
    result: RadiusResult | EstimateResult
    seconds: float


@dataclass
class _Image:
    position: int
    stream: int
    x: torch.Tensor
    task: SequentialTask
    wanted: Request
    drawn: int = 0  # draws of `wanted` done so far
    counts: np.ndarray = field(default=None)  # votes (P, K) of those draws
    seconds: float = 0.0

    @property
    def pending(self) -> int:
        return max(self.wanted.draws) - self.drawn


def certify_packed(
    smoothed: BranchSmoothing,
    images: Iterable[torch.Tensor],
    new_task: Callable[[], SequentialTask],
    batch_size: int,
    *,
    seed: int | None = None,
    streams: Iterable[int] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[PackedResult]:
    """Certifies each image (C, H, W) of `images` with a fresh task from new_task() (e.g.
    functools.partial(RadiusTest, smoothed, radii, n0, max_n, alpha)), at most batch_size draws
    per model call; yields the results in the order of `images`, each as soon as it and every
    image before it have decided. streams (default 0, 1, 2, ...) are the images' noise streams,
    e.g. their data-set indices; seed None takes one from torch's default generator for the
    whole call. Images are read lazily, a batch's worth ahead."""
    batch_size = check_positive_int("batch_size", batch_size)
    seed = resolve_seed(seed)
    image_iter = iter(images)
    stream_iter = iter(streams) if streams is not None else itertools.count()
    active: list[_Image] = []
    done: dict[int, PackedResult] = {}
    admitted = emitted = 0
    missing = 0
    exhausted = False
    while True:
        while not exhausted and sum(img.pending for img in active) < batch_size:
            x = next(image_iter, None)
            if x is None:
                exhausted = True
                break
            stream = next(stream_iter, None)
            if stream is None:
                raise ValueError(f"streams ran out before the images, at image {admitted}")
            x = smoothed._check_call(x, seed, stream)
            task = new_task()
            if not isinstance(task, SequentialTask):
                raise TypeError(f"new_task() must return a SequentialTask, got {type(task)}")
            x = x if device is None else x.to(device)
            active.append(_Image(admitted, int(stream), x, task, task.request()))
            admitted += 1
        if not active:
            break
        missing += _run_batch(smoothed, active, batch_size, seed)
        for img in [img for img in active if img.pending == 0]:
            img.task.observe(img.counts)
            wanted = img.task.request()
            if wanted is None:
                done[img.position] = PackedResult(img.stream, img.task.result(), img.seconds)
                active.remove(img)
            else:
                img.wanted, img.drawn, img.counts = wanted, 0, None
        while emitted in done:
            yield done.pop(emitted)
            emitted += 1
    if missing:
        warnings.warn(
            f"{missing} noisy views gave NaN logits and voted for no class",
            RuntimeWarning,
            stacklevel=2,
        )


def _run_batch(smoothed: BranchSmoothing, active: list[_Image], batch_size: int, seed: int) -> int:
    """Draws the next batch_size draws of the active images in order (oldest first) and adds
    their votes to each image's counts; returns how many views voted for no class (NaN)."""
    start = time.perf_counter()
    chunks: list[tuple[_Image, int]] = []
    room = batch_size
    for img in active:
        if room == 0:
            break
        take = min(room, img.pending)
        chunks.append((img, take))
        room -= take
    branches = len(smoothed.branches)
    # rows[i, p]: how many of chunk i's draws branch p wants (0 where the branch has stopped).
    rows = np.array(
        [[min(max(d - img.drawn, 0), take) for d in img.wanted.draws] for img, take in chunks]
    )
    with torch.inference_mode(), contextlib.ExitStack() as modes:
        for branch in smoothed.branches:
            modes.enter_context(eval_mode(branch))
        views = []
        for img, take in chunks:
            stream = torch.full((1,), img.stream, dtype=torch.int64, device=img.x.device)
            views.append(
                noisy_views(
                    img.x[None],
                    smoothed.sigmas,
                    num=take,
                    seed=seed,
                    offset=img.wanted.offset + img.drawn,
                    stream=stream,
                    partition=smoothed.partition,
                    fill=smoothed.fill,
                )[0]
            )
        device = chunks[0][0].x.device
        counts = torch.zeros(
            len(chunks), branches, smoothed.num_classes, dtype=torch.int64, device=device
        )
        for p, branch in enumerate(smoothed.branches):
            used = [i for i in range(len(chunks)) if rows[i, p] > 0]
            if not used:
                continue
            batch = torch.cat([views[i][p, : rows[i, p]] for i in used])
            # A model that takes σ (a denoiser in front) is told its branch's σ, as in sampling.
            sigma = smoothed.sigmas[p] if branch.takes_sigma else None
            logits = smoothed.model_call(branch, batch, sigma)
            smoothed._check_logits(logits, batch.shape[0], p)
            for i, part in zip(used, logits.split([int(rows[i, p]) for i in used]), strict=True):
                counts[i, p] = vote_counts(part[None])[0]
        counts_host = counts.cpu().numpy()  # the one synchronisation of the batch
    elapsed = time.perf_counter() - start
    total_rows = max(int(rows.sum()), 1)
    for (img, take), votes, wanted in zip(chunks, counts_host, rows, strict=True):
        img.counts = votes if img.counts is None else img.counts + votes
        img.drawn += take
        img.seconds += elapsed * wanted.sum() / total_rows
    return int(rows.sum() - counts_host.sum())
