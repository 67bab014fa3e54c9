"""Sequential certification (drs_ext/smoothing/sequential.py, at_radius.py).

Oracles: the votes of each draw recomputed with drs_ext.reference's noise and the statistics of
drs_ext.stats applied look by look; closed-form Bernoulli KL divergences for the DRS split; and
soundness by simulation with known vote probabilities, under optional stopping, with negative
controls (a fixed-n Clopper–Pearson bound recomputed at every look at the full alpha) that the
same checks must catch. The simulations feed the procedures' own state machines with binomial
votes (fast, many repetitions); end-to-end ones run the real noise path through base classifiers
that threshold one pixel (vote probability Φ((x − t)/σ)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_law
from scipy.stats import norm
from torch import nn

import drs_ext.smoothing.at_radius as at_radius
import drs_ext.smoothing.sequential as sequential
from drs_ext import DualSmoothedClassifier, SmoothedClassifier, reference
from drs_ext.radius import drs_radius, rs_radius
from drs_ext.smoothing.at_radius import (
    NOT_ROBUST,
    ROBUST,
    UNDECIDED,
    RadiusTest,
    certify_radius,
    split_threshold,
)
from drs_ext.smoothing.sampling import ESTIMATION_OFFSET, SELECTION_OFFSET
from drs_ext.smoothing.sequential import (
    ABSTAIN,
    RadiusEstimate,
    certified_accuracy,
    certify_sequential,
    look_schedule,
)
from drs_ext.stats import mixture_log_e_value, mixture_lower_bound

ALPHA = 0.2  # large, so that false-certificate rates show with a few hundred repetitions
LOOKS = {"first_look": 8, "growth": 1.5}


def binomial_ceiling(rate: float, reps: int) -> float:
    return rate + 3.0 * math.sqrt(rate * (1.0 - rate) / reps)


class PixelThreshold(nn.Module):
    """Class 0 when the view's pixel (0, i, j) exceeds t, else class 1: for a kept pixel x of a
    view x + σε, P(class 0) = Φ((x − t)/σ)."""

    def __init__(self, i: int, j: int, threshold: float) -> None:
        super().__init__()
        self.i, self.j, self.threshold = i, j, threshold

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        margin = views[:, 0, self.i, self.j].double() - self.threshold
        return torch.stack([margin, -margin], dim=1).float()


IMAGE = torch.tensor([[[0.3, -0.2], [0.1, 0.4]]])  # branch l keeps (0, 0), branch r (0, 1)


def rs_pixel(p: float, sigma: float = 0.5) -> SmoothedClassifier:
    return SmoothedClassifier(PixelThreshold(0, 0, 0.3 - sigma * norm.ppf(p)), 2, sigma)


def drs_pixel(p_l: float, p_r: float, sigmas=(0.5, 0.35)) -> DualSmoothedClassifier:
    left = PixelThreshold(0, 0, 0.3 - sigmas[0] * norm.ppf(p_l))
    right = PixelThreshold(0, 1, -0.2 - sigmas[1] * norm.ppf(p_r))
    return DualSmoothedClassifier(left, right, 2, sigmas)


def reference_votes(smoothed, offset: int, num: int, seed: int, stream: int) -> np.ndarray:
    """(P, num) class of each draw, from drs_ext.reference's noise (not the op under test)."""
    views = reference.noisy_views(
        IMAGE[None],
        smoothed.sigmas,
        num=num,
        seed=seed,
        offset=offset,
        stream=torch.tensor([stream]),
        partition=smoothed.partition,
        fill=smoothed.fill,
    )[0]
    return np.stack([b(views[p]).argmax(dim=1).numpy() for p, b in enumerate(smoothed.branches)])


# ----------------------------------------------------------------------------------------------
# Parts


def test_look_schedule() -> None:
    assert look_schedule(1000, 100, 2.0) == [100, 200, 400, 800, 1000]
    assert look_schedule(50, 100, 2.0) == [50]
    assert look_schedule(5, 1, 1.01) == [1, 2, 3, 4, 5]  # at least one more draw per look
    looks = look_schedule(100_000, 32, 1.5)
    assert looks[-1] == 100_000 and all(b > a for a, b in zip(looks[:-1], looks[1:], strict=True))


