"""Attack evaluation of every smoothed model: ℓ2 PGD on the smoothed soft classifier, judged by
the smoothed classifier's PREDICT (pgd.py), for RS, DRS, σ-routing and the σ-selector
(targets.py, with two threat models for the input-dependent ones); result files, accuracy
tables and the plot (results.py)."""

from .pgd import (
    ATTACK_FIELDS,
    AttackRow,
    Target,
    accuracy_by_epsilon,
    attack_contradictions,
    check_epsilon,
    check_steps,
    evaluate_attack,
    pgd_attack,
)
from .targets import THREATS, RoutedTarget, SelectorTarget, SmoothedTarget, soft_probabilities

__all__ = [
    "ATTACK_FIELDS",
    "THREATS",
    "AttackRow",
    "RoutedTarget",
    "SelectorTarget",
    "SmoothedTarget",
    "Target",
    "accuracy_by_epsilon",
    "attack_contradictions",
    "check_epsilon",
    "check_steps",
    "evaluate_attack",
    "pgd_attack",
    "soft_probabilities",
]
