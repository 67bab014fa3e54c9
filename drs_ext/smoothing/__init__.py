"""Smoothed classifiers: the shared sampling loop (sampling.py) and one module per method."""

from .drs import DualSmoothedClassifier
from .rs import SmoothedClassifier
from .sampling import BranchSmoothing

__all__ = ["BranchSmoothing", "DualSmoothedClassifier", "SmoothedClassifier"]
