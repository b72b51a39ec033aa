"""The commands: one ``run_<command>`` function of the parsed arguments each, and the models they build.

Each command checks everything it can before its long work starts: its output
paths (:func:`~skproduct.cli._data.check_outputs`), the ``--cache`` folder, the
device, and the backbone options (the embedder is resolved, weights file
included, before any picture is read). Products whose pictures are all unusable
(or, with ``--on-missing drop``, whose image file is missing) are predicted from
the training prior and counted in the command's summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import CommandError
from ._data import (
    BSON_COLUMNS,
    CSV_COLUMNS,
    Data,
    Progress,
    check_folder_option,
    check_leaves,
    check_outputs,
    data_chunks,
    data_paths,
    describe_paths,
    is_stdout,
    read_data,
    read_tree,
    require_file,
    save,
    user_input,
    write_npy_header,
)
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


def _resolve_embedder(embedder) -> None:
    """Fit (resolve) the embedder before any picture is read: the backbone name, the weights file, the image size
    and the device are checked here, so that a mistake in them is one line before the long work starts."""
    with user_input("the backbone options (--backbone, --weights, --image-size)"):
        embedder.fit()


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

    if args.strategy == "tree":  # one TreeHeadClassifier over the tree; no local estimator
        from ..heads import TreeHeadClassifier

        head = TreeHeadClassifier(device=args.device or "auto", random_state=args.random_state)
        return HierarchicalClassifier(head, tree=tree, strategy="tree")
    return HierarchicalClassifier(_head(args.local_estimator, args, None), tree=tree, strategy=args.strategy)


def _finetune_model(args: argparse.Namespace, tree):
    from ..finetune import FineTuneClassifier

    if args.cache is not None:
        logger.warning("--cache is not used with --head finetune: the backbone's vectors change as it trains")
    # The fine-tuner builds its backbone inside fit: check the backbone options the same way first.
    _resolve_embedder(_embedder_from_args(args).set_params(cache=None))
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

    embedder = _embedder_from_args(args)
    _resolve_embedder(embedder)
    return Pipeline([("embed", embedder), ("head", _head(args.head, args, tree))])


def _fit_and_score(model, data: Data) -> float:
    """Fit ``model`` and return its training accuracy, embedding the pictures once.

    The embedder of a pipeline was resolved (fitted: it learns nothing from
    the pictures) before the work started; only its vectors are computed here.
    """
    from sklearn.pipeline import Pipeline

    if not isinstance(model, Pipeline):
        model.fit(data.frame, data.labels)
        return float(model.score(data.frame, data.labels))
    embedders = [step for _, step in model.steps[:-1] if hasattr(step, "out")]
    for embedder in embedders:  # vectors above 2 GiB go to a memory-mapped file in the cache folder, for this fit
        embedder.set_params(out="auto")
    try:
        features = model[:-1].transform(data.frame)
        head = model[-1].fit(features, data.labels)
        score = float(head.score(features, data.labels))
    finally:
        for embedder in embedders:
            embedder.set_params(out="memory")
    filename = getattr(features, "filename", None)
    del features
    if filename:
        with contextlib.suppress(OSError):
            os.unlink(filename)
    return score


def _class_prior(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The training frequency of each of ``classes`` (0 for a class without training products)."""
    found, counts = np.unique(labels, return_counts=True)
    prior = np.zeros(len(classes))
    where = {label: count for label, count in zip(found.tolist(), counts.tolist(), strict=True)}
    for i, label in enumerate(np.asarray(classes).tolist()):
        prior[i] = where.get(label, 0)
    return prior / max(prior.sum(), 1)


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


def _summary_stream(*outputs: str | None):
    """Where the human-readable lines go: stdout, unless a result is written there."""
    return sys.stderr if any(is_stdout(path) for path in outputs) else sys.stdout