@pytest.mark.parametrize(("votes", "s"), [((90, 60), 1.0), ((100, 100), 3.0), ((97, 99), 0.0)])
def test_split_threshold_shares_the_slack_by_standard_error(votes: tuple[int, int], s: float):
    n0 = 100
    t = split_threshold(s, np.array(votes), n0)
    assert t.sum() == pytest.approx(s, abs=1e-12)
    p_hat = (np.array(votes) + 1) / (n0 + 2)
    a_hat = norm.ppf(p_hat)
    assert np.all(t < a_hat)  # both estimates clear their thresholds
    # Delta method: sd(Φ⁻¹(p̂)) = sd(p̂)/φ(Φ⁻¹(p)), by a numerical derivative of norm.ppf.
    h = 1e-7
    slope = (norm.ppf(p_hat + h) - norm.ppf(p_hat - h)) / (2 * h)
    se = np.sqrt(p_hat * (1 - p_hat) / n0) * slope
    np.testing.assert_allclose((a_hat - t) / (a_hat.sum() - s), se / se.sum(), rtol=1e-6)


def test_split_threshold_short_of_s_and_one_branch() -> None:
    t = split_threshold(5.0, np.array([60, 70]), 100)  # the estimates cannot reach s = 5
    assert t.sum() == pytest.approx(5.0) and np.all(t > norm.ppf((np.array([60, 70]) + 1) / 102))
    assert split_threshold(1.5, np.array([7]), 10).tolist() == [1.5]


# ----------------------------------------------------------------------------------------------
# The procedures follow the votes of their draws (counters, looks, statistics)


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_radius_test_follows_its_draws(method: str) -> None:
    smoothed = rs_pixel(0.93) if method == "rs" else drs_pixel(0.9, 0.85)
    n0, max_n, seed, stream = 30, 1500, 3, 5
    radius = 0.6 if method == "rs" else 0.3  # true radii 0.74 and 0.37
    result = certify_radius(
        smoothed, IMAGE, radius, n0, max_n, 0.01, 97, seed=seed, stream=stream, **LOOKS
    )
    selection = reference_votes(smoothed, SELECTION_OFFSET, n0, seed, stream)
    assert result.c_hat == 0 == np.bincount(selection.ravel(), minlength=2).argmax()
    sums = radius * math.sqrt(sum(s**-2 for s in smoothed.sigmas))
    thresholds = split_threshold(sums, (selection == 0).sum(axis=1), n0)
    estimation = reference_votes(smoothed, ESTIMATION_OFFSET, max_n, seed, stream) == 0
    decided = {}  # branch -> (look, outcome): the first look at which its test rejects
    for n in look_schedule(max_n, **LOOKS):
        for p, t in enumerate(thresholds):
            k = int(estimation[p, :n].sum())
            if p not in decided and mixture_log_e_value(k, n, norm.cdf(t)) >= math.log(100):
                decided[p] = (n, ROBUST)
            elif p not in decided and mixture_log_e_value(k, n, norm.cdf(t), "less") >= math.log(
                100
            ):
                decided[p] = (n, NOT_ROBUST)
        if len(decided) == len(thresholds) or NOT_ROBUST in [o for _, o in decided.values()]:
            break
    assert result.outcomes == (ROBUST,) and len(decided) == len(thresholds)
    assert result.draws == tuple(decided[p][0] for p in range(len(thresholds)))
    assert result.forward_passes == n0 * len(thresholds) + sum(result.draws)


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_sequential_radius_follows_its_draws(method: str) -> None:
    smoothed = rs_pixel(0.95) if method == "rs" else drs_pixel(0.95, 0.9)
    n0, max_n, alpha, tol, seed, stream = 30, 3000, 0.01, 0.05, 4, 9
    result = certify_sequential(
        smoothed, IMAGE, n0, max_n, alpha, 89, tol=tol, seed=seed, stream=stream, **LOOKS
    )
    estimation = reference_votes(smoothed, ESTIMATION_OFFSET, max_n, seed, stream) == 0
    branches = estimation.shape[0]

    def radius(lowers: np.ndarray) -> float:
        if branches == 1:
            return rs_radius(float(lowers[0]), smoothed.sigma)
        return drs_radius(float(lowers[0]), float(lowers[1]), *smoothed.sigmas)

    lowers = np.zeros(branches)
    for n in look_schedule(max_n, **LOOKS):
        k = estimation[:, :n].sum(axis=1)
        lowers = np.maximum(lowers, mixture_lower_bound(k, n, alpha / branches))
        # From the frequency once certified; from the upper bound (at alpha) while abstaining.
        upper = 1 - mixture_lower_bound(n - k, n, alpha / branches)
        frequency = k / n if radius(lowers) > 0 else upper
        at_max = np.rint(frequency * max_n).astype(int)
        ahead = radius(np.maximum(lowers, mixture_lower_bound(at_max, max_n, alpha / branches)))
        if n == max_n or ahead - radius(lowers) <= tol:
            break
    assert result.draws == (n,) * branches and n < max_n
    assert result.prediction == 0 and result.radius == radius(lowers) > 0
    # The classifier's own certify(sequential=True) is this procedure (at the default looks).
    pair = smoothed.certify(
        IMAGE, n0, max_n, alpha, 89, seed=seed, stream=stream, sequential=True, tol=tol
    )
    default = certify_sequential(
        smoothed, IMAGE, n0, max_n, alpha, 89, tol=tol, seed=seed, stream=stream
    )
    assert pair == (default.prediction, default.radius)


