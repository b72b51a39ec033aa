"""skproduct.metrics: hand-computed cases, agreement with hiclass and scikit-learn, the real tree, scorers."""

from __future__ import annotations

import pickle
import warnings
from fractions import Fraction

import hiclass.metrics
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import top_k_accuracy_score as sklearn_top_k
from sklearn.model_selection import GridSearchCV

from skproduct import CategoryTree
from skproduct.metrics import (
    hierarchical_f1_score,
    hierarchical_precision_score,
    hierarchical_recall_score,
    level_accuracy_score,
    majority_level_accuracy,
    make_hierarchical_scorer,
    make_hierarchical_scorers,
    top_k_accuracy_score,
)

HIERARCHICAL = (hierarchical_precision_score, hierarchical_recall_score, hierarchical_f1_score)
HICLASS = {
    hierarchical_precision_score: hiclass.metrics.precision,
    hierarchical_recall_score: hiclass.metrics.recall,
    hierarchical_f1_score: hiclass.metrics.f1,
}


@pytest.fixture(scope="module")
def small_tree():
    """Names repeat under different parents ("Kitchen", "Pans"): only paths tell the nodes apart."""
    return CategoryTree.from_paths(
        [
            ("Home", "Kitchen", "Pans"),
            ("Home", "Kitchen", "Knives"),
            ("Home", "Garden", "Pans"),
            ("Toys", "Games", "Chess"),
            ("Toys", "Kitchen", "Pans"),
        ],
        leaves=[10, 12, 11, 20, 21],
    )


# rows agree on 3, 2, 1, 1 and 0 levels: row 4's "Kitchen" and "Pans" are other nodes than the true ones
Y_TRUE = [10, 10, 11, 20, 21]
Y_PRED = [10, 12, 10, 21, 10]


def _random_tree(rng, n_top=4, names=("a", "b", "c", "d", "e")):
    """A random 3-level tree whose names repeat under different parents; leaves are integers."""
    paths = []
    for top in names[:n_top]:
        for middle in rng.choice(list(names), size=rng.integers(1, 4), replace=False):
            for leaf in rng.choice(list(names), size=rng.integers(1, 4), replace=False):
                paths.append((f"T{top}", str(middle), str(leaf)))
    leaves = rng.permutation(len(paths)) * 7 + 100
    return CategoryTree.from_paths(paths, leaves=leaves)


def _hiclass_labels(tree, y):
    """hiclass's 2-D per-level labels: one unique string per path prefix, so repeated names stay apart."""
    paths = [tree.path(label) for label in y]
    return np.array([["/".join(path[: level + 1]) for level in range(tree.depth)] for path in paths])


def _near_misses(rng, tree, y_true, p_exact=0.3, p_sibling=0.3):
    """Predictions that are right, or a leaf under the same parent, or any leaf."""
    y_pred = rng.choice(tree.leaves, size=len(y_true))
    parents = tree.encode(y_true)[:, -2]
    leaf_parents = tree.encode(tree.leaves)[:, -2]
    draw = rng.random(len(y_true))
    for i in np.flatnonzero(draw < p_exact + p_sibling):
        y_pred[i] = y_true[i] if draw[i] < p_exact else rng.choice(tree.leaves[leaf_parents == parents[i]])
    return y_pred


# -- hand-computed cases -----------------------------------------------------
@pytest.mark.parametrize("metric", HIERARCHICAL)
@pytest.mark.parametrize("average", ["micro", "macro"])
def test_hand_computed(small_tree, metric, average):
    # micro: 7 shared nodes of 15 on each side; macro: mean(3/3, 2/3, 1/3, 1/3, 0/3)
    assert metric(Y_TRUE, Y_PRED, tree=small_tree, average=average) == pytest.approx(float(Fraction(7, 15)))


@pytest.mark.parametrize("metric", HIERARCHICAL)
@pytest.mark.parametrize("average", ["micro", "macro"])
def test_hand_computed_with_weights(small_tree, metric, average):
    weights = [1, 0, 2, 1, 1]
    # (1*3 + 0*2 + 2*1 + 1*1 + 1*0) / (5 * 3)
    expected = float(Fraction(6, 15))
    assert metric(Y_TRUE, Y_PRED, tree=small_tree, average=average, sample_weight=weights) == pytest.approx(expected)


