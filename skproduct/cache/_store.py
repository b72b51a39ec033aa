"""The in-process index of one fingerprint's segments: sorted keys, where each vector is, and lazy block checks.

A lookup checks the checksum of every block it touches that was not checked
before; a damaged block is reported once (:class:`~skproduct.exceptions.StaleFileWarning`)
and dropped from the index, so that its keys read as missing and the embedder
computes their pictures again, unless another segment holds a good copy of a
key (two processes wrote it, or a compaction was interrupted), which is then
used instead.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from ..exceptions import StaleFileWarning
from ._format import KEY_DTYPE, Segment, SegmentError, file_identity

logger = logging.getLogger(__name__)

__all__ = ["Store", "report_once", "segment_names"]

SUFFIX = ".skemb"
OLD_TMP_PREFIX = ".tmp-"  # the temporary files of versions before atomic_write; still ignored, and pruned
_REPORTED: set[tuple] = set()
_REPORTED_LOCK = threading.Lock()
_STACKLEVEL = 6  # report_once < _drop/refresh < _check < lookup < EmbeddingCache.get < the caller


def report_once(what: tuple, message: str, category: type[Warning] = StaleFileWarning, *,
                stacklevel: int = _STACKLEVEL) -> bool:
    """Warn about ``what`` (a file's identity and a block, say) the first time in this process; ``True`` if it did.

    The message goes through :func:`warnings.warn` only (the command line
    shows skproduct's warnings on stderr); the log gets it at DEBUG level.
    """
    with _REPORTED_LOCK:
        if what in _REPORTED:
            return False
        _REPORTED.add(what)
    logger.debug("%s", message)
    warnings.warn(message, category, stacklevel=stacklevel)
    return True


def segment_names(folder: Path) -> list[str]:
    """The names of the segment files in ``folder``, sorted (temporary files left out); none for a missing folder."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.name.endswith(SUFFIX)
                      and not e.name.startswith(".") and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []


def damaged_block_message(segment: Segment, block: int, cache_folder: Path) -> str:
    start, stop = segment.block_range(block)
    return (f"the cache segment {segment.path} has a damaged block: block {block} (of {segment.n_blocks}, counted "
            f"from 0: vectors {start} to {stop - 1}) fails its checksum; its {stop - start} vectors are not used and "
            f"their pictures are computed again ('skproduct cache verify --repair {cache_folder}' drops the block "
            "for good)")


def _by_segment(segments: np.ndarray) -> list[np.ndarray]:
    """The positions of ``segments`` grouped by value (one sort, not one pass per segment)."""
    if not len(segments):
        return []
    order = np.argsort(segments, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(segments[order])) + 1)


def _empty_index() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, dtype=KEY_DTYPE), np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64)


