"""FineTuneClassifier: fine-tune a timm or open_clip backbone end to end as a scikit-learn classifier."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted

from .backbones import build_backbone, file_sha256, parse_backbone, resolve_preprocessing
from .cache import EmbeddingCache
from .embed import PICTURE_ESTIMATOR_CONSTRAINTS, ImageEmbedder, flatten_products, image_refs
from .exceptions import ImageDecodeError
from .images import describe_image_ref, picture_content
from .taxonomy import CategoryTree

logger = logging.getLogger(__name__)

__all__ = ["FineTuneClassifier"]

_PRODUCTS_PER_CHUNK = 4096  # products predicted together: bounds memory at pictures x classes of one chunk
_UNSET_FOR_CHECKPOINT_KEY = ("verbose", "num_workers", "checkpoint_dir", "device", "warm_start")


class FineTuneClassifier(ClassNamePrefixFeaturesOutMixin, ClassifierMixin, TransformerMixin, BaseEstimator):
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
    epochs : int, default=10
        Passes over the training pictures (with ``warm_start``, more passes).
    batch_size : int, default=32
        Pictures per step (and per forward pass when predicting).
    lr : float, default=3e-4
        Peak learning rate of AdamW.
    weight_decay : float, default=0.05
        AdamW's decoupled weight decay, on weight matrices and kernels only.
    warmup_fraction : float, default=0.1
        Fraction of each training phase's steps spent warming the learning
        rate up linearly; the rest follows a cosine decay to 1% of ``lr``.
    trainable : {"all", "head", "head_then_all"}, default="all"
        Train the whole network; only the new head(s) on a frozen backbone
        (its batch-norm statistics frozen too); or the head alone for
        ``head_epochs`` epochs and then everything, with a fresh warm-up
        (early stopping waits for the second phase).
    head_epochs : int, default=1
        The head-only epochs of ``trainable="head_then_all"``.
    augment : bool or callable, default=True
        Random augmentation of training pictures; ``False`` uses the
        prediction preprocessing; a callable (PIL image to normalised tensor,
        such as a torchvision transform) replaces the default.
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
        elsewhere.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the products, keep the epoch with
        the lowest validation loss, and stop after ``n_iter_no_change`` epochs
        without improvement. ``False`` trains on every product for ``epochs``
        epochs and keeps the last.
    validation_fraction : float, default=0.1
        Fraction of the products held out (stratified when every class has two
        products or more).
    n_iter_no_change : int, default=3
        Epochs without a lower validation loss before training stops.
    device : str, default="auto"
        ``"auto"`` picks CUDA, then MPS, then the CPU; or a torch device string.
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
        Continue training the fitted network for ``epochs`` more epochs
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
    device_, precision_ : str
        Where and in which precision the network runs.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dark = [rng.integers(0, 60, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    >>> light = [rng.integers(190, 255, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    >>> model = FineTuneClassifier("timm:test_resnet", pretrained=False, image_size=32, epochs=8, lr=1e-2,
    ...                            augment=False, early_stopping=False)
    >>> model.fit(dark + light, ["dark"] * 12 + ["light"] * 12).predict([dark[0], light[0]]).tolist()
    ['dark', 'light']
    >>> len(model.history_), model.transform([dark[0]]).shape
    (8, (1, 96))
    """

    _parameter_constraints: dict = {
        **PICTURE_ESTIMATOR_CONSTRAINTS,
        "tree": [CategoryTree, None],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
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
        epochs: int = 10,
        batch_size: int = 32,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        trainable: str = "all",
        head_epochs: int = 1,
        augment=True,
        label_smoothing: float = 0.1,
        class_weight: dict | str | None = None,
        image_size: int | None = None,
        precision: str = "auto",
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 3,
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
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.trainable = trainable
        self.head_epochs = head_epochs
        self.augment = augment
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.image_size = image_size
        self.precision = precision
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.num_workers = num_workers
        self.column = column
        self.on_error = on_error
        self.checkpoint_dir = checkpoint_dir
        self.warm_start = warm_start
        self.verbose = verbose
        self.random_state = random_state

    # -- fitting ----------------------------------------------------------------
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

        self._validate_params()
        y = self._labels(y)
        products = image_refs(X, self.column)
        if len(y) != len(products):
            raise ValueError(f"X has {len(products)} products but y has {len(y)} labels")
        continuing = self.warm_start and hasattr(self, "best_epoch_")
        if continuing:
            self._check_known_labels(y)
            self._resolve_device()
        elif hasattr(self, "best_epoch_"):
            del self.best_epoch_  # a refit that fails half-way must not leave a fitted-looking estimator
        refs, owner = flatten_products(products)
        checkpoint = self._checkpoint_path(refs, owner, y, continuing)
        if not continuing:  # a checkpoint to resume from replaces the starting weights: no download then
            self._start(y, download=checkpoint is None or not checkpoint.exists())
        codes = self.tree_.encode(y)
        train, valid = self._split(codes[:, -1], len(products), continuing)
        weights = self._product_weights(y, train)
        with torch.random.fork_rng(devices=self._rng_devices()):
            self._train(products, refs, owner, codes, self.tree_.leaf_positions(y), weights, train, valid, checkpoint)
        return self

    def _labels(self, y) -> np.ndarray:
        if y is None:
            raise ValueError("FineTuneClassifier requires y to be passed, but the target y is None.")
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        if y.ndim != 1:
            raise ValueError(f"y must hold one label per product (1-D); got shape {y.shape}")
        if self.tree is None:
            from sklearn.utils.multiclass import check_classification_targets

            check_classification_targets(y)
            if len(np.unique(y)) < 2:
                raise ValueError(f"y has one class ({y[0]!r}); a classifier needs two or more")
        return y

    def _start(self, y: np.ndarray, download: bool) -> None:
        """Resolve the backbone, device, precision, tree and classes of a fresh fit."""
        self._resolve_device()
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
            classes = np.unique(y)
            self.tree_ = CategoryTree.from_paths([(str(c),) for c in classes], leaves=classes)
        self.classes_ = self.tree_.leaves
        self.history_: list[dict] = []
        self._network = None
        self._network_state = None
        self._build_network(initial=download)

    def _resolve_device(self) -> None:
        """``device_`` and ``precision_`` from the parameters (again when continuing, perhaps on another machine)."""

        from ._torch_data import resolve_device, resolve_precision

        device = resolve_device(self.device)
        self.device_, self.precision_ = str(device), resolve_precision(self.precision, device)
        self._trained_on = (self.device_, self.precision_)
        if getattr(self, "_network", None) is not None:
            self._network = self._network.to(device)

    def _check_known_labels(self, y: np.ndarray) -> None:
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if len(unknown):
            raise ValueError(
                f"warm_start continues training on the fitted classes, but y has {len(unknown)} labels the model "
                f"does not know, for example {unknown[:3].tolist()}: fit without warm_start"
            )

    def _split(self, leaves: np.ndarray, n_products: int, continuing: bool) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation product positions; the validation set is kept over warm starts."""
        everything = np.arange(n_products)
        if not self.early_stopping:
            if not continuing:
                self.validation_products_ = None
            return everything, everything[:0]
        if continuing and self.validation_products_ is not None and self.validation_products_.max() < n_products:
            valid = self.validation_products_
            return np.setdiff1d(everything, valid), valid
        from sklearn.model_selection import train_test_split

        n_valid = max(1, round(self.validation_fraction * n_products))
        if n_products - n_valid < 2:
            raise ValueError(
                f"{n_products} products are too few to hold {self.validation_fraction:.0%} out for early stopping: "
                "pass more products or early_stopping=False"
            )
        counts = np.unique(leaves, return_counts=True)[1]
        stratify = leaves if counts.min() >= 2 and n_valid >= len(counts) else None
        train, valid = train_test_split(
            everything, test_size=n_valid, stratify=stratify, random_state=self.random_state
        )
        self.validation_products_ = np.sort(valid)
        return np.sort(train), self.validation_products_

    def _product_weights(self, y: np.ndarray, train: np.ndarray) -> np.ndarray:
        """The loss weight of each product: its class weight (1 without ``class_weight``)."""
        leaf = self.tree_.leaf_positions(y)
        self._prior = np.bincount(leaf[train], minlength=len(self.classes_)) / len(train)
        if self.class_weight is None:
            return np.ones(len(y))
        if isinstance(self.class_weight, dict):
            lookup = self.class_weight
        else:
            present = np.unique(y[train])
            per_class = compute_class_weight(self.class_weight, classes=present, y=y[train])
            lookup = dict(zip(present.tolist(), per_class, strict=True))
        return np.array([float(lookup.get(label, 1.0)) for label in y.tolist()])

    # -- the training loop --------------------------------------------------------
    def _train(
        self, products, refs, owner, codes, leaf_index, product_weights, train, valid, checkpoint: Path | None
    ) -> None:
        import torch
        from tqdm.auto import tqdm

        from ._torch_data import PictureDataset
        from ._training import (
            cpu_state,
            epoch_batches,
            learning_rate_factor,
            make_optimizer,
            train_epoch,
        )

        network = self._model()
        device = torch.device(self.device_)
        picture_rows = np.flatnonzero(np.isin(owner, train))
        dataset = PictureDataset(
            [refs[i] for i in picture_rows], self._training_transform(), self.on_error,
            self.preprocessing_.image_size, self.preprocessing_.draft_size, compact=self.num_workers > 0,
        )
        targets = torch.as_tensor(codes[owner[picture_rows]], dtype=torch.long)
        weights = torch.as_tensor(product_weights[owner[picture_rows]], dtype=torch.float32)
        valid_products = [products[i] for i in valid]
        optimizer = make_optimizer(network, self.lr, self.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision_ == "fp16")
        first_epoch = len(self.history_)
        state = {"epoch": 0, "best_loss": np.inf, "best_epoch": first_epoch, "best_state": None, "stale": 0}
        if first_epoch and len(valid):  # a continuation must beat the model it starts from
            state.update(best_loss=self._validate(valid_products, leaf_index[valid])[0], best_state=cpu_state(network))
        if checkpoint is not None and checkpoint.exists():
            self._resume(checkpoint, network, optimizer, scaler, state)
        n_steps = len(epoch_batches(len(picture_rows), self.batch_size, np.random.default_rng(0)))
        for epoch in range(state["epoch"], self.epochs):
            if state["stale"] >= self.n_iter_no_change:
                break
            frozen, phase_start, phase_epochs = self._phase(epoch, continuing=bool(first_epoch))
            seed = (self.random_state, first_epoch + epoch)
            torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
            batches = epoch_batches(len(picture_rows), self.batch_size, np.random.default_rng(seed))

            def lr_at(step, base=(epoch - phase_start) * n_steps, total=phase_epochs * n_steps):
                return self.lr * learning_rate_factor(base + step, total, self.warmup_fraction)

            start = time.perf_counter()
            progress = tqdm(
                total=len(picture_rows), unit="img", disable=not self.verbose,
                desc=f"epoch {first_epoch + epoch + 1}/{first_epoch + self.epochs}",
            )
            with progress:
                train_loss, n_pictures = train_epoch(
                    network, dataset, batches, targets, weights, optimizer, scaler, lr_at=lr_at,
                    frozen_backbone=frozen, label_smoothing=self.label_smoothing, device=device,
                    precision=self.precision_, num_workers=self.num_workers,
                    generator=torch.Generator().manual_seed(int(torch.initial_seed() % 2**63)), progress=progress,
                )
            seconds = time.perf_counter() - start
            valid_loss, valid_accuracy = self._validate(valid_products, leaf_index[valid])
            record = {
                "epoch": first_epoch + epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                "valid_accuracy": valid_accuracy, "lr": max(lr_at(s) for s in range(n_steps)),
                "images_per_second": n_pictures / seconds, "seconds": seconds,
            }
            self.history_.append(record)
            logger.info("epoch %(epoch)d: train loss %(train_loss).4f, valid loss %(valid_loss).4f, "
                        "valid accuracy %(valid_accuracy).4f, %(images_per_second).1f img/s", record)
            if len(valid) and valid_loss < state["best_loss"]:
                state.update(best_loss=valid_loss, best_epoch=record["epoch"], best_state=cpu_state(network), stale=0)
            elif len(valid) and not (frozen and self.trainable == "head_then_all"):
                state["stale"] += 1  # the head phase never stops training: the unfrozen network gets the patience
            state["epoch"] = epoch + 1
            if checkpoint is not None:
                self._save(checkpoint, network, optimizer, scaler, state)
        self._finish(network, state, bool(len(valid)))

    def _phase(self, epoch: int, continuing: bool) -> tuple[bool, int, int]:
        """``(backbone frozen, first epoch of the phase, epochs in the phase)`` of a fit's ``epoch``.

        A warm-started continuation of ``"head_then_all"`` trains everything
        at once: its head was trained already.
        """
        if self.trainable == "head":
            return True, 0, self.epochs
        if continuing:
            return False, 0, self.epochs
        if self.trainable == "head_then_all" and self.head_epochs < self.epochs:
            if epoch < self.head_epochs:
                return True, 0, self.head_epochs
            return False, self.head_epochs, self.epochs - self.head_epochs
        return self.trainable == "head_then_all", 0, self.epochs

    def _validate(self, products: list[list], leaf_index: np.ndarray) -> tuple[float, float]:
        """Product-level log loss and accuracy on the held-out products (``nan`` without any)."""
        if not len(leaf_index):
            return float("nan"), float("nan")
        loss, correct = 0.0, 0
        for start, proba in self._proba_chunks(products):
            truth = leaf_index[start : start + len(proba)]
            loss -= float(np.log(np.clip(proba[np.arange(len(proba)), truth], 1e-15, 1.0)).sum())
            correct += int((proba.argmax(axis=1) == truth).sum())
        return loss / len(leaf_index), correct / len(leaf_index)

    def _finish(self, network, state: dict, validated: bool) -> None:
        if validated and state["best_state"] is not None and state["best_epoch"] != self.history_[-1]["epoch"]:
            network.load_state_dict(state["best_state"])
            logger.info("kept the weights of epoch %d (lowest validation loss)", state["best_epoch"])
        self.best_epoch_ = state["best_epoch"] if validated and state["best_state"] is not None else len(self.history_)
        network.eval()

    # -- checkpoints ----------------------------------------------------------------
    def _checkpoint_path(self, refs, owner, y, continuing: bool) -> Path | None:
        """The checkpoint of this exact fit: its name hashes the parameters, the data and the starting point."""
        if self.checkpoint_dir is None:
            return None
        params = {
            name: (_tree_digest(value) if isinstance(value, CategoryTree) else repr(value))
            for name, value in self.get_params(deep=False).items()
            if name not in _UNSET_FOR_CHECKPOINT_KEY
        }
        if self.weights is not None:
            params["weights"] = file_sha256(self.weights)  # the file's content, not its name
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
        stats: dict = {}
        for ref in refs:  # streamed: files are named by path, size and time, never read here
            digest.update(_picture_identity(ref, stats))
        digest.update(owner.tobytes())
        digest.update(json.dumps([str(v) for v in y.tolist()]).encode())
        if continuing:  # the weights it starts from
            for name, value in self._model().state_dict().items():
                digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
        return Path(self.checkpoint_dir).expanduser() / f"finetune-{digest.hexdigest()[:24]}.pt"

    def _save(self, path: Path, network, optimizer, scaler, state: dict) -> None:

        from ._training import CHECKPOINT_FORMAT, cpu_state, save_checkpoint

        payload = {
            "format": CHECKPOINT_FORMAT,
            "network": cpu_state(network),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "history": self.history_,
            "state": {k: v for k, v in state.items() if k != "best_state"},
            "best_state": state["best_state"],
        }
        save_checkpoint(path, payload)

    def _resume(self, path: Path, network, optimizer, scaler, state: dict) -> None:
        from ._training import load_checkpoint

        payload = load_checkpoint(path)
        network.load_state_dict(payload["network"])
        optimizer.load_state_dict(payload["optimizer"])
        if payload["scaler"] and scaler.is_enabled():  # a checkpoint from another precision has none to give
            scaler.load_state_dict(payload["scaler"])
        self.history_ = list(payload["history"])
        state.update(payload["state"], best_state=payload["best_state"])
        state["best_loss"] = float(state["best_loss"])
        logger.info("resuming from %s: %d of %d epochs done", path, state["epoch"], self.epochs)

    # -- predicting -----------------------------------------------------------------
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, ``(n_products, n_classes)`` in :attr:`classes_` order: a product's pictures averaged.

        A product with no usable picture (all skipped by ``on_error="skip"``)
        gets the training class frequencies.
        """
        check_is_fitted(self, "best_epoch_")
        chunks = [proba for _, proba in self._proba_chunks(image_refs(X, self.column))]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each product (with a ``tree``, always a leaf).

        Products are predicted in chunks, so memory stays bounded whatever the
        number of products and classes.
        """
        check_is_fitted(self, "best_epoch_")
        best = [proba.argmax(axis=1) for _, proba in self._proba_chunks(image_refs(X, self.column))]
        return self.classes_[np.concatenate(best) if best else np.zeros(0, dtype=int)]

    def score(self, X, y, sample_weight=None) -> float:
        """Product accuracy; for per-level and hierarchical scores see :mod:`skproduct.metrics`."""
        return super().score(X, y, sample_weight=sample_weight)

    def transform(self, X) -> np.ndarray:
        """The fine-tuned backbone's pooled embeddings, float32 ``(n_products, n_features_out_)``: pictures averaged."""
        check_is_fitted(self, "best_epoch_")
        chunks = [
            means.astype(np.float32)
            for _, means in self._product_means(
                self._model().backbone, image_refs(X, self.column), "embedding", np.zeros(self.n_features_out_)
            )
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.n_features_out_), dtype=np.float32)

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
        from ._training import cpu_state, save_checkpoint

        check_is_fitted(self, "best_epoch_")
        path = Path(path)
        save_checkpoint(path, cpu_state(self._model().backbone))  # atomic: a temporary file, synced, renamed
        options = {"image_size": self.image_size, "column": self.column, "on_error": self.on_error,
                   "device": self.device, "precision": self.precision}
        return ImageEmbedder(self.backbone, pretrained=False, weights=path, **{**options, **params})

    def _proba_chunks(self, products: list[list]):
        """Yield ``(first product, probabilities)`` for consecutive chunks of ``_PRODUCTS_PER_CHUNK`` products."""
        return self._product_means(self._model().leaf_proba, products, "predicting", self._prior)

    def _product_means(self, module, products: list[list], what: str, fallback: np.ndarray):
        """Yield ``(first product, mean output of each product's used pictures)`` chunk by chunk.

        One pass of one DataLoader over every picture, in product order: a
        chunk of products is finished and yielded as soon as the pictures move
        past it, so memory holds one chunk's sums, whatever the number of
        products; a product without a usable picture gets ``fallback``.
        """
        import torch
        from tqdm.auto import tqdm

        from ._torch_data import PictureDataset, picture_batches

        refs, product_of_picture = flatten_products(products)
        chunk_of_picture, owner = np.divmod(product_of_picture, _PRODUCTS_PER_CHUNK)
        dataset = PictureDataset(
            refs, self.preprocessing_.transform(), self.on_error, self.preprocessing_.image_size,
            self.preprocessing_.draft_size, compact=self.num_workers > 0,
        )
        progress = tqdm(total=len(refs), unit="img", disable=not self.verbose, desc=f"{what} ({self.backbone})")
        self._model().eval()
        batches = picture_batches(
            module, dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            device=torch.device(self.device_), precision=self.precision_, on_error=self.on_error, progress=progress,
        )
        sums, counts, chunk = None, None, 0
        for positions, outputs, used, _ in batches:
            for part in np.unique(chunk_of_picture[positions]):
                while part > chunk:  # the pictures moved past this chunk: it is complete
                    yield chunk * _PRODUCTS_PER_CHUNK, _finish_means(sums, counts, fallback)
                    sums, counts, chunk = None, None, chunk + 1
                if sums is None:
                    size = min(_PRODUCTS_PER_CHUNK, len(products) - chunk * _PRODUCTS_PER_CHUNK)
                    sums, counts = np.zeros((size, outputs.shape[1])), np.zeros(size, dtype=np.int64)
                rows = (chunk_of_picture[positions] == part) & used
                np.add.at(sums, owner[positions[rows]], outputs[rows])
                counts += np.bincount(owner[positions[rows]], minlength=len(counts))
        if sums is not None:
            yield chunk * _PRODUCTS_PER_CHUNK, _finish_means(sums, counts, fallback)

    def _training_transform(self):
        if callable(self.augment):
            return self.augment
        if self.augment:
            from ._training import training_transform

            return training_transform(self.preprocessing_)
        return self.preprocessing_.transform()

    # -- the network ------------------------------------------------------------------
    def _build_network(self, initial: bool) -> None:
        """Build the network on the device: ``initial`` weights (pretrained, from ``weights`` or seeded), or seeded
        ones that a saved state (a pickle's or a checkpoint's) replaces."""
        import torch

        from ._training import ClassifierNetwork

        weights = None if self.weights is None or not initial else os.fspath(self.weights)
        backbone = build_backbone(
            parse_backbone(self.backbone), pretrained=self.pretrained and initial, weights=weights,
            image_size=self.image_size, seed=self.random_state,
        )
        if not hasattr(self, "n_features_out_") or self._network_state is None:
            size = self.preprocessing_.image_size
            with torch.inference_mode():
                self.n_features_out_ = int(backbone(torch.zeros(1, 3, size, size)).shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            network = ClassifierNetwork(
                backbone, self.n_features_out_, self.tree_.level_sizes, self.tree_.encode(self.classes_)
            )
        if self._network_state is not None:
            network.load_state_dict(self._network_state)
            self._network_state = None
        self._network = network.to(torch.device(self.device_), memory_format=torch.channels_last)

    def _model(self):
        if getattr(self, "_network", None) is None:
            self._build_network(initial=False)  # a restored model: the weights come from its state
        return self._network

    def _rng_devices(self) -> list:
        import torch

        return list(range(torch.cuda.device_count())) if self.device_.startswith("cuda") else []

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.classifier_tags.multi_class = True
        tags.non_deterministic = False
        return tags

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_

    # -- persistence ---------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        network = state.pop("_network", None)
        if network is not None:
            from ._training import cpu_state

            state["_network_state"] = cpu_state(network)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._network = None
        if hasattr(self, "device_"):
            from ._torch_data import device_available

            # where it was trained: a model that once ran on a CPU goes back to its GPU on a machine that has one
            self._trained_on = getattr(self, "_trained_on", (self.device_, self.precision_))
            device, precision = self._trained_on
            if device_available(device):
                self.device_, self.precision_ = device, precision
            else:
                logger.info("this model was trained on %s, which this machine lacks; it runs on the CPU", device)
                self.device_, self.precision_ = "cpu", "fp32"


def _finish_means(sums: np.ndarray, counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Divide each product's summed outputs by its pictures; products with none get ``fallback`` (with a warning)."""
    out = sums / np.maximum(counts, 1)[:, None]
    empty = counts == 0
    if empty.any():
        out[empty] = fallback
        logger.warning(
            "%d products had no usable picture (for example product %d of the chunk) and got the fallback",
            int(empty.sum()), int(np.flatnonzero(empty)[0]),
        )
    return out


def _picture_identity(ref, stats: dict) -> bytes:
    """What names a picture in a checkpoint's key: a file's path, size and modification time (a BSON picture's
    offset and length too), or an in-memory picture's content hash."""
    path = getattr(ref, "path", ref) if not isinstance(ref, (bytes, bytearray, memoryview)) else None
    if isinstance(path, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(path))
        if path not in stats:
            try:
                stat = os.stat(path)
                stats[path] = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                stats[path] = "missing"  # the bad-picture policy deals with it in training
        where = f":{ref.offset}:{ref.length}" if hasattr(ref, "offset") else ""
        return f"{path}:{stats[path]}{where}\n".encode()
    try:
        return EmbeddingCache.keys_for([picture_content(ref)])[0]
    except ImageDecodeError:
        return f"unreadable:{describe_image_ref(ref)}".encode()


def _tree_digest(tree: CategoryTree) -> str:
    return hashlib.sha256(tree.to_frame().to_csv(index=False).encode()).hexdigest()
