"""The commands: one ``run_<command>`` function of the parsed arguments each, and the models they build."""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from . import CommandError
from ._data import Data, check_leaves, read_data, read_tree, require_file, save
from ._report import print_scores, save_confusion

logger = logging.getLogger(__name__)


# -- models ---------------------------------------------------------------------------------------------------------
def _progress(args: argparse.Namespace) -> int:
    return 0 if args.quiet else 1


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options among ``names`` that were given, so that the others keep the estimator's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _embedder_from_args(args: argparse.Namespace, cache=None):
    if args.device is not None:
        _check_device(args.device)
    from ..embed import ImageEmbedder

    return ImageEmbedder(
        args.backbone, pretrained=args.pretrained, weights=args.weights, device=args.device or "auto",
        image_size=args.image_size, cache=cache if cache is not None else args.cache, on_error=args.on_error,
        verbose=_progress(args), random_state=args.random_state, **_given(args, "batch_size", "num_workers"),
    )


def _head(name: str, args: argparse.Namespace, tree):
    """The head estimator that ``--head name`` (or ``--local-estimator name``) stands for."""
    if name == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=1000)
    if name == "linear":
        from ..heads import TorchLinearClassifier

        return TorchLinearClassifier(device=args.device or "auto", random_state=args.random_state)
    if name == "lgbm":
        from lightgbm import LGBMClassifier

        # The default min_sum_hessian_in_leaf diverges with many rare classes (see benchmarks/README.md).
        return LGBMClassifier(min_sum_hessian_in_leaf=1.0, verbose=-1, random_state=args.random_state)
    from ..heads import HierarchicalClassifier

    return HierarchicalClassifier(_head(args.local_estimator, args, None), tree=tree, strategy=args.strategy)


def _finetune_model(args: argparse.Namespace, tree):
    from ..finetune import FineTuneClassifier

    if args.cache is not None:
        logger.warning("--cache is not used with --head finetune: the backbone's vectors change as it trains")
    return FineTuneClassifier(
        args.backbone, pretrained=args.pretrained, weights=args.weights, tree=tree, max_iter=args.max_iter,
        image_size=args.image_size, device=args.device or "auto", on_error=args.on_error,
        verbose=_progress(args), random_state=args.random_state, **_given(args, "batch_size", "num_workers"),
    )


def _model_from_args(args: argparse.Namespace, tree):
    if args.device is not None:
        _check_device(args.device)
    if args.head == "finetune":
        return _finetune_model(args, tree)
    from sklearn.pipeline import Pipeline

    return Pipeline([("embed", _embedder_from_args(args)), ("head", _head(args.head, args, tree))])


def _fit_and_score(model, data: Data) -> float:
    """Fit ``model`` and return its training accuracy, embedding the pictures once."""
    from sklearn.pipeline import Pipeline

    if not isinstance(model, Pipeline):
        model.fit(data.frame, data.labels)
        return float(model.score(data.frame, data.labels))
    features = model[:-1].fit_transform(data.frame, data.labels)
    head = model[-1].fit(features, data.labels)
    return float(head.score(features, data.labels))


def _load_model(path: str):
    import joblib

    require_file(path, "model file", "fit one with 'skproduct fit TRAIN --out MODEL'")
    try:
        model = joblib.load(path)
    except Exception as exc:  # an unpickler can fail in any way; none of them leaves a model to use
        raise CommandError(
            f"{path} is not a readable model file ({type(exc).__name__}: {exc}): pass a model saved by 'skproduct fit'"
        ) from exc
    if not (hasattr(model, "predict") and hasattr(model, "get_params")):
        raise CommandError(
            f"{path} holds a {type(model).__name__}, not a scikit-learn model: pass a model saved by 'skproduct fit'"
        )
    return model


def _image_estimators(model) -> list:
    """Every estimator in ``model`` (itself, pipeline steps, nested parameters) that runs a backbone on images."""
    from ..image_pipeline import ImageEstimatorMixin

    found = [model] if isinstance(model, ImageEstimatorMixin) else []
    found += [value for value in model.get_params(deep=True).values() if isinstance(value, ImageEstimatorMixin)]
    return list({id(estimator): estimator for estimator in found}.values())


