"""``drs bench``: time drs_ext.noisy_views against the plain-PyTorch pipeline on this machine.

A GPU's figures are only known on that GPU, and pip does not install the repository's
benchmarks/, so the timing helpers live here; the scripts in benchmarks/ import them, so that
their figures and `drs bench`'s are defined alike. As docs/design.md §5 asks: always the ratio
against the plain-PyTorch pipeline users write today (`PlainViews`; drs_ext.reference is an oracle,
not a fair baseline), timed alternately in one run, and on a GPU the fraction of the bandwidth
floor (bytes written once / measured device-to-device copy bandwidth).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _C, reference
from ..ops import noisy_views, num_branches
from .common import default_device

# The dtypes noisy_views writes on both backends.
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
SIGMA = 0.5  # the timing does not depend on σ; the tolerance of the check does, a little


def neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of the four 4-connected neighbours of every pixel, zero outside the image."""
    p = F.pad(t, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


class PlainViews:
    """Noisy views of one image (C, H, W) the way a user writes them today, without drs_ext:
    torch's own RNG (randn_like), indexing and shifts, on the image's device. This is the
    baseline of every speed-up we report, so it is written as a competent user would (masks and
    index tensors built once per image), not as a straw man."""

    def __init__(self, x: torch.Tensor, partition: str) -> None:
        self.x = x
        self.partition = partition
        _, height, width = x.shape
        rows = torch.arange(height, device=x.device)[:, None]
        cols = torch.arange(width, device=x.device)[None, :]
        # Branch p keeps the pixels with (i + j) % 2 == p (the two diagonals of each 2x2 block).
        self.masks = [(rows + cols) % 2 == p for p in range(2)]
        self.kept = [m.flatten().nonzero().squeeze(1) for m in self.masks]
        self.subs = [x.flatten(1)[:, k] for k in self.kept]  # (C, H*W/2) per branch
        self.counts = [neighbour_sum(m.float()[None, None])[0, 0] for m in self.masks]

    def branch(self, p: int, num: int, sigma: float) -> torch.Tensor:
        """(num, C, H, W) float32 views of branch p (for "none": the whole image)."""
        x = self.x
        if self.partition == "none":
            batch = x.repeat(num, 1, 1, 1)
            return batch + torch.randn_like(batch) * sigma
        channels, height, width = x.shape
        sub = self.subs[p].repeat(num, 1, 1)  # noise lives in sub-image space
        noisy = sub + torch.randn_like(sub) * sigma
        placed = sub.new_zeros(num, channels, height * width)
        placed[:, :, self.kept[p]] = noisy
        placed = placed.view(num, channels, height, width)
        average = neighbour_sum(placed) / self.counts[p]  # fill "neighbors"
        return torch.where(self.masks[p], placed, average)

    def views(
        self, num: int, sigma: float, dtype: torch.dtype = torch.float32
    ) -> list[torch.Tensor]:
        """One (num, C, H, W) tensor per branch."""
        branches = 1 if self.partition == "none" else 2
        return [self.branch(p, num, sigma).to(dtype) for p in range(branches)]


def median_ms(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Median time (ms) of each function after `warmup` untimed rounds. The functions run
    alternately, so a change of machine load or clock hits all of them alike.

    On CPU: wall time (perf_counter; the ops are synchronous). On CUDA: CUDA events on the
    current stream, which time the GPU work rather than the (asynchronous) launches.
    """
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        if cuda:
            torch.cuda.synchronize()
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_time_ms(fn, cuda))
    return {name: statistics.median(t) for name, t in times.items()}


def _time_ms(fn: Callable[[], object], cuda: bool) -> float:
    if not cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


# median_ms on the current GPU: gpu_ms(fns, warmup, repeats).
gpu_ms = functools.partial(median_ms, device="cuda")


def copy_bandwidth(
    warmup: int, repeats: int, device: str | torch.device = "cuda", nbytes: int = 2**30
) -> float:
    """Device-to-device copy bandwidth in bytes/s: (bytes read + bytes written) / time of one
    `copy_` of `nbytes` (1 GiB by default: large enough that caches do not flatter it). This is
    the memory-bandwidth floor an op that writes its output once is measured against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms({"copy": lambda: dst.copy_(src)}, warmup, repeats, device)["copy"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (what benchmarks/RESULTS.md and `drs bench` print)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo, else what `platform` knows)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or "unknown CPU"


def device_description(device: str | torch.device = "cpu") -> str:
    """One line naming what a figure was measured on: figures mean little without it."""
    device = torch.device(device)
    versions = f"torch {torch.__version__}"
    threads = f"{torch.get_num_threads()} threads"
    if device.type != "cuda":
        affinity = getattr(os, "sched_getaffinity", None)  # the cores this process may use
        cores = len(affinity(0)) if affinity else os.cpu_count()
        return f"{cpu_name()}, {cores} cores, {versions} ({threads}), drs_ext {_C.__version__}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{versions}, CUDA {torch.version.cuda}, drs_ext {_C.__version__} "
        f"(archs {_C.cuda_archs or 'default'}); host {cpu_name()} ({threads})"
    )


class CheckFailed(RuntimeError):
    """The op's output is wrong (shape, dtype or values): its timing would mean nothing."""


def check_views(
    x: torch.Tensor, partition: str, num: int, sigma: float, seed: int, out_dtype: torch.dtype
) -> tuple[float, float]:
    """Cheap correctness check before timing: the op's output for `num` draws of x (C, H, W)
    has the right shape and dtype, and its first draw matches drs_ext.reference (the slow
    oracle, so one draw only). Returns (max |op - reference|, tolerance); raises CheckFailed.

    Tolerance as in the test suite, 2e-6·(1 + max|x| + 7σ) (float32 ln and sincos against float64
    libm; |N(0,1)| < 7 from Box–Muller), plus one unit at max|x| + 7σ for 16-bit outputs."""
    out = noisy_views(x[None], sigma, num=num, seed=seed, partition=partition, out_dtype=out_dtype)
    shape = (1, num_branches(partition), num, *x.shape)
    if tuple(out.shape) != shape or out.dtype != out_dtype:
        raise CheckFailed(
            f"noisy_views returned {tuple(out.shape)} {out.dtype}, expected {shape} {out_dtype}"
        )
    first = out[:, :, :1].cpu().double()
    expected = reference.noisy_views(x[None].cpu(), sigma, num=1, seed=seed, partition=partition)
    deviation = float((first - expected.double()).abs().max())
    largest = float(x.abs().max()) + 7.0 * sigma
    tolerance = 2e-6 * (1.0 + largest)
    if out_dtype != torch.float32:
        tolerance += torch.finfo(out_dtype).eps * largest
    if not math.isfinite(deviation) or deviation > tolerance:
        raise CheckFailed(
            f"noisy_views (partition={partition}, out_dtype={out_dtype}) deviates from "
            f"drs_ext.reference by {deviation:.3e} > tolerance {tolerance:.3e}: the build is "
            "broken, its timings would mean nothing"
        )
    return deviation, tolerance


@dataclass(frozen=True)
class ViewsBench:
    """One setting's figures; `written` is the bytes of the views, each written once."""

    partition: str
    shape: tuple[int, int, int]
    num: int
    out_dtype: torch.dtype
    plain_ms: float
    drs_ext_ms: float
    max_deviation: float
    tolerance: float
    written: int


def bench_views(
    shape: Sequence[int],
    num: int,
    partition: str,
    *,
    out_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 11,
) -> ViewsBench:
    """drs_ext.noisy_views against PlainViews for one image of `shape` (C, H, W), `num` draws of
    every branch of `partition` written as `out_dtype`, timed alternately in this run after a
    correctness check (check_views), at σ = SIGMA."""
    device, sigma, seed = torch.device(device), SIGMA, 0
    x = torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device)
    deviation, tolerance = check_views(x, partition, num, sigma, seed, out_dtype)
    plain = PlainViews(x, partition)
    stream = torch.zeros(1, dtype=torch.int64, device=device)
    kw = {"num": num, "seed": seed, "stream": stream, "partition": partition}
    fns = {
        "plain": functools.partial(plain.views, num, sigma, out_dtype),
        "drs_ext": functools.partial(noisy_views, x[None], sigma, out_dtype=out_dtype, **kw),
    }
    ms = median_ms(fns, warmup, repeats, device)
    written = num_branches(partition) * num * x.numel() * torch.finfo(out_dtype).bits // 8
    figures = (ms["plain"], ms["drs_ext"], deviation, tolerance, written)
    return ViewsBench(partition, tuple(int(s) for s in shape), num, out_dtype, *figures)


