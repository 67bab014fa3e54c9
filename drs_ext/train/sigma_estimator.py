"""Training for σ-routing (Sun, Mao, Vechev, ICLR 2026): the σ-estimator and the routed experts.

1. Labels (`level_radii`, `soft_labels`): each training image's certified radius of its true
   label at every level σ_i ∈ Σ with the current classifiers, at a small budget (n = 100);
   images whose radius is 0 at every level are dropped; the soft label is softmax_i(R_i / T).
   Cached to disk chunk by chunk, so a crash does not redo the finished images.
2. The estimator (`EstimatorConsistency`, a recipe for drs_ext.train.Trainer): a classifier over
   the levels, trained on noisy views at its own σ_e with the soft cross-entropy plus Jeong &
   Shin's consistency terms (λ·KL(mean softmax ‖ each view) + η·entropy of the mean) over m
   views, each image weighted by 1/q_i, q_i the share of images whose best level is σ_i.
   The paper's extra per-image robustness weight is left out (its formula is not confirmed).
3. The experts (`route`, then drs_ext.train.Trainer per level): with the estimator frozen, each
   training image goes to the level its estimator picks, and each level's expert is fine-tuned
   on the images routed to it, at its own σ: each expert learns the inputs it will certify.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ..io.checkpoint import BranchSpec, save_checkpoint
from ..ops import noisy_views, vote_counts
from ..smoothing.sampling import BranchSmoothing, eval_mode
from ..smoothing.sigma_routing import check_levels
from .noise import NoisyBranch, training_seed
from .recipes.base import Recipe, mean_softmax
from .trainer import TrainConfig, Trainer

__all__ = [
    "EstimatorConsistency",
    "SoftLabelDataset",
    "finetune_experts",
    "level_radii",
    "route",
    "soft_labels",
    "train_estimator",
]


def _images(data: Dataset, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(start, stop)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.inference_mode()
def _label_counts(
    clf: BranchSmoothing, x: torch.Tensor, y: torch.Tensor, first: int, n: int, seed: int
) -> torch.Tensor:
    """(B, P) votes for each image's label y among n noisy views per branch (streams = the
    images' data-set indices first, first+1, ...)."""
    stream = torch.arange(first, first + x.shape[0], device=x.device)
    views = noisy_views(
        x, clf.sigmas, num=n, seed=seed, stream=stream, partition=clf.partition, fill=clf.fill
    )
    votes = []
    for p, branch in enumerate(clf.branches):
        with eval_mode(branch):
            sigma = clf.sigmas[p] if branch.takes_sigma else None
            logits = clf.model_call(branch, views[:, p].flatten(0, 1), sigma)
        counts = vote_counts(logits.reshape(x.shape[0], n, -1))
        votes.append(counts.gather(1, y[:, None].to(counts.device))[:, 0])
    return torch.stack(votes, dim=1).cpu()


