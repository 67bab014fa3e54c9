"""benchmarks/trace_views.py's gpu_timeline: the split of a traced call into lead-in, kernel
time per kind and idle time, on a hand-made trace whose answer is worked out below."""

from __future__ import annotations

import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import trace_views  # noqa: E402

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
VIEWS = "void drs_ext::(anonymous namespace)::noisy_views_diag_kernel<(drs::Fill)0, float>"


def event(name, device, start, end, annotation=False):
    return SimpleNamespace(
        name=name,
        device_type=device,
        is_user_annotation=annotation,
        time_range=SimpleNamespace(start=start, end=end),
    )


def test_gpu_timeline_splits_a_call():
    events = [
        event(trace_views.CALL, CPU, 100.0, 150.0),
        event("cudaLaunchKernel", CPU, 105.0, 108.0),
        event(trace_views.CALL, CUDA, 100.0, 300.0, annotation=True),  # not GPU work
        event("void drs_ext::assert_finite_kernel(float const*, long)", CUDA, 110.0, 113.0),
        event(VIEWS, CUDA, 114.0, 200.0),
        event(VIEWS.replace("diag", "none"), CUDA, 205.0, 290.0),
        event("Memset (Device)", CUDA, 280.0, 295.0),  # overlaps the last kernel
    ]
    t = trace_views.gpu_timeline(events)
    # Busy: 3 + 86 + 85 + 5 (the memset past 290) = 179 of the span 110 .. 295.
    assert t == pytest.approx(
        {"lead-in": 10.0, "views": 171.0, "check": 3.0, "other": 15.0, "idle": 6.0, "span": 185.0}
    )


def test_gpu_timeline_needs_one_call_with_gpu_work():
    with pytest.raises(ValueError, match="0 GPU events"):
        trace_views.gpu_timeline([event(trace_views.CALL, CPU, 0.0, 1.0)])
    with pytest.raises(ValueError, match="2 'timed call' ranges"):
        trace_views.gpu_timeline(
            [
                event(trace_views.CALL, CPU, 0.0, 1.0),
                event(trace_views.CALL, CPU, 2.0, 3.0),
                event(VIEWS, CUDA, 0.5, 0.9),
            ]
        )
