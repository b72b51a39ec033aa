"""The report of ``evaluate``: its scores as a table, and the confusion matrix as an image (PNG, JPEG, SVG, PDF)."""

from __future__ import annotations

import sys

import numpy as np

from ._data import image_format, save

_CONFUSION_VALUES_UP_TO = 25  # classes beyond which the confusion matrix shows colours only


def print_scores(scores: dict, tree, file=None) -> None:
    """The scores as a table on ``file`` (stdout by default)."""
    rows = [("products", str(scores["n_products"])), ("accuracy", f"{scores['accuracy']:.4f}")]
    if "top_k" in scores:
        rows.append((f"top-{scores['top_k']} accuracy", f"{scores['top_k_accuracy']:.4f}"))
    if tree is not None:
        rows += [
            (f"level {level + 1} accuracy ({size} nodes)", f"{accuracy:.4f}")
            for level, (size, accuracy) in enumerate(zip(tree.level_sizes, scores["level_accuracy"], strict=True))
        ]
        rows.append(("hierarchical F1", f"{scores['hierarchical_f1']:.4f}"))
    if "confusion" in scores:
        rows.append(("confusion matrix", scores["confusion"]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=file or sys.stdout)


def save_confusion(path: str, labels: np.ndarray, predicted: np.ndarray, tree) -> None:
    """Save the confusion matrix of the top-level categories (of the classes without a tree) in the image format
    that the suffix of ``path`` names (``.png``, ``.jpg``, ``.svg``, ``.pdf``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    kind = image_format(path)
    if tree is not None:
        labels, predicted = (np.array([" > ".join(n) for n in tree.level_labels(y, level=0)]) for y in (labels, predicted))
        title = "top-level categories"
    else:
        labels, predicted = labels.astype(str), np.asarray(predicted).astype(str)
        title = "classes"
    names = np.unique(np.concatenate([labels, predicted]))
    side = min(4 + 0.3 * len(names), 40)
    figure = Figure(figsize=(side, side), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend, whatever pyplot's is
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=names, ax=figure.subplots(), xticks_rotation="vertical",
        include_values=len(names) <= _CONFUSION_VALUES_UP_TO, colorbar=False,
    )
    figure.axes[0].set_title(f"confusion matrix of the {title} ({len(labels)} products)")
    save(path, lambda f: figure.savefig(f, format=kind, dpi=100, bbox_inches="tight"))
