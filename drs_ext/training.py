"""Training base classifiers for RS and DRS: noisy branch wrapper, loss recipes, trainer.

A branch classifier of DRS sees its noisy sub-image brought back to full resolution by a fill
(DESIGN.md §2.3); :class:`NoisyBranch` draws exactly those views with ``drs_ext.noisy_views``,
so a model is trained on the inputs it is certified on. Partition "none" gives plain RS
training (the whole image plus N(0, σ² I) noise).

Recipes (each a callable ``recipe(branch, x, y) -> (loss, logits (B, m, K))``):

- :class:`Gaussian`: Cohen et al. (2019), cross-entropy on one noisy view.
- :class:`Consistency`: Jeong & Shin (2020), m noisy views, cross-entropy averaged over them
  + λ · mean KL(mean softmax ∥ softmax of each view) + η · entropy of the mean softmax.
- :class:`SmoothAdv`: Salman et al. (2019), ℓ2 PGD on the soft smoothed classifier estimated
  with m noise draws (gradients through noisy_views), then cross-entropy on the m noisy
  adversarial views with the same noise.
- :class:`Macer`: Zhai et al. (2020), soft smoothed cross-entropy + λ · σ/2 · hinge on the
  Φ⁻¹ margin of the β-tempered soft smoothed classifier.

Paper 002 fine-tunes one pre-trained full-resolution model into fˡ and fʳ with one recipe:
:func:`finetune_branches`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import BranchSpec, load_checkpoint, save_checkpoint, spec_from_checkpoint
from .models import unwrap_normalize
from .ops import noisy_views, num_branches

__all__ = [
    "RECIPES",
    "Consistency",
    "Gaussian",
    "Macer",
    "NoisyBranch",
    "Recipe",
    "SmoothAdv",
    "TrainConfig",
    "Trainer",
    "finetune_branches",
    "make_recipe",
    "training_seed",
]


def training_seed(seed: int, purpose: str = "train") -> int:
    """A 63-bit Philox key for training noise, derived from a user seed.

    Certification uses small seeds (0, 1, ...). If a model were trained on the very noise
    vectors later used to certify, the certificate's probability statement (over noise drawn
    independently of the model) would no longer hold, so training keys are hashed away from them.
    """
    digest = hashlib.blake2b(f"drs_ext.{purpose}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class NoisyBranch(nn.Module):
    """A model fed noisy views of one branch: model(fill(sub_p(x) + N(0, σ² I))).

    Each call draws fresh noise: the Philox key is fixed and the sample offset advances by the
    number of views drawn (``noise_offset``), so training noise differs every step, is
    reproducible, and resumes exactly when ``noise_offset`` is restored.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float,
        *,
        partition: str = "none",
        branch: int = 0,
        fill: str = "neighbors",
        seed: int = 0,
        purpose: str = "train",
    ) -> None:
        super().__init__()
        if branch not in range(num_branches(partition)):
            raise ValueError(f"branch {branch} does not exist for partition {partition!r}")
        self.model = model
        self.sigma = float(sigma)
        self.partition = partition
        self.branch = branch
        self.fill = fill
        self.seed = training_seed(seed, purpose)
        self.noise_offset = 0

    def reserve(self, num: int) -> int:
        """Reserve ``num`` fresh sample indices; returns the first (for reusing one noise draw)."""
        offset = self.noise_offset
        self.noise_offset += num
        return offset

    def views(self, x: torch.Tensor, num: int = 1, offset: int | None = None) -> torch.Tensor:
        """(B, num, C, H, W) noisy views of this branch; fresh noise unless ``offset`` is given."""
        if offset is None:
            offset = self.reserve(num)
        # The kernel draws every branch of the partition; the other one is dropped (cheap next
        # to the model), and its noise never meets this branch's counters.
        sigmas = [self.sigma] * num_branches(self.partition)
        stream = torch.arange(x.shape[0], device=x.device)
        out = noisy_views(
            x,
            sigmas,
            num=num,
            seed=self.seed,
            offset=offset,
            stream=stream,
            partition=self.partition,
            fill=self.fill,
        )
        return out[:, self.branch]

    def logits(self, x: torch.Tensor, num: int = 1, offset: int | None = None) -> torch.Tensor:
        """(B, num, K) logits of ``num`` noisy views of every image."""
        views = self.views(x, num, offset)
        return self.model(views.flatten(0, 1)).unflatten(0, views.shape[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of one fresh noisy view of every image."""
        return self.logits(x, 1)[:, 0]


@dataclass
class Recipe:
    """Base of the loss recipes: ``recipe(branch, x, y) -> (loss, logits (B, m, K))``."""

    name = "recipe"

    def __call__(
        self, branch: NoisyBranch, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Hook for schedules that depend on the (0-based) epoch; most recipes have none."""

    def to_dict(self) -> dict:
        """Name and hyper-parameters, as stored in checkpoints."""
        return {"name": self.name, **asdict(self)}


@dataclass
class Gaussian(Recipe):
    """Gaussian data augmentation (Cohen et al. 2019)."""

    name = "gaussian"

    def __call__(self, branch, x, y):
        logits = branch.logits(x, 1)
        return F.cross_entropy(logits[:, 0], y), logits


def _mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=-1).mean(dim=1)


@dataclass
class Consistency(Recipe):
    """Consistency regularisation (Jeong & Shin 2020), their defaults m = 2, η = 0.5.

    λ = 10 is paper 002's setting for both RS and DRS.
    """

    m: int = 2
    lam: float = 10.0
    eta: float = 0.5
    name = "consistency"

    def __call__(self, branch, x, y):
        logits = branch.logits(x, self.m)
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(self.m))
        mean_prob = _mean_softmax(logits)
        log_probs = F.log_softmax(logits, dim=-1)
        # F.kl_div(log q, p) = KL(p ∥ q): the mean prediction is the target of every view.
        kl = F.kl_div(log_probs, mean_prob[:, None].expand_as(log_probs), reduction="none")
        kl = kl.sum(dim=-1).mean()
        entropy = -(mean_prob * mean_prob.clamp_min(1e-20).log()).sum(dim=-1).mean()
        return ce + self.lam * kl + self.eta * entropy, logits


