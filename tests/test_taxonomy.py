"""CategoryTree: nodes are paths; real trees; vectorised maps; bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skproduct import CategoryTree


@pytest.fixture(scope="module")
def cdiscount_tree(shared_data):
    return CategoryTree.from_csv(shared_data / "cdiscount" / "category_names.csv")


def test_cdiscount_tree_sizes_count_paths_not_names(cdiscount_tree, shared_data):
    table = pd.read_csv(shared_data / "cdiscount" / "category_names.csv")
    assert cdiscount_tree.level_sizes == (49, 486, 5270)
    assert cdiscount_tree.depth == 3 and len(cdiscount_tree) == 5270
    assert table["category_level2"].nunique() == 483
    assert table["category_level3"].nunique() == 5263
    assert len({node[-1] for node in cdiscount_tree.nodes(1)}) == 483


def test_level2_names_under_two_parents_are_distinct_nodes(cdiscount_tree):
    by_name: dict[str, list] = {}
    for node in cdiscount_tree.nodes(1):
        by_name.setdefault(node[-1], []).append(node)
    shared = {name: nodes for name, nodes in by_name.items() if len(nodes) > 1}
    assert sorted(shared) == ["ONGLERIE", "PROTECTION - ENTRETIEN", "SECURITE"]
    for nodes in shared.values():
        assert len(nodes) == 2 and nodes[0][0] != nodes[1][0]
        leaves = [set(cdiscount_tree.leaves_under(node)) for node in nodes]
        assert leaves[0] and leaves[1] and not leaves[0] & leaves[1]


def test_paths_and_codes_agree_with_the_csv(cdiscount_tree, shared_data):
    table = pd.read_csv(shared_data / "cdiscount" / "category_names.csv")
    sample = table.sample(200, random_state=0)
    codes = cdiscount_tree.encode(sample["category_id"])
    for (_, row), row_codes in zip(sample.iterrows(), codes):
        path = (row["category_level1"], row["category_level2"], row["category_level3"])
        assert cdiscount_tree.path(row["category_id"]) == path
        for level in range(3):
            assert cdiscount_tree.nodes(level)[row_codes[level]] == path[: level + 1]
    assert (cdiscount_tree.decode(codes[:, 2]) == sample["category_id"].to_numpy()).all()
    assert np.array_equal(cdiscount_tree.leaves, np.sort(table["category_id"].to_numpy()))


def test_fashion_tree(shared_data):
    tree = CategoryTree.from_csv(shared_data / "fashion-small" / "category_names.csv")
    assert tree.level_sizes == (7, 47, 168)
    assert len({node[-1] for node in tree.nodes(1)}) == 45
    assert len({node[-1] for node in tree.nodes(2)}) == 141


def test_parent_children_depth():
    tree = CategoryTree.from_paths([("A", "x", "1"), ("A", "y", "1"), ("B", "x", "2")], leaves=[5, 6, 7])
    assert tree.children() == [("A",), ("B",)]
    assert tree.children(("A",)) == [("A", "x"), ("A", "y")]
    assert tree.children(("A", "y")) == [("A", "y", "1")]
    assert tree.parent(6) == ("A", "y") and tree.parent(("A", "y")) == ("A",) and tree.parent(("A",)) == ()
    assert tree.node_depth(("B",)) == 1 and tree.node_depth(7) == 3
    assert list(tree.parent_codes(1)) == [0, 0, 1]
    assert list(tree.leaves_under(("A",))) == [5, 6]
    assert 5 in tree and 9 not in tree and "5" not in tree
    assert tree.level_labels([7, 5], level=1).tolist() == [("B", "x"), ("A", "x")]
    with pytest.raises(KeyError, match="not an inner node"):
        tree.children(("C",))
    with pytest.raises(IndexError, match="levels 0 to 2"):
        tree.nodes(3)
    with pytest.raises(IndexError, match="run from 0 to 2"):
        tree.decode([-1])
    assert not pickle.loads(pickle.dumps(tree)).leaves.flags.writeable


def test_one_level_tree_of_flat_labels():
    tree = CategoryTree.one_level(np.array([30, 10, 20]))
    assert tree.depth == 1 and tree.leaves.tolist() == [10, 20, 30]
    assert tree.nodes(0) == [("10",), ("20",), ("30",)] and tree.path(30) == ("30",)
    assert tree == CategoryTree.from_paths([("10",), ("20",), ("30",)], leaves=[10, 20, 30])
    assert CategoryTree.one_level(["b", "a"]).leaves.tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="duplicate leaf labels: 1"):
        CategoryTree.one_level([1, 1])


def test_levels_are_integers_and_options_keywords():
    tree = CategoryTree.from_paths([("A", "a"), ("B", "b")], leaves=[1, 2])
    assert tree.nodes(np.int64(-1)) == [("A", "a"), ("B", "b")]
    for level in (True, 1.0, "0"):
        with pytest.raises(TypeError, match="level must be an int"):
            tree.nodes(level)
    with pytest.raises(TypeError):
        tree.level_labels([1], 0)
    with pytest.raises(TypeError):
        CategoryTree.from_paths([("A", "a")], [1])


def test_unknown_labels_are_named():
    tree = CategoryTree.from_paths([("A", "a"), ("B", "b")], leaves=[1, 2])
    with pytest.raises(KeyError, match=r"2 labels are not leaves of the tree: 3, 99"):
        tree.encode([1, 3, 99, 3])
    with pytest.raises(KeyError, match="'1'"):
        tree.encode(["1"])


def test_bad_trees_are_rejected():
    with pytest.raises(ValueError, match="duplicate leaf labels: 1"):
        CategoryTree.from_paths([("A", "a"), ("A", "a")], leaves=[1, 1])
    with pytest.raises(ValueError, match="under two parents.*1"):
        CategoryTree.from_paths([("A", "a"), ("B", "a")], leaves=[1, 1])
    with pytest.raises(ValueError, match="share the path"):
        CategoryTree.from_paths([("A", "a"), ("A", "a")], leaves=[1, 2])
    with pytest.raises(ValueError, match="appear under several parents; pass leaves="):
        CategoryTree.from_paths([("A", "a"), ("B", "a")])
    with pytest.raises(ValueError, match="also parents of other leaves, for example 2 at \\('A',\\)"):
        CategoryTree.from_paths([("A", "a"), ("A",)], leaves=[1, 2])
    with pytest.raises(ValueError, match="empty path"):
        CategoryTree.from_paths([("A", "a"), ()], leaves=[1, 2])
    with pytest.raises(ValueError, match="empty category name"):
        CategoryTree.from_frame(pd.DataFrame({"category_id": [1], "l1": [None]}))
    with pytest.raises(ValueError, match=r"rows 1 have an empty category name .* above a named level"):
        CategoryTree.from_frame(pd.DataFrame({"category_id": [1, 2], "l1": ["A", "B"], "l2": ["a", ""],
                                              "l3": ["x", "y"]}))
    with pytest.raises(ValueError, match="empty category name"):
        CategoryTree.from_paths([("", "x")], leaves=[1])
    with pytest.raises(ValueError, match="1 leaf labels are missing"):
        CategoryTree.from_paths([("A", "x"), ("A", "y")], leaves=[1.0, float("nan")])
    with pytest.raises(KeyError, match="pass leaf_column= and level_columns="):
        CategoryTree.from_csv(__file__, leaf_column="nope")


def test_from_csv_with_other_column_names(tmp_path):
    path = tmp_path / "tree.csv"
    path.write_text("top;mid;leaf_id\nA;0007;10\nA;0008;11\n")
    tree = CategoryTree.from_csv(path, leaf_column="leaf_id", level_columns=["top", "mid"], sep=";")
    assert tree.path(11) == ("A", "0008")  # names stay strings as written
    assert tree.to_frame(leaf_column="leaf_id", level_columns=["top", "mid"]).equals(
        pd.DataFrame({"leaf_id": [10, 11], "top": ["A", "A"], "mid": ["0007", "0008"]})
    )


_NAMES = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=60, deadline=None)
@given(st.sets(st.tuples(_NAMES, _NAMES, _NAMES), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_random_trees_round_trip(paths, random):
    paths = sorted(paths)
    leaves = random.sample(range(1000), len(paths))
    tree = CategoryTree.from_paths(paths, leaves=leaves)
    codes = tree.encode(leaves)
    assert codes.shape == (len(paths), 3)
    assert list(tree.decode(codes[:, 2])) == leaves
    for leaf, path, row in zip(leaves, paths, codes):
        assert tree.path(leaf) == path
        for level in range(3):
            assert tree.nodes(level)[row[level]] == path[: level + 1]
            if level:
                assert tree.parent_codes(level)[row[level]] == row[level - 1]
    assert sum(len(tree.children(node)) for node in tree.nodes(1)) == len(paths)
    assert tree.level_sizes == tuple(len({p[: k + 1] for p in paths}) for k in range(3))
    restored = pickle.loads(pickle.dumps(tree))
    assert restored == tree and np.array_equal(restored.encode(leaves), codes)


# -- ragged trees ----------------------------------------------------------------------------------------------------


def _ragged():
    return CategoryTree.from_paths(
        [("Home", "Pans", "Steel"), ("Home", "Pans", "Cast"), ("Home", "Rugs"), ("Toys",)], leaves=[10, 11, 20, 30]
    )


def test_ragged_tree_from_lists_carries_shallow_leaves_down():
    tree = _ragged()
    assert tree.is_ragged and tree.depth == 3 and tree.leaf_depths.tolist() == [3, 3, 2, 1]
    assert tree.level_sizes == (2, 3, 4)
    codes = tree.encode([10, 20, 30])
    # below its depth a leaf keeps the code of its own node: ("Toys",) at levels 1 and 2, ("Home", "Rugs") at 2
    assert [tree.nodes(level)[codes[2, level]] for level in range(3)] == [("Toys",)] * 3
    assert [tree.nodes(level)[codes[1, level]] for level in range(3)] == [("Home",), ("Home", "Rugs"),
                                                                           ("Home", "Rugs")]
    assert tree.decode(codes[:, 2]).tolist() == [10, 20, 30]
    assert tree.level_labels([20, 30], level=1).tolist() == [("Home", "Rugs"), ("Toys",)]
    assert tree.children(("Home",)) == [("Home", "Pans"), ("Home", "Rugs")]
    with pytest.raises(KeyError, match="not an inner node"):
        tree.children(("Home", "Rugs"))
    assert tree.leaves_under(("Home",)).tolist() == [10, 11, 20]
    assert tree.node_depth(30) == 1 and tree.parent(20) == ("Home",)
    assert not CategoryTree.from_paths([("A", "a")]).is_ragged


def test_ragged_tree_round_trips_through_csv_with_empty_trailing_levels(tmp_path):
    tree = _ragged()
    frame = tree.to_frame()
    assert frame.loc[frame["category_id"] == 30, ["category_level2", "category_level3"]].values.tolist() == [["", ""]]
    path = tmp_path / "tree.csv"
    frame.to_csv(path, index=False)
    assert "30,Toys,,\n" in path.read_text()
    again = CategoryTree.from_csv(path)
    assert again == tree and pickle.loads(pickle.dumps(again)) == tree
    # missing values (NaN) in trailing levels read the same as empty strings
    assert CategoryTree.from_frame(pd.read_csv(path)) == tree


def test_cli_reads_a_ragged_tree(tmp_path):
    from skproduct.cli._data import read_tree

    path = tmp_path / "tree.csv"
    _ragged().to_frame().to_csv(path, index=False)
    assert read_tree(str(path)) == _ragged()
