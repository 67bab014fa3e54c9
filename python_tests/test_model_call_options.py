"""The speed options of the smoothed classifiers change how views reach the model, never a
count or a certificate: autocast, channels_last, CUDA graphs of the model call, and noise
prefetched on a side CUDA stream (which must never make the host wait for the GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import MeanMargin, assert_close_to, parity_atol, random_images, requires_cuda
from torch import nn

import drs_ext
import drs_ext.smoothing.sampling as sampling
from drs_ext import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.smoothing.model_call import ModelCall
from drs_ext.smoothing.prefetch import prefetched

OPTIONS = [
    {"prefetch_noise": False},
    {"cuda_graph": True},
    {"channels_last": True},
    {"autocast_dtype": torch.float16},
    {"cuda_graph": True, "channels_last": True, "autocast_dtype": torch.bfloat16},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_model_call_options_change_no_certificate(
    device: torch.device, options: dict[str, object]
) -> None:
    """The options touch only the model call; MeanMargin's logits (float64 means, no autocast
    op) do not depend on them, so neither may the certificate. (Off CUDA, cuda_graph and
    prefetching are inert.)"""
    x = torch.full((3, 16, 16), 0.51, device=device)
    kw = {"n0": 64, "n": 600, "alpha": 0.001, "batch_size": 256, "seed": 5}  # 3 batch shapes
    for make in (
        lambda **o: SmoothedClassifier(MeanMargin(), 3, 0.25, **o),
        lambda **o: DualSmoothedClassifier(MeanMargin(), MeanMargin(), 3, 0.25, **o),
    ):
        plain = make().certify(x, **kw)
        with_options = make(**options)
        assert with_options.certify(x, **kw) == plain
        assert plain[0] == 0 and plain[1] > 0.0
        if options.get("cuda_graph") and device.type == "cuda":
            assert with_options.model_call._graphs, "cuda_graph=True captured no graph"


def test_options_change_only_the_model_outputs(device: torch.device) -> None:
    """A convolutional model: channels_last is a layout change (same votes exactly); bfloat16
    autocast changes the logits slightly, never the number of votes."""
    image = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).to(device)
    kw = {"seed": 0, "stream": 0, "offset": 0}
    plain = SmoothedClassifier(model, 4, 0.5).sample_counts(image, [200], 64, **kw)  # type: ignore[arg-type]
    layout = SmoothedClassifier(model, 4, 0.5, channels_last=True)
    assert (layout.sample_counts(image, [200], 64, **kw) == plain).all()  # type: ignore[arg-type]
    low = SmoothedClassifier(model, 4, 0.5, autocast_dtype=torch.bfloat16)
    assert low.sample_counts(image, [200], 64, **kw).sum() == 200  # type: ignore[arg-type]


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetched_yields_each_batch_once_in_order(device: torch.device, enabled: bool) -> None:
    device = torch.empty(0, device=device).device  # with its index, as sampling passes it
    calls: list[int] = []

    def make(start: int) -> torch.Tensor:
        calls.append(start)
        return torch.full((2,), float(start), device=device)

    out = list(prefetched(make, range(0, 10, 4), device, enabled))
    assert [s for s, _ in out] == [0, 4, 8] and calls == [0, 4, 8]
    assert all(bool((v == s).all()) for s, v in out)
    assert list(prefetched(make, range(0), device, enabled)) == []


class SlowViewRecorder(nn.Module):
    """Spins the GPU before reading its views (torch.cuda._sleep on the current stream), then
    keeps a copy of them: a views batch read before its side-stream kernel finished, or whose
    memory the allocator handed to a later batch too early, shows up as a wrong copy."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes, self.seen = classes, []

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(2_000_000)
        self.seen.append(v.clone())
        return v.flatten(1)[:, : self.classes]


@requires_cuda
@pytest.mark.parametrize("partition", ["diag", "none"])
def test_prefetched_views_are_the_op_views(partition: str) -> None:
    x = random_images((1, 8, 8), seed=31).cuda()
    classes, draws, batch = 5, 70, 16  # 5 batches, the last one partial
    models = [SlowViewRecorder(classes) for _ in range(2 if partition == "diag" else 1)]
    smoothed: SmoothedClassifier | DualSmoothedClassifier
    if partition == "diag":
        smoothed = DualSmoothedClassifier(models[0], models[1], classes, (0.3, 0.6))
    else:
        smoothed = SmoothedClassifier(models[0], classes, 0.3)
    assert smoothed.prefetch_noise  # the default on CUDA
    counts = smoothed.sample_counts(x, [draws] * len(models), batch, seed=3, stream=7, offset=9)
    expected = drs_ext.noisy_views(
        x[None].cpu(),
        smoothed.sigmas,
        num=draws,
        offset=9,
        seed=3,
        partition=partition,
        stream=torch.tensor([7]),
    )[0]
    for p, model in enumerate(models):
        seen = torch.cat(model.seen).cpu()
        assert seen.shape == expected[p].shape
        assert_close_to(seen, expected[p], parity_atol(x, smoothed.sigmas))
        votes = seen.flatten(1)[:, :classes].argmax(1)  # the views the model really saw
        bincount = torch.bincount(votes, minlength=classes)
        assert counts[p].tolist() == bincount.tolist()


