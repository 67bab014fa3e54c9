"""The CUDA kernels against the CPU kernels, drs_ext.reference and torch.bincount.

Runs only with a CUDA device and a build of drs_ext with its CUDA kernels; skipped otherwise.
Covers every partition × fill × out_dtype on shapes that reach each tiling case of the "diag"
kernel (one tile per plane, row tiles spanning channels, column tiles, odd sub-image widths,
224×224), chunk and batch independence, launches large enough that blocks share chunks of
samples against small ones, unaligned inputs, a non-finite x stopping the kernel,
opcheck, vote counts with ties, NaN and infinite logits, CUDA-graph capture, and a certificate
on CUDA equal to the CPU one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    FILLS,
    assert_close_to,
    assert_within_ulp,
    parity_atol,
    random_images,
    reference_atol,
)
from torch import nn

import drs_ext
from drs_ext import reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and drs_ext.built_with_cuda),
    reason=(
        "needs a CUDA GPU and drs_ext built with its CUDA kernels "
        f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
        f"drs_ext.built_with_cuda={drs_ext.built_with_cuda})"
    ),
)

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# (N, C, H, W) for "diag". Tiling (csrc/cuda/noisy_views_diag.cuh): W/2 <= 128 gives whole-row
# tiles of about 4096 packed elements, wider sub-images column tiles of at most 128 columns.
DIAG_SHAPES: list[tuple[int, int, int, int]] = [
    (1, 3, 32, 32),  # CIFAR: one tile per plane, spanning the 3 channels
    (2, 1, 6, 10),  # N > 1, C = 1, H != W, W/2 = 5 odd, m = 30 not a multiple of 4
    (3, 3, 7, 14),  # odd H and W/2
    (1, 3, 70, 40),  # two row tiles, the boundary inside a channel (halo rows)
    (1, 1, 5, 600),  # three column tiles (halo columns)
    (2, 2, 11, 262),  # column tiles of 66 columns, rows spanning channels
    (1, 1, 1, 2),  # a single packed pixel
    (1, 3, 224, 224),  # ImageNet: 19 row tiles
]
NONE_SHAPES: list[tuple[int, int, int, int]] = [
    (1, 3, 32, 32),
    (2, 1, 5, 7),  # m = 35: partial last group, unaligned planes
    (3, 1, 3, 5),
    (1, 3, 224, 224),
]
CASES: list[tuple[str, str]] = [("diag", f) for f in FILLS] + [("none", "neighbors")]


def shapes_for(partition: str) -> list[tuple[int, int, int, int]]:
    return DIAG_SHAPES if partition == "diag" else NONE_SHAPES


def sigma_for(partition: str) -> list[float]:
    return [0.25, 0.75] if partition == "diag" else [0.5]


def views(
    x: torch.Tensor,
    sigma: list[float],
    *,
    num: int,
    seed: int = 20240611,
    offset: int = 5,
    stream: torch.Tensor | None = None,
    partition: str = "diag",
    fill: str = "neighbors",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The op on x's device (stream ids default to 3, 10, 17, ... on that device)."""
    if stream is None:
        stream = torch.arange(x.shape[0], dtype=torch.int64) * 7 + 3
    stream = stream.to(x.device)
    return torch.ops.drs_ext.noisy_views(
        x, sigma, num, seed, offset, stream, partition, fill, out_dtype
    )


