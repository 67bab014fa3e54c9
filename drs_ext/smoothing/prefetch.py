"""Noisy views of the next batch drawn on a side CUDA stream while the model runs the current one.

The views kernel is bound by memory bandwidth and the model mostly by arithmetic, so on a GPU the
two overlap well. The views are the same tensors either way (the noise is a pure function of its
counters), so prefetching changes timing only, never a count or a certificate.

Stream order, on CUDA:
  side waits for main once       x and the stream ids were written on the main stream;
  batch i+1 launched on side     before the consumer enqueues the model for batch i on main;
  main waits for batch i's event before it reads batch i's views;
  views.record_stream(main)      the allocator keeps a batch's memory until main is done with it.
At most two batches of views are alive at once: the one the model reads and the next.
The side stream is one per device for the whole process. The caching allocator keeps freed memory
per stream, so a new pool stream per call (torch.cuda.Stream() cycles through 32) would make each
certify call allocate its views afresh (cudaMalloc, and up to 32 streams' worth of cached views).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream on which views are prefetched for `device` (a CUDA device with its index)."""
    return torch.cuda.Stream(device=device)


def prefetched(
    make: Callable[[int], torch.Tensor],
    starts: Sequence[int],
    device: torch.device,
    enabled: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (start, make(start)) for each start in order; on a CUDA device with `enabled`,
    make(start of the next batch) runs on a side stream while the caller uses the current one."""
    if not (enabled and device.type == "cuda") or not starts:
        for start in starts:
            yield start, make(start)
        return
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(main)

    def launch(start: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(side):
            views = make(start)
            ready = torch.cuda.Event()
            ready.record(side)
        return views, ready

    pending = launch(starts[0])
    for i, start in enumerate(starts):
        views, ready = pending
        if i + 1 < len(starts):
            pending = launch(starts[i + 1])
        main.wait_event(ready)
        views.record_stream(main)
        yield start, views
