"""TreeHeadClassifier: one softmax per tree level trained jointly, out of core, with the path and the CRM rules."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from skproduct import CategoryTree
from skproduct.heads import HierarchicalClassifier, TreeHeadClassifier
from skproduct.heads.tree import expected_tree_distance
from skproduct.metrics import (
    hierarchical_distance_at_k,
    hierarchical_f1_score,
    make_hierarchical_scorer,
    mistake_severity,
    tree_distance,
)

CHECKED = TreeHeadClassifier(max_iter=30, learning_rate=0.05, device="cpu", random_state=0)


def _expected_failed_checks(estimator):
    return {
        "check_sample_weight_equivalence_on_dense_data": (
            "minibatch Adam: repeated rows change the batches and the per-batch weight normalisation, so integer "
            "weights and repeated rows give close but not equal weights; zero weights are exactly removing the "
            "rows (test_zero_weights_drop_rows)"
        ),
    }


@parametrize_with_checks([CHECKED], expected_failed_checks=_expected_failed_checks, xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


# -- data ------------------------------------------------------------------------------------------------------------


def _synthetic(tree: CategoryTree, n: int, d: int = 16, noise: float = 0.6, seed: int = 0):
    """Rows whose features are nested along the tree: siblings closer than cousins."""
    rng = np.random.default_rng(seed)
    codes = tree.encode(tree.leaves)
    centres = np.zeros((len(tree.leaves), d))
    for level, size in enumerate(tree.level_sizes):
        centres += rng.normal(0, 1.0, size=(size, d))[codes[:, level]]
    leaves = rng.integers(0, len(tree.leaves), n)
    X = centres[leaves] + rng.normal(0, noise, size=(n, d))
    return X.astype(np.float32), tree.leaves[leaves]


TREE = CategoryTree.from_paths([(f"g{i // 6}", f"m{i // 2}", f"l{i}") for i in range(12)], leaves=list(range(12)))


def _ragged_tree() -> CategoryTree:
    paths = [("A", "a", "a1"), ("A", "a", "a2"), ("A", "b"), ("B", "c", "c1"), ("B", "c", "c2"), ("B", "d"),
             ("C",)]
    return CategoryTree.from_paths(paths, leaves=list(range(len(paths))))


def _fit(X, y, **params):
    params = {"tree": TREE, "device": "cpu", "random_state": 0, "learning_rate": 0.02, "max_iter": 40, **params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return TreeHeadClassifier(**params).fit(X, y)


# -- out of core -----------------------------------------------------------------------------------------------------


def test_float16_memmap_trains_streamed_without_a_copy_of_X(tmp_path, monkeypatch):
    from skproduct.heads import _tree_training

    X, y = _synthetic(TREE, 8_000, d=128)
    path = tmp_path / "X.npy"
    np.save(path, X.astype(np.float16))
    X16 = np.load(path, mmap_mode="r")
    # small blocks and buffers, so that streaming shows on a small file: the fit holds less than a float16 copy
    # of X at any time (a quarter of a float32 copy), whatever the size of X
    monkeypatch.setattr(_tree_training, "BUFFER_VALUES", 1 << 16)
    monkeypatch.setattr(_tree_training, "BLOCK_ROWS", 256)
    monkeypatch.setattr(_tree_training, "STAT_BLOCK_VALUES", 1 << 14)
    # The allocation peak is measured in a fresh process: tracemalloc.stop() while other threads allocate (threads
    # left by earlier tests, Dask's or OpenVINO's) corrupts CPython 3.11's heap (fixed in CPython 3.12.9 / 3.13.2).
    script = textwrap.dedent(f"""
        import tracemalloc, warnings
        import numpy as np
        from sklearn.exceptions import ConvergenceWarning
        from skproduct import CategoryTree, TreeHeadClassifier
        from skproduct.heads import _tree_training
        _tree_training.BUFFER_VALUES, _tree_training.BLOCK_ROWS, _tree_training.STAT_BLOCK_VALUES = 1 << 16, 256, 1 << 14
        tree = CategoryTree.from_paths([(f"g{{i // 6}}", f"m{{i // 2}}", f"l{{i}}") for i in range(12)],
                                       leaves=list(range(12)))  # TREE
        X16 = np.load({str(path)!r}, mmap_mode="r")
        y = np.load({str(tmp_path / "y.npy")!r}, allow_pickle=True)
        warnings.simplefilter("ignore", ConvergenceWarning)
        params = dict(tree=tree, device="cpu", random_state=0, learning_rate=0.02, max_iter=1)
        TreeHeadClassifier(**params).fit(X16[:500], y[:500])  # imports and first-call caches outside the measurement
        tracemalloc.start()
        TreeHeadClassifier(**{{**params, "max_iter": 2, "batch_size": 256}}).fit(X16, y)
        print(tracemalloc.get_traced_memory()[1])
    """)
    np.save(tmp_path / "y.npy", y, allow_pickle=True)
    peak = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert peak < X16.nbytes, f"fit allocated {peak / 2**20:.1f} MiB for a {X16.nbytes / 2**20:.1f} MiB X"
    model = _fit(X16, y, max_iter=2, batch_size=256)
    assert model.score(X16[:2000], y[:2000]) > 0.9
    # in memory, float16 or float32, the same model
    assert np.array_equal(_fit(np.asarray(X16), y, max_iter=2, batch_size=256).predict(X16[:500]),
                          model.predict(X16[:500]))


def test_predictions_are_row_independent_and_chunked(monkeypatch):
    import skproduct.heads.tree as tree_module

    X, y = _synthetic(TREE, 600)
    model = _fit(X, y)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    monkeypatch.setattr(tree_module, "_PREDICT_CELLS", 37)  # a few rows per chunk
    np.testing.assert_allclose(model.predict_proba(X[:7]), proba[:7], rtol=1e-5)  # float32 rounding only
    np.testing.assert_array_equal(model.predict(X), model.classes_[proba.argmax(axis=1)])
    model.set_params(decision="crm")
    np.testing.assert_array_equal(model.predict(X[:50]),
                                  model.classes_[expected_tree_distance(proba[:50], TREE).argmin(axis=1)])


def test_pickle_is_small_and_predicts_where_torch_cannot_import(tmp_path):
    import subprocess
    import sys

    X, y = _synthetic(TREE, 400)
    model = _fit(X, y, hidden_layer_sizes=(32,), dropout=0.1)
    blob = pickle.dumps(model)
    weights = sum(W.nbytes + b.nbytes for W, b in model.layers_)
    assert len(blob) < weights + 20_000
    assert all(W.dtype == np.float32 for W, _ in model.layers_)
    (tmp_path / "model.pkl").write_bytes(blob)
    np.save(tmp_path / "X.npy", X[:50])
    script = (
        "import sys, pickle\n"
        "class NoTorch:\n"  # any torch import now fails
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('no torch on this machine')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import numpy as np\n"
        f"model = pickle.load(open({str(tmp_path / 'model.pkl')!r}, 'rb'))\n"
        f"print(' '.join(map(str, model.predict(np.load({str(tmp_path / 'X.npy')!r})))))\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(v) for v in model.predict(X[:50])]


def test_nan_in_a_memmap_is_named(tmp_path):
    X, y = _synthetic(TREE, 300)
    X[250, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        _fit(X, y, max_iter=1)


# -- training options ------------------------------------------------------------------------------------------------


def test_hidden_layers_and_early_stopping_keep_the_best_epoch():
    X, y = _synthetic(TREE, 1200)
    model = _fit(X, y, hidden_layer_sizes=(64,), dropout=0.2, early_stopping=True, max_iter=15, n_iter_no_change=2)
    assert len(model.layers_) == 1 + TREE.depth and model.layers_[0][0].shape == (16, 64)
    assert model.best_iteration_ == int(np.argmin(model.validation_loss_curve_)) + 1
    assert model.score(X, y) > 0.9


def test_zero_weights_drop_rows():
    X, y = _synthetic(TREE, 500)
    weights = np.ones(len(y))
    weights[::3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weighted = TreeHeadClassifier(device="cpu", random_state=0, learning_rate=0.02, max_iter=3).fit(
            X, y, sample_weight=weights)
        dropped = TreeHeadClassifier(device="cpu", random_state=0, learning_rate=0.02, max_iter=3).fit(
            X[weights > 0], y[weights > 0])
    np.testing.assert_allclose(weighted.predict_proba(X[:20]), dropped.predict_proba(X[:20]), rtol=1e-4,
                               atol=1e-6)


def test_class_weight_lifts_the_rare_leaf():
    X, y = _synthetic(TREE, 3000, noise=2.5, seed=1)
    rare = 11
    keep = (y != rare) | (np.arange(len(y)) % 10 == 0)
    X, y = X[keep], y[keep]
    plain = _fit(X, y, max_iter=10)
    balanced = _fit(X, y, max_iter=10, class_weight="balanced")
    assert (balanced.predict(X) == rare).sum() > (plain.predict(X) == rare).sum()


def test_bad_parameters_are_named():
    X, y = _synthetic(TREE, 100)
    with pytest.raises(ValueError, match="level_weights must hold one non-negative weight per level"):
        _fit(X, y, tree=TREE, level_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="not leaves of the tree"):
        _fit(X, y + 100, tree=TREE)
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        _fit(X, y, hidden_layer_sizes=(0,))


def test_level_weights_change_the_objective():
    X, y = _synthetic(TREE, 500)
    a = _fit(X, y, tree=TREE, max_iter=2)
    b = _fit(X, y, tree=TREE, max_iter=2, level_weights=[0.0, 0.0, 1.0])
    assert not np.allclose(a.layers_[0][0], b.layers_[0][0])
    np.testing.assert_allclose(b.layers_[0][0], 0.0)  # a level of weight 0 is never trained (L2 keeps it at 0)


# -- the decision rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", [TREE, _ragged_tree()], ids=["uniform", "ragged"])
def test_expected_distance_matches_the_dense_leaves_by_leaves_sum(tree):
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(len(tree.leaves)) * 0.3, size=40)
    leaves = tree.leaves
    pairs = np.array(np.meshgrid(np.arange(len(leaves)), np.arange(len(leaves)), indexing="ij")).reshape(2, -1)
    dense = tree_distance(leaves[pairs[0]], leaves[pairs[1]], tree=tree).reshape(len(leaves), len(leaves))
    np.testing.assert_allclose(expected_tree_distance(proba, tree), proba @ dense.T, atol=1e-12)


def test_crm_picks_the_leaf_of_least_expected_distance():
    tree = CategoryTree.from_paths([("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1")])
    proba = np.array([[0.25, 0.25, 0.2, 0.3]])  # b1 is the most probable leaf, but A holds 70%
    expected = expected_tree_distance(proba, tree)
    np.testing.assert_allclose(expected, [[1.05, 1.05, 1.1, 1.4]])
    # on a fitted model, noisy rows: the CRM leaf never has a larger expected distance than the path leaf
    wide = CategoryTree.from_paths([(f"g{i // 20}", f"m{i // 4}", f"l{i}") for i in range(40)], leaves=list(range(40)))
    X, y = _synthetic(wide, 3000, noise=3.0, seed=2)
    model = _fit(X, y, tree=wide, max_iter=5)
    rows = np.arange(500)
    distance = expected_tree_distance(model.predict_proba(X[:500]), wide)
    path = wide.leaf_positions(model.predict(X[:500]))
    crm = wide.leaf_positions(model.set_params(decision="crm").predict(X[:500]))
    assert (distance[rows, crm] <= distance[rows, path] + 1e-12).all()
    assert (distance[rows, crm] < distance[rows, path] - 1e-9).any() and (crm != path).any()


def test_hierarchical_strategy_tree_reaches_the_head():
    X, y = _synthetic(TREE, 800)
    head = TreeHeadClassifier(device="cpu", random_state=0, learning_rate=0.02, max_iter=20, decision="crm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = HierarchicalClassifier(head, tree=TREE, strategy="tree").fit(X, y)
    inner = model.local_estimators_[(TREE.depth - 1, -1)]
    assert inner.tree_ is TREE and head.tree is None  # a clone, fitted with the classifier's tree
    np.testing.assert_array_equal(model.predict(X), inner.predict(X))
    np.testing.assert_allclose(model.predict_proba(X), inner.predict_proba(X))
    assert model.predict_level(X[:3], level=0).tolist() == inner.predict_level(X[:3], level=0).tolist()
    assert model.score(X, y) > 0.9
    with pytest.raises(ValueError, match="strategy='tree' trains a TreeHeadClassifier"):
        from sklearn.linear_model import LogisticRegression

        HierarchicalClassifier(LogisticRegression(), tree=TREE, strategy="tree").fit(X, y)


# -- ragged trees ----------------------------------------------------------------------------------------------------


def _fashion_ragged_csv(shared_data, tmp_path):
    """fashion-small's real tree, with every article type that is its sub-category's only child cut off: those
    sub-categories become leaves at depth 2 (the CSV's third column left empty)."""
    frame = pd.read_csv(shared_data / "fashion-small" / "category_names.csv", dtype=str, keep_default_na=False)
    level1, level2, level3 = frame.columns[1:4]
    only_child = frame.groupby([level1, level2])[level3].transform("size") == 1
    frame.loc[only_child, level3] = ""
    path = tmp_path / "ragged.csv"
    frame.to_csv(path, index=False)
    return path, int(only_child.sum()), [level1, level2, level3]


def test_ragged_fashion_tree_from_csv_trains_and_scores(shared_data, tmp_path):
    path, n_shallow, columns = _fashion_ragged_csv(shared_data, tmp_path)
    tree = CategoryTree.from_csv(path, level_columns=columns)
    assert tree.is_ragged and n_shallow > 0 and int((tree.leaf_depths == 2).sum()) == n_shallow
    assert len(tree) == 168 and tree.depth == 3
    X, y = _synthetic(tree, 3000, seed=3)
    model = _fit(X[:2400], y[:2400], tree=tree, max_iter=20)
    shallow = np.isin(y[2400:], tree.leaves[tree.leaf_depths == 2])
    predicted = model.predict(X[2400:])
    assert np.mean(predicted == y[2400:]) > 0.7 and np.mean(predicted[shallow] == y[2400:][shallow]) > 0.7
    assert 0 <= mistake_severity(y[2400:], predicted, tree=tree).overall < 1
    assert hierarchical_f1_score(y[2400:], y[2400:], tree=tree) == 1.0
    crm = model.set_params(decision="crm").predict(X[2400:])
    assert np.isin(crm, tree.leaves).all()
    for strategy in ("per_level", "per_parent", "flat"):
        from sklearn.linear_model import LogisticRegression

        local = HierarchicalClassifier(LogisticRegression(max_iter=200), tree=tree, strategy=strategy)
        assert local.fit(X[:2400], y[:2400]).score(X[2400:], y[2400:]) > 0.6, strategy


def test_ragged_tree_distances_count_from_the_deeper_leaf():
    tree = _ragged_tree()  # 0 A/a/a1, 1 A/a/a2, 2 A/b, 3 B/c/c1, 4 B/c/c2, 5 B/d, 6 C
    true = [0, 0, 2, 5, 2, 6, 6]
    pred = [1, 2, 2, 3, 5, 6, 0]
    assert tree_distance(true, pred, tree=tree).tolist() == [1, 2, 0, 2, 2, 0, 3]
    # hierarchical F1 counts each leaf's own nodes: 2 for A/b, 3 for A/a/a1
    assert hierarchical_f1_score([2], [0], tree=tree) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


# -- hierarchical distance at k --------------------------------------------------------------------------------------


def test_hierarchical_distance_at_k_is_the_mean_distance_of_the_top_k():
    tree = _ragged_tree()
    rng = np.random.default_rng(0)
    scores = rng.random((30, len(tree.leaves)))
    y = tree.leaves[rng.integers(0, len(tree.leaves), 30)]
    for k in (1, 3, 7):
        top = np.argsort(-scores, axis=1)[:, :k]
        expected = np.mean([tree_distance(np.repeat(y[i], k), tree.leaves[top[i]], tree=tree).mean()
                            for i in range(30)])
        assert hierarchical_distance_at_k(y, scores, tree=tree, k=k) == pytest.approx(expected)
    top1 = tree.leaves[scores.argmax(axis=1)]
    assert hierarchical_distance_at_k(y, scores, tree=tree, k=1) == pytest.approx(
        mistake_severity(y, top1, tree=tree).overall)
    with pytest.raises(ValueError, match="k must be a positive int"):
        hierarchical_distance_at_k(y, scores, tree=tree, k=0)


def test_distance_at_k_scorer_maps_columns_through_classes():
    X, y = _synthetic(TREE, 600)
    model = _fit(X, y)
    scorer = make_hierarchical_scorer(TREE, metric="hierarchical_distance_at_k", k=3)
    expected = hierarchical_distance_at_k(y, model.predict_proba(X), tree=TREE, k=3, labels=model.classes_)
    assert scorer(model, X, y) == pytest.approx(-expected)
    assert pickle.loads(pickle.dumps(scorer))(model, X, y) == pytest.approx(-expected)


# -- the loss FineTuneClassifier shares ------------------------------------------------------------------------------


def test_finetune_network_uses_the_shared_tree_functions():
    import torch
    import torch.nn.functional as F

    from skproduct._finetune_parts import ClassifierNetwork
    from skproduct.heads._tree_training import leaf_log_proba, level_losses

    codes = TREE.encode(TREE.leaves)
    network = ClassifierNetwork(torch.nn.Identity(), 4, TREE.level_sizes, codes)
    logits = network(torch.randn(5, 4))
    np.testing.assert_allclose(network.leaf_log_proba(logits).detach(),
                               leaf_log_proba(logits, network.leaf_codes).detach())
    targets = torch.as_tensor(codes[[0, 3, 5, 7, 11]])
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0])
    expected = sum((F.cross_entropy(z, targets[:, level], reduction="none") * weights).sum() / weights.sum()
                   for level, z in enumerate(logits))
    np.testing.assert_allclose(float(level_losses(logits, targets, weights)), float(expected), rtol=1e-6)
    level_weighted = level_losses(logits, targets, weights, level_weights=[0.0, 0.0, 2.0])
    last = (F.cross_entropy(logits[-1], targets[:, -1], reduction="none") * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(level_weighted), 2 * float(last), rtol=1e-6)


