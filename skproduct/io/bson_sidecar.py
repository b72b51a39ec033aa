"""Keep a BSON file's offset index in a sidecar file, so that the next open is instant.

The sidecar sits next to the BSON file (``train.bson.skpidx``: a short JSON header, then the raw index arrays); when that
folder cannot be written it goes to skproduct's cache folder instead. It records
the size and modification time of the file it describes: a changed file makes
it stale and it is rebuilt. Writes are atomic (temporary file, then rename), so
a killed process never leaves a half-written sidecar behind.
:func:`default_index_path` says where an index goes when the data folder must
stay untouched (the command line's choice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from .._files import atomic_write, resolve_file_target
from .._paths import user_cache_dir
from ..exceptions import StaleFileWarning
from .bson_scan import BsonIndex, scan_bson, truncated_error, warn_truncated

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".skpidx"
_FORMAT_VERSION = 1
_MAGIC = b"SKPIDX\x00\x01"
_HEADER_LENGTH = struct.Struct("<Q")
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


def _file_signature(path: str) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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
    try:
        with open(resolve_file_target(candidate), "rb") as f:  # never opens a FIFO, which would block
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not an skproduct index file")
            header_length = _HEADER_LENGTH.unpack(f.read(_HEADER_LENGTH.size))[0]
            header = json.loads(f.read(header_length))
            data_start = _aligned(len(_MAGIC) + _HEADER_LENGTH.size + header_length)
            if header.get("version") != _FORMAT_VERSION or header.get("source") != signature:
                warnings.warn(
                    f"the index {candidate} is stale (its BSON file changed since, or another version of skproduct "
                    "wrote it); rebuilding it", StaleFileWarning, stacklevel=4,
                )
                return None
            arrays = {}
            for name, dtype, count, offset in header["arrays"]:
                f.seek(data_start + offset)
                arrays[name] = np.fromfile(f, dtype=np.dtype(dtype), count=count)
                if len(arrays[name]) != count:
                    raise ValueError(f"the array {name} is cut short")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        warnings.warn(f"ignoring the unreadable index {candidate} ({exc}); rebuilding it", StaleFileWarning,
                      stacklevel=4)
        return None
    return BsonIndex(**arrays, truncated_offset=int(header["truncated_offset"]))


def _encode_sidecar(index: BsonIndex, signature: dict) -> list[bytes | np.ndarray]:
    """The sidecar's pieces: magic, header length, JSON header, then each array at an aligned offset.

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
    return pieces


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def _write_sidecar(candidate: Path, index: BsonIndex, signature: dict) -> bool:
    """Write the sidecar atomically; ``False`` when ``candidate`` cannot take it (read-only folder, not a file)."""
    try:
        candidate.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(candidate, permissions=_SIDECAR_MODE) as f:
            for piece in _encode_sidecar(index, signature):
                f.write(piece.tobytes() if isinstance(piece, np.ndarray) else piece)
    except (OSError, ValueError) as exc:
        logger.debug("cannot write an index to %s: %s", candidate, exc)
        return False
    return True
