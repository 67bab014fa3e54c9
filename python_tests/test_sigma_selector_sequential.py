"""σ-selector, sequential CERTIFY (drs_ext/smoothing/sigma_selector_sequential.py); its
soundness simulations are in test_sigma_selector_sequential_soundness.py.

Oracles: quantize for the level cells; median.py's fixed-n order statistics for the direction
and strictness of each side's test; drs_ext.reference's noise for the counters; the fixed-n
method (SigmaSelectorClassifier.certify) on inputs where both must agree.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from test_sigma_selector import IMAGE, Constant, PixelSelector
from torch import nn

import drs_ext.smoothing.selector_level as selector_level
import drs_ext.smoothing.sigma_selector_sequential as seqsel
from drs_ext import SmoothedClassifier, reference
from drs_ext.median import (
    MEDIAN_CERTIFY_OFFSET,
    MEDIAN_PREDICT_OFFSET,
    MEDIAN_SELECTION_OFFSET,
    bounds_from_samples,
    order_statistic_bounds,
)
from drs_ext.smoothing.model_call import ModelCall
from drs_ext.smoothing.sampling import MAX_DRAWS, BranchSmoothing
from drs_ext.smoothing.sequential import certify_sequential, look_schedule
from drs_ext.smoothing.sigma_selector import SigmaSelectorClassifier, quantize
from drs_ext.smoothing.sigma_selector_sequential import (
    CERTIFIED,
    FUTILE,
    SelectorLevelTest,
    SelectorTask,
    certify_selector_packed,
    certify_selector_sequential,
    level_cells,
    level_midpoints,
)
from drs_ext.stats import mixture_rejects

LOOKS = {"first_look": 8, "growth": 1.5}
LEVELS = [0.25, 0.5, 1.0]  # midpoints 0.375, 0.75


class ConstantSelector(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.full((v.shape[0],), self.value)


class PixelThreshold(nn.Module):
    """Class 0 when pixel 0 exceeds t: at IMAGE under N(0, σ²) noise P(class 0) = Φ(−t/σ), and
    g_σ's radius is exactly σΦ⁻¹(P(class 0)) (a half-space)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        margin = v[:, 0, 0, 0] - self.threshold
        return torch.stack([margin, -margin], dim=1)


def clopper_pearson_rejects(k, n, p0, alpha, alternative="greater", prior=None) -> bool:
    """The fixed-n one-sided binomial test at the full alpha (the Clopper–Pearson bound clears
    p0), which is median.py's order-statistic certificate at this n: the negative control."""
    if alternative == "greater":  # H0: p <= p0
        return bool(binom.sf(k - 1, n, p0) <= alpha)
    return bool(binom.cdf(k, n, p0) <= alpha)  # H0: p >= p0


def cell_votes(values: np.ndarray, levels=LEVELS) -> np.ndarray:
    """(1, L) the votes per level cell of selector outputs: the counts of quantize(values)."""
    return np.bincount(quantize(values, levels), minlength=len(levels))[None]


def feed(test: SelectorLevelTest, draw) -> seqsel.LevelResult:
    """Runs stage 1 with draw(num) as the selector's outputs."""
    while (wanted := test.request()) is not None:
        test.observe(cell_votes(draw(wanted.draws[0]), test.levels))
    return test.result()


# ----------------------------------------------------------------------------------------------
# The cells and the tests' directions


def test_midpoints_are_the_cells_of_quantize():
    levels = [0.1, 0.25, 0.3, 0.55, 1.0]
    m = level_midpoints(levels)
    for q, mid in enumerate(m):  # Q(m_q) = q (ties go down), the next float is in cell q + 1
        assert quantize(mid, levels) == q and quantize(np.nextafter(mid, 2.0), levels) == q + 1
    values = np.random.default_rng(0).uniform(-1, 2, 5000)
    edges = np.concatenate([[-np.inf], m, [np.inf]])
    cells = quantize(values, levels)
    assert np.all((edges[cells] < values) & (values <= edges[cells + 1]))


