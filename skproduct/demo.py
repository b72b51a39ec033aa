"""The offline demo behind ``skproduct demo``: a synthetic catalogue, a grid search, a saved model, per-level scores.

Everything runs on a fresh install with no data and no internet: the catalogue
is drawn by :mod:`skproduct.datasets`, and the backbone is a tiny timm network
with random weights (its features still separate the catalogue's colours and
shapes; real catalogues want a pretrained backbone).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["run_demo"]

DEMO_BACKBONE = "timm:test_resnet"
DEMO_IMAGE_SIZE = 32
DEMO_BRANCHING = (6, 4, 3)  # 6 top-level categories, 24 below them, 72 leaves
MIN_PRODUCTS = 50
DEMO_PARAM_GRID = {"head__strategy": ["per_parent", "flat"], "head__estimator__C": [0.1, 1.0]}


def run_demo(
    workdir: str | os.PathLike | None = None,
    *,
    n_products: int = 400,
    random_state: int = 0,
    verbose: int = 0,
) -> dict:
    """Fit, save, reload and score a hierarchical image classifier on a synthetic catalogue.

    The steps are those of a real project: write a catalogue in Cdiscount's
    BSON layout with a three-level tree, hold out a quarter of it, search the
    head's parameters with :class:`~sklearn.model_selection.GridSearchCV`
    (scored by hierarchical F1) over a
    ``Pipeline(ImageEmbedder, StandardScaler, HierarchicalClassifier)`` whose
    embedder caches every picture's vector (so the search runs the backbone
    once per picture), save the best model with :func:`joblib.dump`, load it
    back and score the held-out products at every level of the tree.

    Parameters
    ----------
    workdir : str or path-like, optional
        Where the catalogue, its tree, the embedding cache and the model are
        written; a new temporary folder by default. A second run in the same
        folder reuses the cached vectors.
    n_products : int, default=400
        Products in the catalogue (each with one or two pictures); at least
        ``MIN_PRODUCTS`` (50), so that every cross-validation fold has some.
    random_state : int, default=0
        Seed of the catalogue, the split and the backbone's random weights.
    verbose : int, default=0
        ``> 0`` shows the embedder's progress bars.

    Returns
    -------
    dict
        ``workdir``, ``model_path``, ``n_train``, ``n_test``, ``level_sizes``
        (nodes per level), ``level_accuracy`` (held-out accuracy per level, top
        first), ``chance`` (per level, the held-out accuracy of always
        answering the most frequent training node:
        :func:`~skproduct.metrics.majority_level_accuracy`), ``hierarchical_f1``,
        ``best_params`` and ``cv_score`` (the grid search's best parameters and
        their mean cross-validated hierarchical F1), ``seconds`` and
        ``cache`` (the embedding cache's :meth:`~skproduct.EmbeddingCache.stats`).

    Examples
    --------
    ``skproduct demo`` runs this and prints the result; from Python
    (10 to 15 seconds on two CPU cores)::

        result = run_demo(workdir="skproduct-demo")
        result["level_accuracy"], result["chance"]  # per level, top first
    """
    import joblib
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    if n_products < MIN_PRODUCTS:
        raise ValueError(f"the demo needs at least {MIN_PRODUCTS} products, got {n_products}")

    from .cache import EmbeddingCache
    from .datasets import make_category_tree, write_synthetic_bson
    from .io import read_bson
    from .metrics import hierarchical_f1_score, level_accuracy_score, majority_level_accuracy

    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="skproduct-demo-") if workdir is None else workdir)
    folder.mkdir(parents=True, exist_ok=True)
    tree = make_category_tree(DEMO_BRANCHING)
    tree.to_frame().to_csv(folder / "category_names.csv", index=False)
    catalogue = write_synthetic_bson(
        folder / "catalogue.bson", n_products, tree=tree, max_images=2, random_state=random_state
    )
    products = read_bson(catalogue)
    labels = products["category_id"].to_numpy(dtype=np.int64)
    train, test = train_test_split(np.arange(len(products)), test_size=0.25, random_state=random_state)
    logger.info("wrote %d products under a %s tree to %s", len(products), tree.level_sizes, catalogue)

    search = _grid_search(tree, folder / "cache", random_state, verbose)
    # The local problems are tiny: BLAS threads only cost there (12 times slower on a busy 2-core machine).
    with threadpool_limits(1, user_api="blas"):
        search.fit(products.iloc[train], labels[train])
    model_path = folder / "model.joblib"
    joblib.dump(search.best_estimator_, model_path)
    predicted = joblib.load(model_path).predict(products.iloc[test])
    logger.info("saved the best model to %s and predicted %d held-out products with it", model_path, len(test))

    return {
        "workdir": str(folder),
        "model_path": str(model_path),
        "n_train": len(train),
        "n_test": len(test),
        "level_sizes": tree.level_sizes,
        "level_accuracy": level_accuracy_score(labels[test], predicted, tree=tree),
        "chance": majority_level_accuracy(labels[train], labels[test], tree=tree),
        "hierarchical_f1": hierarchical_f1_score(labels[test], predicted, tree=tree),
        "best_params": search.best_params_,
        "cv_score": float(search.best_score_),
        "seconds": time.perf_counter() - start,
        "cache": EmbeddingCache(folder / "cache").stats(),
    }


def _grid_search(tree, cache: Path, random_state: int, verbose: int):
    """The grid search over the head of an embedder, scaler and hierarchical classifier pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from .embed import ImageEmbedder
    from .heads import HierarchicalClassifier
    from .metrics import make_hierarchical_scorer

    pipeline = Pipeline(
        [
            (
                "embed",
                ImageEmbedder(
                    DEMO_BACKBONE, pretrained=False, image_size=DEMO_IMAGE_SIZE, cache=cache, verbose=verbose,
                    random_state=random_state,
                ),
            ),
            ("scale", StandardScaler()),
            ("head", HierarchicalClassifier(LogisticRegression(max_iter=1000), tree=tree)),
        ]
    )
    folds = KFold(3, shuffle=True, random_state=random_state)  # not stratified: rare leaves have a product or two
    return GridSearchCV(pipeline, DEMO_PARAM_GRID, scoring=make_hierarchical_scorer(tree, metric="f1"), cv=folds)
