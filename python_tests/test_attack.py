"""Attack evaluation (drs_ext/attack.py): PGD against closed-form geometry, the soft smoothed
classifiers against drs_ext.reference, gradients through the σ-selector, the errors, and on
small models trained on the bundled digits: no attack beats a certificate of the same model
and image (with an inflated certificate as the negative control the check must catch)."""

from __future__ import annotations

import functools
import math
import tempfile

import pytest
import torch
from torch import nn

from drs_ext import DualSmoothedClassifier, SmoothedClassifier, reference
from drs_ext.attack import (
    RoutedTarget,
    SelectorTarget,
    SmoothedTarget,
    accuracy_by_epsilon,
    attack_contradictions,
    evaluate_attack,
    pgd_attack,
    soft_probabilities,
)
from drs_ext.io.checkpoint import BranchSpec
from drs_ext.io.data import load_dataset
from drs_ext.models import SigmaSelectorCNN
from drs_ext.smoothing.sigma_routing import SigmaRoutedClassifier
from drs_ext.smoothing.sigma_selector import SigmaSelectorClassifier
from drs_ext.train import TrainConfig, Trainer
from drs_ext.train.recipes.universal import UniversalSigma
from drs_ext.train.sigma_selector import SelectorTrainer


class LinearBinary(nn.Module):
    """Class 0 iff w·v + b > 0. Smoothed at any σ it is the same half-space classifier, whose
    distance to the boundary from x is (w·x + b)/‖w‖."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        z = (v * self.w).flatten(1).sum(dim=1) + self.b
        return torch.stack([z, -z], dim=1)


def linear_case():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 4, generator=gen)
    x = torch.rand(1, 1, 4, 4, generator=gen)
    b = 0.6 * float(w.norm()) - float((w * x[0]).sum())  # x lies 0.6 from the boundary
    return LinearBinary(w, b), x, w


def test_pgd_on_a_half_space_steps_straight_at_the_boundary():
    model, x, w = linear_case()
    target = SmoothedTarget(SmoothedClassifier(model, 2, 0.25), n=100, alpha=0.01)
    x_adv = pgd_attack(target, x, torch.tensor([0]), 0.4, steps=5, clamp=None)
    delta = (x_adv - x).flatten()
    assert float(delta.norm()) == pytest.approx(0.4, rel=1e-5)
    cosine = float(delta @ -w.flatten()) / (float(delta.norm()) * float(w.norm()))
    assert cosine > 0.9999


def test_attacks_beyond_the_true_radius_succeed_and_never_beat_a_certificate():
    model, x, _ = linear_case()
    smoothed = SmoothedClassifier(model, 2, 0.25)
    cls, radius = smoothed.certify(x[0], 100, 1000, 0.001, 1000, stream=0)
    assert cls == 0 and 0 < radius <= 0.6
    target = SmoothedTarget(smoothed, n=1000, alpha=0.001)
    rows = evaluate_attack(target, x, torch.tensor([0]), [0.3, 0.9], steps=5, clamp=None)
    assert [(r.epsilon, r.predict) for r in rows] == [(0.0, 0), (0.3, 0), (0.9, 1)]
    assert accuracy_by_epsilon(rows) == {0.0: 1.0, 0.3: 1.0, 0.9: 0.0}
    assert attack_contradictions(rows, {0: (cls, radius)}) == []
    # Negative control: a certificate beyond the true radius 0.6 is contradicted.
    found = attack_contradictions(rows, {0: (cls, 1.0)})
    assert [(row.epsilon, c, r) for row, c, r in found] == [(0.9, 0, 1.0)]


def test_drs_soft_classifier_is_the_mean_of_the_branches_expected_softmax():
    torch.manual_seed(1)
    left, right = (
        nn.Sequential(nn.Flatten(), nn.Linear(32, 3)),
        nn.Sequential(nn.Flatten(), nn.Linear(32, 3)),
    )
    drs = DualSmoothedClassifier(left, right, 3, (0.3, 0.5), fill="neighbors")
    x = torch.rand(2, 2, 4, 4, requires_grad=True)
    streams = torch.tensor([5, 9])
    got = soft_probabilities(drs, x, streams, num=4, seed=3, offset=7)
    views = reference.noisy_views(
        x, [0.3, 0.5], num=4, seed=3, offset=7, stream=streams, partition="diag", fill="neighbors"
    )
    want = (
        sum(
            torch.softmax(m(views[:, p].flatten(0, 1)), -1).view(2, 4, 3).mean(1)
            for p, m in enumerate((left, right))
        )
        / 2
    )
    assert torch.allclose(got, want, atol=1e-5)
    # The gradient against a central difference along a random direction (the same noise draws
    # at x ± h·v, so the difference sees only the change of x).
    (grad,) = torch.autograd.grad(got[:, 0].sum(), [x])
    v, h = torch.randn(x.shape), 1e-2
    with torch.no_grad():

        def f(z):
            return soft_probabilities(drs, z, streams, num=4, seed=3, offset=7)[:, 0].sum()

        central = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert float((grad * v).sum()) == pytest.approx(float(central), rel=1e-2, abs=1e-4)
    # A per-image σ factor of 1 changes nothing (the path the σ-selector's attack takes).
    ones = torch.ones(2, requires_grad=True)
    scaled = soft_probabilities(drs, x, streams, num=4, seed=3, offset=7, scale=ones)
    assert torch.allclose(scaled, got, atol=1e-5)
    (g_scale,) = torch.autograd.grad(scaled[:, 0].sum(), [ones])
    assert float(g_scale.abs().sum()) > 0
    # PGD on DRS lowers the soft classifier's probability of the label.
    target = SmoothedTarget(drs, n=10, alpha=0.1, num_noise=4)
    y = got.argmax(1)
    x_adv = pgd_attack(target, x.detach(), y, 1.0, steps=5, streams=streams, clamp=None)
    after = soft_probabilities(drs, x_adv, streams, num=4, seed=3, offset=7)
    assert (after.gather(1, y[:, None]) < got.detach().gather(1, y[:, None])).all()


def tiny_selector_model() -> SigmaSelectorClassifier:
    torch.manual_seed(2)
    selector = SigmaSelectorCNN(1, 2, 0.2, 1.0, hidden=4)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    return SigmaSelectorClassifier(
        selector, classifier, 3, [0.25, 0.5, 1.0], selector_noise=0.25, budget=0.25
    )


def test_only_the_pipeline_threat_differentiates_through_the_selector():
    model = tiny_selector_model()
    x, streams = torch.rand(3, 1, 4, 4), torch.arange(3)
    probs = {}
    for threat in ("classifier", "pipeline"):
        target = SelectorTarget(model, lam=0.4, threat=threat, n=100, alpha=0.01, n_h=50)
        model.selector.zero_grad()
        context = target.prepare(x, streams)
        probs[threat] = target.soft(x, streams, 0, context)
        probs[threat][:, 1].sum().backward()
        grads = [p.grad for p in model.selector.parameters()]
        reached = any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert reached == (threat == "pipeline"), threat
    assert torch.allclose(probs["classifier"].sum(1), torch.ones(3))
    assert torch.allclose(probs["pipeline"].sum(1), torch.ones(3))


def tiny_router() -> SigmaRoutedClassifier:
    torch.manual_seed(3)
    estimator = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    experts = [
        SmoothedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), 3, level)
        for level in (0.25, 0.5)
    ]
    return SigmaRoutedClassifier(estimator, [0.25, 0.5], 0.5, experts)


def test_routed_target_judges_with_the_routers_predict_and_steers_only_in_the_pipeline():
    router = tiny_router()
    x, streams = torch.rand(4, 1, 4, 4), torch.arange(4)
    target = RoutedTarget(router, threat="pipeline", n=200, alpha=0.1, seed=5)
    for i in range(4):
        c, sigma = target.predict(x[i], i)
        assert c == router.predict(x[i], 200, 0.1, 1000, seed=5, stream=i)
        assert (c == -1 and math.isnan(sigma)) or sigma in (0.25, 0.5)
    for threat in ("classifier", "pipeline"):
        target = RoutedTarget(router, threat=threat, n=200, alpha=0.1, num_noise=4)
        router.estimator.branches[0].zero_grad()
        context = target.prepare(x, streams)
        probs = target.soft(x, streams, 0, context)
        assert torch.allclose(probs.sum(1), torch.ones(4))
        probs[:, 1].sum().backward()
        grads = [p.grad for p in router.estimator.branches[0].parameters()]
        reached = any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert reached == (threat == "pipeline"), threat
        if threat == "pipeline":  # the forward value: the top level's soft classifier
            with torch.no_grad():
                top = target._soft_levels(x, streams, 0).argmax(1)
                want = torch.stack(
                    [
                        target._soft_at(int(lv), x[i : i + 1], streams[i : i + 1], 0)[0]
                        for i, lv in enumerate(top)
                    ]
                )
            assert torch.allclose(probs.detach(), want, atol=1e-6)
    with pytest.raises(ValueError, match="threat must be one of"):
        RoutedTarget(router, threat="both", n=10, alpha=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epsilon=-0.1), "epsilon must be finite and >= 0"),
        (dict(epsilon=math.nan), "epsilon must be finite and >= 0"),
        (dict(epsilon="1"), "epsilon must be a number"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(steps=True), "steps must be an integer >= 1"),
        (dict(step_size=-1.0), "step_size must be finite and > 0"),
    ],
)
def test_attack_errors_name_the_argument(kwargs, match):
    model, x, _ = linear_case()
    target = SmoothedTarget(SmoothedClassifier(model, 2, 0.25), n=10, alpha=0.1)
    args = dict(epsilon=0.5, steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pgd_attack(target, x, torch.tensor([0]), **args)
    if "epsilon" in kwargs or "steps" in kwargs:
        eps = [args["epsilon"]]
        with pytest.raises(ValueError, match=match):
            evaluate_attack(target, x, torch.tensor([0]), eps, steps=args["steps"])


def test_selector_target_errors():
    model = tiny_selector_model()
    with pytest.raises(ValueError, match="threat must be one of"):
        SelectorTarget(model, lam=0.5, threat="selector", n=10, alpha=0.1)
    with pytest.raises(ValueError, match="lam"):
        SelectorTarget(model, lam=1.2, threat="pipeline", n=10, alpha=0.1)


# -- small models trained on the bundled digits ------------------------------------------------

LEVELS = [0.25, 0.5, 1.0]
EPSILONS = [0.5, 1.0, 2.0]
IMAGES = 6


@functools.lru_cache(maxsize=1)
def digits_models():
    """A universal-σ base classifier (σ over [0.25, 1]) and a σ-selector, a few epochs each."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    spec = BranchSpec(
        arch="digits_cnn",
        num_classes=10,
        input_shape=(1, 32, 32),
        sigma=0.5,
        arch_kwargs={"width": 8},
    )
    out = tempfile.mkdtemp()
    torch.manual_seed(0)
    base = spec.build_model()
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, milestones=[2], progress=False)
    Trainer(base, spec, UniversalSigma(0.25, 1.0), train, config, f"{out}/base.pt").fit()
    kwargs = dict(in_channels=1, width=4, sigma_min=0.25, sigma_max=1.0, hidden=16)
    selector = SigmaSelectorCNN(**kwargs)
    config = TrainConfig(
        epochs=2, batch_size=64, lr=1e-2, optimizer="adam", weight_decay=0.0, progress=False
    )
    SelectorTrainer(selector, base, train, config, f"{out}/selector.pt", arch_kwargs=kwargs).fit()
    x = torch.stack([test[i][0] for i in range(IMAGES)])
    y = torch.tensor([test[i][1] for i in range(IMAGES)])
    return base.eval(), selector.eval(), x, y


