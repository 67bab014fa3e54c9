"""noisy_views with σ per image: `sigma` as a tensor of shape (N,) (one σ per image, every
branch) or (N, P) (one per image and branch), on every device.

What a caller relies on: the tensor forms draw the same Philox counters as the float and list
forms, so a tensor holding the same values gives the same views bit for bit (float64 rounded once
to float32, as a float is); and image n of a batch gets exactly the views it gets alone with its
own σ and stream id, so certifying or training code may batch images of different σ. The values
are checked against drs_ext.reference and against the closed form σ·ε at x = 0. The op's checks
of a σ tensor's shape, dtype and values are in test_op_errors.py (its device, and the rule "a
list or a tensor, not both", here); opcheck and torch.compile in test_torch_integration.py;
gradients in test_autograd.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    CASES,
    assert_close_to,
    branches,
    parity_atol,
    random_images,
    reference_atol,
    requires_cuda,
)

import drs_ext
from drs_ext import reference

X = torch.rand(2, 3, 4, 6)
OP = torch.ops.drs_ext.noisy_views.default
SIGMA_T = r"sigma as a tensor \(sigma_per_image\)"  # the op's messages (test_op_errors.py)
SIGMA_VALUE = r"sigma must be finite and > 0 in float32, got "
STREAM = [5, 17, 9, 2**32 - 1]  # per-image ids, not the positions in the batch
SIGMA_N = [0.25, 1.5, 0.5, 0.125]  # one σ per image, all different
SIGMA_NP = [[0.25, 1.0], [1.5, 0.0625], [0.5, 0.5], [0.125, 2.0]]  # one per image and branch


def sigma_table(partition: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, P) σ: a different value for every image and branch."""
    table = torch.tensor(SIGMA_NP, dtype=dtype)
    return table if partition == "diag" else table[:, :1]


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_a_tensor_of_the_same_values_gives_the_same_views(
    device: torch.device, partition: str, fill: str
) -> None:
    """Every tensor form of one σ, or of one σ per branch, equals the float or list form bit
    for bit: the same counters, the same float32 σ."""
    x = random_images((3, 3, 5, 6), seed=1).to(device)
    kw = {"num": 3, "seed": 12, "offset": 7, "partition": partition, "fill": fill}
    n, p = 3, branches(partition)
    scalar = drs_ext.noisy_views(x, 0.3, **kw)  # type: ignore[arg-type]
    forms = {
        "(N,) float32": torch.full((n,), 0.3, device=device),
        "(N,) float64": torch.full((n,), 0.3, dtype=torch.float64, device=device),
        "(N, P) float32": torch.full((n, p), 0.3, device=device),
        "(N, P) float64": torch.full((n, p), 0.3, dtype=torch.float64, device=device),
        "0-d": torch.tensor(0.3, device=device),
        "(N,) stride 0": torch.tensor(0.3, device=device).expand(n),
        "(N, P) transposed": torch.full((p, n), 0.3, device=device).t(),
    }
    for name, sigma in forms.items():
        assert torch.equal(drs_ext.noisy_views(x, sigma, **kw), scalar), name  # type: ignore[arg-type]
    if partition == "diag":
        pair = drs_ext.noisy_views(x, [0.3, 1.7], **kw)  # type: ignore[arg-type]
        rows = torch.tensor([[0.3, 1.7]] * n, dtype=torch.float64, device=device)
        assert torch.equal(drs_ext.noisy_views(x, rows, **kw), pair)  # type: ignore[arg-type]
    half = drs_ext.noisy_views(x, forms["(N,) float32"], out_dtype=torch.float16, **kw)  # type: ignore[arg-type]
    assert torch.equal(half, scalar.to(torch.float16))


