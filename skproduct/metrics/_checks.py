"""Input checks and weighted sums shared by the metrics of :mod:`skproduct.metrics`.

Leaf labels are checked to be 1-D and of matching length, mapped onto the tree
with :meth:`~skproduct.CategoryTree.encode` (a label outside the tree raises a
``KeyError`` naming the argument), and sample weights are checked to be finite,
non-negative and not all zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..taxonomy import CategoryTree

_AVERAGES = ("micro", "macro")


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
