"""Training loss recipes, one module each, registered by name in `RECIPES`: each is a callable
``recipe(branch, x, y) -> (loss, logits (B, m, K))`` over a `NoisyBranch` (base.py)."""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, fields

from .base import Recipe, mean_softmax
from .consistency import Consistency
from .gaussian import Gaussian
from .macer import Macer
from .smoothadv import SmoothAdv
from .universal import UniversalSigma

RECIPES: dict[str, type[Recipe]] = {
    r.name: r for r in (Gaussian, Consistency, SmoothAdv, Macer, UniversalSigma)
}


def make_recipe(name: str, **params) -> Recipe:
    """Recipe by name; ``params`` override its hyper-parameters, each checked against the type
    of its default (an int is accepted for a float parameter) before any training starts."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    defaults = {f.name: f.default for f in fields(RECIPES[name])}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"recipe {name!r} has no parameter {unknown}; it takes {sorted(defaults)}")
    checked = {key: _check_param(name, key, value, defaults[key]) for key, value in params.items()}
    return RECIPES[name](**checked)


def _check_param(recipe: str, key: str, value: object, default: object) -> object:
    if default is MISSING or default is None:  # no default type to check against
        return value
    kind = type(default)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    elif kind not in (float, int) and isinstance(value, kind):
        return value
    expected = {float: "a finite number", int: "an integer"}.get(kind, kind.__name__)
    raise ValueError(
        f"recipe {recipe!r} parameter {key} must be {expected} (default {default!r}), got {value!r}"
    )


__all__ = [
    "RECIPES",
    "Consistency",
    "Gaussian",
    "Macer",
    "Recipe",
    "SmoothAdv",
    "UniversalSigma",
    "make_recipe",
    "mean_softmax",
]
