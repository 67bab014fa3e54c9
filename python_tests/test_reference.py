"""drs_ext.reference, the plain-PyTorch oracle, takes the ops' exact arguments and keywords, so a
test can hand one set of keyword arguments to both."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

import drs_ext
from drs_ext import reference


def parameters(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("op", ["noisy_views", "vote_counts"])
def test_same_signature_as_the_op(op: str) -> None:
    assert parameters(getattr(reference, op)) == parameters(getattr(drs_ext, op))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"partition": "diag", "fill": "bilinear", "offset": 3, "stream": torch.tensor([7, 2])},
        {"partition": "diag", "fill": "zeros", "out_dtype": torch.bfloat16},
        {"partition": "none", "fill": "pair", "offset": 5},
    ],
    ids=["diag bilinear", "diag zeros bf16", "none"],
)
def test_one_set_of_keywords_for_both(kwargs: dict[str, Any]) -> None:
    x = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    args: dict[str, Any] = {"num": 2, "seed": 11, **kwargs}
    got = drs_ext.noisy_views(x, 0.5, **args)
    ref = reference.noisy_views(x, 0.5, **args)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # float32: the kernels' float32 Box–Muller against float64 libm; 16-bit: one rounding apart.
    tol = {"atol": 1e-4, "rtol": 1e-4} if got.dtype == torch.float32 else {}
    torch.testing.assert_close(got, ref, **tol)


def test_the_oracle_takes_every_sigma_form() -> None:
    """σ per image in the oracle: image n of an (N,) or (N, P) call is image n alone with its σ
    as a float or a per-branch list; a 0-d tensor is one σ for all. Each σ is rounded to
    float32, as the op rounds it."""
    x = torch.rand(3, 1, 2, 4, generator=torch.Generator().manual_seed(3))
    kw: dict[str, Any] = {"num": 2, "seed": 5, "stream": torch.tensor([4, 0, 9])}
    table = torch.tensor([[0.1, 0.7], [1.3, 0.2], [0.4, 0.4]], dtype=torch.float64)
    for sigma in (table[:, 0], table):
        batch = reference.noisy_views(x, sigma, **kw)
        for n in range(3):
            alone = sigma[n].tolist() if sigma.dim() == 2 else float(sigma[n])
            kw_n = {**kw, "stream": kw["stream"][n : n + 1]}
            assert torch.equal(batch[n : n + 1], reference.noisy_views(x[n : n + 1], alone, **kw_n))
    scalar = reference.noisy_views(x, 0.3, **kw)
    assert torch.equal(reference.noisy_views(x, torch.tensor(0.3), **kw), scalar)
    assert torch.equal(reference.noisy_views(x, [0.3, 0.3], **kw), scalar)


def test_unknown_partition_is_an_error_not_a_layout() -> None:
    with pytest.raises(ValueError, match=r"partition must be 'diag' or 'none', got 'Diag'"):
        reference.noisy_views(torch.rand(1, 1, 2, 2), 0.5, num=1, seed=0, partition="Diag")


def test_vote_counts_matches_the_op() -> None:
    logits = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(2))
    logits[0, 5, 1] = float("nan")
    assert torch.equal(reference.vote_counts(logits), drs_ext.vote_counts(logits))
