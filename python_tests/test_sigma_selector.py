"""σ-selector (drs_ext/smoothing/sigma_selector.py): the quantiser, soundness by simulation
with selectors and classifiers of known behaviour (and the negative controls each check must
catch), the errors. Its training (drs_ext/train/sigma_selector.py, recipes/universal.py):
the loss against the closed-form KL, resume, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import binomial_ceiling
from scipy.stats import kstest
from torch import nn

import drs_ext.smoothing.sigma_selector as sel_module
from drs_ext import DualSmoothedClassifier, reference
from drs_ext.io.data import TensorDataset
from drs_ext.models import SigmaSelectorCNN, build_model
from drs_ext.smoothing.sigma_selector import SigmaSelectorClassifier, quantize
from drs_ext.train import NoisyBranch, TrainConfig
from drs_ext.train.recipes.universal import UniversalSigma
from drs_ext.train.sigma_selector import (
    SelectorObjective,
    SelectorTrainer,
    gaussian_kl,
    lambda_group_index,
    load_selector,
    selector_loss,
)

IMAGE = torch.zeros(1, 1, 2)  # pixel 0 for the classifier, pixel 1 for the selector


class PixelSelector(nn.Module):
    """h(v, λ) = a + v[pixel 1]: under N(0, s²) noise its median at x' is a + x'₁, so the
    medians over the D-ball around IMAGE fill [a − D, a + D]."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return self.a + v[:, 0, 0, 1]


class IntervalVote(nn.Module):
    """Class 0 iff |v[pixel 0]| < 1/2. At IMAGE under N(0, σ²) noise P(class 0) = 2Φ(1/(2σ)) − 1:
    0.954 at σ = 0.25 (g votes 0), 0.383 at σ = 1 (g votes 1)."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        d = v[:, 0, 0, 0].abs()
        return torch.stack([0.5 - d, d - 0.5], dim=1)


class Constant(nn.Module):
    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0]).expand(v.shape[0], 2)


def test_quantize_is_nearest_level_with_ties_down_and_clips():
    levels = [0.25, 0.5, 1.0]
    values = np.linspace(-1, 2, 3001)
    dist = np.abs(values[:, None] - np.array(levels)[None])
    want = np.argmin(dist + 1e-12 * np.arange(3)[None], axis=1)  # ties: the lower level
    assert (quantize(values, levels) == want).all()
    assert quantize([0.375, 0.75, 0.3751], levels).tolist() == [0, 1, 1]
    assert (np.diff(quantize(values, levels)) >= 0).all()


def sigma_stage_false_rate(reps: int, monkeypatch=None) -> float:
    """The medians of h over the D-ball fill [0.374, 0.874], across the threshold 0.375 of the
    levels (0.25, 0.5): σ is not constant there, so every σ certificate is false. Only the
    lower end can fail (y₍k_u₎ below 0.375 lies 2D away from its quantile), so the rate is at
    most α_l = 0.05."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.624), Constant(), 2, [0.25, 0.5], selector_noise=0.25, budget=0.25
    )
    false = 0
    for rep in range(reps):
        cert = model.certify_details(IMAGE, 1, 1, 0.2, 100, lam=0.5, n_h=30, stream=rep)
        false += not math.isnan(cert.sigma)
    return false / reps


def test_sigma_certificate_across_a_threshold_is_false_at_most_alpha_l():
    assert sigma_stage_false_rate(1000) <= binomial_ceiling(0.05, 1000)


def test_negative_control_off_by_one_ranks_are_caught(monkeypatch):
    real = sel_module.bounds_from_samples

    def zero_based(samples, k_l, k_u):  # sorted[k] with the 1-based k
        return real(samples, min(k_l + 1, len(samples)), min(k_u + 1, len(samples)))

    monkeypatch.setattr(sel_module, "bounds_from_samples", zero_based)
    assert sigma_stage_false_rate(1000) > binomial_ceiling(0.05, 1000)  # about 0.124


