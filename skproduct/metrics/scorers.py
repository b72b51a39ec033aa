"""Scorers for ``GridSearchCV(scoring=...)`` and ``cross_val_score``, built from the hierarchical metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..taxonomy import CategoryTree, _check_level
from ._checks import _check_average, _check_tree
from .hierarchical import hierarchical_f1_score, hierarchical_precision_score, hierarchical_recall_score
from .levels import level_accuracy_score
from .severity import _DistanceAtKScorer, mistake_severity
from .top_k import top_k_accuracy_score

__all__ = ["make_hierarchical_scorer", "make_hierarchical_scorers"]

_SCORER_METRICS = (
    "precision", "recall", "f1", "accuracy", "top_k_accuracy", "mistake_severity", "hierarchical_distance_at_k",
)


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
    metric : {"f1", "precision", "recall", "accuracy", "top_k_accuracy", "mistake_severity"}, default="f1"
        ``"f1"``, ``"precision"`` and ``"recall"`` are the hierarchical scores
        (from ``predict``); ``"accuracy"`` is :func:`level_accuracy_score` at
        ``level`` (from ``predict``); ``"top_k_accuracy"`` is
        :func:`top_k_accuracy_score` at ``level`` (from ``predict_proba``,
        whose columns follow the estimator's ``classes_``);
        ``"mistake_severity"`` is the mean tree distance over all predictions
        (:func:`mistake_severity`'s ``overall``), negated as scikit-learn
        negates losses (``neg_mean_squared_error``), so greater is better;
        ``"hierarchical_distance_at_k"`` is :func:`hierarchical_distance_at_k`
        of the top ``k`` leaves (from ``predict_proba``), negated likewise.
    average : {"micro", "macro"}, default="micro"
        For the hierarchical scores.
    level : int, optional
        For ``"accuracy"`` and ``"top_k_accuracy"``: the level (0 for the top).
        Defaults to the leaf level.
    k : int, default=5
        For ``"top_k_accuracy"`` and ``"hierarchical_distance_at_k"``.

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
    if metric == "mistake_severity":
        return make_scorer(_overall_severity, greater_is_better=False, tree=tree)
    if metric == "hierarchical_distance_at_k":
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        return _DistanceAtKScorer(int(k), tree)
    index = tree.depth - 1 if level is None else _check_level(level, tree.depth)
    if metric == "accuracy":
        return make_scorer(level_accuracy_score, tree=tree, level=index)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return _TopKScorer(int(k), tree, index)


def _overall_severity(y_true, y_pred, *, tree, sample_weight=None) -> float:
    return mistake_severity(y_true, y_pred, tree=tree, sample_weight=sample_weight).overall


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
