"""Sequential σ-routing (drs_ext/smoothing/sigma_routing_sequential.py) and packed batches that
mix stages and levels (drs_ext/smoothing/packed.py); its soundness simulations are in
test_sequential_routing_soundness.py.

Oracles: each stage compared with the stand-alone procedure at alpha/2 under its own key; packed
against one image at a time; forward passes counted by hooks on the models. The tests run the
real noise path through base classifiers that threshold one pixel.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from test_sequential import PixelThreshold
from test_sequential_routing_soundness import LEVELS, voting_router
from torch import nn

import drs_ext.smoothing.packed as packed
from drs_ext import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.smoothing.at_radius import ROBUST, RadiusTest
from drs_ext.smoothing.sequential import ABSTAIN, RadiusEstimate, run
from drs_ext.smoothing.sigma_routing import SigmaRoutedClassifier, estimator_seed
from drs_ext.smoothing.sigma_routing_sequential import (
    RoutedEstimate,
    RoutedRadiusTest,
    certify_routed_packed,
    certify_routed_radius,
    certify_routed_sequential,
    reachable_radius,
    run_routed,
)

# ----------------------------------------------------------------------------------------------
# End to end: the real noise path through pixel-threshold models

CENTERS = [-1.0, 0.5, 2.0]


class NearestCenter(nn.Module):
    """Level i where the view's pixel (0, 0, 0) is nearest CENTERS[i]: at σ_e = 0.5 a pixel
    near a center routes clearly, one halfway between two (-0.25, 1.25) does not."""

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        v = views[:, 0, 0, 0].double()[:, None]
        return (-((v - torch.tensor(CENTERS, dtype=torch.float64)) ** 2)).float()


def pixel_router(level_2_threshold: float = 1.8) -> SigmaRoutedClassifier:
    """Level 0: RS at 0.25; level 1: a DRS pair at 0.5/√2 per branch; level 2: RS at 1.0."""
    experts = [
        SmoothedClassifier(PixelThreshold(0, 0, -1.7), 2, 0.25),
        DualSmoothedClassifier(
            PixelThreshold(0, 0, 0.3), PixelThreshold(0, 1, 0.0), 2, 0.5 / math.sqrt(2)
        ),
        SmoothedClassifier(PixelThreshold(0, 0, level_2_threshold), 2, 1.0),
    ]
    return SigmaRoutedClassifier(NearestCenter(), LEVELS, 0.5, experts)


# Pixel (0, 0, 0) picks the level and drives levels 0 and 2 and branch l of level 1; pixel
# (0, 0, 1) drives branch r. Some images abstain at the estimator (near -0.25 or 1.25).
PIXELS = [-1.5, -0.9, 0.5, 1.25, 2.5, 3.5, -2.5, 0.7, 0.3, -0.25, 2.2, 0.9]
SECOND = [0.4, -0.3, 0.8, 0.1, 0.0, 0.6, -0.1, 0.5, 0.2, 0.3, -0.5, 1.0]
STREAMS = [3 * i + 1 for i in range(len(PIXELS))]


def image(first: float, second: float = 0.0) -> torch.Tensor:
    x = torch.zeros(1, 2, 2)
    x[0, 0, 0], x[0, 0, 1] = first, second
    return x


def images() -> list[torch.Tensor]:
    return [image(a, b) for a, b in zip(PIXELS, SECOND, strict=True)]


def routed_tasks(router, kind: str):
    if kind == "estimate":
        return functools.partial(RoutedEstimate, router, 30, 3000, 0.01, tol=0.02)
    return functools.partial(RoutedRadiusTest, router, [0.0, 0.25, 0.5], 30, 3000, 0.01)


@pytest.mark.parametrize("kind", ["estimate", "radius"])
def test_packed_equals_one_image_at_a_time(kind: str) -> None:
    """Every image gets the certificate it gets alone, whatever the batch size and whichever
    images share its batches: in order, reversed, and a mix with repeats, images at both stages
    and routed to RS and DRS levels in one batch."""
    router = pixel_router()
    new_task = routed_tasks(router, kind)
    xs = images()
    alone = [
        repr(run_routed(router, x, new_task(), 1000, seed=7, stream=s))
        for x, s in zip(xs, STREAMS, strict=True)
    ]
    levels = {level_of(a) for a in alone}
    assert {-1, 0, 1, 2} <= levels  # estimator abstentions and every level, RS and DRS
    mixes = [list(range(len(xs))), list(range(len(xs)))[::-1], [5, 2, 2, 9, 0, 11, 5, 3, 1]]
    for batch, order in zip((50, 333, 97), mixes, strict=True):
        results = certify_routed_packed(
            router,
            [xs[i] for i in order],
            new_task,
            batch,
            seed=7,
            streams=[STREAMS[i] for i in order],
        )
        assert [repr(r.result) for r in results] == [alone[i] for i in order]


def level_of(text: str) -> int:
    """The level field of a result's repr (repr is compared exactly: nan prints as nan)."""
    return int(text.split("level=")[1].split(",")[0])


