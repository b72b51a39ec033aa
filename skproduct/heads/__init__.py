"""Heads: classifiers that sit on embeddings, aware of the category tree."""

from .hierarchical import HierarchicalClassifier

__all__ = ["HierarchicalClassifier"]