SAMPLE_SETS = {
    "normal-inside": lambda rng, n: rng.normal(0.55, 0.05, n),
    "normal-wide": lambda rng, n: rng.normal(0.55, 0.2, n),
    "near-lower-edge": lambda rng, n: rng.normal(0.45, 0.06, n),
    "atoms-on-midpoints": lambda rng, n: rng.choice([0.375, 0.5, 0.75], n, p=[0.05, 0.8, 0.15]),
    "atoms-above-midpoints": lambda rng, n: rng.choice(
        np.nextafter([0.375, 0.75], 2.0), n, p=[0.9, 0.1]
    ),
}


def one_look_level(values: np.ndarray, q: int, budget, noise, a_l, a_u) -> int:
    """Stage 1 with selection draws that pick q and a single look at `values`."""
    n = len(values)
    test = SelectorLevelTest(LEVELS, budget, noise, 3, n, a_l, a_u, first_look=n, beta=1e-12)
    test.observe(cell_votes(np.full(3, LEVELS[q])))  # the levels lie in their own cells
    test.observe(cell_votes(values))
    return test.result().level


@pytest.mark.parametrize("name", list(SAMPLE_SETS))
def test_one_look_agrees_with_the_order_statistics(monkeypatch, name):
    """At one look of n draws the sides' tests are median.py's condition at this n: with the
    fixed-n binomial test in place of the mixture, stage 1 certifies q exactly when
    Q(y₍k_l₎) = Q(y₍k_u₎) = q; the mixture test (anytime-valid, so stricter) certifies only
    then. This pins the directions and the strict/non-strict cases to median.py's."""
    rng, config = np.random.default_rng(1), (0.1, 0.5, 0.05, 0.1)  # D, s, α_l, α_u
    for n in (60, 200, 1000):
        k_l, k_u = order_statistic_bounds(n, *config)
        for _ in range(20):
            values = SAMPLE_SETS[name](rng, n)
            ends = bounds_from_samples(values, k_l, k_u)
            low, high = quantize([ends.lower, ends.upper], LEVELS).tolist()
            for q in range(len(LEVELS)):
                mixture = one_look_level(values, q, *config) == q
                with monkeypatch.context() as patch:
                    patch.setattr(selector_level, "mixture_rejects", clopper_pearson_rejects)
                    fixed = one_look_level(values, q, *config) == q
                assert fixed == (low == high == q), (n, q, ends)
                assert not mixture or fixed


# ----------------------------------------------------------------------------------------------
# Agreement with the fixed-n method; the draws it takes


def test_easy_input_certifies_its_level_with_far_fewer_draws():
    """The selector's output concentrated well inside level 0.25's cell (F(0.625) = Φ(2.5)):
    the fixed-n method with the documented N_h = 1000 and the sequential one certify the same
    level and class, the sequential one with under a tenth of the selector draws and, thanks to
    the cap D, a few hundred classifier draws instead of 100,000, to within tol of the same
    radius D."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.0),
        PixelThreshold(-0.5),
        2,
        [0.25, 1.0],
        selector_noise=0.25,
        budget=0.25,
    )
    fixed = model.certify_details(IMAGE, 100, 100_000, 0.001, 4096, lam=0.5, n_h=1000, seed=3)
    seq = certify_selector_sequential(model, IMAGE, 100, 100_000, 0.001, 4096, lam=0.5, seed=3)
    assert fixed.sigma == seq.sigma == 0.25 and fixed.prediction == seq.prediction == 0
    assert seq.selector.outcome == CERTIFIED and seq.selector_forward_passes < 100
    assert fixed.radius == 0.25 and 0.25 - 0.01 <= seq.radius <= 0.25  # D, to within tol
    assert seq.classifier_forward_passes < 1000
    assert seq.forward_passes == seq.selector_forward_passes + seq.classifier_forward_passes


def test_median_on_a_midpoint_abstains_early():
    """G_½ = 0.375, the midpoint of (0.25, 0.5): σ changes inside every ball, so no level can be
    certified; the futility test stops it long before max_n_h, and the fixed-n method abstains
    too."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.375), Constant(), 2, [0.25, 0.5], selector_noise=0.25, budget=0.25
    )
    for stream in range(5):
        seq = certify_selector_sequential(
            model, IMAGE, 10, 100, 0.001, 4096, lam=0.5, max_n_h=10_000, stream=stream
        )
        assert seq.prediction == -1 and seq.radius == 0.0 and math.isnan(seq.sigma)
        assert seq.selector.outcome == FUTILE and seq.selector.draws < 500
        assert seq.classifier_forward_passes == 0 and math.isnan(seq.radius_c)
        fixed = model.certify_details(IMAGE, 10, 100, 0.001, 4096, lam=0.5, stream=stream)
        assert fixed.prediction == -1


