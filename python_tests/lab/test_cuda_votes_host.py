"""The CUDA kernel vote_counts, run on the host, against the CPU kernel and torch.bincount.

Lab tests (`pytest -m lab`): they run device code where there is no GPU. The per-thread code of
the CUDA kernel, votes::count_rows in csrc/cuda/vote_counts_rows.cuh, is written against a Warp
interface: python_tests/lab/vote_counts_host.cpp runs it for every thread of a launch grid, the
32 lanes of a warp as 32 threads meeting at a barrier in each warp-wide call (shuffle, any,
match), as a warp executes them. Its counts must equal the CPU kernel's and torch.argmax +
torch.bincount's, for both row scans (a thread per row, a warp per row: lane slices and a
butterfly reduction), ties, NaN and infinite logits, every dtype, and grids smaller than the
input (the stride loops). The harness also reports warp-wide calls that the 32 lanes do not make
together.
"""

from __future__ import annotations

import pytest
import torch
from lab_support import bincount_oracle, load_host_harness, tied_logits

import drs_ext

pytestmark = pytest.mark.lab

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
STATS = ("divergent", "warp_calls", "grid_x", "grid_y", "lanes")


@pytest.fixture(scope="module")
def votes(tmp_path_factory: pytest.TempPathFactory) -> object:
    """torch.ops.drs_host_votes, compiled from the harness once for this module."""
    return load_host_harness(
        "vote_counts_host.cpp", "drs_host_votes", tmp_path_factory.mktemp("drs_host_votes")
    )


def run_host(
    votes: object, logits: torch.Tensor, grid: tuple[int, int] = (0, 0), lanes: int = 0
) -> tuple[torch.Tensor, dict[str, int]]:
    counts, stats = votes.run(logits, grid[0], grid[1], lanes)  # type: ignore[attr-defined]
    stats_dict = dict(zip(STATS, stats.tolist(), strict=True))
    assert stats_dict["divergent"] == 0, "a warp-wide call not made by all 32 lanes together"
    return counts, stats_dict


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 2, 10, 64, 65, 100, 1000])
def test_host_votes_equal_cpu_kernel(votes: object, dtype: torch.dtype, classes: int) -> None:
    """The launcher's grid and row scan (a warp per row above 64 classes)."""
    logits = tied_logits(3, 67, classes, dtype)
    counts, stats = run_host(votes, logits)
    assert stats["lanes"] == (32 if classes > 64 else 1)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, bincount_oracle(logits))
    assert torch.equal(counts, drs_ext.vote_counts(logits))


@pytest.mark.parametrize("lanes", [1, 32])
@pytest.mark.parametrize("classes", [1, 3, 31, 33, 64, 97])
def test_both_row_scans_at_any_width(votes: object, lanes: int, classes: int) -> None:
    """Either scan for any number of classes: a warp with empty lane slices (K < 32), slices of
    one class, uneven last slices."""
    logits = tied_logits(2, 21, classes, torch.float32)
    counts, stats = run_host(votes, logits, lanes=lanes)
    assert stats["lanes"] == lanes
    assert torch.equal(counts, bincount_oracle(logits))


@pytest.mark.parametrize("lanes", [1, 32])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 1)], ids=str)
def test_grids_smaller_than_the_input(votes: object, lanes: int, grid: tuple[int, int]) -> None:
    """Blocks stride over rows (grid x) and groups (grid y) past the grid, as when the launch
    grid is capped (more than 65535 groups, or 2^31 - 1 blocks of rows)."""
    rows = 600 if lanes == 1 else 40  # several block-rows of rows either way
    logits = tied_logits(5, rows, 70, torch.float32)
    counts, stats = run_host(votes, logits, grid=grid, lanes=lanes)
    assert (stats["grid_x"], stats["grid_y"]) == grid
    assert torch.equal(counts, bincount_oracle(logits))


def test_ties_across_lane_slices_and_nan(votes: object) -> None:
    nan = float("nan")
    wide = torch.zeros(1, 4, 300)
    wide[0, 0, 200] = wide[0, 0, 250] = 1.0  # equal maxima in two lanes' slices: the first wins
    wide[0, 1, 299] = nan  # NaN in the last lane's slice: no vote
    wide[0, 2, :] = float("-inf")  # all -inf: class 0
    wide[0, 3, 10] = wide[0, 3, 290] = float("inf")
    expected = torch.zeros(1, 300, dtype=torch.int64)
    expected[0, 200] = expected[0, 0] = expected[0, 10] = 1
    counts, stats = run_host(votes, wide)
    assert stats["lanes"] == 32
    assert torch.equal(counts, expected)


def test_every_lane_votes_for_one_class(votes: object) -> None:
    """A thread per row, all 32 lanes of each warp voting for class 2: one leader adds 32."""
    logits = torch.zeros(2, 256 * 3 + 5, 4)
    logits[..., 2] = 1.0
    counts, stats = run_host(votes, logits)
    assert stats["lanes"] == 1 and stats["warp_calls"] > 0
    assert counts.tolist() == [[0, 0, 256 * 3 + 5, 0]] * 2


def test_empty_inputs(votes: object) -> None:
    for shape in [(0, 5, 3), (2, 0, 3), (0, 0, 100)]:
        counts, _ = run_host(votes, torch.zeros(shape))
        assert torch.equal(counts, torch.zeros(shape[0], shape[2], dtype=torch.int64))


@pytest.mark.parametrize(
    ("groups", "rows", "classes", "config"),
    [
        (70_000, 2, 3, [1, 65_535, 1]),  # grid y capped: block rows stride over the groups
        (1, 300_000, 10, [1172, 1, 1]),  # 256 rows per block
        (2, 10, 64, [1, 2, 1]),
        (2, 10, 65, [2, 2, 32]),  # a warp per row: 8 rows per block
    ],
)
def test_launch_config(
    votes: object, groups: int, rows: int, classes: int, config: list[int]
) -> None:
    assert votes.launch_config(groups, rows, classes) == config  # type: ignore[attr-defined]