def _apply_runtime_options(model, args: argparse.Namespace) -> None:
    """Set --on-error, --device, --batch-size, --num-workers, --cache and progress bars on every image estimator of
    a loaded model; none is refitted (the device is decided at each call, and the cache keys stay)."""
    if args.device is not None:
        _check_device(args.device)
    wanted = {
        "on_error": args.on_error, "device": args.device, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "cache": args.cache, "verbose": _progress(args),
    }
    for estimator in _image_estimators(model):
        known = estimator.get_params(deep=False)
        estimator.set_params(**{k: v for k, v in wanted.items() if v is not None and k in known})


def _check_device(device: str) -> None:
    """A --device this machine lacks is one line before any work starts."""
    from ..image_pipeline.device import resolve_device

    resolve_device(device)


# -- fit --------------------------------------------------------------------------------------------------------------
def run_fit(args: argparse.Namespace) -> None:
    if args.head == "hierarchical" and args.categories is None:
        raise CommandError("--head hierarchical needs the category tree: pass --categories category_names.csv")
    tree = None if args.categories is None else read_tree(args.categories)
    data = read_data(args.train, args, need_labels=True)
    if tree is not None:
        check_leaves(data.labels, tree, f"labels of {args.train}")
    model = _model_from_args(args, tree)
    start = time.perf_counter()
    accuracy = _fit_and_score(model, data)
    seconds = time.perf_counter() - start

    import joblib

    save(args.out, lambda f: joblib.dump(model, f))
    print(
        f"fitted a {args.head} model on {len(data.ids)} products ({data.n_pictures} pictures, "
        f"{len(np.unique(data.labels))} classes) in {seconds:.1f} s; training accuracy {accuracy:.3f}"
    )
    print(f"saved the model to {args.out}")


# -- predict ----------------------------------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> None:
    model = _load_model(args.model)
    _apply_runtime_options(model, args)
    data = read_data(args.test, args, need_labels=False)
    start = time.perf_counter()
    submission = _submission(model, data, args.top_k)
    seconds = time.perf_counter() - start
    save(args.out, lambda f: submission.to_csv(f, index=False), mode="w")
    print(f"predicted {len(submission)} products of {args.test} in {seconds:.1f} s")
    print(f"wrote {args.out} with columns {','.join(submission.columns)}")


def _submission(model, data: Data, top_k: int):
    """Kaggle's submission frame: the id column, the predicted class, then the runners-up with ``top_k > 1``."""
    import pandas as pd

    id_column, label_column = data.columns
    columns = {id_column: data.ids}
    if top_k == 1:
        columns[label_column] = model.predict(data.frame)
    else:
        ranked = _ranked_classes(model, data.frame, top_k)
        columns[label_column] = ranked[:, 0]
        columns.update({f"{label_column}_{rank + 1}": ranked[:, rank] for rank in range(1, ranked.shape[1])})
    return pd.DataFrame(columns)


