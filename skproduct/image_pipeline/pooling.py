"""Streaming pooling: per-image outputs, arriving in image order, into per-product outputs, chunk by chunk.

Both image estimators pool through :func:`pool_products`: the embedder its
vectors, the fine-tuner its probabilities and embeddings. Memory holds one
chunk of products at a time, whatever the size of the catalogue.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from ..exceptions import EmptyProductWarning

__all__ = ["PRODUCTS_PER_CHUNK", "pool_products"]

#: Products pooled together: bounds memory at one chunk's products x width.
PRODUCTS_PER_CHUNK = 4096


def pool_products(
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    owner: np.ndarray,
    *,
    how: str = "mean",
    fallback: np.ndarray | float = 0.0,
    chunk_size: int | None = None,
    fallback_name: str = "a zero vector",
) -> Iterator[tuple[int, np.ndarray]]:
    """Pool image outputs into product outputs; yield ``(first product, pooled rows)`` chunk by chunk.

    Parameters
    ----------
    batches : iterable of (positions, outputs, used)
        Image positions (increasing across batches), their outputs
        ``(len(positions), width)``, and whether each image counts (``False``
        for images the bad-image policy skipped).
    owner : ndarray of int
        The product of each image, non-decreasing (:func:`flatten_products`).
    how : {"mean", "max"}
        How a product's images are combined.
    fallback : ndarray or float
        The row of a product without a usable image.
    chunk_size : int, optional
        Products per chunk (default :data:`PRODUCTS_PER_CHUNK`).
    fallback_name : str
        What ``fallback`` is, for the :class:`~skproduct.exceptions.EmptyProductWarning`
        given when some products got it.

    Examples
    --------
    >>> import numpy as np
    >>> owner = np.array([0, 0, 1])
    >>> batches = [(np.array([0, 1]), np.array([[1.0], [3.0]]), np.array([True, True])),
    ...            (np.array([2]), np.array([[5.0]]), np.array([True]))]
    >>> [(start, rows.ravel().tolist()) for start, rows in pool_products(batches, owner, how="max")]
    [(0, [3.0, 5.0])]
    """
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
    size = chunk_size or PRODUCTS_PER_CHUNK
    n_products = int(owner[-1]) + 1 if len(owner) else 0
    chunk_of_image, row_of_image = np.divmod(owner, size)
    acc, counts, chunk = None, None, 0
    n_empty, first_empty = 0, -1

    def finished():
        nonlocal n_empty, first_empty
        rows = acc / np.maximum(counts, 1)[:, None] if how == "mean" else acc
        empty = counts == 0
        if empty.any():
            rows[empty] = fallback
            if first_empty < 0:
                first_empty = chunk * size + int(np.flatnonzero(empty)[0])
            n_empty += int(empty.sum())
        return chunk * size, rows

    for positions, outputs, used in batches:
        if not len(positions):
            continue
        parts = chunk_of_image[positions]
        for part in np.unique(parts):
            while acc is not None and part > chunk:  # the images moved past this chunk: it is complete
                yield finished()
                acc, counts, chunk = None, None, chunk + 1
            if acc is None:
                chunk = int(part)
                n_rows = min(size, n_products - chunk * size)
                acc = np.zeros((n_rows, outputs.shape[1])) if how == "mean" else np.full((n_rows, outputs.shape[1]), -np.inf)
                counts = np.zeros(n_rows, dtype=np.int64)
            take = (parts == part) & np.asarray(used, dtype=bool)
            rows = row_of_image[positions[take]]
            if how == "mean":
                np.add.at(acc, rows, outputs[take])
            else:
                np.maximum.at(acc, rows, outputs[take])
            counts += np.bincount(rows, minlength=len(counts))
    if acc is not None:
        yield finished()
    if n_empty:
        warnings.warn(
            f"{n_empty} of {n_products} products had no usable picture (the first is product {first_empty}) and "
            f"got {fallback_name}",
            EmptyProductWarning,
            stacklevel=3,
        )
