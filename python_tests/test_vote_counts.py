"""drs_ext.vote_counts against drs_ext.reference and torch.bincount(torch.argmax(...)).

torch.argmax returns the first maximal index (documented), so it is the oracle for ties and
infinities; rows holding a NaN vote for no class (DESIGN.md §4).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_generator

import drs_ext
from drs_ext import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def bincount_oracle(logits: torch.Tensor) -> torch.Tensor:
    """(G, S, K) -> (G, K): bincount of torch.argmax over the rows without NaN."""
    groups, _, classes = logits.shape
    counts = torch.zeros(groups, classes, dtype=torch.int64)
    for g in range(groups):
        rows = logits[g][~torch.isnan(logits[g]).any(dim=-1)]
        if rows.shape[0]:
            counts[g] = torch.bincount(torch.argmax(rows, dim=-1), minlength=classes)
    return counts


def check(logits: torch.Tensor) -> torch.Tensor:
    counts = drs_ext.vote_counts(logits)
    assert counts.dtype == torch.int64
    assert counts.shape == (logits.shape[0], logits.shape[2])
    assert torch.equal(counts, bincount_oracle(logits))
    assert torch.equal(counts, reference.vote_counts(logits))
    return counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 50, 7), (1, 1, 10), (64, 100, 3), (5, 17, 1), (2, 9, 1000)])
def test_random_logits(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    gen = make_generator(sum(shape))
    logits = torch.randn(*shape, generator=gen).to(dtype)
    counts = check(logits)
    assert torch.equal(counts.sum(dim=1), torch.full((shape[0],), shape[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_ties_go_to_the_first_maximum(dtype: torch.dtype) -> None:
    gen = make_generator(1)
    logits = torch.randint(0, 3, (6, 200, 5), generator=gen).to(dtype)  # ties in most rows
    check(logits)
    rows = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0],
            [0.0, 0.0, 0.0, 0.0],
            [-1.0, -2.0, -1.0, -3.0],
            [2.0, 1.0, 5.0, 5.0],
            [0.0, -0.0, 0.0, 0.0],
            [-0.0, 0.0, 0.0, 0.0],
        ]
    ).to(dtype)
    counts = check(rows[:, None, :].transpose(0, 1).contiguous())
    assert counts.tolist() == [[4, 1, 1, 0]]
    per_row = [drs_ext.vote_counts(r[None, None, :])[0].argmax().item() for r in rows]
    assert per_row == [1, 0, 0, 2, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows_vote_for_nothing(dtype: torch.dtype) -> None:
    gen = make_generator(2)
    logits = torch.randn(4, 300, 6, generator=gen)
    nan_rows = torch.rand(4, 300, generator=gen) < 0.3
    position = torch.randint(0, 6, (4, 300), generator=gen)
    position[0, :6] = torch.arange(6)  # first, last and every position in between
    logits[nan_rows, position[nan_rows]] = float("nan")
    logits[0, 0, :] = float("nan")  # a row that is NaN everywhere
    nan_rows[0, 0] = True
    logits = logits.to(dtype)
    counts = check(logits)
    assert torch.equal(counts.sum(dim=1), (~nan_rows).sum(dim=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_next_to_the_maximum(dtype: torch.dtype) -> None:
    """A NaN before or after the row's maximum: the row still votes for nothing."""
    nan = float("nan")
    rows = torch.tensor(
        [[nan, 5.0, 1.0], [5.0, nan, 1.0], [1.0, 5.0, nan], [9.0, 1.0, nan], [1.0, 2.0, 3.0]]
    ).to(dtype)
    counts = drs_ext.vote_counts(rows[None])
    assert counts.tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinities_like_torch_argmax(dtype: torch.dtype) -> None:
    inf = float("inf")
    rows = torch.tensor(
        [
            [1.0, inf, 2.0],
            [inf, 1.0, inf],
            [-inf, -inf, -inf],
            [-inf, -inf, 3.0],
            [-inf, 0.0, -inf],
            [inf, inf, inf],
            [2.0, -inf, 2.0],
        ]
    ).to(dtype)
    counts = check(rows[None])
    expected = torch.bincount(torch.argmax(rows, dim=-1), minlength=3)
    assert counts[0].tolist() == expected.tolist() == [4, 2, 1]
    gen = make_generator(3)
    mixed = torch.randn(3, 200, 4, generator=gen)
    mixed[torch.rand(3, 200, 4, generator=gen) < 0.15] = inf
    mixed[torch.rand(3, 200, 4, generator=gen) < 0.15] = -inf
    check(mixed.to(dtype))


def test_one_class_one_sample_and_many_groups() -> None:
    gen = make_generator(4)
    k1 = torch.randn(7, 13, 1, generator=gen)
    k1[2, 4, 0] = float("nan")
    counts = check(k1)
    expected = torch.full((7, 1), 13)
    expected[2, 0] = 12
    assert torch.equal(counts, expected)
    s1 = torch.randn(9, 1, 5, generator=gen)
    counts = check(s1)
    assert torch.equal(counts, torch.nn.functional.one_hot(s1[:, 0].argmax(-1), 5))


def test_non_contiguous_logits() -> None:
    gen = make_generator(5)
    base = torch.randn(6, 40, 4, generator=gen)
    view = base.transpose(0, 2)  # (4, 40, 6), strided
    assert not view.is_contiguous()
    counts = check(view)
    assert torch.equal(counts, drs_ext.vote_counts(view.contiguous()))
    sliced = base[:, ::3, 1:]
    check(sliced)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_vote_counts(dtype: torch.dtype) -> None:
    gen = make_generator(6)
    logits = torch.randn(3, 20, 5, generator=gen).to(dtype)
    logits[1, 2, 3] = float("nan")
    torch.library.opcheck(torch.ops.drs_ext.vote_counts.default, (logits,))
