"""What a fine-tuning fit decides before it trains (no torch): labels checked, products held out, loss weights,
the phases of ``trainable``, and the stable description of its parameters that names its checkpoint."""

from __future__ import annotations

import hashlib
import math

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from .taxonomy import CategoryTree

__all__ = [
    "PRETRAINED_LEARNING_RATE",
    "SCRATCH_LEARNING_RATE",
    "check_known_labels",
    "check_labels",
    "phase",
    "product_weights",
    "resolve_learning_rate",
    "stable_repr",
    "validation_split",
]

#: Peak learning rates of ``learning_rate="auto"`` at a batch of 32 pictures, measured on fashion-small by
#: ``benchmarks/bench_finetune_defaults.py`` (figures in benchmarks/README.md): from the real ImageNet weights
#: (20 leaves, 2 epochs: 3e-4 scored 0.44, 1e-3 0.65, 3e-3 0.66; 1e-3 is kept, the rate of timm's fine-tuning
#: recipes at this batch, as longer fits favour smaller rates), and from random weights (4 leaves, 4 epochs: 3e-4
#: scored 0.67, 3e-3 0.80, 1e-2 0.82).
PRETRAINED_LEARNING_RATE = 1e-3
SCRATCH_LEARNING_RATE = 1e-2
_REFERENCE_BATCH = 32


def check_labels(y, tree: CategoryTree | None) -> np.ndarray:
    """``y`` as a 1-D array of labels (two classes or more without a tree).

    Examples
    --------
    >>> check_labels([["a"], ["b"]], None).tolist()
    ['a', 'b']
    """
    if y is None:
        raise ValueError("FineTuneClassifier requires y to be passed, but the target y is None.")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()
    if y.ndim != 1:
        raise ValueError(f"y must hold one label per product (1-D); got shape {y.shape}")
    if tree is None:
        from sklearn.utils.multiclass import check_classification_targets

        check_classification_targets(y)
        if len(np.unique(y)) < 2:
            raise ValueError(f"y has one class ({y[0]!r}); a classifier needs two or more")
    return y


def check_known_labels(y: np.ndarray, classes: np.ndarray) -> None:
    """A warm start continues on the fitted classes: any other label is an error that names it."""
    unknown = np.setdiff1d(np.unique(y), classes)
    if len(unknown):
        raise ValueError(
            f"warm_start continues training on the fitted classes, but y has {len(unknown)} labels the model "
            f"does not know, for example {unknown[:3].tolist()}: fit without warm_start"
        )


def validation_split(leaves: np.ndarray, fraction: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out product positions (:func:`~skproduct._training.holdout_split`), with a message about
    products when too few are left to train on."""
    from ._training import holdout_split

    train, valid = holdout_split(leaves, fraction, random_state, what="products")
    if len(train) < 2:
        raise ValueError(
            f"{len(leaves)} products are too few to hold {fraction:.0%} out for early stopping: "
            "pass more products or early_stopping=False"
        )
    return train, valid


def product_weights(tree: CategoryTree, n_classes: int, y: np.ndarray, train: np.ndarray,
                    class_weight) -> tuple[np.ndarray, np.ndarray]:
    """The loss weight of each product (its class weight; 1 without ``class_weight``) and the training prior."""
    leaf = tree.leaf_positions(y)
    prior = np.bincount(leaf[train], minlength=n_classes) / len(train)
    if class_weight is None:
        return np.ones(len(y)), prior
    if isinstance(class_weight, dict):
        lookup = class_weight
    else:
        present = np.unique(y[train])
        per_class = compute_class_weight(class_weight, classes=present, y=y[train])
        lookup = dict(zip(present.tolist(), per_class, strict=True))
    return np.array([float(lookup.get(label, 1.0)) for label in y.tolist()]), prior


def phase(trainable: str, head_epochs: int, max_iter: int, epoch: int, continuing: bool) -> tuple[bool, int, int]:
    """``(backbone frozen, first epoch of the phase, epochs in the phase)`` of a fit's ``epoch`` (0-based).

    A warm-started continuation of ``"head_then_all"`` trains everything at
    once: its head was trained already.

    Examples
    --------
    >>> [phase("head_then_all", 1, 3, epoch, False) for epoch in range(3)]
    [(True, 0, 1), (False, 1, 2), (False, 1, 2)]
    """
    if trainable == "head":
        return True, 0, max_iter
    if continuing:
        return False, 0, max_iter
    if trainable == "head_then_all" and head_epochs < max_iter:
        if epoch < head_epochs:
            return True, 0, head_epochs
        return False, head_epochs, max_iter - head_epochs
    return trainable == "head_then_all", 0, max_iter


def resolve_learning_rate(learning_rate, *, pretrained: bool, batch_size: int) -> float:
    """The peak learning rate a fit uses: ``learning_rate`` itself, or for ``"auto"`` the measured default.

    ``"auto"`` is :data:`PRETRAINED_LEARNING_RATE` when training starts from pretrained weights (a weights file or
    ``pretrained=True``) and :data:`SCRATCH_LEARNING_RATE` from random weights, both scaled by
    ``sqrt(batch_size / 32)`` (the square-root rule of adaptive optimisers: the gradient noise falls as the
    square root of the batch).

    Examples
    --------
    >>> resolve_learning_rate("auto", pretrained=True, batch_size=32)
    0.001
    >>> resolve_learning_rate("auto", pretrained=False, batch_size=128)
    0.02
    >>> resolve_learning_rate(1e-3, pretrained=False, batch_size=128)
    0.001
    """
    if learning_rate != "auto":
        return float(learning_rate)
    base = PRETRAINED_LEARNING_RATE if pretrained else SCRATCH_LEARNING_RATE
    return float(round(base * math.sqrt(batch_size / _REFERENCE_BATCH), 12))


def stable_repr(name: str, value) -> str:
    """A parameter as it names a checkpoint: trees by content; callables only with a stable identity.

    Examples
    --------
    >>> stable_repr("augment", True)
    'True'
    >>> stable_repr("augment", lambda image: image)
    Traceback (most recent call last):
    ...
    ValueError: augment=<lambda> has no stable identity, so this fit's checkpoint could not be found again after a restart: pass a module-level function or a transform object as augment, or checkpoint_dir=None
    """
    if isinstance(value, CategoryTree):
        return hashlib.sha256(value.to_frame().to_csv(index=False).encode()).hexdigest()
    if callable(value) and not isinstance(value, type):
        qualname = getattr(value, "__qualname__", None)
        if qualname is not None:  # a function: its module and name, when it can be found again
            if "<lambda>" in qualname or "<locals>" in qualname:
                raise ValueError(
                    f"{name}={qualname} has no stable identity, so this fit's checkpoint could not be found again "
                    f"after a restart: pass a module-level function or a transform object as {name}, or "
                    "checkpoint_dir=None"
                )
            return f"{value.__module__}.{qualname}"
        text = repr(value)
        if " at 0x" in text:
            raise ValueError(
                f"{name}={text} has no stable identity (its repr names a memory address), so this fit's checkpoint "
                "could not be found again: give it a __repr__ that describes it, or pass checkpoint_dir=None"
            )
        return text
    return repr(value)