def test_radius_is_capped_by_the_budget_where_sigma_changes():
    """h's medians reach the threshold 0.625 of the levels (0.25, 1.0) after moving pixel 1 by
    0.225; there σ becomes 1.0 and g votes 1 (IntervalVote). So g's true radius is at most
    0.225, although g_0.25 alone is certified to about 0.37: min(D, R_c) with D = 0.1 stays
    sound, R_c alone (the negative control) is false. (PREDICT checks g's vote at pixel 1 = 0.4,
    where the selector's median interval lies clearly past the threshold.)"""
    model = SigmaSelectorClassifier(
        PixelSelector(0.4), IntervalVote(), 2, [0.25, 1.0], selector_noise=0.25, budget=0.1
    )
    beyond = IMAGE.clone()
    beyond[0, 0, 1] = 0.4
    assert model.predict(beyond, 500, 0.01, 1000, lam=0.0, n_h=200) == 1
    certs = [
        model.certify_details(IMAGE, 20, 500, 0.01, 1000, lam=0.0, n_h=400, stream=s)
        for s in range(20)
    ]
    assert all(c.prediction == 0 and c.sigma == 0.25 for c in certs)
    assert all(c.radius <= 0.1 for c in certs)
    assert all(c.radius_c > 0.225 for c in certs)
    assert all(c.sigma_lower <= c.sigma_median <= c.sigma_upper for c in certs)


def predict_false_rate(reps: int) -> float:
    """σ(IMAGE) = Q(0.615) = 0.25 (the threshold of (0.25, 1.0) is 0.625), where g votes 0;
    the sample median of h lands above the threshold about 40 % of the time, where g_1.0 votes
    1. PREDICT returns 1 at most α = 0.1 of the time."""
    model = SigmaSelectorClassifier(
        PixelSelector(0.615), IntervalVote(), 2, [0.25, 1.0], selector_noise=0.25, budget=0.25
    )
    wrong = sum(
        model.predict(IMAGE, 100, 0.1, 1000, lam=0.5, n_h=50, stream=rep) == 1
        for rep in range(reps)
    )
    return wrong / reps


def test_predict_is_wrong_at_most_alpha():
    assert predict_false_rate(400) <= binomial_ceiling(0.1, 400)


def test_negative_control_predict_at_the_sample_median_is_caught(monkeypatch):
    monkeypatch.setattr(
        sel_module, "median_interval_indices", lambda n, a_l, a_u: ((n + 1) // 2, (n + 1) // 2)
    )
    assert predict_false_rate(400) > binomial_ceiling(0.1, 400)


def test_certify_is_reproducible_and_splits_alpha():
    model = SigmaSelectorClassifier(
        PixelSelector(0.3), IntervalVote(), 2, [0.25, 1.0], selector_noise=0.25, budget=0.2
    )
    a = model.certify_details(IMAGE, 20, 200, 0.01, 64, lam=0.3, seed=4, stream=2)
    b = model.certify_details(IMAGE, 20, 200, 0.01, 1000, lam=0.3, seed=4, stream=2)
    assert a == b and a.lam == 0.3 and a.budget == 0.2
    assert model.alphas(0.01) == pytest.approx((0.0025, 0.0025, 0.005))
    assert sum(model.alphas(0.01)) == pytest.approx(0.01)


@pytest.mark.parametrize("lam", [-0.1, 1.5, math.nan, True, "0.5"])
def test_lambda_outside_unit_interval_is_an_error(lam):
    model = SigmaSelectorClassifier(
        PixelSelector(0.3), IntervalVote(), 2, [0.25, 1.0], selector_noise=0.25, budget=0.2
    )
    with pytest.raises(ValueError, match=r"lam \(the selector's λ\) must be a number in \[0, 1\]"):
        model.certify(IMAGE, 10, 10, 0.1, 10, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        model.predict(IMAGE, 10, 0.1, 10, lam=lam)


def test_construction_and_call_errors():
    def make(**kw):
        args = dict(selector_noise=0.25, budget=0.25)
        args.update(kw)
        levels = args.pop("levels", [0.25, 1.0])
        return SigmaSelectorClassifier(PixelSelector(0.3), IntervalVote(), 2, levels, **args)

    for budget in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="budget \\(D\\) must be"):
            make(budget=budget)
    for noise in (0.0, -0.5):
        with pytest.raises(ValueError, match="selector_noise \\(s\\)"):
            make(selector_noise=noise)
    with pytest.raises(ValueError, match="strictly increasing"):
        make(levels=[0.5, 0.25])
    with pytest.raises(ValueError, match="selector_share"):
        make(selector_share=1.0)
    with pytest.raises(ValueError, match="the smallest n that works is 49"):
        make().certify(IMAGE, 10, 10, 0.001, 10, lam=0.5, n_h=40)

    class NanSelector(nn.Module):
        def forward(self, v, lam):
            return torch.full((v.shape[0],), math.nan)

    broken = SigmaSelectorClassifier(
        NanSelector(), IntervalVote(), 2, [0.25], selector_noise=0.25, budget=0.25
    )
    with pytest.raises(ValueError, match="the selector \\(its σ\\) returned 100 non-finite"):
        broken.certify(IMAGE, 10, 10, 0.1, 100, lam=0.5)


# -- training ----------------------------------------------------------------------------------


def tiny_data(n: int = 24) -> TensorDataset:
    gen = torch.Generator().manual_seed(3)
    y = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 1, 8, 8, generator=gen)
    for c in range(3):
        x[y == c, :, 2 * c : 2 * c + 3] += 0.8
    return TensorDataset(x.clamp(0, 1), y)


