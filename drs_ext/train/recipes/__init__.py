"""Training loss recipes, one module each, registered by name in `RECIPES`: each is a callable
``recipe(branch, x, y) -> (loss, logits (B, m, K))`` over a `NoisyBranch` (base.py)."""

from __future__ import annotations

from dataclasses import fields

from .base import Recipe, mean_softmax
from .consistency import Consistency
from .gaussian import Gaussian
from .macer import Macer
from .smoothadv import SmoothAdv

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


__all__ = [
    "RECIPES",
    "Consistency",
    "Gaussian",
    "Macer",
    "Recipe",
    "SmoothAdv",
    "make_recipe",
    "mean_softmax",
]
