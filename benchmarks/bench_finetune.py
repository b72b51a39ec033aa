"""Benchmark :class:`skproduct.FineTuneClassifier` against skorch and frozen-feature baselines on fashion-small.

fashion-small (``../shared/data/fashion-small``: 44,072 real catalogue photos,
one per product, tree 7 / 47 / 168) is split once into a fixed training and
held-out set (``--test-fraction``, default 0.2, random with ``--seed``).
Everything trains from scratch because no pretrained weights can be
downloaded here: the backbone is ``--backbone`` (default
``timm:mobilenetv3_small_100``, 1.7M parameters) at ``--image-size`` (64 px).

Methods (``--methods``):

* ``finetune``: ``FineTuneClassifier`` (flat head over the leaves; AdamW with
  warm-up and cosine decay, augmentation, label smoothing 0.1);
* ``finetune_tree``: the same with ``tree=`` (one head per level, summed
  losses, predictions on valid paths);
* ``skorch``: skorch's ``NeuralNetClassifier`` training the same timm model
  (``num_classes=168``) on a torch ``Dataset`` we wrote for it that decodes the
  same pictures with the same augmentation; AdamW with the same learning rate,
  weight decay and label smoothing, cosine annealing per batch (skorch's
  ``LRScheduler``), no validation split;
* ``embed_logreg``: ``ImageEmbedder`` with the same backbone at random
  initialisation + ``StandardScaler`` + ``LogisticRegression`` (frozen random
  features: what training buys);
* ``pixels_logreg``: ``LogisticRegression`` on raw pixels (pictures shrunk to
  16x16, standardised).

The three trained methods get the same CPU time budget (``--budget-s``,
default 300 s of training): each first measures its own training speed on
1,024 products for one epoch, then gets as many whole epochs as fit the budget
(at least one), with its learning-rate schedule planned over them. The
measured training time is reported beside the budget. Validation and early
stopping are off for every method (all see the same training pictures).
Reported: leaf accuracy and per-level accuracy on the held-out products
(``skproduct.metrics.level_accuracy_score``), training images/s (pictures x
epochs / training seconds), the epochs run, and the time to predict the
held-out set. Writes ``--out`` (default ``benchmarks/results/bench_finetune.json``).

Run ``python benchmarks/bench_finetune.py`` (``--train-limit 4000 --budget-s
60`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # benchmarks/_common.py, beside this script

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-small"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_finetune.json"
METHODS = ("finetune", "finetune_tree", "skorch", "embed_logreg", "pixels_logreg")
CALIBRATION_PRODUCTS = 1024


def load(args):
    from sklearn.model_selection import train_test_split

    from skproduct import CategoryTree, read_bson

    products = read_bson(DATA / "fashion_small.bson", index_path=args.workdir / "fashion_small.skpidx")
    tree = CategoryTree.from_csv(DATA / "category_names.csv")
    train, test = train_test_split(np.arange(len(products)), test_size=args.test_fraction, random_state=args.seed)
    if args.train_limit:
        train = train[: args.train_limit]
    return products.iloc[np.sort(train)], products.iloc[np.sort(test)], tree


def scores(tree, y_true, y_pred) -> dict:
    from skproduct.metrics import level_accuracy_score

    out = {"leaf_accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))}
    for level in range(tree.depth):
        out[f"level{level + 1}_accuracy"] = float(level_accuracy_score(y_true, y_pred, tree=tree, level=level))
    return out


def epochs_for(budget_s: float, images_per_second: float, n_pictures: int) -> int:
    return max(1, math.floor(budget_s * images_per_second / n_pictures))


# -- skproduct's fine-tuner --------------------------------------------------------------
def run_finetune(args, train, test, tree, with_tree: bool) -> dict:
    from skproduct import FineTuneClassifier

    def make(epochs):
        return FineTuneClassifier(
            args.backbone, pretrained=False, image_size=args.image_size, batch_size=args.batch_size, learning_rate=args.lr,
            max_iter=epochs, early_stopping=False, tree=tree if with_tree else None, random_state=args.seed,
        )

    probe = train.iloc[:CALIBRATION_PRODUCTS]
    calibration = make(1).fit(probe, probe["category_id"].to_numpy()).history_[0]["images_per_second"]
    epochs = epochs_for(args.budget_s, calibration, len(train))
    model = make(epochs)
    result = _fit_and_score(model, train, test, tree, train, test)
    return {
        **result, "epochs": epochs, "train_images_per_s": result["train_images_per_s"] * epochs,
        "calibration_images_per_s": calibration, "history": model.history_,
    }


# -- skorch on the same model and pictures -------------------------------------------------
class _PictureLabels(Dataset):
    """A torch ``Dataset`` of (pixels, class index): what a skorch user writes for pictures."""

    def __init__(self, refs, labels, transform):
        self.refs, self.labels, self.transform = refs, labels, transform

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        from skproduct.images import load_image

        return self.transform(load_image(self.refs[i])), int(self.labels[i])


def run_skorch(args, train, test, tree) -> dict:
    import timm
    import torch
    from sklearn.preprocessing import LabelEncoder
    from skorch import NeuralNetClassifier
    from skorch.callbacks import LRScheduler

    from skproduct._finetune_parts import training_transform
    from skproduct.backbones import parse_backbone, resolve_preprocessing

    preprocessing = resolve_preprocessing(parse_backbone(args.backbone), args.image_size)
    encoder = LabelEncoder().fit(train["category_id"])
    refs = [images[0] for images in train["images"]]
    labels = encoder.transform(train["category_id"])

    def make(epochs, n):
        steps = epochs * math.ceil(n / args.batch_size)
        torch.manual_seed(args.seed)
        module = timm.create_model(args.backbone.split(":", 1)[1], pretrained=False, num_classes=len(encoder.classes_))
        return NeuralNetClassifier(
            module, criterion=torch.nn.CrossEntropyLoss, criterion__label_smoothing=0.1,
            optimizer=torch.optim.AdamW, optimizer__weight_decay=0.05, lr=args.lr, max_epochs=epochs,
            batch_size=args.batch_size, iterator_train__shuffle=True, train_split=None, device="cpu", verbose=0,
            callbacks=[("cosine", LRScheduler("CosineAnnealingLR", T_max=steps, step_every="batch"))],
            classes=np.arange(len(encoder.classes_)),
        )

    augment = training_transform(preprocessing)
    n_probe = min(CALIBRATION_PRODUCTS, len(refs))
    probe = _PictureLabels(refs[:n_probe], labels[:n_probe], augment)
    start = time.perf_counter()
    make(1, n_probe).fit(probe, None)
    calibration = n_probe / (time.perf_counter() - start)
    epochs = epochs_for(args.budget_s, calibration, len(train))
    net = make(epochs, len(refs))
    start = time.perf_counter()
    net.fit(_PictureLabels(refs, labels, augment), None)
    fit_s = time.perf_counter() - start
    test_set = _PictureLabels([images[0] for images in test["images"]], np.zeros(len(test)), preprocessing.transform())
    start = time.perf_counter()
    predicted = encoder.inverse_transform(net.predict(test_set))
    predict_s = time.perf_counter() - start
    return {
        **scores(tree, test["category_id"], predicted), "epochs": epochs, "fit_s": fit_s, "predict_s": predict_s,
        "train_images_per_s": len(train) * epochs / fit_s, "calibration_images_per_s": calibration,
    }


# -- frozen-feature baselines ----------------------------------------------------------------
def run_embed_logreg(args, train, test, tree) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skproduct import ImageEmbedder

    model = make_pipeline(
        ImageEmbedder(args.backbone, pretrained=False, image_size=args.image_size, batch_size=128,
                      random_state=args.seed),
        StandardScaler(), LogisticRegression(max_iter=args.logreg_max_iter),
    )
    return _fit_and_score(model, train, test, tree, train, test)


def run_pixels_logreg(args, train, test, tree) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    X_train, X_test = _pixels(train), _pixels(test)
    decode_s = time.perf_counter() - start
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=args.logreg_max_iter))
    result = _fit_and_score(model, X_train, X_test, tree, train, test)
    result["fit_s"] += decode_s  # decoding the pictures is part of the method's cost
    return result


def _pixels(products, side: int = 16) -> np.ndarray:
    from skproduct.images import load_image

    return np.stack([
        np.asarray(load_image(images[0]).resize((side, side)), dtype=np.float32).ravel()
        for images in products["images"]
    ])


def _fit_and_score(model, X_train, X_test, tree, train, test) -> dict:
    start = time.perf_counter()
    model.fit(X_train, train["category_id"].to_numpy())
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = model.predict(X_test)
    predict_s = time.perf_counter() - start
    return {**scores(tree, test["category_id"], predicted), "fit_s": fit_s, "predict_s": predict_s,
            "train_images_per_s": len(train) / fit_s}


RUNNERS = {
    "finetune": lambda a, tr, te, t: run_finetune(a, tr, te, t, with_tree=False),
    "finetune_tree": lambda a, tr, te, t: run_finetune(a, tr, te, t, with_tree=True),
    "skorch": run_skorch,
    "embed_logreg": run_embed_logreg,
    "pixels_logreg": run_pixels_logreg,
}


def table(results: dict, prior: dict) -> str:
    rows = [("prior (most frequent leaf)", prior, None)] + [(name, r, r) for name, r in results.items()]
    header = ("method", "leaf acc", "level 1", "level 2", "level 3", "epochs", "train s", "train img/s", "predict s")
    lines = ["| " + " | ".join(header) + " |", "| --- " + "| ---: " * (len(header) - 1) + "|"]
    for name, r, timing in rows:
        cells = [name] + [f"{r[k]:.3f}" for k in ("leaf_accuracy", "level1_accuracy", "level2_accuracy",
                                                   "level3_accuracy")]
        if timing is None:
            cells += ["", "", "", ""]
        else:
            cells += [str(timing.get("epochs", "")), f"{timing['fit_s']:.1f}", f"{timing['train_images_per_s']:.0f}",
                      f"{timing['predict_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="timm:mobilenetv3_small_100")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per trained method")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--train-limit", type=int, default=0, help="use only this many training products (0: all)")
    parser.add_argument("--logreg-max-iter", type=int, default=300)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "skproduct-bench-finetune")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test, tree = load(args)
    majority = train["category_id"].mode()[0]
    prior = scores(tree, test["category_id"], np.full(len(test), majority))
    results = {}
    for name in args.methods:
        busy = _common.busy_cpu_seconds()
        results[name] = RUNNERS[name](args, train, test, tree)
        if busy is not None:
            results[name]["machine_busy_cpu_s"] = _common.busy_cpu_seconds() - busy
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'history'})}", flush=True)
    print(table(results, prior))
    payload = {
        "date": time.strftime("%Y-%m-%d"), "machine": _common.machine_info(),
        "versions": _common.versions(("skproduct", "torch", "torchvision", "timm", "scikit-learn", "skorch")),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "n_train": len(train), "n_test": len(test), "prior": prior, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