# ----------------------------------------------------------------------------------------------
# noisy_views


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_cuda_equals_cpu(partition: str, fill: str, out_dtype: torch.dtype) -> None:
    for shape in shapes_for(partition):
        x = random_images(shape, seed=sum(shape))
        sigma = sigma_for(partition)
        num = 2 if shape[-1] * shape[-2] > 10_000 else 3
        kw = {"num": num, "partition": partition, "fill": fill, "out_dtype": out_dtype}
        cpu = views(x, sigma, **kw)  # type: ignore[arg-type]
        cuda = views(x.cuda(), sigma, **kw)  # type: ignore[arg-type]
        assert cuda.is_cuda and cuda.device == torch.device("cuda", torch.cuda.current_device())
        if out_dtype == torch.float32:
            assert_close_to(cuda.cpu(), cpu, parity_atol(x, sigma))
        else:
            assert_within_ulp(cuda, cpu, parity_atol(x, sigma))
            # The cast comes after the noise: the 16-bit output is the float32 output rounded.
            cuda32 = views(x.cuda(), sigma, **(kw | {"out_dtype": torch.float32}))  # type: ignore[arg-type]
            assert torch.equal(cuda, cuda32.to(out_dtype))


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_cuda_equals_reference(partition: str, fill: str) -> None:
    x = random_images((2, 3, 6, 10), seed=1)
    sigma = sigma_for(partition)
    stream = torch.tensor([3, 10])
    out = views(x.cuda(), sigma, num=3, stream=stream, partition=partition, fill=fill)
    ref = reference.noisy_views(
        x, sigma, num=3, seed=20240611, offset=5, stream=stream, partition=partition, fill_mode=fill
    )
    assert_close_to(out.cpu(), ref, reference_atol(x, sigma))


@pytest.mark.parametrize("partition", ["diag", "none"])
@pytest.mark.parametrize(
    ("seed", "offset", "stream_id"),
    [(0, 0, 0), (2**32 + 7, 2**32 - 2, 2**32 - 1), (2**63 - 1, 2**56 - 8, 123456789)],
)
def test_cuda_equals_cpu_for_large_counters(
    partition: str, seed: int, offset: int, stream_id: int
) -> None:
    x = random_images((1, 3, 8, 12), seed=2)
    sigma = sigma_for(partition)
    kw = {"num": 4, "seed": seed, "offset": offset, "stream": torch.tensor([stream_id])}
    cpu = views(x, sigma, partition=partition, **kw)  # type: ignore[arg-type]
    cuda = views(x.cuda(), sigma, partition=partition, **kw)  # type: ignore[arg-type]
    assert_close_to(cuda.cpu(), cpu, parity_atol(x, sigma))


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_chunks_and_batches_are_independent_on_cuda(partition: str, fill: str) -> None:
    x = random_images((3, 3, 6, 10), seed=3).cuda()
    sigma = sigma_for(partition)
    stream = torch.tensor([9, 2**32 - 1, 4])
    kw = {"stream": stream, "partition": partition, "fill": fill}
    whole = views(x, sigma, num=10, offset=0, **kw)  # type: ignore[arg-type]
    first = views(x, sigma, num=4, offset=0, **kw)  # type: ignore[arg-type]
    rest = views(x, sigma, num=6, offset=4, **kw)  # type: ignore[arg-type]
    assert torch.equal(whole, torch.cat([first, rest], dim=2))
    assert torch.equal(whole, views(x, sigma, num=10, offset=0, **kw))  # type: ignore[arg-type]
    for n in range(3):
        alone = views(
            x[n : n + 1],
            sigma,
            num=10,
            offset=0,
            stream=stream[n : n + 1],
            partition=partition,
            fill=fill,
        )
        assert torch.equal(whole[n : n + 1], alone)


@pytest.mark.parametrize(
    ("partition", "fill", "out_dtype"),
    [(p, f, torch.float32) for p, f in CASES] + [("diag", "neighbors", torch.float16)],
)
def test_large_launches_share_chunks_and_equal_small_ones(
    partition: str, fill: str, out_dtype: torch.dtype
) -> None:
    """The launcher gives a block a chunk of several samples only when the launch has blocks to
    spare (at least 32 per multiprocessor; csrc/cuda/noisy_views_kernel.cu): never in the small
    calls above. 24 CIFAR images x 1000 draws get chunks of 2 or more on any GPU with up to 750
    multiprocessors (diag: 24,000 blocks at chunks of 2; an H100's 132 give chunks of 8 here,
    and the none kernel's chunks of 16); each image's own call gets chunks of 1 on any GPU with
    47 or more. Same views, bit for bit."""
    x = random_images((24, 3, 32, 32), seed=7).cuda()
    stream = torch.arange(24) * 5 + 1
    kw = {"partition": partition, "fill": fill, "out_dtype": out_dtype, "offset": 0}
    whole = views(x, sigma_for(partition), num=1000, stream=stream, **kw)  # type: ignore[arg-type]
    for n in range(24):
        alone = views(x[n : n + 1], sigma_for(partition), num=1000, stream=stream[n : n + 1], **kw)  # type: ignore[arg-type]
        assert torch.equal(whole[n], alone[0]), n


