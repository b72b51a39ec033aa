"""TorchLinearClassifier: a multinomial softmax head trained with torch, predicting with numpy alone.

This module holds the estimator and the numpy helpers of its predictions; the torch training
that ``fit`` calls lives in :mod:`skproduct.heads._linear_training`.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .._compat import VersionStampMixin
from .._training import holdout_split
from ._linear_training import _train, _weighted_standardisation

__all__ = ["TorchLinearClassifier"]

# Rows per block when scoring: bounds the float64 temporaries of predict/predict_proba to ~32 MB.
_SCORE_BLOCK_VALUES = 1 << 22


class TorchLinearClassifier(VersionStampMixin, ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression (a softmax head) trained by minibatch Adam with torch.

    Meant for many classes and many rows (embeddings of product pictures over thousands of
    categories), where scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` holds
    ``n_samples x n_classes`` float64 arrays. Training runs on the GPU when there is one; the
    fitted model is plain numpy, so predicting needs no torch and a model fitted on a GPU
    loads anywhere.

    The objective is the (sample- and class-)weighted mean cross-entropy, with label smoothing,
    plus ``alpha / 2 * ||W||^2``. Features are standardised internally (weighted mean and
    standard deviation of the training rows), so ``alpha`` and ``learning_rate`` act on the
    standardised problem; ``coef_`` and ``intercept_`` describe the model on raw inputs.

    Parameters
    ----------
    alpha : float, default=1e-4
        Strength of the L2 penalty on the weights (never on the intercepts), in the units of the
        mean loss: ``alpha = 1 / (C * n_samples)`` matches a standardised
        ``LogisticRegression(C=C)``.
    learning_rate : float, default=1e-2
        Adam's step size. After a plateau of the training loss it is divided by 10, at most
        twice (see ``tol``); with ``early_stopping`` it stays constant. The name and meaning
        :class:`~skproduct.FineTuneClassifier` uses too.
    batch_size : int, default=1024
        Rows per minibatch (capped at the number of training rows).
    max_iter : int, default=100
        Most epochs (passes over the training rows), as scikit-learn's ``MLPClassifier`` names it.
    tol : float, default=1e-3
        Smallest improvement that counts: a fall of the training loss (the mean objective over an
        epoch) or, with ``early_stopping``, of the validation loss.
    n_iter_no_change : int, default=5
        Epochs without an improvement of ``tol`` that end training. Without early stopping, the
        first two such plateaus divide the learning rate by 10 and training goes on; the third
        ends it.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the rows (rounded up; stratified when every class can
        be split), compute their log loss after each epoch, stop after ``n_iter_no_change``
        epochs without an improvement of ``tol``, and keep the weights of the epoch with the
        lowest validation loss, as :class:`~skproduct.FineTuneClassifier` does. Off by default,
        as in scikit-learn's SGD and MLP estimators: a convex head rarely overfits.
    validation_fraction : float, default=0.1
        Share of the rows held out with ``early_stopping``.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes, multiplied into the sample weights: ``{label: weight}``, or
        ``"balanced"`` for ``n_samples / (n_classes * np.bincount(y))`` (counts weighted by
        ``sample_weight``).
    label_smoothing : float, default=0.0
        Share of each target spread uniformly over all classes (as in
        :func:`torch.nn.functional.cross_entropy`); makes probabilities less extreme.
    device : str, default="auto"
        Torch device for training: ``"auto"`` picks CUDA, then MPS, then the CPU; or any torch
        device string (``"cpu"``, ``"cuda:1"``).
    precision : {"auto", "fp32", "bf16"}, default="auto"
        dtype of the two matrix products of each training step (the logits and the weight
        gradient); the weights, Adam's state, the softmax and the sums stay float32. ``"auto"``
        picks bf16 where the device computes it natively (CUDA with bf16; CPUs with AMX or
        AVX512-BF16, as :func:`skproduct.image_pipeline.device.cpu_native_bf16` detects) and
        float32 elsewhere: at 2,000 classes it trains about 2x faster on such CPUs at the same
        accuracy (``benchmarks/bench_torch_head.py``). The training rows are then held in bf16
        on the device (half the memory). Prediction is always float64 numpy.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling of the rows and the validation split: the same seed on the same
        device gives the same coefficients.
    verbose : int, default=0
        Show a progress bar over epochs and log each epoch's loss (``logging`` at INFO).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, sorted.
    coef_ : ndarray of shape (n_classes, n_features), float32
        Weights on the raw features (one row per class, also for two classes).
    intercept_ : ndarray of shape (n_classes,), float32
        Intercepts on the raw features.
    n_features_in_ : int
        Number of features seen in fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of the features, when ``X`` had string column names.
    n_iter_ : int
        Epochs run.
    loss_curve_ : list of float
        Training objective (weighted cross-entropy plus penalty) averaged over each epoch.
    validation_scores_ : list of float or None
        Accuracy on the held-out rows after each epoch (weighted by the sample and class
        weights); None without ``early_stopping``.
    validation_loss_curve_ : list of float or None
        Log loss on the held-out rows after each epoch (weighted); None without
        ``early_stopping``. The weights kept are those of the epoch
        ``np.argmin(validation_loss_curve_)``.
    best_iteration_ : int or None
        The epoch (1-based) whose weights were kept with ``early_stopping``; None without.

    See Also
    --------
    sklearn.linear_model.LogisticRegression : the exact solver, for smaller problems.

    Notes
    -----
    The weights start from zero with intercepts at the log of the class frequencies, so a
    long-tailed problem starts at its prior. Rows with zero weight are dropped before training;
    a fit with zero weights on some rows is the fit without those rows. The gradient of the
    softmax cross-entropy is written by hand (no autograd graph), and the standardised float32
    training rows are copied to the device once per fit; each epoch draws one permutation and
    gathers its batches there. On the CPU, small problems (batch x classes x features below
    about 4 million) train on one torch thread, set for the fit and restored afterwards.

    The fitted estimator holds numpy arrays only; :meth:`predict_proba` computes each row on its
    own (in float64, in blocks of rows), so a row's probabilities never depend on the other rows
    of the batch.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from skproduct.heads.linear import TorchLinearClassifier
    >>> X, y = make_classification(n_samples=1000, n_features=8, n_informative=5,
    ...                            n_classes=3, random_state=0)
    >>> clf = TorchLinearClassifier(batch_size=100, random_state=0).fit(X, y)
    >>> clf.coef_.shape, clf.coef_.dtype
    ((3, 8), dtype('float32'))
    >>> clf.predict_proba(X[:2]).sum(axis=1)
    array([1., 1.])
    >>> bool(clf.score(X, y) > 0.7)
    True
    >>> clf.n_iter_ < clf.max_iter  # stopped on a plateau of the training loss
    True
    """

    _parameter_constraints: dict = {
        "alpha": [Interval(Real, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "device": [str],
        "precision": [StrOptions({"auto", "fp32", "bf16"})],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        alpha=1e-4,
        *,
        learning_rate=1e-2,
        batch_size=1024,
        max_iter=100,
        tol=1e-3,
        n_iter_no_change=5,
        early_stopping=False,
        validation_fraction=0.1,
        class_weight=None,
        label_smoothing=0.0,
        device="auto",
        precision="auto",
        random_state=None,
        verbose=0,
    ):
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.device = device
        self.precision = precision
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the head by minibatch Adam.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors (float32 is used for training; other dtypes are converted).
        y : array-like of shape (n_samples,)
            Class labels (numbers or strings).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row; rows of weight zero are left out.

        Returns
        -------
        self : TorchLinearClassifier
            The fitted estimator.
        """
        X, y = validate_data(self, X, y, dtype=np.float32, order="C")
        check_classification_targets(y)
        sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)

        encoder = LabelEncoder()
        y_enc = encoder.fit_transform(y)
        self.classes_ = encoder.classes_
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"TorchLinearClassifier needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {self.classes_.tolist()[0]!r}"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            class_weight = compute_class_weight(
                self.class_weight, classes=self.classes_, y=y, sample_weight=sample_weight
            )
        class_weight = np.where(np.isfinite(class_weight), class_weight, 0.0)
        weight = sample_weight * class_weight[y_enc]

        kept = np.flatnonzero(weight > 0)
        if len(np.unique(y_enc[kept])) < 2:
            raise ValueError(
                "TorchLinearClassifier needs samples of at least 2 classes with a positive weight "
                "(sample_weight times class_weight), but only one class has any"
            )
        if len(kept) < len(y_enc):
            X, y_enc, weight, sample_weight = X[kept], y_enc[kept], weight[kept], sample_weight[kept]

        rng = check_random_state(self.random_state)
        if self.early_stopping:
            train, val = holdout_split(y_enc, self.validation_fraction, rng)
        else:
            train, val = None, None  # all rows, without copying X

        mean, scale = _weighted_standardisation(X, sample_weight, train)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        result = _train(
            self,
            X=X,
            y=y_enc,
            weight=weight,
            train=train,
            val=val,
            mean=mean,
            scale=scale,
            n_classes=n_classes,
            seed=seed,
        )
        W, b = result.pop("weights")
        coef = W / scale[None, :]
        self.coef_ = coef.astype(np.float32)
        self.intercept_ = (b - coef @ mean).astype(np.float32)
        for name, value in result.items():
            setattr(self, name, value)
        return self

    # ------------------------------------------------------------- predict

    def _validated(self, X):
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])

    def _score_blocks(self, X):
        """``(rows, scores)`` over blocks of the validated ``X``.

        Scores are computed in float64, each row on its own, in blocks that bound the temporaries to ~32 MB.
        """
        coef = self.coef_.T.astype(np.float64)
        intercept = self.intercept_.astype(np.float64)
        n = X.shape[0]
        step = max(1, _SCORE_BLOCK_VALUES // max(len(self.classes_), self.n_features_in_))
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            yield rows, X[rows].astype(np.float64, copy=False) @ coef + intercept

    def _map_scores(self, X, transform, width):
        X = self._validated(X)
        out = np.empty((X.shape[0], width) if width else X.shape[0], dtype=np.float64)
        for rows, scores in self._score_blocks(X):
            out[rows] = transform(scores)
        return out

    def decision_function(self, X):
        """Class scores ``X @ coef_.T + intercept_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to score.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes), or (n_samples,) for two classes
            For two classes, the score of ``classes_[1]`` minus that of ``classes_[0]``.
        """
        check_is_fitted(self)
        if len(self.classes_) == 2:
            return self._map_scores(X, _binary_score, 0)
        return self._map_scores(X, _identity, len(self.classes_))

    def predict_proba(self, X):
        """Probabilities of the classes (softmax of the scores; rows sum to 1).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to classify.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        check_is_fitted(self)
        if len(self.classes_) == 2:
            return self._map_scores(X, _binary_proba, 2)
        return self._map_scores(X, _softmax_rows, len(self.classes_))

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed stably.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to classify.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        check_is_fitted(self)
        if len(self.classes_) == 2:
            return self._map_scores(X, _binary_log_proba, 2)
        return self._map_scores(X, _log_softmax_rows, len(self.classes_))

    def predict(self, X):
        """Most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to classify.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        check_is_fitted(self)
        X = self._validated(X)
        best = [scores.argmax(axis=1) for _, scores in self._score_blocks(X)]
        return self.classes_[np.concatenate(best)]

    def __setstate__(self, state):
        from .._compat import upgrade_torch_linear_state

        super().__setstate__(upgrade_torch_linear_state(state))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.classifier_tags.multi_class = True
        return tags


# ---------------------------------------------------------------- prediction helpers (numpy)


def _identity(scores):
    return scores


def _binary_score(scores):
    return scores[:, 1] - scores[:, 0]


def _binary_proba(scores):
    d = scores[:, 1] - scores[:, 0]
    return np.column_stack([expit(-d), expit(d)])


def _binary_log_proba(scores):
    d = scores[:, 1] - scores[:, 0]
    return np.column_stack([log_expit(-d), log_expit(d)])


def _softmax_rows(scores):
    return softmax(scores, axis=1)


def _log_softmax_rows(scores):
    return log_softmax(scores, axis=1)