@requires_cuda
def test_repeated_calls_reuse_the_views_memory() -> None:
    """A second sample_counts call of the same shapes allocates no new device memory: the views
    are prefetched on one side stream per device, whose freed blocks the caching allocator hands
    back. (On a new stream per call, each call would start new segments: cudaMalloc per image.)"""
    x = random_images((3, 16, 16), seed=21).cuda()
    smoothed = DualSmoothedClassifier(MeanMargin(), MeanMargin(), 3, 0.25)
    kw = {"seed": 9, "stream": 1, "offset": 0}
    first = smoothed.sample_counts(x, [300, 300], 64, **kw)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    second = smoothed.sample_counts(x, [300, 300], 64, **kw)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments
    assert second.tolist() == first.tolist()


@requires_cuda
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prefetch_noise": False},
        {"cuda_graph": True, "channels_last": True, "autocast_dtype": torch.bfloat16},
    ],
    ids=["default", "no-prefetch", "graph+channels_last+autocast"],
)
def test_sampling_never_waits_for_the_gpu(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, object]
) -> None:
    """No host synchronisation per batch: with the GPU held busy by a long sleep, the host
    enqueues every batch (views, model, vote count) before the sleep ends. A gate event recorded
    after the sleep is polled (without waiting) at each vote count; one synchronisation anywhere
    in the loop would let the sleep finish and open the gate."""
    x = random_images((3, 8, 8), seed=33).cuda()
    smoothed = DualSmoothedClassifier(MeanMargin(), MeanMargin(), 3, 0.25, **options)  # type: ignore[arg-type]
    draws, batch = [70, 70], 16  # 5 batches per branch, the last one partial
    kw = {"seed": 3, "stream": 7, "offset": 0}
    expected = smoothed.sample_counts(x, draws, batch, **kw)  # type: ignore[arg-type]  # warm-up
    if options.get("cuda_graph"):
        assert len(smoothed.model_call._graphs) == 4  # 2 models x 2 batch shapes, captured

    gate_open: list[bool] = []
    real_vote_counts = sampling.vote_counts

    def polling_vote_counts(logits: torch.Tensor) -> torch.Tensor:
        gate_open.append(gate.query())
        return real_vote_counts(logits)

    monkeypatch.setattr(sampling, "vote_counts", polling_vote_counts)
    gate = torch.cuda.Event()
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time
    gate.record()
    counts = smoothed.sample_counts(x, draws, batch, **kw)  # type: ignore[arg-type]
    assert gate_open == [False] * 10, "the host waited for the GPU inside the batch loop"
    assert gate.query()  # the one copy of the counts at the end did wait
    assert counts.tolist() == expected.tolist()

    # The gate does see a synchronisation: one .item() per batch, as a per-batch .cpu() of the
    # votes would be, opens it at the second poll.
    gate_open.clear()
    monkeypatch.setattr(
        sampling,
        "vote_counts",
        lambda logits: (polling_vote_counts(logits), logits.sum().item())[0],
    )
    gate = torch.cuda.Event()
    torch.cuda._sleep(1_000_000_000)
    gate.record()
    smoothed.sample_counts(x, draws, batch, **kw)  # type: ignore[arg-type]
    assert gate_open[0] is False and all(gate_open[1:])


class TinyNet(nn.Module):
    """Convolution, batch norm (eval), pooling and a linear layer: weights that autocast casts."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(32, 5)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(v).flatten(1))


@requires_cuda
@pytest.mark.parametrize(
    "options",
    [{}, {"autocast_dtype": torch.float16, "channels_last": True}],
    ids=["float32", "fp16+channels_last"],
)
def test_graphed_model_call_equals_eager(options: dict[str, object]) -> None:
    """ModelCall(cuda_graph=True): a replay reads the new views and gives the eager logits."""
    torch.manual_seed(0)
    model = TinyNet().cuda().eval()
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    eager, graphed = ModelCall(**options), ModelCall(**options, cuda_graph=True)  # type: ignore[arg-type]
    tol = 1e-2 if options.get("autocast_dtype") else 1e-5
    with torch.inference_mode():
        for seed in range(3):
            v = random_images((16, 3, 8, 8), seed=40 + seed).cuda()
            out = graphed(model, v).clone()  # the next replay overwrites the graph's output
            torch.testing.assert_close(out, eager(model, v), rtol=tol, atol=tol)
    assert len(graphed._graphs) == 1  # captured once, replayed for the later batches
