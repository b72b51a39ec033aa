"""Accuracy level by level of the tree: of a classifier's predictions, and of always answering the majority node."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..taxonomy import CategoryTree, _check_level
from ._checks import _as_labels, _check_tree, _check_weights, _encode, _encode_pair, _weighted_mean

__all__ = ["level_accuracy_score", "majority_level_accuracy"]


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
