"""Exact and near duplicates of one set of products in another, and the labels they carry over.

An *exact* duplicate shares a picture's content with a catalogue product: the
key is the one the embedding cache files vectors under (a BLAKE2b digest of the
picture's bytes, :func:`skproduct.images.picture_content`), so a feed embedded
through the cache costs no second read. A *near* duplicate has a vector whose
cosine similarity to a catalogue product's is at least a threshold (a
re-compressed, resized or lightly edited re-upload). The label lookup turns a
duplicate into a prediction: the catalogue product's label, which Cdiscount's
third-placed team used to correct their classifier on the test pictures that
were also training pictures.
"""

from __future__ import annotations

import logging

import numpy as np

from ._search import l2_normalize, nearest_neighbors

logger = logging.getLogger(__name__)

__all__ = ["content_keys", "duplicate_labels", "find_duplicates"]

COLUMNS = ("query", "catalogue", "kind", "similarity")


def content_keys(X, *, column: str | None = None, on_error: str = "raise") -> list[np.ndarray]:
    """Each product's picture keys: the content hashes the embedding cache files its vectors under.

    Parameters
    ----------
    X : DataFrame, Series or sequence
        Products as :class:`~skproduct.ImageEmbedder` takes them (a frame of
        :func:`~skproduct.io.read_bson` or :func:`~skproduct.io.read_table`,
        or one picture or list of pictures per product).
    column : str, optional
        The frame's picture column (default ``"images"``, then ``"image"``).
    on_error : {"raise", "skip"}, default="raise"
        A picture that cannot be read: stop with
        :class:`~skproduct.exceptions.ImageDecodeError`, or leave it out (its
        product then has fewer keys, maybe none).

    Returns
    -------
    list of ndarray of dtype S16
        One array of keys per product.

    Examples
    --------
    >>> keys = content_keys([b"one picture", [b"another", b"one picture"]])
    >>> [len(k) for k in keys], bool(keys[0][0] == keys[1][1])
    ([1, 2], True)
    """
    from ..cache import EmbeddingCache
    from ..exceptions import ImageDecodeError
    from ..image_pipeline import image_refs
    from ..images import picture_content

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out = []
    for refs in image_refs(X, column):
        contents = []
        for ref in refs:
            try:
                contents.append(picture_content(ref))
            except ImageDecodeError:
                if on_error == "raise":
                    raise
        out.append(EmbeddingCache.keys_for(contents) if contents else np.zeros(0, dtype="S16"))
    return out


def find_duplicates(
    query_keys=None, catalogue_keys=None, query_vectors=None, catalogue_vectors=None, *,
    threshold: float = 0.95, n_neighbors: int = 5, backend: str = "exact",
):
    """The duplicates in a catalogue of each query product: exact (a shared picture) and near (similar vectors).

    Pass keys (from :func:`content_keys`) for the exact duplicates, vectors
    (from an :class:`~skproduct.ImageEmbedder`) for the near ones, or both.

    Parameters
    ----------
    query_keys, catalogue_keys : list of arrays of S16 keys, optional
        Each product's picture keys.
    query_vectors, catalogue_vectors : array-like of shape (n, d), optional
        Each product's vector; zero vectors (no usable picture) have no near duplicates.
    threshold : float, default=0.95
        The least cosine similarity of a near duplicate.
    n_neighbors : int, default=5
        At most this many near duplicates per query product.
    backend : {"exact", "faiss", "auto"}, default="exact"
        The nearest-neighbour search (:class:`~skproduct.ProductMatcher`'s ``backend``).

    Returns
    -------
    pandas.DataFrame
        One row per (query product, catalogue product) pair: ``query`` and
        ``catalogue`` (positions), ``kind`` (``"exact"`` or ``"near"``) and
        ``similarity`` (cosine; 1.0 for an exact duplicate without vectors).
        Sorted by query, exact duplicates first, then by similarity.

    Examples
    --------
    >>> keys = content_keys([b"red shoe", b"blue bag"])
    >>> feed = content_keys([b"new hat", b"blue bag"])
    >>> find_duplicates(feed, keys)[["query", "catalogue", "kind"]].to_dict("records")
    [{'query': 1, 'catalogue': 1, 'kind': 'exact'}]
    >>> near = find_duplicates(query_vectors=[[1.0, 0.0], [0.0, 1.0]], catalogue_vectors=[[0.99, 0.05]])
    >>> near[["query", "catalogue", "kind"]].to_dict("records")
    [{'query': 0, 'catalogue': 0, 'kind': 'near'}]
    """
    import pandas as pd

    if (query_keys is None) != (catalogue_keys is None):
        raise ValueError("pass both query_keys and catalogue_keys (for exact duplicates), or neither")
    if (query_vectors is None) != (catalogue_vectors is None):
        raise ValueError("pass both query_vectors and catalogue_vectors (for near duplicates), or neither")
    if query_keys is None and query_vectors is None:
        raise ValueError("pass picture keys (content_keys) for exact duplicates, vectors for near ones, or both")
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity, between -1 and 1; got {threshold!r}")
    frames = []
    if query_keys is not None:
        frames.append(_exact_pairs(query_keys, catalogue_keys))
    if query_vectors is not None:
        q = np.asarray(query_vectors, dtype=np.float32)
        c = np.asarray(catalogue_vectors, dtype=np.float32)
        if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
            raise ValueError(f"query_vectors {q.shape} and catalogue_vectors {c.shape} must be 2-D with as many "
                             "columns: vectors from one embedder")
        if query_keys is not None and (len(q) != len(query_keys) or len(c) != len(catalogue_keys)):
            raise ValueError("pass one vector per product: the vectors and the keys count different products")
        frames.append(_near_pairs(q, c, threshold, n_neighbors, backend))
        if query_keys is not None and len(frames[0]):  # the exact pairs' similarity, from their vectors
            exact = frames[0]
            qu, _ = l2_normalize(q[exact["query"].to_numpy()])
            cu, _ = l2_normalize(c[exact["catalogue"].to_numpy()])
            exact["similarity"] = np.einsum("ij,ij->i", qu, cu).astype(np.float32)
    pairs = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    pairs = pairs.drop_duplicates(["query", "catalogue"], keep="first")  # exact pairs come first
    pairs = pairs.assign(_exact=pairs["kind"] != "exact").sort_values(
        ["query", "_exact", "similarity", "catalogue"], ascending=[True, True, False, True], kind="stable"
    )
    return pairs.drop(columns="_exact").reset_index(drop=True)


