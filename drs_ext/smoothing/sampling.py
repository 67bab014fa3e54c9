"""The sampling and certification loop shared by every smoothing method with P noise branches.

RS is P = 1 (the whole image, one σ); DRS is P = 2 (the two diagonal sub-images, a σ each). A
method subclasses `BranchSmoothing` and supplies only what differs: how the α budget is split
over its confidence bounds and the radius that follows (`radius_from_counts`).

Noise counters. Every draw is a pure function of (seed, stream, branch, sample index)
(docs/design.md §2.2), so a certificate depends on neither the batch size nor the device. The
three kinds of draws use disjoint sample-index ranges, so selection and estimation never share
noise and a later draw never reuses a counter:
  [0, 2^48)          CERTIFY selection draws (n0)
  [2^48, 2^49)       CERTIFY estimation draws (n)
  [2^49, 2^49+2^48)  PREDICT draws (n)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..ops import FILLS, PARTITIONS, noisy_views, num_branches, vote_counts
from ..stats import binom_test_p_value
from .model_call import ModelCall
from .prefetch import prefetched

SELECTION_OFFSET = 0
ESTIMATION_OFFSET = 1 << 48
PREDICT_OFFSET = 1 << 49
MAX_DRAWS = 1 << 48

Classifier = nn.Module | Sequence[nn.Module]


class Ensemble(nn.Module):
    """Averages the logits of several models (Xia et al., Table 5); one model passes through.

    A base classifier that needs each view's noise level (a denoiser in front of a classifier,
    as in Carlini et al.'s denoised smoothing) declares it with an attribute `takes_sigma =
    True` and is called as model(views, sigma), sigma a (B,) tensor of the views' σ.
    """

    def __init__(self, models: Classifier) -> None:
        super().__init__()
        members = list(models) if isinstance(models, Sequence) else [models]
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise TypeError("a classifier must be an nn.Module or a non-empty list of them")
        kinds = {bool(getattr(m, "takes_sigma", False)) for m in members}
        if len(kinds) > 1:
            raise ValueError("an ensemble's models must all take sigma, or none of them")
        self.members = nn.ModuleList(members)
        self.takes_sigma = kinds.pop()

    def forward(self, views: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        args = (views,) if sigma is None else (views, sigma)
        if len(self.members) == 1:
            return self.members[0](*args)
        return torch.stack([m(*args).float() for m in self.members]).mean(dim=0)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode while sampling: train-mode batch norm would couple the draws of a batch and
    break the independence the confidence bounds rely on. Restores the caller's modes."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def check_positive_int(name: str, value: object, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value}")
    return int(value)


def is_real(value: object) -> bool:
    """A Python or NumPy real number (np.float32 included); bool is never a σ or an α."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_alpha(alpha: float, name: str = "alpha") -> float:
    if not is_real(alpha) or not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {alpha!r}")
    return float(alpha)


def check_sigma(sigma: float, name: str = "sigma") -> float:
    if not is_real(sigma):
        raise ValueError(f"{name} must be a float > 0, got {sigma!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma}")
    return float(sigma)


def resolve_seed(seed: int | None) -> int:
    """An explicit seed as it is; None draws one from torch's default generator, so each call
    gets fresh noise (as Cohen et al.'s code does) and torch.manual_seed makes a run repeatable."""
    if seed is None:
        return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return seed  # checked by _check_call


@dataclass(frozen=True)
class Certificate:
    """One certificate: prediction (ABSTAIN = -1 when not certified) and radius (0.0 then),
    the class selected from the n0 draws, and each branch's lower bound on its probability."""

    prediction: int
    radius: float
    selected: int
    p_lower: tuple[float, ...]


class BranchSmoothing:
    """g(x) = argmax_c Σ_p P(f_p(view_p(x) + ε_p) = c): P branch classifiers, each fed the noisy
    views of its branch (noisy_views with `partition`), votes summed over the branches."""

    ABSTAIN = -1
    method = "branch-smoothing"  # a method's name in result files' settings (`settings`)

    def __init__(
        self,
        branches: Sequence[Classifier],
        num_classes: int,
        sigmas: Sequence[float],
        partition: str,
        fill: str,
        model_call: ModelCall,
        prefetch_noise: bool,
    ) -> None:
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {partition!r}")
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {list(FILLS)}, got {fill!r}")
        if len(branches) != num_branches(partition) or len(sigmas) != len(branches):
            raise ValueError(
                f"partition {partition!r} has {num_branches(partition)} branches; got "
                f"{len(branches)} classifiers and {len(sigmas)} sigmas"
            )
        self.branches = [Ensemble(b) for b in branches]
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.sigmas = [float(s) for s in sigmas]
        self.partition = partition
        self.fill = fill
        self.model_call = model_call
        self.prefetch_noise = prefetch_noise

    # -- what a method supplies ----------------------------------------------------------------

    def lower_bounds(self, counts: np.ndarray, n: int, alpha: float) -> np.ndarray:
        """Lower confidence bounds (P,) on each branch's probability of the selected class from
        counts[p] = its votes among the n estimation draws of branch p, holding together with
        probability at least 1 - alpha (the method's α split)."""
        raise NotImplementedError

    def radius_from_bounds(self, p_lower: np.ndarray) -> float:
        """The certified radius given the branch bounds; <= 0 abstains."""
        raise NotImplementedError

    def radius_from_counts(self, counts: np.ndarray, n: int, alpha: float) -> float:
        return self.radius_from_bounds(self.lower_bounds(counts, n, alpha))

    def max_radius(self, n: int, alpha: float) -> float:
        """The largest radius `certify` can return with n estimation draws: every draw votes
        for the class (Clopper–Pearson never reaches 1, so n caps the radius)."""
        return self.radius_from_counts(np.full(len(self.branches), n), n, alpha)

    def settings(self) -> dict:
        """What a result file records about this classifier (drs_ext/io/settings.py): the
        method's name, σ per branch and the fill of a partitioned method. A method with more
        parameters (per-stage σ, ...) extends the dict; every key is compared on resume/merge."""
        return {
            "method": self.method,
            "sigma": list(self.sigmas),
            "fill": self.fill if self.partition != "none" else None,
        }

    # -- the shared algorithms -----------------------------------------------------------------

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int | None = None,
        stream: int = 0,
    ) -> int:
        """The smoothed prediction, or ABSTAIN; wrong with probability at most alpha.

        x is one image (C, H, W), float32; float64 (and 16-bit float) images are converted to
        float32, the dtype the noise is drawn in. seed=None (the default) takes a seed from
        torch's default generator, so every call draws fresh noise as Cohen et al.'s code does,
        and torch.manual_seed makes a sequence of calls repeatable; an explicit seed (with
        stream, e.g. the image's index) makes the call itself reproducible. Views whose logits
        are all NaN vote for no class; with no votes at all the prediction abstains.

        g's class probabilities are those of the branch mixture Σ_p p_p / P. Sending each of the
        n draws to a branch chosen uniformly at random makes the n votes i.i.d. from that
        mixture exactly, so Cohen et al.'s PREDICT on them keeps its guarantee. With one branch
        every draw goes to it; the draw is seeded by (seed, stream), so it is reproducible.
        """
        seed = resolve_seed(seed)
        x = self._check_call(x, seed, stream)
        n = check_positive_int("n", n, MAX_DRAWS)
        alpha = check_alpha(alpha)
        dice = np.random.default_rng([seed, stream, PREDICT_OFFSET])
        branches = len(self.branches)
        draws = dice.multinomial(n, [1.0 / branches] * branches).tolist()
        counts = self.sample_counts(
            x, draws, batch_size, seed=seed, stream=stream, offset=PREDICT_OFFSET
        )
        return self._top_two_test(counts.sum(axis=0), alpha)

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int | None = None,
        stream: int = 0,
        sequential: bool = False,
        tol: float = 0.01,
    ) -> tuple[int, float]:
        """(class, radius) such that g is constant on the l2 ball of that radius with
        probability at least 1 - alpha, or (ABSTAIN, 0.0).

        ĉ is the top class of the votes of n0 selection draws per branch, summed over the
        branches; fresh estimation draws (their own counter range) then bound each branch's
        probability of ĉ, and the method turns those bounds into a radius. x, seed and stream
        as in `predict`; when no selection draw votes (every logit NaN) it abstains.

        sequential=True: n is the most estimation draws per branch (max_n). They are drawn in
        growing looks that stop once more draws could raise the radius by at most tol, and
        the radius comes from anytime-valid confidence sequences, valid at level alpha
        whatever the stopping time (smoothing/sequential.py).
        """
        if sequential:
            from .sequential import certify_sequential  # sequential.py imports this module

            est = certify_sequential(
                self, x, n0, n, alpha, batch_size, tol=tol, seed=seed, stream=stream
            )
            return est.prediction, est.radius
        cert = self.certify_details(x, n0, n, alpha, batch_size, seed=seed, stream=stream)
        return cert.prediction, cert.radius

    def certify_details(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        seed: int | None = None,
        stream: int = 0,
    ) -> Certificate:
        """`certify` with what it is made of: the selected class, the branch bounds, the radius
        (prediction ABSTAIN and radius 0.0 when it abstains; `radius` keeps the raw value)."""
        seed = resolve_seed(seed)
        x = self._check_call(x, seed, stream)
        n0 = check_positive_int("n0", n0, MAX_DRAWS)
        n = check_positive_int("n", n, MAX_DRAWS)
        alpha = check_alpha(alpha)
        branches = len(self.branches)
        selection = self.sample_counts(
            x, [n0] * branches, batch_size, seed=seed, stream=stream, offset=SELECTION_OFFSET
        )
        if not selection.any():  # every selection view NaN: no class to certify
            return Certificate(self.ABSTAIN, 0.0, self.ABSTAIN, (0.0,) * branches)
        c_hat = int(selection.sum(axis=0).argmax())
        estimation = self.sample_counts(
            x, [n] * branches, batch_size, seed=seed, stream=stream, offset=ESTIMATION_OFFSET
        )
        p_lower = self.lower_bounds(estimation[:, c_hat], n, alpha)
        radius = self.radius_from_bounds(p_lower)
        certified = radius > 0
        return Certificate(
            prediction=c_hat if certified else self.ABSTAIN,
            radius=radius if certified else 0.0,
            selected=c_hat,
            p_lower=tuple(float(p) for p in p_lower),
        )

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
        are drawn on a side stream while the model runs (prefetch.py).
        """
        batch_size = check_positive_int("batch_size", batch_size)
        if x.is_floating_point():
            x = x.float()  # float64 is rounded to float32, the noise's dtype, as in predict
        counts = torch.zeros(
            len(self.branches), self.num_classes, dtype=torch.int64, device=x.device
        )
        # Filled on the device: torch.tensor([stream], device=cuda) would be a host-to-device
        # copy, which waits for the stream (a host synchronisation before every call).
        stream_ids = torch.full((1,), stream, dtype=torch.int64, device=x.device)
        with torch.inference_mode(), contextlib.ExitStack() as modes:
            for branch in self.branches:
                modes.enter_context(eval_mode(branch))
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
                        # A model that takes σ (a denoiser in front) is told its branch's σ.
                        sigma = self.sigmas[p] if branch.takes_sigma else None
                        logits = self.model_call(branch, views[p, :take], sigma)
                        self._check_logits(logits, take, p)
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

    # -- helpers -------------------------------------------------------------------------------

    def _check_logits(self, logits: object, views: int, branch: int) -> None:
        """One row of num_classes logits per view: extra rows would be counted as votes."""
        expected = (views, self.num_classes)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"the base classifier of branch {branch} returned logits of shape {got} for "
                f"{views} views; expected {expected} (one row per view, num_classes = "
                f"{self.num_classes} columns)"
            )

    def _check_call(self, x: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
        for name, value, upper in (("seed", seed, 2**63), ("stream", stream, 2**32)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not 0 <= value < upper:
                raise ValueError(f"{name} must be in [0, {upper}), got {value}")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be one image of shape (C, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(
                f"x must be a floating-point image (float32; float64 is converted), got {x.dtype}"
            )
        # Rounding to float32 moves x by at most half a float32 ulp; the noise is float32 anyway.
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite, found NaN or Inf in the input image (in float32)")
        return x

    def _top_two_test(self, counts: np.ndarray, alpha: float) -> int:
        """Cohen et al.'s PREDICT on i.i.d. votes of the smoothed classifier: the top class if
        the one-sided binomial test of its votes against the runner-up's rejects at level alpha
        (valid for the data-selected top two: Hung & Fithian 2019), else abstain."""
        order = np.argsort(-counts, kind="stable")
        n_a = int(counts[order[0]])
        n_b = int(counts[order[1]]) if counts.size > 1 else 0
        if n_a + n_b == 0 or binom_test_p_value(n_a, n_a + n_b, 0.5) > alpha:
            return self.ABSTAIN
        return int(order[0])