@pytest.mark.parametrize(("p", "cap", "tol"), [(0.99, 0.6, 0.2), (0.999, 0.8, 0.3)])
def test_a_cap_within_reach_is_reached(p: float, cap: float, tol: float) -> None:
    """With a large tol the radius is within tol of the cap early on, but the projection clears
    the cap by more than tol: the image draws on until its radius reaches the cap (callers
    report min(radius, cap)), as a fixed n that reaches it would (stopping within tol of the
    cap, these runs would end at radius 0.47 and 0.59)."""
    common = dict(tol=tol, cap=cap, seed=1, stream=2, **LOOKS)
    capped = certify_sequential(rs_pixel(p), IMAGE, 30, 5000, 0.01, 500, **common)
    assert capped.radius >= cap and capped.draws[0] < 5000


def test_unlucky_early_draws_do_not_end_an_image_as_an_abstention() -> None:
    """Votes for ĉ at half the early draws project to an abstention at max_n, but the upper
    confidence bound says more draws may certify: the image goes on, and certifies once its
    votes come in at its true rate; an image whose upper bound falls short stops early."""
    unlucky = RadiusEstimate(rs_pixel(0.8), 30, 3000, 0.01, tol=0.01, **LOOKS)
    unlucky.observe(np.array([[30, 0]]))  # selection: ĉ = 0
    unlucky.observe(np.array([[4, 4]]))  # the first look, 8 draws
    assert unlucky.radius <= 0 and unlucky.request() is not None
    while (wanted := unlucky.request()) is not None:
        votes = round(0.8 * wanted.draws[0])
        unlucky.observe(np.array([[votes, wanted.draws[0] - votes]]))
    assert unlucky.result().prediction == 0 and unlucky.result().radius > 0
    hopeless = RadiusEstimate(rs_pixel(0.3), 30, 3000, 0.01, tol=0.01, **LOOKS)
    hopeless.observe(np.array([[30, 0]]))
    while (wanted := hopeless.request()) is not None:
        votes = round(0.3 * wanted.draws[0])
        hopeless.observe(np.array([[votes, wanted.draws[0] - votes]]))
    result = hopeless.result()
    assert result.prediction == ABSTAIN and result.draws[0] < 300
    with pytest.raises(ValueError, match="beta must be in the open interval"):
        RadiusEstimate(rs_pixel(0.3), 30, 3000, 0.01, beta=1.5)


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_cap_stops_at_the_first_look_that_reaches_it(method: str) -> None:
    smoothed = rs_pixel(0.95) if method == "rs" else drs_pixel(0.95, 0.9)
    n0, max_n, alpha, seed, stream = 30, 3000, 0.01, 4, 9
    common = dict(seed=seed, stream=stream, **LOOKS)
    uncapped = certify_sequential(smoothed, IMAGE, n0, max_n, alpha, 89, tol=0, **common)
    cap = uncapped.radius / 2
    capped = certify_sequential(smoothed, IMAGE, n0, max_n, alpha, 89, tol=0, cap=cap, **common)
    estimation = reference_votes(smoothed, ESTIMATION_OFFSET, max_n, seed, stream) == 0
    lowers = np.zeros(estimation.shape[0])
    for n in look_schedule(max_n, **LOOKS):  # the first look whose radius reaches the cap
        k = estimation[:, :n].sum(axis=1)
        lowers = np.maximum(lowers, mixture_lower_bound(k, n, alpha / len(lowers)))
        if smoothed.radius_from_bounds(lowers) >= cap:
            break
    assert capped.draws == (n,) * len(lowers) and sum(capped.draws) < sum(uncapped.draws)
    assert capped.radius == smoothed.radius_from_bounds(lowers) >= cap
    with pytest.raises(ValueError, match="cap must be a real number > 0"):
        certify_sequential(smoothed, IMAGE, n0, max_n, alpha, 89, cap=0.0)


