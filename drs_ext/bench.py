"""Benchmark helpers shipped with the package, so that `drs bench` can profile the kernels on a
user's own machine (the repository's benchmarks/ folder is not installed by pip; its scripts
import these same helpers, so their figures and `drs bench`'s are defined alike).

DESIGN.md §5: a benchmark, never a timed test; always the ratio against the plain-PyTorch
pipeline users write today (`PlainViews`, not `drs_ext.reference`, which is an oracle and not a
fair baseline) measured alternately in the same run, and on a GPU the fraction of the
memory-bandwidth floor (bytes written once / measured device-to-device copy bandwidth).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _C, reference
from .ops import noisy_views, num_branches

__all__ = [
    "OUT_DTYPES",
    "CheckFailed",
    "PlainViews",
    "ViewsBench",
    "bench_views",
    "check_views",
    "copy_bandwidth",
    "cpu_name",
    "device_description",
    "gpu_ms",
    "median_ms",
    "neighbour_sum",
    "reference_tolerance",
    "report",
    "table",
]

# The dtypes noisy_views writes on both backends (csrc/noisy_views_args.h).
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- the plain-PyTorch pipeline ----------------------------------------------------------------


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


# -- timing ------------------------------------------------------------------------------------


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
    device = torch.device(device)
    if device.type != "cuda":
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        return {name: statistics.median(t) for name, t in times.items()}
    with torch.cuda.device(device):
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        torch.cuda.synchronize()
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start_event = torch.cuda.Event(enable_timing=True)
                end_event = torch.cuda.Event(enable_timing=True)
                start_event.record()
                fn()
                end_event.record()
                end_event.synchronize()
                times[name].append(start_event.elapsed_time(end_event))
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median CUDA-event time (ms) of each function on the current GPU, run alternately."""
    return median_ms(fns, warmup, repeats, "cuda")


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


# -- reporting ---------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (what benchmarks/RESULTS.md and `drs bench` print)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo, else what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (taskset, cgroups)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_description(device: str | torch.device = "cpu") -> str:
    """One line naming what a figure was measured on: figures mean little without it."""
    device = torch.device(device)
    versions = f"torch {torch.__version__}"
    threads = f"{torch.get_num_threads()} threads"
    if device.type != "cuda":
        return f"{cpu_name()}, {_cores()} cores, {versions} ({threads}), drs_ext {_C.__version__}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{versions}, CUDA {torch.version.cuda}, drs_ext {_C.__version__} "
        f"(archs {_C.cuda_archs or 'default'}); host {cpu_name()} ({threads})"
    )


# -- noisy_views against the plain pipeline ----------------------------------------------------


class CheckFailed(RuntimeError):
    """The op's output is wrong (shape, dtype or values): its timing would mean nothing."""


def reference_tolerance(x: torch.Tensor, sigma: float, out_dtype: torch.dtype) -> float:
    """Kernel vs drs_ext.reference tolerance, as in the test suite: 2e-6·(1 + max|x| + 7σ)
    (float32 polynomials for ln and sincos against float64 libm; |N(0,1)| < 7 from Box–Muller),
    plus one unit of the output dtype at the largest value for 16-bit outputs (each is its
    float32 value rounded once, and a float32 difference may straddle a rounding boundary)."""
    atol = 2e-6 * (1.0 + float(x.abs().max()) + 7.0 * sigma)
    if out_dtype != torch.float32:
        atol += torch.finfo(out_dtype).eps * (float(x.abs().max()) + 7.0 * sigma)
    return atol


def check_views(
    x: torch.Tensor,
    partition: str,
    num: int,
    sigma: float,
    seed: int,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Cheap correctness check before timing: the op's output for `num` draws of x (C, H, W)
    has the right shape and dtype, and its first draw matches drs_ext.reference (the slow
    oracle, so one draw only). Returns (max |op - reference|, tolerance); raises CheckFailed."""
    out = noisy_views(x[None], sigma, num=num, seed=seed, partition=partition, out_dtype=out_dtype)
    shape = (1, num_branches(partition), num, *x.shape)
    if tuple(out.shape) != shape or out.dtype != out_dtype:
        raise CheckFailed(
            f"noisy_views returned {tuple(out.shape)} {out.dtype}, expected {shape} {out_dtype}"
        )
    first = out[:, :, :1].cpu().double()
    expected = reference.noisy_views(
        x[None].cpu(), sigma, num=1, seed=seed, partition=partition, fill_mode="neighbors"
    ).double()
    deviation = float((first - expected).abs().max())
    tolerance = reference_tolerance(x, sigma, out_dtype)
    if not math.isfinite(deviation) or deviation > tolerance:
        raise CheckFailed(
            f"noisy_views (partition={partition}, out_dtype={out_dtype}) deviates from "
            f"drs_ext.reference by {deviation:.3e} > tolerance {tolerance:.3e}: the build is "
            "broken, its timings would mean nothing"
        )
    return deviation, tolerance


@dataclass(frozen=True)
class ViewsBench:
    """One setting's figures. `write_gbps` and `copy_fraction` (bytes of the views written once
    / time, and that over the device-to-device copy bandwidth) only on CUDA, where the op is
    bandwidth-bound; `plain_copy_fraction` credits the plain pipeline with the same bytes."""

    partition: str
    shape: tuple[int, int, int]
    num: int
    out_dtype: torch.dtype
    device: str
    plain_ms: float
    drs_ext_ms: float
    max_deviation: float
    tolerance: float
    bytes_written: int
    write_gbps: float | None = None
    copy_fraction: float | None = None
    plain_copy_fraction: float | None = None

    @property
    def speedup(self) -> float:
        """plain / drs_ext: how many times faster the fused op is than the user's pipeline."""
        return self.plain_ms / self.drs_ext_ms


