"""Randomized smoothing, RS (Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019): one branch, the whole image plus N(0, σ² I) noise."""

from __future__ import annotations

import numpy as np
import torch

from ..radius import rs_radius
from ..stats import lower_confidence_bound
from .model_call import ModelCall
from .sampling import BranchSmoothing, Classifier, check_sigma


class SmoothedClassifier(BranchSmoothing):
    """g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ² I); a drop-in for Cohen et al.'s
    `core.Smooth` (same `predict` / `certify` signatures). As there, each call draws fresh noise
    from torch's default generator unless given a `seed` (then it is reproducible), and float64
    images are accepted (converted to float32).

    autocast_dtype, channels_last and cuda_graph choose how views go through the model
    (model_call.ModelCall); prefetch_noise draws the next batch's views on a side CUDA stream
    while the model runs the current one (prefetch.py). They change nothing else.
    """

    method = "rs"

    def __init__(
        self,
        base_classifier: Classifier,
        num_classes: int,
        sigma: float,
        *,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        prefetch_noise: bool = True,
    ) -> None:
        super().__init__(
            [base_classifier],
            num_classes,
            [check_sigma(sigma)],
            "none",
            "neighbors",
            ModelCall(autocast_dtype, channels_last, cuda_graph),
            prefetch_noise,
        )
        self.sigma = self.sigmas[0]

    def lower_bounds(self, counts: np.ndarray, n: int, alpha: float) -> np.ndarray:
        """One Clopper–Pearson lower bound, at the whole alpha."""
        return np.array([lower_confidence_bound(int(counts[0]), n, alpha)])

    def radius_from_bounds(self, p_lower: np.ndarray) -> float:
        """R = σ Φ⁻¹(p̲)."""
        return rs_radius(float(p_lower[0]), self.sigma)