def check_no_attack_beats_a_certificate(target, certify) -> None:
    base, selector, x, y = digits_models()
    rows = evaluate_attack(target, x, y, EPSILONS, steps=8)
    certs = {i: certify(x[i], i) for i in range(IMAGES)}
    assert sum(c >= 0 and r > 0 for c, r in certs.values()) >= IMAGES // 2
    assert attack_contradictions(rows, certs) == []
    accuracy = accuracy_by_epsilon(rows)
    assert accuracy[0.0] >= 0.5 and accuracy[2.0] < accuracy[0.0]  # the attack does something
    # Negative control: certificates inflated beyond every attack's ‖δ‖ are contradicted.
    inflated = {i: (c, 10.0) for i, (c, r) in certs.items()}
    assert attack_contradictions(rows, inflated)


def test_rs_attacks_never_beat_rs_certificates():
    base, *_ = digits_models()
    smoothed = SmoothedClassifier(base, 10, 0.5)
    target = SmoothedTarget(smoothed, n=300, alpha=0.001)
    check_no_attack_beats_a_certificate(
        target, lambda xi, i: smoothed.certify(xi, 30, 300, 0.001, 1000, stream=i)
    )


@pytest.mark.parametrize("threat", ["classifier", "pipeline"])
def test_selector_attacks_never_beat_selector_certificates(threat):
    base, selector, *_ = digits_models()
    model = SigmaSelectorClassifier(selector, base, 10, LEVELS, selector_noise=0.25, budget=0.25)
    target = SelectorTarget(model, lam=0.5, threat=threat, n=300, alpha=0.001)
    check_no_attack_beats_a_certificate(
        target, lambda xi, i: model.certify(xi, 30, 300, 0.001, 1000, lam=0.5, stream=i)
    )
