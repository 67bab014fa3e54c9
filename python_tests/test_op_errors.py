"""Every bad argument of the two ops raises one clear error that names it (docs/design.md §4).

The op checks its arguments once, in C++ (csrc/noisy_views_args.h, csrc/vote_counts_args.h): a
RuntimeError "<op>: <argument> must ..., got ...". Each of those cases runs through the public
wrapper and through torch.ops.drs_ext.* directly, and must give the same message both ways. The
wrapper adds checks only for Python values that the schema would take changed (bools) or refuse
in cryptic words (ints beyond int64, an out_dtype that is not a dtype), and for x, which it reads.
torch's schema itself names the argument of any other wrong Python type.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import drs_ext

X = torch.rand(2, 3, 4, 6)
OP = torch.ops.drs_ext.noisy_views.default


def with_value(index: tuple[int, ...], value: float) -> torch.Tensor:
    x = X.clone()
    x[index] = value
    return x


def op_args(**kwargs: Any) -> dict[str, Any]:
    """A valid call of the op with `kwargs` replaced, in the schema's argument order."""
    args: dict[str, Any] = {
        "x": X,
        "sigma": [0.5],
        "num": 2,
        "seed": 1,
        "offset": 0,
        "stream": None,
        "partition": "diag",
        "fill": "neighbors",
        "out_dtype": None,
    }
    args.update(kwargs)
    return args


def call_wrapper(args: dict[str, Any]) -> object:
    rest = {k: v for k, v in args.items() if k not in ("x", "sigma")}
    return drs_ext.noisy_views(args["x"], args["sigma"], **rest)


def call_op(args: dict[str, Any]) -> object:
    args = dict(args)
    if args["stream"] is None:  # the wrapper's default
        x = args["x"]
        args["stream"] = torch.arange(x.shape[0] if x.dim() > 0 else 0)
    per_image = None
    if isinstance(args["sigma"], torch.Tensor):  # the wrapper's mapping of a tensor sigma
        args["sigma"], per_image = [], args["sigma"]
    return OP(*args.values(), per_image)


