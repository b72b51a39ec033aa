"""Product matching: which listings show the same product, and which pictures a catalogue already holds.

:class:`ProductMatcher` matches products by the cosine similarity of their
vectors (after :class:`~skproduct.ImageEmbedder` in a ``Pipeline``), with a
threshold tuned on labelled groups for Kaggle's matching F1
(:func:`skproduct.metrics.matching_f1_score`). :func:`find_duplicates` finds
the exact duplicates (same picture content: the embedding cache's keys) and
near duplicates (similar vectors) of one set of products in another, and
:func:`duplicate_labels` turns each duplicate into a prediction: the label of
the catalogue product it duplicates.
"""

from ._duplicates import content_keys, duplicate_labels, find_duplicates
from ._matcher import ProductMatcher
from ._rules import connected_groups
from ._search import l2_normalize, nearest_neighbors

__all__ = [
    "ProductMatcher",
    "connected_groups",
    "content_keys",
    "duplicate_labels",
    "find_duplicates",
    "l2_normalize",
    "nearest_neighbors",
]
