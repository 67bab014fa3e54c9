"""The ops inside PyTorch's machinery, on every device: torch.library.opcheck (schema, fake impl,
autograd registration, AOT dispatch), torch.compile with fullgraph=True, fake tensors, and a
capture in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from conftest import make_generator, random_images, requires_cuda

import drs_ext


@pytest.mark.parametrize(
    ("partition", "fill", "out_dtype"),
    [("diag", "neighbors", None), ("diag", "bilinear", torch.bfloat16), ("none", "zeros", None)],
)
def test_opcheck_noisy_views(
    device: torch.device, partition: str, fill: str, out_dtype: torch.dtype | None
) -> None:
    x = random_images((2, 3, 4, 6), seed=18).to(device)
    stream = torch.tensor([3, 8], device=device)
    args = (x, [0.5], 3, 7, 0, stream, partition, fill, out_dtype)
    torch.library.opcheck(torch.ops.drs_ext.noisy_views.default, args)
    # x requiring grad: opcheck also traces the registered backward (AOT, static and dynamic).
    x_grad = x.clone().requires_grad_(True)
    args = (x_grad, [0.5], 3, 7, 0, stream, partition, fill, None)
    torch.library.opcheck(torch.ops.drs_ext.noisy_views.default, args)


@pytest.mark.parametrize("partition", ["diag", "none"])
def test_opcheck_noisy_views_with_sigma_per_image(device: torch.device, partition: str) -> None:
    """The tensor form of sigma (the op's sigma_per_image): (N,) and (N, P), float32 and float64,
    with x and sigma requiring grad (the backward of both traced)."""
    x = random_images((2, 3, 4, 6), seed=19).to(device)
    stream = torch.tensor([3, 8], device=device)
    p = 2 if partition == "diag" else 1
    forms = [
        torch.tensor([0.5, 1.25], device=device),
        torch.tensor([[0.5, 0.25], [1.0, 2.0]], dtype=torch.float64, device=device)[:, :p],
    ]
    op = torch.ops.drs_ext.noisy_views.default
    for sigma in forms:
        args = (x, [], 3, 7, 0, stream, partition, "bilinear", None, sigma)
        torch.library.opcheck(op, args)
        grads = (x.clone().requires_grad_(), sigma.clone().requires_grad_())
        args = (grads[0], [], 3, 7, 0, stream, partition, "bilinear", None, grads[1])
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_opcheck_vote_counts(device: torch.device, dtype: torch.dtype) -> None:
    gen = make_generator(6)
    # 1000 classes: the CUDA kernel's warp-per-row case (once, in float32).
    for shape in [(3, 20, 5)] + [(2, 33, 1000)] * (dtype == torch.float32):
        logits = torch.randn(*shape, generator=gen).to(dtype)
        logits[1, 2, 3] = float("nan")
        torch.library.opcheck(torch.ops.drs_ext.vote_counts.default, (logits.to(device),))


@pytest.mark.parametrize("with_stream", [False, True])
@pytest.mark.parametrize("sigma_form", ["list", "(N,)", "(N, P)", "0-d"])
def test_public_call_compiles_as_one_graph(
    device: torch.device, with_stream: bool, sigma_form: str
) -> None:
    """drs_ext.noisy_views under torch.compile(fullgraph=True): no check of the wrapper reads
    tensor data (which would break the graph), and the compiled views and gradients (in x, and
    in a tensor sigma) equal the eager ones."""
    x = random_images((2, 3, 4, 6), seed=20).to(device)
    stream = torch.tensor([3, 8], device=device) if with_stream else None
    sigma = {
        "list": [0.5, 0.25],
        "(N,)": torch.tensor([0.5, 0.25], device=device),
        "(N, P)": torch.tensor([[0.5, 0.25], [1.0, 0.125]], device=device),
        "0-d": torch.tensor(0.5, device=device),
    }[sigma_form]

    def loss(x: torch.Tensor, sigma: list[float] | torch.Tensor) -> torch.Tensor:
        views = drs_ext.noisy_views(x, sigma, num=3, seed=7, offset=2, stream=stream)
        return (views * views).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        xg = x.clone().requires_grad_()
        sg = sigma.clone().requires_grad_() if isinstance(sigma, torch.Tensor) else sigma
        value = fn(xg, sg)
        value.backward()
        results.append((value.detach(), xg.grad, getattr(sg, "grad", None)))
    for eager, traced in zip(*results, strict=True):
        assert (eager is None and traced is None) or torch.equal(eager, traced)


def test_fake_impl_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 2, 4, 6)
        stream = torch.arange(3)
        for partition, p in (("diag", 2), ("none", 1)):
            for dtype in (None, torch.float16, torch.bfloat16):
                out = torch.ops.drs_ext.noisy_views(
                    x, [0.5], 5, 1, 0, stream, partition, "pair", dtype
                )
                assert out.shape == (3, p, 5, 2, 4, 6)
                assert out.dtype == (dtype or torch.float32)
            sigma = torch.empty(3, p, dtype=torch.float64)
            out = torch.ops.drs_ext.noisy_views(
                x, [], 5, 1, 0, stream, partition, "pair", None, sigma
            )
            assert out.shape == (3, p, 5, 2, 4, 6) and out.dtype == torch.float32
        counts = torch.ops.drs_ext.vote_counts(torch.empty(4, 9, 7))
        assert counts.shape == (4, 7) and counts.dtype == torch.int64


@requires_cuda
@pytest.mark.parametrize("sigma_form", ["float", "(N,) float64"])
def test_cuda_graph_replay_equals_eager(sigma_form: str) -> None:
    """noisy_views + a "model" + vote_counts captured in a CUDA graph: no host synchronisation
    or allocation outside the graph's pool, and a replay gives the eager result (also with σ
    per image, which the op converts to float32 and checks on the device)."""
    x = random_images((2, 3, 8, 10), seed=8).cuda()
    stream = torch.tensor([4, 9], device="cuda")
    classes, num = 7, 64
    sigma = 0.5 if sigma_form == "float" else torch.tensor([0.5, 1.5]).double().cuda()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out = drs_ext.noisy_views(x, sigma, num=num, seed=11, offset=3, stream=stream)
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
