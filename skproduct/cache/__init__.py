"""A per-image, per-model embedding cache on disk, with checksums.

Vectors are keyed by ``(backbone fingerprint, image key)``: every fold of a
cross-validation, every candidate of a grid search, every head and every later
``predict`` reuses one extraction. Layout::

    <directory>/<fingerprint>/seg-<pid>-<random>.skemb
    <directory>/<fingerprint>/.compact.lock

Each segment file is immutable: a header, ``n`` 16-byte image keys, an
``n x d`` float32 (or, with ``EmbeddingCache(folder, dtype="float16")``,
float16: half the bytes) matrix, and a CRC-32 per block of rows (the formats
are described in :mod:`skproduct.cache._format`: float32 segments are format
2, float16 ones format 3, which adds the storage type to the header; segments
of format 1, without checksums, are still read). Writers never touch an existing file; they
write a new segment to a temporary name and rename it into place, so a run
killed mid-way leaves only whole segments, several processes can write into one
cache at once, and readers memory-map what they need and check each block's
checksum the first time they touch it.

What goes wrong, and what happens:

- a damaged block (a flipped byte): reported once with a
  :class:`~skproduct.exceptions.StaleFileWarning` naming the file and the
  block; its vectors read as missing, so their pictures are computed again;
  :meth:`EmbeddingCache.verify` finds every damaged block, and with
  ``repair=True`` rewrites the segment without it;
- a segment that is empty, cut short or not a segment: ignored with a
  :class:`~skproduct.exceptions.StaleFileWarning`;
- a folder that cannot be written (read-only, no permission, disk full): the
  vectors stay in the process's memory, with one
  :class:`~skproduct.exceptions.CacheWriteWarning`;
- two processes compacting at once: the second one merges nothing (a lock
  file), so there is never a second full copy.

At scale: the segments a process has seen are indexed in one sorted array of
keys (28 bytes a vector: 340 MB for Cdiscount's 12.4M pictures), so a lookup is
one binary search whatever the number of segments; a refresh that finds new
segments sorts only their keys and merges them in (no re-sort of what was
indexed); ``stats()`` counts from that index; compaction streams block by block.

The command line has the same housekeeping: ``skproduct cache verify|stats|prune|compact DIR``.
"""

from ._cache import EmbeddingCache
from ._format import KEY_BYTES

__all__ = ["KEY_BYTES", "EmbeddingCache"]