# (case, replaced arguments, message after "noisy_views: "): the op's checks, one or more cases
# each, in the order the op runs them.
SIGMA_T = r"sigma as a tensor \(sigma_per_image\)"
SHAPES = r"shape \(N,\) = \(2,\) or \(N, P\) = \(2, 2\), got "
SIGMA_DTYPE = SIGMA_T + r" must be float32 or float64, got "
SIGMA_VALUE = r"sigma must be finite and > 0 in float32, got "
OP_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("x rank 3", {"x": X[0]}, r"x must have shape \(N, C, H, W\), got 3 dimensions"),
    ("x rank 5", {"x": X[None]}, r"x must have shape \(N, C, H, W\), got 5 dimensions"),
    ("x rank 1", {"x": torch.rand(6)}, r"x must have shape \(N, C, H, W\), got 1 dim"),
    ("x rank 0", {"x": torch.tensor(1.0)}, r"x must have shape \(N, C, H, W\), got 0 dim"),
    ("x int32", {"x": X.int()}, r"x must be float32, got Int"),
    ("x int64", {"x": X.long()}, r"x must be float32, got Long"),
    ("x float64", {"x": X.double()}, r"x must be float32, got Double"),
    ("x float16", {"x": X.half()}, r"x must be float32, got Half"),
    ("x bfloat16", {"x": X.bfloat16()}, r"x must be float32, got BFloat16"),
    ("x bool", {"x": X > 0.5}, r"x must be float32, got Bool"),
    ("partition unknown", {"partition": "checkerboard"}, r"partition must be .*\"checkerboard\""),
    (
        "partition case",
        {"partition": "Diag"},
        r"partition must be \"diag\" or \"none\", got \"Diag\"",
    ),
    ("fill unknown", {"fill": "nearest"}, r"fill must be one of .*got \"nearest\""),
    ("fill empty", {"fill": ""}, r"fill must be one of .*got \"\""),
    ("fill unknown, none", {"fill": "nearest", "partition": "none"}, r"fill must be one of"),
    ("x empty C", {"x": torch.rand(1, 0, 4, 4)}, r"x must have C, H, W >= 1, got shape \[1, 0"),
    ("x empty H", {"x": torch.rand(1, 1, 0, 4)}, r"x must have C, H, W >= 1"),
    ("x empty W, none", {"x": torch.rand(1, 1, 4, 0), "partition": "none"}, r"x must have C, H, W"),
    ("odd W diag", {"x": torch.rand(1, 1, 4, 5)}, r"x must have an even image width W .*W=5"),
    ("odd W diag, W=1", {"x": torch.rand(1, 1, 4, 1)}, r"x must have an even image width W"),
    ("sigma empty", {"sigma": []}, r"sigma must hold 1 value or one per branch .*got 0 values"),
    ("sigma 3 values", {"sigma": [0.1, 0.2, 0.3]}, r"sigma must hold .*\(2 for .*got 3 values"),
    (
        "sigma pair for none",
        {"sigma": [0.1, 0.2], "partition": "none"},
        r"sigma must hold 1 value or one per branch \(1 for partition=\"none\"\), got 2 values",
    ),
    ("sigma 0", {"sigma": [0.0]}, r"sigma must be finite and > 0 in float32, got 0 for branch 0"),
    ("sigma < 0", {"sigma": [-0.5]}, r"sigma must be finite and > 0 in float32, got -0.5"),
    ("sigma pair < 0", {"sigma": [0.5, -1.0]}, r"sigma must be finite and > 0 .*branch 1"),
    ("sigma NaN", {"sigma": [float("nan")]}, r"sigma must be finite and > 0 .*got nan"),
    ("sigma +Inf", {"sigma": [float("inf")]}, r"sigma must be finite and > 0 .*got inf"),
    ("sigma float32 overflow", {"sigma": [1e39]}, r"sigma must be finite .*in float32, got 1e\+39"),
    ("sigma float32 underflow", {"sigma": [1e-46]}, r"sigma must be .*> 0 in float32, got 1e-46"),
    # sigma as a tensor (the op's sigma_per_image): (N,) or (N, P), float32 or float64.
    (
        "sigma tensor (N+1,)",
        {"sigma": torch.full((3,), 0.5)},
        rf"{SIGMA_T} must have {SHAPES}\[3\]",
    ),
    ("sigma tensor (P,)", {"sigma": torch.full((2,), 0.5), "x": X[:1]}, r"sigma as .*got \[2\]"),
    ("sigma tensor (N, 3)", {"sigma": torch.full((2, 3), 0.5)}, rf"{SIGMA_T} .*got \[2, 3\]"),
    ("sigma tensor (N, 1), diag", {"sigma": torch.full((2, 1), 0.5)}, rf"{SIGMA_T} .*\[2, 1\]"),
    (
        "sigma tensor (N, 2), none",
        {"sigma": torch.full((2, 2), 0.5), "partition": "none"},
        rf"{SIGMA_T} must have shape \(N,\) = \(2,\) or \(N, P\) = \(2, 1\), got \[2, 2\]",
    ),
    ("sigma tensor 3-D", {"sigma": torch.full((2, 2, 1), 0.5)}, rf"{SIGMA_T} .*\[2, 2, 1\]"),
    ("sigma tensor int64", {"sigma": torch.ones(2, dtype=torch.int64)}, rf"{SIGMA_DTYPE}Long"),
    ("sigma tensor int32", {"sigma": torch.ones(2, dtype=torch.int32)}, rf"{SIGMA_DTYPE}Int"),
    ("sigma tensor bool", {"sigma": torch.ones(2, dtype=torch.bool)}, rf"{SIGMA_DTYPE}Bool"),
    ("sigma tensor float16", {"sigma": torch.ones(2).half()}, rf"{SIGMA_DTYPE}Half"),
    ("sigma tensor bfloat16", {"sigma": torch.ones(2).bfloat16()}, rf"{SIGMA_DTYPE}BFloat16"),
    ("num 0", {"num": 0}, r"num must be >= 1, got 0"),
    ("num -3", {"num": -3}, r"num must be >= 1, got -3"),
    ("seed -1", {"seed": -1}, r"seed must be >= 0 \(and < 2\^63\), got -1"),
    ("seed -2^63", {"seed": -(2**63)}, r"seed must be >= 0 .*got -9223372036854775808"),
    ("offset -1", {"offset": -1}, r"offset and num must keep .*\[0, 2\^56\), got offset=-1 num=2"),
    (
        "offset 2^56",
        {"offset": 2**56, "num": 1},
        r"offset and num .*\[0, 2\^56\), got offset=72057594037927936 num=1",
    ),
    ("offset+num > 2^56", {"offset": 2**56 - 2, "num": 3}, r"offset and num .*2\^56.*num=3"),
    ("num 2^62", {"num": 2**62}, r"offset and num .*2\^56.*num=4611686018427387904"),
    ("num 2^63-1", {"num": 2**63 - 1}, r"offset and num .*num=9223372036854775807"),
    (
        "stream 2-D",
        {"stream": torch.zeros(2, 1, dtype=torch.int64)},
        r"stream must have shape \(N,\) = \(2,\), got \[2, 1\]",
    ),
    (
        "stream too long",
        {"stream": torch.zeros(3, dtype=torch.int64)},
        r"stream must have shape \(N,\) = \(2,\), got \[3\]",
    ),
    (
        "stream 0-D",
        {"stream": torch.tensor(1)},
        r"stream must have shape \(N,\) = \(2,\), got \[\]",
    ),
    (
        "stream int32",
        {"stream": torch.zeros(2, dtype=torch.int32)},
        r"stream must be int64, got Int",
    ),
    ("stream float", {"stream": torch.zeros(2)}, r"stream must be int64, got Float"),
    ("out_dtype float64", {"out_dtype": torch.float64}, r"out_dtype must be .*got Double"),
    ("out_dtype int32", {"out_dtype": torch.int32}, r"out_dtype must be .*got Int"),
    ("out_dtype uint8", {"out_dtype": torch.uint8}, r"out_dtype must be .*got Byte"),
    (
        "sub-image over 2^34",  # stride-0 view: no memory behind the 2^36 elements
        {"x": torch.zeros(()).expand(1, 2**16, 2**10, 2**10)},
        r"x is too large: a sub-image .* at most 2\^34 elements, got 34359738368",
    ),
    (
        "sub-image over 2^34, none",
        {"x": torch.zeros(()).expand(1, 2**15, 2**10, 2**10), "partition": "none"},
        r"x is too large: .*got 34359738368",
    ),
    # Read from the tensors' values: TORCH_CHECKs of the CPU kernel (device asserts on CUDA).
    ("x NaN", {"x": with_value((1, 2, 3, 4), float("nan"))}, r"x must be finite"),
    ("x +Inf", {"x": with_value((0, 0, 0, 0), float("inf"))}, r"x must be finite"),
    ("x -Inf", {"x": with_value((1, 0, 3, 5), -float("inf"))}, r"x must be finite"),
    (
        "x NaN in a pixel of the other branch only",  # (0, 1) belongs to branch 1 alone
        {"x": with_value((0, 0, 0, 1), float("nan")), "sigma": [0.5]},
        r"x must be finite",
    ),
    ("sigma tensor 0", {"sigma": torch.tensor([0.5, 0.0])}, rf"{SIGMA_VALUE}0 for image 1$"),
    (
        "sigma tensor < 0, (N, P)",
        {"sigma": torch.tensor([[0.5, -0.5], [1.0, 1.0]])},
        rf"{SIGMA_VALUE}-0.5 for image 0, branch 1$",
    ),
    ("sigma tensor NaN", {"sigma": torch.tensor([float("nan"), 1.0])}, rf"{SIGMA_VALUE}nan for"),
    ("sigma tensor -Inf", {"sigma": torch.tensor([1.0, -float("inf")])}, rf"{SIGMA_VALUE}-inf"),
    (
        "sigma tensor float64 underflow",
        {"sigma": torch.tensor([1e-50, 1.0], dtype=torch.float64)},
        rf"{SIGMA_VALUE}1e-50 for image 0$",
    ),
    (
        "sigma tensor float64 overflow",
        {"sigma": torch.tensor([[1.0, 1.0], [1.0, 1e39]], dtype=torch.float64)},
        rf"{SIGMA_VALUE}1e\+39 for image 1, branch 1$",
    ),
    (
        "stream -1",
        {"stream": torch.tensor([0, -1])},
        r"stream ids must lie in \[0, 2\^32\), got -1",
    ),
    (
        "stream 2^32",
        {"stream": torch.tensor([2**32, 0])},
        r"stream ids must lie in \[0, 2\^32\), got 4294967296 for image 0",
    ),
]


