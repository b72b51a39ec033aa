"""Heads: classifiers that sit on embeddings, aware of the category tree."""

from .hierarchical import HierarchicalClassifier
from .linear import TorchLinearClassifier
from .tree import TreeHeadClassifier

__all__ = ["HierarchicalClassifier", "TorchLinearClassifier", "TreeHeadClassifier"]