# -- predictions that never drop a product ----------------------------------------------------------------------------
@dataclass
class _Predictions:
    """A model's answer for every product of a :class:`Data`, products without a usable picture included."""

    labels: np.ndarray
    proba: np.ndarray | None
    no_picture: np.ndarray  # bool, per product: no usable picture (all failed to decode, or the file is missing)
    from_prior: bool  # whether those products were answered from the training prior

    def summary(self) -> str | None:
        """The summary line about the products without a usable picture, if there were any."""
        n = int(self.no_picture.sum())
        if not n:
            return None
        products, were = ("product", "was") if n == 1 else ("products", "were")
        if self.from_prior:
            return f"{n} {products} had no usable picture and {were} predicted from the training prior"
        return (
            f"{n} {products} had no usable picture and {were} predicted from a zero vector (the model file holds no "
            "training prior: refit it with 'skproduct fit' to predict them from the prior)"
        )


def _last_embedder_step(model) -> int | None:
    """The position of the last :class:`~skproduct.ImageEmbedder` step of a pipeline model, if any."""
    from sklearn.pipeline import Pipeline

    from ..embed import ImageEmbedder

    if not isinstance(model, Pipeline):
        return None
    positions = [i for i, (_, step) in enumerate(model.steps[:-1]) if isinstance(step, ImageEmbedder)]
    return positions[-1] if positions else None


def _training_prior(model) -> np.ndarray | None:
    """The training class frequencies in ``classes_`` order: saved by ``skproduct fit`` on a pipeline
    (``class_prior_``), or a fine-tuner's own."""
    prior = getattr(model, "class_prior_", None)
    if prior is None:
        prior = getattr(model, "_prior", None)  # FineTuneClassifier's, which its predict_proba already uses
    if prior is None or len(prior) != len(model.classes_):
        return None
    return np.asarray(prior, dtype=float)


def _can_answer_absent(model) -> bool:
    """Whether products without any picture to read can be answered (from the prior, or a zero vector)."""
    return _last_embedder_step(model) is not None or _training_prior(model) is not None


def _predict(model, data: Data, *, want_proba: bool) -> _Predictions:
    """Predict every product of ``data``; the products without a usable picture get the training prior.

    Which products had no usable picture is read from the model's own
    fallback: the embedder gives them a zero vector (a pipeline's features are
    computed here, step by step, to see it), and a fine-tuner gives them its
    training prior as probabilities.
    """
    n = len(data.ids)
    present = np.ones(n, dtype=bool) if data.absent is None else ~data.absent
    classes = np.asarray(model.classes_)
    prior = _training_prior(model)
    where = _last_embedder_step(model)
    if where is not None:
        head = model.steps[-1][1]
        vectors = model[: where + 1].transform(data.frame)
        features = np.zeros((n, vectors.shape[1]), dtype=vectors.dtype)
        features[present] = vectors
        no_picture = ~features.any(axis=1)
        if where + 1 < len(model.steps) - 1:
            features = model[where + 1 : -1].transform(features)
        proba = head.predict_proba(features) if want_proba else None
        labels = np.asarray(head.predict(features))
    elif prior is not None and hasattr(model, "predict_proba"):
        proba = np.tile(prior, (n, 1))
        proba[present] = model.predict_proba(data.frame)
        no_picture = np.isclose(proba, prior, rtol=1e-6, atol=1e-9).all(axis=1) | ~present
        labels = classes[proba.argmax(axis=1)]
    else:  # a model skproduct did not make: its own answer for every product
        proba = np.asarray(model.predict_proba(data.frame)) if want_proba else None
        labels = np.asarray(model.predict(data.frame))
        no_picture = np.zeros(n, dtype=bool)
    if prior is not None and no_picture.any():
        labels = labels.copy()
        labels[no_picture] = classes[int(np.argmax(prior))]
        if proba is not None:
            proba = np.array(proba, dtype=float)
            proba[no_picture] = prior
    return _Predictions(labels, proba, no_picture, prior is not None)