def test_imagenet_launch_shares_chunks_and_equals_single_draws() -> None:
    """An ImageNet call of 250 draws (19 tiles with halo rows, 2 samples' windows per block on
    a GPU with up to 148 multiprocessors) equals 250 calls of one draw each, bit for bit."""
    x = random_images((1, 3, 224, 224), seed=8).cuda()
    whole = views(x, [0.25, 0.75], num=250, offset=0)
    for k in range(250):
        assert torch.equal(whole[:, :, k : k + 1], views(x, [0.25, 0.75], num=1, offset=k)), k


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_unaligned_and_non_contiguous_input(partition: str, fill: str) -> None:
    """x one float past a 16-byte boundary, and a permuted view: same output as a fresh copy."""
    shape = (2, 3, 8, 8)  # C·H·W a multiple of 4: the aligned fast path unless x is offset
    storage = random_images((2 * 3 * 8 * 8 + 1,), seed=4).cuda()
    x = storage[1:].view(shape)
    assert x.data_ptr() % 16 != 0
    sigma = sigma_for(partition)
    kw = {"num": 3, "partition": partition, "fill": fill}
    assert torch.equal(views(x, sigma, **kw), views(x.clone(), sigma, **kw))  # type: ignore[arg-type]
    permuted = random_images((2, 8, 8, 3), seed=5).cuda().permute(0, 3, 1, 2)
    assert not permuted.is_contiguous()
    assert torch.equal(
        views(permuted, sigma, **kw),
        views(permuted.contiguous(), sigma, **kw),  # type: ignore[arg-type]
    )


def test_empty_batch_on_cuda() -> None:
    x = torch.zeros(0, 3, 4, 6, device="cuda")
    out = views(x, [0.5], num=3)
    assert out.shape == (0, 2, 3, 3, 4, 6) and out.is_cuda


def test_stream_on_another_device_is_an_error() -> None:
    x = random_images((1, 3, 4, 6), seed=6).cuda()
    with pytest.raises(RuntimeError, match="stream must be on x's device"):
        torch.ops.drs_ext.noisy_views(
            x, [0.5], 2, 0, 0, torch.tensor([0]), "diag", "neighbors", None
        )