def stage_models(router) -> dict[str, nn.Module]:
    models = {"estimator": router.estimator.branches[0].members[0]}
    for i, clf in enumerate(router.classifiers):
        for p, branch in enumerate(clf.branches):
            models[f"level{i}.branch{p}"] = branch.members[0]
    return models


def test_forward_passes_are_exact_and_each_model_runs_once_per_batch(monkeypatch) -> None:
    router = pixel_router()
    calls = []  # (batch, model, rows)
    batch = [0]
    for name, model in stage_models(router).items():
        model.register_forward_pre_hook(
            lambda m, args, name=name: calls.append((batch[0], name, args[0].shape[0]))
        )
    real_run_batch = packed._run_batch

    def counted(*args):
        batch[0] += 1
        return real_run_batch(*args)

    monkeypatch.setattr(packed, "_run_batch", counted)
    xs = images() * 2
    results = [
        r.result
        for r in certify_routed_packed(router, xs, routed_tasks(router, "estimate"), 128, seed=3)
    ]
    rows = {name: 0 for name in stage_models(router)}
    for _, name, size in calls:
        rows[name] += size
    # Every pass belongs to one image's count: the estimator's, and each level's for its images.
    assert rows["estimator"] == sum(r.estimator.forward_passes for r in results)
    for i, clf in enumerate(router.classifiers):
        routed = [r.classifier for r in results if r.level == i]
        for p in range(len(clf.branches)):
            assert rows[f"level{i}.branch{p}"] == sum(c.n0 + c.draws[p] for c in routed)
    assert sum(rows.values()) == sum(r.forward_passes for r in results)
    for r in results:  # selection included, per stage
        second = 0 if r.classifier is None else 30 * len(r.draws_c) + sum(r.draws_c)
        assert r.forward_passes == 30 + sum(r.draws_sigma) + second
    # One call per (classifier, branch) per batch, at most 128 draws in all (a DRS draw is a
    # view per branch), and batches that mix classifiers (the estimator and a level, or two).
    per_batch: dict[int, list[tuple[str, int]]] = {}
    for b, name, size in calls:
        per_batch.setdefault(b, []).append((name, size))
    for entries in per_batch.values():
        names = [n for n, _ in entries]
        assert len(names) == len(set(names))
        assert sum(s for n, s in entries if not n.endswith("branch1")) <= 128
        assert sum(s for n, s in entries if n.endswith("branch1")) <= 128
    mixed = [e for e in per_batch.values() if len({n.split(".")[0] for n, _ in e}) > 1]
    assert len(mixed) > len(per_batch) / 2


def test_forward_passes_alone() -> None:
    router = pixel_router()
    rows = []
    for model in stage_models(router).values():
        model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    for x, s in zip(images(), STREAMS, strict=True):
        rows.clear()
        result = certify_routed_sequential(
            router, x, 30, 3000, 0.01, 512, tol=0.02, seed=1, stream=s
        )
        assert sum(rows) == result.forward_passes
        if result.level == -1:  # the estimator abstained: the classifier stage never ran
            assert result.classifier is None and result.forward_passes == 30 + result.draws_sigma[0]
            assert result.prediction == ABSTAIN and math.isnan(result.radius_c)