@pytest.mark.parametrize(("value", "level"), [(0.375, 0.25), (0.37500003, 0.5)])
def test_an_output_on_the_midpoint_goes_to_the_lower_level(value, level):
    """h ≡ 0.375 (exact in float32): σ = Q(0.375) = 0.25 everywhere, and stage 1 certifies it
    (values equal to m_q count as <= m_q); the next float32 up belongs to 0.5."""
    model = SigmaSelectorClassifier(
        ConstantSelector(value), Constant(), 2, [0.25, 0.5], selector_noise=0.25, budget=0.25
    )
    cert = certify_selector_sequential(model, IMAGE, 10, 1000, 0.001, 4096, lam=0.5)
    assert cert.sigma == level == model.levels[int(quantize(np.float32(value), model.levels))]
    assert cert.prediction == 0 and cert.selector.outcome == CERTIFIED


def test_one_level_needs_no_selector_draws():
    model = SigmaSelectorClassifier(
        PixelSelector(0.0), Constant(), 2, [0.5], selector_noise=0.25, budget=0.25
    )
    cert = certify_selector_sequential(model, IMAGE, 10, 1000, 0.001, 4096, lam=0.5)
    assert cert.selector_forward_passes == 0 and cert.sigma == 0.5 and cert.prediction == 0


def test_stages_follow_their_draws():
    """Stage 1 recomputed by hand from drs_ext.reference's noise at the documented sample
    indices (selection from MEDIAN_SELECTION_OFFSET, tests from MEDIAN_CERTIFY_OFFSET, look by
    look), and stage 2 equal to certify_sequential at α_c with cap D on the certified level."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.6), PixelThreshold(-1.0), 2, LEVELS, selector_noise=0.25, budget=0.1
    )
    seed, stream, n0_h, max_n_h, alpha = 7, 3, 12, 3000, 0.01
    cert = certify_selector_sequential(
        model,
        IMAGE,
        30,
        5000,
        alpha,
        97,
        lam=0.5,
        n0_h=n0_h,
        max_n_h=max_n_h,
        seed=seed,
        stream=stream,
        **LOOKS,
    )

    def outputs(offset: int, num: int) -> np.ndarray:
        z = reference.standard_normals(seed, stream, 0, torch.arange(num) + offset, 2)
        return (0.6 + 0.25 * z[:, 1]).numpy().astype(np.float64)

    a_l, a_u, a_c = model.alphas(alpha)
    p_low, p_high = norm.cdf(-0.1 / 0.25), norm.cdf(0.1 / 0.25)
    lower_median = np.sort(outputs(MEDIAN_SELECTION_OFFSET, n0_h))[(n0_h + 1) // 2 - 1]
    q = int(quantize(lower_median, LEVELS))
    m = level_midpoints(LEVELS)
    y = outputs(MEDIAN_CERTIFY_OFFSET, max_n_h)
    lower_ok = upper_ok = False
    for n in look_schedule(max_n_h, **LOOKS):
        if not lower_ok:  # each side's count stops at the look where its test rejects
            k_l = int((y[:n] <= m[q - 1]).sum())
            lower_ok = mixture_rejects(k_l, n, p_low, a_l, "less")
        if not upper_ok:
            k_u = int((y[:n] <= m[q]).sum())
            upper_ok = mixture_rejects(k_u, n, p_high, a_u, "greater")
        if lower_ok and upper_ok:
            break
    assert q == 1 and lower_ok and upper_ok
    assert cert.selector.candidate == cert.selector.level == q and cert.selector.draws == n
    assert (cert.selector.below_lower, cert.selector.below_upper) == (k_l, k_u)
    assert cert.selector.n0 == n0_h and cert.sigma == LEVELS[q]
    direct = certify_sequential(
        model.smoothed_at(q), IMAGE, 30, 5000, a_c, 97, cap=0.1, seed=seed, stream=stream, **LOOKS
    )
    assert (cert.prediction, cert.radius) == (direct.prediction, min(0.1, direct.radius))
    assert cert.classifier_draws == direct.draws and cert.classifier_n0 == 30
    assert cert.radius_c == direct.radius and cert.prediction == 0


def test_level_cells_vote_the_cells_of_the_fixed_n_samples():
    """The selector's votes per level cell are the cells of the very outputs the fixed-n method
    draws (SigmaSelectorClassifier.selector_samples, the same noise at the same indices)."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.55), Constant(), 2, LEVELS, selector_noise=0.3, budget=0.1
    )
    cells = level_cells(model, 0.5)
    assert level_cells(model, 0.5) is cells and level_cells(model, 0.25) is not cells
    for offset, num in ((MEDIAN_SELECTION_OFFSET, 37), (MEDIAN_CERTIFY_OFFSET + 5, 1000)):
        votes = cells.sample_counts(IMAGE, [num], 64, seed=3, stream=2, offset=offset)
        values = model.selector_samples(IMAGE, num, 0.5, 64, seed=3, stream=2, offset=offset)
        assert np.array_equal(votes, cell_votes(values)) and votes[0].min() > 0