@pytest.mark.parametrize(("case", "kwargs", "match"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_noisy_views_rejects(case: str, kwargs: dict[str, Any], match: str) -> None:
    args = op_args(**kwargs)
    for call in (call_wrapper, call_op):
        with pytest.raises(RuntimeError, match=rf"^noisy_views: {match}"):
            call(args)


# The wrapper's own checks: Python values that would reach the op changed, or not at all.
WRAPPER_CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("x list", {"x": [[1.0]]}, TypeError, r"x must be a torch.Tensor, got list"),
    ("x None", {"x": None}, TypeError, r"x must be a torch.Tensor, got NoneType"),
    ("sigma string", {"sigma": "0.5"}, TypeError, r"sigma must be a float, .*got '0.5'"),
    ("sigma bool", {"sigma": True}, TypeError, r"sigma must be a float, .*got True"),
    ("sigma [0.5, bool]", {"sigma": [0.5, True]}, TypeError, r"sigma must be a float"),
    ("sigma None", {"sigma": None}, TypeError, r"sigma must be a float, .*got None"),
    ("sigma dict", {"sigma": {"l": 0.5}}, TypeError, r"sigma must be a float"),
    ("sigma [tensor]", {"sigma": [torch.tensor(0.5)]}, TypeError, r"sigma must be a float"),
    ("num bool", {"num": True}, TypeError, r"num must be an int, got bool \(True\)"),
    ("seed bool", {"seed": False}, TypeError, r"seed must be an int, got bool \(False\)"),
    ("offset bool", {"offset": True}, TypeError, r"offset must be an int, got bool"),
    ("num 2^63", {"num": 2**63}, ValueError, r"num must fit in int64 \(< 2\^63\), got 92233"),
    ("seed 2^63", {"seed": 2**63}, ValueError, r"seed must fit in int64 \(< 2\^63\), got 92233"),
    ("seed 2^64", {"seed": 2**64}, ValueError, r"seed must fit in int64 .*18446744073709551616"),
    ("offset 2^63", {"offset": 2**63}, ValueError, r"offset must fit in int64 \(< 2\^63\)"),
    ("offset < -2^63", {"offset": -(2**63) - 1}, ValueError, r"offset must fit .*>= -2\^63"),
    ("out_dtype string", {"out_dtype": "float16"}, TypeError, r"out_dtype must be None or a torch"),
    ("out_dtype type", {"out_dtype": float}, TypeError, r"out_dtype must be .*got <class 'float'>"),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "match"), WRAPPER_CASES, ids=[c[0] for c in WRAPPER_CASES]
)
def test_noisy_views_wrapper_rejects(
    case: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=rf"^noisy_views: {match}"):
        call_wrapper(op_args(**kwargs))


