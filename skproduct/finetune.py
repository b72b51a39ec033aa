"""FineTuneClassifier: fine-tune a timm or open_clip backbone end to end as a scikit-learn classifier.

The estimator holds the parameters, the validation and the scikit-learn API;
pictures become tensors in :mod:`skproduct.image_pipeline`, epochs run in
:mod:`skproduct._training` (a trainer made of parts), and the network, the
augmentation and one epoch's steps live in :mod:`skproduct._finetune_parts`.
"""

from __future__ import annotations

import logging
import os
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassifierMixin,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .backbones import build_backbone, file_sha256, parse_backbone, resolve_preprocessing
from .embed import ImageEmbedder
from .image_pipeline import IMAGE_ESTIMATOR_CONSTRAINTS, ImageEstimatorMixin, flatten_products, pool_products
from .taxonomy import CategoryTree

logger = logging.getLogger(__name__)

__all__ = ["FineTuneClassifier"]

# Parameters that do not change what a fit computes, left out of its checkpoint's name.
_UNSET_FOR_CHECKPOINT_KEY = ("verbose", "num_workers", "checkpoint_dir", "device", "warm_start", "pooling")


class FineTuneClassifier(ImageEstimatorMixin, ClassNamePrefixFeaturesOutMixin, ClassifierMixin, TransformerMixin,
                         BaseEstimator):
    """Fine-tune a backbone and a new classification head on product pictures.

    ``X`` is what :class:`~skproduct.ImageEmbedder` takes: a DataFrame from
    :func:`~skproduct.io.read_bson` or :func:`~skproduct.io.read_table`, or a
    sequence of picture references, one or several pictures per product.
    Training uses every picture with its product's label; prediction averages
    the probabilities of a product's pictures. With a ``tree``, the network
    gets one head per level, trained on the sum of the levels' losses, and
    predictions combine the levels over the tree's valid paths only.

    Training runs AdamW with a linear warm-up and a cosine decay, with
    augmentation (random resized crops, horizontal flips, rotations and shifts),
    label smoothing and, on CUDA, bf16 (or fp16) autocast and channels-last
    memory. A held-out fraction of the products picks the best epoch and
    stops training when it no longer improves.

    Parameters
    ----------
    backbone : str, default="timm:resnet50"
        ``"timm:<model>"`` or ``"open_clip:<model>/<pretrained tag>"``, as for
        :class:`~skproduct.ImageEmbedder`.
    pretrained : bool, default=True
        Start from downloaded pretrained weights (offline this fails with an
        error that says how to pass ``weights``); ``False`` trains from random
        weights seeded by ``random_state``.
    weights : str or path-like, optional
        A local weights file for the backbone; wins over ``pretrained``.
    tree : CategoryTree, optional
        The category tree whose leaves are the labels: one head per level,
        predictions always on a valid path, and :attr:`classes_` holds every
        leaf of the tree.
    max_iter : int, default=10
        Epochs: passes over the training pictures (with ``warm_start``, more
        passes). Named as scikit-learn's ``MLPClassifier`` names it.
    batch_size : int, default=32
        Pictures per step (and per forward pass when predicting).
    learning_rate : float or "auto", default="auto"
        Peak learning rate of AdamW. ``"auto"``: 1e-3 when training starts
        from pretrained weights (``weights`` or ``pretrained=True``) and 1e-2
        from random weights, times ``sqrt(batch_size / 32)``; the rate used
        is :attr:`learning_rate_`. Measured by
        ``benchmarks/bench_finetune_defaults.py`` on fashion-small: from
        random weights 0.82 against 0.67 for the former default 3e-4 (4
        leaves, 4 epochs), from the real ImageNet weights 0.65 against 0.44
        (20 leaves, 2 epochs).
    weight_decay : float, default=0.05
        AdamW's decoupled weight decay, on weight matrices and kernels only.
    warmup_fraction : float, default=0.1
        Fraction of each training phase's steps spent warming the learning
        rate up linearly; the rest follows a cosine decay to 1% of ``learning_rate``.
    trainable : {"all", "head", "head_then_all"}, default="all"
        Train the whole network; only the new head(s) on a frozen backbone
        (its batch-norm statistics frozen too); or the head alone for
        ``head_epochs`` epochs and then everything, with a fresh warm-up
        (early stopping waits for the second phase).
    head_epochs : int, default=1
        The head-only epochs of ``trainable="head_then_all"``.
    augment : bool or callable, default=True
        Random augmentation of training pictures; ``False`` uses the
        prediction preprocessing (better for short fits: with 2 to 4 epochs
        on 600 products, ``False`` scored 8 points higher from pretrained
        and from random weights in ``bench_finetune_defaults.py``); a callable (PIL image to normalised tensor,
        such as a torchvision transform) replaces the default. With a
        ``checkpoint_dir``, the callable must have a stable identity (a
        module-level function or a transform object; not a lambda).
    label_smoothing : float, default=0.1
        Label smoothing of the cross-entropy (of every level's).
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes (leaves) in the loss: a dict gives the weight
        of the classes it names (1 for the others); ``"balanced"`` weighs
        them inversely to their frequency (the long tail).
    image_size : int, optional
        Input side in pixels; defaults to the backbone's own.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        ``"auto"``: bf16 (or fp16 with loss scaling) autocast on CUDA, fp32
        elsewhere; ``"bf16"`` also runs on CPUs. Fixed at fit; later calls
        keep it wherever their device runs it.
    pooling : {"mean", "max"}, default="mean"
        How a product's pictures are combined in :meth:`predict_proba` (max
        probabilities are renormalised) and :meth:`transform`.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the products, keep the epoch with
        the lowest validation loss, and stop after ``n_iter_no_change`` epochs
        without an improvement of more than ``tol``. ``False`` trains on every
        product for ``max_iter`` epochs and keeps the last. On by default
        (unlike :class:`~skproduct.TorchLinearClassifier`'s): a fine-tuned
        network overfits within a few epochs, a convex head does not.
    validation_fraction : float, default=0.1
        Fraction of the products held out (rounded up, as scikit-learn's
        ``train_test_split`` does; stratified when every class can be split).
    n_iter_no_change : int, default=3
        Epochs without an improvement of the validation loss before training stops.
    tol : float, default=1e-4
        The smallest fall of the validation loss that counts as an improvement.
    device : str, default="auto"
        ``"auto"`` picks CUDA, then MPS, then the CPU; or a torch device string.
        Decided at every call: ``set_params(device=...)`` moves a fitted model.
    num_workers : int, default=0
        DataLoader worker processes that decode and augment pictures.
    column : str, optional
        The DataFrame column holding the pictures (default ``"images"``, then
        ``"image"``).
    on_error : {"raise", "skip", "blank"}, default="raise"
        The policy for pictures that do not decode
        (:class:`~skproduct.images.BadImagePolicy`); skipped pictures do not
        count in the loss, and a product with no usable picture is predicted
        with the training class frequencies.
    checkpoint_dir : str or path-like, optional
        Where a checkpoint is written atomically after every epoch. A ``fit``
        that was killed resumes from the last finished epoch when it is run
        again with the same parameters and data (the checkpoint's name hashes
        the parameters, the pictures' paths, sizes and modification times or
        in-memory contents, the labels, and a warm start's starting weights,
        so grid-search candidates never share one); a finished fit's
        checkpoint makes the same fit instant. Remove the folder to retrain.
    warm_start : bool, default=False
        Continue training the fitted network for ``max_iter`` more epochs
        (labels must be among :attr:`classes_`), on the whole network, with a
        new optimiser and schedule (warm-up included) and the same held-out
        products; the model it starts from is kept unless an epoch beats its
        validation loss.
    verbose : int, default=0
        ``> 0`` shows a progress bar per epoch and logs each epoch.
    random_state : int, default=0
        Seeds the random weights, the split, the order of the pictures and the
        augmentation: two fits with the same seed on the CPU are identical.

    Attributes
    ----------
    classes_ : ndarray
        The labels (with a ``tree``, every leaf), sorted; the columns of
        :meth:`predict_proba`.
    tree_ : CategoryTree
        The tree used (``tree``, or a one-level tree of the classes).
    learning_rate_ : float
        The peak learning rate of the last fit (``learning_rate``, or what
        ``"auto"`` chose).
    history_ : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``valid_loss`` and
        ``valid_accuracy`` (product level; ``nan`` without early stopping),
        ``lr`` (the peak of the epoch), ``images_per_second`` and ``seconds``.
    best_epoch_ : int
        The epoch (1-based, as in :attr:`history_`) whose weights were kept.
    validation_products_ : ndarray or None
        Positions of the held-out products in the ``X`` of the first ``fit``.
    n_features_out_ : int
        The size of the embeddings :meth:`transform` returns.
    preprocessing_ : Preprocessing
        The preprocessing used for prediction (and for training without
        augmentation).
    n_iter_ : int
        Epochs run (over all warm starts).
    device_, precision_ : str
        Where and in which precision the network was trained.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dark = [rng.integers(0, 60, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    >>> light = [rng.integers(190, 255, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    >>> model = FineTuneClassifier("timm:test_resnet", pretrained=False, image_size=32, max_iter=8,
    ...                            learning_rate=1e-2, augment=False, early_stopping=False)
    >>> model.fit(dark + light, ["dark"] * 12 + ["light"] * 12).predict([dark[0], light[0]]).tolist()
    ['dark', 'light']
    >>> len(model.history_), model.transform([dark[0]]).shape
    (8, (1, 96))
    """

    _parameter_constraints: dict = {
        **IMAGE_ESTIMATOR_CONSTRAINTS,
        "tree": [CategoryTree, None],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "warmup_fraction": [Interval(Real, 0, 1, closed="left")],
        "trainable": [StrOptions({"all", "head", "head_then_all"})],
        "head_epochs": [Interval(Integral, 1, None, closed="left")],
        "augment": ["boolean", callable],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "checkpoint_dir": [str, os.PathLike, None],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        backbone: str = "timm:resnet50",
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        tree: CategoryTree | None = None,
        max_iter: int = 10,
        batch_size: int = 32,
        learning_rate: float | str = "auto",
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        trainable: str = "all",
        head_epochs: int = 1,
        augment=True,
        label_smoothing: float = 0.1,
        class_weight: dict | str | None = None,
        image_size: int | None = None,
        precision: str = "auto",
        pooling: str = "mean",
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 3,
        tol: float = 1e-4,
        device: str = "auto",
        num_workers: int = 0,
        column: str | None = None,
        on_error: str = "raise",
        checkpoint_dir: str | os.PathLike | None = None,
        warm_start: bool = False,
        verbose: int = 0,
        random_state: int = 0,
    ):
        self.backbone = backbone
        self.pretrained = pretrained
        self.weights = weights
        self.tree = tree
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.trainable = trainable
        self.head_epochs = head_epochs
        self.augment = augment
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.image_size = image_size
        self.precision = precision
        self.pooling = pooling
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.device = device
        self.num_workers = num_workers
        self.column = column
        self.on_error = on_error
        self.checkpoint_dir = checkpoint_dir
        self.warm_start = warm_start
        self.verbose = verbose
        self.random_state = random_state

    # -- fitting ----------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fine-tune the network on the products ``X`` with labels ``y``.

        Parameters
        ----------
        X : DataFrame or sequence
            Products: a DataFrame with a picture column, or a sequence of
            picture references (or lists of them).
        y : array-like of shape (n_products,)
            Labels (with a ``tree``, leaves of the tree).

        Returns
        -------
        self
        """
        import torch

        from ._checkpoints import usable_checkpoint
        from ._finetune_parts import train_network
        from ._finetune_setup import (
            check_known_labels,
            check_labels,
            product_weights,
            resolve_learning_rate,
            validation_split,
        )

        y = check_labels(y, self.tree)
        products = self._products(X)
        if len(y) != len(products):
            raise ValueError(f"X has {len(products)} products but y has {len(y)} labels")
        continuing = self.warm_start and hasattr(self, "best_epoch_")
        if continuing:
            check_known_labels(y, self.classes_)
        elif hasattr(self, "best_epoch_"):
            del self.best_epoch_  # a refit that fails half-way must not leave a fitted-looking estimator
        device = self._fit_device()
        refs, owner = flatten_products(products)
        checkpoint = self._checkpoint_path(refs, owner, y, continuing, device)
        if not continuing:  # a checkpoint to resume from replaces the starting weights: no download then
            self._start(y, download=checkpoint is None or usable_checkpoint(checkpoint) is None)
        codes = self.tree_.encode(y)
        if not self.early_stopping:
            train, valid = np.arange(len(products)), np.arange(0)
            self.validation_products_ = self.validation_products_ if continuing else None
        elif continuing and self.validation_products_ is not None and self.validation_products_.max() < len(y):
            valid = self.validation_products_  # the same held-out products over warm starts
            train = np.setdiff1d(np.arange(len(products)), valid)
        else:
            train, valid = validation_split(codes[:, -1], self.validation_fraction, self.random_state)
            self.validation_products_ = valid
        weights, self._prior = product_weights(self.tree_, len(self.classes_), y, train, self.class_weight)
        self.learning_rate_ = resolve_learning_rate(
            self.learning_rate, pretrained=self.weights is not None or self.pretrained, batch_size=self.batch_size
        )
        valid_products, valid_leaves = [products[i] for i in valid], self.tree_.leaf_positions(y)[valid]
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if device.type == "cuda" else []):
            history, self.best_epoch_ = train_network(
                self, self._model(device), refs, owner, codes, weights, train, bool(len(valid)),
                lambda: self._validate(valid_products, valid_leaves, device), checkpoint, device,
            )
        self.history_ = self.history_ + history
        self.n_iter_ = len(self.history_)
        return self

    def _start(self, y: np.ndarray, download: bool) -> None:
        """Resolve the preprocessing, tree and classes of a fresh fit, and build the network."""
        self.preprocessing_ = resolve_preprocessing(parse_backbone(self.backbone), self.image_size)
        if self.tree is not None:
            unknown = sorted({str(v) for v in np.unique(y) if v not in self.tree})
            if unknown:
                raise ValueError(
                    f"{len(unknown)} labels of y are not leaves of the tree, for example {unknown[:3]}: "
                    "pass the tree these labels come from"
                )
            self.tree_ = self.tree
        else:
            self.tree_ = CategoryTree.one_level(np.unique(y))
        self.classes_ = self.tree_.leaves
        self.history_: list[dict] = []
        self._network, self._network_state = None, None
        self._build_network(initial=download)

    def _validate(self, products: list[list], leaf_index: np.ndarray, device) -> tuple[float, float]:
        """Product-level log loss and accuracy on the held-out products (``nan`` without any)."""
        if not len(leaf_index):
            return float("nan"), float("nan")
        loss, correct = 0.0, 0
        for start, proba in self._proba_chunks(products, device, self.precision_):
            truth = leaf_index[start : start + len(proba)]
            loss -= float(np.log(np.clip(proba[np.arange(len(proba)), truth], 1e-15, 1.0)).sum())
            correct += int((proba.argmax(axis=1) == truth).sum())
        return loss / len(leaf_index), correct / len(leaf_index)

    def _checkpoint_path(self, refs, owner, y, continuing: bool, device) -> Path | None:
        """The checkpoint of this exact fit (:func:`~skproduct._checkpoints.checkpoint_name`)."""
        if self.checkpoint_dir is None:
            return None
        from ._checkpoints import checkpoint_name
        from ._finetune_setup import stable_repr

        params = {
            name: stable_repr(name, value)
            for name, value in self.get_params(deep=False).items()
            if name not in _UNSET_FOR_CHECKPOINT_KEY
        }
        if self.weights is not None:
            params["weights"] = file_sha256(self.weights)  # the file's content, not its name
        start = self._model(device).state_dict() if continuing else None
        name = checkpoint_name(params, refs, owner, y.tolist(), start_weights=start)
        return Path(self.checkpoint_dir).expanduser() / name

    # -- predicting -----------------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, ``(n_products, n_classes)`` in :attr:`classes_` order: a product's pictures pooled.

        A product with no usable picture (all skipped by ``on_error="skip"``)
        gets the training class frequencies.
        """
        check_is_fitted(self, "best_epoch_")
        chunks = [proba for _, proba in self._proba_chunks(self._products(X), *self._call_device())]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each product (with a ``tree``, always a leaf).

        Products are predicted in chunks, so memory stays bounded whatever the
        number of products and classes.
        """
        check_is_fitted(self, "best_epoch_")
        best = [proba.argmax(axis=1) for _, proba in self._proba_chunks(self._products(X), *self._call_device())]
        return self.classes_[np.concatenate(best) if best else np.zeros(0, dtype=int)]

    def transform(self, X) -> np.ndarray:
        """The fine-tuned backbone's pooled embeddings, float32 ``(n_products, n_features_out_)``."""
        check_is_fitted(self, "best_epoch_")
        device, precision = self._call_device()
        out = np.zeros((0, self.n_features_out_), dtype=np.float32)
        chunks = [rows.astype(np.float32) for _, rows in self._pooled(
            self._model(device).backbone, self._products(X), device, precision, "embedding", 0.0, "a zero vector"
        )]
        return np.concatenate(chunks) if chunks else out

    def export_embedder(self, path: str | os.PathLike, **params) -> ImageEmbedder:
        """Save the fine-tuned backbone's weights to ``path`` and return an :class:`~skproduct.ImageEmbedder` on them.

        The embedder gives the same vectors as :meth:`transform` and, unlike
        it, can keep them in an :class:`~skproduct.EmbeddingCache` (its
        fingerprint hashes the weights file), so that heads fitted on the
        fine-tuned features in a grid search never extract twice.

        Parameters
        ----------
        path : str or path-like
            The weights file to write (a torch state dict).
        **params
            Further :class:`~skproduct.ImageEmbedder` parameters, such as
            ``cache`` or ``batch_size``.
        """
        from ._checkpoints import cpu_state, save_checkpoint

        check_is_fitted(self, "best_epoch_")
        path = Path(path)
        save_checkpoint(path, cpu_state(self._model(self._call_device()[0]).backbone))
        options = {"image_size": self.image_size, "column": self.column, "on_error": self.on_error,
                   "device": self.device, "precision": self.precision_, "pooling": self.pooling}
        # precision_, not precision: "auto" may choose differently for extraction (bf16 on CPUs with AMX)
        return ImageEmbedder(self.backbone, pretrained=False, weights=path, **{**options, **params})

    def _proba_chunks(self, products: list[list], device, precision: str):
        """Yield ``(first product, probabilities)`` chunk by chunk."""
        chunks = self._pooled(self._model(device).leaf_proba, products, device, precision, "predicting",
                              self._prior, "the training class frequencies")
        for start, proba in chunks:
            if self.pooling == "max":
                proba = proba / proba.sum(axis=1, keepdims=True)
            yield start, proba

    def _pooled(self, module, products, device, precision: str, what: str, fallback, fallback_name: str):
        """Run ``module`` over every picture of ``products`` and pool per product (one pass, chunk by chunk)."""
        from .image_pipeline.data import run_module

        refs, owner = flatten_products(products)
        self._model(device).eval()
        batches = run_module(
            module, refs, self.preprocessing_, batch_size=self.batch_size, num_workers=self.num_workers,
            device=device, precision=precision, on_error=self.on_error, verbose=self.verbose,
            desc=f"{what} ({self.backbone})",
        )
        outputs = ((positions, out, used) for positions, out, used, _ in batches)
        return pool_products(outputs, owner, how=self.pooling, fallback=fallback, fallback_name=fallback_name)

    def _training_transform(self):
        if callable(self.augment):
            return self.augment
        if self.augment:
            from ._finetune_parts import training_transform

            return training_transform(self.preprocessing_)
        return self.preprocessing_.transform()

    # -- the network ------------------------------------------------------------------
    def _build_network(self, initial: bool) -> None:
        """Build the network: ``initial`` weights (pretrained, from ``weights`` or seeded), or seeded ones that a
        saved state (a pickle's or a checkpoint's) replaces."""
        import torch

        from ._finetune_parts import ClassifierNetwork
        from .image_pipeline.data import feature_size

        weights = None if self.weights is None or not initial else os.fspath(self.weights)
        backbone = build_backbone(
            parse_backbone(self.backbone), pretrained=self.pretrained and initial, weights=weights,
            image_size=self.image_size, seed=self.random_state,
        )
        if not hasattr(self, "n_features_out_") or self._network_state is None:
            self.n_features_out_ = feature_size(backbone, self.preprocessing_.input_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            network = ClassifierNetwork(
                backbone, self.n_features_out_, self.tree_.level_sizes, self.tree_.encode(self.classes_)
            )
        if self._network_state is not None:
            network.load_state_dict(self._network_state)
            self._network_state = None
        self._network, self._network_device = network, None

    def _model(self, device=None):
        """The network on ``device`` (by default the call's; built from its saved state on first use after loading)."""
        import torch

        if device is None:
            device = self._call_device()[0]
        if getattr(self, "_network", None) is None:
            self._build_network(initial=False)
        if self._network_device != device:
            self._network = self._network.to(device, memory_format=torch.channels_last)
            self._network_device = device
        return self._network

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

    # -- persistence ---------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        network = state.pop("_network", None)
        state.pop("_network_device", None)
        if network is not None:
            from ._checkpoints import cpu_state

            state["_network_state"] = cpu_state(network)
        return state

    def __setstate__(self, state):
        from ._compat import upgrade_finetune_state

        super().__setstate__(upgrade_finetune_state(state))
        self._network, self._network_device = None, None
