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
    """splitmix64's finaliser, in place on ``x`` (uint64): a bijection that spreads every input bit over the output.

    In place, with one scratch array, so that millions of keys cost no fresh
    temporaries (each one a round of page faults) per step.
    """
    scratch = np.empty_like(x)
    with np.errstate(over="ignore"):
        for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(x, np.uint64(shift), out=scratch)
            np.bitwise_xor(x, scratch, out=x)
            np.multiply(x, np.uint64(multiplier), out=x)
        np.right_shift(x, np.uint64(31), out=scratch)
        np.bitwise_xor(x, scratch, out=x)
    return x


def _picture_rows(images, count: np.ndarray, total: int) -> slice | np.ndarray:
    """Where the pictures of ``images`` are in its offset/length arrays: a slice when they are contiguous."""
    start = np.asarray(images._start, dtype=np.int64)
    if len(start) and np.array_equal(start[1:], start[0] + np.cumsum(count[:-1])):
        return slice(int(start[0]), int(start[0]) + total)  # a whole file, or a contiguous run of its products
    first = np.repeat(start - np.cumsum(count) + count, count)
    first += np.arange(total, dtype=np.int64)
    return first


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
    rows = _picture_rows(images, count, total)
    offset = np.asarray(images._img_offset[rows], dtype=np.int64).view(np.uint64)
    length = np.asarray(images._img_length[rows], dtype=np.int64).view(np.uint64)
    ids = np.frombuffer(b"".join(_file_id(p) for p in images._paths), dtype="<u8").reshape(-1, 2)
    codes = np.asarray(images._path_code)
    if len(ids) == 1 or (len(codes) and (codes == codes[0]).all()):  # one file: its identity is two numbers
        a, b = ids[codes[0] if len(codes) else 0]
    else:
        code = np.repeat(codes.astype(np.int64), count)
        a, b = ids[code, 0], ids[code, 1]
    with np.errstate(over="ignore"):
        high = _mix(offset + a)  # a bijection of the offset within a file
        low = np.multiply(length, _GOLDEN)
        low += offset
        _mix(low)
        low ^= b
        low ^= high
        _mix(low)
    keys = np.empty((total, 2), dtype="<u8")
    keys[:, 0], keys[:, 1] = high, low
    return keys.view("S16").ravel()
