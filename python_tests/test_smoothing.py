"""SmoothedClassifier / DualSmoothedClassifier as a caller uses them, on every device: results
independent of the batch size, seeds and streams, ensembles, eval mode, NaN logits, abstaining,
and clear errors. What a certificate is computed from: test_certify.py; its soundness:
test_soundness.py; the model-call options: test_model_call_options.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from drs_ext import DualSmoothedClassifier, SmoothedClassifier

C, H, W, K = 1, 6, 6, 4


def linear_model(seed: int, device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([2.5, 0.5, 0.0, -0.5]))
    return model.to(device)


class Recorder(nn.Module):
    """Wraps a model and records the batch sizes it is called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        self.sizes.append(views.shape[0])
        return self.model(views)


@pytest.fixture
def image(device: torch.device) -> torch.Tensor:
    """One image on the device under test (so every test that takes it runs on each device)."""
    return torch.rand(C, H, W, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("dual", [False, True])
def test_certificate_independent_of_batch_size_and_batches_bounded(
    image: torch.Tensor, dual: bool
) -> None:
    results = []
    for batch in (7, 64, 1000):
        rec_l = Recorder(linear_model(4, image.device))
        rec_r = Recorder(linear_model(5, image.device))
        smoothed = (
            DualSmoothedClassifier(rec_l, rec_r, K, 0.5)
            if dual
            else SmoothedClassifier(rec_l, K, 0.5)
        )
        results.append(smoothed.certify(image, 20, 200, 0.001, batch, seed=1))
        results.append(smoothed.predict(image, 200, 0.001, batch, seed=1))
        assert max(rec_l.sizes) <= batch and (not dual or max(rec_r.sizes) <= batch)
    assert results[0:2] == results[2:4] == results[4:6]


def test_seed_and_stream_change_the_noise(image: torch.Tensor) -> None:
    smoothed = SmoothedClassifier(linear_model(6, image.device), K, 1.0)
    counts = [
        smoothed.sample_counts(image, [500], 100, seed=s, stream=t, offset=0).tolist()
        for s, t in [(0, 0), (0, 0), (1, 0), (0, 1)]
    ]
    assert counts[0] == counts[1]
    assert counts[0] != counts[2] and counts[0] != counts[3]


def test_ensemble_averages_logits(image: torch.Tensor) -> None:
    a, b = linear_model(7, image.device), linear_model(8, image.device)
    averaged = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).to(image.device)
    with torch.no_grad():
        averaged[1].weight.copy_((a[1].weight + b[1].weight) / 2)
        averaged[1].bias.copy_((a[1].bias + b[1].bias) / 2)
    ens = SmoothedClassifier([a, b], K, 0.5).sample_counts(
        image, [300], 64, seed=2, stream=0, offset=0
    )
    one = SmoothedClassifier(averaged, K, 0.5).sample_counts(
        image, [300], 64, seed=2, stream=0, offset=0
    )
    assert (ens == one).all()


def test_batch_norm_runs_in_eval_mode_and_mode_is_restored(image: torch.Tensor) -> None:
    model = nn.Sequential(nn.BatchNorm2d(C), nn.Flatten(), nn.Linear(C * H * W, K))
    model.to(image.device).train()
    smoothed = SmoothedClassifier(model, K, 0.5)
    first = smoothed.certify(image, 10, 100, 0.01, 7, seed=0)
    assert model.training and model[0].training
    assert first == smoothed.certify(image, 10, 100, 0.01, 100, seed=0)


class NaNModel(nn.Module):
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(views.shape[0], K, device=views.device)
        out[:, 0] = 1.0
        out[::2, 1] = float("nan")
        return out


def test_nan_logits_vote_for_nothing_and_warn(image: torch.Tensor) -> None:
    smoothed = SmoothedClassifier(NaNModel(), K, 0.5)
    with pytest.warns(RuntimeWarning, match="NaN logits"):
        counts = smoothed.sample_counts(image, [10], 4, seed=0, stream=0, offset=0)
    assert counts.tolist() == [[5, 0, 0, 0]]


