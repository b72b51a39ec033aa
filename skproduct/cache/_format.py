"""The segment file: one immutable file of cached vectors, its two formats, and its checksums.

Format 2, written since skproduct 0.1 (issue 11), little-endian::

    offset                  bytes        content
    0                       8            magic  b"SKEMB\\x00\\x02\\x00"
    8                       8            n      number of vectors (uint64)
    16                      8            d      their dimension (uint64)
    24                      4            r      rows per checksum block (uint32)
    28                      4            CRC-32 of bytes 0 to 27
    32                      16 n         the image keys
    32 + 16 n               4 n d        the vectors (float32, row after row)
    32 + 16 n + 4 n d       4 b          b = ceil(n / r) block checksums: CRC-32 of the
                                         block's keys, continued over its vectors
    end - 4                 4            CRC-32 of the block checksums

The header and the checksum table are checked when a segment is opened (a few
bytes); a block is checked when a lookup first touches it, so that opening a
large segment stays cheap and a flipped byte is still caught before its vector
is used. Format 1 (``b"SKEMB\\x00\\x01\\x00"``, n, d, keys, vectors) has no
checksums: it is still read, as before, and never written.

Format 3 (issue 14) is format 2 with the vectors' storage type in the header,
written for float16 segments only (float32 segments stay in format 2, which
every earlier skproduct with checksums reads)::

    offset                  bytes        content
    0                       8            magic  b"SKEMB\\x00\\x03\\x00"
    8                       8            n
    16                      8            d
    24                      4            r
    28                      4            storage type: 0 float32, 1 float16
    32                      4            reserved (0)
    36                      4            CRC-32 of bytes 0 to 35
    40                      16 n         the image keys
    40 + 16 n               s n d        the vectors (s = 4 or 2 bytes a value)
    then                    4 b + 4      the block checksums and their CRC-32, as in format 2
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np

from .._files import atomic_write

__all__ = ["KEY_BYTES", "STORAGE_TYPES", "Segment", "SegmentError", "block_rows_for", "file_identity",
           "storage_dtype", "write_segment"]

KEY_BYTES = 16
KEY_DTYPE = f"S{KEY_BYTES}"
MAGIC_V1 = b"SKEMB\x00\x01\x00"
MAGIC_V2 = b"SKEMB\x00\x02\x00"
MAGIC_V3 = b"SKEMB\x00\x03\x00"
_NEWEST = 3
_MAGIC_STEM = b"SKEMB\x00"
HEADER_V1 = struct.Struct("<8sQQ")  # magic, n vectors, dimension
HEADER_V2 = struct.Struct("<8sQQII")  # magic, n vectors, dimension, rows per block, CRC-32 of what precedes
HEADER_V3 = struct.Struct("<8sQQIIII")  # ... rows per block, storage type, reserved, CRC-32 of what precedes
_CRC = struct.Struct("<I")
_FLOAT = np.dtype("<f4")  # float32, little-endian whatever the machine
_HALF = np.dtype("<f2")
#: The storage types a segment may hold, by their code in a format-3 header.
STORAGE_TYPES = {0: _FLOAT, 1: _HALF}
_CODES = {np.dtype(t).name: code for code, t in STORAGE_TYPES.items()}
SEGMENT_MODE = 0o644
BLOCK_BYTES = 1 << 20  # about one MiB of keys and vectors per checksum block
_MAX_BLOCK_ROWS = 2**31 - 1


class SegmentError(ValueError):
    """A segment file cannot be used at all (not a segment, cut short, its header or checksum table damaged)."""


def block_rows_for(dim: int, itemsize: int = 4) -> int:
    """Rows per checksum block for vectors of ``dim`` values: about :data:`BLOCK_BYTES` of keys and vectors.

    Examples
    --------
    >>> block_rows_for(2048), block_rows_for(8) > 10_000, block_rows_for(2048, itemsize=2)
    (127, True, 255)
    """
    return int(max(1, min(_MAX_BLOCK_ROWS, BLOCK_BYTES // (KEY_BYTES + itemsize * dim))))


def storage_dtype(dtype) -> np.dtype:
    """The little-endian storage type for ``dtype`` (``"float32"`` or ``"float16"``); anything else is an error.

    Examples
    --------
    >>> storage_dtype("float16").str, storage_dtype(None).str
    ('<f2', '<f4')
    """
    name = "float32" if dtype is None else np.dtype(dtype).name
    if name not in _CODES:
        raise ValueError(f"the cache stores float32 or float16 vectors, not {dtype!r}: pass dtype='float32' or "
                         "'float16'")
    return STORAGE_TYPES[_CODES[name]]


def _crc(data, value: int = 0) -> int:
    return zlib.crc32(memoryview(data).cast("B"), value) & 0xFFFFFFFF


class Segment:
    """One segment file opened for reading: its keys and memory-mapped vectors, and its blocks' checksum state.

    Use :meth:`open`. ``vectors`` is a read-only :class:`numpy.memmap`;
    ``checked`` and ``bad`` say, per block, whether its checksum was computed
    and whether it failed. A format-1 segment has one block, checked and good
    (there is nothing to check it against).
    """

    def __init__(self, path: Path, version: int, n: int, dim: int, block_rows: int, raw: np.memmap | None,
                 crcs: np.ndarray | None, keys_offset: int, dtype: np.dtype = _FLOAT):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.version = version
        self.n = n
        self.dim = dim
        self.block_rows = max(block_rows, 1)
        self.n_blocks = -(-n // self.block_rows) if n else 0
        self._raw = raw
        self._crcs = crcs
        self._keys_offset = keys_offset
        self._vectors_offset = keys_offset + n * KEY_BYTES
        self.identity: tuple[int, int, int] = (0, 0, 0)  # inode, mtime and size when opened
        self.checked = np.full(self.n_blocks, version == 1, dtype=bool)
        self.bad = np.zeros(self.n_blocks, dtype=bool)
        if raw is None or n == 0 or dim == 0:
            self.vectors = np.zeros((n, dim), dtype=self.dtype)
        else:
            end = self._vectors_offset + n * dim * self.dtype.itemsize
            self.vectors = raw[self._vectors_offset:end].view(self.dtype).reshape(n, dim)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Segment:
        """Open a segment, checking its size, header and checksum table (not its blocks).

        Raises
        ------
        SegmentError
            The file is not a usable segment; the message says why.
        OSError
            The file cannot be read.
        """
        path = Path(path)
        stat = os.stat(path)
        size = stat.st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_V2.size)
        if not head:
            raise SegmentError("the segment is empty (0 bytes)")
        magic = head[:8]
        if magic == MAGIC_V3:
            with open(path, "rb") as f:
                head = f.read(HEADER_V3.size)
        if magic not in (MAGIC_V1, MAGIC_V2, MAGIC_V3):
            if len(magic) < 8 and any(m.startswith(magic) for m in (MAGIC_V1, MAGIC_V2, MAGIC_V3)):
                raise SegmentError("the segment is cut short")
            if magic[:6] == _MAGIC_STEM and magic[7:] == b"\x00" and magic[6] > _NEWEST:
                raise SegmentError(f"it is in format {magic[6]}, written by a newer skproduct: upgrade skproduct")
            raise SegmentError("not an skproduct cache segment")
        header = {MAGIC_V1: HEADER_V1, MAGIC_V2: HEADER_V2, MAGIC_V3: HEADER_V3}[magic]
        if len(head) < header.size:
            raise SegmentError("the segment is cut short")
        dtype = _FLOAT
        if magic == MAGIC_V1:
            _, n, dim = HEADER_V1.unpack(head[: HEADER_V1.size])
            block_rows, n_blocks, table_bytes = n, 1, 0
        else:
            if magic == MAGIC_V2:
                _, n, dim, block_rows, header_crc = HEADER_V2.unpack(head)
            else:
                _, n, dim, block_rows, code, _, header_crc = HEADER_V3.unpack(head)
            if _crc(head[:-4]) != header_crc:
                raise SegmentError("its header fails its checksum")
            if magic == MAGIC_V3:
                if code not in STORAGE_TYPES:
                    raise SegmentError(f"its vectors are of an unknown storage type ({code}): upgrade skproduct")
                dtype = STORAGE_TYPES[code]
            if block_rows < 1:
                raise SegmentError("its header says 0 rows per block")
            n_blocks = -(-n // block_rows)
            table_bytes = 4 * n_blocks + _CRC.size
        expected = header.size + n * KEY_BYTES + n * dim * dtype.itemsize + table_bytes
        if size != expected:
            raise SegmentError(f"the segment is cut short ({size} bytes of {expected})" if size < expected
                               else f"the segment is {size - expected} bytes too long")
        raw = _map(path)
        crcs = None
        if magic != MAGIC_V1:
            table = raw[size - table_bytes: size - _CRC.size]
            (table_crc,) = _CRC.unpack(bytes(raw[size - _CRC.size:]))
            if _crc(table) != table_crc:
                raise SegmentError("its table of block checksums fails its checksum")
            crcs = np.frombuffer(bytes(table), dtype="<u4")
        version = {MAGIC_V1: 1, MAGIC_V2: 2, MAGIC_V3: 3}[magic]
        segment = cls(path, version, n, dim, block_rows, raw, crcs, header.size, dtype)
        segment.identity = _identity(stat)
        return segment

    def keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The keys of rows ``start`` to ``stop`` (all by default), copied into memory."""
        stop = self.n if stop is None else stop
        if self._raw is None or stop <= start:
            return np.empty(0, dtype=KEY_DTYPE)
        begin = self._keys_offset + start * KEY_BYTES
        return np.frombuffer(bytes(self._raw[begin: begin + (stop - start) * KEY_BYTES]), dtype=KEY_DTYPE)

    def block_range(self, block: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of a block."""
        start = block * self.block_rows
        return start, min(self.n, start + self.block_rows)

    def check_block(self, block: int) -> bool:
        """Check one block's checksum (once; later calls answer from memory); ``True`` when it is good."""
        if not self.checked[block]:
            start, stop = self.block_range(block)
            row_bytes = self.dim * self.dtype.itemsize
            crc = _crc(self._raw[self._keys_offset + start * KEY_BYTES: self._keys_offset + stop * KEY_BYTES])
            crc = _crc(self._raw[self._vectors_offset + start * row_bytes: self._vectors_offset + stop * row_bytes], crc)
            self.bad[block] = crc != int(self._crcs[block])
            self.checked[block] = True
        return not self.bad[block]

    def check_all(self) -> list[int]:
        """Check every block; return the damaged ones."""
        return [block for block in range(self.n_blocks) if not self.check_block(block)]

    def good_rows(self) -> np.ndarray:
        """A mask of the rows outside known-damaged blocks."""
        return ~np.repeat(self.bad, self.block_rows)[: self.n]


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def file_identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """The inode, modification time and size of a file (``None`` when it is gone): a changed file has another."""
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def _map(path: Path) -> np.memmap:
    return np.memmap(path, dtype=np.uint8, mode="r")


class _BlockWriter:
    """Write a format-2 segment to an open binary file: header and keys at once, then vectors in any chunks."""

    def __init__(self, f: IO[bytes], keys: np.ndarray, dim: int, block_rows: int | None = None,
                 dtype: np.dtype = _FLOAT):
        self.f, self.keys, self.dim, self.dtype = f, keys, dim, np.dtype(dtype)
        self.block_rows = block_rows or block_rows_for(dim, self.dtype.itemsize)
        if self.dtype == _FLOAT:  # float32: format 2, as before
            head = struct.pack("<8sQQI", MAGIC_V2, len(keys), dim, self.block_rows)
        else:
            head = struct.pack("<8sQQIII", MAGIC_V3, len(keys), dim, self.block_rows, _CODES[self.dtype.name], 0)
        f.write(head + _CRC.pack(_crc(head)))
        f.write(memoryview(keys).cast("B"))
        self.buffer = np.empty((min(self.block_rows, len(keys)), dim), dtype=self.dtype)
        self.filled = 0
        self.written = 0
        self.crcs: list[int] = []

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=self.dtype)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {vectors.shape} for a segment of {self.dim}-float vectors")
        at = 0
        while at < len(vectors):
            if self.filled == 0 and len(vectors) - at >= self.block_rows:  # a whole block straight from the input
                self._block(vectors[at: at + self.block_rows])
                at += self.block_rows
                continue
            take = min(self.block_rows - self.filled, len(vectors) - at)
            self.buffer[self.filled: self.filled + take] = vectors[at: at + take]
            self.filled += take
            at += take
            if self.filled == self.block_rows:
                self._block(self.buffer)
                self.filled = 0

    def _block(self, vectors: np.ndarray) -> None:
        start = self.written
        if start + len(vectors) > len(self.keys):
            raise ValueError(f"more vectors than the {len(self.keys)} keys of the segment")
        data = np.ascontiguousarray(vectors)
        self.crcs.append(_crc(data, _crc(self.keys[start: start + len(vectors)])))
        self.f.write(memoryview(data).cast("B"))
        self.written += len(vectors)

    def finish(self) -> None:
        if self.filled:
            self._block(self.buffer[: self.filled])
            self.filled = 0
        if self.written != len(self.keys):
            raise ValueError(f"{self.written} vectors for the {len(self.keys)} keys of the segment")
        table = np.asarray(self.crcs, dtype="<u4").tobytes()
        self.f.write(table + _CRC.pack(_crc(table)))


