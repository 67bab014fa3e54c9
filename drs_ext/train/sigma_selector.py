"""Training the σ-selector (Hase et al., "Variational Randomized Smoothing for Sample-Wise
Adversarial Robustness", arXiv 2407.11844; docs/methods.md §2).

Two steps, both resumable with progress bars:

1. The base classifier f, trained on Gaussian noise at a σ drawn per image uniformly over a
   range ("universal σ_a", so one model serves every level the selector may pick): the
   `UniversalSigma` recipe (drs_ext/train/recipes/universal.py) with the ordinary `Trainer`.
2. The selector h(x, λ) with f frozen (`SelectorTrainer`): λ ~ U(0, 1) ("universal λ", fed
   to h so the trade-off is picked at test time), drawn per group of images, and the loss
   `selector_loss`,

       mean_i [ CE(f(x_i + σ_i ε_i), y_i) + λ_g(i) k_i ],   σ_i = h(x_i, λ_g(i)),
       k_i = (σ_i − μ_t)² / (2 s_t²) + log s_t − ½ log v_g(i) − ½,

   with ε fixed noise (the gradient reaches h through σ_i), v_g the variance of the σ of group
   g and N(μ_t, s_t²) the target. The mean of k_i over a group is exactly KL(N(m_g, v_g) ‖
   N(μ_t, s_t²)), the KL of the group's Gaussian fit to the target, so each group contributes
   its share of λ_g·KL. The paper confirms a KL term toward a Gaussian target weighted by λ and
   λ ~ U(0, 1); how the distribution of σ is formed is not published. A KL is a property of a
   distribution, so this package fits it over a group of images that share one λ: with a
   different λ per image and one fit for the batch, the selector can lower the KL by spreading
   σ over λ instead of over images (the −log v term rewards any spread), which makes σ grow as
   λ falls. Groups are consecutive slices of the (shuffled) batch, `lambda_groups` per batch.

Training noise (ε, and the uniforms behind λ) comes from drs_ext.noisy_views under a key hashed
from the user's seed (`training_seed`), never a certification seed; its sample offset is saved
with the checkpoint, so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..models import build_selector
from ..ops import noisy_views
from .noise import training_seed
from .recipes.universal import UniversalSigma
from .trainer import TrainConfig

__all__ = [
    "SELECTOR_FORMAT",
    "SELECTOR_LOG_FIELDS",
    "SelectorObjective",
    "SelectorTrainer",
    "UniversalSigma",
    "gaussian_kl",
    "lambda_group_index",
    "load_selector",
    "save_selector",
    "selector_loss",
]

SELECTOR_FORMAT = "drs_ext.sigma_selector"
SELECTOR_FORMAT_VERSION = 1
SELECTOR_LOG_FIELDS = ("epoch", "loss", "ce", "kl", "noisy_acc", "sigma_mean", "sigma_std", "lr")
# Keeps log v finite when every σ of a batch is equal (a saturated selector).
_VAR_FLOOR = 1e-6


@dataclass
class SelectorObjective:
    """The target N(target_mean, target_std²) of the KL term, num_noise noisy views per image
    in the cross-entropy (all through the same σ_i), and lambda_groups groups per batch, each
    with its own λ and its own Gaussian fit (fewer when a batch has under 2 images a group).

    The selector reads clean images. Feeding it the noisy inputs of median smoothing instead
    lowers the share of certifiable levels: the KL's −log v term rewards any spread of σ, and
    on noisy inputs the selector can spread σ by reacting to the noise."""

    target_mean: float = 0.5
    target_std: float = 0.15
    num_noise: int = 1
    lambda_groups: int = 4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_mean) and self.target_mean > 0):
            raise ValueError(f"target_mean must be finite and > 0, got {self.target_mean!r}")
        if not (math.isfinite(self.target_std) and self.target_std > 0):
            raise ValueError(f"target_std must be finite and > 0, got {self.target_std!r}")
        for name in ("num_noise", "lambda_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def gaussian_kl(mean: torch.Tensor, var: torch.Tensor, target_mean: float, target_std: float):
    """KL(N(mean, var) ‖ N(target_mean, target_std²)), closed form."""
    return (
        math.log(target_std)
        - 0.5 * torch.log(var)
        + (var + (mean - target_mean) ** 2) / (2 * target_std**2)
        - 0.5
    )


def lambda_group_index(images: int, groups: int) -> torch.Tensor:
    """(B,) group of each image: `groups` consecutive slices of nearly equal size, at least two
    images each (so every group has a variance), or one group for a batch of under 4."""
    groups = max(1, min(groups, images // 2))
    return torch.arange(images) * groups // images


def selector_loss(
    selector: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor,
    noise: torch.Tensor,
    objective: SelectorObjective,
) -> tuple[torch.Tensor, dict]:
    """The selector's loss (module docstring) for images x (B, C, H, W), labels y (B,), one λ
    per group lam (G,) (the groups of `lambda_group_index(B, G)`) and fixed standard normal noise
    (B, m, C, H, W). Returns (loss, parts): parts holds the mean cross-entropy, the mean over
    groups of their KL, the σ (B,) and the logits (B, m, K)."""
    b, m = x.shape[0], noise.shape[1]
    group = lambda_group_index(b, lam.numel()).to(x.device)
    count = torch.bincount(group).to(x.dtype)
    lam_i = lam[group]
    sigma = selector(x, lam_i)
    if sigma.shape != (b,):
        raise ValueError(f"the selector must return one σ per image, got {tuple(sigma.shape)}")
    views = x[:, None] + sigma.view(-1, 1, 1, 1, 1) * noise
    logits = classifier(views.flatten(0, 1)).unflatten(0, views.shape[:2])
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(m), reduction="none")
    ce = ce.view(b, m).mean(dim=1)
    mu, tau = objective.target_mean, objective.target_std
    mean = torch.zeros_like(count).index_add(0, group, sigma) / count
    var = torch.zeros_like(count).index_add(0, group, (sigma - mean[group]) ** 2) / count
    var = var + _VAR_FLOOR
    # k_i: image i's share of its group's KL; the mean of k over group g is
    # gaussian_kl(mean[g], var[g], μ_t, s_t).
    k = (sigma - mu) ** 2 / (2 * tau**2) + math.log(tau) - 0.5 * torch.log(var[group]) - 0.5
    loss = (ce + lam_i * k).mean()
    kl = (torch.zeros_like(count).index_add(0, group, k) / count).mean()
    return loss, {"ce": ce.mean(), "kl": kl, "sigma": sigma, "logits": logits}


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the base classifier; restored afterwards."""
    modes = [(mod, mod.training) for mod in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for mod, training in modes:
            mod.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


def save_selector(path: str | os.PathLike, selector: nn.Module, info: dict, **extra) -> None:
    """Write a selector checkpoint: format keys, `info` (arch, arch_kwargs, input_shape,
    objective, classifier), the weights and `extra` (e.g. train_state); atomic."""
    path = Path(path)
    payload = {"format": SELECTOR_FORMAT, "format_version": SELECTOR_FORMAT_VERSION, **info}
    payload["state_dict"] = selector.state_dict()
    payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_selector(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """(selector in eval mode, the checkpoint dict) from a file written by save_selector."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"selector checkpoint not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != SELECTOR_FORMAT:
        raise ValueError(f"{path}: not a σ-selector checkpoint (no format={SELECTOR_FORMAT!r})")
    if payload.get("format_version", 0) > SELECTOR_FORMAT_VERSION:
        raise ValueError(f"{path}: selector format_version is newer than this drs_ext reads")
    selector = build_selector(payload["arch"], **payload["arch_kwargs"])
    selector.load_state_dict(payload["state_dict"])
    return selector.to(map_location).eval(), payload


class SelectorTrainer:
    """Trains a selector h(x, λ) against a frozen base classifier; checkpoints every epoch to
    ``checkpoint_path`` (save_selector format plus a ``train_state``) and resumes from it.

    ``arch`` / ``arch_kwargs`` name the selector in drs_ext.models.SELECTOR_ARCHS (stored so
    load_selector can rebuild it); ``classifier_info`` (e.g. the base checkpoint's path and σ
    range) is stored alongside, for the certifier to check against.
    """

    def __init__(
        self,
        selector: nn.Module,
        classifier: nn.Module,
        data: Dataset,
        config: TrainConfig,
        checkpoint_path: str | os.PathLike,
        *,
        arch: str = "sigma_selector_cnn",
        arch_kwargs: dict | None = None,
        objective: SelectorObjective | None = None,
        classifier_info: dict | None = None,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.device = torch.device(config.device)
        self.selector = selector.to(self.device)
        self.classifier = classifier.to(self.device)
        self.data = data
        self.config = config
        self.objective = objective or SelectorObjective()
        self.checkpoint_path = Path(checkpoint_path)
        self.log_path = Path(log_path) if log_path else self.checkpoint_path.with_suffix(".log.csv")
        self.info = {
            "arch": arch,
            "arch_kwargs": dict(arch_kwargs or {}),
            "input_shape": list(getattr(data, "input_shape", [])),
            "objective": asdict(self.objective),
            "classifier": classifier_info,
            # A resumed run must continue with the optimizer whose state the file holds.
            "optimizer": config.optimizer,
        }
        self.optimizer = config.make_optimizer(self.selector.parameters())
        self.scheduler = config.make_scheduler(self.optimizer)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.noise_seed = training_seed(config.seed, "sigma-selector")
        self.noise_offset = 0
        self.epoch = 0
        self.log: list[dict] = []

    def _normals(self, shape: tuple[int, ...], num: int) -> torch.Tensor:
        """(B, num, *shape[1:]) standard normals at fresh sample indices of the training key."""
        out = noisy_views(
            torch.zeros(shape, device=self.device),
            1.0,
            num=num,
            seed=self.noise_seed,
            offset=self.noise_offset,
            stream=torch.arange(shape[0], device=self.device),
            partition="none",
        )[:, 0]
        self.noise_offset += num
        return out

    def train_epoch(self) -> dict:
        self.selector.train()
        m = self.objective.num_noise
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "sigma": 0.0, "sigma2": 0.0}
        seen, correct = 0, 0
        loader = DataLoader(
            self.data,
            batch_size=self.config.batch_size,
            shuffle=True,
            generator=self.shuffle,
            num_workers=self.config.num_workers,
        )
        bar = tqdm(
            loader,
            desc=f"{self.checkpoint_path.stem} epoch {self.epoch + 1}/{self.config.epochs}",
            disable=not self.config.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            groups = max(1, min(self.objective.lambda_groups, x.shape[0] // 2))
            lam = torch.special.ndtr(self._normals((groups, 1, 1, 1), 1).flatten())
            noise = self._normals(tuple(x.shape), m)
            loss, parts = selector_loss(
                self.selector, self.classifier, x, y, lam, noise, self.objective
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite selector loss at epoch {self.epoch + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            b = x.shape[0]
            sigma = parts["sigma"].detach()
            sums["loss"] += loss.item() * b
            sums["ce"] += parts["ce"].item() * b
            sums["kl"] += parts["kl"].item() * b
            sums["sigma"] += float(sigma.sum())
            sums["sigma2"] += float((sigma**2).sum())
            correct += int((parts["logits"].detach().argmax(-1) == y[:, None]).sum())
            seen += b
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", sigma=f"{sums['sigma'] / seen:.3f}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        seen = max(seen, 1)
        mean = sums["sigma"] / seen
        return {
            "epoch": self.epoch + 1,
            "loss": sums["loss"] / seen,
            "ce": sums["ce"] / seen,
            "kl": sums["kl"] / seen,
            "noisy_acc": correct / (seen * m),
            "sigma_mean": mean,
            "sigma_std": math.sqrt(max(sums["sigma2"] / seen - mean**2, 0.0)),
            "lr": lr,
        }

    def _train_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "noise_offset": self.noise_offset,
            "shuffle": self.shuffle.get_state(),
            "log": self.log,
        }

    def save(self) -> None:
        save_selector(
            self.checkpoint_path, self.selector, self.info, train_state=self._train_state()
        )

    def restore(self) -> bool:
        """Load ``checkpoint_path`` if it exists; returns whether training state was restored."""
        if not self.checkpoint_path.exists():
            return False
        _, payload = load_selector(self.checkpoint_path, self.device)
        saved = {k: payload.get(k) for k in self.info}
        if saved != self.info:
            raise ValueError(
                f"cannot resume {self.checkpoint_path}: it was trained with {saved}, this run "
                f"is {self.info}; use another output path or start over"
            )
        state = payload.get("train_state")
        if state is None:
            raise ValueError(f"{self.checkpoint_path} holds no training state to resume from")
        self.selector.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.noise_offset = int(state["noise_offset"])
        self.shuffle.set_state(state["shuffle"].cpu())
        self.epoch = int(state["epoch"])
        self.log = list(state["log"])
        return True

    def _write_log(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SELECTOR_LOG_FIELDS + ("seconds",))
            writer.writeheader()
            writer.writerows(self.log)

    def fit(self, resume: bool = False) -> list[dict]:
        """Train up to ``config.epochs`` epochs, continuing the checkpoint when ``resume``."""
        if resume:
            self.restore()
        elif self.checkpoint_path.exists():
            raise FileExistsError(
                f"{self.checkpoint_path} exists; pass resume=True (--resume) to continue it or "
                "choose another output"
            )
        with frozen(self.classifier):
            while self.epoch < self.config.epochs:
                start = time.perf_counter()
                row = self.train_epoch()
                row["seconds"] = round(time.perf_counter() - start, 2)
                self.epoch += 1
                self.log.append(row)
                self.save()
                self._write_log()
                if self.config.progress:
                    tqdm.write(
                        f"{self.checkpoint_path.stem} epoch {row['epoch']}: loss "
                        f"{row['loss']:.4f} ce {row['ce']:.4f} kl {row['kl']:.3f} σ "
                        f"{row['sigma_mean']:.3f}±{row['sigma_std']:.3f} ({row['seconds']} s)"
                    )
        self.selector.eval()
        return self.log