def shifted(a: float) -> torch.Tensor:
    """IMAGE with the selector's pixel at a: h's outputs centre on 0.0 + a."""
    x = IMAGE.clone()
    x[0, 0, 1] = a
    return x


@pytest.mark.parametrize("batch", [7, 100, 5000])
def test_packed_equals_one_image_at_a_time(batch):
    """Images certified at different levels (and one whose level test fails) share the model
    batches, selector and classifier stages mixed, and each gets its certificate alone."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.0), PixelThreshold(-0.3), 2, LEVELS, selector_noise=0.1, budget=0.05
    )
    images = [shifted(a) for a in (0.25, 0.55, 1.0, 0.375, 0.6, 0.1)]
    streams = [11, 4, 9, 0, 2, 7]
    new_task = functools.partial(SelectorTask, model, 20, 3000, 0.01, lam=0.5, tol=0.02, **LOOKS)
    packed = list(certify_selector_packed(model, images, new_task, batch, seed=5, streams=streams))
    alone = [
        certify_selector_sequential(
            model, x, 20, 3000, 0.01, 64, lam=0.5, tol=0.02, seed=5, stream=s, **LOOKS
        )
        for x, s in zip(images, streams, strict=True)
    ]
    assert [p.result for p in packed] == alone and [p.stream for p in packed] == streams
    assert {c.sigma for c in alone if c.selector.outcome == CERTIFIED} == set(LEVELS)
    assert any(math.isnan(c.sigma) for c in alone)  # the one on a midpoint


def test_sample_ranges_are_apart():
    assert MEDIAN_PREDICT_OFFSET + MAX_DRAWS <= MEDIAN_SELECTION_OFFSET
    assert MEDIAN_SELECTION_OFFSET + MAX_DRAWS <= 2**56


# ----------------------------------------------------------------------------------------------
# Reproducibility and errors


def test_reproducible_from_seed_and_stream():
    model = SigmaSelectorClassifier(
        PixelSelector(0.55), PixelThreshold(-0.2), 2, LEVELS, selector_noise=0.25, budget=0.1
    )
    args = (model, IMAGE, 20, 2000, 0.01)
    a = certify_selector_sequential(*args, 64, lam=0.5, seed=4, stream=2)
    b = certify_selector_sequential(*args, 1000, lam=0.5, seed=4, stream=2)
    assert a == b and a.selector.outcome == CERTIFIED and a.lam == 0.5 and a.budget == 0.1
    others = [certify_selector_sequential(*args, 1000, lam=0.5, seed=4, stream=s) for s in (3, 4)]
    assert any(o.selector != a.selector for o in others)  # other streams, other draws
    torch.manual_seed(11)
    c = certify_selector_sequential(*args, 64, lam=0.5, seed=None)
    torch.manual_seed(11)
    assert certify_selector_sequential(*args, 500, lam=0.5, seed=None) == c


class NoCalls(nn.Module):
    def forward(self, v, lam):
        raise AssertionError("drew selector samples before checking the arguments")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lam=1.5), ValueError, r"lam \(the selector's λ\) must be a number in \[0, 1\]"),
        (dict(alpha=0.0), ValueError, "alpha must be in the open interval"),
        (dict(n0=0), ValueError, "n0 must be an integer >= 1"),
        (dict(max_n=-5), ValueError, "max_n must be an integer >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
        (dict(tol=-0.1), ValueError, "tol must be a real number >= 0"),
        (dict(n0_h=0), ValueError, r"n0_h \(selection draws of the selector\) must be"),
        (dict(max_n_h=1.5), ValueError, r"max_n_h \(test draws of the selector\) must be"),
        (dict(beta=1.0), ValueError, r"beta must be a real number in the open interval \(0, 1\)"),
        (dict(growth=1.0), ValueError, "growth must be a finite real number > 1"),
        (dict(first_look=0), ValueError, "first_look must be an integer >= 1"),
        (dict(prior="beta"), ValueError, "prior must be a drs_ext.stats.MixturePrior"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    model = SigmaSelectorClassifier(
        NoCalls(), Constant(), 2, LEVELS, selector_noise=0.25, budget=0.25
    )
    args = dict(model=model, x=IMAGE, n0=10, max_n=100, alpha=0.01, batch_size=64, lam=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        certify_selector_sequential(**args)


def test_other_errors():
    with pytest.raises(TypeError, match="model must be a SigmaSelectorClassifier, got Smoothed"):
        certify_selector_sequential(
            SmoothedClassifier(Constant(), 2, 0.5), IMAGE, 10, 100, 0.01, 64, lam=0.5
        )

    def not_rs(level):  # a smoothed classifier that is neither RS nor DRS
        return BranchSmoothing([Constant()], 2, [level], "none", "neighbors", ModelCall(), False)

    model = SigmaSelectorClassifier(
        PixelSelector(0.0), not_rs, 2, [0.25, 1.0], selector_noise=0.25, budget=0.25
    )
    with pytest.raises(TypeError, match="SmoothedClassifier or a DualSmoothedClassifier"):
        certify_selector_sequential(model, IMAGE, 10, 100, 0.01, 64, lam=0.5)
    for kwargs, match in [
        (dict(levels=[0.5, 0.25]), "levels must be strictly increasing"),
        (dict(levels=[]), "levels must be a non-empty sequence"),
        (dict(budget=0.0), r"budget \(D\) must be finite and > 0"),
        (dict(noise=-1.0), r"noise \(s\) must be finite and > 0"),
        (dict(budget=2.5), r"budget \(D\) / noise \(s\) = 10 is too large"),
        (dict(alpha_lower=0.0), "alpha_lower must be a real number in the open interval"),
        (dict(alpha_upper=True), "alpha_upper must be a real number in the open interval"),
    ]:
        args = dict(levels=LEVELS, budget=0.25, noise=0.25, n0=4, max_n=50)
        args.update(alpha_lower=0.01, alpha_upper=0.01)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            SelectorLevelTest(**args)
    test = SelectorLevelTest(LEVELS, 0.25, 0.25, 4, 50, 0.01, 0.01)
    with pytest.raises(RuntimeError, match="before the test finished"):
        test.result()
    for counts in ([[1, 2, 2]], [[1.0, 3.0, 0.0]], [[5, -1, 0]], [[4, 0]], [4, 0, 0]):
        with pytest.raises(ValueError, match="counts must be the votes per level cell of the 4"):
            test.observe(np.array(counts))
    model = SigmaSelectorClassifier(
        ConstantSelector(math.nan), Constant(), 2, LEVELS, selector_noise=0.25, budget=0.25
    )
    with pytest.raises(ValueError, match="the selector .* gave a non-finite output"):
        certify_selector_sequential(model, IMAGE, 10, 100, 0.01, 64, lam=0.5)
