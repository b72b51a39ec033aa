"""Cache keys of the pictures of ``X``, computed without a Python loop over pictures where the source allows it.

For most references the key is the BLAKE2b hash of the picture's content
(:meth:`~skproduct.EmbeddingCache.keys_for`), which means reading every
picture. Pictures inside BSON files (the ``images`` column of
:func:`~skproduct.io.read_bson`, a :class:`~skproduct.io.BsonImagesArray`)
already know where they are: their key is computed, in numpy, from the
file's identity and each picture's byte range. The file's identity is its
size and its content signature (the SHA-256 of ten 64 KiB blocks that the
sidecar index uses, :mod:`skproduct.io.bson_sidecar`), not its name or its
modification time, so a copy of the file on another disk keeps its keys.

What this trades: no picture is read to look it up (a fully cached transform
of Cdiscount's 12M pictures reads none of the 58 GB), and a key costs a few
nanoseconds instead of a read and a hash; but a picture's key depends on
where it is: the same picture in two files, or passed once as bytes, is
cached twice; and a file edited in place without changing its size or its
sampled blocks keeps its keys (clear the cache after such an edit, as
``read_bson(..., rebuild_index=True)`` is needed for its index).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

__all__ = ["bson_images", "bson_picture_keys"]

_FILE_IDS: dict[tuple, bytes] = {}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def bson_images(X, column: str | None = None):
    """The :class:`~skproduct.io.BsonImagesArray` behind ``X`` (a frame, a Series or the array), or ``None``."""
    from ..io.bson_refs import BsonImagesArray

    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        return None
    if isinstance(X, pd.DataFrame):
        name = column or next((c for c in ("images", "image") if c in X.columns), None)
        if name is None or name not in X.columns:
            return None
        X = X[name]
    if isinstance(X, pd.Series):
        X = X.array
    return X if isinstance(X, BsonImagesArray) else None


def _file_id(path: str) -> bytes:
    """16 bytes that name a BSON file's content: its size and its sampled content signature."""
    from ..io.bson_sidecar import sample_spans

    stat = os.stat(path)
    memo = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    found = _FILE_IDS.get(memo)
    if found is None:
        digest = hashlib.sha256(b"skproduct-bson-picture-key-1:%d:" % stat.st_size)
        with open(path, "rb") as f:
            for offset, length in sample_spans(stat.st_size):
                f.seek(offset)
                digest.update(f.read(length))
        found = _FILE_IDS[memo] = digest.digest()[:16]
    return found


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bson_picture_keys(images) -> np.ndarray:
    """One 16-byte key per picture of ``images`` (a BsonImagesArray), in the order the embedder flattens them.

    Distinct byte ranges of one file always get distinct keys (the first
    half of the key is a bijection of the offset); keys of different files,
    or of other sources, collide with probability about 2**-64.

    Examples
    --------
    >>> import os, tempfile
    >>> from skproduct.datasets import write_synthetic_bson
    >>> from skproduct.io import read_bson
    >>> path = write_synthetic_bson(os.path.join(tempfile.mkdtemp(), "t.bson"), n_products=4, random_state=0)
    >>> frame = read_bson(path)
    >>> keys = bson_picture_keys(frame["images"].array)
    >>> len(keys) == int(frame["n_images"].sum()), len(set(keys.tolist())) == len(keys)
    (True, True)
    """
    count = np.asarray(images._count, dtype=np.int64)
    if (count < 0).any():
        raise ValueError(f"product {int(np.flatnonzero(count < 0)[0])} has no pictures (a missing row)")
    total = int(count.sum())
    first = np.repeat(np.asarray(images._start, dtype=np.int64) - np.cumsum(count) + count, count)
    picture = first + np.arange(total, dtype=np.int64)
    offset = images._img_offset[picture].astype(np.uint64)
    length = images._img_length[picture].astype(np.uint64)
    ids = np.frombuffer(b"".join(_file_id(p) for p in images._paths), dtype="<u8").reshape(-1, 2)
    code = np.repeat(np.asarray(images._path_code, dtype=np.int64), count)
    a, b = ids[code, 0], ids[code, 1]
    with np.errstate(over="ignore"):
        high = _mix(offset + a)  # a bijection of the offset within a file
        low = _mix(b ^ _mix(length * _GOLDEN + offset) ^ high)
    keys = np.empty((total, 2), dtype="<u8")
    keys[:, 0], keys[:, 1] = high, low
    return keys.view("S16").ravel()