@dataclass
class SmoothAdv(Recipe):
    """SmoothAdv (Salman et al. 2019): ℓ2 PGD against the soft smoothed classifier.

    As in their code: one perturbation per image shared by its m noise draws, step size
    2ε/steps with normalised gradients, projection onto the ε-ball and [0, 1], the attack run
    in eval mode, ε ramped linearly over the first ``warmup`` epochs, and the training loss the
    cross-entropy of the m noisy adversarial views with the attack's own noise.
    """

    m: int = 2
    epsilon: float = 0.5
    steps: int = 2
    warmup: int = 10
    name = "smoothadv"

    def __post_init__(self) -> None:
        self.current_epsilon = self.epsilon  # not a field: schedule state, not a setting

    def start_epoch(self, epoch: int) -> None:
        self.current_epsilon = min(self.epsilon, (epoch + 1) * self.epsilon / max(self.warmup, 1))

    def attack(
        self, branch: NoisyBranch, x: torch.Tensor, y: torch.Tensor, offset: int, epsilon: float
    ) -> torch.Tensor:
        """x + δ, ‖δ‖₂ ≤ ε, maximising -log mean_i softmax(f(view_i(x + δ)))_y."""
        delta = torch.zeros_like(x, requires_grad=True)
        step = 2.0 * epsilon / self.steps
        for _ in range(self.steps):
            prob = _mean_softmax(branch.logits(x + delta, self.m, offset))
            loss = F.nll_loss(prob.clamp_min(1e-20).log(), y)
            (grad,) = torch.autograd.grad(loss, [delta])
            norms = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            # A zero gradient (saturated softmax) gets a random direction, as in Salman et al.
            grad = torch.where(norms > 0, grad / norms.clamp_min(1e-12), torch.randn_like(grad))
            with torch.no_grad():
                delta.add_(step * grad)
                delta.copy_((x + delta).clamp_(0.0, 1.0) - x)
                delta.copy_(delta.renorm(p=2, dim=0, maxnorm=epsilon))
        return (x + delta).detach()

    def __call__(self, branch, x, y):
        offset = branch.reserve(self.m)
        was_training = branch.training
        branch.eval()
        try:
            x_adv = self.attack(branch, x, y, offset, self.current_epsilon)
        finally:
            branch.train(was_training)
        logits = branch.logits(x_adv, self.m, offset)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(self.m)), logits


@dataclass
class Macer(Recipe):
    """MACER (Zhai et al. 2020) with their CIFAR-10 defaults m = 16, β = 16, γ = 8, λ = 12.

    loss = [NLL of the soft smoothed classifier + λ·σ/2·Σ max(γ - (Φ⁻¹(p̂_y) - Φ⁻¹(p̂_2)), 0)]
    / B, the hinge over images whose β-tempered soft smoothed top class is y. Per DRS branch it
    enlarges that branch's Φ⁻¹ margin, one of the two terms of the DRS radius.
    """

    m: int = 16
    beta: float = 16.0
    gamma: float = 8.0
    lam: float = 12.0
    name = "macer"

    def __call__(self, branch, x, y):
        logits = branch.logits(x, self.m)
        nll = F.nll_loss((_mean_softmax(logits) + 1e-10).log(), y, reduction="sum")
        top2, top2_idx = _mean_softmax(self.beta * logits).topk(2, dim=1)
        first, second = top2[top2_idx[:, 0] == y].unbind(dim=1)
        with torch.no_grad():
            margin = torch.special.ndtri(first) - torch.special.ndtri(second)
            active = torch.isfinite(margin) & (margin <= self.gamma)
        # Select before the differentiable Φ⁻¹: its infinite slope at 0 and 1 would turn the
        # masked-out entries' zero gradients into NaN.
        margin = torch.special.ndtri(first[active]) - torch.special.ndtri(second[active])
        hinge = (self.gamma - margin).sum() * branch.sigma / 2
        return (nll + self.lam * hinge) / x.shape[0], logits


RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (Gaussian, Consistency, SmoothAdv, Macer)}


def make_recipe(name: str, **params) -> Recipe:
    """Recipe by name; ``params`` override its hyper-parameters."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    known = {f.name for f in fields(RECIPES[name])}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"recipe {name!r} has no parameter {unknown}; it takes {sorted(known)}")
    return RECIPES[name](**params)


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow Cohen et al. (SGD, momentum 0.9, lr 0.1, weight
    decay 1e-4, ×0.1 steps); paper 002 fine-tunes with Adam at 1e-3, decayed at 62.5% and 87.5%
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

    The checkpoint at ``checkpoint_path`` is a regular drs_ext checkpoint (drs_ext/checkpoint.py)
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
            correct += int((logits.detach().argmax(-1) == y[:, None]).sum())
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