def _check_label_kind(model, data: Data, model_path: str) -> None:
    """Warn when the model's classes are not the kind of label the submission's format holds."""
    classes = np.asarray(model.classes_)
    if not len(classes):
        return
    integer = np.issubdtype(classes.dtype, np.integer)
    example = classes[:1].tolist()[0]
    if data.columns == BSON_COLUMNS and not integer:
        logger.warning(
            "the classes of %s are not integer category ids (such as %r, a model fitted on a CSV?), but Cdiscount's "
            "%s column holds integer ids: this submission will not score; use a model fitted on a .bson file",
            model_path, example, BSON_COLUMNS[1],
        )
    elif data.columns == CSV_COLUMNS and integer:
        logger.warning(
            "the classes of %s are integer category ids (such as %r, a model fitted on a .bson file), written into "
            "the %s column of a CSV submission, whose labels are the strings of a CSV (such as Shopee's '03'): check "
            "that the model fits this data", model_path, example, CSV_COLUMNS[1],
        )


def _check_duplicate_names(data: Data) -> None:
    if data.columns != CSV_COLUMNS:
        return
    names, counts = np.unique(data.ids.astype(str), return_counts=True)
    repeated = names[counts > 1]
    if len(repeated):
        logger.warning(
            "%d file names appear more than once in %s (such as %r): each row gets its own prediction, but a grader "
            "keyed by file name may keep only one of them", len(repeated), data.path, repeated[0],
        )


# -- fit --------------------------------------------------------------------------------------------------------------
def run_fit(args: argparse.Namespace) -> None:
    sources = data_paths(args.train)
    args.train = describe_paths(sources)
    check_outputs([("--out", args.out)], [*sources, args.categories, args.weights])
    check_folder_option("--cache", args.cache)
    if args.head == "hierarchical" and args.categories is None:
        raise CommandError("--head hierarchical needs the category tree: pass --categories category_names.csv")
    tree = None if args.categories is None else read_tree(args.categories)
    data = read_data(sources, args, need_labels=True, keep_every_product=False)
    if tree is not None:
        check_leaves(data.labels, tree, f"labels of {args.train}")
    elif len(np.unique(data.labels)) < 2:
        raise CommandError(
            f"every product of {args.train} has the label {data.labels[:1].tolist()[0]!r}: a classifier needs two "
            "classes or more"
        )
    model = _model_from_args(args, tree)  # the backbone options are checked here, before any picture is embedded
    start = time.perf_counter()
    accuracy = _fit_and_score(model, data)
    seconds = time.perf_counter() - start
    if hasattr(model, "steps"):  # what products without a usable picture are predicted from, later
        model.class_prior_ = _class_prior(np.asarray(model.classes_), data.labels)

    import joblib

    save(args.out, lambda f: joblib.dump(model, f))
    print(
        f"fitted a {args.head} model on {len(data.ids)} products ({data.n_pictures} pictures, "
        f"{len(np.unique(data.labels))} classes) in {seconds:.1f} s; training accuracy {accuracy:.3f}"
    )
    print(f"saved the model to {args.out}")


# -- predict ----------------------------------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> None:
    sources = data_paths(args.test)
    args.test = describe_paths(sources)
    check_outputs([("--out", args.out)], [args.model, *sources], to_stdout=["--out"])
    check_folder_option("--cache", args.cache)
    model = _load_model(args.model)
    _apply_runtime_options(model, args)
    if args.top_k > 1 and not hasattr(model, "predict_proba"):
        raise CommandError(f"a {type(model).__name__} gives no probabilities, so it cannot rank classes: drop --top-k")
    data = read_data(sources, args, need_labels=False)
    if data.absent is not None and not _can_answer_absent(model):
        raise CommandError(
            f"a {type(model).__name__} cannot answer the products whose image is missing: fix the paths in "
            f"{args.test} instead of --on-missing drop"
        )
    _check_label_kind(model, data, args.model)
    _check_duplicate_names(data)
    written: dict = {}
    progress = Progress(len(data.ids), "predicting", not args.quiet)

    def write(f) -> None:
        for part in data_chunks(data):  # embed -> head -> write, one chunk of products at a time
            submission, predictions = _submission(model, part, args.top_k)
            submission.to_csv(f, index=False, header="columns" not in written)
            written.setdefault("columns", list(submission.columns))
            written["no_picture"] = written.get("no_picture", 0) + int(predictions.no_picture.sum())
            written["from_prior"] = predictions.from_prior
            progress.update(len(part.ids))

    try:
        save(args.out, write, mode="w")  # atomically: a killed run leaves no half file (the cache keeps its vectors)
    finally:
        seconds = progress.close()
    predictions = _Predictions(np.empty(0), None, np.ones(written.get("no_picture", 0), dtype=bool),
                               written.get("from_prior", False))
    out = _summary_stream(args.out)
    print(f"predicted {len(data.ids)} products of {args.test} in {seconds:.1f} s "
          f"({len(data.ids) / max(seconds, 1e-9):.0f} products/s)", file=out)
    if predictions.summary():
        print(predictions.summary(), file=out)
    where = "stdout" if is_stdout(args.out) else args.out
    print(f"wrote {where} with columns {','.join(written.get('columns', []))}", file=out)


