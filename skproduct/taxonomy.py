"""A category tree whose nodes are paths, with vectorised maps between leaves and levels."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CategoryTree"]

_CDISCOUNT_LEVELS = ("category_level1", "category_level2", "category_level3")
_NAMES_SHOWN = 5


def _show(values: Iterable[Any]) -> str:
    """The first few values, for an error message: ``1, 2, 3, 4, 5 and 7 more``."""
    values = list(values)
    shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in values[:_NAMES_SHOWN])
    return shown + (f" and {len(values) - _NAMES_SHOWN} more" if len(values) > _NAMES_SHOWN else "")


def _check_level(level: Any, depth: int) -> int:
    """The level index from 0 to ``depth - 1`` (``-1`` is the leaf level); a clear error for any other value."""
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(f"level must be an int (0 for the top level), got {level!r}")
    if not -depth <= level < depth:
        raise IndexError(f"level {level} does not exist; the tree has levels 0 to {depth - 1}")
    return int(level) % depth


class CategoryTree:
    """A catalogue's category tree: every leaf a label, every node a path of names.

    Nodes are identified by their *path* from the top, never by their name
    alone: Cdiscount has 483 level-2 names but 486 level-2 nodes, because a
    name such as ``"ACCESSOIRES"`` sits under several level-1 nodes. All leaves
    Levels are counted from 0 (the top level, Cdiscount's ``category_level1``)
    to ``depth - 1``, the deepest leaves.

    The tree may be *ragged*: leaves at different depths (a path of two names
    beside paths of three). A leaf above the deepest level continues, in the
    per-level codes, as a node with itself as its only child down to the last
    level: at a level below its depth, :meth:`encode` gives it the code of a
    node whose path is the leaf's own (shorter) path, so every leaf has a code
    at every level, a per-level classifier can predict "this leaf" at any level,
    and two leaves share a node at a level exactly when their codes agree there.
    :attr:`leaf_depths` gives each leaf's own depth. A leaf's path cannot be the
    beginning of another leaf's path (a node is either a leaf or a parent).

    Build one with :meth:`from_csv`, :meth:`from_frame`, :meth:`from_paths` or
    (for labels without a hierarchy) :meth:`one_level`.

    Parameters
    ----------
    leaves : sequence
        Leaf labels (for example Cdiscount's integer ``category_id``), one per path.
    paths : sequence of sequence of str
        The names from the top level down to the leaf, one path per leaf.

    Attributes
    ----------
    leaves : numpy.ndarray
        The leaf labels, sorted (the order of ``classes_`` in estimators).
    depth : int
        The number of levels (the length of the longest path).
    level_sizes : tuple of int
        The number of nodes at each level (at levels below a shallower leaf,
        that leaf counts as a node of the level).
    leaf_depths : numpy.ndarray
        Each leaf's depth (the length of its path), in :attr:`leaves` order.
    is_ragged : bool
        Whether the leaves sit at different depths.

    Examples
    --------
    >>> tree = CategoryTree.from_paths(
    ...     [("Home", "Kitchen", "Pans"), ("Home", "Garden", "Pans"), ("Toys", "Games", "Chess")],
    ...     leaves=[10, 11, 20],
    ... )
    >>> tree.level_sizes
    (2, 3, 3)
    >>> tree.path(11)
    ('Home', 'Garden', 'Pans')
    >>> tree.encode([20, 10])
    array([[1, 2, 2],
           [0, 1, 0]])
    >>> tree.children(("Home",))
    [('Home', 'Garden'), ('Home', 'Kitchen')]

    A ragged tree: the leaf ``30`` sits at depth 2 and keeps its own node at level 2.

    >>> ragged = CategoryTree.from_paths([("Home", "Pans", "Steel"), ("Home", "Pans", "Cast"), ("Toys", "Dolls")],
    ...                                  leaves=[10, 11, 30])
    >>> ragged.leaf_depths.tolist(), ragged.level_sizes
    ([3, 3, 2], (2, 2, 3))
    >>> ragged.encode([30, 11])
    array([[1, 1, 2],
           [0, 0, 1]])
    >>> ragged.decode([2], level=2), ragged.nodes(2)[2]
    (array([30]), ('Toys', 'Dolls'))
    """

    def __init__(self, leaves: Sequence[Any], paths: Sequence[Sequence[str]]):
        leaves = np.asarray(leaves)
        paths = [tuple(path) for path in paths]
        if leaves.ndim != 1 or len(leaves) != len(paths):
            raise ValueError(f"got {leaves.size} leaf labels for {len(paths)} paths; give one label per path")
        if not paths:
            raise ValueError("a CategoryTree needs at least one leaf")
        _check_paths(leaves, paths)
        order = np.argsort(leaves, kind="stable")
        self._leaves = leaves[order]
        self._leaves.flags.writeable = False
        self._paths = [paths[i] for i in order]
        self._build_levels()

    def _build_levels(self) -> None:
        depth = max(len(path) for path in self._paths)
        self._leaf_depths = np.array([len(path) for path in self._paths], dtype=np.intp)
        self._leaf_depths.flags.writeable = False
        self._levels: list[list[tuple[str, ...]]] = []
        self._node_code: list[dict[tuple[str, ...], int]] = []
        codes = np.empty((len(self._paths), depth), dtype=np.intp)
        for level in range(depth):
            prefixes = [path[: level + 1] for path in self._paths]  # a shallower leaf is its own node below it
            if level == depth - 1:
                nodes = prefixes  # leaves keep the order of the sorted leaf labels
            else:
                nodes = sorted(set(prefixes))
            lookup = {node: code for code, node in enumerate(nodes)}
            codes[:, level] = [lookup[prefix] for prefix in prefixes]
            self._levels.append(nodes)
            self._node_code.append(lookup)
        codes.flags.writeable = False
        self._codes = codes
        self._parent_codes = [np.full(len(self._levels[0]), -1, dtype=np.intp)]
        for level in range(1, depth):
            parents = np.empty(len(self._levels[level]), dtype=np.intp)
            parents[codes[:, level]] = codes[:, level - 1]
            self._parent_codes.append(parents)
        self._leaf_lookup = pd.Index(self._leaves)

    # -- constructors ------------------------------------------------------
    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        *,
        leaf_column: str = "category_id",
        level_columns: Sequence[str] | None = None,
    ) -> CategoryTree:
        """Build the tree from a frame with one row per leaf.

        A leaf above the deepest level leaves its trailing level columns
        empty (``""`` or missing): the tree is then ragged.

        Parameters
        ----------
        frame : pandas.DataFrame
            One row per leaf.
        leaf_column : str, default="category_id"
            The column of leaf labels.
        level_columns : sequence of str, optional
            The name columns from the top level down. Defaults to every other
            column, in order.

        Returns
        -------
        CategoryTree
        """
        if leaf_column not in frame.columns:
            raise KeyError(f"the frame has no leaf column {leaf_column!r} (columns: {list(frame.columns)})")
        if level_columns is None:
            level_columns = [c for c in frame.columns if c != leaf_column]
        missing = [c for c in level_columns if c not in frame.columns]
        if missing or not level_columns:
            raise KeyError(f"the frame lacks the level columns {missing or 'it needs'} (columns: {list(frame.columns)})")
        names = frame[list(level_columns)]
        empty = (names.isna() | (names.astype(str) == "")).to_numpy()
        # a ragged tree leaves the trailing levels of a shallower leaf empty; an empty name above a named one is a hole
        depths = np.where(empty.all(axis=1), 0, empty.shape[1] - np.argmin(empty[:, ::-1], axis=1))
        holes = empty & (np.arange(empty.shape[1]) < depths[:, None])
        bad = holes.any(axis=1) | (depths == 0)
        if bad.any():
            rows = list(frame.index[bad])
            raise ValueError(
                f"rows {_show(rows)} have an empty category name in {list(level_columns)} above a named level "
                "(or no name at all); only the trailing levels of a shallower leaf may be empty"
            )
        values = names.astype(str).to_numpy()
        paths = [tuple(row[:depth]) for row, depth in zip(values, depths)]
        return cls(frame[leaf_column].to_numpy(), paths)

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        *,
        leaf_column: str = "category_id",
        level_columns: Sequence[str] | None = _CDISCOUNT_LEVELS,
        **read_csv_kwargs: Any,
    ) -> CategoryTree:
        """Read the tree from a CSV with one row per leaf (Cdiscount's ``category_names.csv``).

        Empty trailing level columns make a leaf shallower (a ragged tree), as in :meth:`from_frame`.

        Parameters
        ----------
        path : str or path-like
            The CSV file.
        leaf_column : str, default="category_id"
            The column of leaf labels.
        level_columns : sequence of str or None, default=("category_level1", "category_level2", "category_level3")
            The name columns from the top level down; ``None`` takes every
            column but the leaf column, in file order.
        **read_csv_kwargs
            Passed to :func:`pandas.read_csv` (for example ``sep`` or ``encoding``).

        Returns
        -------
        CategoryTree
        """
        header = pd.read_csv(path, nrows=0, **read_csv_kwargs).columns
        if level_columns is None:
            level_columns = [c for c in header if c != leaf_column]
        missing = [c for c in [leaf_column, *level_columns] if c not in header]
        if missing:
            raise KeyError(
                f"{os.fspath(path)} has no column(s) {missing} (columns: {list(header)}); "
                "pass leaf_column= and level_columns="
            )
        dtypes = {c: str for c in level_columns}
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=False, **read_csv_kwargs)
        return cls.from_frame(frame, leaf_column=leaf_column, level_columns=level_columns)

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[str]], *, leaves: Sequence[Any] | None = None) -> CategoryTree:
        """Build the tree from leaf paths.

        Parameters
        ----------
        paths : iterable of sequence of str
            One path of names (top level first) per leaf; paths may differ in
            length (a ragged tree).
        leaves : sequence, optional
            The leaf labels. Defaults to the last name of each path, which
            must then be unique.

        Returns
        -------
        CategoryTree
        """
        paths = [tuple(str(name) for name in path) for path in paths]
        if leaves is None:
            leaves = [path[-1] if path else "" for path in paths]
            counts = pd.Series(leaves).value_counts()
            repeated = counts.index[counts > 1]
            if len(repeated):
                raise ValueError(
                    f"the leaf names {_show(repeated)} appear under several parents; "
                    "pass leaves= with a unique label for each path"
                )
        return cls(leaves, paths)

    @classmethod
    def one_level(cls, classes: Sequence[Any]) -> CategoryTree:
        """Build the flat tree of labels without a hierarchy: one level, whose nodes are the leaves.

        Each label is a leaf named ``str(label)``. Estimators that take a
        ``tree`` build this one when they are given none.

        Parameters
        ----------
        classes : sequence
            The distinct labels (for example ``numpy.unique(y)``).

        Returns
        -------
        CategoryTree

        Examples
        --------
        >>> tree = CategoryTree.one_level([30, 10, 20])
        >>> tree.depth, tree.leaves.tolist()
        (1, [10, 20, 30])
        >>> tree.path(20)
        ('20',)
        """
        return cls.from_paths([(str(c),) for c in classes], leaves=classes)

    # -- sizes -------------------------------------------------------------
    @property
    def leaves(self) -> np.ndarray:
        return self._leaves

    @property
    def depth(self) -> int:
        return len(self._levels)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return tuple(len(nodes) for nodes in self._levels)

    @property
    def leaf_depths(self) -> np.ndarray:
        return self._leaf_depths

    @property
    def is_ragged(self) -> bool:
        return bool(self._leaf_depths.min() != len(self._levels))

    def __len__(self) -> int:
        return len(self._leaves)

    def __contains__(self, leaf: Any) -> bool:
        try:
            return bool(self._leaf_lookup.get_indexer([leaf])[0] >= 0)
        except TypeError:
            return False

    def __repr__(self) -> str:
        return f"CategoryTree(depth={self.depth}, level_sizes={self.level_sizes})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryTree):
            return NotImplemented
        return np.array_equal(self._leaves, other._leaves) and self._paths == other._paths

    __hash__ = None

    def __getstate__(self) -> dict:
        return {"leaves": self._leaves, "paths": self._paths}

    def __setstate__(self, state: dict) -> None:
        self._leaves = np.array(state["leaves"])
        self._leaves.flags.writeable = False
        self._paths = state["paths"]
        self._build_levels()

    # -- vectorised maps ---------------------------------------------------
    def leaf_positions(self, y: Sequence[Any]) -> np.ndarray:
        """Positions of leaf labels ``y`` in :attr:`leaves`.

        Raises
        ------
        KeyError
            Some labels are not leaves of the tree; the message names them.
        """
        y = np.asarray(y)
        try:
            positions = self._leaf_lookup.get_indexer(y.ravel())
        except TypeError:
            positions = np.full(y.size, -1)
        if (positions < 0).any():
            unknown = pd.unique(y.ravel()[positions < 0])
            raise KeyError(f"{len(unknown)} labels are not leaves of the tree: {_show(unknown)}")
        return positions.reshape(y.shape)

    def encode(self, y: Sequence[Any]) -> np.ndarray:
        """Integer node codes of each label's path, shape ``(n, depth)``.

        Column ``level`` holds the code of the ancestor at that level, an index
        into :meth:`nodes` ``(level)``; the last column is the leaf's position
        in :attr:`leaves`. In a ragged tree, at the levels below a leaf's depth
        the column holds the code of the leaf's own node at that level (the
        leaf carried down as its own only child), never a missing value.
        """
        return self._codes[self.leaf_positions(np.asarray(y).ravel())]

    def level_labels(self, y: Sequence[Any], *, level: int) -> np.ndarray:
        """The ancestor of each leaf label at ``level``, as an array of path tuples."""
        nodes = self._nodes_array(level)
        return nodes[self.encode(y)[:, _check_level(level, self.depth)]]

    def decode(self, codes: Sequence[int], *, level: int | None = None) -> np.ndarray:
        """Turn node codes at ``level`` back into nodes.

        At the leaf level (the default) this gives leaf labels; at other levels,
        path tuples.
        """
        level = self.depth - 1 if level is None else _check_level(level, self.depth)
        codes = np.asarray(codes, dtype=np.intp)
        size = self.level_sizes[level]
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise IndexError(f"codes at level {level} run from 0 to {size - 1}; got {codes.min()} to {codes.max()}")
        if level == self.depth - 1:
            return self._leaves[codes]
        return self._nodes_array(level)[codes]

    def parent_codes(self, level: int) -> np.ndarray:
        """For each node at ``level``, the code of its parent at ``level - 1`` (``-1`` at the top)."""
        return self._parent_codes[_check_level(level, self.depth)]

    # -- single nodes ------------------------------------------------------
    def nodes(self, level: int) -> list[tuple[str, ...]]:
        """The nodes at ``level``, as path tuples, in code order."""
        return list(self._levels[_check_level(level, self.depth)])

    def path(self, leaf: Any) -> tuple[str, ...]:
        """The names from the top level down to ``leaf``."""
        return self._paths[int(self.leaf_positions([leaf])[0])]

    def parent(self, node: Any) -> tuple[str, ...]:
        """The parent of a node (path tuple) or of a leaf label; ``()`` is the root."""
        return self._as_path(node)[:-1]

    def children(self, node: Sequence[str] = ()) -> list[tuple[str, ...]]:
        """The child nodes of ``node`` (a path tuple; ``()`` for the root), sorted."""
        node = tuple(node)
        level = len(node)
        if level == 0:
            return self.nodes(0)
        if level >= self.depth or node not in self._node_code[level - 1] or node in self._node_code[level]:
            raise KeyError(f"{node!r} is not an inner node of the tree")
        code = self._node_code[level - 1][node]
        child_codes = np.flatnonzero(self._parent_codes[level] == code)
        return sorted(self._levels[level][c] for c in child_codes)

    def leaves_under(self, node: Sequence[str]) -> np.ndarray:
        """The leaf labels below ``node`` (a path tuple)."""
        node = tuple(node)
        if not node:
            return self._leaves.copy()
        level = len(node) - 1
        if level >= self.depth or node not in self._node_code[level]:
            raise KeyError(f"{node!r} is not a node of the tree")
        return self._leaves[self._codes[:, level] == self._node_code[level][node]]

    def node_depth(self, node: Any) -> int:
        """The depth of a node: 1 for the top level, :attr:`depth` for a leaf."""
        return len(self._as_path(node))

    def to_frame(self, *, leaf_column: str = "category_id", level_columns: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per leaf: its label and its names, sorted by label (``""`` below a shallower leaf)."""
        if level_columns is None:
            level_columns = [f"category_level{level + 1}" for level in range(self.depth)]
        padded = [path + ("",) * (self.depth - len(path)) for path in self._paths]
        frame = pd.DataFrame(padded, columns=list(level_columns))
        frame.insert(0, leaf_column, self._leaves)
        return frame

    # -- helpers -----------------------------------------------------------
    def _nodes_array(self, level: int) -> np.ndarray:
        nodes = self._levels[_check_level(level, self.depth)]
        out = np.empty(len(nodes), dtype=object)
        out[:] = nodes
        return out

    def _as_path(self, node: Any) -> tuple[str, ...]:
        if isinstance(node, tuple):
            level = len(node) - 1
            if 0 <= level < self.depth and node in self._node_code[level]:  # a node's own level
                return node
            raise KeyError(f"{node!r} is not a node of the tree")
        return self.path(node)


def _check_paths(leaves: np.ndarray, paths: list[tuple[str, ...]]) -> None:
    """Reject empty paths and names, duplicate leaves, leaves under two parents and leaves above other leaves."""
    if any(len(path) == 0 for path in paths):
        raise ValueError("every leaf needs a path of at least one name; got an empty path")
    empty = [path for path in paths if any(not isinstance(name, str) or not name for name in path)]
    if empty:
        raise ValueError(f"{len(empty)} paths have an empty category name, for example {empty[0]!r}")
    if pd.isna(leaves).any():
        raise ValueError(f"{int(pd.isna(leaves).sum())} leaf labels are missing (NaN or None); every leaf needs a label")
    if leaves.dtype == object and len({type(v) for v in leaves}) > 1:
        raise TypeError(f"leaf labels must all be of one type, got {sorted({type(v).__name__ for v in leaves})}")
    frame = pd.DataFrame({"leaf": leaves, "path": paths})
    repeated = frame[frame["leaf"].duplicated(keep=False)]
    if len(repeated):
        by_leaf = repeated.groupby("leaf", sort=False)["path"].agg(lambda p: sorted(set(p)))
        two_parents = by_leaf[by_leaf.map(len) > 1]
        if len(two_parents):
            leaf, parents = next(iter(two_parents.items()))
            raise ValueError(
                f"{len(two_parents)} leaves sit under two parents, for example {leaf!r} under "
                f"{' and '.join(map(repr, parents))}; a leaf label must name one path"
            )
        raise ValueError(f"duplicate leaf labels: {_show(by_leaf.index)} appear on several rows")
    shared = frame[frame["path"].duplicated(keep=False)]
    if len(shared):
        path = shared["path"].iloc[0]
        labels = shared.loc[shared["path"] == path, "leaf"]
        raise ValueError(f"the leaves {_show(labels)} share the path {path!r}; each leaf needs its own path")
    if len({len(path) for path in paths}) > 1:
        full = set(paths)
        inner = {path[:level] for path in paths for level in range(1, len(path))}
        above = sorted(full & inner)
        if above:
            index = paths.index(above[0])
            raise ValueError(
                f"{len(above)} leaves are also parents of other leaves, for example {_show([leaves[index]])} at "
                f"{above[0]!r}; a node is either a leaf or a parent: give the products at such a node a leaf of its "
                "own below it (for example 'Other')"
            )