@pytest.mark.parametrize("partition", ["diag", "none"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_x_stops_the_kernel(partition: str, bad: str) -> None:
    """One NaN or Inf anywhere in x stops the call with the device-side assert of
    assert_finite_kernel (in a subprocess: a device assert is fatal to the CUDA context), and the
    same x without it runs."""
    code = textwrap.dedent(
        f"""
        import torch, drs_ext
        x = torch.rand(2, 3, 20, 24, device="cuda")
        drs_ext.noisy_views(x, 0.5, num=4, seed=1, partition="{partition}")
        torch.cuda.synchronize()
        print("finite x: ok", flush=True)
        x[1, 2, 19, 23] = float("{bad}")
        drs_ext.noisy_views(x, 0.5, num=4, seed=1, partition="{partition}")
        torch.cuda.synchronize()
        print("non-finite x: no error", flush=True)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert "finite x: ok" in run.stdout, output
    assert "non-finite x: no error" not in run.stdout, output
    assert run.returncode != 0, output
    assert "x must be finite" in output and "device-side assert" in output, output


@pytest.mark.parametrize(
    ("partition", "fill", "out_dtype"),
    [("diag", "neighbors", None), ("diag", "bilinear", torch.bfloat16), ("none", "zeros", None)],
)
def test_opcheck_noisy_views_cuda(partition: str, fill: str, out_dtype: torch.dtype | None) -> None:
    x = random_images((2, 3, 4, 6), seed=7).cuda()
    stream = torch.tensor([3, 8], device="cuda")
    args = (x, [0.5], 3, 7, 0, stream, partition, fill, out_dtype)
    torch.library.opcheck(torch.ops.drs_ext.noisy_views.default, args)
    x_grad = x.clone().requires_grad_(True)
    args = (x_grad, [0.5], 3, 7, 0, stream, partition, fill, None)
    torch.library.opcheck(torch.ops.drs_ext.noisy_views.default, args)


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_gradient_on_cuda_equals_cpu(partition: str, fill: str) -> None:
    """noisy_views is affine in x; its gradient (drs_ext.ops autograd) is the same on CUDA."""
    x = random_images((2, 3, 6, 8), seed=9)
    weight = torch.randn(2, 2 if partition == "diag" else 1, 3, 3, 6, 8)
    grads = []
    for device in ("cpu", "cuda"):
        # A copy on each device: x.to("cpu") would be x itself, and requires_grad_ would then
        # make the CUDA copy a non-leaf.
        xd = x.to(device, copy=True).requires_grad_(True)
        out = drs_ext.noisy_views(xd, 0.5, num=3, seed=1, partition=partition, fill=fill)
        (out * weight.to(device)).sum().backward()
        assert xd.grad is not None
        grads.append(xd.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# vote_counts


def bincount_votes(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) -> (G, K): torch.argmax (first maximum) + torch.bincount, NaN rows dropped."""
    logits = logits.cpu().double()
    groups, _, classes = logits.shape
    rows = []
    for g in range(groups):
        valid = ~torch.isnan(logits[g]).any(dim=-1)
        winners = logits[g][valid].argmax(dim=-1)
        rows.append(torch.bincount(winners, minlength=classes))
    return torch.stack(rows) if rows else torch.zeros(0, classes, dtype=torch.int64)


def tied_logits(groups: int, rows: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Few distinct values (many ties), some rows with a NaN, some with ±inf."""
    gen = torch.Generator().manual_seed(groups * 1000 + rows + classes)
    logits = torch.randint(-2, 3, (groups, rows, classes), generator=gen).to(dtype)
    pick = torch.rand(groups, rows, generator=gen)
    cols = torch.randint(0, classes, (groups, rows), generator=gen)
    g, s = torch.nonzero(pick < 0.05, as_tuple=True)
    logits[g, s, cols[g, s]] = float("nan")
    g, s = torch.nonzero((pick >= 0.05) & (pick < 0.08), as_tuple=True)
    logits[g, s, cols[g, s]] = float("inf")
    g, s = torch.nonzero((pick >= 0.08) & (pick < 0.1), as_tuple=True)
    logits[g, s] = float("-inf")
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *DTYPES[1:]], ids=str)
@pytest.mark.parametrize("classes", [1, 2, 10, 64, 65, 100, 1000])
def test_vote_counts_equal_bincount(dtype: torch.dtype, classes: int) -> None:
    logits = tied_logits(3, 517, classes, dtype)
    expected = bincount_votes(logits)
    cuda = drs_ext.vote_counts(logits.cuda())
    assert cuda.is_cuda and cuda.dtype == torch.int64
    assert torch.equal(cuda.cpu(), expected)
    assert torch.equal(cuda.cpu(), drs_ext.vote_counts(logits))  # the CPU kernel


def test_vote_counts_nan_rows_and_ties() -> None:
    nan = float("nan")
    logits = torch.tensor(
        [[[1.0, 3.0, 3.0], [nan, 5.0, 1.0], [2.0, 2.0, 2.0], [0.0, -1.0, nan], [-0.0, 0.0, -1.0]]]
    )
    expected = torch.tensor([[2, 1, 0]])  # rows 0, 2, 4 vote 1, 0, 0; rows 1, 3 vote for none
    assert torch.equal(drs_ext.vote_counts(logits.cuda()).cpu(), expected)
    wide = torch.zeros(1, 2, 300)
    wide[0, 0, 200] = wide[0, 0, 250] = 1.0  # tie across the warp's lane slices
    wide[0, 1, 299] = nan
    expected = torch.zeros(1, 300, dtype=torch.int64)
    expected[0, 200] = 1
    assert torch.equal(drs_ext.vote_counts(wide.cuda()).cpu(), expected)


@pytest.mark.parametrize(("groups", "rows", "classes"), [(70_000, 2, 3), (1, 300_000, 10)])
def test_vote_counts_large_grids(groups: int, rows: int, classes: int) -> None:
    logits = torch.randn(groups, rows, classes)
    assert torch.equal(drs_ext.vote_counts(logits.cuda()).cpu(), drs_ext.vote_counts(logits))


def test_vote_counts_empty_and_non_contiguous() -> None:
    for shape in [(0, 5, 3), (2, 0, 3)]:
        counts = drs_ext.vote_counts(torch.zeros(shape, device="cuda"))
        assert torch.equal(counts.cpu(), torch.zeros(shape[0], shape[2], dtype=torch.int64))
    logits = torch.randn(4, 10, 70).transpose(0, 1)  # (10, 4, 70), non-contiguous
    assert torch.equal(drs_ext.vote_counts(logits.cuda()).cpu(), bincount_votes(logits))


@pytest.mark.parametrize("classes", [10, 1000])
def test_opcheck_vote_counts_cuda(classes: int) -> None:
    logits = torch.randn(2, 33, classes, device="cuda")
    torch.library.opcheck(torch.ops.drs_ext.vote_counts.default, (logits,))


# ----------------------------------------------------------------------------------------------
# CUDA graphs and certification


def test_cuda_graph_replay_equals_eager() -> None:
    """noisy_views + a "model" + vote_counts captured in a CUDA graph: no host synchronisation
    or allocation outside the graph's pool, and a replay gives the eager result."""
    x = random_images((2, 3, 8, 10), seed=8).cuda()
    stream = torch.tensor([4, 9], device="cuda")
    classes, num = 7, 64

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out = drs_ext.noisy_views(x, 0.5, num=num, seed=11, offset=3, stream=stream)
        logits = out.flatten(3)[..., :classes]  # (N, P, num, K): a view, not contiguous
        return out, drs_ext.vote_counts(logits.reshape(-1, num, classes))

    eager_views, eager_counts = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_views, graph_counts = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_views, eager_views)
    assert torch.equal(graph_counts, eager_counts)
    assert int(graph_counts.sum()) == 2 * 2 * num


class MeanMargin(nn.Module):
    """Three classes by the sign of mean(x) - 1/2, computed in float64: the vote of a view
    flips between devices only if its mean lies within ~1e-9 of 1/2."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        t = (v.double().mean(dim=(1, 2, 3)) - 0.5) * 100.0
        return torch.stack([t, torch.zeros_like(t), -t], dim=1).float()


def test_certify_on_cuda_equals_cpu() -> None:
    from drs_ext.smoothing import DualSmoothedClassifier, SmoothedClassifier

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


@pytest.mark.parametrize("partition", ["diag", "none"])
def test_prefetched_views_are_the_op_views(partition: str) -> None:
    from drs_ext.smoothing import DualSmoothedClassifier, SmoothedClassifier

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
    expected = views(
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


def test_prefetch_changes_no_certificate() -> None:
    from drs_ext.smoothing import DualSmoothedClassifier

    x = torch.full((3, 16, 16), 0.51, device="cuda")
    kw = {"n0": 64, "n": 3000, "alpha": 0.001, "batch_size": 256, "seed": 5}
    results = [
        DualSmoothedClassifier(MeanMargin(), MeanMargin(), 3, 0.25, prefetch_noise=p).certify(
            x,
            **kw,  # type: ignore[arg-type]
        )
        for p in (True, False)
    ]
    assert results[0] == results[1]
    assert results[0][0] == 0 and results[0][1] > 0.0


def test_repeated_calls_reuse_the_views_memory() -> None:
    """A second sample_counts call of the same shapes allocates no new device memory: the views
    are prefetched on one side stream per device, whose freed blocks the caching allocator hands
    back. (On a new stream per call, each call would start new segments: cudaMalloc per image.)"""
    from drs_ext.smoothing import DualSmoothedClassifier

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
    from drs_ext import smoothing

    x = random_images((3, 8, 8), seed=33).cuda()
    smoothed = smoothing.DualSmoothedClassifier(MeanMargin(), MeanMargin(), 3, 0.25, **options)  # type: ignore[arg-type]
    draws, batch = [70, 70], 16  # 5 batches per branch, the last one partial
    kw = {"seed": 3, "stream": 7, "offset": 0}
    expected = smoothed.sample_counts(x, draws, batch, **kw)  # type: ignore[arg-type]  # warm-up
    if options.get("cuda_graph"):
        assert len(smoothed.model_call._graphs) == 4  # 2 models x 2 batch shapes, captured

    gate_open: list[bool] = []
    real_vote_counts = smoothing.vote_counts

    def polling_vote_counts(logits: torch.Tensor) -> torch.Tensor:
        gate_open.append(gate.query())
        return real_vote_counts(logits)

    monkeypatch.setattr(smoothing, "vote_counts", polling_vote_counts)
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
        smoothing,
        "vote_counts",
        lambda logits: (polling_vote_counts(logits), logits.sum().item())[0],
    )
    gate = torch.cuda.Event()
    torch.cuda._sleep(1_000_000_000)
    gate.record()
    smoothed.sample_counts(x, draws, batch, **kw)  # type: ignore[arg-type]
    assert gate_open[0] is False and all(gate_open[1:])


@pytest.mark.parametrize(
    "options",
    [
        {"prefetch_noise": False},
        {"cuda_graph": True},
        {"channels_last": True},
        {"autocast_dtype": torch.float16},
        {"cuda_graph": True, "channels_last": True, "autocast_dtype": torch.bfloat16},
    ],
    ids=str,
)
def test_model_call_options_change_no_certificate(options: dict[str, object]) -> None:
    """The options touch only the model call; MeanMargin's logits (float64 means, no autocast
    op) do not depend on them, so neither may the certificate."""
    from drs_ext.smoothing import DualSmoothedClassifier, SmoothedClassifier

    x = torch.full((3, 16, 16), 0.51, device="cuda")
    kw = {"n0": 64, "n": 2000, "alpha": 0.001, "batch_size": 300, "seed": 5}
    for make in (
        lambda **o: SmoothedClassifier(MeanMargin(), 3, 0.25, **o),
        lambda **o: DualSmoothedClassifier(MeanMargin(), MeanMargin(), 3, 0.25, **o),
    ):
        plain = make().certify(x, **kw)
        with_options = make(**options)
        assert with_options.certify(x, **kw) == plain
        assert plain[0] == 0 and plain[1] > 0.0
        if options.get("cuda_graph"):
            assert with_options.model_call._graphs, "cuda_graph=True captured no graph"


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


@pytest.mark.parametrize(
    "options",
    [{}, {"autocast_dtype": torch.float16, "channels_last": True}],
    ids=["float32", "fp16+channels_last"],
)
def test_graphed_model_call_equals_eager(options: dict[str, object]) -> None:
    """ModelCall(cuda_graph=True): a replay reads the new views and gives the eager logits."""
    from drs_ext.model_call import ModelCall

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
