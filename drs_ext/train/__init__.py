"""Training base classifiers for RS and DRS: the noisy-input wrapper (noise.py), one module per
loss recipe (recipes/) and the trainer (trainer.py); the σ-selector's training
(sigma_selector.py)."""

from .noise import NoisyBranch, training_seed
from .recipes import (
    RECIPES,
    Consistency,
    Gaussian,
    Macer,
    Recipe,
    SmoothAdv,
    UniversalSigma,
    make_recipe,
)
from .sigma_selector import (
    SelectorObjective,
    SelectorTrainer,
    load_selector,
    save_selector,
    selector_loss,
)
from .trainer import LOG_FIELDS, TrainConfig, Trainer, finetune_branches

__all__ = [
    "LOG_FIELDS",
    "RECIPES",
    "Consistency",
    "Gaussian",
    "Macer",
    "NoisyBranch",
    "Recipe",
    "SelectorObjective",
    "SelectorTrainer",
    "SmoothAdv",
    "TrainConfig",
    "Trainer",
    "UniversalSigma",
    "finetune_branches",
    "load_selector",
    "make_recipe",
    "save_selector",
    "selector_loss",
    "training_seed",
]
