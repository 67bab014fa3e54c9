"""Smoothed classifiers: the shared sampling loop (sampling.py) and one module per method."""

from .drs import DualSmoothedClassifier
from .rs import SmoothedClassifier
from .sampling import BranchSmoothing, Certificate
from .sigma_selector import SigmaSelectorClassifier

__all__ = [
    "BranchSmoothing",
    "Certificate",
    "DualSmoothedClassifier",
    "SigmaSelectorClassifier",
    "SmoothedClassifier",
]
