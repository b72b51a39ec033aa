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

Note that a :class:`~skproduct.CategoryTree` keeps all its leaves at the same
depth, so each path set has ``tree.depth`` nodes: hierarchical precision,
recall and F1 are then equal to one another, and micro and macro averages
coincide too (both are the mean fraction of levels predicted right). All three
are kept, under hiclass's names and definitions, so that results can be
compared with papers and libraries that report them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .taxonomy import CategoryTree, _check_level, _show

__all__ = [
    "hierarchical_f1_score",
    "hierarchical_precision_score",
    "hierarchical_recall_score",
    "level_accuracy_score",
    "majority_level_accuracy",
    "make_hierarchical_scorer",
    "make_hierarchical_scorers",
    "top_k_accuracy_score",
]

_AVERAGES = ("micro", "macro")
_SCORER_METRICS = ("precision", "recall", "f1", "accuracy", "top_k_accuracy")
# rows of scores compared at once in top-k accuracy: bounds the temporary boolean arrays
_TOP_K_CELLS_PER_CHUNK = 1 << 20


# -- input checks ----------------------------------------------------------
def _as_labels(y: Any, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of leaf labels, got an array of shape {y.shape}; "
            "pass the leaf of each row, not per-level labels"
        )
    return y


def _check_length(name: str, n: int, expected: int, expected_name: str = "y_true") -> None:
    if n != expected:
        raise ValueError(f"{name} has {n} rows but {expected_name} has {expected}; give one per row")


def _encode(tree: CategoryTree, y: np.ndarray, name: str) -> np.ndarray:
    try:
        return tree.encode(y)
    except KeyError as error:
        message = error.args[0] if error.args else str(error)
        raise KeyError(f"{name}: {message}") from None


def _encode_pair(y_true: Any, y_pred: Any, tree: CategoryTree) -> tuple[np.ndarray, np.ndarray]:
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    _check_length("y_pred", len(y_pred), len(y_true))
    if len(y_true) == 0:
        raise ValueError("y_true and y_pred are empty; a score needs at least one row")
    return _encode(tree, y_true, "y_true"), _encode(tree, y_pred, "y_pred")


