"""How bad the mistakes are: the tree distance between the true and the predicted leaf.

The distance of a prediction is the height of the lowest common ancestor of
the true and the predicted leaf: 0 for the right leaf, 1 for a sibling under
the same parent, up to ``tree.depth`` for a leaf under another top-level node.
It decomposes by level (the number of levels from the top whose nodes differ),
so it is computed from the level codes of :meth:`CategoryTree.encode`, with no
leaves x leaves matrix.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..taxonomy import CategoryTree
from ._checks import _check_tree, _check_weights, _encode_pair, _weighted_mean

__all__ = ["MistakeSeverity", "mistake_severity", "tree_distance"]


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
    shared = np.cumprod(true_codes == pred_codes, axis=1).sum(axis=1)  # levels from the top on the same path
    return (tree.depth - shared).astype(np.int64)


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
