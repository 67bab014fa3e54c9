"""The trainer: optimisation settings, the epoch loop with resumable checkpoints and a CSV log,
and the DRS recipe of fine-tuning one pre-trained model into both branch classifiers."""

from __future__ import annotations

import copy
import csv
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..io.checkpoint import BranchSpec, load_checkpoint, save_checkpoint, spec_from_checkpoint
from ..models import unwrap_normalize
from .noise import NoisyBranch
from .recipes import Recipe

__all__ = ["LOG_FIELDS", "TrainConfig", "Trainer", "finetune_branches"]


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow Cohen et al. (SGD, momentum 0.9, lr 0.1, weight
    decay 1e-4, ×0.1 steps); Xia et al. fine-tune with Adam at 1e-3, decayed at 62.5% and 87.5%
    of the epochs."""

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: Sequence[int] | None = None  # epochs where lr *= lr_decay; None: 50% and 75%
    lr_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        # Zero epochs would train nothing and write no checkpoint, yet look like a finished run.
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        milestones = self.milestones
        if milestones is None:
            milestones = [math.ceil(0.5 * self.epochs), math.ceil(0.75 * self.epochs)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), self.lr_decay)


LOG_FIELDS = ("epoch", "loss", "noisy_acc", "test_noisy_acc", "lr", "seconds")


class Trainer:
    """Trains one branch classifier with a recipe; checkpoints every epoch and resumes.

    The checkpoint at ``checkpoint_path`` is a regular drs_ext checkpoint (drs_ext/io/checkpoint.py)
    plus a ``train_state`` entry (epoch, optimizer, scheduler, RNG states, noise offset, log), so
    the file of a finished run is the model to certify. The per-epoch log (mean loss, accuracy on
    the noisy training views, optionally on one noisy view of each ``eval_data`` image) is
    rewritten to ``log_path`` (CSV) after every epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: BranchSpec,
        recipe: Recipe,
        data: Dataset,
        config: TrainConfig,
        checkpoint_path: str | Path,
        *,
        eval_data: Dataset | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.spec = replace(spec, recipe=recipe.to_dict())
        self.recipe = recipe
        self.config = config
        self.data = data
        self.eval_data = eval_data
        self.checkpoint_path = Path(checkpoint_path)
        self.log_path = Path(log_path) if log_path else self.checkpoint_path.with_suffix(".log.csv")
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.branch = NoisyBranch(
            self.model,
            spec.sigma,
            partition=spec.partition,
            branch=spec.branch,
            fill=spec.fill,
            seed=config.seed,
        )
        self.optimizer = config.make_optimizer(self.model.parameters())
        self.scheduler = config.make_scheduler(self.optimizer)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.log: list[dict] = []

    # -- checkpoints -------------------------------------------------------------------------

    def _train_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "noise_offset": self.branch.noise_offset,
            "rng": rng,
            "log": self.log,
        }

    def save(self) -> None:
        save_checkpoint(
            self.checkpoint_path, self.model, self.spec, train_state=self._train_state()
        )

    def restore(self) -> bool:
        """Load ``checkpoint_path`` if it exists; returns whether training state was restored."""
        if not self.checkpoint_path.exists():
            return False
        payload = load_checkpoint(self.checkpoint_path, map_location=self.device)
        saved = spec_from_checkpoint(payload, self.checkpoint_path)
        if saved != self.spec:
            raise ValueError(
                f"cannot resume {self.checkpoint_path}: it was trained as {saved}, this run is "
                f"{self.spec}; use another output directory or drop --resume"
            )
        state = payload.get("train_state")
        if state is None:
            raise ValueError(f"{self.checkpoint_path} holds no training state to resume from")
        unwrap_normalize(self.model).load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.branch.noise_offset = int(state["noise_offset"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.shuffle.set_state(state["rng"]["shuffle"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.epoch = int(state["epoch"])
        self.log = list(state["log"])
        return True

    def _write_log(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(self.log)

    # -- training ----------------------------------------------------------------------------

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            generator=self.shuffle if shuffle else None,
            num_workers=self.config.num_workers,
        )

    def train_epoch(self) -> dict:
        self.model.train()
        self.recipe.start_epoch(self.epoch)
        total_loss, correct, seen, views = 0.0, 0, 0, 0
        start = time.perf_counter()
        bar = tqdm(
            self._loader(self.data, shuffle=True),
            desc=f"{self.checkpoint_path.stem} epoch {self.epoch + 1}/{self.config.epochs}",
            disable=not self.config.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            loss, logits = self.recipe(self.branch, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {self.epoch + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.detach().item() * x.shape[0]
            seen += x.shape[0]
            correct += self.recipe.correct(logits.detach(), y)
            views += logits.shape[0] * logits.shape[1]
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / views:.3f}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {
            "epoch": self.epoch + 1,
            "loss": total_loss / max(seen, 1),
            "noisy_acc": correct / max(views, 1),
            "test_noisy_acc": self.evaluate() if self.eval_data is not None else "",
            "lr": lr,
            "seconds": round(time.perf_counter() - start, 2),
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Accuracy on one noisy view per eval image, with the same noise every epoch."""
        self.model.eval()
        probe = NoisyBranch(
            self.model,
            self.spec.sigma,
            partition=self.spec.partition,
            branch=self.spec.branch,
            fill=self.spec.fill,
            seed=self.config.seed,
            purpose="eval",
        )
        correct, total = 0, 0
        for x, y in self._loader(self.eval_data, shuffle=False):
            pred = probe(x.to(self.device)).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += y.numel()
        return correct / max(total, 1)

    def fit(self, resume: bool = False) -> list[dict]:
        """Train up to ``config.epochs`` epochs (continuing a checkpoint when ``resume``).

        A resumed run keeps the saved optimizer and learning-rate schedule (its milestones too),
        so it continues the interrupted run exactly rather than starting a new schedule.
        """
        if resume:
            self.restore()
        elif self.checkpoint_path.exists():
            raise FileExistsError(
                f"{self.checkpoint_path} exists; pass resume=True (--resume) to continue it or "
                "choose another output"
            )
        while self.epoch < self.config.epochs:
            row = self.train_epoch()
            self.epoch += 1
            self.log.append(row)
            self.save()
            self._write_log()
            if self.config.progress:
                acc = row["test_noisy_acc"]
                tqdm.write(
                    f"{self.checkpoint_path.stem} epoch {row['epoch']}: loss {row['loss']:.4f} "
                    f"noisy acc {row['noisy_acc']:.3f}"
                    + (f" test noisy acc {acc:.3f}" if acc != "" else "")
                    + f" ({row['seconds']} s)"
                )
        self.model.eval()
        return self.log


def finetune_branches(
    pretrained: nn.Module,
    base_spec: BranchSpec,
    recipe: Recipe,
    data: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    sigma: float,
    fill: str = "neighbors",
    resume: bool = False,
    eval_data: Dataset | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Paper 002's recipe: copy one pre-trained model into fˡ and fʳ, fine-tune each on its branch.

    ``base_spec`` describes ``pretrained`` (architecture, classes, input shape, normalisation).
    Each copy is trained with ``recipe`` and ``config`` on noisy views of branch 0 / 1 of the
    "diag" partition at ``sigma``; checkpoints go to ``out_dir/branch0.pt`` and ``branch1.pt``.
    Returns (fˡ, fʳ) in eval mode.
    """
    out_dir = Path(out_dir)
    models = []
    for branch in range(2):
        spec = replace(base_spec, sigma=sigma, partition="diag", branch=branch, fill=fill)
        # Each branch gets its own recipe copy: SmoothAdv keeps per-epoch state.
        trainer = Trainer(
            copy.deepcopy(pretrained),
            spec,
            copy.deepcopy(recipe),
            data,
            config,
            out_dir / f"branch{branch}.pt",
            eval_data=eval_data,
        )
        trainer.fit(resume=resume)
        models.append(trainer.model)
    return models[0], models[1]