# ----------------------------------------------------------------------------------------------
# Soundness by simulation: the state machines fed binomial votes of known probabilities


def simulate(make_task, probs: list[float], reps: int, seed: int = 0) -> list:
    """Each task's draws vote class 0 with probability probs[p] on branch p, else class 1."""
    rng, probs, results = np.random.default_rng(seed), np.asarray(probs), []
    for _ in range(reps):
        task = make_task()
        while (wanted := task.request()) is not None:
            draws = np.asarray(wanted.draws)
            wins = rng.binomial(draws, probs)
            task.observe(np.stack([wins, draws - wins], axis=1))
        results.append(task.result())
    return results


def false_rate(results: list, truth: float) -> float:
    """Share of results that claim class 1 (whose probability is below 1/2) or a radius the
    truth does not reach: a radius test's certified r needs truth > r, an estimate's R <= truth."""

    def false(r) -> bool:
        if r.prediction == ABSTAIN:
            return False
        reach = r.radius >= truth if hasattr(r, "outcomes") else r.radius > truth
        return r.prediction != 0 or reach

    return float(np.mean([false(r) for r in results]))


RS = SmoothedClassifier(nn.Identity(), 2, 0.5)
DRS = DualSmoothedClassifier(nn.Identity(), nn.Identity(), 2, (0.5, 0.35))
DRS_SUM = 0.4 * math.hypot(1 / 0.5, 1 / 0.35)  # Σ a for r = 0.4


def rs_test_at_boundary(reps: int) -> float:
    # p = Φ(r/σ): H0 holds with equality. beta tiny: no futility stop, every look is a chance.
    make = lambda: RadiusTest(RS, 0.5, 20, 2000, ALPHA, beta=1e-12, **LOOKS)  # noqa: E731
    return false_rate(simulate(make, [norm.cdf(1.0)], reps), 0.5)


def rs_grid_at_boundary(reps: int) -> float:
    grid = [0.0, 0.25, 0.5, 0.75]
    make = lambda: RadiusTest(RS, grid, 20, 2000, ALPHA, beta=1e-12, **LOOKS)  # noqa: E731
    return false_rate(simulate(make, [norm.cdf(1.0)], reps, seed=1), 0.5)


def drs_test_at_boundary(reps: int) -> float:
    # aₗ = aᵣ = s/2: Σ a = s exactly; n0 = 500 puts the split near the truth, so each branch
    # sits near its own threshold (the hardest case for the negative control to miss).
    make = lambda: RadiusTest(DRS, 0.4, 500, 2000, ALPHA, beta=1e-12, **LOOKS)  # noqa: E731
    return false_rate(simulate(make, norm.cdf([DRS_SUM / 2] * 2), reps, seed=2), 0.4)