def _submission(model, data: Data, top_k: int):
    """Kaggle's submission frame (the id column, the predicted class, then the runners-up with ``top_k > 1``), and
    the predictions it was made of. Streaming callers pass one chunk of products at a time: only a chunk's
    probabilities (chunk x classes) are ever held."""
    import pandas as pd

    id_column, label_column = data.columns
    columns = {id_column: data.ids}
    predictions = _predict(model, data, want_proba=top_k > 1)
    if top_k == 1:
        columns[label_column] = predictions.labels
    else:
        ranked = _ranked_classes(model, None, top_k, predictions.proba)
        columns[label_column] = ranked[:, 0]
        columns.update({f"{label_column}_{rank + 1}": ranked[:, rank] for rank in range(1, ranked.shape[1])})
    return pd.DataFrame(columns), predictions


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

    sources = data_paths(args.data)
    args.data = describe_paths(sources)
    check_outputs([("--out", args.out)], [*sources, args.weights])
    check_folder_option("--cache", args.cache)
    data = read_data(sources, args, need_labels=False)
    embedder = _embedder_from_args(args)
    cache = EmbeddingCache(args.cache, getattr(args, "cache_dtype", None) or "float32")
    embedder.set_params(cache=cache)
    _resolve_embedder(embedder)
    before = cache.stats()  # the hit and miss counters belong to the process: count this run's
    width = embedder.n_features_out_
    counts = {"empty": 0}
    progress = Progress(len(data.ids), "embedding", not args.quiet)

    def embed_all(f=None) -> None:
        if f is not None:
            write_npy_header(f, (len(data.ids), width))
        for part in data_chunks(data):  # memory holds one chunk of products: the vectors go to the cache and --out
            present = embedder.transform(part.frame)
            vectors = present
            if part.absent is not None:  # products whose image file is missing get a zero vector, as the embedder's
                vectors = np.zeros((len(part.ids), width), dtype=np.float32)
                vectors[~part.absent] = present
            counts["empty"] += int((~vectors.any(axis=1)).sum())
            if f is not None:
                f.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
            progress.update(len(part.ids))

    try:
        if args.out is not None:
            save(args.out, embed_all)
        else:
            embed_all()
    finally:
        seconds = progress.close()
    merged = cache.compact()  # one segment per backbone instead of one per flush: later opens read one file
    after = cache.stats()
    print(
        f"embedded {len(data.ids)} products ({data.n_pictures} pictures) with {args.backbone} in {seconds:.1f} s "
        f"({data.n_pictures / max(seconds, 1e-9):.1f} images/s): vectors of {width} features"
    )
    if counts["empty"]:
        print(f"{counts['empty']} products had no usable picture and got a zero vector")
    print(
        f"cache {cache.directory}: {after['hits'] - before['hits']} hits, {after['misses'] - before['misses']} "
        f"misses; {after['items']} vectors ({after['bytes'] / 1e6:.1f} MB) on disk"
        + (f", {merged + 1} segments merged into one" if merged else "")
    )
    if args.out is not None:
        print(f"saved the product vectors to {args.out}")


