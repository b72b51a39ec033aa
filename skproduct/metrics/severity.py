"""How bad the mistakes are: the tree distance between the true and the predicted leaf.

The distance of a prediction is the height of the lowest common ancestor of
the true and the predicted leaf: 0 for the right leaf, 1 for a sibling under
the same parent, up to ``tree.depth`` for a leaf under another top-level node.
It decomposes by level (the number of levels from the top whose nodes differ),
so it is computed from the level codes of :meth:`CategoryTree.encode`, with no
leaves x leaves matrix. In a ragged tree the height is counted from the deeper
of the two leaves: ``max(depth(true), depth(pred)) - depth(common ancestor)``,
so siblings are at distance 1 whatever their depth.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..taxonomy import CategoryTree
from ._checks import _as_labels, _check_length, _check_tree, _check_weights, _encode, _encode_pair, _weighted_mean

__all__ = ["MistakeSeverity", "hierarchical_distance_at_k", "mistake_severity", "tree_distance"]

# cells (rows x k x levels) compared at once in hierarchical_distance_at_k: bounds the temporaries
_CELLS_PER_CHUNK = 1 << 21


class MistakeSeverity(NamedTuple):
    """The mean tree distance over all predictions (``overall``, 0 for a right one) and over the wrong ones only
    (``mistakes``; ``nan`` when there are none)."""

    overall: float
    mistakes: float


def tree_distance(y_true: Any, y_pred: Any, *, tree: CategoryTree) -> np.ndarray:
    """Per row, the height of the lowest common ancestor of the true and the predicted leaf.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> tree = CategoryTree.from_paths([("A", "a", "a1"), ("A", "a", "a2"), ("A", "b", "b1"), ("B", "c", "c1")])
    >>> tree_distance(["a1", "a1", "a1", "a1"], ["a1", "a2", "b1", "c1"], tree=tree).tolist()
    [0, 1, 2, 3]
    """
    _check_tree(tree)
    true_codes, pred_codes = _encode_pair(y_true, y_pred, tree)
    depths = tree.leaf_depths
    return _distance(true_codes, pred_codes, depths[true_codes[:, -1]], depths[pred_codes[:, -1]])


def _distance(true_codes: np.ndarray, pred_codes: np.ndarray, true_depth: np.ndarray, pred_depth: np.ndarray):
    """Tree distance from level codes (any matching leading shape, levels last) and the two leaves' depths."""
    shared = np.cumprod(true_codes == pred_codes, axis=-1).sum(axis=-1)  # levels from the top on the same path
    return np.maximum(np.maximum(true_depth, pred_depth) - shared, 0).astype(np.int64)