class Store:
    """The segments of one fingerprint seen by this process: sorted keys, and where each key's vector is.

    ``segments`` holds each segment's vectors (a :class:`numpy.memmap` for a
    file, an array for vectors kept in memory because the cache could not be
    written) and ``files`` the matching :class:`~._format.Segment` (``None``
    in memory). A key written twice keeps its first copy in the index and the
    others as alternates, used when the first copy's block is damaged.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: set[str] = set()
        self.unreadable: dict[str, tuple | None] = {}  # name -> identity when it failed: not retried while the same
        self.segments: list[np.ndarray] = []
        self.files: list[Segment | None] = []
        self.keys, self.segment_of, self.row_of = _empty_index()
        self.alt_keys, self.alt_segment, self.alt_row = _empty_index()
        self.dim: int | None = None
        self._unchecked: set[int] = set()  # segments with blocks whose checksum was not computed yet

    # -- building the index --------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Index the segments written since the last look (by any process); checks no block."""
        added = []
        for name in segment_names(self.folder):
            if name in self.seen:
                continue
            path = self.folder / name
            if name in self.unreadable and self.unreadable[name] == file_identity(path):
                continue
            try:
                segment = Segment.open(path)
            except FileNotFoundError:  # compacted away by another process since the listing
                continue
            except (OSError, SegmentError) as exc:
                identity = file_identity(path)
                self.unreadable[name] = identity
                report_once(("unreadable", str(path), identity),
                            f"ignoring the unreadable cache segment {path}: {exc} (its pictures are computed again)",
                            stacklevel=4)
                continue
            self.seen.add(name)
            self.unreadable.pop(name, None)
            if self.dim is not None and segment.dim != self.dim:
                report_once(("dimension", str(path), segment.identity),
                            f"ignoring the cache segment {path}: its vectors have another size ({segment.dim}, not "
                            f"{self.dim})", stacklevel=4)
                continue
            self.dim = segment.dim
            added.append((segment.keys(), segment.vectors, segment))
        self._index(added)

    def add_memory(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Index vectors kept in this process's memory only (the cache folder could not be written)."""
        if self.dim is None:
            self.dim = vectors.shape[1]
        self._index([(np.asarray(keys, dtype=KEY_DTYPE).copy(), np.array(vectors, dtype=np.float32), None)])

    def _index(self, added: list[tuple[np.ndarray, np.ndarray, Segment | None]]) -> None:
        if not added:
            return
        keys, segment_of, row_of = [], [], []
        for new_keys, vectors, segment in added:
            number = len(self.segments)
            self.segments.append(vectors)
            self.files.append(segment)
            if segment is not None and not segment.checked.all():
                self._unchecked.add(number)
            keys.append(new_keys)
            segment_of.append(np.full(len(new_keys), number, dtype=np.int32))
            row_of.append(np.arange(len(new_keys), dtype=np.int64))
        self._merge(np.concatenate(keys), np.concatenate(segment_of), np.concatenate(row_of))

    def _merge(self, keys: np.ndarray, segment_of: np.ndarray, row_of: np.ndarray) -> None:
        """Merge new entries into the sorted index: sort the new ones only, then one linear merge.

        A refresh that finds ``m`` new vectors costs ``O(m log m + n)`` for an
        index of ``n`` (a copy, no re-sort of what was indexed before), and a
        lookup stays one binary search in one sorted array whatever the number
        of segments. Keys already indexed, or repeated among the new ones,
        keep their earlier copy; the others become alternates.
        """
        order = np.argsort(keys, kind="stable")
        keys, segment_of, row_of = keys[order], segment_of[order], row_of[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        if len(self.keys):
            first &= self.find(keys) < 0
        if not first.all():
            self._add_alternates(keys[~first], segment_of[~first], row_of[~first])
        keys, segment_of, row_of = keys[first], segment_of[first], row_of[first]
        if not len(self.keys):
            self.keys, self.segment_of, self.row_of = keys, segment_of, row_of
            return
        at = np.searchsorted(self.keys, keys)
        self.keys = np.insert(self.keys, at, keys)
        self.segment_of = np.insert(self.segment_of, at, segment_of)
        self.row_of = np.insert(self.row_of, at, row_of)

    def _add_alternates(self, keys: np.ndarray, segment_of: np.ndarray, row_of: np.ndarray) -> None:
        alt_keys = np.concatenate([self.alt_keys, keys])
        alt_segment = np.concatenate([self.alt_segment, segment_of])
        alt_row = np.concatenate([self.alt_row, row_of])
        order = np.argsort(alt_keys, kind="stable")
        self.alt_keys, self.alt_segment, self.alt_row = alt_keys[order], alt_segment[order], alt_row[order]

    def _set_index(self, keys: np.ndarray, segment_of: np.ndarray, row_of: np.ndarray) -> None:
        """Sort entries by key; the first copy of a key (the earlier entry) is used, the others kept as alternates."""
        order = np.argsort(keys, kind="stable")
        keys, segment_of, row_of = keys[order], segment_of[order], row_of[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        if not first.all():
            self._add_alternates(keys[~first], segment_of[~first], row_of[~first])
        self.keys, self.segment_of, self.row_of = keys[first], segment_of[first], row_of[first]

    # -- lookups ---------------------------------------------------------------------------------------------------
    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key in :attr:`keys`, or -1 (no block is checked)."""
        if not len(self.keys):
            return np.full(len(keys), -1)
        at = np.searchsorted(self.keys, keys)
        at = np.minimum(at, len(self.keys) - 1)
        return np.where(self.keys[at] == keys, at, -1)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Like :meth:`find`, after checking the blocks the found keys are in (damaged ones are dropped)."""
        while True:
            positions = self.find(keys)
            if not self._check(positions[positions >= 0]):
                return positions

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at index ``positions`` (found by :meth:`lookup`)."""
        out = np.empty((len(positions), self.dim or 0), dtype=np.float32)
        segments, rows = self.segment_of[positions], self.row_of[positions]
        for chosen in _by_segment(segments):
            out[chosen] = self.segments[segments[chosen[0]]][rows[chosen]]
        return out

    def disk_items(self) -> int:
        """Indexed vectors that live in files (not those kept in memory): counted without a pass over the index
        unless vectors are kept in memory."""
        in_memory = [number for number, segment in enumerate(self.files) if segment is None]
        if not in_memory:
            return len(self.keys)
        return int(len(self.keys) - np.count_nonzero(np.isin(self.segment_of, in_memory)))

    def stored_bytes(self) -> int:
        """Bytes of vectors and keys in the indexed segment files (sizes read when they were opened)."""
        return sum(segment.identity[2] for segment in self.files if segment is not None)

    # -- checking and dropping blocks ------------------------------------------------------------------------------
    def _check(self, positions: np.ndarray) -> bool:
        """Check the unchecked blocks of these index positions; ``True`` when one was damaged (and dropped)."""
        if not self._unchecked or not len(positions):
            return False
        segments, rows = self.segment_of[positions], self.row_of[positions]
        pending = np.isin(segments, np.fromiter(self._unchecked, dtype=np.int32, count=len(self._unchecked)))
        if not pending.any():
            return False
        segments, rows = segments[pending], rows[pending]
        dropped = False
        for chosen in _by_segment(segments):
            number = int(segments[chosen[0]])
            segment = self.files[number]
            blocks = np.unique(rows[chosen] // segment.block_rows)
            for block in blocks[~segment.checked[blocks]]:
                if not segment.check_block(int(block)):
                    self._drop(int(number), int(block))
                    dropped = True
            if segment.checked.all():
                self._unchecked.discard(number)
        return dropped

    def _usable(self, number: int, row: int) -> bool:
        segment = self.files[number]
        return segment is None or not segment.bad[row // segment.block_rows]

    def _drop(self, number: int, block: int) -> None:
        """Take a damaged block out of the index (its keys now read as missing, unless an alternate copy is good)."""
        segment = self.files[number]
        start, stop = segment.block_range(block)
        gone = (self.segment_of == number) & (self.row_of >= start) & (self.row_of < stop)
        lost = self.keys[gone]
        self.keys, self.segment_of, self.row_of = self.keys[~gone], self.segment_of[~gone], self.row_of[~gone]
        stale = (self.alt_segment == number) & (self.alt_row >= start) & (self.alt_row < stop)
        if stale.any():
            self.alt_keys, self.alt_segment, self.alt_row = (
                self.alt_keys[~stale], self.alt_segment[~stale], self.alt_row[~stale])
        reinstated = 0
        if len(lost) and len(self.alt_keys):
            candidates = [c for c in np.flatnonzero(np.isin(self.alt_keys, lost))
                          if self._usable(int(self.alt_segment[c]), int(self.alt_row[c]))]
            if candidates:
                candidates = np.asarray(candidates)
                _, first = np.unique(self.alt_keys[candidates], return_index=True)
                chosen = candidates[first]
                keep = np.ones(len(self.alt_keys), dtype=bool)
                keep[chosen] = False
                keys = np.concatenate([self.keys, self.alt_keys[chosen]])
                segment_of = np.concatenate([self.segment_of, self.alt_segment[chosen]])
                row_of = np.concatenate([self.row_of, self.alt_row[chosen]])
                self.alt_keys, self.alt_segment, self.alt_row = (
                    self.alt_keys[keep], self.alt_segment[keep], self.alt_row[keep])
                self._set_index(keys, segment_of, row_of)
                reinstated = len(chosen)
        logger.info("dropped block %d of %s: %d keys lost, %d found in other segments", block, segment.path,
                    len(lost), reinstated)
        report_once(("block", str(segment.path), segment.identity, block),
                    damaged_block_message(segment, block, self.folder.parent))
