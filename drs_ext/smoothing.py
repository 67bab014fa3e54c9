"""Randomized smoothing (RS, Cohen et al. 2019) and Dual Randomized Smoothing (DRS, paper 002).

`SmoothedClassifier` is a drop-in for Cohen et al.'s `core.Smooth`; `DualSmoothedClassifier`
keeps the same interface for DRS. Both draw noisy views with the fused `noisy_views` kernel and
count votes with `vote_counts` on the model's device; the counts come to the host once per call.

Noise counters. Every draw is a pure function of (seed, stream, branch, sample index), so a
certificate depends on neither the batch size nor the device. The three kinds of draws use
disjoint sample-index ranges, so selection and estimation never share noise:
  [0, 2^48)          CERTIFY selection draws (n0)
  [2^48, 2^49)       CERTIFY estimation draws (n)
  [2^49, 2^49+2^48)  PREDICT draws (n)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .model_call import ModelCall
from .ops import noisy_views, vote_counts
from .prefetch import prefetched
from .radius import drs_radius, rs_radius
from .stats import binom_test_p_value, lower_confidence_bound

SELECTION_OFFSET = 0
ESTIMATION_OFFSET = 1 << 48
PREDICT_OFFSET = 1 << 49
MAX_DRAWS = 1 << 48

Classifier = nn.Module | Sequence[nn.Module]


class _Ensemble(nn.Module):
    """Averages the logits of several models (paper 002, Table 5); one model passes through."""

    def __init__(self, models: Classifier) -> None:
        super().__init__()
        members = list(models) if isinstance(models, Sequence) else [models]
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise TypeError("a classifier must be an nn.Module or a non-empty list of them")
        self.members = nn.ModuleList(members)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](views)
        return torch.stack([m(views).float() for m in self.members]).mean(dim=0)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode while sampling: train-mode batch norm would couple the draws of a batch and
    break the independence the confidence bounds rely on. Restores the caller's modes."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_positive_int(name: str, value: object, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value}")
    return int(value)


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in the open interval (0, 1), got {alpha!r}")
    return float(alpha)


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"{name} must be a float > 0, got {sigma!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma}")
    return float(sigma)


class _Smoothing:
    """Shared sampling loop: P branch classifiers, each fed its branch's noisy views."""

    ABSTAIN = -1

    def __init__(
        self,
        branches: list[Classifier],
        num_classes: int,
        sigmas: list[float],
        partition: str,
        fill: str,
        model_call: ModelCall,
        prefetch_noise: bool,
    ) -> None:
        self.branches = [_Ensemble(b) for b in branches]
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.sigmas = sigmas
        self.partition = partition
        self.fill = fill
        self.model_call = model_call
        self.prefetch_noise = prefetch_noise

    def _check_call(self, x: torch.Tensor, seed: int, stream: int) -> None:
        for name, value, upper in (("seed", seed, 2**63), ("stream", stream, 2**32)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not 0 <= value < upper:
                raise ValueError(f"{name} must be in [0, {upper}), got {value}")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be one image of shape (C, H, W), got {shape}")
        if x.dtype != torch.float32:
            raise ValueError(f"x must be float32, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite, found NaN or Inf in the input image")

    def sample_counts(
        self,
        x: torch.Tensor,
        draws: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        stream: int,
        offset: int,
    ) -> np.ndarray:
        """Votes (P, K) of draws[p] noisy views of branch p, numbered offset, offset+1, ...

        At most `batch_size` views go through a model at once; counts stay on the device until
        the single copy at the end. On CUDA, with prefetch_noise, the views of the next batch
        are drawn on a side stream while the model runs (drs_ext.prefetch).
        """
        batch_size = _check_positive_int("batch_size", batch_size)
        counts = torch.zeros(
            len(self.branches), self.num_classes, dtype=torch.int64, device=x.device
        )
        # Filled on the device: torch.tensor([stream], device=cuda) would be a host-to-device
        # copy, which waits for the stream (a host synchronisation before every call).
        stream_ids = torch.full((1,), stream, dtype=torch.int64, device=x.device)
        with torch.inference_mode(), contextlib.ExitStack() as modes:
            for branch in self.branches:
                modes.enter_context(_eval_mode(branch))
            total = max(draws)

            def make_views(start: int) -> torch.Tensor:
                return noisy_views(
                    x[None],
                    self.sigmas,
                    num=min(batch_size, total - start),
                    seed=seed,
                    offset=offset + start,
                    stream=stream_ids,
                    partition=self.partition,
                    fill=self.fill,
                )[0]

            starts = range(0, total, batch_size)
            for start, views in prefetched(make_views, starts, x.device, self.prefetch_noise):
                for p, branch in enumerate(self.branches):
                    take = min(views.shape[1], draws[p] - start)
                    if take > 0:
                        logits = self.model_call(branch, views[p, :take])
                        counts[p] += vote_counts(logits[None])[0]
        counts_host = counts.cpu().numpy()
        missing = np.asarray(draws) - counts_host.sum(axis=1)
        if missing.any():
            warnings.warn(
                f"{int(missing.sum())} noisy views gave NaN logits and voted for no class",
                RuntimeWarning,
                stacklevel=3,
            )
        return counts_host

    def _cohen_predict(self, counts: np.ndarray, n: int, alpha: float) -> int:
        """Cohen et al.'s PREDICT on n i.i.d. votes of the smoothed classifier: return the top
        class if the one-sided binomial test of its votes against the runner-up's rejects at
        level alpha (valid for the data-selected top two: Hung & Fithian 2019), else abstain."""
        order = np.argsort(-counts, kind="stable")
        n_a = int(counts[order[0]])
        n_b = int(counts[order[1]]) if counts.size > 1 else 0
        if binom_test_p_value(n_a, n_a + n_b, 0.5) > alpha:
            return self.ABSTAIN
        return int(order[0])


class SmoothedClassifier(_Smoothing):
    """Standard RS: g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ² I). Cohen et al.'s interface.

    autocast_dtype, channels_last and cuda_graph choose how views go through the model
    (drs_ext.model_call.ModelCall); prefetch_noise draws the next batch's views on a side CUDA
    stream while the model runs the current one (drs_ext.prefetch). They change nothing else.
    """

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
            [_check_sigma(sigma)],
            "none",
            "neighbors",
            ModelCall(autocast_dtype, channels_last, cuda_graph),
            prefetch_noise,
        )
        self.sigma = self.sigmas[0]

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int = 0,
        stream: int = 0,
    ) -> int:
        """The smoothed prediction, or ABSTAIN; wrong with probability at most alpha."""
        self._check_call(x, seed, stream)
        n = _check_positive_int("n", n, MAX_DRAWS)
        alpha = _check_alpha(alpha)
        counts = self.sample_counts(
            x, [n], batch_size, seed=seed, stream=stream, offset=PREDICT_OFFSET
        )[0]
        return self._cohen_predict(counts, n, alpha)

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int = 0,
        stream: int = 0,
    ) -> tuple[int, float]:
        """(class, radius) such that g is constant on the l2 ball of that radius with
        probability at least 1 - alpha, or (ABSTAIN, 0.0)."""
        self._check_call(x, seed, stream)
        n0 = _check_positive_int("n0", n0, MAX_DRAWS)
        n = _check_positive_int("n", n, MAX_DRAWS)
        alpha = _check_alpha(alpha)
        selection = self.sample_counts(
            x, [n0], batch_size, seed=seed, stream=stream, offset=SELECTION_OFFSET
        )[0]
        c_hat = int(selection.argmax())
        estimation = self.sample_counts(
            x, [n], batch_size, seed=seed, stream=stream, offset=ESTIMATION_OFFSET
        )[0]
        p_lower = lower_confidence_bound(int(estimation[c_hat]), n, alpha)
        radius = rs_radius(p_lower, self.sigma)
        if radius <= 0:  # p_lower <= 1/2
            return self.ABSTAIN, 0.0
        return c_hat, radius


