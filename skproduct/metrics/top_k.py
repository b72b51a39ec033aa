"""Top-k accuracy from class scores, at the leaves or, with leaf probabilities summed into nodes, at any level."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..taxonomy import CategoryTree, _check_level, _show
from ._checks import _as_labels, _check_length, _check_tree, _check_weights, _encode, _weighted_mean

__all__ = ["top_k_accuracy_score"]

# rows of scores compared at once in top-k accuracy: bounds the temporary boolean arrays
_TOP_K_CELLS_PER_CHUNK = 1 << 20


def _top_k_hits(scores: np.ndarray, true_columns: np.ndarray, k: int, indicator: Any = None) -> np.ndarray:
    """Whether each row's true column ranks among its ``k`` highest scores.

    With ``indicator`` (sparse, ``(n_nodes, n_columns)``), the score columns
    are first summed into nodes, block by block, and ``true_columns`` index
    nodes. Ties are broken as :func:`sklearn.metrics.top_k_accuracy_score`
    breaks them (a stable sort, reversed): among equal scores the later column
    ranks higher. A true column of ``-1`` is a miss.
    """
    n_rows, n_columns = scores.shape
    hits = np.zeros(n_rows, dtype=bool)
    rows = np.flatnonzero(true_columns >= 0)
    column_index = np.arange(n_columns if indicator is None else indicator.shape[0])
    chunk = max(1, _TOP_K_CELLS_PER_CHUNK // max(n_columns, 1))
    for start in range(0, len(rows), chunk):  # over blocks of rows: bounds memory, keeps blocks in cache
        block = rows[start : start + chunk]
        block_scores = scores[block]
        if indicator is not None:
            block_scores = (indicator @ np.ascontiguousarray(block_scores.T)).T
        truth = true_columns[block]
        true_score = block_scores[np.arange(len(block)), truth][:, None]
        ahead = block_scores > true_score
        ahead |= (block_scores == true_score) & (column_index > truth[:, None])
        hits[block] = np.count_nonzero(ahead, axis=1) < k
    return hits


def top_k_accuracy_score(
    y_true: Any,
    y_score: Any,
    *,
    k: int = 5,
    labels: Any = None,
    tree: CategoryTree | None = None,
    level: int | None = None,
    sample_weight: Any = None,
) -> float:
    """Share of rows whose true label is among the ``k`` highest-scored, at any level of a tree.

    Without ``tree`` this is :func:`sklearn.metrics.top_k_accuracy_score` (ties
    are broken the same way). With ``tree`` and ``level``, the leaf
    probabilities are first summed into the nodes of that level, so the
    question becomes "is the true node at this level among the ``k`` most
    probable ones".

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels: leaf labels of ``tree`` when it is given.
    y_score : array-like of shape (n_samples, n_classes)
        Scores (with ``level``: probabilities, since they are summed), one
        column per entry of ``labels``, for example from ``predict_proba``.
    k : int, default=5
        How many of the highest scores count as a hit.
    labels : array-like of shape (n_classes,), optional
        The label of each column of ``y_score``, for example an estimator's
        ``classes_`` (as in :func:`sklearn.metrics.top_k_accuracy_score`).
        Defaults to ``tree.leaves`` when ``tree`` is given, and is required
        otherwise.
    tree : CategoryTree, optional
        The category tree; ``labels`` and ``y_true`` are then its leaves.
    level : int, optional
        With ``tree``: the level to score at (0 for the top). Defaults to the
        leaf level.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights.

    Returns
    -------
    float
        A value between 0 and 1.

    Raises
    ------
    KeyError
        With ``tree``: a label in ``y_true`` or ``labels`` is not a leaf; the
        message names it.
    ValueError
        Shapes or lengths do not fit; ``labels`` is missing or repeats a
        label; without ``tree``, ``y_true`` holds labels that are not in
        ``labels``.

    See Also
    --------
    sklearn.metrics.top_k_accuracy_score : The same score without a tree.
    make_hierarchical_scorer : A scorer from ``predict_proba`` for ``GridSearchCV``.

    Notes
    -----
    With ``tree``, a true leaf (or node) that has no column in ``y_score``,
    for example a rare leaf the estimator never saw in training, counts as a
    miss rather than an error, so cross-validation over long-tailed data does
    not break. Labels outside the tree still raise. As in scikit-learn, a
    ``k`` at least as large as the number of columns (of nodes, at ``level``)
    warns that the score is meaningless.

    Examples
    --------
    >>> import numpy as np
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import top_k_accuracy_score
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1"), ("C", "c1")])
    >>> proba = np.array([[0.25, 0.25, 0.1, 0.4],    # columns: a1, a2, b1, c1
    ...                   [0.35, 0.35, 0.0, 0.3]])
    >>> top_k_accuracy_score(["a1", "a1"], proba, k=2, labels=tree.leaves)
    0.5

    The first row's "a1" misses the top 2 leaves (a tie with "a2" goes to the
    later column, as in scikit-learn), but its parent "A" has the highest
    summed probability at level 0:

    >>> top_k_accuracy_score(["a1", "a1"], proba, k=1, tree=tree, level=0)
    1.0
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    y_true = _as_labels(y_true, "y_true")
    scores = np.asarray(y_score)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(float)
    if scores.ndim != 2:
        raise ValueError(f"y_score must have shape (n_samples, n_classes), got {scores.shape}")
    _check_length("y_score", len(scores), len(y_true))
    if len(y_true) == 0:
        raise ValueError("y_true and y_score are empty; a score needs at least one row")
    weights = _check_weights(sample_weight, len(y_true))
    if tree is None and level is not None:
        raise ValueError("level= needs tree=: pass the CategoryTree whose level to score at")
    if tree is not None:
        _check_tree(tree)
        index = tree.depth - 1 if level is None else _check_level(level, tree.depth)
    if labels is None:
        if tree is None:
            raise ValueError("pass labels= (for example estimator.classes_): the label of each column of y_score")
        labels = tree.leaves
    labels = _as_labels(labels, "labels")
    if len(labels) != scores.shape[1]:
        raise ValueError(
            f"labels has {len(labels)} entries but y_score has {scores.shape[1]} columns; give one label per column"
        )
    distinct, counts = np.unique(labels, return_counts=True)
    if len(distinct) != len(labels):
        raise ValueError(f"labels repeats {_show(distinct[counts > 1])}; give each column of y_score its own label")

    indicator = None
    if tree is None:
        import pandas as pd

        true_columns = pd.Index(labels).get_indexer(y_true)
        if (true_columns < 0).any():
            unknown = pd.unique(y_true[true_columns < 0])
            raise ValueError(f"y_true holds {len(unknown)} labels that are not in labels: {_show(unknown)}")
        n_columns = len(labels)
    else:
        column_codes = _encode(tree, labels, "labels")[:, index]
        true_codes = _encode(tree, y_true, "y_true")[:, index]
        nodes, column_node = np.unique(column_codes, return_inverse=True)
        if len(nodes) < len(column_codes):  # several columns per node: sum them, block by block
            import scipy.sparse as sp

            indicator = sp.csr_matrix(
                (np.ones(len(column_codes), dtype=scores.dtype), (column_node, np.arange(len(column_codes)))),
                shape=(len(nodes), len(column_codes)),
            )
            column_of_node = np.arange(len(nodes))
        else:  # one column per node (the leaf level): keep the columns as they are
            column_of_node = np.argsort(column_codes)
        position = np.searchsorted(nodes, true_codes).clip(0, len(nodes) - 1)
        true_columns = np.where(nodes[position] == true_codes, column_of_node[position], -1)
        n_columns = len(nodes)
    if k >= n_columns:
        from sklearn.exceptions import UndefinedMetricWarning

        warnings.warn(
            f"'k' ({k}) greater than or equal to 'n_classes' ({n_columns}) will result in a perfect score "
            "and is therefore meaningless.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return _weighted_mean(_top_k_hits(scores, true_columns, k, indicator), weights)
