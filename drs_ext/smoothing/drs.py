"""Dual Randomized Smoothing, DRS (Xia, Yu, Jiang, Ding, "Mitigating the Curse of
Dimensionality for Certified Robustness via Dual Randomized Smoothing", ICLR 2024): the image
is split into its two diagonal sub-images, each smoothed by its own branch classifier."""

from __future__ import annotations

import numpy as np
import torch

from ..radius import drs_radius
from ..stats import lower_confidence_bound
from .model_call import ModelCall
from .sampling import BranchSmoothing, Classifier, check_sigma, is_real


class DualSmoothedClassifier(BranchSmoothing):
    """g(x) = argmax_c (P(fˡ(xˡ + εˡ) = c) + P(fʳ(xʳ + εʳ) = c)) / 2, where xˡ, xʳ are the two
    diagonal sub-images of x (docs/design.md §2.1), εₚ ~ N(0, σₚ² I), and each branch
    classifier sees its noisy sub-image brought back to full resolution by `fill`.
    The keyword options are those of SmoothedClassifier."""

    method = "drs"

    def __init__(
        self,
        classifier_l: Classifier,
        classifier_r: Classifier,
        num_classes: int,
        sigma: float | tuple[float, float],
        fill: str = "neighbors",
        *,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        cuda_graph: bool = False,
        prefetch_noise: bool = True,
    ) -> None:
        pair = (sigma, sigma) if is_real(sigma) else sigma
        if not isinstance(pair, (tuple, list, np.ndarray)) or len(pair) != 2:
            raise ValueError(f"sigma must be one value or a pair (sigma_l, sigma_r), got {sigma!r}")
        sigmas = [check_sigma(pair[0], "sigma_l"), check_sigma(pair[1], "sigma_r")]
        super().__init__(
            [classifier_l, classifier_r],
            num_classes,
            sigmas,
            "diag",
            fill,
            ModelCall(autocast_dtype, channels_last, cuda_graph),
            prefetch_noise,
        )
        self.sigma_l, self.sigma_r = sigmas

    def lower_bounds(self, counts: np.ndarray, n: int, alpha: float) -> np.ndarray:
        """Union bound: p̲ₗ and p̲ᵣ are each a (1 - alpha/2) Clopper–Pearson lower bound, so both
        hold at once with probability at least 1 - alpha, and on that event the radius is valid
        (docs/design.md §2.4)."""
        return np.array([lower_confidence_bound(int(k), n, alpha / 2) for k in counts[:2]])

    def radius_from_bounds(self, p_lower: np.ndarray) -> float:
        """R = (Φ⁻¹(p̲ₗ) + Φ⁻¹(p̲ᵣ)) / √(σₗ⁻² + σᵣ⁻²)."""
        return drs_radius(float(p_lower[0]), float(p_lower[1]), self.sigma_l, self.sigma_r)
