"""Sequential certification of many images with the model's batch kept full.

A sequential test decides each image after its own number of draws, so one image alone would
send half-empty batches through the model. Here each model batch holds the next draws of
several images, the way an inference server packs requests: every image has its own stream id
and draws the next unused sample indices of its own request (sequential.py), each image's views
are drawn by one noisy_views call, the views of all images in the batch go through each branch's
model in one call, and vote_counts counts them per image. An image leaves when its task decides;
the next image takes its slots.

Staged methods. A task whose stages smooth with different classifiers (σ-routing: the
estimator, then the chosen level's classifier) asks for its draws with a StageRequest
(sequential.py), which names the smoothed classifier and the Philox key of those draws. The
images of one batch may then be at different stages or routed to different levels: each
image's views are drawn with its own classifier's σ, partition and fill under its own key, and
the model calls are grouped per (classifier, branch), so each branch model still gets one call
per batch.

A draw is a pure function of (key, stream, branch, sample index) (docs/design.md §2.2) and a
task sees only the total votes of each request, so every certificate is the one that image gets
alone (sequential.run), whatever the batch size and whichever images share its batches, as
long as the model's output for a view does not depend on the other views of its batch (eval
mode).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..ops import noisy_views, vote_counts
from .sampling import BranchSmoothing, check_positive_int, eval_mode, resolve_seed
from .sequential import Request, draw_source


@runtime_checkable
class Task(Protocol):
    """What a sampler drives: a SequentialTask, or a task of several stages whose requests are
    StageRequests (sigma_routing_sequential.py)."""

    def request(self) -> Request | None: ...

    def observe(self, counts: np.ndarray) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class PackedResult:
    """One image's answer (its task's result()); seconds is its share of the batches it was
    drawn in (by rows)."""

    stream: int
    result: Any
    seconds: float


@dataclass
class _Image:
    position: int
    stream: int
    x: torch.Tensor
    task: Task
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
    new_task: Callable[[], Task],
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
    whole call. Images are read lazily, a batch's worth ahead. Draws of a StageRequest come from
    the classifier and key it names; the others from `smoothed` under `seed`."""
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
            if not isinstance(task, Task):
                raise TypeError(
                    "new_task() must return a SequentialTask (or a task with request, observe "
                    f"and result), got {type(task)}"
                )
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


@dataclass
class _Chunk:
    """The draws of one image in one batch: `take` of them, rows[p] on branch p."""

    img: _Image
    take: int
    source: BranchSmoothing
    key: int
    rows: np.ndarray


def _run_batch(smoothed: BranchSmoothing, active: list[_Image], batch_size: int, seed: int) -> int:
    """Draws the next batch_size draws of the active images in order (oldest first) and adds
    their votes to each image's counts; returns how many views voted for no class (NaN)."""
    start = time.perf_counter()
    chunks: list[_Chunk] = []
    room = batch_size
    for img in active:
        if room == 0:
            break
        take = min(room, img.pending)
        source, key = draw_source(img.wanted, smoothed, seed)
        # rows[p]: how many of these draws branch p wants (0 where the branch has stopped).
        rows = np.array([min(max(d - img.drawn, 0), take) for d in img.wanted.draws])
        chunks.append(_Chunk(img, take, source, key, rows))
        room -= take
    sources = list({id(c.source): c.source for c in chunks}.values())  # first-seen order
    with torch.inference_mode(), contextlib.ExitStack() as modes:
        for source in sources:
            for branch in source.branches:
                modes.enter_context(eval_mode(branch))
        views = [_views(c) for c in chunks]
        counts = [
            torch.zeros(
                len(c.source.branches),
                c.source.num_classes,
                dtype=torch.int64,
                device=c.img.x.device,
            )
            for c in chunks
        ]
        # One model call per (classifier, branch): the views of every image drawing from it.
        for source in sources:
            for p, branch in enumerate(source.branches):
                used = [i for i, c in enumerate(chunks) if c.source is source and c.rows[p] > 0]
                if not used:
                    continue
                batch = torch.cat([views[i][p, : chunks[i].rows[p]] for i in used])
                # A model that takes σ (a denoiser in front) is told its branch's σ, as in sampling.
                sigma = source.sigmas[p] if branch.takes_sigma else None
                logits = source.model_call(branch, batch, sigma)
                source._check_logits(logits, batch.shape[0], p)
                sizes = [int(chunks[i].rows[p]) for i in used]
                for i, part in zip(used, logits.split(sizes), strict=True):
                    counts[i][p] = vote_counts(part[None])[0]
        # The one synchronisation of the batch: every image's counts in one copy.
        flat = torch.cat([c.flatten() for c in counts]).cpu().numpy()
    elapsed = time.perf_counter() - start
    total_rows = max(sum(int(c.rows.sum()) for c in chunks), 1)
    shapes = [tuple(t.shape) for t in counts]
    splits = np.cumsum([t.numel() for t in counts])[:-1]
    for c, shape, votes in zip(chunks, shapes, np.split(flat, splits), strict=True):
        votes = votes.reshape(shape)
        c.img.counts = votes if c.img.counts is None else c.img.counts + votes
        c.img.drawn += c.take
        c.img.seconds += elapsed * c.rows.sum() / total_rows
    return int(sum(c.rows.sum() for c in chunks) - flat.sum())


def _views(chunk: _Chunk) -> torch.Tensor:
    """(P, take, C, H, W) views of one chunk, with its classifier's σ, partition and fill."""
    img = chunk.img
    stream = torch.full((1,), img.stream, dtype=torch.int64, device=img.x.device)
    return noisy_views(
        img.x[None],
        chunk.source.sigmas,
        num=chunk.take,
        seed=chunk.key,
        offset=img.wanted.offset + img.drawn,
        stream=stream,
        partition=chunk.source.partition,
        fill=chunk.source.fill,
    )[0]