class SpreadSelector(nn.Module):
    """σ = 0.1 + 0.9 sigmoid(w·x + λ): spread over the images, differentiable in w."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64) * 0.3)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.1 + 0.9 * torch.sigmoid(x.flatten(1) @ self.w + lam)


def test_selector_loss_is_cross_entropy_plus_lambda_times_the_kl_of_each_group():
    torch.manual_seed(0)
    selector = SpreadSelector()
    classifier = build_model("digits_cnn", num_classes=3, in_channels=1, arch_kwargs={"width": 4})
    classifier.eval()
    data = tiny_data(10)
    x, y = data.images, data.labels
    noise = torch.randn(10, 2, 1, 8, 8)
    objective = SelectorObjective(target_mean=0.4, target_std=0.2, num_noise=2)
    lam = torch.tensor([0.3, 0.9])
    loss, parts = selector_loss(selector, classifier, x, y, lam, noise, objective)
    group = lambda_group_index(10, 2)
    assert group.tolist() == [0] * 5 + [1] * 5
    sigma = selector(x, lam[group]).detach()
    views = x[:, None] + sigma.view(-1, 1, 1, 1, 1) * noise
    logits = classifier(views.flatten(0, 1)).view(10, 2, 3).detach()
    ce = torch.stack([nn.functional.cross_entropy(logits[:, j], y) for j in range(2)]).mean()
    kl = []
    for g in range(2):
        s = sigma[group == g]
        fit = torch.distributions.Normal(s.mean(), s.var(unbiased=False).sqrt())
        kl.append(torch.distributions.kl_divergence(fit, torch.distributions.Normal(0.4, 0.2)))
    want = ce + 0.5 * (0.3 * kl[0] + 0.9 * kl[1])
    assert float(sigma[:5].var()) > 1e-3 and float(sigma[5:].var()) > 1e-3  # far above the floor
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-3)
    assert float(gaussian_kl(s.mean(), s.var(unbiased=False), 0.4, 0.2)) == pytest.approx(
        float(kl[1]), rel=1e-5
    )
    # With λ = 0 the loss is the cross-entropy alone, and it reaches the selector through σ.
    ce_only, parts = selector_loss(selector, classifier, x, y, torch.zeros(2), noise, objective)
    assert float(ce_only.detach()) == pytest.approx(float(parts["ce"].detach()), rel=1e-6)
    ce_only.backward()
    assert selector.w.grad is not None and float(selector.w.grad.abs().sum()) > 0


def make_trainer(path, epochs: int) -> SelectorTrainer:
    torch.manual_seed(0)
    classifier = build_model("digits_cnn", num_classes=3, in_channels=1, arch_kwargs={"width": 4})
    kwargs = dict(in_channels=1, width=4, sigma_min=0.1, sigma_max=1.0, hidden=8)
    config = TrainConfig(
        epochs=epochs, batch_size=8, lr=1e-2, optimizer="adam", milestones=[1], progress=False
    )
    return SelectorTrainer(
        SigmaSelectorCNN(**kwargs),
        classifier,
        tiny_data(),
        config,
        path,
        arch_kwargs=kwargs,
        classifier_info={"sigma_range": [0.1, 1.0]},
    )


def test_selector_trainer_resume_equals_an_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a.pt", 2)
    straight.fit()
    make_trainer(tmp_path / "b.pt", 1).fit()
    resumed = make_trainer(tmp_path / "b.pt", 2)
    resumed.fit(resume=True)
    for key, value in straight.selector.state_dict().items():
        assert torch.equal(value, resumed.selector.state_dict()[key]), key
    drop = [{k: v for k, v in row.items() if k != "seconds"} for row in straight.log]
    assert drop == [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.log]
    assert all(p.requires_grad for p in straight.classifier.parameters())  # unfrozen after fit
    with pytest.raises(FileExistsError, match="resume"):
        make_trainer(tmp_path / "a.pt", 2).fit()
    loaded, info = load_selector(tmp_path / "a.pt")
    x = tiny_data().images
    assert torch.equal(loaded(x, 0.5), straight.selector.eval()(x, 0.5))
    assert info["classifier"] == {"sigma_range": [0.1, 1.0]}
    torch.save({"format": "other"}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not a σ-selector checkpoint"):
        load_selector(tmp_path / "c.pt")


def test_universal_sigma_draws_uniform_sigmas_and_whole_image_views():
    recipe = UniversalSigma(0.2, 0.8)
    branch = NoisyBranch(nn.Identity(), 0.5, seed=1)
    sigmas = recipe.sample_sigmas(branch, 2000, torch.device("cpu")).double().numpy()
    assert kstest((sigmas - 0.2) / 0.6, "uniform").pvalue > 1e-3
    x = torch.rand(4, 1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    branch = NoisyBranch(model, 0.5, seed=1)
    loss, logits = recipe(branch, x, torch.tensor([0, 1, 2, 0]))
    assert logits.shape == (4, 1, 3) and torch.isfinite(loss)
    assert branch.noise_offset == 2  # one draw for the σ, one for the views
    # A DRS branch: its own filled views, at the image's σ (the op's per-image σ as the oracle).
    seen = []
    branch = NoisyBranch(lambda v: seen.append(v) or model(v), 0.5, partition="diag", branch=1)
    branch.seed = 7
    recipe(branch, x, torch.zeros(4, dtype=torch.long))
    probe = NoisyBranch(nn.Identity(), 0.5, partition="diag", branch=1)
    probe.seed = 7
    sigma = recipe.sample_sigmas(probe, 4, torch.device("cpu"))
    want = reference.noisy_views(
        x, sigma, num=1, seed=7, offset=1, stream=torch.arange(4), partition="diag"
    )[:, 1, 0]
    torch.testing.assert_close(seen[0], want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="0 < sigma_min <= sigma_max"):
        UniversalSigma(0.5, 0.2)


def test_a_factory_supplies_the_smoothed_classifier_of_each_level():
    """E.g. a DRS pair at level/√2 per branch (Xia et al.'s pairing), built once per level."""
    built = []

    def drs_at(level: float) -> DualSmoothedClassifier:
        built.append(level)
        return DualSmoothedClassifier(IntervalVote(), IntervalVote(), 2, level / math.sqrt(2))

    model = SigmaSelectorClassifier(
        PixelSelector(0.3), drs_at, 2, [0.25, 1.0], selector_noise=0.25, budget=0.1
    )
    for stream in range(3):
        cert = model.certify_details(IMAGE, 20, 200, 0.01, 1000, lam=0.5, stream=stream)
        assert cert.sigma == 0.25 and 0 <= cert.radius <= 0.1
    assert built == [0.25]
    wrong = SigmaSelectorClassifier(
        PixelSelector(0.3), lambda level: "rs", 2, [0.25], selector_noise=0.25, budget=0.1
    )
    with pytest.raises(TypeError, match="not a smoothed classifier"):
        wrong.certify(IMAGE, 10, 10, 0.1, 100, lam=0.5)