# Any other wrong Python type reaches torch's schema, whose error names the argument.
SCHEMA_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("num float", {"num": 2.0}, r"'int' for argument 'num' but instead found type 'float'"),
    ("seed string", {"seed": "1"}, r"'int' for argument 'seed' but instead found type 'str'"),
    ("offset None", {"offset": None}, r"'int' for argument 'offset' .*found type 'NoneType'"),
    ("stream list", {"stream": [0, 1]}, r"'Tensor' for argument 'stream' .*found type 'list'"),
    ("partition None", {"partition": None}, r"'str' for argument 'partition' .*'NoneType'"),
    ("fill int", {"fill": 1}, r"'str' for argument 'fill' but instead found type 'int'"),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "match"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES]
)
def test_noisy_views_schema_names_the_argument(
    case: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(
        RuntimeError, match=rf"drs_ext::noisy_views\(\) Expected a value of type {match}"
    ):
        call_wrapper(op_args(**kwargs))


def test_the_wrapper_passes_any_int_the_op_accepts() -> None:
    """Range checks are the op's alone: numpy ints and the ends of each range get through."""
    np = pytest.importorskip("numpy")
    out = drs_ext.noisy_views(X, 0.5, num=np.int64(1), seed=np.int32(2**31 - 1))
    assert out.shape == (2, 2, 1, 3, 4, 6)
    out = drs_ext.noisy_views(X, 0.5, num=3, seed=2**63 - 1, offset=2**56 - 3)
    assert out.shape == (2, 2, 3, 3, 4, 6) and bool(torch.isfinite(out).all())


def test_odd_width_is_fine_without_the_diagonal_partition() -> None:
    out = drs_ext.noisy_views(torch.rand(1, 1, 4, 5), 0.5, num=1, seed=0, partition="none")
    assert out.shape == (1, 1, 1, 1, 4, 5)


def test_stream_ids_at_the_bounds_are_accepted() -> None:
    out = drs_ext.noisy_views(X, 0.5, num=1, seed=1, stream=torch.tensor([0, 2**32 - 1]))
    assert bool(torch.isfinite(out).all())


def test_compiled_call_raises_the_ops_message() -> None:
    """Under torch.compile the fake impl does not re-check: the op's own check fires when the
    graph runs."""

    def views(x: torch.Tensor) -> torch.Tensor:
        return drs_ext.noisy_views(x, 0.5, num=1, seed=0, fill="nearest")

    compiled = torch.compile(views, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"noisy_views: fill must be one of .*\"nearest\""):
        compiled(X)


CUDA_FOR_OP = pytest.mark.skipif(
    not (torch.cuda.is_available() and drs_ext.built_with_cuda),
    reason="needs a CUDA device and drs_ext built with CUDA",
)


@CUDA_FOR_OP
@pytest.mark.parametrize("where", ["x on CUDA", "stream on CUDA"])
def test_stream_must_be_on_xs_device(where: str) -> None:
    x, stream = X, torch.arange(2)
    if where == "x on CUDA":
        x = x.cuda()
    else:
        stream = stream.cuda()
    with pytest.raises(RuntimeError, match=r"^noisy_views: stream must be on x's device"):
        drs_ext.noisy_views(x, 0.5, num=1, seed=0, stream=stream)


@pytest.mark.skipif(
    not torch.cuda.is_available() or drs_ext.built_with_cuda,
    reason="needs a CUDA device and a CPU-only build of drs_ext",
)
@pytest.mark.parametrize("op", ["noisy_views", "vote_counts"])
def test_a_cpu_only_build_explains_cuda_tensors(op: str) -> None:
    with pytest.raises(RuntimeError, match=r"drs_ext was built without CUDA kernels.*Rebuild"):
        if op == "noisy_views":
            drs_ext.noisy_views(X.cuda(), 0.5, num=1, seed=0)
        else:
            drs_ext.vote_counts(torch.rand(1, 2, 3, device="cuda"))


# vote_counts: every check is the op's; the wrapper adds none.
VOTE_CASES: list[tuple[str, Any, str]] = [
    ("rank 2", torch.rand(3, 4), r"logits must have shape \(G, S, K\), got 2 dimensions"),
    ("rank 4", torch.rand(3, 4, 5, 6), r"logits must have shape \(G, S, K\), got 4 dimensions"),
    ("rank 1", torch.rand(5), r"logits must have shape \(G, S, K\), got 1 dimensions"),
    ("rank 0", torch.tensor(1.0), r"logits must have shape \(G, S, K\), got 0 dimensions"),
    ("K = 0", torch.rand(3, 4, 0), r"logits must have K >= 1 classes, got shape \[3, 4, 0\]"),
    ("int64", torch.randint(0, 3, (3, 4, 5)), r"logits must be float32, .*got Long"),
    ("int32", torch.randint(0, 3, (3, 4, 5), dtype=torch.int32), r"logits must be .*got Int"),
    ("uint8", torch.zeros(3, 4, 5, dtype=torch.uint8), r"logits must be .*got Byte"),
    ("bool", torch.rand(3, 4, 5) > 0.5, r"logits must be .*got Bool"),
    ("complex", torch.zeros(3, 4, 5, dtype=torch.complex64), r"logits must be .*got ComplexFloat"),
]


@pytest.mark.parametrize(("case", "logits", "match"), VOTE_CASES, ids=[c[0] for c in VOTE_CASES])
def test_vote_counts_rejects(case: str, logits: torch.Tensor, match: str) -> None:
    for call in (drs_ext.vote_counts, torch.ops.drs_ext.vote_counts.default):
        with pytest.raises(RuntimeError, match=rf"^vote_counts: {match}"):
            call(logits)


def test_vote_counts_schema_names_the_argument() -> None:
    with pytest.raises(RuntimeError, match=r"'Tensor' for argument 'logits' .*found type 'list'"):
        drs_ext.vote_counts([[[1.0, 2.0]]])  # type: ignore[arg-type]


def test_vote_counts_with_no_rows_counts_nothing() -> None:
    counts = drs_ext.vote_counts(torch.rand(3, 0, 4))
    assert torch.equal(counts, torch.zeros(3, 4, dtype=torch.int64))
