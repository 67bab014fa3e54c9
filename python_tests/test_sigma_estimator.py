"""Training for σ-routing: radius labels, soft labels, the estimator's loss and the routing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from drs_ext import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.io.data import TensorDataset
from drs_ext.train.sigma_estimator import (
    EstimatorConsistency,
    SoftLabelDataset,
    level_radii,
    route,
    soft_labels,
)

LEVELS = [0.25, 0.5, 1.0]


class Always(nn.Module):
    """Votes for one class whatever it sees."""

    def __init__(self, cls: int, classes: int) -> None:
        super().__init__()
        self.cls, self.classes = cls, classes
        self.calls = 0

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.one_hot(torch.full((views.shape[0],), self.cls), self.classes).float()


def digits_like(num: int = 10) -> TensorDataset:
    images = torch.rand(num, 1, 4, 4)
    labels = torch.tensor([i % 2 for i in range(num)])
    return TensorDataset(images, labels, num_classes=2)


def test_level_radii_are_the_label_radius_at_each_level(tmp_path) -> None:
    """A classifier that always says 0: images of label 0 get the largest radius n draws give,
    σ Φ⁻¹(α^(1/n)) (DRS: its own cap), images of label 1 get 0; cached and resumed."""
    data = digits_like()
    experts = [
        SmoothedClassifier(Always(0, 2), 2, 0.25),
        DualSmoothedClassifier(Always(0, 2), Always(0, 2), 2, 0.5 / math.sqrt(2)),
        SmoothedClassifier(Always(1, 2), 2, 1.0),
    ]
    cache = tmp_path / "labels.pt"
    radii = level_radii(
        experts, data, n=50, alpha=0.01, batch_images=4, cache=cache, progress=False
    )
    label0 = torch.tensor([i % 2 == 0 for i in range(10)])
    assert torch.allclose(radii[label0, 0], torch.tensor(0.25 * norm.ppf(0.01 ** (1 / 50))).float())
    assert torch.allclose(radii[label0, 1], torch.tensor(experts[1].max_radius(50, 0.01)).float())
    assert torch.all(radii[~label0, :2] == 0) and torch.all(radii[label0, 2] == 0)
    assert torch.allclose(radii[~label0, 2], torch.tensor(1.0 * norm.ppf(0.01 ** (1 / 50))).float())
    # A rerun reads the cache and calls no model.
    calls = experts[0].branches[0].members[0].calls
    assert torch.equal(
        level_radii(experts, data, n=50, alpha=0.01, cache=cache, progress=False), radii
    )
    assert experts[0].branches[0].members[0].calls == calls
    with pytest.raises(ValueError, match="other settings"):
        level_radii(experts, data, n=60, alpha=0.01, cache=cache, progress=False)


def test_soft_labels_drop_uncertified_images_and_balance_the_levels() -> None:
    radii = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.2, 0.9, 0.3], [0.1, 1.0, 0.0]])
    kept, soft, weights = soft_labels(radii)
    assert kept.tolist() == [1, 2, 3]
    assert torch.allclose(soft, torch.softmax(radii[1:], dim=1))
    # Best levels 0, 1, 1: shares 1/3, 2/3 -> weights 3, 1.5, 1.5, scaled to mean 1.
    assert torch.allclose(weights, torch.tensor([3.0, 1.5, 1.5]) / 2.0)
    assert torch.equal(soft_labels(radii, balance=False)[2], torch.ones(3))
    with pytest.raises(ValueError, match="no training image"):
        soft_labels(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="without NaN"):
        soft_labels(torch.full((2, 3), float("nan")))


def test_estimator_loss_is_weighted_soft_cross_entropy_plus_consistency() -> None:
    logits = torch.randn(2, 3, 3)  # (B, m, levels)

    class FixedBranch:
        def logits(self, x, num):
            assert num == 3
            return logits

    target = torch.tensor([[0.2, 0.5, 0.3, 2.0], [0.6, 0.3, 0.1, 0.5]])
    recipe = EstimatorConsistency(m=3, lam=2.0, eta=0.5)
    loss, out = recipe(FixedBranch(), torch.zeros(2, 1, 4, 4), target)
    probs = logits.softmax(-1)
    mean = probs.mean(1)
    ce = -(target[:, None, :3] * probs.log()).sum(-1).mean(1)
    kl = (mean[:, None] * (mean[:, None].log() - probs.log())).sum(-1).mean(1)
    entropy = -(mean * mean.log()).sum(-1)
    expected = (target[:, 3] * (ce + 2.0 * kl + 0.5 * entropy)).mean()
    assert torch.allclose(loss, expected, atol=1e-6) and out is logits
    best = target[:, :3].argmax(-1)
    assert recipe.correct(logits, target) == int((logits.argmax(-1) == best[:, None]).sum())


def test_soft_label_dataset_serves_the_kept_images() -> None:
    data = digits_like(4)
    ds = SoftLabelDataset(data, torch.tensor([1, 3]), torch.eye(3)[:2], torch.tensor([2.0, 0.5]))
    assert len(ds) == 2
    x, target = ds[1]
    assert torch.equal(x, data[3][0]) and target.tolist() == [0.0, 1.0, 0.0, 0.5]


def test_route_sends_each_image_to_the_estimators_top_level() -> None:
    assert route(Always(2, 3), 1.0, digits_like(5), draws=8).tolist() == [2] * 5