def _check_weights(sample_weight: Any, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    weights = np.asarray(sample_weight, dtype=float)
    if weights.ndim != 1:
        raise ValueError(f"sample_weight must be 1-D, got shape {weights.shape}")
    _check_length("sample_weight", len(weights), n)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("sample_weight must be finite and non-negative")
    if weights.sum() == 0:
        raise ValueError("sample_weight sums to zero; at least one row must have a positive weight")
    return weights


def _check_average(average: Any) -> None:
    if not isinstance(average, str) or average not in _AVERAGES:
        raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")


def _check_tree(tree: Any) -> None:
    if not isinstance(tree, CategoryTree):
        raise TypeError(f"tree must be a skproduct.CategoryTree, got {type(tree).__name__}")


def _weighted_sum(values: np.ndarray, weights: np.ndarray | None) -> float:
    return float(values.sum() if weights is None else np.dot(weights, values))


def _weighted_mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    return float(values.mean() if weights is None else np.dot(weights, values) / weights.sum())


# -- hierarchical precision, recall, F1 ------------------------------------
def _hierarchical_prf(
    y_true: Any, y_pred: Any, tree: CategoryTree, average: str, sample_weight: Any
) -> tuple[float, float, float]:
    """Hierarchical precision, recall and F1 (Kiritchenko et al.), micro or macro averaged."""
    _check_tree(tree)
    _check_average(average)
    true_codes, pred_codes = _encode_pair(y_true, y_pred, tree)
    weights = _check_weights(sample_weight, len(true_codes))
    # |ancestors(true) & ancestors(pred)|: nodes are paths, so a node is shared exactly where the codes agree
    common = (true_codes == pred_codes).sum(axis=1)
    # |ancestors(pred)| and |ancestors(true)|: the path without the root; every leaf sits at tree.depth
    n_pred = np.full(len(common), tree.depth)
    n_true = n_pred
    if average == "micro":
        precision = _weighted_sum(common, weights) / _weighted_sum(n_pred, weights)
        recall = _weighted_sum(common, weights) / _weighted_sum(n_true, weights)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return precision, recall, f1
    row_precision = common / n_pred
    row_recall = common / n_true
    total = row_precision + row_recall
    row_f1 = np.divide(2 * row_precision * row_recall, total, out=np.zeros_like(total), where=total > 0)
    return (
        _weighted_mean(row_precision, weights),
        _weighted_mean(row_recall, weights),
        _weighted_mean(row_f1, weights),
    )


def hierarchical_precision_score(
    y_true: Any, y_pred: Any, *, tree: CategoryTree, average: str = "micro", sample_weight: Any = None
) -> float:
    r"""Hierarchical precision: the share of predicted ancestors that are true ancestors.

    For row :math:`i` let :math:`\hat A_i` be the nodes on the path of the
    predicted leaf and :math:`A_i` those of the true leaf (each path includes
    the leaf and excludes the root). The micro average is
    :math:`hP = \sum_i |A_i \cap \hat A_i| / \sum_i |\hat A_i|`; the macro
    average is the mean over rows of :math:`|A_i \cap \hat A_i| / |\hat A_i|`.
    This is the definition of Kiritchenko et al. and of ``hiclass.metrics.precision``.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True leaf labels, all leaves of ``tree``.
    y_pred : array-like of shape (n_samples,)
        Predicted leaf labels, all leaves of ``tree``.
    tree : CategoryTree
        The category tree the labels belong to.
    average : {"micro", "macro"}, default="micro"
        ``"micro"`` sums the counts over all rows before dividing;
        ``"macro"`` averages the per-row ratios.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights: they weight the sums (micro) or the mean (macro).

    Returns
    -------
    float
        A value between 0 and 1.

    Raises
    ------
    KeyError
        A label is not a leaf of ``tree``; the message names it.
    ValueError
        The inputs differ in length, are empty or not 1-D, or ``average`` is unknown.

    See Also
    --------
    hierarchical_recall_score, hierarchical_f1_score, level_accuracy_score

    Notes
    -----
    All leaves of a :class:`~skproduct.CategoryTree` sit at the same depth, so
    :math:`|A_i| = |\hat A_i|` and the hierarchical precision equals the
    hierarchical recall and F1; micro and macro averages are equal too.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import hierarchical_precision_score
    >>> tree = CategoryTree.from_paths(
    ...     [("Home", "Kitchen", "Pans"), ("Home", "Kitchen", "Knives"),
    ...      ("Home", "Garden", "Pans"), ("Toys", "Games", "Chess")],
    ...     leaves=[10, 12, 11, 20],
    ... )

    The first row is right down to level 1, the second only at level 0 (its
    "Pans" is another node than the true "Pans"), the third everywhere: 6 of
    9 predicted nodes are right.

    >>> hierarchical_precision_score([10, 11, 20], [12, 10, 20], tree=tree)
    0.6666666666666666
    """
    return _hierarchical_prf(y_true, y_pred, tree, average, sample_weight)[0]


def hierarchical_recall_score(
    y_true: Any, y_pred: Any, *, tree: CategoryTree, average: str = "micro", sample_weight: Any = None
) -> float:
    r"""Hierarchical recall: the share of true ancestors that the prediction recovers.

    With the path sets of :func:`hierarchical_precision_score`, the micro
    average is :math:`hR = \sum_i |A_i \cap \hat A_i| / \sum_i |A_i|` and the
    macro average is the mean over rows of :math:`|A_i \cap \hat A_i| / |A_i|`
    (as ``hiclass.metrics.recall``).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True leaf labels, all leaves of ``tree``.
    y_pred : array-like of shape (n_samples,)
        Predicted leaf labels, all leaves of ``tree``.
    tree : CategoryTree
        The category tree the labels belong to.
    average : {"micro", "macro"}, default="micro"
        ``"micro"`` sums the counts over all rows before dividing;
        ``"macro"`` averages the per-row ratios.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights.

    Returns
    -------
    float
        A value between 0 and 1.

    Raises
    ------
    KeyError
        A label is not a leaf of ``tree``; the message names it.
    ValueError
        The inputs differ in length, are empty or not 1-D, or ``average`` is unknown.

    See Also
    --------
    hierarchical_precision_score, hierarchical_f1_score

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import hierarchical_recall_score
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> hierarchical_recall_score(["a1", "a2", "b1", "b1"], ["a2", "a2", "a1", "b1"], tree=tree)
    0.625
    >>> hierarchical_recall_score(["a1", "b1"], ["a2", "b1"], tree=tree, sample_weight=[3, 1])
    0.625
    """
    return _hierarchical_prf(y_true, y_pred, tree, average, sample_weight)[1]


def hierarchical_f1_score(
    y_true: Any, y_pred: Any, *, tree: CategoryTree, average: str = "micro", sample_weight: Any = None
) -> float:
    r"""Hierarchical F1: the harmonic mean of hierarchical precision and recall.

    The micro average is :math:`2 hP hR / (hP + hR)` of the micro-averaged
    precision and recall; the macro average is the mean over rows of each
    row's F1 (as ``hiclass.metrics.f1``). Where precision and recall are both
    0 the F1 is 0, without a warning.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True leaf labels, all leaves of ``tree``.
    y_pred : array-like of shape (n_samples,)
        Predicted leaf labels, all leaves of ``tree``.
    tree : CategoryTree
        The category tree the labels belong to.
    average : {"micro", "macro"}, default="micro"
        ``"micro"`` combines the micro-averaged precision and recall;
        ``"macro"`` averages the per-row F1.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights.

    Returns
    -------
    float
        A value between 0 and 1.

    Raises
    ------
    KeyError
        A label is not a leaf of ``tree``; the message names it.
    ValueError
        The inputs differ in length, are empty or not 1-D, or ``average`` is unknown.

    See Also
    --------
    hierarchical_precision_score, hierarchical_recall_score
    make_hierarchical_scorer : A scorer for ``GridSearchCV(scoring=...)``.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import hierarchical_f1_score
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> hierarchical_f1_score(["a1", "b1"], ["a2", "b1"], tree=tree)
    0.75
    >>> hierarchical_f1_score(["a1", "b1"], ["a2", "b1"], tree=tree, average="macro")
    0.75
    """
    return _hierarchical_prf(y_true, y_pred, tree, average, sample_weight)[2]


# -- per-level accuracy ----------------------------------------------------
def level_accuracy_score(
    y_true: Any, y_pred: Any, *, tree: CategoryTree, level: int | None = None, sample_weight: Any = None
) -> np.ndarray | float:
    """Accuracy at each level of the tree: is the predicted leaf's ancestor the true one?

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True leaf labels, all leaves of ``tree``.
    y_pred : array-like of shape (n_samples,)
        Predicted leaf labels, all leaves of ``tree``.
    tree : CategoryTree
        The category tree the labels belong to.
    level : int, optional
        One level (0 for the top, ``-1`` or ``tree.depth - 1`` for the leaves)
        to get its accuracy as a float. By default every level's accuracy.
    sample_weight : array-like of shape (n_samples,), optional
        Row weights.

    Returns
    -------
    numpy.ndarray of shape (tree.depth,) or float
        The accuracy at each level from the top (index 0) down to the leaves
        (the last entry, the plain accuracy), or at ``level`` alone.

    Raises
    ------
    KeyError
        A label is not a leaf of ``tree``; the message names it.
    ValueError
        The inputs differ in length, are empty or not 1-D.

    See Also
    --------
    hierarchical_f1_score : The mean of these accuracies, on a tree whose leaves share one depth.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import level_accuracy_score
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> level_accuracy_score(["a1", "a2", "b1", "b1"], ["a2", "a2", "a1", "b1"], tree=tree)
    array([0.75, 0.5 ])
    >>> level_accuracy_score(["a1", "a2", "b1", "b1"], ["a2", "a2", "a1", "b1"], tree=tree, level=0)
    0.75
    """
    _check_tree(tree)
    index = None if level is None else _check_level(level, tree.depth)
    true_codes, pred_codes = _encode_pair(y_true, y_pred, tree)
    weights = _check_weights(sample_weight, len(true_codes))
    if index is not None:
        return _weighted_mean(true_codes[:, index] == pred_codes[:, index], weights)
    agree = true_codes == pred_codes
    return agree.mean(axis=0) if weights is None else weights @ agree / weights.sum()


def majority_level_accuracy(y_train: Any, y_test: Any, *, tree: CategoryTree) -> np.ndarray:
    """Per level, the accuracy on ``y_test`` of always answering the most frequent node of ``y_train``.

    The chance level a classifier must beat, level by level (at least as high
    as a uniform guess whenever the training and test sets share their most
    frequent node). Compare it with :func:`level_accuracy_score`.

    Parameters
    ----------
    y_train : array-like of shape (n_train,)
        Training leaf labels, all leaves of ``tree``: they decide the most
        frequent node of each level (the first in code order on a tie).
    y_test : array-like of shape (n_test,)
        Test leaf labels, all leaves of ``tree``.
    tree : CategoryTree
        The category tree the labels belong to.

    Returns
    -------
    numpy.ndarray of shape (tree.depth,)
        The accuracy at each level, top level first.

    Raises
    ------
    KeyError
        A label is not a leaf of ``tree``; the message names it.
    ValueError
        ``y_train`` or ``y_test`` is empty or not 1-D.

    See Also
    --------
    level_accuracy_score : The per-level accuracy of a classifier's predictions.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import majority_level_accuracy
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])

    The training set's most frequent node is "A" at level 0 and "a2" at level 1:

    >>> majority_level_accuracy(["a1", "a2", "a2"], ["a1", "a2", "b1", "a2"], tree=tree)
    array([0.75, 0.5 ])
    """
    _check_tree(tree)
    codes = {}
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        labels = _as_labels(y, name)
        if len(labels) == 0:
            raise ValueError(f"{name} is empty; the chance level needs at least one row")
        codes[name] = _encode(tree, labels, name)
    majority = [np.bincount(column).argmax() for column in codes["y_train"].T]
    return (codes["y_test"] == np.array(majority)).mean(axis=0)


# -- top-k accuracy ---------------------------------------------------------
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


# -- scorers ---------------------------------------------------------------
class _TopKScorer:
    """A scorer ``(estimator, X, y)`` for top-k accuracy from ``predict_proba``, columns in ``classes_`` order.

    :func:`sklearn.metrics.make_scorer` cannot hand the estimator's
    ``classes_`` to the metric, which needs them to know which column is which
    (a cross-validation fold may lack some leaves), so this is a small callable.
    """

    def __init__(self, k: int, tree: CategoryTree | None, level: int | None):
        self.k = k
        self.tree = tree
        self.level = level

    def __call__(self, estimator: Any, X: Any, y_true: Any, sample_weight: Any = None) -> float:
        proba = estimator.predict_proba(X)
        return top_k_accuracy_score(
            y_true,
            proba,
            k=self.k,
            labels=estimator.classes_,
            tree=self.tree,
            level=self.level,
            sample_weight=sample_weight,
        )

    def __repr__(self) -> str:
        return f"make_hierarchical_scorer(tree, metric='top_k_accuracy', k={self.k}, level={self.level})"


def make_hierarchical_scorer(
    tree: CategoryTree,
    *,
    metric: str = "f1",
    average: str = "micro",
    level: int | None = None,
    k: int = 5,
):
    """A scorer for ``GridSearchCV(scoring=...)`` or ``cross_val_score`` from a metric of this module.

    Parameters
    ----------
    tree : CategoryTree
        The category tree of the estimator's leaf labels.
    metric : {"f1", "precision", "recall", "accuracy", "top_k_accuracy"}, default="f1"
        ``"f1"``, ``"precision"`` and ``"recall"`` are the hierarchical scores
        (from ``predict``); ``"accuracy"`` is :func:`level_accuracy_score` at
        ``level`` (from ``predict``); ``"top_k_accuracy"`` is
        :func:`top_k_accuracy_score` at ``level`` (from ``predict_proba``,
        whose columns follow the estimator's ``classes_``).
    average : {"micro", "macro"}, default="micro"
        For the hierarchical scores.
    level : int, optional
        For ``"accuracy"`` and ``"top_k_accuracy"``: the level (0 for the top).
        Defaults to the leaf level.
    k : int, default=5
        For ``"top_k_accuracy"``.

    Returns
    -------
    callable
        ``scorer(estimator, X, y)``, greater is better. It pickles, so it works
        with ``n_jobs``.

    See Also
    --------
    make_hierarchical_scorers : Several scorers at once, for a multi-metric search.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.model_selection import cross_val_score
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import make_hierarchical_scorer
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> rng = np.random.default_rng(0)
    >>> y = np.tile(tree.leaves, 20)
    >>> X = rng.normal(size=(len(y), 3)) + 3 * (y[:, None] == tree.leaves)
    >>> scores = cross_val_score(LogisticRegression(), X, y, cv=3,
    ...                          scoring=make_hierarchical_scorer(tree, metric="accuracy", level=0))
    >>> bool(scores.min() > 0.8)
    True
    """
    from sklearn.metrics import make_scorer

    _check_tree(tree)
    if metric not in _SCORER_METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, _SCORER_METRICS))}; got {metric!r}")
    if metric in ("precision", "recall", "f1"):
        _check_average(average)
        if level is not None:
            raise ValueError(f"level= applies to 'accuracy' and 'top_k_accuracy', not to the hierarchical {metric!r}")
        score_func = {
            "precision": hierarchical_precision_score,
            "recall": hierarchical_recall_score,
            "f1": hierarchical_f1_score,
        }[metric]
        return make_scorer(score_func, tree=tree, average=average)
    index = tree.depth - 1 if level is None else _check_level(level, tree.depth)
    if metric == "accuracy":
        return make_scorer(level_accuracy_score, tree=tree, level=index)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return _TopKScorer(int(k), tree, index)