def test_abstains_when_the_model_is_split(image: torch.Tensor) -> None:
    class Alternate(nn.Module):
        def forward(self, views: torch.Tensor) -> torch.Tensor:
            votes = torch.arange(views.shape[0], device=views.device) % 2
            return nn.functional.one_hot(votes, K).float()

    smoothed = DualSmoothedClassifier(Alternate(), Alternate(), K, 0.5)
    assert smoothed.certify(image, 10, 100, 0.01, 100) == (smoothed.ABSTAIN, 0.0)
    assert smoothed.predict(image, 100, 0.01, 100) == smoothed.ABSTAIN


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s, x: s.certify(x[0], 10, 10, 0.1, 10), "x must be one image"),
        (lambda s, x: s.certify(x.to(torch.uint8), 10, 10, 0.1, 10), "floating-point image"),
        (lambda s, x: s.certify(x * float("nan"), 10, 10, 0.1, 10), "finite"),
        (lambda s, x: s.certify(x, 0, 10, 0.1, 10), "n0 must be an integer >= 1"),
        (lambda s, x: s.certify(x, 10, 0, 0.1, 10), "n must be an integer >= 1"),
        (lambda s, x: s.certify(x, 10, 10, 1.0, 10), r"alpha must be in the open interval"),
        (lambda s, x: s.predict(x, 10, 0.0, 10), r"alpha must be in the open interval"),
        (lambda s, x: s.certify(x, 10, 10, 0.1, 0), "batch_size must be an integer >= 1"),
        (lambda s, x: s.certify(x, 10, 10, 0.1, 10, seed=-1), "seed must be in"),
        (lambda s, x: s.predict(x, 10, 0.1, 10, stream=2**32), "stream must be in"),
    ],
)
def test_bad_calls_raise_clear_errors(image: torch.Tensor, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(SmoothedClassifier(linear_model(0, image.device), K, 0.5), image)


def test_bad_constructor_arguments() -> None:
    model = linear_model(0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        SmoothedClassifier(model, K, 0.0)
    with pytest.raises(ValueError, match="sigma_r must be finite and > 0"):
        DualSmoothedClassifier(model, model, K, (0.5, -1.0))
    with pytest.raises(ValueError, match="sigma must be one value or a pair"):
        DualSmoothedClassifier(model, model, K, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        SmoothedClassifier(model, 0, 0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        SmoothedClassifier([], K, 0.5)


# -- issue 66: NaN-only models, wrong output shapes, NumPy scalars, default seeds, float64 -------


class AllNaN(nn.Module):
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return torch.full((views.shape[0], K), float("nan"), device=views.device)


@pytest.mark.parametrize("dual", [False, True])
def test_all_nan_logits_abstain(image: torch.Tensor, dual: bool) -> None:
    smoothed = DualSmoothedClassifier(AllNaN(), AllNaN(), K, 0.5) if dual else None
    smoothed = smoothed or SmoothedClassifier(AllNaN(), K, 0.5)
    with pytest.warns(RuntimeWarning, match="NaN logits"):
        assert smoothed.predict(image, 50, 0.01, 16, seed=0) == smoothed.ABSTAIN
    with pytest.warns(RuntimeWarning, match="NaN logits"):
        assert smoothed.certify(image, 10, 50, 0.01, 16, seed=0) == (smoothed.ABSTAIN, 0.0)


class Reshaped(nn.Module):
    """A linear model whose output has `rows` times as many rows and `extra` more columns."""

    def __init__(self, rows: float, extra: int = 0) -> None:
        super().__init__()
        self.model, self.rows, self.extra = linear_model(0), rows, extra

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        out = self.model.to(views.device)(views)
        out = torch.cat([out, torch.zeros(out.shape[0], self.extra, device=out.device)], dim=1)
        return torch.cat([out, out])[: int(self.rows * out.shape[0])]


@pytest.mark.parametrize(
    ("shape", "got"), [((2, 0), "(20, 4)"), ((0.5, 0), "(5, 4)"), ((1, 1), "(10, 5)")]
)
def test_model_output_of_the_wrong_shape_is_refused(image, shape, got) -> None:
    """More rows than views would count as extra votes; fewer or other columns are refused too,
    with the shape the model returned and the one expected."""
    model = Reshaped(*shape)
    smoothed = SmoothedClassifier(model, K, 0.5)
    expected = rf"returned logits of shape {re.escape(got)} for 10 views; expected \(10, 4\)"
    with pytest.raises(ValueError, match=expected):
        smoothed.predict(image, 10, 0.01, 10, seed=0)
    with pytest.raises(ValueError, match=r"branch 1 returned logits of shape"):
        DualSmoothedClassifier(linear_model(0), model, K, 0.5).certify(image, 10, 10, 0.1, 10)


def test_numpy_scalars_are_accepted_where_python_numbers_are(image: torch.Tensor) -> None:
    model = linear_model(2, image.device)
    alpha = np.float32(0.01)
    plain = SmoothedClassifier(model, K, 0.5).certify(image, 10, 100, float(alpha), 64, seed=3)
    numpy = SmoothedClassifier(model, np.int64(K), np.float32(0.5)).certify(
        image, np.int64(10), np.int64(100), alpha, np.int64(64), seed=np.int64(3)
    )
    assert numpy == plain and numpy[1] > 0
    pair = DualSmoothedClassifier(model, model, K, np.array([0.5, 0.25], dtype=np.float32))
    assert pair.sigmas == [0.5, 0.25]
    assert DualSmoothedClassifier(model, model, K, np.float64(0.5)).sigmas == [0.5, 0.5]
    assert pair.predict(image, 50, np.float64(0.01), 64, seed=0) in (*range(K), pair.ABSTAIN)


def test_fill_and_bool_sigma_are_checked_at_construction() -> None:
    model = linear_model(0)
    with pytest.raises(ValueError, match=r"fill must be one of \['neighbors'.*got 'bogus'"):
        DualSmoothedClassifier(model, model, K, 0.5, fill="bogus")
    with pytest.raises(ValueError, match="sigma must be a float > 0, got True"):
        SmoothedClassifier(model, K, True)


def test_default_seed_comes_from_torchs_generator(image: torch.Tensor) -> None:
    """seed=None: fresh noise on every call (Cohen et al.'s behaviour), drawn from torch's
    default generator, so torch.manual_seed repeats a sequence of calls; explicit seeds stay
    reproducible whatever the generator's state."""
    smoothed = SmoothedClassifier(linear_model(9, image.device), K, 2.0)

    def calls() -> list:
        return [smoothed.certify(image, 10, 200, 0.01, 100) for _ in range(4)]

    torch.manual_seed(11)
    first = calls()
    torch.manual_seed(11)
    assert calls() == first
    assert len(set(first)) > 1  # the four calls drew different noise
    torch.manual_seed(11)
    drawn = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    assert smoothed.certify(image, 10, 200, 0.01, 100, seed=drawn) == first[0]
    torch.manual_seed(11)
    explicit = smoothed.predict(image, 200, 0.01, 100, seed=5)
    torch.manual_seed(12)
    assert smoothed.predict(image, 200, 0.01, 100, seed=5) == explicit


def test_float64_images_are_converted_to_float32(image: torch.Tensor) -> None:
    smoothed = DualSmoothedClassifier(linear_model(4, image.device), linear_model(5), K, 1.0)
    smoothed.branches[1].to(image.device)
    as_float32 = smoothed.certify(image, 10, 200, 0.01, 64, seed=2)
    # A float64 image within half a float32 ulp of `image` rounds to it: the same noisy views.
    nudged = image.double() + 1e-12
    assert smoothed.certify(nudged, 10, 200, 0.01, 64, seed=2) == as_float32
    counts = smoothed.sample_counts(image, [100, 100], 64, seed=2, stream=0, offset=0)
    assert counts.sum() == 200
