"""Dual Randomized Smoothing, DRS (Xia, Yu, Jiang, Ding, "Mitigating the Curse of
Dimensionality for Certified Robustness via Dual Randomized Smoothing", ICLR 2024): the image
is split into its two diagonal sub-images, each smoothed by its own branch classifier."""

from __future__ import annotations

import numpy as np
import torch

from ..radius import drs_radius
from ..stats import lower_confidence_bound
from .model_call import ModelCall
from .sampling import BranchSmoothing, Classifier, check_sigma


class DualSmoothedClassifier(BranchSmoothing):
    """g(x) = argmax_c (P(fˡ(xˡ + εˡ) = c) + P(fʳ(xʳ + εʳ) = c)) / 2, where xˡ, xʳ are the two
    diagonal sub-images of x (docs/design.md §2.1), εₚ ~ N(0, σₚ² I), and each branch
    classifier sees its noisy sub-image brought back to full resolution by `fill`.
    The keyword options are those of SmoothedClassifier."""

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
        pair = sigma if isinstance(sigma, (tuple, list)) else (sigma, sigma)
        if len(pair) != 2:
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

    def radius_from_counts(self, counts: np.ndarray, n: int, alpha: float) -> float:
        """R = (Φ⁻¹(p̲ₗ) + Φ⁻¹(p̲ᵣ)) / √(σₗ⁻² + σᵣ⁻²) (docs/design.md §2.4).

        Union bound: p̲ₗ and p̲ᵣ are each a (1 - alpha/2) lower bound, so both hold at once with
        probability at least 1 - alpha, and on that event the radius is valid.
        """
        p_lower_l = lower_confidence_bound(int(counts[0]), n, alpha / 2)
        p_lower_r = lower_confidence_bound(int(counts[1]), n, alpha / 2)
        return drs_radius(p_lower_l, p_lower_r, self.sigma_l, self.sigma_r)
