"""drs_ext.vote_counts on every device against torch.bincount(torch.argmax(...)) and
drs_ext.reference.

torch.argmax returns the first maximal index (documented), so it is the oracle for ties and
infinities; rows holding a NaN vote for no class (docs/design.md §4).
"""

from __future__ import annotations

import pytest
import torch
from conftest import bincount_oracle, make_generator, tied_logits

import drs_ext
from drs_ext import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def check(logits: torch.Tensor, device: torch.device) -> torch.Tensor:
    """vote_counts of logits on `device` equals both oracles; returns the counts on the CPU."""
    counts = drs_ext.vote_counts(logits.to(device))
    assert counts.dtype == torch.int64 and counts.device == device
    assert counts.shape == (logits.shape[0], logits.shape[2])
    counts = counts.cpu()
    assert torch.equal(counts, bincount_oracle(logits))
    if logits.shape[0] * logits.shape[1] <= 10_000:  # the reference loops in Python
        assert torch.equal(counts, reference.vote_counts(logits.cpu()))
    return counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_counts_equal_bincount_of_argmax(device: torch.device, dtype: torch.dtype) -> None:
    """Random logits of several shapes (one class, one row, many groups, 1000 classes), then
    tied logits with NaN and ±inf rows for class counts on both sides of the CUDA kernel's
    switch from a thread per row to a warp per row (more than 64 classes)."""
    for shape in [(3, 50, 7), (1, 1, 10), (64, 100, 3), (5, 17, 1), (2, 9, 1000)]:
        logits = torch.randn(*shape, generator=make_generator(sum(shape))).to(dtype)
        counts = check(logits, device)
        assert torch.equal(counts.sum(dim=1), torch.full((shape[0],), shape[1])), shape
    for classes in [1, 2, 10, 64, 65, 100, 1000]:
        check(tied_logits(3, 517, classes, dtype), device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_first_maximum(device: torch.device, dtype: torch.dtype) -> None:
    logits = torch.randint(0, 3, (6, 200, 5), generator=make_generator(1)).to(dtype)
    check(logits, device)  # ties in most rows
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
    counts = check(rows[None], device)
    assert counts.tolist() == [[4, 1, 1, 0]]
    per_row = [drs_ext.vote_counts(r[None, None].to(device))[0].argmax().item() for r in rows]
    assert per_row == [1, 0, 0, 2, 0, 0]
    wide = torch.zeros(1, 2, 300, dtype=dtype)
    wide[0, 0, 200] = wide[0, 0, 250] = 1.0  # a tie across the CUDA warp's lane slices
    wide[0, 1, 299] = float("nan")
    assert check(wide, device)[0].nonzero().tolist() == [[200]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows_vote_for_nothing(device: torch.device, dtype: torch.dtype) -> None:
    gen = make_generator(2)
    logits = torch.randn(4, 300, 6, generator=gen)
    nan_rows = torch.rand(4, 300, generator=gen) < 0.3
    position = torch.randint(0, 6, (4, 300), generator=gen)
    position[0, :6] = torch.arange(6)  # first, last and every position in between
    logits[nan_rows, position[nan_rows]] = float("nan")
    logits[0, 0, :] = float("nan")  # a row that is NaN everywhere
    nan_rows[0, 0] = True
    counts = check(logits.to(dtype), device)
    assert torch.equal(counts.sum(dim=1), (~nan_rows).sum(dim=1))
    # A NaN before or after the row's maximum: the row still votes for nothing.
    nan = float("nan")
    rows = torch.tensor(
        [[nan, 5.0, 1.0], [5.0, nan, 1.0], [1.0, 5.0, nan], [9.0, 1.0, nan], [1.0, 2.0, 3.0]]
    ).to(dtype)
    assert check(rows[None], device).tolist() == [[0, 0, 1]]
    rows = torch.tensor(
        [[1.0, 3.0, 3.0], [nan, 5.0, 1.0], [2.0, 2.0, 2.0], [0.0, -1.0, nan], [-0.0, 0.0, -1.0]]
    ).to(dtype)
    assert check(rows[None], device).tolist() == [[2, 1, 0]]  # ties, and two rows voting for none


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinities_like_torch_argmax(device: torch.device, dtype: torch.dtype) -> None:
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
    counts = check(rows[None], device)
    expected = torch.bincount(torch.argmax(rows, dim=-1), minlength=3)
    assert counts[0].tolist() == expected.tolist() == [4, 2, 1]
    gen = make_generator(3)
    mixed = torch.randn(3, 200, 4, generator=gen)
    mixed[torch.rand(3, 200, 4, generator=gen) < 0.15] = inf
    mixed[torch.rand(3, 200, 4, generator=gen) < 0.15] = -inf
    check(mixed.to(dtype), device)


def test_one_class_one_sample_and_many_groups(device: torch.device) -> None:
    gen = make_generator(4)
    k1 = torch.randn(7, 13, 1, generator=gen)
    k1[2, 4, 0] = float("nan")
    expected = torch.full((7, 1), 13)
    expected[2, 0] = 12
    assert torch.equal(check(k1, device), expected)
    s1 = torch.randn(9, 1, 5, generator=gen)
    counts = check(s1, device)
    assert torch.equal(counts, torch.nn.functional.one_hot(s1[:, 0].argmax(-1), 5))


def test_non_contiguous_logits(device: torch.device) -> None:
    base = torch.randn(6, 40, 70, generator=make_generator(5)).to(device)
    for view in (base.transpose(0, 2), base[:, ::3, 1:], base.transpose(0, 1)):
        assert not view.is_contiguous()
        counts = check(view, device)
        assert torch.equal(counts, drs_ext.vote_counts(view.contiguous()).cpu())


def test_empty_inputs_count_nothing(device: torch.device) -> None:
    for shape in [(0, 5, 3), (2, 0, 3)]:
        counts = check(torch.zeros(shape), device)
        assert torch.equal(counts, torch.zeros(shape[0], shape[2], dtype=torch.int64))


@pytest.mark.parametrize(("groups", "rows", "classes"), [(70_000, 2, 3), (1, 300_000, 10)])
def test_large_grids(device: torch.device, groups: int, rows: int, classes: int) -> None:
    """More groups than a CUDA grid's blocks in one dimension, and one group of many rows."""
    check(torch.randn(groups, rows, classes), device)
