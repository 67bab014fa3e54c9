"""How batches of noisy views go through a base classifier: autocast, channels_last, CUDA graphs.

None of these options touches the noise or the counting, so a certificate can change only through
the model's own outputs (e.g. float16 logits that flip a near-tie).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class _GraphedCall:
    """A CUDA graph of fn(views) for one input shape, replayed on a static input buffer."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> None:
        self.static_in = example.clone()
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN autotuning, allocator)
            for _ in range(2):
                fn(self.static_in)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        # The output buffer is reused by the next replay; callers consume it (vote_counts) on the
        # same stream before that, so stream order makes this safe without a copy.
        self.static_in.copy_(views)
        self.graph.replay()
        return self.static_out


@dataclass
class ModelCall:
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    cuda_graph: bool = False
    _graphs: dict[tuple, _GraphedCall] = field(default_factory=dict, repr=False)

    def _eager(self, model: nn.Module, views: torch.Tensor, sigma: float | None) -> torch.Tensor:
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            views.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            if sigma is None:
                return model(views)
            # Filled on the device: no host-to-device copy, so no wait for the stream.
            return model(views, torch.full(views.shape[:1], sigma, device=views.device))

    def __call__(
        self, model: nn.Module, views: torch.Tensor, sigma: float | None = None
    ) -> torch.Tensor:
        """model(views), or, given the views' noise level sigma, model(views, σ per view (B,))
        for a model that takes it."""
        if not (self.cuda_graph and views.is_cuda):
            return self._eager(model, views, sigma)
        key = (id(model), tuple(views.shape), views.dtype, views.device, sigma)
        if key not in self._graphs:
            self._graphs[key] = _GraphedCall(lambda v: self._eager(model, v, sigma), views)
        return self._graphs[key](views)