@pytest.mark.parametrize(("partition", "fill"), CASES)
@pytest.mark.parametrize("shape", ["(N,)", "(N, P)"])
def test_each_image_gets_its_views_alone(
    device: torch.device, partition: str, fill: str, shape: str
) -> None:
    """Image n of a batch with σ per image gets exactly the views of x[n] alone, with its σ as
    a float (or its row as a per-branch list) and its stream id: a batch may mix σ levels."""
    x = random_images((4, 3, 4, 6), seed=2).to(device)
    stream = torch.tensor(STREAM, device=device)
    kw = {"num": 5, "seed": 31, "offset": 2**40, "partition": partition, "fill": fill}
    sigma = torch.tensor(SIGMA_N) if shape == "(N,)" else sigma_table(partition)
    batch = drs_ext.noisy_views(x, sigma.to(device), stream=stream, **kw)  # type: ignore[arg-type]
    for n in range(4):
        alone_sigma = float(sigma[n]) if shape == "(N,)" else sigma[n].tolist()
        alone = drs_ext.noisy_views(x[n : n + 1], alone_sigma, stream=stream[n : n + 1], **kw)  # type: ignore[arg-type]
        assert torch.equal(batch[n : n + 1], alone), n
    # Reordered images with their σ and stream ids: the views reorder with them.
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = drs_ext.noisy_views(
        x[perm.to(device)], sigma[perm].to(device), stream=stream[perm.to(device)], **kw
    )  # type: ignore[arg-type]
    assert torch.equal(shuffled, batch[perm.to(device)])


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_sigma_per_image_equals_the_reference(
    device: torch.device, partition: str, fill: str
) -> None:
    x = random_images((4, 3, 5, 6), seed=3)
    sigma = sigma_table(partition)
    stream = torch.tensor(STREAM)
    kw = {"num": 3, "seed": 20240611, "offset": 5, "partition": partition, "fill": fill}
    out = drs_ext.noisy_views(x.to(device), sigma.to(device), stream=stream.to(device), **kw)  # type: ignore[arg-type]
    ref = reference.noisy_views(x, sigma, stream=stream, **kw)  # type: ignore[arg-type]
    assert_close_to(out, ref, reference_atol(x, sigma.flatten().tolist()))


def test_noise_is_sigma_times_the_unit_draw(device: torch.device) -> None:
    """x = 0 and no fill arithmetic ("none"; "diag" with "zeros" or "pair"): out[n, p] = σ[n, p]·ε
    exactly, with ε the σ = 1 draw of the same counters. A σ read for the wrong image or branch
    would show as a ratio other than σ[n, p]."""
    x = torch.zeros(4, 2, 3, 4, device=device)
    stream = torch.tensor(STREAM, device=device)
    for partition, fill in [("none", "zeros"), ("diag", "zeros"), ("diag", "pair")]:
        kw = {"num": 3, "seed": 8, "stream": stream, "partition": partition, "fill": fill}
        unit = drs_ext.noisy_views(x, 1.0, **kw)  # type: ignore[arg-type]
        sigma = sigma_table(partition).to(device)
        out = drs_ext.noisy_views(x, sigma, **kw)  # type: ignore[arg-type]
        assert torch.equal(out, sigma[:, :, None, None, None, None] * unit)
        assert float(unit.abs().max()) > 0.5


@requires_cuda
@pytest.mark.parametrize(
    ("partition", "fill", "shape", "num"),
    [
        ("diag", "neighbors", (3, 3, 32, 32), 40),  # chunks of several samples per block
        ("diag", "bilinear", (2, 3, 20, 300), 3),  # column tiles (W/2 > 128)
        ("diag", "pair", (3, 1, 7, 6), 9),  # C·H·W not a multiple of 8: one sample per chunk
        ("none", "neighbors", (3, 3, 32, 32), 40),
        ("none", "neighbors", (2, 1, 3, 5), 17),  # unaligned planes: the scalar path
    ],
)
def test_cuda_equals_cpu_with_sigma_per_image(
    partition: str, fill: str, shape: tuple[int, int, int, int], num: int
) -> None:
    """The CUDA kernels read σ once per chunk of samples of one (image, branch) row: on
    launches of every chunk and tile layout they agree with the CPU kernel, and equal their own
    scalar-σ output where every σ is the same."""
    x = random_images(shape, seed=sum(shape))
    n = shape[0]
    sigma = sigma_table(partition)[:n]
    stream = torch.tensor(STREAM[:n])
    kw = {"num": num, "seed": 77, "offset": 3, "partition": partition, "fill": fill}
    cpu = drs_ext.noisy_views(x, sigma, stream=stream, **kw)  # type: ignore[arg-type]
    cuda = drs_ext.noisy_views(x.cuda(), sigma.cuda(), stream=stream.cuda(), **kw)  # type: ignore[arg-type]
    assert_close_to(cuda, cpu, parity_atol(x, sigma.flatten().tolist()))
    same = drs_ext.noisy_views(x.cuda(), torch.full((n,), 0.5).cuda(), stream=stream.cuda(), **kw)  # type: ignore[arg-type]
    assert torch.equal(same, drs_ext.noisy_views(x.cuda(), 0.5, stream=stream.cuda(), **kw))  # type: ignore[arg-type]