def write_segment(path: str | os.PathLike, keys: np.ndarray, dim: int, chunks: Iterable[np.ndarray], *,
                  block_rows: int | None = None, dtype="float32") -> None:
    """Write a segment (format 2 for float32, 3 for float16) atomically (:func:`~skproduct._files.atomic_write`), readable by every user.

    Parameters
    ----------
    path : str or path-like
        The segment to write; its folder must exist.
    keys : ndarray of S16
        One key per vector.
    dim : int
        The vectors' dimension.
    chunks : iterable of ndarray
        The vectors, in the keys' order, in chunks of any number of rows:
        memory stays bounded by one chunk and one block.
    block_rows : int, optional
        Rows per checksum block (default: :func:`block_rows_for`).
    dtype : {"float32", "float16"}, default="float32"
        How the vectors are stored: float16 takes half the bytes.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> path = Path(tempfile.mkdtemp()) / "seg.skemb"
    >>> keys = np.array([b"a" * 16, b"b" * 16, b"c" * 16], dtype="S16")
    >>> write_segment(path, keys, 2, [np.ones((2, 2)), np.zeros((1, 2))], block_rows=2)
    >>> segment = Segment.open(path)
    >>> segment.n_blocks, segment.check_all(), segment.vectors.tolist()
    (2, [], [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    >>> write_segment(path, keys, 2, [np.ones((3, 2))], dtype="float16")
    >>> segment = Segment.open(path)
    >>> segment.version, segment.dtype.name, segment.check_all()
    (3, 'float16', [])
    """
    keys = np.ascontiguousarray(keys, dtype=KEY_DTYPE)
    stored = storage_dtype(dtype)
    with atomic_write(path, permissions=SEGMENT_MODE) as f:
        writer = _BlockWriter(f, keys, dim, block_rows, stored)
        for chunk in chunks:
            writer.add(chunk)
        writer.finish()