def level_radii(
    classifiers: Sequence[BranchSmoothing],
    data: Dataset,
    *,
    n: int = 100,
    alpha: float = 0.001,
    batch_images: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """(len(data), L) certified radius of each image's true label at each level, at budget n
    (0 where the level does not certify it). A training target, not a certificate: the votes
    for the true label stand in for the votes of a selected class."""
    num, levels = len(data), len(classifiers)
    settings = {"n": n, "alpha": alpha, "seed": seed, "images": num, "levels": levels}
    radii = torch.full((num, levels), float("nan"))
    cache = Path(cache) if cache else None
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if json.loads(saved["settings"]) != settings:
            raise ValueError(f"{cache} holds labels of other settings; delete it or move it")
        radii = saved["radii"]
    key = training_seed(seed, "sigma-labels")
    todo = [s for s in range(0, num, batch_images) if torch.isnan(radii[s]).any()]
    for start in tqdm(todo, desc="σ labels", disable=not progress, dynamic_ncols=True):
        stop = min(start + batch_images, num)
        x, y = _images(data, start, stop)
        x = x.to(device)
        for i, clf in enumerate(classifiers):
            counts = _label_counts(clf, x, y, start, n, key).numpy()
            radii[start:stop, i] = torch.tensor(
                [max(clf.radius_from_counts(row, n, alpha), 0.0) for row in counts]
            )
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")
            torch.save({"settings": json.dumps(settings), "radii": radii}, tmp)
            tmp.replace(cache)
    return radii


def soft_labels(
    radii: torch.Tensor, temperature: float = 1.0, balance: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept image indices, soft labels softmax(R / T), class-balance weights) from level_radii.

    An image certified at no level teaches the estimator nothing and is dropped. The weight of an
    image is 1/q_i for its best level i (q_i: the share of kept images whose best level is i),
    scaled to mean 1, so that a rare level is not drowned by a common one (balance=False: all 1).
    """
    if radii.dim() != 2 or not bool(torch.isfinite(radii).all()):
        raise ValueError("radii must be a finished (images, levels) table without NaN")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    kept = torch.nonzero((radii > 0).any(dim=1)).squeeze(1)
    if kept.numel() == 0:
        raise ValueError("no training image is certified at any level: train the classifiers first")
    soft = torch.softmax(radii[kept] / temperature, dim=1)
    best = radii[kept].argmax(dim=1)
    share = torch.bincount(best, minlength=radii.shape[1]).float() / kept.numel()
    weights = 1.0 / share[best] if balance else torch.ones(kept.numel())
    return kept, soft, weights / weights.mean()


class SoftLabelDataset(Dataset):
    """(image, target) with target = [soft label over the L levels..., weight]."""

    def __init__(
        self, data: Dataset, kept: torch.Tensor, soft: torch.Tensor, weights: torch.Tensor
    ) -> None:
        self.data, self.kept = data, kept.tolist()
        self.targets = torch.cat([soft, weights[:, None]], dim=1).float()

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[self.kept[index]][0], self.targets[index]


@dataclass
class EstimatorConsistency(Recipe):
    """Soft cross-entropy over m noisy views + λ·KL(mean softmax ‖ each view) + η·entropy of
    the mean softmax (Jeong & Shin's consistency), weighted per image. The paper's CIFAR-10
    setting is λ = 40, η = 0.5, m = 2 (docs/methods.md §1)."""

    m: int = 2
    lam: float = 40.0
    eta: float = 0.5
    name = "estimator_consistency"

    def __call__(self, branch: NoisyBranch, x: torch.Tensor, y: torch.Tensor):
        soft, weight = y[:, :-1], y[:, -1]
        logits = branch.logits(x, self.m)
        log_probs = F.log_softmax(logits, dim=-1)
        ce = -(soft[:, None] * log_probs).sum(dim=-1).mean(dim=1)
        mean_prob = mean_softmax(logits)
        kl = F.kl_div(log_probs, mean_prob[:, None].expand_as(log_probs), reduction="none")
        kl = kl.sum(dim=-1).mean(dim=1)
        entropy = -(mean_prob * mean_prob.clamp_min(1e-20).log()).sum(dim=-1)
        return (weight * (ce + self.lam * kl + self.eta * entropy)).mean(), logits

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        """Views whose top level is the image's best level."""
        return int((logits.argmax(-1) == y[:, :-1].argmax(-1)[:, None]).sum())


@torch.inference_mode()
def route(
    estimator: torch.nn.Module,
    sigma: float,
    data: Dataset,
    *,
    draws: int = 32,
    batch_images: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(len(data),) level index each image goes to: the top level of the estimator's votes over
    `draws` noisy views at its σ (a cheap stand-in for the smoothed estimator's choice)."""
    key = training_seed(seed, "sigma-route")
    levels = []
    with eval_mode(estimator):
        for start in range(0, len(data), batch_images):
            x, _ = _images(data, start, min(start + batch_images, len(data)))
            stream = torch.arange(start, start + x.shape[0], device=device)
            views = noisy_views(
                x.to(device), [sigma], num=draws, seed=key, stream=stream, partition="none"
            )
            logits = estimator(views[:, 0].flatten(0, 1)).reshape(x.shape[0], draws, -1)
            levels.append(vote_counts(logits).argmax(dim=1).cpu())
    return torch.cat(levels)


def train_estimator(
    classifiers: Sequence[BranchSmoothing],
    levels: Sequence[float],
    data: Dataset,
    spec: BranchSpec,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    recipe: EstimatorConsistency | None = None,
    label_n: int = 100,
    label_alpha: float = 0.001,
    balance: bool = True,
    resume: bool = False,
) -> torch.nn.Module:
    """Steps 1 and 2: radius labels with `classifiers` (one smoothed classifier per level, cached
    in out_dir/labels.pt), then the estimator described by `spec` (its σ is σ_e, its classes
    the levels) trained on them; written to out_dir/estimator.pt. Returns it in eval mode.
    balance: the class-balance weights of `soft_labels` (the paper's recipe; on the bundled
    digits they push the estimator to split images it cannot tell apart, and without them it
    sends every digit to the largest level)."""
    out_dir = Path(out_dir)
    levels = check_levels(levels)
    if spec.num_classes != len(levels) or spec.partition != "none":
        raise ValueError(
            f"the estimator must classify the whole image into the {len(levels)} levels, got "
            f"num_classes {spec.num_classes}, partition {spec.partition!r}"
        )
    radii = level_radii(
        classifiers,
        data,
        n=label_n,
        alpha=label_alpha,
        seed=config.seed,
        device=config.device,
        cache=out_dir / "labels.pt",
        progress=config.progress,
    )
    kept, soft, weights = soft_labels(radii, balance=balance)
    spec = replace(spec, levels=tuple(levels))
    torch.manual_seed(config.seed)
    model = spec.build_model()
    trainer = Trainer(
        model,
        spec,
        recipe or EstimatorConsistency(),
        SoftLabelDataset(data, kept, soft, weights),
        config,
        out_dir / "estimator.pt",
    )
    trainer.fit(resume=resume)
    return trainer.model


def finetune_experts(
    estimator: torch.nn.Module,
    estimator_sigma: float,
    experts: Sequence[Sequence[tuple[torch.nn.Module, BranchSpec]]],
    data: Dataset,
    recipe: Recipe,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
) -> list[torch.Tensor]:
    """Step 3: with the estimator frozen, fine-tune each level's expert (its models: one for RS,
    both branches of a DRS pair) on the training images routed to that level, at its own σ;
    written to out_dir/level<i>.pt (RS) or level<i>_branch<p>.pt (DRS). Returns the indices of
    the images each level got (a level that got none keeps its expert as it was)."""
    out_dir = Path(out_dir)
    levels = route(estimator, estimator_sigma, data, seed=config.seed, device=config.device)
    routed = [torch.nonzero(levels == i).squeeze(1) for i in range(len(experts))]
    for i, (members, indices) in enumerate(zip(experts, routed, strict=True)):
        for model, spec in members:
            name = (
                f"level{i}.pt" if spec.partition == "none" else f"level{i}_branch{spec.branch}.pt"
            )
            if indices.numel() == 0:
                save_checkpoint(out_dir / name, model, spec)
                continue
            subset = Subset(data, indices.tolist())
            Trainer(model, spec, recipe, subset, config, out_dir / name).fit(resume=resume)
    return routed
