"""HierarchicalClassifier: strategies, valid paths, row independence, the tree's guarantees, composition."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lightgbm import LGBMClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from skproduct import CategoryTree
from skproduct.datasets import make_category_tree
from skproduct.heads import HierarchicalClassifier

STRATEGIES = ["per_parent", "per_level", "flat"]


def _hierarchical_data(tree: CategoryTree, n: int, seed: int = 0, noise: float = 0.6):
    """Features where each level adds an offset to its parent's centre: the tree is visible in X."""
    rng = np.random.default_rng(seed)
    leaves = tree.leaves[rng.integers(0, len(tree), n)]
    codes = tree.encode(leaves)
    X = np.zeros((n, 12))
    for level, size in enumerate(tree.level_sizes):
        centres = rng.normal(scale=3.0 / (level + 1), size=(size, 12))
        X += centres[codes[:, level]]
    return X + rng.normal(scale=noise, size=X.shape), leaves


@pytest.fixture(scope="module")
def tree():
    return make_category_tree((3, 2, 3))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_learn_the_tree(tree, strategy):
    X, y = _hierarchical_data(tree, 1200)
    X, X_test, y, y_test = X[:900], X[900:], y[:900], y[900:]
    model = HierarchicalClassifier(tree=tree, strategy=strategy).fit(X, y)
    proba = model.predict_proba(X_test)
    assert proba.shape == (300, len(tree)) and np.allclose(proba.sum(axis=1), 1)
    assert model.score(X_test, y_test) > 0.7
    top = model.predict_level(X_test, 0)
    assert np.mean(top == tree.level_labels(y_test, level=0)) > 0.9
    level_proba = model.predict_proba_level(X_test, 1)
    assert level_proba.shape == (300, 6) and np.allclose(level_proba.sum(axis=1), 1)
    assert set(model.predict_top_k(X_test[:5], k=3)[:, 0]) <= set(tree.leaves)
    assert (model.predict_top_k(X_test, k=1)[:, 0] == model.predict(X_test)).all()


def test_per_parent_fits_nothing_for_single_children():
    tree = CategoryTree.from_paths([("A", "a", "1"), ("A", "a", "2"), ("B", "b", "3")], leaves=[1, 2, 3])
    X, y = _hierarchical_data(tree, 120)
    model = HierarchicalClassifier(tree=tree, strategy="per_parent").fit(X, y)
    # the root chooses A or B; node ("A","a") chooses 1 or 2; the single-child nodes A and B, ("B","b") fit nothing
    assert sorted(model.local_estimators_) == [(0, -1), (2, 0)]


def test_unseen_leaves_and_one_class_nodes(tree):
    X, y = _hierarchical_data(tree, 600)
    seen = np.isin(y, tree.leaves[:7])  # leaves 0-6: the first top node is seen fully, the second in part
    model = HierarchicalClassifier(tree=tree, strategy="per_parent").fit(X[seen], y[seen])
    assert list(model.classes_) == list(tree.leaves)
    assert set(model.predict(X)) <= set(tree.leaves[:7])
    one_class_nodes = [m for m in model.local_estimators_.values() if isinstance(m, int)]
    assert one_class_nodes, "leaf 6 is the only seen child of its parent"
    assert np.allclose(model.predict_proba(X).sum(axis=1), 1)


def test_labels_outside_the_tree_are_named(tree):
    X, y = _hierarchical_data(tree, 50)
    y = y.copy()
    y[3] = 424242
    with pytest.raises(KeyError, match="424242"):
        HierarchicalClassifier(tree=tree).fit(X, y)


def test_tree_inferred_from_per_level_labels(tree):
    X, leaves = _hierarchical_data(tree, 400)
    paths = np.array([tree.path(leaf) for leaf in leaves], dtype=object)
    y = np.column_stack([paths[:, 0], paths[:, 1], leaves])
    model = HierarchicalClassifier().fit(X, y)
    assert model.tree_.level_sizes == tree.level_sizes
    assert model.score(X, leaves) > 0.8
    with pytest.raises(ValueError, match="pass tree="):
        bad = y.copy()
        bad[0, 0] = "elsewhere"  # the same leaf now sits under two parents
        HierarchicalClassifier().fit(X, bad)


def test_flat_without_tree_is_a_plain_classifier():
    X, y = _hierarchical_data(make_category_tree((2, 2, 2)), 300)
    ours = HierarchicalClassifier(strategy="per_parent").fit(X, y.astype(str))
    plain = LogisticRegression(max_iter=1000).fit(X, y.astype(str))
    np.testing.assert_allclose(ours.predict_proba(X), plain.predict_proba(X), rtol=1e-6, atol=1e-8)


def test_n_jobs_sample_weight_and_estimator_per_level(tree):
    X, y = _hierarchical_data(tree, 600)
    serial = HierarchicalClassifier(tree=tree, strategy="per_parent").fit(X, y)
    parallel = HierarchicalClassifier(tree=tree, strategy="per_parent", n_jobs=2).fit(X, y)
    np.testing.assert_allclose(serial.predict_proba(X), parallel.predict_proba(X))

    weights = np.where(y == tree.leaves[0], 0.0, 1.0)
    weighted = HierarchicalClassifier(tree=tree, strategy="flat").fit(X, y, sample_weight=weights)
    dropped = HierarchicalClassifier(tree=tree, strategy="flat").fit(X[weights > 0], y[weights > 0])
    assert (weighted.predict(X) != tree.leaves[0]).all()
    assert np.mean(weighted.predict(X) == dropped.predict(X)) > 0.97

    mixed = HierarchicalClassifier(
        {0: LGBMClassifier(n_estimators=15, verbose=-1), 2: LogisticRegression(C=0.5, max_iter=500)}, tree=tree,
        strategy="per_parent",
    ).fit(X, y)
    assert isinstance(mixed.local_estimators_[(0, -1)], LGBMClassifier)
    assert isinstance(mixed.local_estimators_[(1, 0)], LogisticRegression)
    assert mixed.local_estimators_[(2, 0)].C == 0.5
    assert mixed.score(X, y) > 0.7