def rs_estimate(reps: int) -> float:
    # tol = 0: every look up to max_n, each one a chance for the running maximum to overshoot.
    make = lambda: RadiusEstimate(RS, 20, 2000, ALPHA, tol=0.0, **LOOKS)  # noqa: E731
    return false_rate(simulate(make, [0.9], reps, seed=3), 0.5 * norm.ppf(0.9))


def drs_estimate(reps: int) -> float:
    make = lambda: RadiusEstimate(DRS, 20, 2000, ALPHA, tol=0.0, **LOOKS)  # noqa: E731
    truth = (norm.ppf(0.9) + norm.ppf(0.8)) / math.hypot(1 / 0.5, 1 / 0.35)
    return false_rate(simulate(make, [0.9, 0.8], reps, seed=4), truth)


SIMULATIONS = [
    (rs_test_at_boundary, 400),
    (rs_grid_at_boundary, 400),
    (drs_test_at_boundary, 400),
    (rs_estimate, 300),
    (drs_estimate, 200),
]
IDS = ["rs-radius", "rs-grid", "drs-radius", "rs-estimate", "drs-estimate"]


@pytest.mark.parametrize(("simulation", "reps"), SIMULATIONS, ids=IDS)
def test_false_certificates_at_most_alpha_under_optional_stopping(simulation, reps) -> None:
    assert simulation(reps) <= binomial_ceiling(ALPHA, reps)


def clopper_pearson_lower(k, n, alpha, prior=None) -> np.ndarray:
    k, n = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    return np.where(k > 0, beta_law.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)


def clopper_pearson_test(k, n, p0, alternative="greater", prior=None) -> np.ndarray:
    """A stand-in for the mixture e-value: +inf where the fixed-n Clopper–Pearson bound at the
    full ALPHA clears p0 (so the test "rejects"), -inf elsewhere; no futility side."""
    k, n, p0 = np.broadcast_arrays(np.asarray(k), np.asarray(n), np.asarray(p0))
    if alternative == "less":
        return np.full(k.shape, -np.inf)
    return np.where(clopper_pearson_lower(k, n, ALPHA) > p0, np.inf, -np.inf)


@pytest.mark.parametrize(("simulation", "reps"), SIMULATIONS, ids=IDS)
def test_negative_control_repeated_clopper_pearson(monkeypatch, simulation, reps) -> None:
    """The same procedures with a fixed-n Clopper–Pearson bound recomputed at every look at the
    full alpha (per branch: alpha for the radius tests, alpha/P for the estimates) certify
    falsely far more often than alpha (0.4-0.65 here), and the check above catches it."""
    monkeypatch.setattr(at_radius, "mixture_log_e_value", clopper_pearson_test)
    monkeypatch.setattr(sequential, "mixture_lower_bound", clopper_pearson_lower)
    assert simulation(reps) > binomial_ceiling(ALPHA, reps)


# ----------------------------------------------------------------------------------------------
# End to end: the real noise path, base classifiers of known vote probabilities

END_TO_END_REPS = 150


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_end_to_end_false_certificates_at_most_alpha(method: str) -> None:
    if method == "rs":  # p = Φ(r/σ) at r = 0.5: the radius test's null holds with equality
        smoothed, radius_truth, test_truth = rs_pixel(norm.cdf(1.0)), 0.5, 0.5
    else:  # aₗ + aᵣ = s(0.4)
        smoothed = drs_pixel(norm.cdf(DRS_SUM / 2), norm.cdf(DRS_SUM / 2))
        radius_truth = test_truth = 0.4
    tests, estimates = [], []
    for rep in range(END_TO_END_REPS):
        kw = {"seed": rep, "stream": rep % 5, **LOOKS}
        tests.append(
            certify_radius(smoothed, IMAGE, test_truth, 100, 600, ALPHA, 512, beta=1e-9, **kw)
        )
        estimates.append(certify_sequential(smoothed, IMAGE, 20, 600, ALPHA, 512, tol=0, **kw))
    ceiling = binomial_ceiling(ALPHA, END_TO_END_REPS)
    assert false_rate(tests, test_truth) <= ceiling
    assert false_rate(estimates, radius_truth) <= ceiling
    # The estimates are not vacuous: most certify class 0 with some radius.
    assert np.mean([e.prediction == 0 for e in estimates]) > 0.5


