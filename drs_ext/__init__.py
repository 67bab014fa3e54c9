"""drs_ext: certified robustness by randomized smoothing and Dual Randomized Smoothing (DRS).

The hot path (noisy views of many draws, vote counting) runs in fused C++/CUDA kernels; the
statistics, radii and certification algorithms are plain Python on top of them.
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