def test_grid_search_over_strategy_and_local_parameters_and_persistence(tree, tmp_path):
    X, y = _hierarchical_data(tree, 450)
    search = GridSearchCV(
        HierarchicalClassifier(LogisticRegression(max_iter=500), tree=tree),
        {"strategy": ["per_parent", "flat"], "estimator__C": [0.1, 1.0]}, cv=3,
    ).fit(X, y)
    assert set(search.best_params_) == {"strategy", "estimator__C"}
    joblib.dump(search.best_estimator_, tmp_path / "head.joblib")
    loaded = joblib.load(tmp_path / "head.joblib")
    np.testing.assert_array_equal(loaded.predict_proba(X), search.best_estimator_.predict_proba(X))


def test_lightgbm_head_after_the_embedder(cdiscount_sample, tmp_path):
    from skproduct import ImageEmbedder
    from skproduct.io import read_bson

    products = read_bson(cdiscount_sample, index_path=tmp_path / "i.skpidx").head(40)
    y = np.arange(40) % 2
    embed = ImageEmbedder("timm:test_resnet", pretrained=False, image_size=48, cache=tmp_path / "emb")
    flat = make_pipeline(embed, LGBMClassifier(n_estimators=10, min_child_samples=2, verbose=-1)).fit(products, y)
    assert flat.predict_proba(products).shape == (40, 2)
    tree = CategoryTree.from_paths([("even", "0"), ("odd", "1")], leaves=[0, 1])
    hierarchical = make_pipeline(
        embed, HierarchicalClassifier(LGBMClassifier(n_estimators=10, min_child_samples=2, verbose=-1), tree=tree)
    ).fit(products, y)
    assert set(hierarchical.predict(products)) <= {0, 1}


# -- properties ------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    branching=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 10_000),
    batch=st.lists(st.integers(0, 59), min_size=1, max_size=12),
)
def test_rows_are_valid_and_independent_of_their_batch(branching, strategy, seed, batch):
    tree = make_category_tree(branching)
    X, y = _hierarchical_data(tree, 60, seed=seed, noise=2.0)
    if len(np.unique(y)) < 2:
        return
    model = HierarchicalClassifier(LogisticRegression(max_iter=200), tree=tree, strategy=strategy).fit(X, y)
    proba = model.predict_proba(X[batch])
    assert np.allclose(proba.sum(axis=1), 1) and (proba >= 0).all()
    for row, index in zip(proba, batch):
        np.testing.assert_allclose(model.predict_proba(X[[index]])[0], row, rtol=1e-10, atol=1e-12)
    predicted = model.predict(X[batch])
    assert set(predicted) <= set(tree.leaves)
    assert all(tree.path(leaf)[:1] in tree.nodes(0) for leaf in predicted)


# -- scikit-learn's estimator checks ---------------------------------------------------
@parametrize_with_checks([HierarchicalClassifier(strategy=s) for s in STRATEGIES])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.slow
def test_per_level_results_on_real_fashion_vectors(shared_data, tmp_path):
    """Random-init backbone features of fashion-small (7/47/168 tree): every strategy beats the majority clearly."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skproduct import ImageEmbedder
    from skproduct.io import read_bson

    tree = CategoryTree.from_csv(shared_data / "fashion-small" / "category_names.csv")
    assert tree.level_sizes == (7, 47, 168)
    products = read_bson(shared_data / "fashion-small" / "fashion_small.bson", index_path=tmp_path / "f.skpidx")
    sample = products.sample(600, random_state=0)
    X = ImageEmbedder("timm:test_resnet", pretrained=False, image_size=48, batch_size=64).fit_transform(sample)
    y = sample["category_id"].to_numpy().astype(int)
    train, test = slice(0, 400), slice(400, 600)
    codes = tree.encode(y[test])
    majority = [np.bincount(codes[:, level]).max() / len(codes) for level in range(3)]
    for strategy in STRATEGIES:
        model = make_pipeline(StandardScaler(), HierarchicalClassifier(tree=tree, strategy=strategy))
        model.fit(X[train], y[train])
        head, features = model[-1], model[0].transform(X[test])
        accuracy = [
            np.mean(head.predict_level(features, level) == tree.level_labels(y[test], level=level)) for level in (0, 1)
        ]
        accuracy.append(np.mean(model.predict(X[test]) == y[test]))
        for level in range(3):
            assert accuracy[level] > majority[level] + 0.1, (strategy, level, accuracy, majority)


def test_torch_linear_head_as_the_local_estimator(tree):
    from skproduct.heads import TorchLinearClassifier

    X, y = _hierarchical_data(tree, 600)
    model = HierarchicalClassifier(TorchLinearClassifier(max_iter=30, random_state=0), tree=tree).fit(X, y)
    assert model.score(X, y) > 0.8
    assert isinstance(model.local_estimators_[(0, -1)], TorchLinearClassifier)
    assert np.allclose(model.predict_proba(X[:7]).sum(axis=1), 1)