def report(
    results: Sequence[ViewsBench],
    device: str,
    warmup: int,
    repeats: int,
    copy_bw: float | None,
) -> str:
    """The markdown `drs bench` prints: device, setting, check, then one row per partition; with
    `copy_bw` (bytes/s, on CUDA) also each pipeline's fraction of that bandwidth floor."""
    first = results[0]
    c, h, w = first.shape
    dtype = str(first.out_dtype).removeprefix("torch.")
    unit = f" + one unit of {dtype} at max|x| + 7σ" if dtype != "float32" else ""
    text = (
        f"# drs bench: drs_ext.noisy_views vs the plain-PyTorch pipeline\n\nDevice: {device}  \n"
        f"Setting: one {c}x{h}x{w} float32 image, num = {first.num} draws per branch, "
        f"sigma = {SIGMA}, out {dtype}; median of {repeats} runs after {warmup} warm-up "
        f"run{'s' * (warmup != 1)}, both pipelines timed alternately in this run; "
        "speed-up = plain / drs_ext.  \n"
        "Plain: `x.repeat` + `torch.randn_like` (+ for diag: indexing of the diagonal sub-image, "
        "noise in sub-image space, 4-neighbour fill with `F.pad` shifts), then `.to(dtype)`.  \n"
        f"Check before timing: output shape and dtype, and one draw against drs_ext.reference "
        f"(max deviation per row; tolerance 2e-6·(1 + max|x| + 7σ){unit} = {first.tolerance:.1e})."
    )
    header = ["partition x fill", "views", "plain ms", "drs_ext ms", "speed-up"]
    if copy_bw is not None:
        text += (
            f"  \nDevice-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (bytes read + "
            "written / time of a large `copy_`); 'of copy BW': bytes of the views written once / "
            "time over it (the plain pipeline credited with the same bytes)."
        )
        header += ["drs_ext GB/s", "drs_ext of copy BW", "plain of copy BW"]
    header.append("max dev. vs reference")

    def ms(value: float) -> str:  # three significant digits, no exponent: 0.0123, 58.0, 6595.0
        return f"{value:.1f}" if value >= 99.95 else f"{value:#.3g}"

    rows = []
    for r in results:
        row = [
            "diag x neighbors" if r.partition == "diag" else "none",
            f"{num_branches(r.partition)} x {r.num} x {c}x{h}x{w}",
            ms(r.plain_ms),
            ms(r.drs_ext_ms),
            f"{r.plain_ms / r.drs_ext_ms:.2f}x",
        ]
        if copy_bw is not None:  # bytes/s of each pipeline: the op is bandwidth-bound on a GPU
            rates = [r.written / (t * 1e-3) for t in (r.drs_ext_ms, r.plain_ms)]
            row += [f"{rates[0] / 1e9:.0f}", *(f"{100 * b / copy_bw:.0f}%" for b in rates)]
        rows.append([*row, f"{r.max_deviation:.1e}"])
    return text + "\n\n" + table(header, rows)


