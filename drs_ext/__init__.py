"""drs_ext: certified robustness by randomized smoothing (RS) and Dual Randomized Smoothing (DRS).

The hot path (noisy views of many draws, vote counting) runs in fused C++/CUDA kernels (`ops`);
the statistics (`stats`), radii (`radius`) and certification algorithms (`smoothing`) are plain
Python on top of them. `train`, `io` and `cli` hold training, files and the `drs` command.
"""

from __future__ import annotations

from . import radius, reference, stats
from ._C import __version__, built_with_cuda, cuda_archs
from .ops import noisy_views, vote_counts
from .smoothing import DualSmoothedClassifier, SmoothedClassifier

__all__ = [
    "__version__",
    "DualSmoothedClassifier",
    "SmoothedClassifier",
    "built_with_cuda",
    "cuda_archs",
    "noisy_views",
    "radius",
    "reference",
    "stats",
    "vote_counts",
]
