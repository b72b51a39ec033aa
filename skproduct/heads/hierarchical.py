"""HierarchicalClassifier: a classifier over a category tree, with local classifiers per node, per level or flat."""

from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import DataConversionWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from .._compat import VersionStampMixin
from ..taxonomy import CategoryTree, _check_level

__all__ = ["HierarchicalClassifier"]

_ROWS_PER_CHUNK = 4096
_FLOOR = 1e-12  # per-level probabilities are floored so that every valid path keeps a score


def _default_estimator():
    return LogisticRegression(max_iter=1000)


def _fit_local(estimator, X, y, sample_weight):
    """Fit one local classifier; a node that saw one class becomes that constant class."""
    classes = np.unique(y)
    if len(classes) == 1:
        return int(classes[0])
    if sample_weight is None:
        return estimator.fit(X, y)
    return estimator.fit(X, y, sample_weight=sample_weight)


class HierarchicalClassifier(VersionStampMixin, ClassifierMixin, BaseEstimator):
    """A classifier that follows a category tree, so that every prediction is a valid path.

    Parameters
    ----------
    estimator : estimator or dict, optional
        The local classifier (anything with ``fit`` and ``predict_proba``),
        cloned for every local problem; a dict maps a level (0 = the top) to
        its classifier, for example ``{0: LGBMClassifier(), 1:
        LogisticRegression(), 2: LogisticRegression()}``; levels a dict leaves
        out use the default, ``LogisticRegression(max_iter=1000)``.
    tree : CategoryTree, optional
        The category tree, whose leaves are the labels in ``y``. Without it, a
        2-D ``y`` of per-level labels (top level first) defines the tree, and a
        1-D ``y`` makes a flat classifier.
    strategy : {"per_level", "per_parent", "flat"}, default="per_level"
        ``"per_level"`` (the default: in ``benchmarks/bench_quality.py`` on real
        pretrained vectors it matched or beat ``"flat"`` on every level and made
        the mildest mistakes, where ``"per_parent"`` lost 1 to 5 leaf points):
        one classifier per level, combined over the tree's valid paths only.
        ``"per_parent"``: one local classifier per inner node over its children;
        a leaf's probability is the product along its path. ``"flat"``: one classifier over the leaves; coarser levels by summing.
        ``"tree"``: one :class:`~skproduct.heads.TreeHeadClassifier` (``estimator``, or its defaults when
        ``estimator`` is None), a torch model with one softmax per level trained jointly; :meth:`predict`
        follows its ``decision`` rule (``"path"`` or the cost-aware ``"crm"``). For vectors larger than memory
        (a float16 :class:`numpy.memmap`), fit the :class:`~skproduct.heads.TreeHeadClassifier` itself.
        Nodes with a single child cost nothing; a node that saw one child in
        training predicts it; a node that saw none splits evenly.
    n_jobs : int, optional
        Local classifiers fitted in parallel (joblib).

    Attributes
    ----------
    tree_ : CategoryTree
        The tree used (given, inferred from a 2-D ``y``, or flat).
    classes_ : ndarray
        Every leaf of the tree, sorted; the columns of :meth:`predict_proba`.
        Leaves unseen in training are included (with the probability the local
        classifiers give them, often 0).
    n_features_in_ : int
        Number of features seen in ``fit``.
    local_estimators_ : dict
        The fitted local classifiers: ``(level, parent code)`` for
        ``per_parent`` (parent ``-1`` is the root), ``(level, -1)`` otherwise.
        A local problem with one class holds that class's code instead.

    See Also
    --------
    skproduct.metrics : Per-level and hierarchical scores over the tree.

    Notes
    -----
    :meth:`score` is the leaf accuracy, the fraction of rows whose predicted
    leaf is the true one (as for any scikit-learn classifier); the scores of
    :mod:`skproduct.metrics` credit a prediction for each level it gets right.

    Examples
    --------
    >>> import numpy as np
    >>> from skproduct import CategoryTree
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")], leaves=[10, 11, 20])
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([10, 11, 20], 20)
    >>> X = rng.normal(size=(60, 3)) + np.repeat(np.eye(3) * 4, 20, axis=0)
    >>> model = HierarchicalClassifier(tree=tree).fit(X, y)
    >>> model.predict(X[[0, 25, 59]])
    array([10, 11, 20])
    >>> model.predict_level(X[[0, 59]], level=0).tolist()
    [('A',), ('B',)]
    >>> model.predict_proba(X[:2]).sum(axis=1).round(6).tolist()
    [1.0, 1.0]
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "predict_proba"]), dict, None],
        "tree": [CategoryTree, None],
        "strategy": [StrOptions({"per_parent", "per_level", "flat", "tree"})],
        "n_jobs": [Integral, None],
    }

    def __init__(self, estimator=None, tree=None, strategy="per_level", n_jobs=None):
        self.estimator = estimator
        self.tree = tree
        self.strategy = strategy
        self.n_jobs = n_jobs

    # -- fitting ----------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Fit the local classifiers.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, for example :class:`~skproduct.ImageEmbedder` vectors.
        y : array-like of shape (n_samples,) or (n_samples, depth)
            Leaf labels of ``tree``; or, without a tree, per-level labels.
        sample_weight : array-like of shape (n_samples,), optional
            Passed to every local classifier.

        Returns
        -------
        self
        """
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        self.tree_, leaves = self._resolve_tree(y)
        codes = self.tree_.encode(leaves)
        if len(codes) != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {len(codes)}")
        weights = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        self.classes_ = self.tree_.leaves
        if self.strategy == "tree":
            model = self._tree_head().set_params(tree=self.tree_).fit(X, leaves, sample_weight=weights)
            self.local_estimators_ = {(self.tree_.depth - 1, -1): model}
            return self
        tasks = list(self._local_problems(codes))
        fitted = Parallel(n_jobs=self.n_jobs)(
            delayed(_fit_local)(
                clone(self._estimator_for(level)), X[rows], codes[rows, level],
                None if weights is None else weights[rows],
            )
            for level, _, rows in tasks
        )
        self.local_estimators_ = {(level, parent): model for (level, parent, _), model in zip(tasks, fitted)}
        return self

    def _resolve_tree(self, y) -> tuple[CategoryTree, np.ndarray]:
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None.")
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected; it is read as 1-D leaf labels.",
                DataConversionWarning, stacklevel=3,
            )
            y = y.ravel()
        if self.tree is not None:
            if y.ndim != 1:
                raise ValueError(f"with a tree, y holds leaf labels (1-D); got shape {y.shape}")
            return self.tree, y
        if y.ndim == 1:
            check_classification_targets(y)
            return CategoryTree.one_level(np.unique(y)), y
        if y.ndim != 2:
            raise ValueError(f"y must be 1-D leaf labels or 2-D per-level labels; got shape {y.shape}")
        leaves = np.array(y[:, -1].tolist())  # an object column of ints becomes ints again
        check_classification_targets(leaves)
        paths = {tuple(str(v) for v in row): leaf for row, leaf in zip(y, leaves)}
        try:
            tree = CategoryTree.from_paths(list(paths), leaves=list(paths.values()))
        except ValueError as exc:
            raise ValueError(f"cannot infer the tree from the per-level labels in y ({exc}); pass tree=") from exc
        return tree, leaves

    def _tree_head(self):
        from .tree import TreeHeadClassifier

        if self.estimator is None:
            return TreeHeadClassifier()
        if not isinstance(self.estimator, TreeHeadClassifier):
            raise ValueError(
                f"strategy='tree' trains a TreeHeadClassifier, got estimator={self.estimator!r}: pass "
                "estimator=TreeHeadClassifier(...) (or None for its defaults), or choose another strategy"
            )
        return clone(self.estimator)

    def _estimator_for(self, level: int):
        if isinstance(self.estimator, dict):
            return self.estimator.get(level, None) or _default_estimator()
        return self.estimator if self.estimator is not None else _default_estimator()

    def _local_problems(self, codes: np.ndarray):
        """Yield ``(level, parent code, rows)`` for every local classifier to fit."""
        depth = self.tree_.depth
        if self.strategy == "flat":
            yield depth - 1, -1, np.arange(len(codes))
            return
        if self.strategy == "per_level":
            for level in range(depth):
                yield level, -1, np.arange(len(codes))
            return
        for level in range(depth):
            n_children = np.bincount(self.tree_.parent_codes(level) + 1)  # +1: the root is parent -1
            if level == 0:
                if len(self.tree_.nodes(0)) > 1:
                    yield 0, -1, np.arange(len(codes))
                continue
            order = np.argsort(codes[:, level - 1], kind="stable")
            parents, starts = np.unique(codes[order, level - 1], return_index=True)
            for parent, rows in zip(parents, np.split(order, starts[1:])):
                if n_children[parent + 1] > 1:
                    yield level, int(parent), rows

    # -- predicting -------------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        """Leaf probabilities, ``(n_samples, n_leaves)`` in :attr:`classes_` order; each row sums to 1.

        A row's probabilities never depend on the other rows.
        """
        check_is_fitted(self, "local_estimators_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        chunks = [self._leaf_proba(X[start : start + _ROWS_PER_CHUNK]) for start in range(0, len(X), _ROWS_PER_CHUNK)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, X) -> np.ndarray:
        """The most probable leaf of each row (with ``strategy="tree"``, by its ``decision`` rule): always a leaf."""
        if self.strategy == "tree":
            check_is_fitted(self, "local_estimators_")
            X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
            return self.local_estimators_[(self.tree_.depth - 1, -1)].predict(X)
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def predict_proba_level(self, X, level: int) -> np.ndarray:
        """Probabilities of the nodes at ``level`` (columns in ``tree_.nodes(level)`` order)."""
        proba = self.predict_proba(X)
        leaf_codes = self.tree_.encode(self.classes_)[:, _check_level(level, self.tree_.depth)]
        out = np.zeros((len(proba), self.tree_.level_sizes[level]))
        np.add.at(out.T, leaf_codes, proba.T)
        return out

    def predict_level(self, X, level: int) -> np.ndarray:
        """The most probable node at ``level``: path tuples, or leaf labels at the last level."""
        return self.tree_.decode(np.argmax(self.predict_proba_level(X, level), axis=1), level=level)

    def predict_top_k(self, X, k: int = 5) -> np.ndarray:
        """The ``k`` most probable leaves of each row, most probable first, shape ``(n_samples, k)``."""
        proba = self.predict_proba(X)
        k = min(k, proba.shape[1])
        top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return self.classes_[top]

    def _leaf_proba(self, X: np.ndarray) -> np.ndarray:
        if self.strategy == "tree":
            return self.local_estimators_[(self.tree_.depth - 1, -1)].predict_proba(X)
        if self.strategy == "flat":
            depth = self.tree_.depth
            return self._level_proba(X, depth - 1, self.local_estimators_[(depth - 1, -1)], len(self.classes_))
        if self.strategy == "per_level":
            return self._per_level_proba(X)
        return self._per_parent_proba(X)

    def _level_proba(self, X, level: int, model, size: int) -> np.ndarray:
        """One local model's probabilities spread over the ``size`` node codes of ``level``."""
        out = np.zeros((len(X), size))
        if isinstance(model, (int, np.integer)):
            out[:, int(model)] = 1.0
        else:
            out[:, model.classes_.astype(int)] = model.predict_proba(X)
        return out

    def _per_level_proba(self, X) -> np.ndarray:
        leaf_codes = self.tree_.encode(self.classes_)
        log_score = np.zeros((len(X), len(self.classes_)))
        for level, size in enumerate(self.tree_.level_sizes):
            proba = self._level_proba(X, level, self.local_estimators_[(level, -1)], size)
            log_score += np.log(np.maximum(proba, _FLOOR))[:, leaf_codes[:, level]]
        log_score -= log_score.max(axis=1, keepdims=True)
        score = np.exp(log_score)
        return score / score.sum(axis=1, keepdims=True)

    def _per_parent_proba(self, X) -> np.ndarray:
        tree = self.tree_
        proba = np.ones((len(X), 1))  # the root
        for level, size in enumerate(tree.level_sizes):
            parents = tree.parent_codes(level) if level else np.zeros(size, dtype=np.intp)
            conditional = np.zeros((len(X), size))
            for parent in range(proba.shape[1]):
                children = np.flatnonzero(parents == parent)
                model = self.local_estimators_.get((level, parent if level else -1))
                if len(children) == 1:
                    conditional[:, children[0]] = 1.0
                elif model is None:  # no training row reached this node
                    conditional[:, children] = 1.0 / len(children)
                elif isinstance(model, (int, np.integer)):  # the node saw one child in training
                    conditional[:, int(model)] = 1.0
                else:  # only this node's children's columns: no rows x nodes array per local model
                    conditional[:, model.classes_.astype(int)] = model.predict_proba(X)
            proba = proba[:, parents] * conditional
        return proba / proba.sum(axis=1, keepdims=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags
