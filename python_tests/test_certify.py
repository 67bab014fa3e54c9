"""What CERTIFY and PREDICT compute (docs/design.md §2.4): the certificate against an independent
re-computation, the noise each stage draws, and the class DRS certifies.

The oracle of the re-computations is drs_ext.reference (plain-PyTorch noise and votes) plus
scipy's Beta and normal quantiles, so the certificate is recomputed without the kernels or
drs_ext.stats.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SAMPLE_SPACE, MeanMargin, random_images, requires_cuda
from scipy.stats import beta, norm
from torch import nn

from drs_ext import DualSmoothedClassifier, SmoothedClassifier, reference
from drs_ext.smoothing.sampling import (
    ESTIMATION_OFFSET,
    MAX_DRAWS,
    PREDICT_OFFSET,
    SELECTION_OFFSET,
)

C, H, W, K = 1, 6, 6, 4


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([2.5, 0.5, 0.0, -0.5]))
    return model


def reference_counts(models, x, sigmas, num, seed, stream, offset, partition, fill="neighbors"):
    views = reference.noisy_views(
        x[None],
        sigmas,
        num=num,
        seed=seed,
        offset=offset,
        stream=torch.tensor([stream]),
        partition=partition,
        fill=fill,
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


def test_noise_counter_ranges_are_disjoint() -> None:
    """Selection, estimation and prediction draws each own MAX_DRAWS sample indices, no two
    ranges overlap, and all lie in the op's sample space [0, 2^56)."""
    starts = sorted([SELECTION_OFFSET, ESTIMATION_OFFSET, PREDICT_OFFSET])
    assert starts[0] >= 0 and starts[-1] + MAX_DRAWS <= SAMPLE_SPACE
    assert all(b - a >= MAX_DRAWS for a, b in zip(starts, starts[1:], strict=False))


class ViewRecorder(nn.Module):
    """Keeps a CPU copy of every view it is given, in call order; votes by its first pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        self.seen.append(views.detach().flatten(1).cpu().clone())
        return views.flatten(1)[:, :K].float()


def distinct_rows(rows: torch.Tensor) -> int:
    return int(torch.unique(rows, dim=0).shape[0])


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_selection_estimation_and_prediction_draw_independent_noise(
    device: torch.device, method: str
) -> None:
    """CERTIFY's estimation draws must be fresh noise, not the selection draws again: the class
    was chosen because it did well on those, so reusing them biases its count upwards
    (docs/design.md §2.2). Every view a branch classifier sees over a certify and a predict call
    is therefore a different draw, and a selection view and the estimation view of the same
    index are uncorrelated."""
    x = torch.zeros(C, H, W, device=device)  # the views are the (filled) noise itself
    recorders = [ViewRecorder() for _ in range(2 if method == "drs" else 1)]
    smoothed: SmoothedClassifier | DualSmoothedClassifier
    if method == "drs":
        smoothed = DualSmoothedClassifier(*recorders, K, (0.5, 0.8), fill="zeros")
    else:
        smoothed = SmoothedClassifier(recorders[0], K, 0.5)
    n0, n = 40, 100
    smoothed.certify(x, n0, n, 0.01, 32, seed=3, stream=5)
    certify_views = [torch.cat(r.seen) for r in recorders]
    for r in recorders:
        r.seen.clear()
    smoothed.predict(x, n, 0.01, 32, seed=3, stream=5)
    for p, r in enumerate(recorders):
        seen = certify_views[p]
        assert seen.shape[0] == n0 + n
        selection, estimation = seen[:n0], seen[n0:]
        assert distinct_rows(seen) == n0 + n, f"branch {p}: estimation reuses selection noise"
        c = torch.corrcoef(torch.stack([selection.flatten(), estimation[:n0].flatten()]))[0, 1]
        assert abs(float(c)) < 5.0 / math.sqrt(selection.numel()), (p, float(c))
        both = torch.cat([seen, *r.seen])
        assert distinct_rows(both) == both.shape[0], f"branch {p}: predict reuses certify noise"


class PatternVoter(nn.Module):
    """Votes by a fixed repeating pattern of classes, one vote per view in call order (the
    views are ignored): counts known exactly, whatever the noise."""

    def __init__(self, pattern: list[int]) -> None:
        super().__init__()
        self.pattern, self.calls = pattern, 0

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        index = torch.arange(self.calls, self.calls + views.shape[0]) % len(self.pattern)
        self.calls += views.shape[0]
        votes = torch.tensor(self.pattern)[index]
        return nn.functional.one_hot(votes, K).float().to(views.device)


@pytest.mark.parametrize("mixed", [0, 1], ids=["l-mixed", "r-mixed"])
def test_drs_certifies_the_top_class_of_the_summed_votes(device: torch.device, mixed: int) -> None:
    """One branch votes 60 % class 0 / 40 % class 1, the other always class 1: the summed votes
    (and g) pick class 1, the mixed branch alone would pick class 0 (and then abstain, the other
    branch never voting for it). The certificate must be class 1 with the radius of the counts
    (400 and 1000 of n = 1000), and PREDICT must return class 1 (mixture probability 0.7)."""
    x = random_images((C, H, W), seed=1).to(device)
    sigmas, n0, n, alpha = (0.25, 0.5), 100, 1000, 0.01  # n0 and n multiples of the pattern
    voters = [PatternVoter([1]), PatternVoter([1])]
    voters[mixed] = PatternVoter([0, 0, 0, 1, 1])
    smoothed = DualSmoothedClassifier(*voters, K, sigmas)
    c, r = smoothed.certify(x, n0, n, alpha, 250, seed=2)
    counts = [400, 1000] if mixed == 0 else [1000, 400]
    a = sum(norm.ppf(cp_lower(k, n, alpha / 2)) for k in counts)
    assert a > 0
    expected = a / math.sqrt(sigmas[0] ** -2 + sigmas[1] ** -2)
    assert (c, r) == (1, pytest.approx(expected, rel=1e-9))
    assert smoothed.predict(x, n, alpha, 250, seed=2) == 1


@requires_cuda
def test_certify_on_cuda_equals_cpu() -> None:
    # Mean 0.51: class 0 wins with probability about 0.85 (RS) / 0.8 (each DRS branch), so the
    # counts, not just the prediction, are compared through the radius.
    x = torch.full((3, 16, 16), 0.51)
    model = MeanMargin()
    certificates = []
    for device in ("cpu", "cuda"):
        rs = SmoothedClassifier(model, 3, 0.25)
        drs = DualSmoothedClassifier(model, model, 3, 0.25, fill="neighbors")
        kw = {"n0": 64, "n": 2000, "alpha": 0.001, "batch_size": 300, "seed": 5}
        certificates.append(
            (rs.certify(x.to(device), **kw), drs.certify(x.to(device), **kw))  # type: ignore[arg-type]
        )
    (rs_cpu, drs_cpu), (rs_cuda, drs_cuda) = certificates
    for cpu, cuda in [(rs_cpu, rs_cuda), (drs_cpu, drs_cuda)]:
        assert cpu[0] == cuda[0] == 0
        assert cpu[1] > 0.0
        assert cuda[1] == pytest.approx(cpu[1], abs=1e-6)
