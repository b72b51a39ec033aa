"""Nearest neighbours by cosine similarity: an exact numpy search in bounded memory, and faiss for large sets.

Both backends return the same thing: for each query, the ``k`` most similar
base rows, most similar first, ties broken by the lower row. The candidates'
similarities are computed again by one function (:func:`_rescore`), whatever
backend found them, so the two backends give bit-identical answers wherever
they find the same candidates (always, for faiss's exact ``"Flat"`` index).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "l2_normalize", "nearest_neighbors"]

BACKENDS = ("exact", "faiss", "auto")
#: The most bytes of similarities the exact search holds at once (one chunk of queries against one tile of the
#: base; its temporaries, the ranking among them, take about four times as much).
CHUNK_BYTES = 16 * 2**20
#: Base rows per tile of the exact search: the base is read once per chunk of queries scored against a tile (1,024
#: queries at the default CHUNK_BYTES), not once per the few queries whose similarities to all of it fit.
TILE_ROWS = 4096
#: Spare candidates searched beyond ``k`` (at least), cut after re-scoring.
MARGIN = 8
#: ``backend="auto"`` uses faiss (when installed) from this many base rows on.
AUTO_FAISS_FROM = 50_000


def l2_normalize(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length (float32), and which rows were zero (they stay zero).

    Examples
    --------
    >>> unit, zero = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    >>> unit.tolist(), zero.tolist()
    ([[0.6000000238418579, 0.800000011920929], [0.0, 0.0]], [False, True])
    """
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1)
    zero = ~(norms > 0)
    out = np.zeros_like(X)
    np.divide(X, norms[:, None], out=out, where=~zero[:, None])
    return out, zero


