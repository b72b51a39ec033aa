""":class:`EmbeddingCache`: the public face of the cache (lookups, writes, housekeeping)."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from .._files import temporary_pattern
from ..exceptions import CacheWriteWarning
from ._format import KEY_BYTES, KEY_DTYPE, storage_dtype, write_segment
from ._housekeeping import LOCK_NAME, UNWRITABLE, CompactResult, compact_folder, new_segment_path, verify_folder
from ._store import OLD_TMP_PREFIX, SUFFIX, Store, report_once, segment_names

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingCache"]

_LEFTOVER_PATTERNS = (temporary_pattern(f"*{SUFFIX}"), f"{OLD_TMP_PREFIX}*{SUFFIX}")
_STALE_TMP_SECONDS = 3600  # a temporary file older than this belongs to a killed run
_OPEN: dict = {}  # path (float32) or (path, "float16") -> the cache opened there
_OPEN_LOCK = threading.Lock()
_WHY = {
    errno.EROFS: ("the file system is read-only", "pass a cache folder on a writable disk"),
    errno.EACCES: ("no permission to write there", "pass a cache folder this user may write"),
    errno.EPERM: ("no permission to write there", "pass a cache folder this user may write"),
    errno.ENOSPC: ("the disk is full", "free some space, or prune the cache: skproduct cache prune DIR --max-bytes SIZE"),
}


class EmbeddingCache:
    """Vectors on disk, keyed by backbone fingerprint and image key, with checksums.

    Opening the same folder twice in one process gives the same object (and
    the same counters); copying or cloning it (as ``GridSearchCV`` does with an
    estimator's parameters) shares it too, and pickling keeps only the folder.

    Every segment file carries checksums, per block of rows; a lookup checks
    each block the first time it touches it. A damaged block is reported once
    (:class:`~skproduct.exceptions.StaleFileWarning`, naming the file and the
    block) and its vectors read as missing, so that the embedder computes those
    pictures again. When the folder cannot be written (read-only, no permission,
    disk full), :meth:`put` keeps the vectors in this process's memory instead,
    with one :class:`~skproduct.exceptions.CacheWriteWarning`.

    Parameters
    ----------
    directory : str or path-like
        The cache folder (created when first written). ``~`` is expanded.
    dtype : {"float32", "float16"}, default="float32"
        How new vectors are stored. ``"float16"`` takes half the disk and half
        the page cache (12.4M pictures x 1,280 features: 32 GB instead of 63 GB);
        lookups always return float32. Its cost in accuracy was measured at
        under 0.2 points for a linear head (``benchmarks/bench_scale.py``;
        see :doc:`/sizing`). The type is written in each segment, so one folder
        may hold both and any reader reads both.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> cache = EmbeddingCache(tempfile.mkdtemp())
    >>> keys = EmbeddingCache.keys_for([b"picture one", b"picture two"])
    >>> cache.put("model-a", keys, np.ones((2, 4), dtype=np.float32))
    >>> vectors, found = cache.get("model-a", keys)
    >>> found.tolist(), vectors.shape
    ([True, True], (2, 4))
    >>> cache.get("model-b", keys)[1].tolist()  # another model: nothing cached
    [False, False]
    >>> {k: cache.stats()[k] for k in ("hits", "misses", "items")}
    {'hits': 2, 'misses': 2, 'items': 2}
    >>> cache.verify()["damaged"]
    []
    >>> half = EmbeddingCache(tempfile.mkdtemp(), dtype="float16")
    >>> half.put("model-a", keys, np.full((2, 4), 0.1, dtype=np.float32))
    >>> half.get("model-a", keys)[0].dtype, half.stats()["bytes"] < cache.stats()["bytes"]
    (dtype('float32'), True)
    """

    def __new__(cls, directory: str | os.PathLike, dtype: str = "float32"):
        given = os.fspath(directory)
        path = os.path.abspath(os.path.expanduser(given))
        stored = storage_dtype(dtype)
        with _OPEN_LOCK:
            where = path if stored.name == "float32" else (path, stored.name)
            cache = _OPEN.get(where)
            if cache is None:
                cache = super().__new__(cls)
                cache._init(path, given)
                cache.dtype = stored.name
                _OPEN[where] = cache
        return cache

    def _init(self, path: str, given: str) -> None:
        self.dtype = "float32"
        self.directory = Path(path)
        self._given = given  # pickles keep what the user wrote ("~/emb"), not this machine's expansion
        self.hits = 0
        self.misses = 0
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()

    def __getnewargs__(self):
        return (self._given, self.dtype)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        pass

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __repr__(self) -> str:
        dtype = "" if self.dtype == "float32" else f", dtype={self.dtype!r}"
        return f"EmbeddingCache({str(self.directory)!r}{dtype})"

    # -- keys ----------------------------------------------------------------
    @staticmethod
    def keys_for(contents) -> np.ndarray:
        """16-byte BLAKE2b keys of picture contents (bytes), as an ``S16`` array."""
        from hashlib import blake2b

        return np.array([blake2b(c, digest_size=KEY_BYTES).digest() for c in contents], dtype=KEY_DTYPE)

    # -- reading and writing -------------------------------------------------
    def _store(self, fingerprint: str) -> Store:
        if not fingerprint or os.sep in fingerprint or fingerprint.startswith("."):
            raise ValueError(f"{fingerprint!r} is not a usable fingerprint")
        store = self._stores.get(fingerprint)
        if store is None:
            store = self._stores[fingerprint] = Store(self.directory / fingerprint)
        return store

    def get(self, fingerprint: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Look keys up; return ``(vectors of the found keys, found mask)`` and count hits and misses.

        The blocks the found keys are in have their checksums checked (once
        per process); the keys of a damaged block are reported missing.
        """
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        with self._lock:
            store = self._store(fingerprint)
            store.refresh()
            positions = store.lookup(keys)
            found = positions >= 0
            vectors = store.gather(positions[found])
            self.hits += int(found.sum())
            self.misses += int((~found).sum())
        return vectors, found

    def dimension(self, fingerprint: str) -> int | None:
        """The size of the vectors cached for ``fingerprint``, or ``None`` when there are none."""
        with self._lock:
            store = self._store(fingerprint)
            store.refresh()
            return store.dim

    def put(self, fingerprint: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors as one new segment, atomically (temporary file, then rename).

        When the folder cannot be written (:data:`errno.EROFS`, ``EACCES``,
        ``EPERM``, ``ENOSPC``, ``EDQUOT``, ``EFBIG``) the vectors are kept in
        this process's memory, where later lookups find them, and one
        :class:`~skproduct.exceptions.CacheWriteWarning` says why; other errors
        are raised.
        """
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"put needs one row of vectors per key; got {vectors.shape} for {len(keys)} keys")
        if not len(keys):
            return
        self._store(fingerprint)
        folder = self.directory / fingerprint
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                write_segment(new_segment_path(folder), keys, vectors.shape[1], [vectors], dtype=self.dtype)
            except FileNotFoundError:  # another process cleared the folder meanwhile
                folder.mkdir(parents=True, exist_ok=True)
                write_segment(new_segment_path(folder), keys, vectors.shape[1], [vectors], dtype=self.dtype)
        except OSError as exc:
            if exc.errno not in UNWRITABLE:
                raise
            with self._lock:
                self._store(fingerprint).add_memory(keys, vectors)
            self._report_unwritable(exc, f"{len(keys)} vectors are kept in this process's memory only (later "
                                         "runs compute them again)")

    def _report_unwritable(self, exc: OSError, consequence: str) -> None:
        why, fix = _WHY.get(exc.errno, (exc.strerror or "it cannot be written", "pass a writable cache folder"))
        told = report_once(
            ("unwritable", str(self.directory), exc.errno),
            f"the embedding cache {self.directory} could not be written ({why}: {exc}); {consequence}: {fix}",
            CacheWriteWarning, stacklevel=4,
        )
        if not told:
            logger.debug("the embedding cache %s is still not writable (%s): %s", self.directory, exc, consequence)

    # -- housekeeping ----------------------------------------------------------
    def stats(self) -> dict:
        """``hits`` and ``misses`` of this process; ``items``, ``bytes`` and ``fingerprints`` on disk.

        Cheap: reads the keys of segments not seen before (merged into the
        index without re-sorting it), checks no checksum (:meth:`verify` does);
        counting the items costs nothing more. ``items`` leaves out damaged
        blocks already found and vectors kept in memory only.
        """
        items = size = fingerprints = 0
        for folder in self._fingerprint_folders():
            fingerprints += 1
            size += sum(_size(p) for p in _segments(folder))
            store = self._store(folder.name)
            with self._lock:
                store.refresh()
                items += store.disk_items()
        return {"hits": self.hits, "misses": self.misses, "items": items, "bytes": size, "fingerprints": fingerprints}

    def summary(self) -> list[dict]:
        """One dict per fingerprint on disk: ``fingerprint``, ``items``, ``bytes``, ``segments``, ``dimension``,
        ``legacy`` (segments in format 1, without checksums). Cheap, like :meth:`stats`."""
        rows = []
        for folder in self._fingerprint_folders():
            store = self._store(folder.name)
            with self._lock:
                store.refresh()
                on_disk = [segment for segment in store.files if segment is not None]
                rows.append({
                    "fingerprint": folder.name, "items": store.disk_items(),
                    "bytes": sum(_size(p) for p in _segments(folder)), "segments": len(_segments(folder)),
                    "dimension": store.dim, "legacy": sum(segment.version == 1 for segment in on_disk),
                })
        return rows

    def verify(self, *, repair: bool = False) -> dict:
        """Check every block of every segment; with ``repair``, drop the damaged ones.

        Repair rewrites a segment with damaged blocks atomically without them
        (through :func:`skproduct._files.atomic_write`) and deletes a segment
        that cannot be used at all (its pictures are computed again when next
        needed). A fingerprint folder that another process is compacting is
        checked but not repaired (listed in ``busy``).

        Parameters
        ----------
        repair : bool, default=False
            Drop what is damaged.

        Returns
        -------
        dict
            ``segments``, ``blocks`` and ``vectors`` checked; ``damaged``: one
            dict per damaged segment, with ``fingerprint``, ``path``,
            ``blocks`` (the damaged block numbers, or ``None`` when the whole
            file is unusable), ``n_blocks`` (of the file), ``vectors`` (lost;
            ``None`` when unknown),
            ``reason`` and ``repaired``; ``legacy``: the paths of format-1
            segments, which have no checksums (:meth:`compact` rewrites them);
            ``busy``: fingerprints not repaired; ``clean``: no damage found.
        """
        total = {"segments": 0, "blocks": 0, "vectors": 0, "damaged": [], "legacy": [], "busy": []}
        for folder in self._fingerprint_folders():
            report = verify_folder(folder, repair=repair)
            for name in ("segments", "blocks", "vectors", "damaged", "legacy"):
                total[name] += report[name]
            if report["busy"]:
                total["busy"].append(folder.name)
            if any(entry["repaired"] for entry in report["damaged"]):
                with self._lock:
                    self._stores.pop(folder.name, None)  # rows moved: the next look reads the files again
        total["clean"] = not total["damaged"]
        return total

    def clear(self, fingerprint: str | None = None) -> None:
        """Delete every vector (or those of one fingerprint) and reset the counters.

        Only skproduct's segment files (and its compaction lock file) are
        deleted: other files in the folder are left alone, and a folder is
        removed only once it is empty.
        """
        with self._lock:
            targets = [self.directory / fingerprint] if fingerprint else list(self._fingerprint_folders())
            for folder in targets:
                for segment in _segments(folder):
                    segment.unlink(missing_ok=True)
                (folder / LOCK_NAME).unlink(missing_ok=True)
                _remove_if_empty(folder)
                self._stores.pop(folder.name, None)
            self.hits = self.misses = 0

    def prune(self, max_bytes: int) -> int:
        """Delete the least recently written fingerprints until the cache holds at most ``max_bytes``.

        Temporary files left by killed runs (older than an hour) go too; younger
        ones may belong to a run in progress and stay. Returns the bytes freed.
        """
        freed = 0
        folders = []
        for folder in self._fingerprint_folders():
            for leftover in (path for pattern in _LEFTOVER_PATTERNS for path in folder.glob(pattern)):
                stat = leftover.stat()
                if time.time() - stat.st_mtime > _STALE_TMP_SECONDS:
                    freed += stat.st_size
                    leftover.unlink(missing_ok=True)
            segments = _segments(folder)
            newest = max((p.stat().st_mtime for p in segments), default=0.0)
            folders.append((newest, sum(p.stat().st_size for p in segments), folder))
        total = sum(size for _, size, _ in folders)
        for _, size, folder in sorted(folders, key=lambda item: item[0]):
            if total <= max_bytes:
                break
            self.clear(folder.name)
            total -= size
            freed += size
        return freed

    def compact(self, fingerprint: str | None = None) -> int:
        """Merge each fingerprint's segments into one file (or those of one fingerprint); returns segments removed.

        Every flush of an extraction adds a segment, so a long run leaves
        thousands; one segment per fingerprint makes later opens read one
        file. The merge streams block by block (memory: the keys and one block
        of vectors), checks every block on the way (damaged ones are reported
        and left out) and rewrites format-1 segments with checksums. It is
        written atomically before the old segments are deleted, so a crash
        leaves either the old segments or the new one (or both, harmlessly:
        duplicate keys keep one copy). Segments that other processes add
        meanwhile are left for a later call.

        A cache opened with ``dtype="float16"`` stores the merged segment in
        float16 (half the bytes); otherwise the merged segment is float16 only
        when every merged segment was.

        Only one process compacts a fingerprint at a time (a lock file in its
        folder): another one that tries meanwhile merges nothing, and logs so.
        A folder that cannot be written is left as it is, with a
        :class:`~skproduct.exceptions.CacheWriteWarning`.
        """
        return sum(result.removed for result in self._compact_each(fingerprint))

    def _compact_each(self, fingerprint: str | None = None) -> list[CompactResult]:
        """Compact each fingerprint folder (or one) and say what happened to each (the command line prints it)."""
        if fingerprint is not None:
            self._store(fingerprint)  # checks the name
        names = [fingerprint] if fingerprint else [folder.name for folder in self._fingerprint_folders()]
        results = []
        for name in names:
            try:
                result = compact_folder(self.directory / name, "float16" if self.dtype == "float16" else None)
            except OSError as exc:
                if exc.errno not in UNWRITABLE:
                    raise
                self._report_unwritable(exc, f"the segments of {name} were not compacted")
                result = CompactResult(name, "unwritable", reason=exc.strerror or str(exc))
            if result.status == "busy":
                logger.warning("another process is compacting %s: nothing merged here", self.directory / name)
            if result.status == "merged":
                with self._lock:
                    self._stores.pop(name, None)  # the next look reads the merged segment alone
            results.append(result)
        return results

    def _fingerprint_folders(self):
        """The sub-folders that hold skproduct segments (other folders are not the cache's)."""
        if not self.directory.is_dir():
            return
        for entry in sorted(self.directory.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and segment_names(entry):
                yield entry


def _segments(folder: Path) -> list[Path]:
    return [folder / name for name in segment_names(folder)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # compacted away meanwhile
        return 0


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
