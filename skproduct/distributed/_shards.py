"""The unit of distributed work: a picklable shard of picture references and their cache keys.

A shard holds references, never the pictures they point to: BSON pictures
travel as file, offset and length (packed into a few numpy arrays by
:class:`~skproduct.image_pipeline.data.CompactRefs`), image files as their
paths. In-memory pictures (bytes, arrays, PIL images) travel as they are,
since nothing else names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Shard", "make_shards"]


@dataclass(frozen=True)
class Shard:
    """Pictures ``start .. start + len(keys)`` of one extraction: their references and cache keys.

    Attributes
    ----------
    number : int
        The shard's position in its run.
    start : int
        The position of its first picture among the run's pictures.
    refs : CompactRefs or list
        The references (BSON pictures and paths packed into arrays).
    keys : ndarray of S16
        The cache key of each picture (:meth:`~skproduct.EmbeddingCache.keys_for`).

    Examples
    --------
    >>> import pickle
    >>> from skproduct.io.bson_refs import BsonImageRef
    >>> refs = [BsonImageRef("/data/train.bson", 1200 + 5000 * i, 5000, 7, i) for i in range(3)]
    >>> keys = np.array([bytes([i]) * 16 for i in range(3)], dtype="S16")
    >>> [s.pictures for s in make_shards(refs, keys, shard_size=2)]
    [2, 1]
    >>> len(pickle.dumps(make_shards(refs, keys, shard_size=2)[0])) < 1000  # no picture bytes inside
    True
    """

    number: int
    start: int
    refs: object
    keys: np.ndarray

    @property
    def pictures(self) -> int:
        return len(self.keys)

    def ref_list(self) -> list:
        """The references as a list (unpacked)."""
        return [self.refs[i] for i in range(len(self.refs))]


def make_shards(refs: list, keys: np.ndarray, shard_size: int) -> list[Shard]:
    """Cut ``refs`` (with their ``keys``) into shards of at most ``shard_size`` pictures, in order."""
    from ..image_pipeline.data import CompactRefs

    if len(refs) != len(keys):
        raise ValueError(f"one key per reference is needed; got {len(keys)} keys for {len(refs)} references")
    keys = np.asarray(keys, dtype="S16")
    return [
        Shard(number, start, CompactRefs.pack(list(refs[start : start + shard_size])), keys[start : start + shard_size])
        for number, start in enumerate(range(0, len(refs), shard_size))
    ]
