"""Keep a BSON file's offset index in a sidecar file, so that the next open is instant.

The sidecar sits next to the BSON file (``train.bson.skpidx``: a short JSON
header, the raw index arrays, and a CRC-32 of everything before it); when that
folder cannot be written it goes to skproduct's cache folder instead.
:func:`default_index_path` says where an index goes when the data folder must
stay untouched (the command line's choice). Writes are atomic (temporary file,
then rename), so a killed process never leaves a half-written sidecar behind.

What a sidecar guarantees (format 2)
------------------------------------
- **Its own bytes.** Every byte of the sidecar (header, arrays, padding) is
  covered by its CRC-32 trailer, checked on every read (one pass over the
  sidecar: about 0.3 s for the 430 MB index of the 7M-product Cdiscount train
  file): a flipped bit, a cut-short or spliced file is rebuilt with a
  :class:`~skproduct.exceptions.StaleFileWarning`, never read. (A CRC catches
  accidental damage; it is no defence against someone who may write the
  sidecar, who could rewrite its checksum too.)
- **The BSON file it describes.** It records the file's size, its
  modification time (in nanoseconds) and a *content signature*: the SHA-256
  of its first and last 64 KiB and of 8 blocks of 64 KiB at fixed fractions
  of its length (the whole file when it has 640 KiB or less). Computing it
  costs ten reads of 64 KiB whatever the file's size (milliseconds on an
  SSD, for the 58 GB Cdiscount train file too), so opening stays instant.
  Any change of size or of modification time makes the sidecar stale
  (rebuilt with a ``StaleFileWarning``). So does other content behind the
  same size and a restored time (``cp -p`` or ``rsync -t`` of another
  version, a restored backup, an in-place edit followed by :func:`os.utime`)
  **when it differs in the sampled 640 KiB**. That is all but certain for
  another dump of the catalogue (its first block differs); for a relabelled
  copy it depends on how much changed: the ten blocks hold about 80 of
  Cdiscount's documents (8 KB each on average), so relabelling 5% of the
  products is caught 98 times in 100, and 1% about half the time; one edited
  byte outside the blocks is not caught at all. Sampling cannot see what it
  does not read, and reading every document's header would cost a full scan:
  after editing a file in place and setting its time back, pass
  ``read_bson(..., rebuild_index=True)``.
- **Older sidecars** (format 1, without a checksum) are rebuilt once, with a
  ``StaleFileWarning``: reading one unverified would keep the damage it may
  hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from .._files import atomic_write, resolve_file_target
from .._paths import user_cache_dir
from ..exceptions import StaleFileWarning
from .bson_scan import BsonIndex, scan_bson, truncated_error, warn_truncated

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".skpidx"
_FORMAT_VERSION = 2  # 1: no checksum, no content signature
_MAGIC = b"SKPIDX\x00\x01"
_HEADER_LENGTH = struct.Struct("<Q")
_TRAILER = struct.Struct("<4sI")  # b"CRC1", then the CRC-32 of every byte before the trailer
_TRAILER_MARK = b"CRC1"
SAMPLE_BLOCK_BYTES = 64 * 1024
SAMPLE_INNER_BLOCKS = 8  # between the first and the last block
_ALIGNMENT = 64
_SIDECAR_MODE = 0o644  # readable by every user of the data, like the BSON file beside it
_ARRAYS = ("product_id", "category_id", "has_category", "doc_offset", "img_start", "img_offset", "img_length")


def sidecar_candidates(bson_path: str) -> list[Path]:
    """Return where the sidecar of ``bson_path`` may live, preferred place first."""
    absolute = os.path.abspath(bson_path)
    digest = hashlib.sha1(absolute.encode("utf-8")).hexdigest()[:16]
    name = os.path.basename(absolute)
    return [
        Path(absolute + SIDECAR_SUFFIX),
        user_cache_dir("bson-index", f"{name}-{digest}{SIDECAR_SUFFIX}"),
    ]


def default_index_path(bson_path: str | os.PathLike) -> Path:
    """Where to keep the offset index of ``bson_path`` without writing into the file's folder.

    The index already beside the file (``<bson_path>.skpidx``, made by an
    earlier :func:`~skproduct.io.read_bson`) when there is one; otherwise the
    index in skproduct's cache folder (``$SKPRODUCT_CACHE_DIR``), one per
    absolute path of a BSON file. Pass it as ``read_bson(path,
    index_path=...)`` to read a file whose folder is shared or read-only (the
    command line does).

    Parameters
    ----------
    bson_path : str or path-like
        The BSON file.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import os, tempfile
    >>> from skproduct.datasets import write_synthetic_bson
    >>> from skproduct.io import default_index_path, read_bson
    >>> folder = tempfile.mkdtemp()
    >>> path = write_synthetic_bson(os.path.join(folder, "train.bson"), n_products=3, random_state=0)
    >>> default_index_path(path).parent.name  # no index yet: the cache folder
    'bson-index'
    >>> _ = read_bson(path)  # indexes the file beside it, its folder being writable
    >>> default_index_path(path).name
    'train.bson.skpidx'
    """
    beside, in_cache = sidecar_candidates(os.fspath(bson_path))
    return beside if beside.is_file() else in_cache


def sample_spans(size: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` blocks of a file of ``size`` bytes that its content signature hashes.

    The first and the last :data:`SAMPLE_BLOCK_BYTES`, and
    :data:`SAMPLE_INNER_BLOCKS` blocks evenly spaced between them; the whole
    file when it is no longer than these ten blocks together.

    Examples
    --------
    >>> sample_spans(1000)
    [(0, 1000)]
    >>> spans = sample_spans(10 * 2**20)
    >>> len(spans), spans[0], spans[-1] == (10 * 2**20 - 65536, 65536)
    (10, (0, 65536), True)
    """
    blocks = SAMPLE_INNER_BLOCKS + 2
    if size <= blocks * SAMPLE_BLOCK_BYTES:
        return [(0, size)]
    last = size - SAMPLE_BLOCK_BYTES
    return [(last * k // (blocks - 1), SAMPLE_BLOCK_BYTES) for k in range(blocks)]


def _file_signature(path: str) -> dict:
    """The size, modification time and content signature (see the module's docstring) of the BSON file."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in sample_spans(stat.st_size):
            f.seek(offset)
            digest.update(f.read(length))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha256": digest.hexdigest()}


def load_index(
    bson_path: str,
    *,
    on_truncated: str = "raise",
    index_path: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> BsonIndex:
    """Return the index of ``bson_path``, from its sidecar when that is fresh.

    Parameters
    ----------
    bson_path : str
        The BSON file.
    on_truncated : {"raise", "warn"}
        Passed to :func:`~skproduct.io.bson_scan.scan_bson`; also applied to a
        sidecar that recorded a truncated tail.
    index_path : str or path-like, optional
        Read and write the sidecar here instead of the automatic places: a
        regular file or nothing yet (a symbolic link is followed).
    rebuild : bool, default=False
        Ignore any existing sidecar.

    Notes
    -----
    A sidecar is used when its checksum holds and it matches the file's
    size, modification time and sampled content; the module's docstring says
    what that does and does not detect.

    Raises
    ------
    IsADirectoryError, ValueError
        ``index_path`` is a folder, a FIFO, a socket or a device.
    """
    signature = _file_signature(bson_path)
    candidates = [resolve_file_target(index_path)] if index_path is not None else sidecar_candidates(bson_path)
    if not rebuild:
        for candidate in candidates:
            index = _read_sidecar(candidate, signature)
            if index is not None:
                logger.debug("read the index of %s from %s", bson_path, candidate)
                _apply_truncation_policy(bson_path, index, on_truncated)
                return index
    index = scan_bson(bson_path, on_truncated=on_truncated)
    for candidate in candidates:
        if _write_sidecar(candidate, index, signature):
            logger.info("indexed %d products of %s into %s", len(index), bson_path, candidate)
            break
    else:
        logger.warning("could not save the index of %s anywhere; the next open will scan it again", bson_path)
    return index


def _apply_truncation_policy(bson_path: str, index: BsonIndex, on_truncated: str) -> None:
    if index.truncated_offset < 0:
        return
    reason = "the file ends inside this document"
    if on_truncated == "warn":
        warn_truncated(bson_path, index.truncated_offset, len(index), reason)
        return
    raise truncated_error(bson_path, index.truncated_offset, len(index), reason)


def _read_sidecar(candidate: Path, signature: dict) -> BsonIndex | None:
    """The index in ``candidate`` when it is whole and describes the file of ``signature``; ``None`` (with a
    :class:`~skproduct.exceptions.StaleFileWarning` when there was a file) to rebuild it."""
    try:
        with open(resolve_file_target(candidate), "rb") as f:  # never opens a FIFO, which would block
            size = os.fstat(f.fileno()).st_size
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not an skproduct index file")
            header_length = _HEADER_LENGTH.unpack(f.read(_HEADER_LENGTH.size))[0]
            if header_length > size:
                raise ValueError(f"its header declares {header_length} bytes but the file has {size}")
            header = json.loads(f.read(header_length))
            if not isinstance(header, dict):
                raise TypeError("its header is not a JSON object")
            version = header.get("version")
            if version != _FORMAT_VERSION:
                written_by = ("an older skproduct (format 1, without a checksum of its own)" if version == 1
                              else f"another version of skproduct (format {version!r})")
                _warn(f"the index {candidate} is stale: it was written by {written_by}; rebuilding it")
                return None
            f.seek(0)
            content = np.empty(size, dtype=np.uint8)  # the arrays are views of it, aligned as in the file
            if f.readinto(content) != size:
                raise ValueError("the file shrank while it was read")
        _check_trailer(content)
        if header.get("source") != signature:
            _warn(
                f"the index {candidate} is stale: its BSON file changed since it was written (its size, "
                "modification time or sampled content differ); rebuilding it"
            )
            return None
        data_start = _aligned(len(_MAGIC) + _HEADER_LENGTH.size + header_length)
        end = size - _TRAILER.size
        arrays = {}
        for name, dtype, count, offset in header["arrays"]:
            dtype = np.dtype(dtype)
            start = data_start + int(offset)
            if name not in _ARRAYS or count < 0 or start + dtype.itemsize * count > end:
                raise ValueError(f"the array {name} does not fit in the file")
            arrays[name] = content[start : start + dtype.itemsize * count].view(dtype)
        index = BsonIndex(**arrays, truncated_offset=int(header["truncated_offset"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        _warn(f"ignoring the unreadable index {candidate} ({exc}); rebuilding it")
        return None
    return index


def _warn(message: str) -> None:
    """A :class:`~skproduct.exceptions.StaleFileWarning` at the caller of :func:`~skproduct.io.read_bson`."""
    warnings.warn(message, StaleFileWarning, stacklevel=5)


def _check_trailer(content: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``content`` (the whole file, as bytes) ends with the CRC-32 of all before it."""
    if len(content) < _TRAILER.size:
        raise ValueError("it is cut short")
    mark, expected = _TRAILER.unpack_from(content, len(content) - _TRAILER.size)
    if mark != _TRAILER_MARK:
        raise ValueError("it has no checksum at its end: it was cut short or damaged")
    if zlib.crc32(content[: len(content) - _TRAILER.size]) != expected:
        raise ValueError("its content does not match its checksum: it was damaged after it was written")


def _encode_sidecar(index: BsonIndex, signature: dict) -> list[bytes | np.ndarray]:
    """The sidecar's pieces: magic, header length, JSON header, each array at an aligned offset, the CRC trailer.

    Array offsets in the header count from the start of the data, which is the
    first aligned position after the header.
    """
    arrays = [np.ascontiguousarray(getattr(index, name)) for name in _ARRAYS]
    layout, offset = [], 0
    for name, array in zip(_ARRAYS, arrays):
        layout.append([name, array.dtype.str, len(array), offset])
        offset = _aligned(offset + array.nbytes)
    meta = {"version": _FORMAT_VERSION, "source": signature, "truncated_offset": index.truncated_offset, "arrays": layout}
    header = json.dumps(meta).encode("utf-8")
    pieces: list[bytes | np.ndarray] = [_MAGIC, _HEADER_LENGTH.pack(len(header)), header]
    position = len(_MAGIC) + _HEADER_LENGTH.size + len(header)
    data_start = _aligned(position)
    for (_, _, _, offset), array in zip(layout, arrays):
        pieces.append(b"\0" * (data_start + offset - position))
        pieces.append(array)
        position = data_start + offset + array.nbytes
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece.view(np.uint8) if isinstance(piece, np.ndarray) else piece, crc)
    pieces.append(_TRAILER.pack(_TRAILER_MARK, crc))
    return pieces


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def _write_sidecar(candidate: Path, index: BsonIndex, signature: dict) -> bool:
    """Write the sidecar atomically; ``False`` when ``candidate`` cannot take it (read-only folder, not a file)."""
    try:
        candidate.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(candidate, permissions=_SIDECAR_MODE) as f:
            for piece in _encode_sidecar(index, signature):
                f.write(piece.view(np.uint8) if isinstance(piece, np.ndarray) else piece)
    except (OSError, ValueError) as exc:
        logger.debug("cannot write an index to %s: %s", candidate, exc)
        return False
    return True
