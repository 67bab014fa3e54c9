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


def test_unknown_partition_is_an_error_not_a_layout() -> None:
    with pytest.raises(ValueError, match=r"partition must be 'diag' or 'none', got 'Diag'"):
        reference.noisy_views(torch.rand(1, 1, 2, 2), 0.5, num=1, seed=0, partition="Diag")


def test_vote_counts_matches_the_op() -> None:
    logits = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(2))
    logits[0, 5, 1] = float("nan")
    assert torch.equal(reference.vote_counts(logits), drs_ext.vote_counts(logits))
