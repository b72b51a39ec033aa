"""Hierarchical metrics over a :class:`~skproduct.CategoryTree`, and scorers for model selection.

Every function takes leaf labels (or, for top-k accuracy, scores over leaf
labels) and maps them onto the tree with :meth:`CategoryTree.encode`, so all of
them are vectorised: no Python loop runs per row.

The hierarchical precision, recall and F1 are those of Kiritchenko et al.
(2005), as computed by ``hiclass.metrics``: each row contributes the set of
nodes on the path of its true leaf and of its predicted leaf (the root left
out). Because the node codes of :meth:`CategoryTree.encode` identify *paths*, two
rows share the node at a level exactly when their codes at that level are
equal, so the size of the intersection is the number of levels where the codes
agree.

Note that when a :class:`~skproduct.CategoryTree` keeps all its leaves at the
same depth, each path set has ``tree.depth`` nodes: hierarchical precision,
recall and F1 are then equal to one another, and micro and macro averages
coincide too (both are the mean fraction of levels predicted right). All three
are kept, under hiclass's names and definitions, so that results can be
compared with papers and libraries that report them.
"""

from __future__ import annotations

from .hierarchical import hierarchical_f1_score, hierarchical_precision_score, hierarchical_recall_score
from .levels import level_accuracy_score, majority_level_accuracy
from .matching import groups_to_matches, matching_f1_samples, matching_f1_score
from .scorers import _TopKScorer as _TopKScorer  # kept here so scorers pickled as skproduct.metrics._TopKScorer load
from .scorers import make_hierarchical_scorer, make_hierarchical_scorers
from .severity import MistakeSeverity, hierarchical_distance_at_k, mistake_severity, tree_distance
from .top_k import top_k_accuracy_score

__all__ = [
    "MistakeSeverity",
    "hierarchical_distance_at_k",
    "hierarchical_f1_score",
    "hierarchical_precision_score",
    "hierarchical_recall_score",
    "level_accuracy_score",
    "groups_to_matches",
    "matching_f1_samples",
    "matching_f1_score",
    "majority_level_accuracy",
    "make_hierarchical_scorer",
    "make_hierarchical_scorers",
    "mistake_severity",
    "top_k_accuracy_score",
    "tree_distance",
]
