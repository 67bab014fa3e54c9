"""Training base classifiers for RS and DRS: the noisy-input wrapper (noise.py), one module per
loss recipe (recipes/) and the trainer (trainer.py)."""

from .noise import NoisyBranch, training_seed
from .recipes import RECIPES, Consistency, Gaussian, Macer, Recipe, SmoothAdv, make_recipe
from .trainer import LOG_FIELDS, TrainConfig, Trainer, finetune_branches

__all__ = [
    "LOG_FIELDS",
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