@pytest.mark.parametrize("kind", ["estimate", "radius"])
def test_each_stage_is_the_stand_alone_procedure_at_half_alpha(kind: str) -> None:
    """Stage 1 is the estimator's own procedure at alpha/2 under estimator_seed(seed); stage 2
    that of the chosen level's classifier at alpha/2 under the seed itself (a RadiusEstimate
    capped at R_σ; a RadiusTest over the radii stage 1 certified)."""
    router, seed, n0, max_n, alpha = pixel_router(), 5, 30, 3000, 0.01
    checked = set()
    for x, s in zip(images(), STREAMS, strict=True):
        routed = run_routed(router, x, routed_tasks(router, kind)(), 700, seed=seed, stream=s)
        if kind == "estimate":
            level = routed.estimator.c_hat
            reach = reachable_radius(router.classifiers[level], max_n, alpha / 2)
            first = RadiusEstimate(router.estimator, n0, max_n, alpha / 2, tol=0.02, cap=reach)
        else:
            first = RadiusTest(router.estimator, [0.0, 0.25, 0.5], n0, max_n, alpha / 2)
        est = run(router.estimator, x, first, 700, seed=estimator_seed(seed), stream=s)
        assert routed.estimator == est
        if est.prediction == ABSTAIN:
            assert routed.level == -1 and routed.classifier is None
            checked.add("abstain")
            continue
        clf = router.classifiers[est.prediction]
        if kind == "estimate":
            second = RadiusEstimate(clf, n0, max_n, alpha / 2, tol=0.02, cap=est.radius)
        else:
            certified = [r for r, o in zip(est.radii, est.outcomes, strict=True) if o == ROBUST]
            second = RadiusTest(clf, certified, n0, max_n, alpha / 2)
        result = run(clf, x, second, 700, seed=seed, stream=s)
        assert routed.classifier == result and routed.level == est.prediction
        assert routed.sigma == LEVELS[routed.level]
        if kind == "estimate":
            assert routed.radius_sigma == est.radius and routed.radius_c == result.radius
            if result.prediction == ABSTAIN:
                assert (routed.prediction, routed.radius) == (ABSTAIN, 0.0)
            else:
                assert routed.prediction == result.prediction
                assert routed.radius == min(est.radius, result.radius)
        else:
            assert routed.outcomes[: len(result.radii)] == result.outcomes
            assert routed.outcomes[len(result.radii) :] == est.outcomes[len(result.radii) :]
            assert routed.radius == result.radius and routed.prediction == result.prediction
        checked.add(routed.level)
    assert {"abstain", 0, 1, 2} <= checked


def test_classifier_stage_stops_at_the_estimators_radius() -> None:
    """A near-unanimous classifier at level 2 (threshold -5 at σ = 1) would draw all max_n at
    tol = 0; capped at R_σ it stops once R_c reaches R_σ, and the radius is R_σ."""
    router, x = pixel_router(level_2_threshold=-5.0), image(2.2)
    routed = certify_routed_sequential(router, x, 30, 3000, 0.01, 512, tol=0.0, seed=2)
    assert routed.level == 2 and routed.radius == routed.radius_sigma <= routed.radius_c
    clf = router.classifiers[2]
    capped = RadiusEstimate(clf, 30, 3000, 0.005, tol=0.0, cap=routed.radius_sigma)
    assert run(clf, x, capped, 512, seed=2) == routed.classifier
    uncapped = run(clf, x, RadiusEstimate(clf, 30, 3000, 0.005, tol=0.0), 512, seed=2)
    assert routed.draws_c[0] < uncapped.draws[0] == 3000


