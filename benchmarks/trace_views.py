"""Where the time of a timed noisy_views call goes on the GPU: a torch.profiler trace of the
calls that benchmarks/bench_cuda.py times in its views table (float32 rows).

    python benchmarks/trace_views.py [--repeats R]

bench_cuda.py times a call with CUDA events recorded around it, starting with the GPU idle;
Nsight Compute times the views kernel alone. At ImageNet size the two disagree by about 45 us
per call (RESULTS.md). This script splits the CUDA-event time of the same calls into:
  lead-in     from the call's start on the host to its first GPU activity (host time of the
              first launch, and launch latency);
  views       the views kernels' own durations (noisy_views_{diag,none}_kernel);
  check       assert_finite_kernel, the device-side finiteness check of x;
  other       any other GPU activity in the call (allocations are not GPU activity);
  idle        time inside the GPU span (first activity to last) with nothing running;
  rest        CUDA-event time minus lead-in and GPU span: the end event's latency, less the
              host time before the begin event is recorded (which lead-in counts).
Also the views kernels' bandwidth (bytes written once / their summed duration) as a fraction of
the device-to-device copy bandwidth, to compare with the Nsight Compute rows of RESULTS.md.
Each row is the median of R traced repetitions (one profiler session each, after warm-up);
"event ms" is the CUDA-event time of the same calls without the profiler, as bench_cuda.py
measures it. Prints a markdown table and writes nothing. Without a CUDA device or a build of
drs_ext with its CUDA kernels it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from bench_cuda import fused_views
from common import cuda_kernels_missing
from torch.profiler import ProfilerActivity, profile, record_function

from drs_ext.bench import copy_bandwidth, gpu_ms, table
from drs_ext.ops import num_branches

CALL = "timed call"  # the host range of one timed call in the trace
CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

# (label, (C, H, W), draws, draws per call, partition): the float32 rows of bench_cuda.py.
SETTINGS: list[tuple[str, tuple[int, int, int], int, int, str]] = [
    ("CIFAR 3x32x32", (3, 32, 32), 1000, 1000, "diag"),
    ("CIFAR 3x32x32", (3, 32, 32), 1000, 1000, "none"),
    ("ImageNet 3x224x224", (3, 224, 224), 1000, 250, "diag"),
    ("ImageNet 3x224x224", (3, 224, 224), 1000, 250, "none"),
]


def _category(name: str) -> str:
    if "noisy_views_diag_kernel" in name or "noisy_views_none_kernel" in name:
        return "views"
    if "assert_finite_kernel" in name:
        return "check"
    return "other"


def gpu_timeline(events: Iterable[Any]) -> dict[str, float]:
    """Split one traced call (profiler FunctionEvents: name, device_type, is_user_annotation,
    time_range.start/.end in us) into lead-in, per-category GPU time, and idle time inside the
    GPU span. Needs the host range CALL and at least one GPU activity."""
    events = list(events)
    starts = [e.time_range.start for e in events if e.name == CALL and e.device_type == CPU]
    gpu = sorted(
        (e.time_range.start, e.time_range.end, _category(e.name))
        for e in events
        if e.device_type == CUDA and not e.is_user_annotation
    )
    if len(starts) != 1 or not gpu:
        raise ValueError(
            f"a trace of one call with GPU activity expected: {len(starts)} "
            f"'{CALL}' ranges, {len(gpu)} GPU events"
        )
    parts = {"views": 0.0, "check": 0.0, "other": 0.0}
    busy, covered_to = 0.0, gpu[0][0]
    for start, end, category in gpu:
        parts[category] += end - start
        # The union of the activity intervals: overlapping kernels count once.
        busy += max(0.0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    span = covered_to - gpu[0][0]
    return {"lead-in": gpu[0][0] - starts[0], **parts, "idle": span - busy, "span": span}


def traced_call(fn: Callable[[], object]) -> dict[str, float]:
    """One call of fn under the profiler: gpu_timeline, the CUDA-event time ("traced ms") and
    what of it the timeline leaves ("rest"; below 0 by the host time before the begin event)."""
    torch.cuda.synchronize()
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(CALL):
            begin.record()
            fn()
            end.record()
        end.synchronize()
    ms = begin.elapsed_time(end)
    events = prof.events()
    timeline = gpu_timeline(events)
    if timeline["other"] > 0:  # say what it was, so the table needs no guessing
        other = {e.name for e in events if e.device_type == CUDA and _category(e.name) == "other"}
        print(f"  other GPU activity: {sorted(other)}")
    rest = 1e3 * ms - timeline["lead-in"] - timeline["span"]
    return {**timeline, "traced ms": ms, "rest": rest}


def trace_setting(
    shape: tuple[int, int, int], num: int, chunk: int, partition: str, repeats: int
) -> dict[str, float]:
    x = torch.rand(shape, device="cuda")
    stream = torch.zeros(1, dtype=torch.int64, device="cuda")
    fn = functools.partial(fused_views, x, stream, num, chunk, 0.25, partition, torch.float32)
    with torch.inference_mode():
        untraced = gpu_ms({"views": fn}, warmup=3, repeats=repeats)["views"]
        traces = [traced_call(fn) for _ in range(repeats)]
    return {"event ms": untraced} | {
        key: statistics.median(t[key] for t in traces) for key in traces[0]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="traced repetitions per row")
    args = parser.parse_args(argv)
    if cuda_kernels_missing("trace_views"):
        return 0
    copy_bw = copy_bandwidth(warmup=3, repeats=15)
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {copy_bw / 1e9:.0f}"
        f" GB/s; medians of {args.repeats} traced calls; times in us unless marked ms"
    )
    rows = []
    for label, shape, num, chunk, partition in SETTINGS:
        t = trace_setting(shape, num, chunk, partition, args.repeats)
        branches = num_branches(partition)
        written = 4 * branches * num * shape[0] * shape[1] * shape[2]
        rows.append(
            [
                label,
                partition,
                f"{num // chunk} x {chunk}",
                f"{t['event ms']:.3f}",
                f"{t['traced ms']:.3f}",
                f"{t['lead-in']:.1f}",
                f"{t['views']:.1f}",
                f"{t['check']:.1f}",
                f"{t['other']:.1f}",
                f"{t['idle']:.1f}",
                f"{t['rest']:.1f}",
                f"{100 * written / (t['views'] * 1e-6) / copy_bw:.0f}%",
            ]
        )
        print("  " + " | ".join(rows[-1]), flush=True)
    header = [
        "input",
        "partition",
        "calls x draws",
        "event ms",
        "traced ms",
        "lead-in",
        "views",
        "check",
        "other",
        "idle",
        "rest",
        "views kernels of copy BW",
    ]
    print("\n" + table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
