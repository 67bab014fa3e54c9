"""Packed batches (drs_ext/smoothing/packed.py): many images' draws share model calls, and every
image's certificate is the one it gets alone (sequential.run through the classifier's own
sampling loop), whatever the batch size and whichever images share its batches."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from test_sequential import PixelThreshold
from torch import nn

import drs_ext.smoothing.packed as packed
from drs_ext import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.smoothing.at_radius import RadiusTest
from drs_ext.smoothing.packed import certify_packed
from drs_ext.smoothing.sequential import RadiusEstimate, StageRequest, run

# Class 0 with probability Φ((x[0, 0, 0] − 0.2)/σ) on RS / branch l, Φ((x[0, 0, 1] − 0.1)/σᵣ)
# on branch r: images with pixels spread around the thresholds are easy, hard or hopeless.
PIXELS = [1.2, 0.9, 0.55, 0.45, 0.3, 0.25, 0.2, -0.4, 0.7, 0.62, 1.5, 0.05]


def images(device: torch.device | str = "cpu") -> list[torch.Tensor]:
    out = []
    for i, v in enumerate(PIXELS):
        x = torch.zeros(1, 2, 2)
        x[0, 0, 0], x[0, 0, 1] = v, PIXELS[(i + 3) % len(PIXELS)]
        out.append(x.to(device))
    return out


def classifier(method: str):
    if method == "rs":
        return SmoothedClassifier(PixelThreshold(0, 0, 0.2), 2, 0.5)
    left, right = PixelThreshold(0, 0, 0.2), PixelThreshold(0, 1, 0.1)
    return DualSmoothedClassifier(left, right, 2, (0.5, 0.35))


def tasks(smoothed, kind: str):
    if kind == "radius":
        return functools.partial(RadiusTest, smoothed, [0.0, 0.25, 0.5], 40, 5000, 0.01)
    return functools.partial(RadiusEstimate, smoothed, 40, 5000, 0.01, tol=0.02)


@pytest.mark.parametrize("kind", ["radius", "estimate"])
@pytest.mark.parametrize("method", ["rs", "drs"])
def test_packed_equals_one_image_at_a_time(device: torch.device, method: str, kind: str) -> None:
    smoothed = classifier(method)
    new_task = tasks(smoothed, kind)
    streams = [3 * i + 1 for i in range(len(PIXELS))]
    alone = [
        run(smoothed, x, new_task(), 1000, seed=7, stream=s)
        for x, s in zip(images(device), streams, strict=True)
    ]
    assert len({r.draws for r in alone}) > 1  # the images need different numbers of draws
    for batch in (64, 333):
        packed = list(
            certify_packed(smoothed, images(device), new_task, batch, seed=7, streams=streams)
        )
        assert [p.stream for p in packed] == streams
        assert [p.result for p in packed] == alone


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_batches_are_full_and_every_pass_is_counted(method: str) -> None:
    smoothed = classifier(method)
    left_over = []  # per model call: were all images already read when it ran?
    exhausted = [False]

    def all_images():
        yield from images() * 3
        exhausted[0] = True

    def note(module: nn.Module, args: tuple) -> None:
        left_over.append((args[0].shape[0], exhausted[0]))

    for branch in smoothed.branches:
        branch.members[0].register_forward_pre_hook(note)
    packed = list(certify_packed(smoothed, all_images(), tasks(smoothed, "radius"), 128, seed=1))
    # Every forward pass the model ran belongs to one image's count, and no more.
    assert sum(size for size, _ in left_over) == sum(p.result.forward_passes for p in packed)
    assert max(size for size, _ in left_over) <= 128
    if method == "rs":  # one branch: every call is full as long as images are left to admit
        assert all(size == 128 for size, drained in left_over if not drained)
        assert sum(not drained for _, drained in left_over) > len(left_over) / 2
    assert all(p.seconds > 0 for p in packed)


def test_images_are_read_lazily_and_results_come_in_order() -> None:
    smoothed = classifier("rs")
    reads = []

    def stream_of_images():
        for i, x in enumerate(images() * 4):
            reads.append(i)
            yield x

    results = certify_packed(smoothed, stream_of_images(), tasks(smoothed, "radius"), 100, seed=0)
    first = next(results)
    assert first.stream == 0 and len(reads) < 48  # not all read before the first answer
    rest = list(results)
    assert [r.stream for r in rest] == list(range(1, 48))


def test_bad_arguments() -> None:
    smoothed = classifier("rs")
    new_task = tasks(smoothed, "radius")
    with pytest.raises(ValueError, match="streams ran out before the images, at image 2"):
        list(certify_packed(smoothed, images(), new_task, 64, seed=0, streams=[0, 1]))
    with pytest.raises(ValueError, match=r"x must be one image of shape \(C, H, W\)"):
        list(certify_packed(smoothed, [torch.zeros(2, 2)], new_task, 64, seed=0))
    with pytest.raises(TypeError, match="new_task\\(\\) must return a SequentialTask"):
        list(certify_packed(smoothed, images(), lambda: None, 64, seed=0))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        list(certify_packed(smoothed, images(), new_task, 0, seed=0))
    with pytest.raises(ValueError, match="stream must be in"):
        list(certify_packed(smoothed, images(), new_task, 64, seed=0, streams=[-1] * 12))
    assert list(certify_packed(smoothed, [], new_task, 64, seed=0)) == []


def test_nan_views_vote_for_no_class_with_a_warning() -> None:
    class NaNs(nn.Module):
        def forward(self, views: torch.Tensor) -> torch.Tensor:
            return torch.full((views.shape[0], 2), float("nan"))

    smoothed = SmoothedClassifier(NaNs(), 2, 0.5)
    new_task = functools.partial(RadiusTest, smoothed, 0.0, 10, 50, 0.01)
    with pytest.warns(RuntimeWarning, match="NaN logits"):
        (only,) = list(certify_packed(smoothed, images()[:1], new_task, 64, seed=0))
    assert only.result.prediction == -1 and np.all(np.array(only.result.draws) <= 50)


class Borrowed:
    """A task that draws from another classifier under the key seed + 1 (StageRequests)."""

    def __init__(self, task, smoothed, key=lambda seed: seed + 1) -> None:
        self.task, self.smoothed, self.key = task, smoothed, key

    def request(self):
        wanted = self.task.request()
        if wanted is None:
            return None
        return StageRequest(wanted.offset, wanted.draws, smoothed=self.smoothed, key=self.key)

    def observe(self, counts) -> None:
        self.task.observe(counts)

    def result(self):
        return self.task.result()


def test_stage_requests_draw_from_their_classifier_and_key(monkeypatch) -> None:
    """Images drawing from the call's RS classifier and images drawing from a DRS pair under
    another key share batches; each gets the certificate it gets alone, and each branch model
    runs at most once per batch."""
    rs, drs = classifier("rs"), classifier("drs")
    own, other = tasks(rs, "estimate"), tasks(drs, "estimate")
    alone = [
        run(rs, x, own(), 1000, seed=7, stream=i)
        if i % 2
        else run(drs, x, other(), 1000, seed=8, stream=i)
        for i, x in enumerate(images())
    ]
    assert run(rs, images()[0], Borrowed(other(), drs), 1000, seed=7) == alone[0]
    calls, batch = [], [0]
    for smoothed in (rs, drs):
        for branch in smoothed.branches:
            model = branch.members[0]
            model.register_forward_pre_hook(lambda m, a: calls.append((batch[0], id(m))))
    real_run_batch = packed._run_batch

    def counted(*args):
        batch[0] += 1
        return real_run_batch(*args)

    monkeypatch.setattr(packed, "_run_batch", counted)
    for size in (64, 333):
        turn = itertools.count()
        new_task = functools.partial(alternate, turn, own, lambda: Borrowed(other(), drs))
        results = certify_packed(rs, images(), new_task, size, seed=7)
        assert [p.result for p in results] == alone
    assert len(calls) == len(set(calls))  # no model twice in one batch
    per_batch = [sum(b == i for b, _ in calls) for i in range(1, batch[0] + 1)]
    assert max(per_batch) == 3  # RS's model and both DRS branches in one batch


def alternate(turn, odd, even):
    """odd() for the odd images, even() for the even ones."""
    return odd() if next(turn) % 2 else even()


def test_bad_stage_requests() -> None:
    rs = classifier("rs")

    def odd(smoothed, key):
        return lambda: Borrowed(tasks(rs, "radius")(), smoothed, key)

    with pytest.raises(TypeError, match="a request's smoothed must be a smoothed classifier"):
        list(certify_packed(rs, images(), odd(nn.Identity(), None), 64, seed=0))
    message = r"a request's key\(seed\) must be an integer in \[0, 2\*\*63\), got -1"
    with pytest.raises(ValueError, match=message):
        list(certify_packed(rs, images(), odd(rs, lambda seed: -1), 64, seed=0))
    with pytest.raises(ValueError, match=r"key\(seed\) must be an integer in"):
        run(rs, images()[0], odd(rs, lambda seed: 2**63)(), 64, seed=0)
