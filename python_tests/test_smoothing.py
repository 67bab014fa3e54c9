"""SmoothedClassifier / DualSmoothedClassifier: the algorithm against independent re-computations.

The oracle is drs_ext.reference (plain-PyTorch noise and votes) plus scipy's Beta quantile and
normal quantile, so the certificate is recomputed without the kernels or drs_ext.stats.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from drs_ext import DualSmoothedClassifier, SmoothedClassifier, reference
from drs_ext.prefetch import prefetched
from drs_ext.smoothing import ESTIMATION_OFFSET, SELECTION_OFFSET

C, H, W, K = 1, 6, 6, 4


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([2.5, 0.5, 0.0, -0.5]))
    return model


class Recorder(nn.Module):
    """Wraps a model and records the batch sizes it is called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        self.sizes.append(views.shape[0])
        return self.model(views)


def reference_counts(models, x, sigmas, num, seed, stream, offset, partition, fill="neighbors"):
    views = reference.noisy_views(
        x[None],
        sigmas,
        num=num,
        seed=seed,
        offset=offset,
        stream=torch.tensor([stream]),
        partition=partition,
        fill_mode=fill,
    )[0]
    with torch.no_grad():
        logits = torch.stack([m(views[p]) for p, m in enumerate(models)])
    return reference.vote_counts(logits)


def cp_lower(k: int, n: int, alpha: float) -> float:
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(C, H, W, generator=torch.Generator().manual_seed(0))


def test_rs_certify_matches_independent_recomputation(image: torch.Tensor) -> None:
    model, sigma, n0, n, alpha, seed = linear_model(1), 0.4, 30, 300, 0.01, 11
    c, r = SmoothedClassifier(model, K, sigma).certify(image, n0, n, alpha, 64, seed=seed, stream=3)
    sel = reference_counts([model], image, [sigma], n0, seed, 3, SELECTION_OFFSET, "none")[0]
    est = reference_counts([model], image, [sigma], n, seed, 3, ESTIMATION_OFFSET, "none")[0]
    c_ref = int(sel.argmax())
    p = cp_lower(int(est[c_ref]), n, alpha)
    assert p > 0.5, "the test needs a non-abstaining case"
    assert (c, r) == (c_ref, pytest.approx(sigma * norm.ppf(p), rel=1e-9))


def test_drs_certify_matches_independent_recomputation(image: torch.Tensor) -> None:
    model_l, model_r = linear_model(2), linear_model(3)
    sigmas, n0, n, alpha, seed = (0.3, 0.45), 30, 300, 0.01, 5
    smoothed = DualSmoothedClassifier(model_l, model_r, K, sigmas, fill="pair")
    c, r = smoothed.certify(image, n0, n, alpha, 50, seed=seed, stream=9)
    models = [model_l, model_r]
    sel = reference_counts(models, image, sigmas, n0, seed, 9, SELECTION_OFFSET, "diag", "pair")
    est = reference_counts(models, image, sigmas, n, seed, 9, ESTIMATION_OFFSET, "diag", "pair")
    c_ref = int(sel.sum(0).argmax())
    a = [norm.ppf(cp_lower(int(est[p, c_ref]), n, alpha / 2)) for p in (0, 1)]
    assert sum(a) > 0, "the test needs a non-abstaining case"
    expected = sum(a) / math.sqrt(sigmas[0] ** -2 + sigmas[1] ** -2)
    assert (c, r) == (c_ref, pytest.approx(expected, rel=1e-9))


@pytest.mark.parametrize("dual", [False, True])
def test_certificate_independent_of_batch_size_and_batches_bounded(
    image: torch.Tensor, dual: bool
) -> None:
    results = []
    for batch in (7, 64, 1000):
        rec_l, rec_r = Recorder(linear_model(4)), Recorder(linear_model(5))
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
    smoothed = SmoothedClassifier(linear_model(6), K, 1.0)
    counts = [
        smoothed.sample_counts(image, [500], 100, seed=s, stream=t, offset=0).tolist()
        for s, t in [(0, 0), (0, 0), (1, 0), (0, 1)]
    ]
    assert counts[0] == counts[1]
    assert counts[0] != counts[2] and counts[0] != counts[3]


def test_ensemble_averages_logits(image: torch.Tensor) -> None:
    a, b = linear_model(7), linear_model(8)
    averaged = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
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
    model.train()
    smoothed = SmoothedClassifier(model, K, 0.5)
    first = smoothed.certify(image, 10, 100, 0.01, 7, seed=0)
    assert model.training and model[0].training
    assert first == smoothed.certify(image, 10, 100, 0.01, 100, seed=0)


class NaNModel(nn.Module):
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(views.shape[0], K)
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
            return nn.functional.one_hot(torch.arange(views.shape[0]) % 2, K).float()

    smoothed = DualSmoothedClassifier(Alternate(), Alternate(), K, 0.5)
    assert smoothed.certify(image, 10, 100, 0.01, 100) == (smoothed.ABSTAIN, 0.0)
    assert smoothed.predict(image, 100, 0.01, 100) == smoothed.ABSTAIN


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s, x: s.certify(x[0], 10, 10, 0.1, 10), "x must be one image"),
        (lambda s, x: s.certify(x.double(), 10, 10, 0.1, 10), "x must be float32"),
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
        call(SmoothedClassifier(linear_model(0), K, 0.5), image)


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


def test_model_call_options_change_nothing_but_the_model_outputs(image: torch.Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(C, 3, 3), nn.Flatten(), nn.Linear(3 * (H - 2) * (W - 2), K))
    plain = SmoothedClassifier(model, K, 0.5).sample_counts(
        image, [200], 64, seed=0, stream=0, offset=0
    )
    # channels_last is a layout change and cuda_graph is inert off the GPU: same votes exactly.
    layout = SmoothedClassifier(model, K, 0.5, channels_last=True, cuda_graph=True)
    assert (layout.sample_counts(image, [200], 64, seed=0, stream=0, offset=0) == plain).all()
    # bfloat16 autocast changes the logits slightly, never the number of votes.
    low = SmoothedClassifier(model, K, 0.5, autocast_dtype=torch.bfloat16)
    assert low.sample_counts(image, [200], 64, seed=0, stream=0, offset=0).sum() == 200


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetched_yields_each_batch_once_in_order(enabled: bool) -> None:
    """Off CUDA, prefetched is the plain loop (the CUDA side-stream path is in test_cuda.py)."""
    calls: list[int] = []

    def make(start: int) -> torch.Tensor:
        calls.append(start)
        return torch.full((2,), float(start))

    out = list(prefetched(make, range(0, 10, 4), torch.device("cpu"), enabled))
    assert [s for s, _ in out] == [0, 4, 8] and calls == [0, 4, 8]
    assert all(bool((v == s).all()) for s, v in out)
    assert list(prefetched(make, range(0), torch.device("cpu"), enabled)) == []