def _frame(query, catalogue, kind: str, similarity):
    import pandas as pd

    return pd.DataFrame({
        "query": np.asarray(query, dtype=np.int64), "catalogue": np.asarray(catalogue, dtype=np.int64),
        "kind": pd.Series([kind] * len(query), dtype=object), "similarity": np.asarray(similarity, np.float32),
    })


def _exploded(keys) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
    flat = np.concatenate([np.asarray(k, dtype="S16") for k in keys]) if sizes.sum() else np.zeros(0, "S16")
    return np.repeat(np.arange(len(keys)), sizes), flat


def _exact_pairs(query_keys, catalogue_keys):
    import pandas as pd

    q_owner, q_flat = _exploded(query_keys)
    c_owner, c_flat = _exploded(catalogue_keys)
    joined = pd.DataFrame({"query": q_owner, "key": q_flat}).merge(
        pd.DataFrame({"catalogue": c_owner, "key": c_flat}), on="key"
    ).drop_duplicates(["query", "catalogue"])
    return _frame(joined["query"], joined["catalogue"], "exact", np.ones(len(joined)))


def _near_pairs(q, c, threshold: float, n_neighbors: int, backend: str):
    qu, q_zero = l2_normalize(q)
    cu, c_zero = l2_normalize(c)
    sims, rows = nearest_neighbors(qu, cu, n_neighbors, backend=backend)
    keep = (sims >= threshold) & ~q_zero[:, None] & ~c_zero[rows]
    query = np.broadcast_to(np.arange(len(q))[:, None], rows.shape)[keep]
    return _frame(query, rows[keep], "near", sims[keep])


def duplicate_labels(duplicates, catalogue_labels, n_query: int, *, fill=None) -> tuple[np.ndarray, np.ndarray]:
    """The label lookup: each query product takes the label of its best duplicate (exact first, then the most
    similar), if it has one.

    Parameters
    ----------
    duplicates : DataFrame
        From :func:`find_duplicates`.
    catalogue_labels : array-like of shape (n_catalogue,)
        The catalogue products' labels (a category, a group).
    n_query : int
        The number of query products.
    fill : optional
        The label of products without a duplicate (default ``None``, in an object array).

    Returns
    -------
    labels : ndarray of shape (n_query,)
    found : ndarray of bool, shape (n_query,)
        Which products had a duplicate: ``np.where(found, labels, classifier.predict(X))`` corrects a
        classifier with them.

    Examples
    --------
    >>> dups = find_duplicates(content_keys([b"x", b"y"]), content_keys([b"y", b"z"]))
    >>> labels, found = duplicate_labels(dups, ["shoes", "bags"], 2, fill="?")
    >>> labels.tolist(), found.tolist()
    (['?', 'shoes'], [False, True])
    """
    catalogue_labels = np.asarray(catalogue_labels)
    if len(duplicates) and duplicates["catalogue"].max() >= len(catalogue_labels):
        raise ValueError(f"the duplicates name catalogue product {int(duplicates['catalogue'].max())}, but "
                         f"catalogue_labels holds {len(catalogue_labels)} labels: pass the catalogue's labels")
    best = duplicates.drop_duplicates("query", keep="first")  # find_duplicates sorts the best first
    query = best["query"].to_numpy()
    if len(query) and query.max() >= n_query:
        raise ValueError(f"the duplicates name query product {int(query.max())}, but n_query is {n_query}")
    found = np.zeros(n_query, dtype=bool)
    found[query] = True
    if fill is None:
        labels = np.full(n_query, None, dtype=object)
    else:
        labels = np.full(n_query, fill, dtype=np.result_type(catalogue_labels.dtype, np.asarray(fill).dtype))
    labels[query] = catalogue_labels[best["catalogue"].to_numpy()]
    return labels, found