def bench_views(
    shape: Sequence[int],
    num: int,
    partition: str,
    *,
    out_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    sigma: float = 0.5,
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 11,
    copy_bw: float | None = None,
) -> ViewsBench:
    """drs_ext.noisy_views against PlainViews for one image of `shape` (C, H, W), `num` draws of
    every branch of `partition` written as `out_dtype`, timed alternately in this run after a
    correctness check (check_views). On CUDA, `copy_bw` (bytes/s; measured here when None) gives
    the fraction of the bandwidth floor."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(shape), generator=gen).to(device)
    deviation, tolerance = check_views(x, partition, num, sigma, seed, out_dtype)
    plain = PlainViews(x, partition)
    stream = torch.zeros(1, dtype=torch.int64, device=device)

    def ours() -> torch.Tensor:
        return noisy_views(
            x[None],
            sigma,
            num=num,
            seed=seed,
            stream=stream,
            partition=partition,
            out_dtype=out_dtype,
        )

    ms = median_ms(
        {"plain": lambda: plain.views(num, sigma, out_dtype), "drs_ext": ours},
        warmup,
        repeats,
        device,
    )
    written = num_branches(partition) * num * x.numel() * torch.finfo(out_dtype).bits // 8
    extra: dict[str, float] = {}
    if device.type == "cuda":
        bandwidth = copy_bw if copy_bw is not None else copy_bandwidth(warmup, repeats, device)
        extra = {
            "write_gbps": written / (ms["drs_ext"] * 1e-3) / 1e9,
            "copy_fraction": written / (ms["drs_ext"] * 1e-3) / bandwidth,
            "plain_copy_fraction": written / (ms["plain"] * 1e-3) / bandwidth,
        }
    return ViewsBench(
        partition=partition,
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        num=num,
        out_dtype=out_dtype,
        device=str(device),
        plain_ms=ms["plain"],
        drs_ext_ms=ms["drs_ext"],
        max_deviation=deviation,
        tolerance=tolerance,
        bytes_written=written,
        **extra,
    )


# -- report ------------------------------------------------------------------------------------


def _format_ms(value: float) -> str:
    """Three significant digits, no exponent: 0.0123, 9.13, 58.0, 6595.0."""
    return f"{value:.1f}" if value >= 99.95 else f"{value:#.3g}"


def report(
    results: Sequence[ViewsBench],
    device: str,
    warmup: int,
    repeats: int,
    copy_bw: float | None,
    sigma: float,
) -> str:
    """The markdown `drs bench` prints: device, setting, check, then one row per partition."""
    first = results[0]
    c, h, w = first.shape
    dtype = str(first.out_dtype).removeprefix("torch.")
    lines = [
        "# drs bench: drs_ext.noisy_views vs the plain-PyTorch pipeline",
        "",
        f"Device: {device}  ",
        f"Setting: one {c}x{h}x{w} float32 image, num = {first.num} draws per branch, "
        f"sigma = {sigma}, out {dtype}; median of {repeats} runs after {warmup} warm-up "
        f"run{'s' * (warmup != 1)}, both pipelines timed alternately in this run; "
        "speed-up = plain / drs_ext.  ",
        "Plain: `x.repeat` + `torch.randn_like` (+ for diag: indexing of the diagonal sub-image, "
        "noise in sub-image space, 4-neighbour fill with `F.pad` shifts), then `.to(dtype)`.  ",
        f"Check before timing: output shape and dtype, and one draw against drs_ext.reference "
        f"(max deviation per row; tolerance 2e-6·(1 + max|x| + 7σ)"
        f"{' + one unit of ' + dtype + ' at max|x| + 7σ' if dtype != 'float32' else ''}"
        f" = {first.tolerance:.1e}).",
    ]
    header = ["partition x fill", "views", "plain ms", "drs_ext ms", "speed-up"]
    if copy_bw is not None:
        lines[-1] += "  "
        lines.append(
            f"Device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (bytes read + written "
            "/ time of a large `copy_`); 'of copy BW': bytes of the views written once / time "
            "over it (the plain pipeline credited with the same bytes)."
        )
        header += ["drs_ext GB/s", "drs_ext of copy BW", "plain of copy BW"]
    header.append("max dev. vs reference")
    rows = []
    for r in results:
        branches = 2 if r.partition == "diag" else 1
        row = [
            "diag x neighbors" if r.partition == "diag" else "none",
            f"{branches} x {r.num} x {c}x{h}x{w}",
            _format_ms(r.plain_ms),
            _format_ms(r.drs_ext_ms),
            f"{r.speedup:.2f}x",
        ]
        if copy_bw is not None:
            row += [
                f"{r.write_gbps:.0f}",
                f"{100 * (r.copy_fraction or 0.0):.0f}%",
                f"{100 * (r.plain_copy_fraction or 0.0):.0f}%",
            ]
        rows.append([*row, f"{r.max_deviation:.1e}"])
    return "\n".join(lines) + "\n\n" + table(header, rows)
