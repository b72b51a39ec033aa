"""Hierarchical precision, recall and F1 (Kiritchenko et al., 2005), as ``hiclass.metrics`` computes them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..taxonomy import CategoryTree
from ._checks import _check_average, _check_tree, _check_weights, _encode_pair, _weighted_mean, _weighted_sum

__all__ = ["hierarchical_f1_score", "hierarchical_precision_score", "hierarchical_recall_score"]


def _hierarchical_prf(
    y_true: Any, y_pred: Any, tree: CategoryTree, average: str, sample_weight: Any
) -> tuple[float, float, float]:
    """Hierarchical precision, recall and F1 (Kiritchenko et al.), micro or macro averaged."""
    _check_tree(tree)
    _check_average(average)
    true_codes, pred_codes = _encode_pair(y_true, y_pred, tree)
    weights = _check_weights(sample_weight, len(true_codes))
    # |ancestors(true) & ancestors(pred)|: nodes are paths, so a node is shared exactly where the codes agree
    # |ancestors(pred)| and |ancestors(true)|: the path without the root, as deep as the leaf (ragged trees too)
    n_pred = tree.leaf_depths[pred_codes[:, -1]]
    n_true = tree.leaf_depths[true_codes[:, -1]]
    # a ragged leaf carried down as its own node is counted once, at its own depth
    common = np.minimum((true_codes == pred_codes).sum(axis=1), np.minimum(n_pred, n_true))
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
    When all leaves of a :class:`~skproduct.CategoryTree` sit at the same depth,
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