def _device(text: str | None) -> torch.device:
    """--device as a torch.device with an index on CUDA, or a ValueError naming --device."""
    name = text or default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name}: drs bench runs on cpu or cuda, got {device.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible to torch")
    if not _C.built_with_cuda:
        raise ValueError(
            f"--device {name}: drs_ext was built without CUDA kernels; rebuild where nvcc is on "
            "PATH (pip install --no-build-isolation -e .)"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _settings(args: argparse.Namespace) -> tuple[torch.device, list[str], torch.dtype]:
    """Checks every option before anything runs; each error names its option."""
    channels, height, width = args.shape
    if min(args.shape) < 1:
        raise ValueError(f"--shape C H W must be >= 1 each, got {' '.join(map(str, args.shape))}")
    partitions = ["diag", "none"] if args.partition == "both" else [args.partition]
    if "diag" in partitions and width % 2:
        raise ValueError(
            f"--shape {channels} {height} {width} has an odd width W={width}, but --partition "
            f"{args.partition} runs partition diag, which needs an even W (or --partition none)"
        )
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    name = DTYPE_ALIASES.get(args.out_dtype.lower(), args.out_dtype.lower())
    if name not in OUT_DTYPES:
        raise ValueError(
            f"--out-dtype must be one of {', '.join(OUT_DTYPES)} (what noisy_views writes on "
            f"CPU and CUDA), got {args.out_dtype!r}"
        )
    return _device(args.device), partitions, OUT_DTYPES[name]


def run(args: argparse.Namespace) -> int:
    device, partitions, out_dtype = _settings(args)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (15 if cuda else 11)
    try:
        nbytes = min(2**30, torch.cuda.mem_get_info(device)[0] // 4) if cuda else 0
        copy_bw = copy_bandwidth(warmup, repeats, device, nbytes) if cuda else None
        kw = {"out_dtype": out_dtype, "device": device, "warmup": warmup, "repeats": repeats}
        results = [bench_views(args.shape, args.num, p, **kw) for p in partitions]
    except torch.cuda.OutOfMemoryError:
        raise ValueError(
            f"--num {args.num} with --shape {' '.join(map(str, args.shape))} does not fit in "
            f"{device}'s memory; use a smaller --num"
        ) from None
    except CheckFailed as err:
        print(f"drs bench: check failed: {err}", file=sys.stderr)
        return 1
    print(report(results, device_description(device), warmup, repeats, copy_bw))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time drs_ext.noisy_views against the plain-PyTorch pipeline on this machine",
        description="Times drs_ext.noisy_views against the plain-PyTorch pipeline (x.repeat + "
        "torch.randn_like + indexing + 4-neighbour fill) for one image, alternately in one run, "
        "after checking the op against drs_ext.reference; on CUDA also the write bandwidth and "
        "its fraction of the device-to-device copy bandwidth. Prints a markdown table.",
    )
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if usable, else cpu)")
    shape = {"type": int, "nargs": 3, "default": [3, 32, 32], "metavar": ("C", "H", "W")}
    p.add_argument("--shape", **shape, help="image shape (default 3 32 32)")
    p.add_argument("--num", type=int, default=1000, help="noise draws per branch (default 1000)")
    p.add_argument("--partition", default="both", choices=("none", "diag", "both"))
    p.add_argument(
        "--out-dtype",
        default="float32",
        help=f"dtype of the views: {', '.join(OUT_DTYPES)} (default float32; 16-bit output "
        "halves the bytes written, which matters on a GPU)",
    )
    p.add_argument("--repeats", type=int, help="timed runs, median reported (default 11; GPU 15)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 2; GPU 3)")
    p.set_defaults(func=run)