def hierarchical_distance_at_k(
    y_true: Any, y_score: Any, *, tree: CategoryTree, k: int = 5, labels: Any = None, sample_weight: Any = None
) -> float:
    """The mean tree distance between the true leaf and each of the ``k`` highest-scored leaves.

    Bertinetto et al. (CVPR 2020, "Making better mistakes") report it to
    compare heads that rank leaves: it falls when the leaves ranked near the top
    sit close to the true one in the tree, whether or not the first is right.
    For ``k=1`` it is :func:`mistake_severity`'s ``overall`` of the top leaf.
    Vectorised over blocks of rows, with no leaves x leaves matrix.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True leaf labels.
    y_score : array-like of shape (n_samples, n_labels)
        Scores or probabilities, one column per label of ``labels``.
    tree : CategoryTree
        The category tree.
    k : int, default=5
        How many of the highest-scored leaves count (at most the number of columns).
    labels : array-like of shape (n_labels,), optional
        The leaf of each column of ``y_score`` (an estimator's ``classes_``); defaults to ``tree.leaves``.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights.

    Returns
    -------
    float
        The weighted mean over rows of the mean distance of their top ``k`` leaves.

    See Also
    --------
    mistake_severity : The distance of the predicted leaf alone.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> scores = [[0.6, 0.3, 0.1],   # true a1: top two a1 (0) and a2 (1)
    ...           [0.1, 0.2, 0.7]]   # true a1: top two b1 (2) and a2 (1)
    >>> hierarchical_distance_at_k(["a1", "a1"], scores, tree=tree, k=2)
    1.0
    """
    _check_tree(tree)
    y_true = _as_labels(y_true, "y_true")
    scores = np.asarray(y_score)
    if scores.ndim != 2:
        raise ValueError(f"y_score must be 2-D (n_samples, n_labels), got shape {scores.shape}")
    _check_length("y_score", len(scores), len(y_true))
    if len(y_true) == 0:
        raise ValueError("y_true is empty; a score needs at least one row")
    labels = tree.leaves if labels is None else _as_labels(labels, "labels")
    _check_length("labels", len(labels), scores.shape[1], "the columns of y_score")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = min(int(k), scores.shape[1])
    weights = _check_weights(sample_weight, len(y_true))
    true_codes = _encode(tree, y_true, "y_true")
    label_codes = _encode(tree, labels, "labels")
    depths = tree.leaf_depths
    true_depth, label_depth = depths[true_codes[:, -1]], depths[label_codes[:, -1]]
    per_row = np.empty(len(y_true))
    step = max(1, _CELLS_PER_CHUNK // (k * tree.depth + scores.shape[1]))
    for start in range(0, len(y_true), step):
        rows = slice(start, start + step)
        block = scores[rows]
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < block.shape[1] else np.broadcast_to(
            np.arange(block.shape[1]), block.shape)
        distance = _distance(true_codes[rows, None, :], label_codes[top], true_depth[rows, None], label_depth[top])
        per_row[rows] = distance.mean(axis=1)
    return _weighted_mean(per_row, weights)


class _DistanceAtKScorer:
    """A scorer ``(estimator, X, y)``: minus :func:`hierarchical_distance_at_k` of ``predict_proba`` (greater is
    better), columns mapped through the estimator's ``classes_``."""

    def __init__(self, k: int, tree: CategoryTree):
        self.k = k
        self.tree = tree

    def __call__(self, estimator: Any, X: Any, y_true: Any, sample_weight: Any = None) -> float:
        proba = estimator.predict_proba(X)
        return -hierarchical_distance_at_k(
            y_true, proba, tree=self.tree, k=self.k, labels=estimator.classes_, sample_weight=sample_weight
        )

    def __repr__(self) -> str:
        return f"make_hierarchical_scorer(tree, metric='hierarchical_distance_at_k', k={self.k})"


def mistake_severity(y_true: Any, y_pred: Any, *, tree: CategoryTree, sample_weight: Any = None) -> MistakeSeverity:
    """The mean tree distance of the predictions, over all of them and over the wrong ones only.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted leaf labels, leaves of ``tree``.
    tree : CategoryTree
        The category tree.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights.

    Returns
    -------
    MistakeSeverity
        ``overall``: the mean distance (0 for a right answer), which falls both
        when fewer mistakes are made and when they are milder; ``mistakes``: the
        mean distance of the wrong predictions alone (Bertinetto et al., 2020),
        which says how bad a mistake is when one is made.

    See Also
    --------
    tree_distance : The distance of each row.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> tree = CategoryTree.from_paths([("A", "a", "a1"), ("A", "a", "a2"), ("A", "b", "b1"), ("B", "c", "c1")])
    >>> mistake_severity(["a1", "a1", "a1", "a1"], ["a1", "a2", "b1", "c1"], tree=tree)
    MistakeSeverity(overall=1.5, mistakes=2.0)
    """
    distance = tree_distance(y_true, y_pred, tree=tree)
    weights = _check_weights(sample_weight, len(distance))
    wrong = distance > 0
    overall = _weighted_mean(distance.astype(float), weights)
    if not wrong.any():
        return MistakeSeverity(overall, float("nan"))
    mistakes = _weighted_mean(distance[wrong].astype(float), None if weights is None else weights[wrong])
    return MistakeSeverity(overall, mistakes)
