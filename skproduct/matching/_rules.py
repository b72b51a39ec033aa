"""From neighbour lists to matches: the threshold, the at-least-one rule, neighbourhood blending, the F1 table.

Neighbour lists are ``(similarities, rows)`` of shape ``(n, k)``, most similar
first, each product's own row left out (as :func:`~._search.nearest_neighbors`
gives them with ``exclude_self=True``); a similarity of ``-inf`` marks a
candidate that must never be matched (a zero vector).
"""

from __future__ import annotations

import numpy as np

__all__ = ["blend", "choose", "connected_groups", "f1_table", "match_counts"]


def match_counts(sims: np.ndarray, threshold: float, k: int, at_least_one: bool) -> np.ndarray:
    """How many of each product's neighbours it matches: those at ``threshold`` or above, at most ``k``; with
    ``at_least_one``, its nearest neighbour when none is (unless that one is marked ``-inf``)."""
    counts = np.minimum((sims[:, :k] >= threshold).sum(axis=1), k)
    if at_least_one and sims.shape[1] and k > 0:
        counts = np.maximum(counts, np.isfinite(sims[:, 0]).astype(counts.dtype))
    return counts


def choose(sims: np.ndarray, rows: np.ndarray, threshold: float, k: int, at_least_one: bool, *,
           return_similarity: bool = False, with_self: bool = True):
    """Each product's match list: itself first (``with_self``), then its matches, most similar first."""
    counts = match_counts(sims, threshold, k, at_least_one)
    matches, similarities = [], []
    for i, count in enumerate(counts.tolist()):
        chosen = rows[i, :count]
        matches.append(np.concatenate([[i], chosen]).astype(np.int64) if with_self else chosen.astype(np.int64))
        if return_similarity:
            values = sims[i, :count].astype(np.float32)
            similarities.append(np.concatenate([[np.float32(1.0)], values]) if with_self else values)
    return (matches, similarities) if return_similarity else matches


def f1_table(sims: np.ndarray, rows: np.ndarray, codes: np.ndarray, ks, thresholds, at_least_one: bool) -> np.ndarray:
    """Kaggle's mean F1 (each product's set includes itself) for every ``(k, threshold)``: shape ``(len(ks),
    len(thresholds))``.

    Because the neighbours are sorted, the matches at a threshold are a prefix
    of each list, so one pass per threshold serves every ``k``.
    """
    n = len(codes)
    true_sizes = np.bincount(codes)[codes].astype(np.float64)
    width = sims.shape[1]
    same = (codes[rows] == codes[:, None]) & np.isfinite(sims) if width else np.zeros((n, 0), dtype=bool)
    hits = np.zeros((n, width + 1), dtype=np.int32)
    np.cumsum(same, axis=1, out=hits[:, 1:])
    table = np.empty((len(ks), len(thresholds)))
    first_ok = np.isfinite(sims[:, 0]).astype(np.int64) if width else np.zeros(n, dtype=np.int64)
    everyone = np.arange(n)
    for j, threshold in enumerate(thresholds):
        above = (sims >= threshold).sum(axis=1)
        for i, k in enumerate(ks):
            counts = np.minimum(above, min(int(k), width))
            if at_least_one and k > 0:
                counts = np.maximum(counts, first_ok)
            true_positive = 1 + hits[everyone, counts]
            table[i, j] = np.mean(2 * true_positive / (true_sizes + 1 + counts))
    return table


def blend(unit: np.ndarray, sims: np.ndarray, rows: np.ndarray, base: np.ndarray, alpha: float) -> np.ndarray:
    """Neighbourhood blending (alpha query expansion): each vector plus its neighbours' (rows of ``base``),
    weighted by similarity to the power ``alpha`` (negative and ``-inf`` ones count 0), L2-normalised again."""
    weights = np.where(np.isfinite(sims), np.clip(sims, 0, None), 0).astype(np.float32) ** np.float32(alpha)
    out = unit.astype(np.float32, copy=True)
    for j in range(rows.shape[1]):
        out += weights[:, j : j + 1] * base[rows[:, j]]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def connected_groups(matches, n: int | None = None) -> np.ndarray:
    """Group ids from match lists: the connected components of the match graph (a match in either direction links
    two products), numbered 0, 1, ... in the order of their first product.

    Examples
    --------
    >>> connected_groups([[0, 2], [1], [2], [3, 2]]).tolist()
    [0, 1, 0, 0]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(matches) if n is None else n
    sizes = np.fromiter((len(m) for m in matches), dtype=np.int64, count=len(matches))
    heads = np.repeat(np.arange(len(matches)), sizes)
    tails = np.concatenate([np.asarray(m, dtype=np.int64).ravel() for m in matches]) if len(matches) else heads
    graph = coo_matrix((np.ones(len(heads), dtype=np.int8), (heads, tails)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=True, connection="weak")
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[labels]
