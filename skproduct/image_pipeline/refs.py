"""From ``X`` to image references: one list per product, and the flat order the pipeline runs them in."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["flatten_products", "image_refs"]

_IMAGE_COLUMNS = ("images", "image")


def image_refs(X, column: str | None = None) -> list[list]:
    """Per product, the list of its image references.

    ``X`` is a DataFrame (from :func:`~skproduct.io.read_bson` or
    :func:`~skproduct.io.read_table`), a Series, or a sequence whose items are
    image references or lists of them. For a DataFrame, ``column`` names the
    image column; by default ``"images"`` or else ``"image"``.

    Examples
    --------
    >>> image_refs(["a.jpg", ["b.jpg", "c.jpg"]])
    [['a.jpg'], ['b.jpg', 'c.jpg']]
    """
    import pandas as pd

    if isinstance(X, pd.DataFrame):
        if column is None:
            column = next((c for c in _IMAGE_COLUMNS if c in X.columns), None)
            if column is None:
                raise ValueError(
                    f"the DataFrame has no 'images' or 'image' column (columns: {list(X.columns)}); pass column="
                )
        elif column not in X.columns:
            raise ValueError(f"the DataFrame has no column {column!r} (columns: {list(X.columns)})")
        X = X[column]
    if isinstance(X, (str, bytes, os.PathLike)) or not hasattr(X, "__len__"):
        raise TypeError(
            f"X must be a DataFrame, a Series or a sequence of image references, got {type(X).__name__}"
        )
    if isinstance(X, np.ndarray) and X.dtype != object:
        raise TypeError(
            "X is a numeric array; skproduct's image estimators take image references (paths, bytes, PIL "
            "images, uint8 arrays, BsonImageRef), one item (or list of items) per product"
        )
    products = []
    for position, item in enumerate(X):
        refs = list(item) if isinstance(item, (list, tuple)) else [item]
        if not refs:
            raise ValueError(f"product {position} has no pictures")
        products.append(refs)
    return products


def flatten_products(products: list[list]) -> tuple[list, np.ndarray]:
    """Every image of ``products`` in order, and the position of the product each belongs to.

    Examples
    --------
    >>> refs, owner = flatten_products([["a.jpg"], ["b.jpg", "c.jpg"]])
    >>> refs, owner.tolist()
    (['a.jpg', 'b.jpg', 'c.jpg'], [0, 1, 1])
    """
    refs = [ref for product in products for ref in product]
    return refs, np.repeat(np.arange(len(products)), [len(product) for product in products])