def faiss_module():
    """``faiss``, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "backend='faiss' needs the faiss-cpu package, which is not installed: pip install 'skproduct[matching]' "
            "(or pip install faiss-cpu), or use backend='exact'"
        ) from exc
    return faiss


def resolve_backend(backend: str, n_base: int) -> str:
    """``"exact"`` or ``"faiss"``: ``"auto"`` picks faiss for large bases when it is installed."""
    if backend != "auto":
        return backend
    if n_base < AUTO_FAISS_FROM:
        return "exact"
    try:
        faiss_module()
    except ImportError:
        return "exact"
    return "faiss"


def nearest_neighbors(
    queries: np.ndarray, base: np.ndarray, k: int, *, backend: str = "exact", index: str = "Flat",
    exclude_self: bool = False, chunk_bytes: int = CHUNK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of ``base`` for each row of ``queries`` (both unit-length float32).

    Parameters
    ----------
    queries, base : ndarray of shape (n, d) and (m, d)
        Unit-length rows (zero rows are allowed: their similarities are 0).
    k : int
        Neighbours per query; fewer when ``base`` has fewer rows (then ``k = m``, or ``m - 1`` with ``exclude_self``).
    backend : {"exact", "faiss", "auto"}
        ``"exact"``: a numpy matrix product, chunk by chunk of queries so that at most ``chunk_bytes`` of
        similarities are held at once; ``"faiss"``: a faiss index built from the ``index`` factory string
        (``"Flat"``: exact, the same answers as ``"exact"``; ``"HNSW32"``, ``"IVF1024,Flat"``: approximate).
    exclude_self : bool
        ``queries`` is ``base``: leave each row out of its own neighbours.

    Returns
    -------
    similarities : ndarray of shape (n, k), float32
        Most similar first.
    indices : ndarray of shape (n, k), int64
        Rows of ``base``.

    Examples
    --------
    >>> X, _ = l2_normalize(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]))
    >>> sims, rows = nearest_neighbors(X, X, 1, exclude_self=True)
    >>> rows.ravel().tolist()
    [1, 0, 1]
    """
    n, m = len(queries), len(base)
    k = min(int(k), m - (1 if exclude_self else 0))
    if k <= 0 or n == 0:
        return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
    backend = resolve_backend(backend, m)
    extra = 1 if exclude_self else 0
    # A margin of spare candidates: the cut at k is made after re-scoring, by the same function for every
    # backend, so that near-ties that numpy and faiss round differently cannot change which candidates are kept.
    wide = min(m, k + extra + max(MARGIN, k // 2))
    if backend == "faiss":
        rows = _faiss_candidates(queries, base, wide, index)
    else:
        rows = _exact_candidates(queries, base, wide, chunk_bytes)
    padded = rows < 0  # an approximate index that found fewer than k candidates
    rows = np.where(padded, rows[:, :1], rows)
    if exclude_self:
        rows, padded = _drop_self(rows, padded, rows.shape[1] - 1)
    sims = _rescore(queries, base, rows)
    sims[padded] = -np.inf
    order = np.lexsort((rows, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _exact_candidates(queries: np.ndarray, base: np.ndarray, k: int, chunk_bytes: int) -> np.ndarray:
    """The ``k`` best base rows of each query, most similar first (ties: lower row first).

    A base longer than :data:`TILE_ROWS` rows is scored tile by tile, each
    tile against a whole chunk of queries while it sits in the CPU's cache,
    keeping each query's best ``k`` so far; scoring each small chunk of
    queries against the whole base instead streams all of it from memory once
    per chunk (at 100k x 1,280 that is 512 MB per 41 queries).
    """
    n, m = len(queries), len(base)
    tile = max(TILE_ROWS, 2 * k)
    chunk = max(1, int(chunk_bytes) // (4 * min(m, tile)))
    rows = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        block = queries[start : start + chunk]
        best_sims = np.empty((len(block), 0), dtype=np.float32)
        best_rows = np.empty((len(block), 0), dtype=np.int64)
        for at in range(0, m, tile):
            sims = block @ base[at : at + tile].T
            part = _top(sims, k)
            best_sims = np.concatenate([best_sims, np.take_along_axis(sims, part, axis=1)], axis=1)
            best_rows = np.concatenate([best_rows, part + at], axis=1)
            if best_sims.shape[1] > k:
                keep = _top(best_sims, k)
                best_sims = np.take_along_axis(best_sims, keep, axis=1)
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
        # Order the chosen ones (ties by row) so that the cut at k is the same one a full sort would make.
        order = np.lexsort((best_rows, -best_sims), axis=1)
        rows[start : start + len(block)] = np.take_along_axis(best_rows, order, axis=1)
    return rows


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest values of each row (all columns, in order, when there are no more)."""
    if values.shape[1] <= k:
        return np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    return np.argpartition(-values, k - 1, axis=1)[:, :k]


def _faiss_candidates(queries: np.ndarray, base: np.ndarray, k: int, index: str) -> np.ndarray:
    faiss = faiss_module()
    d = base.shape[1]
    try:
        search = faiss.index_factory(d, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot build the index {index!r}: {exc}; pass a faiss factory string such as "
                         "'Flat' (exact), 'HNSW32' or 'IVF1024,Flat'") from exc
    base = np.ascontiguousarray(base, dtype=np.float32)
    if not search.is_trained:
        search.train(base)
    search.add(base)
    _, rows = search.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return rows.astype(np.int64)


def _drop_self(rows: np.ndarray, padded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave each query's own row out of its ``k + 1`` candidates (or the last one when it is not among them)."""
    is_self = rows == np.arange(len(rows))[:, None]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, keep, axis=1), np.take_along_axis(padded, keep, axis=1)


def _rescore(queries: np.ndarray, base: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The similarities of each query to its candidate rows, computed the same way for every backend."""
    out = np.empty(rows.shape, dtype=np.float32)
    step = max(1, CHUNK_BYTES // max(1, 4 * rows.shape[1] * base.shape[1]))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        q = queries[start : start + len(block), None, :]
        out[start : start + len(block)] = np.matmul(q, base[block].transpose(0, 2, 1))[:, 0, :]
    return out