def test_clear_answers_stop_early() -> None:
    confident, hopeless = rs_pixel(0.999), rs_pixel(0.6)
    fast = certify_radius(confident, IMAGE, [0.0, 0.5, 1.0], 32, 10**5, 0.001, 1000, seed=0)
    assert fast.outcomes == (ROBUST,) * 3 and fast.draws[0] < 2000 and fast.radius == 1.0
    slow = certify_radius(hopeless, IMAGE, [0.0, 0.5], 32, 10**5, 0.001, 1000, seed=0)
    assert slow.outcomes == (ROBUST, NOT_ROBUST) and slow.draws[0] < 20_000
    capped = certify_radius(rs_pixel(norm.cdf(1.02)), IMAGE, 0.5, 32, 500, 0.001, 1000, seed=0)
    assert capped.outcomes == (UNDECIDED,) and capped.draws == (500,)
    assert capped.prediction == ABSTAIN and capped.radius == 0.0


class AllNaN(nn.Module):
    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.full((v.shape[0], 2), math.nan)


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_no_selection_vote_abstains_without_estimation_draws(method: str) -> None:
    """Every logit NaN: no selection draw votes, and both procedures abstain at once, as the
    fixed-n certify does, instead of testing an arbitrary class."""
    if method == "rs":
        smoothed = SmoothedClassifier(AllNaN(), 2, 0.5)
    else:
        smoothed = DualSmoothedClassifier(AllNaN(), AllNaN(), 2, 0.35)
    with pytest.warns(RuntimeWarning, match="NaN"):
        assert smoothed.certify(IMAGE, 16, 1000, 0.01, 64, seed=0) == (ABSTAIN, 0.0)
    with pytest.warns(RuntimeWarning, match="NaN"):
        estimate = certify_sequential(smoothed, IMAGE, 16, 1000, 0.01, 64, seed=0)
    with pytest.warns(RuntimeWarning, match="NaN"):
        test = certify_radius(smoothed, IMAGE, [0.0, 0.5], 16, 1000, 0.01, 64, seed=0)
    assert (estimate.prediction, estimate.radius, sum(estimate.draws)) == (ABSTAIN, 0.0, 0)
    assert (test.prediction, test.radius, sum(test.draws)) == (ABSTAIN, 0.0, 0)
    assert test.outcomes == (UNDECIDED, UNDECIDED)


def test_certified_accuracy() -> None:
    results = [(0, 0.7), (1, 0.3), (ABSTAIN, 0.0), (2, 0.2)]
    np.testing.assert_allclose(
        certified_accuracy(results, [0, 1, 2, 0], [0.0, 0.25, 0.5]), [0.5, 0.5, 0.25]
    )


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="SmoothedClassifier or a DualSmoothedClassifier"):
        RadiusTest(object(), 0.5, 10, 100, 0.01)
    for radii in ([-0.1], [0.5, 0.25], [], [math.nan]):
        with pytest.raises(ValueError, match="radii must"):
            RadiusTest(RS, radii, 10, 100, 0.01)
    with pytest.raises(ValueError, match="growth must"):
        RadiusEstimate(RS, 10, 100, 0.01, growth=1.0)
    with pytest.raises(ValueError, match="tol must"):
        RadiusEstimate(RS, 10, 100, 0.01, tol=-1)
    with pytest.raises(ValueError, match="n0 must"):
        RadiusEstimate(RS, 0, 100, 0.01)
    with pytest.raises(ValueError, match="beta must be in the open interval"):
        RadiusTest(RS, 0.5, 10, 100, 0.01, beta=1.5)
    task = RadiusEstimate(RS, 10, 100, 0.01)
    with pytest.raises(ValueError, match=r"counts must have shape \(branches, classes\)"):
        task.observe(np.zeros((1, 3)))
    with pytest.raises(RuntimeError, match="before the task finished"):
        task.result()