def make_hierarchical_scorers(tree: CategoryTree, *, top_k: int | None = None) -> dict[str, Any]:
    """Scorers for a multi-metric search: hierarchical F1, the accuracy at every level, and optionally top-k.

    Parameters
    ----------
    tree : CategoryTree
        The category tree of the estimator's leaf labels.
    top_k : int, optional
        Also add the top-``top_k`` leaf accuracy (needs ``predict_proba``).

    Returns
    -------
    dict
        ``{"hierarchical_f1": ..., "accuracy_level0": ..., ...,
        "top{k}_accuracy": ...}``: pass it as ``GridSearchCV(scoring=...)``
        with ``refit=`` one of its keys; ``cv_results_`` then holds a
        ``mean_test_<key>`` column for each.

    See Also
    --------
    make_hierarchical_scorer : One scorer.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> from skproduct.metrics import make_hierarchical_scorers
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> sorted(make_hierarchical_scorers(tree, top_k=2))
    ['accuracy_level0', 'accuracy_level1', 'hierarchical_f1', 'top2_accuracy']
    """
    scorers = {"hierarchical_f1": make_hierarchical_scorer(tree, metric="f1")}
    for level in range(tree.depth):
        scorers[f"accuracy_level{level}"] = make_hierarchical_scorer(tree, metric="accuracy", level=level)
    if top_k is not None:
        scorers[f"top{top_k}_accuracy"] = make_hierarchical_scorer(tree, metric="top_k_accuracy", k=top_k)
    return scorers
