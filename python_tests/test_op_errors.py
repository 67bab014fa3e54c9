"""Every bad input of DESIGN.md §4 raises a clear error that names the argument.

TORCH_CHECK failures surface as RuntimeError, the Python wrapper's own checks as ValueError or
TypeError. Each case is tried through drs_ext.noisy_views / vote_counts, and the checks that the
wrapper does first are tried on torch.ops.drs_ext.* directly as well, since the op is public.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import drs_ext

X = torch.rand(2, 3, 4, 6)
OK: dict[str, Any] = {"num": 2, "seed": 1}


def with_value(index: tuple[int, ...], value: float) -> torch.Tensor:
    x = X.clone()
    x[index] = value
    return x


def call(x: Any = None, sigma: Any = 0.5, **kwargs: Any) -> Callable[[], object]:
    args = {**OK, **kwargs}
    return lambda: drs_ext.noisy_views(X if x is None else x, sigma, **args)


NOISY_VIEWS_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("x rank 3", call(X[0]), RuntimeError, r"x must have shape \(N, C, H, W\).*3 dimensions"),
    ("x rank 5", call(X[None]), RuntimeError, r"x must have shape \(N, C, H, W\).*5 dimensions"),
    ("x rank 1", call(torch.rand(6)), RuntimeError, r"x must have shape"),
    ("x empty C", call(torch.rand(1, 0, 4, 4)), RuntimeError, r"x must have C, H, W >= 1"),
    ("x not a tensor", call([[1.0]]), TypeError, r"x must be a torch.Tensor"),
    ("odd W diag", call(torch.rand(1, 1, 4, 5)), RuntimeError, r"even image width W.*W=5"),
    ("odd W diag, W=1", call(torch.rand(1, 1, 4, 1)), RuntimeError, r"even image width W"),
    ("x int32", call(X.int()), RuntimeError, r"x must be float32, got Int"),
    ("x int64", call(X.long()), RuntimeError, r"x must be float32, got Long"),
    ("x float64", call(X.double()), RuntimeError, r"x must be float32, got Double"),
    ("x float16", call(X.half()), RuntimeError, r"x must be float32, got Half"),
    ("x bool", call(X > 0.5), RuntimeError, r"x must be float32"),
    ("x NaN", call(with_value((1, 2, 3, 4), float("nan"))), RuntimeError, r"x must be finite"),
    ("x +Inf", call(with_value((0, 0, 0, 0), float("inf"))), RuntimeError, r"x must be finite"),
    ("x -Inf", call(with_value((1, 0, 3, 5), -float("inf"))), RuntimeError, r"x must be finite"),
    ("sigma 0", call(sigma=0.0), RuntimeError, r"sigma must be finite and > 0 in float32, got 0"),
    (
        "sigma < 0",
        call(sigma=-0.5),
        RuntimeError,
        r"sigma must be finite and > 0 in float32, got -0.5",
    ),
    ("sigma pair < 0", call(sigma=[0.5, -1.0]), RuntimeError, r"sigma .*> 0.*branch 1"),
    ("sigma NaN", call(sigma=float("nan")), RuntimeError, r"sigma must be finite.*nan"),
    ("sigma +Inf", call(sigma=float("inf")), RuntimeError, r"sigma must be finite.*inf"),
    ("sigma 3 values", call(sigma=[0.1, 0.2, 0.3]), RuntimeError, r"sigma must hold .*got 3"),
    ("sigma empty", call(sigma=[]), RuntimeError, r"sigma must hold .*got 0"),
    (
        "sigma pair for none",
        call(sigma=[0.1, 0.2], partition="none"),
        RuntimeError,
        r"sigma must hold 1 value or one per branch \(1 for partition=\"none\"\), got 2",
    ),
    ("sigma string", call(sigma="0.5"), TypeError, r"sigma must be a float"),
    ("sigma bool", call(sigma=True), TypeError, r"sigma must be a float"),
    ("sigma None", call(sigma=None), TypeError, r"sigma must be a float"),
    ("num 0", call(num=0), ValueError, r"num must be .*>= 1.*got 0"),
    ("num -3", call(num=-3), ValueError, r"num must be .*got -3"),
    ("num float", call(num=2.0), TypeError, r"num must be an int"),
    ("seed -1", call(seed=-1), ValueError, r"seed must be .*got -1"),
    ("seed 2^63", call(seed=2**63), ValueError, r"seed must be .*got 9223372036854775808"),
    ("seed float", call(seed=1.5), TypeError, r"seed must be an int"),
    ("offset -1", call(offset=-1), ValueError, r"offset must be .*got -1"),
    ("offset bool", call(offset=True), TypeError, r"offset must be an int"),
    (
        "offset 2^56",
        call(offset=2**56, num=1),
        ValueError,
        r"offset must be >= 0 and < 72057594037927936, got 72057594037927936",
    ),
    ("offset+num > 2^56", call(offset=2**56 - 2, num=3), RuntimeError, r"offset .*2\^56.*num=3"),
    (
        "stream 2-D",
        call(stream=torch.zeros(2, 1, dtype=torch.int64)),
        RuntimeError,
        r"stream must have shape \(N,\) = \(2,\), got \[2, 1\]",
    ),
    (
        "stream too long",
        call(stream=torch.zeros(3, dtype=torch.int64)),
        RuntimeError,
        r"stream must have shape \(N,\) = \(2,\), got \[3\]",
    ),
    (
        "stream 0-D",
        call(stream=torch.tensor(1)),
        RuntimeError,
        r"stream must have shape \(N,\)",
    ),
    (
        "stream int32",
        call(stream=torch.zeros(2, dtype=torch.int32)),
        RuntimeError,
        r"stream must be int64, got Int",
    ),
    ("stream float", call(stream=torch.zeros(2)), RuntimeError, r"stream must be int64, got Float"),
    (
        "stream -1",
        call(stream=torch.tensor([0, -1])),
        RuntimeError,
        r"stream ids must lie in \[0, 2\^32\).*-1",
    ),
    (
        "stream 2^32",
        call(stream=torch.tensor([2**32, 0])),
        RuntimeError,
        r"stream ids must lie in \[0, 2\^32\).*4294967296",
    ),
    ("stream list", call(stream=[0, 1]), (RuntimeError, TypeError), r"stream"),  # type: ignore[list-item]
    (
        "partition unknown",
        call(partition="checkerboard"),
        RuntimeError,
        r"partition must be .*\"checkerboard\"",
    ),
    (
        "partition case",
        call(partition="Diag"),
        RuntimeError,
        r"partition must be \"diag\" or \"none\", got \"Diag\"",
    ),
    ("fill unknown", call(fill="nearest"), RuntimeError, r"fill must be one of .*got \"nearest\""),
    ("fill empty", call(fill=""), RuntimeError, r"fill must be one of"),
    (
        "out_dtype float64",
        call(out_dtype=torch.float64),
        RuntimeError,
        r"out_dtype must be .*got Double",
    ),
    ("out_dtype int32", call(out_dtype=torch.int32), RuntimeError, r"out_dtype must be .*got Int"),
    ("out_dtype uint8", call(out_dtype=torch.uint8), RuntimeError, r"out_dtype must be"),
]


@pytest.mark.parametrize(
    ("case", "fn", "error", "match"), NOISY_VIEWS_CASES, ids=[c[0] for c in NOISY_VIEWS_CASES]
)
def test_noisy_views_rejects(
    case: str, fn: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fn()


def test_odd_width_is_fine_without_the_diagonal_partition() -> None:
    out = drs_ext.noisy_views(torch.rand(1, 1, 4, 5), 0.5, num=1, seed=0, partition="none")
    assert out.shape == (1, 1, 1, 1, 4, 5)


def test_last_valid_sample_index_is_accepted() -> None:
    out = drs_ext.noisy_views(X, 0.5, num=3, seed=1, offset=2**56 - 3)
    assert out.shape == (2, 2, 3, 3, 4, 6) and bool(torch.isfinite(out).all())


def test_stream_ids_at_the_bounds_are_accepted() -> None:
    out = drs_ext.noisy_views(X, 0.5, num=1, seed=1, stream=torch.tensor([0, 2**32 - 1]))
    assert bool(torch.isfinite(out).all())


def test_nan_in_a_pixel_dropped_by_the_partition_is_still_rejected() -> None:
    """Pixel (0, 1) belongs to branch 1 only; the whole image must be finite anyway."""
    with pytest.raises(RuntimeError, match=r"x must be finite"):
        drs_ext.noisy_views(with_value((0, 0, 0, 1), float("nan")), 0.5, num=1, seed=0)


@pytest.mark.parametrize("sigma", [1e39, 1e-46], ids=["overflows float32", "underflows float32"])
def test_sigma_must_be_positive_and_finite_as_float32(sigma: float) -> None:
    """The kernels add float32(σ)·ε: a σ that rounds to inf or to 0 in float32 would silently give
    infinite views or noise-free ones, which the σ > 0 and finiteness checks exist to prevent."""
    with pytest.raises((RuntimeError, ValueError), match=r"sigma"):
        drs_ext.noisy_views(X, sigma, num=1, seed=0)


# The same TORCH_CHECKs when the Python wrapper is bypassed.
OP = torch.ops.drs_ext.noisy_views
STREAM = torch.arange(2)


def op_call(**kwargs: Any) -> Callable[[], object]:
    args: dict[str, Any] = {
        "x": X,
        "sigma": [0.5],
        "num": 2,
        "seed": 1,
        "offset": 0,
        "stream": STREAM,
        "partition": "diag",
        "fill": "pair",
        "out_dtype": None,
    }
    args.update(kwargs)
    return lambda: OP(*args.values())


OP_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("num 0", op_call(num=0), r"num must be >= 1, got 0"),
    ("num -1", op_call(num=-1), r"num must be >= 1"),
    ("seed -1", op_call(seed=-1), r"seed must be >= 0, got -1"),
    ("offset -1", op_call(offset=-1), r"offset .*2\^56.*offset=-1"),
    ("offset+num > 2^56", op_call(offset=2**56 - 1, num=2), r"offset .*2\^56"),
    ("num 2^62", op_call(num=2**62), r"offset .*2\^56.*num=4611686018427387904"),
    ("stream -1", op_call(stream=torch.tensor([0, -1])), r"stream ids must lie in \[0, 2\^32\)"),
    (
        "stream 2^32",
        op_call(stream=torch.tensor([0, 2**32])),
        r"stream ids must lie in \[0, 2\^32\)",
    ),
    ("sigma empty", op_call(sigma=[]), r"sigma must hold 1 value or one per branch"),
    ("sigma 0", op_call(sigma=[0.0]), r"sigma must be finite and > 0"),
    ("x NaN", op_call(x=with_value((1, 1, 1, 1), float("nan"))), r"x must be finite"),
    ("x float64", op_call(x=X.double()), r"x must be float32"),
]


@pytest.mark.parametrize(("case", "fn", "match"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_noisy_views_op_rejects(case: str, fn: Callable[[], object], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.parametrize(
    ("name", "kwargs"), [("offset", {"offset": 2**63}), ("num", {"num": 2**63})]
)
def test_ints_beyond_int64_get_a_message_with_the_valid_range(
    name: str, kwargs: dict[str, int]
) -> None:
    """DESIGN.md §4: the message names the argument and its expected and actual value."""
    with pytest.raises((ValueError, RuntimeError), match=rf"{name}.*(2\^|>=|\[).*{2**63}"):
        call(**kwargs)()


VOTE_CASES: list[tuple[str, Any, type[Exception], str]] = [
    ("rank 2", torch.rand(3, 4), RuntimeError, r"logits must have shape \(G, S, K\).*2 dimensions"),
    ("rank 4", torch.rand(3, 4, 5, 6), RuntimeError, r"logits must have shape \(G, S, K\).*4 dim"),
    ("rank 1", torch.rand(5), RuntimeError, r"logits must have shape \(G, S, K\)"),
    ("K = 0", torch.rand(3, 4, 0), RuntimeError, r"logits must have K >= 1 classes"),
    ("int64", torch.randint(0, 3, (3, 4, 5)), RuntimeError, r"logits must be float32.*got Long"),
    (
        "int32",
        torch.randint(0, 3, (3, 4, 5), dtype=torch.int32),
        RuntimeError,
        r"logits must be .*got Int",
    ),
    ("uint8", torch.zeros(3, 4, 5, dtype=torch.uint8), RuntimeError, r"logits must be .*got Byte"),
    ("bool", torch.rand(3, 4, 5) > 0.5, RuntimeError, r"logits must be .*got Bool"),
    ("list", [[[1.0, 2.0]]], TypeError, r"logits must be a torch.Tensor"),
]


@pytest.mark.parametrize(
    ("case", "logits", "error", "match"), VOTE_CASES, ids=[c[0] for c in VOTE_CASES]
)
def test_vote_counts_rejects(case: str, logits: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        drs_ext.vote_counts(logits)
    if isinstance(logits, torch.Tensor):  # the TORCH_CHECK itself, without the wrapper
        with pytest.raises(RuntimeError, match=match):
            torch.ops.drs_ext.vote_counts(logits)


def test_vote_counts_with_no_rows_counts_nothing() -> None:
    counts = drs_ext.vote_counts(torch.rand(3, 0, 4))
    assert torch.equal(counts, torch.zeros(3, 4, dtype=torch.int64))