def _ranked_classes(model, X, k: int, proba: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` most probable classes of each row, most probable first (ties: the earlier class)."""
    if proba is None:
        proba = _predict_proba(model, X)
    if k > proba.shape[1]:
        logger.warning("--top-k %d is more than the model's %d classes; using %d", k, proba.shape[1], proba.shape[1])
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return np.asarray(model.classes_)[order]


def _predict_proba(model, X) -> np.ndarray:
    if not hasattr(model, "predict_proba"):
        raise CommandError(f"a {type(model).__name__} gives no probabilities, so it cannot rank classes: drop --top-k")
    return model.predict_proba(X)


# -- extract ----------------------------------------------------------------------------------------------------------
def run_extract(args: argparse.Namespace) -> None:
    from ..cache import EmbeddingCache

    data = read_data(args.data, args, need_labels=False)
    cache = EmbeddingCache(args.cache)
    before = cache.stats()  # the hit and miss counters belong to the process: count this run's
    start = time.perf_counter()
    vectors = _embedder_from_args(args, cache).fit(data.frame).transform(data.frame)
    seconds = time.perf_counter() - start
    merged = cache.compact()  # one segment per backbone instead of one per flush: later opens read one file
    after = cache.stats()
    if args.out is not None:
        save(args.out, lambda f: np.save(f, vectors))
    print(
        f"embedded {len(data.ids)} products ({data.n_pictures} pictures) with {args.backbone} in {seconds:.1f} s "
        f"({data.n_pictures / max(seconds, 1e-9):.1f} images/s): vectors of {vectors.shape[1]} features"
    )
    print(
        f"cache {cache.directory}: {after['hits'] - before['hits']} hits, {after['misses'] - before['misses']} "
        f"misses; {after['items']} vectors ({after['bytes'] / 1e6:.1f} MB) on disk"
        + (f", {merged + 1} segments merged into one" if merged else "")
    )
    if args.out is not None:
        print(f"saved the product vectors to {args.out}")


# -- evaluate ---------------------------------------------------------------------------------------------------------
def run_evaluate(args: argparse.Namespace) -> None:
    model = _load_model(args.model)
    _apply_runtime_options(model, args)
    data = read_data(args.data, args, need_labels=True)
    tree = read_tree(args.categories) if args.categories is not None else _model_tree(model)
    _check_labels_are_classes(data.labels, np.asarray(model.classes_), args.data, args.model)
    if tree is not None:
        check_leaves(data.labels, tree, f"labels of {args.data}")
        check_leaves(np.asarray(model.classes_), tree, f"classes of the model {args.model}")
    scores, predicted = _scores(model, data, tree, args.top_k)
    scores["model"] = args.model
    if args.confusion is not None:
        save_confusion(args.confusion, data.labels, predicted, tree)
        scores["confusion"] = args.confusion
    print_scores(scores, tree)
    if args.json is not None:
        save(args.json, lambda f: f.write(json.dumps(scores, indent=2) + "\n"), mode="w")
        print(f"wrote the scores to {args.json}")


def _model_tree(model):
    """The category tree the model was fitted with (``tree_`` of its last step), if any."""
    steps = getattr(model, "steps", None)
    head = steps[-1][1] if steps else model
    return getattr(head, "tree_", None)


def _check_labels_are_classes(labels: np.ndarray, classes: np.ndarray, data_path: str, model_path: str) -> None:
    known = np.isin(labels, classes)
    if not known.any():
        raise CommandError(
            f"none of the labels of {data_path} (such as {labels[:1].tolist()[0]!r}) are classes of the model "
            f"{model_path} (such as {classes[:1].tolist()[0]!r}): evaluate it on data labelled like its training data"
        )
    if not known.all():
        logger.warning(
            "%d of %d products of %s have labels the model never saw (such as %r); they count as errors",
            int((~known).sum()), len(labels), data_path, labels[~known][:1].tolist()[0],
        )


def _scores(model, data: Data, tree, top_k: int) -> tuple[dict, np.ndarray]:
    """The scores of ``model`` on ``data`` (a JSON-ready dict) and its predictions."""
    from ..metrics import hierarchical_f1_score, level_accuracy_score

    labels = data.labels
    scores: dict = {"data": data.path, "n_products": len(labels)}
    if hasattr(model, "predict_proba"):
        proba = model.predict_proba(data.frame)
        ranked = _ranked_classes(model, data.frame, top_k, proba)
        predicted = ranked[:, 0]
        scores["top_k"] = ranked.shape[1]
        scores["top_k_accuracy"] = float((ranked == labels[:, None]).any(axis=1).mean())
    else:
        predicted = model.predict(data.frame)
    scores["accuracy"] = float(np.mean(predicted == labels))
    if tree is not None:
        scores["level_accuracy"] = [float(a) for a in level_accuracy_score(labels, predicted, tree=tree)]
        scores["hierarchical_f1"] = float(hierarchical_f1_score(labels, predicted, tree=tree))
    return scores, predicted


# -- demo -------------------------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo as run_demo_recipe

    result = run_demo_recipe(
        args.workdir, n_products=args.products, random_state=args.random_state, verbose=_progress(args)
    )
    print(
        f"synthetic catalogue in {result['workdir']}: {result['n_train']} products to train, "
        f"{result['n_test']} held out"
    )
    print(f"grid search best parameters: {result['best_params']} (cross-validated hierarchical F1 "
          f"{result['cv_score']:.3f})")
    print(f"saved, reloaded and scored {result['model_path']}:")
    print(f"  {'level':<7}{'nodes':>6}{'accuracy':>10}{'chance':>8}")
    for level, (size, accuracy, chance) in enumerate(
        zip(result["level_sizes"], result["level_accuracy"], result["chance"], strict=True)
    ):
        print(f"  {level + 1:<7}{size:>6}{accuracy:>10.3f}{chance:>8.3f}")
    print(f"  hierarchical F1 {result['hierarchical_f1']:.3f}")
    print("  (chance: always answering the most frequent category of the training products)")
    cache = result["cache"]
    print(f"{result['seconds']:.1f} s; each of {cache['items']} pictures embedded once ({cache['hits']} cache hits)")