@requires_cuda
@pytest.mark.parametrize("partition", ["diag", "none"])
@pytest.mark.parametrize("bad", ["0.0", "-1.0", "float('nan')", "float('inf')", "1e-50"])
def test_bad_sigma_per_image_stops_the_cuda_kernel(partition: str, bad: str) -> None:
    """A σ that is not finite and > 0 in float32 stops the call with the device-side assert of
    assert_inputs_kernel (in a subprocess: a device assert is fatal to the CUDA context); the
    same call with good σ runs. (The CPU kernel raises a RuntimeError: test_op_errors.py.)"""
    code = textwrap.dedent(
        f"""
        import torch, drs_ext
        x = torch.rand(3, 3, 20, 24, device="cuda")
        sigma = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64, device="cuda")
        drs_ext.noisy_views(x, sigma, num=4, seed=1, partition="{partition}")
        torch.cuda.synchronize()
        print("good sigma: ok", flush=True)
        sigma[2] = {bad}
        drs_ext.noisy_views(x, sigma, num=4, seed=1, partition="{partition}")
        torch.cuda.synchronize()
        print("bad sigma: no error", flush=True)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert "good sigma: ok" in run.stdout, output
    assert "bad sigma: no error" not in run.stdout, output
    assert run.returncode != 0, output
    assert "sigma must be finite and > 0" in output and "device-side assert" in output, output


def test_a_sigma_tensor_is_per_image() -> None:
    """A tensor holds one σ per image, not one per branch as a list does: (σ0, σ1) as a tensor
    for a batch of two gives image n the σn of both branches."""
    out = drs_ext.noisy_views(X, torch.tensor([0.5, 0.25]), num=1, seed=0)
    for n, sigma in enumerate((0.5, 0.25)):
        alone = drs_ext.noisy_views(X[n : n + 1], sigma, num=1, seed=0, stream=torch.tensor([n]))
        assert torch.equal(out[n : n + 1], alone)
    assert not torch.equal(out, drs_ext.noisy_views(X, [0.5, 0.25], num=1, seed=0))
    # A 0-d tensor is one σ for all (the wrapper expands it to (N,)); its values are checked.
    assert torch.equal(drs_ext.noisy_views(X, torch.tensor(0.5), num=1, seed=0),
                       drs_ext.noisy_views(X, 0.5, num=1, seed=0))  # fmt: skip
    with pytest.raises(RuntimeError, match=rf"^noisy_views: {SIGMA_VALUE}0 for image 0$"):
        drs_ext.noisy_views(X, torch.tensor(0.0), num=1, seed=0)


def test_the_op_takes_sigma_as_a_list_or_a_tensor_not_both() -> None:
    stream = torch.arange(2)
    args = (X, [0.5], 1, 0, 0, stream, "diag", "neighbors", None)
    with pytest.raises(
        RuntimeError,
        match=r"^noisy_views: sigma must be empty when sigma_per_image is given .*got 1 values",
    ):
        OP(*args, torch.full((2,), 0.5))
    with pytest.raises(RuntimeError, match=r"^noisy_views: sigma must hold 1 value .*got 0"):
        OP(X, [], *args[2:], None)


@requires_cuda
@pytest.mark.parametrize("where", ["x on CUDA", "sigma on CUDA"])
def test_a_sigma_tensor_must_be_on_xs_device(where: str) -> None:
    x, sigma = X, torch.full((2,), 0.5)
    if where == "x on CUDA":
        x = x.cuda()
    else:
        sigma = sigma.cuda()
    stream = torch.arange(2, device=x.device)
    for call_sigma in (sigma, sigma.double(), torch.tensor(0.5, device=sigma.device)):
        with pytest.raises(RuntimeError, match=rf"^noisy_views: {SIGMA_T} must be on x's device"):
            drs_ext.noisy_views(x, call_sigma, num=1, seed=0, stream=stream)