def test_perfect_and_disjoint(small_tree):
    for metric in HIERARCHICAL:
        assert metric([10, 20], [10, 20], tree=small_tree) == 1.0
        assert metric([10, 20], [21, 11], tree=small_tree) == 0.0
        assert metric([10, 20], [21, 11], tree=small_tree, average="macro") == 0.0


def test_level_accuracy_hand_computed(small_tree):
    accuracy = level_accuracy_score(Y_TRUE, Y_PRED, tree=small_tree)
    np.testing.assert_allclose(accuracy, [4 / 5, 2 / 5, 1 / 5])
    assert level_accuracy_score(Y_TRUE, Y_PRED, tree=small_tree, level=0) == pytest.approx(4 / 5)
    assert level_accuracy_score(Y_TRUE, Y_PRED, tree=small_tree, level=-1) == pytest.approx(1 / 5)
    weighted = level_accuracy_score(Y_TRUE, Y_PRED, tree=small_tree, sample_weight=[1, 0, 2, 1, 1])
    np.testing.assert_allclose(weighted, [4 / 5, 1 / 5, 1 / 5])


def test_labels_may_be_any_array_like(small_tree):
    expected = hierarchical_f1_score(Y_TRUE, Y_PRED, tree=small_tree)
    assert hierarchical_f1_score(pd.Series(Y_TRUE), np.array(Y_PRED), tree=small_tree) == expected
    assert isinstance(expected, float)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([10, 11, 12, 20, 21]), st.sampled_from([10, 11, 12, 20, 21])), min_size=1))
def test_equal_depth_makes_all_hierarchical_scores_the_mean_level_accuracy(pairs):
    tree = CategoryTree.from_paths(
        [("H", "K", "P"), ("H", "K", "N"), ("H", "G", "P"), ("T", "G", "C"), ("T", "K", "P")],
        leaves=[10, 12, 11, 20, 21],
    )
    y_true, y_pred = map(list, zip(*pairs))
    expected = level_accuracy_score(y_true, y_pred, tree=tree).mean()
    for metric in HIERARCHICAL:
        for average in ("micro", "macro"):
            assert metric(y_true, y_pred, tree=tree, average=average) == pytest.approx(expected)


# -- errors ------------------------------------------------------------------
def test_unknown_labels_are_named(small_tree):
    with pytest.raises(KeyError, match=r"y_pred: 2 labels are not leaves of the tree: 99, 98"):
        hierarchical_f1_score([10, 10, 11], [99, 98, 99], tree=small_tree)
    with pytest.raises(KeyError, match=r"y_true: .*'Pans'"):
        hierarchical_precision_score(["Pans"], [10], tree=small_tree)
    with pytest.raises(KeyError, match="y_true: .*99"):
        level_accuracy_score([99], [10], tree=small_tree)