def test_estimator_stage_stops_at_what_the_level_could_certify() -> None:
    """A unanimous estimator routing to level 0 (σ = 0.25) would draw all max_n at tol = 0;
    once R_σ reaches the largest radius level 0's classifier could report with max_n draws,
    more estimator draws cannot raise min(R_σ, R_c), and it stops."""
    router, x = pixel_router(), image(-3.0)
    routed = certify_routed_sequential(router, x, 30, 3000, 0.01, 512, tol=0.0, seed=4)
    reach = reachable_radius(router.classifiers[0], 3000, 0.005)
    assert routed.level == 0 and routed.radius_sigma >= reach >= routed.radius
    key = estimator_seed(4)
    capped = RadiusEstimate(router.estimator, 30, 3000, 0.005, tol=0.0, cap=reach)
    assert run(router.estimator, x, capped, 512, seed=key) == routed.estimator
    plain = RadiusEstimate(router.estimator, 30, 3000, 0.005, tol=0.0)
    assert routed.draws_sigma[0] < run(router.estimator, x, plain, 512, seed=key).draws[0] == 3000


@pytest.mark.parametrize("drs", [False, True])
def test_reachable_radius_is_a_unanimous_classifiers_radius_at_max_n(drs: bool) -> None:
    clf = voting_router(2, drs_level=1 if drs else None).classifiers[1]
    task = RadiusEstimate(clf, 10, 500, 0.01, tol=0.0)
    while (wanted := task.request()) is not None:
        draws = np.asarray(wanted.draws)
        task.observe(np.stack([draws, np.zeros_like(draws)], axis=1))
    assert task.result().draws == (500,) * len(clf.sigmas)
    assert task.result().radius == reachable_radius(clf, 500, 0.01) > 0


def test_routed_certify_sequential_is_the_routed_estimate() -> None:
    router, x = pixel_router(), image(0.5, 0.8)
    pair = router.certify(x, 30, 2000, 0.01, 256, seed=9, stream=4, sequential=True, tol=0.05)
    result = certify_routed_sequential(router, x, 30, 2000, 0.01, 256, tol=0.05, seed=9, stream=4)
    assert pair == (result.prediction, result.radius) and result.level == 1
    grid = certify_routed_radius(router, x, [0.0, 0.1], 30, 2000, 0.01, 256, seed=9, stream=4)
    assert grid.level == 1 and grid.classifier.radii == (0.0, 0.1)


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_arguments_name_what_is_wrong() -> None:
    router, x = pixel_router(), image(0.5)
    with pytest.raises(TypeError, match="router must be a SigmaRoutedClassifier"):
        RoutedEstimate(router.estimator, 10, 100, 0.01)
    with pytest.raises(TypeError, match="router must be a SigmaRoutedClassifier"):
        RoutedRadiusTest(None, 0.5, 10, 100, 0.01)
    for bad, match in [
        (dict(alpha=0.0), "alpha must"),
        (dict(n0=0), "n0 must"),
        (dict(max_n=-1), "max_n must"),
        (dict(tol=-0.1), "tol must"),
        (dict(growth=1.0), "growth must"),
    ]:
        args = {"n0": 10, "max_n": 100, "alpha": 0.01} | bad
        with pytest.raises(ValueError, match=match):
            RoutedEstimate(router, **args)
    with pytest.raises(ValueError, match="radii must"):
        RoutedRadiusTest(router, [0.5, 0.25], 10, 100, 0.01)
    with pytest.raises(ValueError, match="beta must"):
        RoutedRadiusTest(router, 0.5, 10, 100, 0.01, beta=1.5)
    with pytest.raises(ValueError, match="tol must"):
        router.certify(x, 10, 100, 0.01, 64, sequential=True, tol=-1)
    other = pixel_router()
    with pytest.raises(ValueError, match="task must be a RoutedEstimate or RoutedRadiusTest"):
        run_routed(router, x, RoutedEstimate(other, 10, 100, 0.01), 64)
    with pytest.raises(ValueError, match="seed must be in"):
        run_routed(router, x, RoutedEstimate(router, 10, 100, 0.01), 64, seed=-1)
    with pytest.raises(ValueError, match=r"x must be one image of shape \(C, H, W\)"):
        certify_routed_sequential(router, torch.zeros(2, 2), 10, 100, 0.01, 64)
    task = RoutedEstimate(router, 10, 100, 0.01)
    with pytest.raises(RuntimeError, match="before the task finished"):
        task.result()
    with pytest.raises(
        ValueError, match=r"counts must have shape \(branches, classes\) = \(1, 3\)"
    ):
        task.observe(np.zeros((1, 2)))