class DualSmoothedClassifier(_Smoothing):
    """DRS (paper 002): g(x) = argmax_c (P(fˡ(xˡ + εˡ) = c) + P(fʳ(xʳ + εʳ) = c)) / 2, where
    xˡ, xʳ are the two diagonal sub-images of x (DESIGN.md §2.1), εₚ ~ N(0, σₚ² I), and each
    branch classifier sees its noisy sub-image brought back to full resolution by `fill`.
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
        sigmas = [_check_sigma(pair[0], "sigma_l"), _check_sigma(pair[1], "sigma_r")]
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

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int = 0,
        stream: int = 0,
    ) -> int:
        """The smoothed prediction, or ABSTAIN; wrong with probability at most alpha.

        g's class probabilities are those of the mixture (pˡ + pʳ)/2. Sending each of n draws to
        branch l or r by a fair coin makes the n votes i.i.d. from that mixture exactly; the coin
        count nₗ ~ Binomial(n, 1/2) then fixes how many views each branch sees. Cohen et al.'s
        PREDICT on these votes inherits its guarantee unchanged.
        """
        self._check_call(x, seed, stream)
        n = _check_positive_int("n", n, MAX_DRAWS)
        alpha = _check_alpha(alpha)
        coins = np.random.default_rng([seed, stream, PREDICT_OFFSET])
        n_l = int(coins.binomial(n, 0.5))
        counts = self.sample_counts(
            x, [n_l, n - n_l], batch_size, seed=seed, stream=stream, offset=PREDICT_OFFSET
        )
        return self._cohen_predict(counts.sum(axis=0), n, alpha)

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int = 0,
        stream: int = 0,
    ) -> tuple[int, float]:
        """(class, radius) with R = (Φ⁻¹(p̲ₗ) + Φ⁻¹(p̲ᵣ)) / sqrt(σₗ⁻² + σᵣ⁻²), or (ABSTAIN, 0.0).

        Union bound: p̲ₗ and p̲ᵣ are each a (1 - alpha/2) lower bound, so both hold at once with
        probability at least 1 - alpha, and on that event the radius is valid (DESIGN.md §2.4).
        """
        self._check_call(x, seed, stream)
        n0 = _check_positive_int("n0", n0, MAX_DRAWS)
        n = _check_positive_int("n", n, MAX_DRAWS)
        alpha = _check_alpha(alpha)
        selection = self.sample_counts(
            x, [n0, n0], batch_size, seed=seed, stream=stream, offset=SELECTION_OFFSET
        )
        c_hat = int(selection.sum(axis=0).argmax())  # summed votes of both branches
        estimation = self.sample_counts(
            x, [n, n], batch_size, seed=seed, stream=stream, offset=ESTIMATION_OFFSET
        )
        p_lower_l = lower_confidence_bound(int(estimation[0, c_hat]), n, alpha / 2)
        p_lower_r = lower_confidence_bound(int(estimation[1, c_hat]), n, alpha / 2)
        radius = drs_radius(p_lower_l, p_lower_r, self.sigma_l, self.sigma_r)
        if radius <= 0:  # Φ⁻¹(p̲ₗ) + Φ⁻¹(p̲ᵣ) <= 0
            return self.ABSTAIN, 0.0
        return c_hat, radius
