"""Gradients of noisy_views with respect to x, on every device.

The views are affine in x (out = A x + noise, the noise fixed by the seed), so the backward must be
the adjoint Aᵀ. Checked three ways: against the autograd of the reference's fill ∘ sub-image map
(written with differentiable torch ops, in float64), by the identity <Aᵀ g, u> = <g, f(x + u) −
f(x)> with the same seed, and with torch.autograd.gradcheck (finite differences are exact for an
affine map up to float32 rounding).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, FILLS, branches, make_generator, random_images

import drs_ext
from drs_ext import reference

SHAPES: list[tuple[int, int, int, int]] = [(2, 3, 5, 6), (1, 1, 1, 2), (3, 2, 4, 2)]


def views(x: torch.Tensor, partition: str, fill: str, num: int = 3, seed: int = 5) -> torch.Tensor:
    sigma = (0.3, 0.6) if partition == "diag" else 0.4
    return drs_ext.noisy_views(
        x,
        sigma,
        num=num,
        seed=seed,
        stream=torch.arange(x.shape[0], device=x.device) + 10,
        partition=partition,
        fill=fill,
    )


def reference_adjoint(
    grad_out: torch.Tensor, x: torch.Tensor, partition: str, fill: str
) -> torch.Tensor:
    """Aᵀ grad_out via autograd through drs_ext.reference's sub_image and fill, in float64 on
    the CPU."""
    xd = x.detach().cpu().double().requires_grad_()
    summed = grad_out.cpu().double().sum(dim=2)  # every sample applies the same A_p
    loss = torch.zeros((), dtype=torch.float64)
    for p in range(branches(partition)):
        if partition == "none":
            image = xd
        else:
            image = reference.fill(reference.sub_image(xd, p), p, x.shape[-1], fill)
        loss = loss + (summed[:, p] * image).sum()
    (grad,) = torch.autograd.grad(loss, xd)
    return grad


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_backward_is_the_adjoint_of_the_reference_map(
    device: torch.device, partition: str, fill: str
) -> None:
    for shape in SHAPES:
        x = random_images(shape, seed=1).to(device).requires_grad_()
        out = views(x, partition, fill)
        grad_out = torch.randn(out.shape, generator=make_generator(2)).to(device)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        assert grad.shape == x.shape and grad.dtype == torch.float32 and grad.device == device
        expected = reference_adjoint(grad_out, x, partition, fill)
        torch.testing.assert_close(grad.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_vector_jacobian_identity(device: torch.device, partition: str, fill: str) -> None:
    """<x.grad, u> = <grad_out, f(x + u) − f(x)> for the same seed, since f is affine in x."""
    gen = make_generator(3)
    x = random_images((2, 3, 5, 6), seed=4).to(device).requires_grad_()
    u = torch.randn(x.shape, generator=gen).to(device)
    out = views(x, partition, fill)
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    out.backward(grad_out)
    assert x.grad is not None
    lhs = float((x.grad.double() * u.double()).sum())
    with torch.no_grad():
        moved = views(x + u, partition, fill)
    out = out.detach()
    rhs = float((grad_out.double() * (moved.double() - out.double())).sum())
    # float32 rounding of the two forward passes: a few ulps of each output element.
    bound = 1e-6 * float((grad_out.abs() * (1 + out.abs() + moved.abs())).double().sum())
    assert abs(lhs - rhs) <= bound, (lhs, rhs, bound)
    assert abs(lhs) > 10 * bound  # the identity is not trivially 0 = 0


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize(("partition", "fill"), CASES)
def test_gradcheck(device: torch.device, partition: str, fill: str) -> None:
    x = random_images((1, 2, 2, 4), seed=5, scale=0.5).to(device).requires_grad_()

    def f(inp: torch.Tensor) -> torch.Tensor:
        return views(inp, partition, fill, num=2)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_gradient_does_not_depend_on_seed_sigma_or_stream(device: torch.device) -> None:
    x = random_images((2, 3, 4, 6), seed=6).to(device).requires_grad_()
    grad_out = torch.randn(2, 2, 4, 3, 4, 6, generator=make_generator(7)).to(device)
    grads = []
    for seed, sigma, stream in ((1, 0.5, [0, 1]), (2**40, (0.1, 2.0), [7, 2**32 - 1])):
        ids = torch.tensor(stream, device=device)
        out = drs_ext.noisy_views(x, sigma, num=4, seed=seed, stream=ids)
        grads.append(torch.autograd.grad(out, x, grad_out)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize(("partition", "fill"), [("diag", "bilinear"), ("none", "neighbors")])
@pytest.mark.parametrize("form", ["(N,)", "(N, P) float64", "0-d"])
def test_gradients_with_sigma_per_image(
    device: torch.device, partition: str, fill: str, form: str
) -> None:
    """σ per image changes the noise, not A: the gradient in x is the adjoint of the reference
    map. The views are linear in σ (out = A x + σ·fill(z), fill linear), so dL/dσ[n, p] is the
    sum of grad_out times the views of x = 0 at σ = 1, summed over the branches for one σ per
    image and over everything for a 0-d σ."""
    x = random_images((3, 2, 4, 6), seed=12).to(device).requires_grad_()
    table = torch.tensor([[0.2, 1.0], [0.7, 0.1], [1.5, 0.4]])[:, : branches(partition)]
    sigma = {
        "(N,)": table[:, 0],
        "(N, P) float64": table.double(),
        "0-d": torch.tensor(0.6),
    }[form].to(device)
    sigma.requires_grad_()
    kw = {"num": 2, "seed": 3, "offset": 9, "partition": partition, "fill": fill}
    out = drs_ext.noisy_views(x, sigma, **kw)  # type: ignore[arg-type]
    grad_out = torch.randn(out.shape, generator=make_generator(13)).to(device)
    out.backward(grad_out)
    assert x.grad is not None and sigma.grad is not None
    expected = reference_adjoint(grad_out, x, partition, fill)
    torch.testing.assert_close(x.grad.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    unit = reference.noisy_views(torch.zeros(x.shape), 1.0, **kw)  # type: ignore[arg-type]
    per_branch = (grad_out.cpu().double() * unit.double()).sum(dim=(2, 3, 4, 5))
    expected_sigma = {"(N,)": per_branch.sum(1), "(N, P) float64": per_branch}.get(
        form, per_branch.sum()
    )
    assert sigma.grad.shape == sigma.shape and sigma.grad.dtype == sigma.dtype
    torch.testing.assert_close(sigma.grad.cpu().double(), expected_sigma, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize(("partition", "fill"), [("diag", "neighbors"), ("none", "neighbors")])
def test_gradcheck_in_x_and_sigma(device: torch.device, partition: str, fill: str) -> None:
    x = random_images((2, 2, 2, 4), seed=5, scale=0.5).to(device).requires_grad_()
    sigma = torch.tensor([[0.3, 0.8], [1.1, 0.5]], dtype=torch.float64)[:, : branches(partition)]
    sigma = sigma.to(device).requires_grad_()

    def f(inp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return drs_ext.noisy_views(inp, s, num=2, seed=4, partition=partition, fill=fill)

    assert torch.autograd.gradcheck(f, (x, sigma), eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_with_16_bit_output(device: torch.device, out_dtype: torch.dtype) -> None:
    x = random_images((2, 3, 4, 6), seed=8).to(device).requires_grad_()
    out = drs_ext.noisy_views(x, 0.5, num=3, seed=1, out_dtype=out_dtype)
    assert out.requires_grad and out.dtype == out_dtype
    grad_out = torch.randn(out.shape, generator=make_generator(9)).to(device, out_dtype)
    out.backward(grad_out)
    assert x.grad is not None and x.grad.dtype == torch.float32
    expected = reference_adjoint(grad_out.float(), x, "diag", "neighbors")
    torch.testing.assert_close(x.grad.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_sum_of_views_gradient_counts_samples(device: torch.device) -> None:
    """d/dx of the sum of all views: for "none" every pixel gets P·num whatever the (ignored)
    fill; for "pair" each kept pixel feeds two outputs per sample, so the gradient is 2·num on
    kept pixels of each branch."""
    x = random_images((1, 2, 4, 6), seed=10).to(device).requires_grad_()
    for fill in FILLS:
        drs_ext.noisy_views(x, 0.5, num=5, seed=1, partition="none", fill=fill).sum().backward()
        assert x.grad is not None
        torch.testing.assert_close(x.grad, torch.full_like(x, 5.0))
        x.grad = None
    drs_ext.noisy_views(x, 0.5, num=5, seed=1, partition="diag", fill="pair").sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.full_like(x, 10.0))  # each pixel kept by one branch


def test_no_grad_and_detached_inputs(device: torch.device) -> None:
    x = random_images((1, 1, 2, 4), seed=11).to(device)
    assert not drs_ext.noisy_views(x, 0.5, num=2, seed=1).requires_grad
    with torch.no_grad():
        assert not drs_ext.noisy_views(x.requires_grad_(), 0.5, num=2, seed=1).requires_grad
