"""TreeHeadClassifier: one torch model with a softmax per tree level, trained jointly, predicting with numpy.

This module holds the estimator and its numpy predictions (the valid-path and the cost-aware decision rules);
the torch training that ``fit`` calls lives in :mod:`skproduct.heads._tree_training`.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy import sparse
from scipy.special import log_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .._compat import VersionStampMixin
from .._training import holdout_split
from ..taxonomy import CategoryTree, _check_level

__all__ = ["TreeHeadClassifier"]

# Leaf scores held at once when predicting (float64): ~32 MB of rows x leaves.
_PREDICT_CELLS = 1 << 22
_DTYPES = [np.float32, np.float64, np.float16]
# Values checked for NaN at once (a 256 kB boolean temporary).
_FINITE_BLOCK_VALUES = 1 << 18


def release_pages(X, start: int, stop: int) -> None:
    """Drop the pages of rows ``start:stop`` of a read-only or shared memory-mapped ``X`` from this process's
    resident memory once they have been copied out (``madvise(MADV_DONTNEED)``): the file stays in the page cache,
    so reading them again costs a page fault, not a disk read, and streaming a file larger than memory keeps the
    resident memory bounded by the blocks in use. Anything but a C-contiguous ``numpy.memmap`` in mode ``"r"`` or
    ``"r+"`` is left alone (an anonymous or copy-on-write mapping would lose its data)."""
    import mmap

    if not isinstance(X, np.ndarray) or not X.flags.c_contiguous or stop <= start or X.ndim != 2:
        return
    # validation (np.asarray) turns a memmap into a plain view of it: find the memmap and its mmap down the bases
    mode, handle, owner = None, None, X
    while owner is not None and handle is None:
        if isinstance(owner, np.memmap):
            mode = mode or owner.mode
        if isinstance(owner, mmap.mmap):
            handle = owner
        owner = getattr(owner, "base", None)
    if handle is None or mode not in ("r", "r+") or not hasattr(handle, "madvise"):
        return
    base = np.frombuffer(handle, dtype=np.uint8).ctypes.data
    row_bytes = X.strides[0]
    first = X.ctypes.data - base + start * row_bytes
    last = X.ctypes.data - base + min(stop, X.shape[0]) * row_bytes
    page = mmap.PAGESIZE
    first = (first + page - 1) // page * page  # whole pages inside the rows only: a neighbour's rows stay
    last = last // page * page
    if last > first >= 0 and last <= len(handle):
        handle.madvise(mmap.MADV_DONTNEED, first, last - first)


def _check_finite(X) -> None:
    """Finite values, checked in blocks of rows so that a memory-mapped ``X`` is never copied whole."""
    step = max(1, _FINITE_BLOCK_VALUES // max(1, X.shape[1]))
    for start in range(0, X.shape[0], step):
        if not np.isfinite(X[start : start + step]).all():
            raise ValueError("Input X contains NaN or infinity; remove or impute those rows")
        release_pages(X, start, start + step)


class TreeHeadClassifier(VersionStampMixin, ClassifierMixin, BaseEstimator):
    """A tree-aware torch head: one softmax per level of a category tree, trained jointly, on vectors that may
    not fit in memory.

    The model is optional hidden layers (ReLU, dropout) followed by one linear softmax head per level of the
    tree, trained by minibatch Adam on the weighted sum of the levels' cross-entropies. A leaf's probability
    combines the levels over the tree's valid paths only (the product of its nodes' probabilities,
    renormalised over the leaves). Training streams minibatches from ``X`` by shuffled blocks of rows, so a
    :class:`numpy.memmap` of float16 vectors larger than memory trains without ever being copied whole or
    upcast; predictions are computed in chunks of rows with numpy alone, so the fitted model pickles small
    (its weights, float32) and loads and predicts on any CPU without torch.

    Parameters
    ----------
    tree : CategoryTree, optional
        The category tree whose leaves are the labels (ragged trees too). Without it, the labels of ``y``
        make a one-level tree: a plain softmax (or MLP) classifier.
    hidden_layer_sizes : tuple of int, default=()
        Widths of the hidden layers, as scikit-learn's ``MLPClassifier`` names them; ``()`` is one linear
        softmax per level on the (standardised) vectors.
    dropout : float, default=0.0
        Dropout after each hidden layer.
    alpha : float, default=1e-4
        L2 penalty ``alpha / 2 * ||W||^2`` on the weight matrices (not the biases), in the units of the mean loss.
    level_weights : sequence of float, optional
        Weight of each level's loss in the sum (top level first); defaults to 1 for every level.
    learning_rate : float, default=1e-3
        Adam's step size.
    batch_size : int, default=512
        Rows per minibatch.
    max_iter : int, default=50
        Most epochs.
    tol : float, default=1e-4
        Smallest fall of the monitored loss that counts as an improvement.
    n_iter_no_change : int, default=3
        Epochs without an improvement of ``tol`` that end training (of the training loss; with
        ``early_stopping``, of the validation loss).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the rows, stop when their loss stops falling and keep the weights
        of the best epoch.
    validation_fraction : float, default=0.1
        Share of the rows held out with ``early_stopping``.
    class_weight : dict, "balanced" or None, default=None
        Weights of the leaves, multiplied into the sample weights of every level's loss (``"balanced"``:
        ``n_samples / (n_classes * count)``, for long tails).
    label_smoothing : float, default=0.0
        Label smoothing of every level's cross-entropy.
    decision : {"path", "crm"}, default="path"
        How :meth:`predict` picks a leaf. ``"path"``: the most probable valid path (the largest leaf
        probability). ``"crm"``: the leaf with the lowest expected tree distance to the truth under the
        predicted probabilities (Karthik et al., ICLR 2021, "conditional risk minimisation"), which makes
        the mistakes milder at almost no cost in leaf accuracy; computed level by level from the levels'
        probabilities, never through a leaves x leaves matrix. Both decide each row on its own.
    device : str, default="auto"
        Torch device for training: ``"auto"`` picks CUDA, then MPS, then the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights, the dropout, the shuffling and the validation split.
    verbose : int, default=0
        A progress bar over the rows of each epoch and one log line per epoch.

    Attributes
    ----------
    tree_ : CategoryTree
        The tree used.
    classes_ : ndarray
        Every leaf of the tree, sorted: the columns of :meth:`predict_proba` (leaves unseen in training too).
    n_features_in_ : int
        Number of features seen in fit.
    layers_ : list of tuple of ndarray
        ``(W, b)`` float32 pairs on the raw features (the standardisation folded in): the hidden layers, then
        one pair per level of the tree.
    n_iter_ : int
        Epochs run.
    loss_curve_ : list of float
        Training loss (weighted sum of the levels' cross-entropies) per epoch.
    validation_scores_, validation_loss_curve_ : list of float or None
        Leaf accuracy and loss on the held-out rows per epoch (with ``early_stopping``).
    best_iteration_ : int or None
        The epoch whose weights were kept (with ``early_stopping``).

    See Also
    --------
    skproduct.HierarchicalClassifier : ``strategy="tree"`` reaches this head from there.
    skproduct.metrics.mistake_severity : How bad the mistakes are.

    Examples
    --------
    >>> import numpy as np
    >>> from skproduct import CategoryTree
    >>> from skproduct.heads import TreeHeadClassifier
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")], leaves=[10, 11, 20])
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([10, 11, 20], 50)
    >>> X = (rng.normal(size=(150, 3)) + np.repeat(np.eye(3) * 4, 50, axis=0)).astype(np.float16)
    >>> head = TreeHeadClassifier(tree=tree, learning_rate=0.05, max_iter=30, random_state=0).fit(X, y)
    >>> head.predict(X[[0, 60, 149]])
    array([10, 11, 20])
    >>> head.predict_level(X[[0, 149]], level=0).tolist()
    [('A',), ('B',)]
    >>> head.set_params(decision="crm").predict(X[[0, 149]])
    array([10, 20])
    """

    _parameter_constraints: dict = {
        "tree": [CategoryTree, None],
        "hidden_layer_sizes": [tuple, list],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "level_weights": ["array-like", None],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "decision": [StrOptions({"path", "crm"})],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        tree=None,
        *,
        hidden_layer_sizes=(),
        dropout=0.0,
        alpha=1e-4,
        level_weights=None,
        learning_rate=1e-3,
        batch_size=512,
        max_iter=50,
        tol=1e-4,
        n_iter_no_change=3,
        early_stopping=False,
        validation_fraction=0.1,
        class_weight=None,
        label_smoothing=0.0,
        decision="path",
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.tree = tree
        self.hidden_layer_sizes = hidden_layer_sizes
        self.dropout = dropout
        self.alpha = alpha
        self.level_weights = level_weights
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.decision = decision
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the per-level heads jointly by minibatch Adam, streaming rows from ``X``.

        Parameters
        ----------
        X : array-like or numpy.memmap of shape (n_samples, n_features)
            Vectors; float16, float32 and float64 are read as they are (never copied whole), other
            dtypes are converted.
        y : array-like of shape (n_samples,)
            Leaf labels of ``tree`` (or any labels without a tree).
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative row weights; rows of weight zero are left out.

        Returns
        -------
        self : TreeHeadClassifier
        """
        X, y = validate_data(self, X, y, dtype=_DTYPES, ensure_all_finite=False, copy=False)
        _check_finite(X)
        y = np.asarray(y)
        check_classification_targets(y)
        sizes = [int(s) for s in self.hidden_layer_sizes]
        if any(s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must hold positive ints, got {self.hidden_layer_sizes!r}")
        if self.tree is not None:
            tree = self.tree
            unknown = [v for v in np.unique(y) if v not in tree]
            if unknown:
                raise ValueError(
                    f"{len(unknown)} labels of y are not leaves of the tree, for example {unknown[:3]}: "
                    "pass the tree these labels come from"
                )
        else:
            tree = CategoryTree.one_level(np.unique(y))
        self.tree_ = tree
        self.classes_ = tree.leaves
        self._leaf_codes = tree.encode(self.classes_)
        codes = tree.encode(y)
        if len(np.unique(codes[:, -1])) < 2:
            raise ValueError(
                "TreeHeadClassifier needs samples of at least 2 classes in the data, but the data contains only "
                f"one class: {self.classes_[codes[0, -1]]!r}"
            )
        level_weights = None
        if self.level_weights is not None:
            level_weights = np.asarray(self.level_weights, dtype=np.float64)
            if level_weights.shape != (tree.depth,) or (level_weights < 0).any():
                raise ValueError(
                    f"level_weights must hold one non-negative weight per level ({tree.depth}), "
                    f"got {self.level_weights!r}"
                )
        sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        weight = sample_weight * self._leaf_weights(codes[:, -1], sample_weight)[codes[:, -1]]
        kept = np.flatnonzero(weight > 0)
        if len(np.unique(codes[kept, -1])) < 2:
            raise ValueError(
                "TreeHeadClassifier needs samples of at least 2 classes with a positive weight "
                "(sample_weight times class_weight), but only one class has any"
            )
        rows = None if len(kept) == len(weight) else kept
        rng = check_random_state(self.random_state)
        train, val = rows, None
        if self.early_stopping:
            positions = np.arange(len(weight)) if rows is None else rows
            train_at, val_at = holdout_split(codes[positions, -1], self.validation_fraction, rng)
            train, val = positions[train_at], positions[val_at]
        from ._tree_training import train_tree_head, weighted_standardisation

        mean, scale = weighted_standardisation(X, sample_weight, train)
        fit_rows = np.arange(len(weight)) if train is None else train
        priors = [
            np.bincount(codes[fit_rows, level], weights=weight[fit_rows], minlength=size) / weight[fit_rows].sum()
            for level, size in enumerate(tree.level_sizes)
        ]
        seed = int(rng.randint(np.iinfo(np.int32).max))

        result = train_tree_head(
            self, X=X, codes=codes.astype(np.int64, copy=False), weights=weight.astype(np.float32), train=train, val=val,
            mean=mean, scale=scale, level_sizes=tree.level_sizes, level_priors=priors,
            leaf_codes=self._leaf_codes, level_weights=level_weights, seed=seed,
        )
        self.layers_ = result.pop("layers")
        for name, value in result.items():
            setattr(self, name, value)
        return self

    def _leaf_weights(self, leaf_codes: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
        """Class weight of each leaf (0 for leaves unseen with ``"balanced"``)."""
        if self.class_weight is None:
            return np.ones(len(self.classes_))
        seen = np.unique(leaf_codes)
        weights = np.ones(len(self.classes_))
        if self.class_weight == "balanced":
            y = self.classes_[leaf_codes]
            weights[seen] = compute_class_weight("balanced", classes=self.classes_[seen], y=y,
                                                 sample_weight=sample_weight)
            return weights
        for label, value in self.class_weight.items():
            if label not in self.tree_:
                raise ValueError(f"class_weight names {label!r}, which is not a class (a leaf of the tree)")
            weights[self.tree_.leaf_positions([label])[0]] = value
        return weights

    # ------------------------------------------------------------- predict

    def _validated(self, X):
        check_is_fitted(self, "layers_")
        X = validate_data(self, X, reset=False, dtype=_DTYPES, ensure_all_finite=False, copy=False)
        return X

    def _chunks(self, X):
        n_leaves = len(self.classes_)
        step = max(1, _PREDICT_CELLS // max(n_leaves, self.n_features_in_))
        for start in range(0, X.shape[0], step):
            yield slice(start, min(start + step, X.shape[0]))

    def _leaf_scores(self, block: np.ndarray) -> np.ndarray:
        """Unnormalised leaf log-scores of the rows of ``block`` (float32): the leaf level's logits plus the
        log-probabilities of the leaf's ancestors at the levels above; a softmax over the leaves gives
        :meth:`predict_proba`, and the argmax is the most probable valid path."""
        if not np.isfinite(block).all():
            raise ValueError("Input X contains NaN or infinity; remove or impute those rows")
        h = np.asarray(block, dtype=np.float32)
        depth = self.tree_.depth
        hidden, heads = self.layers_[:-depth], self.layers_[-depth:]
        for W, b in hidden:
            h = h @ W
            h += b
            np.maximum(h, 0.0, out=h)
        W, b = heads[-1]
        score = h @ W  # the leaf level's codes are the leaves' positions: no gather
        score += b
        leaf_codes = self._leaf_codes
        for level, (W, b) in enumerate(heads[:-1]):
            score += _log_softmax32(h @ W + b)[:, leaf_codes[:, level]]
        return score

    def _leaf_proba(self, block: np.ndarray) -> np.ndarray:
        score = self._leaf_scores(block)
        score -= score.max(axis=1, keepdims=True)
        proba = np.exp(score, out=score).astype(np.float64)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of :meth:`predict_proba`, computed stably."""
        X = self._validated(X)
        out = np.empty((X.shape[0], len(self.classes_)))
        for rows in self._chunks(X):
            out[rows] = log_softmax(self._leaf_scores(X[rows]).astype(np.float64), axis=1)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Leaf probabilities over the tree's valid paths, ``(n_samples, n_leaves)`` in :attr:`classes_` order.

        Computed in chunks of rows, each row on its own.
        """
        X = self._validated(X)
        out = np.empty((X.shape[0], len(self.classes_)))
        for rows in self._chunks(X):
            out[rows] = self._leaf_proba(X[rows])
        return out

    def predict(self, X) -> np.ndarray:
        """The leaf of each row by the ``decision`` rule (always a leaf of the tree), in chunks of rows."""
        X = self._validated(X)
        out = np.empty(X.shape[0], dtype=np.intp)
        for rows in self._chunks(X):
            if self.decision == "path":
                out[rows] = np.argmax(self._leaf_scores(X[rows]), axis=1)
            else:
                out[rows] = np.argmin(expected_tree_distance(self._leaf_proba(X[rows]), self.tree_), axis=1)
            release_pages(X, rows.start, rows.stop)
        return self.classes_[out]

    def predict_proba_level(self, X, level: int) -> np.ndarray:
        """Probabilities of the nodes at ``level`` (columns in ``tree_.nodes(level)`` order)."""
        level = _check_level(level, self.tree_.depth)
        X = self._validated(X)
        indicator = _level_indicator(self.tree_, level)
        out = np.empty((X.shape[0], self.tree_.level_sizes[level]))
        for rows in self._chunks(X):
            out[rows] = np.asarray(indicator.T @ self._leaf_proba(X[rows]).T).T
        return out

    def predict_level(self, X, level: int) -> np.ndarray:
        """The most probable node at ``level``: path tuples, or leaf labels at the last level."""
        return self.tree_.decode(np.argmax(self.predict_proba_level(X, level), axis=1), level=level)

    def predict_top_k(self, X, k: int = 5) -> np.ndarray:
        """The ``k`` most probable leaves of each row, most probable first, shape ``(n_samples, k)``."""
        X = self._validated(X)
        k = min(int(k), len(self.classes_))
        out = np.empty((X.shape[0], k), dtype=np.intp)
        for rows in self._chunks(X):
            out[rows] = np.argsort(-self._leaf_scores(X[rows]), axis=1, kind="stable")[:, :k]
        return self.classes_[out]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.classifier_tags.multi_class = True
        return tags


def _log_softmax32(z: np.ndarray) -> np.ndarray:
    """Row log-softmax in place, in float32."""
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def _level_indicator(tree: CategoryTree, level: int) -> sparse.csr_matrix:
    """The sparse ``(n_leaves, n_nodes)`` map of each leaf onto its node at ``level``."""
    codes = tree.encode(tree.leaves)[:, level]
    n = len(codes)
    return sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, tree.level_sizes[level]))


def expected_tree_distance(proba: np.ndarray, tree: CategoryTree) -> np.ndarray:
    """For each row and each candidate leaf ``c``, the expected tree distance ``E[d(c, Y)]`` when ``Y`` follows the
    row's leaf probabilities (columns in ``tree.leaves`` order): ``(n_rows, n_leaves)``.

    The distance decomposes by level (:func:`~skproduct.metrics.tree_distance`: the number of levels, down to the
    deeper of the two leaves, whose nodes differ), so the expectation is a sum over levels: at a level the
    candidate reaches, one minus the probability of its node there; at a level below a (ragged) candidate's
    depth, the probability of the leaves deeper than that level. It costs ``n_rows x n_leaves x depth``, never a
    leaves x leaves matrix.

    Examples
    --------
    >>> from skproduct import CategoryTree
    >>> tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("B", "b1")])
    >>> expected_tree_distance(np.array([[0.4, 0.3, 0.3]]), tree).round(2).tolist()
    [[0.9, 1.0, 1.4]]
    """
    leaf_codes = tree.encode(tree.leaves)
    depths = tree.leaf_depths
    expected = np.zeros_like(proba)
    for level in range(tree.depth):
        if level == tree.depth - 1:
            node_mass = proba
        else:
            node_mass = np.asarray(_level_indicator(tree, level).T @ proba.T).T[:, leaf_codes[:, level]]
        reached = depths > level
        if reached.all():
            expected += 1.0 - node_mass
        else:
            deeper = proba[:, reached].sum(axis=1, keepdims=True)
            expected += np.where(reached, 1.0 - node_mass, deeper)
    return expected
