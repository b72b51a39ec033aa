"""A per-image, per-model embedding cache on disk.

Vectors are keyed by ``(backbone fingerprint, image key)``: every fold of a
cross-validation, every candidate of a grid search, every head and every later
``predict`` reuses one extraction. Layout::

    <directory>/<fingerprint>/seg-<pid>-<random>.skemb

Each segment file is immutable: a header, ``n`` 16-byte image keys, then an
``n x d`` float32 matrix. Writers never touch an existing file; they write a
new segment to a temporary name and rename it into place, so a run killed
mid-way leaves only whole segments, several processes can write into one cache
at once, and readers memory-map what they need.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from ._files import atomic_write, temporary_pattern
from .exceptions import StaleFileWarning

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingCache"]

KEY_BYTES = 16
_MAGIC = b"SKEMB\x00\x01\x00"
_HEADER = struct.Struct("<8sQQ")  # magic, n vectors, dimension
_SUFFIX = ".skemb"
_SEGMENT_MODE = 0o644
_TMP_PREFIX = ".tmp-"  # the temporary files of versions before atomic_write; still ignored, and pruned
_LEFTOVER_PATTERNS = (temporary_pattern(f"*{_SUFFIX}"), f"{_TMP_PREFIX}*{_SUFFIX}")
_STALE_TMP_SECONDS = 3600  # a temporary file older than this belongs to a killed run
_OPEN: dict[str, EmbeddingCache] = {}
_OPEN_LOCK = threading.Lock()


class _Store:
    """The segments of one fingerprint: sorted keys, and where each key's vector is."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: set[str] = set()
        self.segments: list[np.memmap] = []
        self.keys = np.empty(0, dtype=f"S{KEY_BYTES}")
        self.segment_of = np.empty(0, dtype=np.int32)
        self.row_of = np.empty(0, dtype=np.int64)
        self.dim: int | None = None

    def refresh(self) -> None:
        """Load the keys of segments written since the last look (by any process)."""
        try:
            names = [
                e.name
                for e in os.scandir(self.folder)
                if e.name.endswith(_SUFFIX) and not e.name.startswith(_TMP_PREFIX) and e.name not in self.seen
            ]
        except FileNotFoundError:
            return
        new_keys, new_segments, new_rows = [], [], []
        for name in sorted(names):
            try:
                keys, vectors = _read_segment(self.folder / name)
            except (OSError, ValueError, struct.error) as exc:  # struct.error: a segment cut short
                warnings.warn(f"ignoring the unreadable cache segment {self.folder / name}: {exc} (its pictures are "
                              "computed again)", StaleFileWarning, stacklevel=4)
                continue
            self.seen.add(name)
            if self.dim is not None and vectors.shape[1] != self.dim:
                warnings.warn(f"ignoring the cache segment {self.folder / name}: its vectors have another size",
                              StaleFileWarning, stacklevel=4)
                continue
            self.dim = vectors.shape[1]
            new_keys.append(keys)
            new_segments.append(np.full(len(keys), len(self.segments), dtype=np.int32))
            new_rows.append(np.arange(len(keys)))
            self.segments.append(vectors)
        if new_keys:
            keys = np.concatenate([self.keys, *new_keys])
            segment_of = np.concatenate([self.segment_of, *new_segments])
            row_of = np.concatenate([self.row_of, *new_rows])
            order = np.argsort(keys, kind="stable")
            keys, segment_of, row_of = keys[order], segment_of[order], row_of[order]
            first = np.ones(len(keys), dtype=bool)
            first[1:] = keys[1:] != keys[:-1]  # a key written twice (by two processes) keeps one copy
            self.keys, self.segment_of, self.row_of = keys[first], segment_of[first], row_of[first]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key in :attr:`keys`, or -1."""
        if not len(self.keys):
            return np.full(len(keys), -1)
        at = np.searchsorted(self.keys, keys)
        at = np.minimum(at, len(self.keys) - 1)
        return np.where(self.keys[at] == keys, at, -1)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim or 0), dtype=np.float32)
        segments, rows = self.segment_of[positions], self.row_of[positions]
        for segment in np.unique(segments):
            chosen = segments == segment
            out[chosen] = self.segments[segment][rows[chosen]]
        return out


class EmbeddingCache:
    """Vectors on disk, keyed by backbone fingerprint and image key.

    Opening the same folder twice in one process gives the same object (and
    the same counters); copying or cloning it (as ``GridSearchCV`` does with an
    estimator's parameters) shares it too, and pickling keeps only the folder.

    Parameters
    ----------
    directory : str or path-like
        The cache folder (created when first written). ``~`` is expanded.

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
    """

    def __new__(cls, directory: str | os.PathLike):
        given = os.fspath(directory)
        path = os.path.abspath(os.path.expanduser(given))
        with _OPEN_LOCK:
            cache = _OPEN.get(path)
            if cache is None:
                cache = super().__new__(cls)
                cache._init(path, given)
                _OPEN[path] = cache
        return cache

    def _init(self, path: str, given: str) -> None:
        self.directory = Path(path)
        self._given = given  # pickles keep what the user wrote ("~/emb"), not this machine's expansion
        self.hits = 0
        self.misses = 0
        self._stores: dict[str, _Store] = {}
        self._lock = threading.Lock()

    def __getnewargs__(self):
        return (self._given,)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        pass

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r})"

    # -- keys ----------------------------------------------------------------
    @staticmethod
    def keys_for(contents) -> np.ndarray:
        """16-byte BLAKE2b keys of picture contents (bytes), as an ``S16`` array."""
        from hashlib import blake2b

        return np.array([blake2b(c, digest_size=KEY_BYTES).digest() for c in contents], dtype=f"S{KEY_BYTES}")

    # -- reading and writing -------------------------------------------------
    def _store(self, fingerprint: str) -> _Store:
        if not fingerprint or os.sep in fingerprint or fingerprint.startswith("."):
            raise ValueError(f"{fingerprint!r} is not a usable fingerprint")
        store = self._stores.get(fingerprint)
        if store is None:
            store = self._stores[fingerprint] = _Store(self.directory / fingerprint)
        return store

    def get(self, fingerprint: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Look keys up; return ``(vectors of the found keys, found mask)`` and count hits and misses."""
        keys = np.asarray(keys, dtype=f"S{KEY_BYTES}")
        with self._lock:
            store = self._store(fingerprint)
            store.refresh()
            positions = store.find(keys)
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
        """Store vectors as one new segment, atomically (temporary file, then rename)."""
        keys = np.asarray(keys, dtype=f"S{KEY_BYTES}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"put needs one row of vectors per key; got {vectors.shape} for {len(keys)} keys")
        if not len(keys):
            return
        folder = self.directory / fingerprint
        self._store(fingerprint)
        segment = folder / f"seg-{os.getpid()}-{uuid.uuid4().hex}{_SUFFIX}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _write_segment(segment, keys, vectors)
        except FileNotFoundError:  # another process cleared the folder meanwhile
            folder.mkdir(parents=True, exist_ok=True)
            _write_segment(segment, keys, vectors)

    # -- housekeeping ----------------------------------------------------------
    def stats(self) -> dict:
        """``hits`` and ``misses`` of this process; ``items``, ``bytes`` and ``fingerprints`` on disk."""
        items = size = fingerprints = 0
        for folder in self._fingerprint_folders():
            fingerprints += 1
            size += sum(p.stat().st_size for p in _segments(folder))
            store = self._store(folder.name)
            with self._lock:
                store.refresh()
            items += len(store.keys)
        return {"hits": self.hits, "misses": self.misses, "items": items, "bytes": size, "fingerprints": fingerprints}

    def clear(self, fingerprint: str | None = None) -> None:
        """Delete every vector (or those of one fingerprint) and reset the counters.

        Only skproduct's segment files are deleted: other files in the folder
        are left alone, and a folder is removed only once it is empty.
        """
        with self._lock:
            targets = [self.directory / fingerprint] if fingerprint else list(self._fingerprint_folders())
            for folder in targets:
                for segment in _segments(folder):
                    segment.unlink(missing_ok=True)
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
        file. The merged segment is written atomically before the old ones are
        deleted, so a crash leaves either the old segments or the new one (or
        both, harmlessly: duplicate keys keep one copy). Segments that other
        processes add meanwhile are left for a later call.
        """
        removed = 0
        names = [fingerprint] if fingerprint else [folder.name for folder in self._fingerprint_folders()]
        for name in names:
            with self._lock:
                store = self._store(name)
                store.refresh()
                merged = sorted(store.seen)
                if len(merged) < 2:
                    continue
                keys, vectors = store.keys, store.gather(np.arange(len(store.keys)))
            self.put(name, keys, vectors)
            for segment_name in merged:
                (self.directory / name / segment_name).unlink(missing_ok=True)
            with self._lock:
                self._stores.pop(name, None)  # the next look reads the merged segment alone
            removed += len(merged) - 1
        return removed

    def _fingerprint_folders(self):
        """The sub-folders that hold skproduct segments (other folders are not the cache's)."""
        if not self.directory.is_dir():
            return
        for entry in sorted(self.directory.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and any(entry.glob(f"*{_SUFFIX}")):
                yield entry


def _segments(folder: Path) -> list[Path]:
    return [p for p in folder.glob(f"*{_SUFFIX}") if not p.name.startswith(_TMP_PREFIX)]


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _write_segment(path: Path, keys: np.ndarray, vectors: np.ndarray) -> None:
    """Write one segment file atomically, readable by every user of the cache."""
    with atomic_write(path, permissions=_SEGMENT_MODE) as f:
        f.write(_HEADER.pack(_MAGIC, len(keys), vectors.shape[1]))
        f.write(keys.tobytes())
        f.write(vectors.tobytes())


def _read_segment(path: Path) -> tuple[np.ndarray, np.memmap]:
    """The keys (in memory) and the memory-mapped vectors of one segment file."""
    with open(path, "rb") as f:
        magic, n, dim = _HEADER.unpack(f.read(_HEADER.size))
        if magic != _MAGIC:
            raise ValueError("not an skproduct cache segment")
        keys = np.frombuffer(f.read(n * KEY_BYTES), dtype=f"S{KEY_BYTES}")
    expected = _HEADER.size + n * KEY_BYTES + n * dim * 4
    if len(keys) != n or path.stat().st_size != expected:
        raise ValueError("the segment is cut short")
    vectors = np.memmap(path, dtype=np.float32, mode="r", offset=_HEADER.size + n * KEY_BYTES, shape=(n, dim))
    return keys, vectors