# -- evaluate ---------------------------------------------------------------------------------------------------------
def run_evaluate(args: argparse.Namespace) -> None:
    sources = data_paths(args.data)
    args.data = describe_paths(sources)
    check_outputs(
        [("--json", args.json), ("--confusion", args.confusion)], [args.model, *sources, args.categories],
        to_stdout=["--json"], image=["--confusion"],
    )
    check_folder_option("--cache", args.cache)
    model = _load_model(args.model)
    _apply_runtime_options(model, args)
    data = read_data(sources, args, need_labels=True)
    if data.absent is not None and not _can_answer_absent(model):
        raise CommandError(
            f"a {type(model).__name__} cannot answer the products whose image is missing: fix the paths in "
            f"{args.data} instead of --on-missing drop"
        )
    tree = read_tree(args.categories) if args.categories is not None else _model_tree(model)
    _check_labels_are_classes(data.labels, np.asarray(model.classes_), args.data, args.model)
    if tree is not None:
        check_leaves(data.labels, tree, f"labels of {args.data}")
        check_leaves(np.asarray(model.classes_), tree, f"classes of the model {args.model}")
    scores, predicted, predictions = _scores(model, data, tree, args.top_k, quiet=args.quiet)
    scores["model"] = args.model
    out = _summary_stream(args.json)
    if args.confusion is not None:
        save_confusion(args.confusion, data.labels, predicted, tree)
        scores["confusion"] = args.confusion
    print_scores(scores, tree, file=out)
    if predictions.summary():
        print(predictions.summary(), file=out)
    if args.json is not None:
        save(args.json, lambda f: f.write(json.dumps(scores, indent=2) + "\n"), mode="w")
        if not is_stdout(args.json):
            print(f"wrote the scores to {args.json}", file=out)


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


def _scores(model, data: Data, tree, top_k: int, quiet: bool = True) -> tuple[dict, np.ndarray, _Predictions]:
    """The scores of ``model`` on ``data`` (a JSON-ready dict), its predictions, and what they were made of.

    Streams: one chunk of products is embedded and predicted at a time, and
    only its top-k classes are kept (never the whole products x classes matrix).
    """
    from ..metrics import hierarchical_f1_score, level_accuracy_score

    labels = data.labels
    scores: dict = {"data": data.path, "n_products": len(labels)}
    want_proba = hasattr(model, "predict_proba")
    predicted, hits, no_picture, from_prior, k = [], [], [], False, None
    progress = Progress(len(data.ids), "evaluating", not quiet)
    try:
        for part in data_chunks(data):
            chunk = _predict(model, part, want_proba=want_proba)
            if chunk.proba is not None:
                ranked = _ranked_classes(model, None, top_k, chunk.proba)
                predicted.append(ranked[:, 0])
                hits.append((ranked == part.labels[:, None]).any(axis=1))
                k = ranked.shape[1]
            else:
                predicted.append(chunk.labels)
            no_picture.append(chunk.no_picture)
            from_prior = chunk.from_prior
            progress.update(len(part.ids))
    finally:
        progress.close()
    predicted = np.concatenate(predicted)
    predictions = _Predictions(predicted, None, np.concatenate(no_picture), from_prior)
    if k is not None:
        scores["top_k"] = k
        scores["top_k_accuracy"] = float(np.concatenate(hits).mean())
    scores["accuracy"] = float(np.mean(predicted == labels))
    scores["n_no_usable_picture"] = int(predictions.no_picture.sum())
    if tree is not None:
        scores["level_accuracy"] = [float(a) for a in level_accuracy_score(labels, predicted, tree=tree)]
        scores["hierarchical_f1"] = float(hierarchical_f1_score(labels, predicted, tree=tree))
    return scores, predicted, predictions


# -- demo -------------------------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo as run_demo_recipe

    check_folder_option("--workdir", args.workdir)
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