def test_cli_strategy_tree_builds_the_tree_head(tmp_path):
    from skproduct.cli._commands import _head
    from skproduct.cli._parser import build_parser

    args = build_parser().parse_args(["fit", "train.bson", "--out", str(tmp_path / "m.joblib"), "--head",
                                      "hierarchical", "--strategy", "tree", "--random-state", "3"])
    model = _head("hierarchical", args, _ragged_tree())
    assert model.strategy == "tree" and isinstance(model.estimator, TreeHeadClassifier)
    assert model.estimator.random_state == 3
    X, y = _synthetic(model.tree, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert np.isin(model.fit(X, y).predict(X), model.tree.leaves).all()


def _mapping_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    import re

    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: its address range, ..., its file
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_pages_read_from_a_memmap_are_released_and_its_data_kept(tmp_path):
    from skproduct.heads.tree import release_pages

    path = tmp_path / "x.npy"
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(4096, 256))
    X[:] = 1.0
    X.flush()
    del X
    X = np.load(path, mmap_mode="r")
    assert float(X.sum()) == 4096 * 256  # every page read: 4 MiB resident
    before = _mapping_rss_kib(path)
    release_pages(np.asarray(X), 0, len(X))  # through a view, as validation hands it over
    assert before > 3_000 and _mapping_rss_kib(path) < 100, (before, _mapping_rss_kib(path))
    assert float(X.sum()) == 4096 * 256  # the data is the file's: read again from the page cache
    private = np.load(path, mmap_mode="c")  # copy-on-write: releasing would lose the change, so it is left alone
    private[0, 0] = 5.0
    release_pages(private, 0, len(private))
    assert private[0, 0] == 5.0
