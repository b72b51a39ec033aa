"""Housekeeping of one fingerprint folder: the compaction lock, streaming compaction, and verification with repair.

Compaction takes a lock file (``.compact.lock`` in the fingerprint folder,
locked with :func:`fcntl.flock`, non-blocking): a second compactor of the same
folder, in any process, does nothing and says so, instead of writing a second
full copy. It checks every block of every segment, then streams the good rows
into the merged file block by block, so memory holds the keys (16 bytes a
vector) and one block of vectors, never the whole matrix.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._format import Segment, SegmentError, block_rows_for, file_identity, write_segment
from ._store import SUFFIX, damaged_block_message, report_once, segment_names

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "UNWRITABLE", "CompactResult", "compact_folder", "folder_lock", "new_segment_path",
           "verify_folder"]

LOCK_NAME = ".compact.lock"
#: The errors of a cache folder that cannot be written (read-only, no permission, full): the cache goes on in memory.
UNWRITABLE = frozenset(
    code for code in (getattr(errno, name, None) for name in ("EROFS", "EACCES", "EPERM", "ENOSPC", "EDQUOT", "EFBIG"))
    if code is not None
)


def new_segment_path(folder: Path) -> Path:
    """A new segment name, unique across processes and machines sharing the folder."""
    return folder / f"seg-{os.getpid()}-{uuid.uuid4().hex}{SUFFIX}"


@contextmanager
def folder_lock(folder: Path) -> Iterator[bool]:
    """Hold the folder's compaction lock if no one else does; yields whether it is held.

    The lock is :func:`fcntl.flock` on ``.compact.lock`` (``msvcrt.locking``
    on Windows), taken without waiting. It is released when the block ends, or
    by the operating system when the process dies, so a killed compactor never
    leaves the folder locked. (``flock`` is per open file, so two threads of
    one process exclude each other too; on NFS it needs a server with locking.)
    """
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            yield False
            return
        try:
            yield True
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


try:
    import fcntl
except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


@dataclass
class CompactResult:
    """What compacting one fingerprint folder did.

    ``status`` is ``"merged"`` (``segments`` files became one), ``"nothing"``
    (at most one segment, already in the current format), ``"busy"`` (another
    process holds the lock: nothing done) or ``"unwritable"`` (the folder could
    not be written: ``reason`` says why; nothing changed).
    """

    fingerprint: str
    status: str
    segments: int = 0
    vectors: int = 0
    dropped_blocks: int = 0
    reason: str = ""

    @property
    def removed(self) -> int:
        """Segment files removed (merged ones less the new one)."""
        return max(self.segments - 1, 0) if self.status == "merged" else 0


def _open_all(folder: Path) -> list[Segment]:
    """The usable segments of a folder of one dimension (the first's); unreadable ones are reported and left alone."""
    segments: list[Segment] = []
    for name in segment_names(folder):
        path = folder / name
        try:
            segment = Segment.open(path)
        except FileNotFoundError:
            continue
        except (OSError, SegmentError) as exc:
            report_once(("unreadable", str(path), file_identity(path)),
                        f"ignoring the unreadable cache segment {path}: {exc} (its pictures are computed again)",
                        stacklevel=6)
            continue
        if segments and segment.dim != segments[0].dim:
            continue  # another size: left as it is (lookups ignore it too)
        segments.append(segment)
    return segments


def _rows_of(segment: Segment, rows: np.ndarray) -> Iterator[np.ndarray]:
    step = block_rows_for(segment.dim, segment.dtype.itemsize)
    for at in range(0, len(rows), step):
        yield np.asarray(segment.vectors[rows[at: at + step]])


def first_copies(keys: np.ndarray) -> np.ndarray:
    """The rows of each distinct key's first occurrence in ``keys`` (16-byte keys), in ascending order.

    Keys are hashes, so their first 8 bytes almost never tie: those are
    sorted as integers (much faster than sorting 16-byte strings), and only
    the rows whose first 8 bytes tie are compared whole.

    Examples
    --------
    >>> keys = np.array([b"a" * 16, b"b" * 16, b"a" * 16, b"a" * 8 + b"c" * 8], dtype="S16")
    >>> first_copies(keys).tolist()
    [0, 1, 3]
    """
    keys = np.ascontiguousarray(keys, dtype="S16")
    n = len(keys)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    head = keys.view("<u8")[::2]
    order = np.argsort(head)
    ordered = head[order]
    tie = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not len(tie):
        return np.arange(n, dtype=np.int64)
    shared = np.zeros(n, dtype=bool)
    shared[tie] = shared[tie + 1] = True
    members = np.sort(order[shared])  # rows whose first 8 bytes another row has, in file order
    first = members[np.unique(keys[members], return_index=True)[1]]
    keep = np.ones(n, dtype=bool)
    keep[members] = False
    keep[first] = True
    return np.flatnonzero(keep)


def compact_folder(folder: Path, dtype=None) -> CompactResult:
    """Merge the segments of one fingerprint folder into one segment, streaming block by block.

    Memory holds the keys, where each one is and their sort (measured: about
    150 bytes a vector at peak, whatever their dimension: 252 MiB for 1.75M
    vectors, so about 1.8 GB for Cdiscount's 12.4M pictures) and one block of
    vectors, never the matrix. The merged segment stores ``dtype`` (``"float32"`` or
    ``"float16"``); by default float16 when every merged segment is float16,
    float32 otherwise, so that compacting never loses precision it was not
    asked to.

    Every block is checked first; damaged blocks are reported
    (:class:`~skproduct.exceptions.StaleFileWarning`) and left out, and a key
    found twice keeps its first good copy. The merged file is written
    atomically before the merged segments are deleted, so a crash leaves the
    old segments, the new one, or both (harmless: duplicate keys keep one
    copy). Segments that other processes add meanwhile are left for a later call.

    Raises
    ------
    OSError
        The folder could not be written (the caller decides what to do with
        the errors of :data:`UNWRITABLE`).
    """
    name = folder.name
    if not segment_names(folder):
        return CompactResult(name, "nothing")
    with folder_lock(folder) as held:
        if not held:
            logger.info("another process is compacting %s: skipped", folder)
            return CompactResult(name, "busy", reason="another process is compacting it")
        segments = _open_all(folder)
        if dtype is None:
            dtype = "float16" if segments and all(seg.dtype.itemsize == 2 for seg in segments) else "float32"
        same_type = all(segment.dtype == np.dtype(dtype) for segment in segments)
        if len(segments) < 2 and same_type and all(segment.version >= 2 for segment in segments):
            return CompactResult(name, "nothing", segments=len(segments),
                                 vectors=sum(segment.n for segment in segments))
        keys, owner, rows, dropped = [], [], [], 0
        for number, segment in enumerate(segments):
            for block in segment.check_all():
                dropped += 1
                report_once(("block", str(segment.path), segment.identity, block),
                            damaged_block_message(segment, block, folder.parent), stacklevel=5)
            good = np.flatnonzero(segment.good_rows())
            keys.append(segment.keys()[good])
            owner.append(np.full(len(good), number, dtype=np.int32))
            rows.append(good)
        keys, owner, rows = np.concatenate(keys), np.concatenate(owner), np.concatenate(rows)
        kept = first_copies(keys)  # each key's first good copy, in file order
        keys, kept_rows = keys[kept], rows[kept]
        bounds = np.searchsorted(owner[kept], np.arange(len(segments) + 1))
        del owner, rows

        def chunks() -> Iterator[np.ndarray]:
            for number, segment in enumerate(segments):
                yield from _rows_of(segment, kept_rows[bounds[number]: bounds[number + 1]])

        if len(kept):
            write_segment(new_segment_path(folder), keys, segments[0].dim, chunks(), dtype=dtype)
        for segment in segments:
            segment.path.unlink(missing_ok=True)
        logger.info("compacted %s: %d segments into one (%d vectors)", folder, len(segments), len(kept))
        return CompactResult(name, "merged", segments=len(segments), vectors=len(kept), dropped_blocks=dropped)


def verify_folder(folder: Path, *, repair: bool) -> dict:
    """Check every block of every segment of one fingerprint folder; with ``repair``, drop what is damaged.

    Returns
    -------
    dict
        ``segments``, ``blocks`` and ``vectors`` checked; ``damaged``, a list
        of dicts (``fingerprint``, ``path``, ``blocks``: the damaged block
        numbers, or ``None`` when the whole file is unusable, ``n_blocks``,
        ``vectors`` lost, ``reason``, ``repaired``); ``legacy``, the paths of
        format-1 segments (no checksums to check); ``busy``, whether repair was
        skipped because another process is compacting the folder. A folder
        without damage is neither locked nor written, even with ``repair``.
    """
    report = _verify(folder, repair=False)
    if not repair or not report["damaged"]:
        return report  # a clean folder is not locked, nor written: repair works on a read-only cache that is clean
    with folder_lock(folder) as held:
        if not held:
            report["busy"] = True
            return report
        return _verify(folder, repair=True)  # again, under the lock: a compaction may have changed the files


def _verify(folder: Path, *, repair: bool) -> dict:
    report = {"segments": 0, "blocks": 0, "vectors": 0, "damaged": [], "legacy": [], "busy": False}
    for name in segment_names(folder):
        path = folder / name
        try:
            segment = Segment.open(path)
        except FileNotFoundError:
            continue
        except (OSError, SegmentError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            entry = {"fingerprint": folder.name, "path": str(path), "blocks": None, "n_blocks": None, "vectors": None,
                     "reason": reason, "repaired": False}
            if repair and isinstance(exc, SegmentError):  # a file that cannot be read is not deleted
                path.unlink(missing_ok=True)
                entry["repaired"] = True
            report["damaged"].append(entry)
            report["segments"] += 1
            continue
        report["segments"] += 1
        report["vectors"] += segment.n
        if segment.version == 1:
            report["legacy"].append(str(path))
            continue
        bad = segment.check_all()
        report["blocks"] += segment.n_blocks
        if not bad:
            continue
        good = np.flatnonzero(segment.good_rows())
        entry = {"fingerprint": folder.name, "path": str(path), "blocks": bad, "n_blocks": segment.n_blocks,
                 "vectors": segment.n - len(good), "reason": "checksum mismatch", "repaired": False}
        if repair:
            _rewrite_without(segment, good)
            entry["repaired"] = True
        report["damaged"].append(entry)
    return report


def _rewrite_without(segment: Segment, good: np.ndarray) -> None:
    """Rewrite a segment atomically with only the ``good`` rows (or delete it when none is left)."""
    if not len(good):
        segment.path.unlink(missing_ok=True)
        return
    write_segment(segment.path, segment.keys()[good], segment.dim, _rows_of(segment, good), dtype=segment.dtype)
    logger.info("rewrote %s without its damaged blocks (%d vectors kept)", segment.path, len(good))
