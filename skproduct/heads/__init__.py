"""Heads: classifiers that sit on embeddings, aware of the category tree."""

from .hierarchical import HierarchicalClassifier
from .linear import TorchLinearClassifier

__all__ = ["HierarchicalClassifier", "TorchLinearClassifier"]