def test_bad_input(small_tree):
    with pytest.raises(ValueError, match="y_pred has 2 rows but y_true has 3"):
        hierarchical_recall_score([10, 11, 20], [10, 11], tree=small_tree)
    with pytest.raises(ValueError, match="average must be 'micro' or 'macro', got 'weighted'"):
        hierarchical_f1_score(Y_TRUE, Y_PRED, tree=small_tree, average="weighted")
    with pytest.raises(ValueError, match="average must be"):
        hierarchical_f1_score(Y_TRUE, Y_PRED, tree=small_tree, average=None)
    with pytest.raises(ValueError, match="1-D array of leaf labels"):
        hierarchical_f1_score([[10, 11]], [[10, 11]], tree=small_tree)
    with pytest.raises(ValueError, match="empty"):
        hierarchical_f1_score([], [], tree=small_tree)
    with pytest.raises(ValueError, match="sample_weight has 2 rows but y_true has 5"):
        hierarchical_f1_score(Y_TRUE, Y_PRED, tree=small_tree, sample_weight=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        hierarchical_f1_score(Y_TRUE, Y_PRED, tree=small_tree, sample_weight=[1, -1, 1, 1, 1])
    with pytest.raises(ValueError, match="sums to zero"):
        level_accuracy_score(Y_TRUE, Y_PRED, tree=small_tree, sample_weight=[0] * 5)
    with pytest.raises(TypeError, match="CategoryTree"):
        hierarchical_f1_score(Y_TRUE, Y_PRED, tree={"tree": 1})
    with pytest.raises(IndexError, match="levels 0 to 2"):
        level_accuracy_score(Y_TRUE, Y_PRED, tree=small_tree, level=3)


def test_options_are_keywords(small_tree):
    with pytest.raises(TypeError):
        hierarchical_f1_score(Y_TRUE, Y_PRED, small_tree)
    with pytest.raises(TypeError):
        top_k_accuracy_score([10, 11], np.full((2, 5), 0.2), small_tree.leaves)
    with pytest.raises(TypeError):
        make_hierarchical_scorer(small_tree, "f1")


def test_majority_level_accuracy(small_tree):
    # in training, the most frequent nodes are Home, Home/Kitchen and leaf 10 (tied with 20, first in code order)
    chance = majority_level_accuracy([10, 10, 12, 20, 20], Y_TRUE, tree=small_tree)
    expected = level_accuracy_score(Y_TRUE, [10] * len(Y_TRUE), tree=small_tree)
    np.testing.assert_allclose(chance, expected)
    with pytest.raises(KeyError, match="y_train: .*99"):
        majority_level_accuracy([99], Y_TRUE, tree=small_tree)
    with pytest.raises(ValueError, match="y_test is empty"):
        majority_level_accuracy([10], [], tree=small_tree)
    with pytest.raises(TypeError, match="CategoryTree"):
        majority_level_accuracy([10], [10], tree=None)


# -- against hiclass -----------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_hiclass_on_a_random_tree(seed):
    rng = np.random.default_rng(seed)
    tree = _random_tree(rng)
    y_true = rng.choice(tree.leaves, size=300)
    y_pred = _near_misses(rng, tree, y_true)
    true_levels, pred_levels = _hiclass_labels(tree, y_true), _hiclass_labels(tree, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # hiclass warns for each row with an empty F1
        for ours, theirs in HICLASS.items():
            for average in ("micro", "macro"):
                assert ours(y_true, y_pred, tree=tree, average=average) == pytest.approx(
                    theirs(true_levels, pred_levels, average=average)
                ), (ours.__name__, average)


def test_agrees_with_hiclass_on_fully_random_predictions():
    rng = np.random.default_rng(11)
    tree = _random_tree(rng, n_top=3)
    y_true, y_pred = rng.choice(tree.leaves, size=(2, 400))
    true_levels, pred_levels = _hiclass_labels(tree, y_true), _hiclass_labels(tree, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for ours, theirs in HICLASS.items():
            for average in ("micro", "macro"):
                expected = theirs(true_levels, pred_levels, average=average)
                assert ours(y_true, y_pred, tree=tree, average=average) == pytest.approx(expected)


# -- the real Cdiscount tree -----------------------------------------------------
@pytest.fixture(scope="module")
def cdiscount_tree(shared_data):
    return CategoryTree.from_csv(shared_data / "cdiscount" / "category_names.csv")


def _siblings(rng, tree, y):
    """For each leaf label in ``y``, a random leaf under the same parent (itself included), vectorised."""
    leaf_parents = tree.encode(tree.leaves)[:, -2]
    order = np.argsort(leaf_parents, kind="stable")
    starts = np.searchsorted(leaf_parents[order], np.arange(tree.level_sizes[-2]))
    counts = np.bincount(leaf_parents, minlength=tree.level_sizes[-2])
    parents = tree.encode(y)[:, -2]
    picks = starts[parents] + (rng.random(len(y)) * counts[parents]).astype(int)
    return tree.leaves[order[picks]]


def test_real_tree_100k_predictions(cdiscount_tree):
    rng = np.random.default_rng(0)
    y_true = rng.choice(cdiscount_tree.leaves, size=100_000)
    y_pred = rng.choice(cdiscount_tree.leaves, size=100_000)
    y_pred[:30_000] = y_true[:30_000]
    y_pred[30_000:60_000] = _siblings(rng, cdiscount_tree, y_true[30_000:60_000])
    accuracy = level_accuracy_score(y_true, y_pred, tree=cdiscount_tree)
    reference = [
        np.mean(
            pd.Series(list(cdiscount_tree.level_labels(y_true, level=level)))
            == pd.Series(list(cdiscount_tree.level_labels(y_pred, level=level)))
        )
        for level in range(3)
    ]
    np.testing.assert_allclose(accuracy, reference)
    assert accuracy[2] == pytest.approx(np.mean(y_true == y_pred))
    assert accuracy[1] > 0.6 and accuracy[2] > 0.3
    for metric in HIERARCHICAL:
        for average in ("micro", "macro"):
            assert metric(y_true, y_pred, tree=cdiscount_tree, average=average) == pytest.approx(accuracy.mean())


def test_real_tree_agrees_with_hiclass(cdiscount_tree):
    """Cdiscount repeats level-2 names under different parents: hiclass sees them apart only through the prefixes."""
    rng = np.random.default_rng(1)
    shared = [leaf for name in ("ONGLERIE", "SECURITE") for node in cdiscount_tree.nodes(1) if node[-1] == name
              for leaf in cdiscount_tree.leaves_under(node)]
    y_true = np.concatenate([rng.choice(cdiscount_tree.leaves, size=300), rng.choice(shared, size=100)])
    y_pred = _near_misses(rng, cdiscount_tree, y_true)
    y_pred[300:] = rng.choice(shared, size=100)
    true_levels, pred_levels = _hiclass_labels(cdiscount_tree, y_true), _hiclass_labels(cdiscount_tree, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for ours, theirs in HICLASS.items():
            for average in ("micro", "macro"):
                expected = theirs(true_levels, pred_levels, average=average)
                assert ours(y_true, y_pred, tree=cdiscount_tree, average=average) == pytest.approx(expected)


def test_real_tree_top_k_by_level(cdiscount_tree):
    rng = np.random.default_rng(2)
    y_true = rng.choice(cdiscount_tree.leaves, size=500)
    proba = rng.dirichlet(np.full(len(cdiscount_tree), 0.05), size=500)
    for level in range(3):
        expected = _reference_top_k_at_level(cdiscount_tree, y_true, proba, cdiscount_tree.leaves, level, k=5)
        assert top_k_accuracy_score(y_true, proba, k=5, tree=cdiscount_tree, level=level) == pytest.approx(expected)


# -- top-k accuracy ---------------------------------------------------------------
def _reference_top_k_at_level(tree, y_true, proba, classes, level, k):
    """Sum columns per node with pandas, then ask scikit-learn."""
    nodes = tree.level_labels(classes, level=level)
    node_names = pd.Series(["/".join(node) for node in nodes])
    summed = pd.DataFrame(proba).T.groupby(node_names.to_numpy()).sum().T
    true_nodes = ["/".join(node) for node in tree.level_labels(y_true, level=level)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        scores = summed.to_numpy()
        if scores.shape[1] == 2:  # scikit-learn takes two classes as binary: the score of the second
            scores = scores[:, 1]
        return sklearn_top_k(true_nodes, scores, k=k, labels=summed.columns.to_numpy())


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_matches_sklearn_at_the_leaves_ties_included(small_tree, k):
    rng = np.random.default_rng(k)
    y_true = rng.choice(small_tree.leaves, size=400)
    proba = np.round(rng.dirichlet(np.ones(len(small_tree)), size=400), 1)  # many ties
    weights = rng.random(400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        expected = sklearn_top_k(y_true, proba, k=k, labels=small_tree.leaves)
        weighted = sklearn_top_k(y_true, proba, k=k, labels=small_tree.leaves, sample_weight=weights)
        assert top_k_accuracy_score(y_true, proba, labels=small_tree.leaves, k=k) == pytest.approx(expected)
        assert top_k_accuracy_score(y_true, proba, k=k, tree=small_tree) == pytest.approx(expected)
        assert top_k_accuracy_score(
            y_true, proba, labels=small_tree.leaves, k=k, sample_weight=weights
        ) == pytest.approx(weighted)


def test_top_k_follows_the_order_of_classes(small_tree):
    rng = np.random.default_rng(3)
    y_true = rng.choice(small_tree.leaves, size=200)
    proba = rng.dirichlet(np.ones(5), size=200)
    order = np.array([3, 0, 4, 1, 2])
    expected = sklearn_top_k(y_true, proba, k=2, labels=small_tree.leaves)
    shuffled = small_tree.leaves[order]
    assert top_k_accuracy_score(y_true, proba[:, order], labels=shuffled, k=2) == pytest.approx(expected)
    assert top_k_accuracy_score(
        y_true, proba[:, order], labels=small_tree.leaves[order], k=2, tree=small_tree, level=1
    ) == pytest.approx(_reference_top_k_at_level(small_tree, y_true, proba, small_tree.leaves, 1, k=2))


@pytest.mark.parametrize("level", [0, 1])
def test_top_k_sums_probabilities_into_the_level(small_tree, level):
    rng = np.random.default_rng(level)
    y_true = rng.choice(small_tree.leaves, size=300)
    proba = rng.dirichlet(np.ones(5), size=300)
    expected = _reference_top_k_at_level(small_tree, y_true, proba, small_tree.leaves, level, k=1)
    assert top_k_accuracy_score(y_true, proba, k=1, tree=small_tree, level=level) == pytest.approx(expected)


def test_top_k_hand_computed(small_tree):
    # columns 10, 11, 12, 20, 21; level-1 nodes Home/Garden, Home/Kitchen, Toys/Games, Toys/Kitchen
    proba = np.array([[0.3, 0.0, 0.3, 0.4, 0.0], [0.1, 0.5, 0.0, 0.2, 0.2]])
    y_true = [10, 20]
    # leaves, k=1: row 0's best is 20, row 1's is 11
    assert top_k_accuracy_score(y_true, proba, k=1, tree=small_tree) == 0.0
    # leaves, k=2: row 0's 10 ties with 12 (column 2 ranks first), row 1's 20 ties with 21 (column 4 first)
    assert top_k_accuracy_score(y_true, proba, k=2, tree=small_tree) == 0.0
    # level 1, k=1: row 0's Home/Kitchen has 0.6, row 1's Toys/Games 0.2 < Home/Garden's 0.5
    assert top_k_accuracy_score(y_true, proba, k=1, tree=small_tree, level=1) == 0.5
    # level 0, k=1: row 0's Home 0.6; row 1's Toys 0.4 < Home's 0.6
    assert top_k_accuracy_score(y_true, proba, k=1, tree=small_tree, level=0) == 0.5


def test_top_k_a_leaf_without_a_column_is_a_miss(small_tree):
    classes = np.array([10, 11, 20])  # the estimator never saw 12 and 21
    proba = np.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    assert top_k_accuracy_score([12, 21, 10], proba, labels=classes, k=2, tree=small_tree) == 0.0
    with pytest.warns(UndefinedMetricWarning):  # k covers every column, yet the unseen leaves still miss
        assert top_k_accuracy_score([12, 21, 10], proba, labels=classes, k=3, tree=small_tree) == pytest.approx(1 / 3)
    # at level 0 the unseen leaf 21 still has its parent "Toys" (through 20), 12 has "Home"
    at_top = top_k_accuracy_score([12, 21, 10], proba, labels=classes, k=1, tree=small_tree, level=0)
    assert at_top == pytest.approx(1 / 3)


def test_top_k_errors(small_tree):
    proba = np.full((2, 5), 0.2)
    with pytest.raises(ValueError, match="pass labels="):
        top_k_accuracy_score([10, 11], proba)
    with pytest.raises(ValueError, match="not in labels: 99"):
        top_k_accuracy_score([10, 99], proba, labels=small_tree.leaves, k=1)
    with pytest.raises(KeyError, match="y_true: .*99"):
        top_k_accuracy_score([10, 99], proba, k=1, tree=small_tree)
    with pytest.raises(KeyError, match="labels: .*98"):
        top_k_accuracy_score([10, 11], proba, labels=[10, 11, 12, 20, 98], k=1, tree=small_tree)
    with pytest.raises(ValueError, match="labels has 4 entries but y_score has 5 columns"):
        top_k_accuracy_score([10, 11], proba, labels=[10, 11, 12, 20], k=1)
    with pytest.raises(ValueError, match="repeat"):
        top_k_accuracy_score([10, 11], proba, labels=[10, 11, 12, 20, 20], k=1)
    with pytest.raises(ValueError, match="y_score has 2 rows but y_true has 3"):
        top_k_accuracy_score([10, 11, 12], proba, k=1, tree=small_tree)
    with pytest.raises(ValueError, match="shape"):
        top_k_accuracy_score([10, 11], proba[0], k=1, tree=small_tree)
    with pytest.raises(ValueError, match="level= needs tree="):
        top_k_accuracy_score([10, 11], proba, labels=small_tree.leaves, k=1, level=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_k_accuracy_score([10, 11], proba, k=0, tree=small_tree)
    with pytest.warns(UndefinedMetricWarning, match="'k' \\(2\\) greater than or equal to 'n_classes' \\(2\\)"):
        assert top_k_accuracy_score([10, 20], proba, k=2, tree=small_tree, level=0) == 1.0


# -- scorers in model selection -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_problem(small_tree):
    rng = np.random.default_rng(0)
    y = np.repeat(small_tree.leaves, 30)
    centres = rng.normal(size=(len(small_tree), 6)) * 1.5
    X = centres[small_tree.leaf_positions(y)] + rng.normal(size=(len(y), 6))
    return X, y


def test_scorers_in_grid_search(small_tree, tiny_problem):
    X, y = tiny_problem
    scoring = make_hierarchical_scorers(small_tree, top_k=2)
    assert sorted(scoring) == [
        "accuracy_level0", "accuracy_level1", "accuracy_level2", "hierarchical_f1", "top2_accuracy"
    ]
    search = GridSearchCV(LogisticRegression(), {"C": [0.01, 1.0]}, scoring=scoring, refit="hierarchical_f1", cv=3)
    search.fit(X, y)
    for name in scoring:
        scores = search.cv_results_[f"mean_test_{name}"]
        assert np.all((scores >= 0) & (scores <= 1)), name
    levels = [search.cv_results_[f"mean_test_accuracy_level{level}"] for level in range(3)]
    assert np.all(levels[0] >= levels[1]) and np.all(levels[1] >= levels[2])
    np.testing.assert_allclose(search.cv_results_["mean_test_hierarchical_f1"], np.mean(levels, axis=0))

    model = search.best_estimator_
    assert scoring["hierarchical_f1"](model, X, y) == pytest.approx(
        hierarchical_f1_score(y, model.predict(X), tree=small_tree)
    )
    assert scoring["accuracy_level1"](model, X, y) == pytest.approx(
        level_accuracy_score(y, model.predict(X), tree=small_tree, level=1)
    )
    assert scoring["top2_accuracy"](model, X, y) == pytest.approx(
        top_k_accuracy_score(y, model.predict_proba(X), labels=model.classes_, k=2)
    )


@pytest.mark.parametrize(
    ("metric", "kwargs"),
    [("precision", {"average": "macro"}), ("recall", {}), ("f1", {}), ("accuracy", {"level": 0}),
     ("top_k_accuracy", {"k": 1, "level": 1})],
)
def test_single_scorers_as_grid_search_scoring(small_tree, tiny_problem, metric, kwargs):
    X, y = tiny_problem
    scorer = make_hierarchical_scorer(small_tree, metric=metric, **kwargs)
    search = GridSearchCV(LogisticRegression(), {"C": [0.1, 1.0]}, scoring=scorer, cv=3).fit(X, y)
    assert 0 <= search.best_score_ <= 1
    restored = pickle.loads(pickle.dumps(scorer))
    assert restored(search.best_estimator_, X, y) == pytest.approx(scorer(search.best_estimator_, X, y))


def test_top_k_scorer_uses_classes_and_survives_unseen_leaves(small_tree, tiny_problem):
    X, y = tiny_problem
    seen = y != 21
    model = LogisticRegression().fit(X[seen], y[seen])  # classes_ lack 21
    scorer = make_hierarchical_scorer(small_tree, metric="top_k_accuracy", k=1)
    expected = top_k_accuracy_score(y, model.predict_proba(X), labels=model.classes_, k=1, tree=small_tree)
    assert scorer(model, X, y) == pytest.approx(expected)
    assert scorer(model, X[~seen], y[~seen]) == 0.0
    at_top = make_hierarchical_scorer(small_tree, metric="top_k_accuracy", k=1, level=0)
    assert at_top(model, X[~seen], y[~seen]) == pytest.approx(
        top_k_accuracy_score(
            y[~seen], model.predict_proba(X[~seen]), labels=model.classes_, k=1, tree=small_tree, level=0
        )
    )


def test_scorer_errors(small_tree):
    with pytest.raises(ValueError, match="metric must be one of"):
        make_hierarchical_scorer(small_tree, metric="roc_auc")
    with pytest.raises(ValueError, match="level= applies to"):
        make_hierarchical_scorer(small_tree, metric="f1", level=1)
    with pytest.raises(ValueError, match="average must be"):
        make_hierarchical_scorer(small_tree, metric="recall", average="samples")
    with pytest.raises(ValueError, match="k must be a positive int"):
        make_hierarchical_scorer(small_tree, metric="top_k_accuracy", k=0)
    with pytest.raises(IndexError, match="levels 0 to 2"):
        make_hierarchical_scorer(small_tree, metric="accuracy", level=5)
    with pytest.raises(TypeError, match="CategoryTree"):
        make_hierarchical_scorer(None)


# -- mistake severity -------------------------------------------------------------------------------------------------
def test_mistake_severity_is_the_height_of_the_lowest_common_ancestor(shared_data):
    from skproduct import CategoryTree
    from skproduct.metrics import make_hierarchical_scorer, mistake_severity, tree_distance

    tree = CategoryTree.from_csv(shared_data / "cdiscount" / "category_names.csv")
    frame = tree.to_frame()
    leaves = frame.iloc[:, 0].to_numpy()
    rng = np.random.default_rng(0)
    y_true = rng.choice(leaves, 5000)
    y_pred = np.where(rng.random(5000) < 0.4, y_true, rng.choice(leaves, 5000))
    distance = tree_distance(y_true, y_pred, tree=tree)
    codes_true, codes_pred = tree.encode(y_true), tree.encode(y_pred)
    expected = [3 - next((level for level in range(3) if codes_true[i, level] != codes_pred[i, level]), 3)
                for i in range(5000)]
    np.testing.assert_array_equal(distance, expected)  # the vectorised form equals the definition, row by row
    severity = mistake_severity(y_true, y_pred, tree=tree)
    assert severity.overall == pytest.approx(distance.mean())
    assert severity.mistakes == pytest.approx(distance[distance > 0].mean()) and severity.mistakes > severity.overall
    assert np.isnan(mistake_severity(y_true, y_true, tree=tree).mistakes)
    assert mistake_severity(y_true, y_true, tree=tree).overall == 0.0

    from sklearn.base import BaseEstimator, ClassifierMixin

    class Fixed(ClassifierMixin, BaseEstimator):
        classes_ = np.unique(leaves)

        def predict(self, X):
            return y_pred[: len(X)]

    scorer = make_hierarchical_scorer(tree, metric="mistake_severity")
    assert scorer(Fixed(), np.zeros((5000, 1)), y_true) == pytest.approx(-severity.overall)  # greater is better
