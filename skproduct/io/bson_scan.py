"""One sequential pass over a BSON file that records where each product's pictures are.

The scanner reads the file through a bounded window and walks the BSON element
headers of every document (length prefixes, type bytes, field names) without
decoding picture bytes. It keeps, per product, the ``_id``, the ``category_id``
and the byte ranges of its pictures, in any field order, skipping fields it
does not need. Memory grows with the number of products, never with the file.

Within a window, the length prefixes are chained in Python, then the whole
documents are parsed together with numpy
(:func:`~skproduct.io.bson_batch.parse_batch`). Any document that parser cannot
handle with certainty is parsed again by
:func:`~skproduct.io.bson_document.parse_document`, the reference parser, which
also words the errors.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..exceptions import BsonFormatError, BsonTruncatedError
from .bson_batch import BadDocument, Batch, parse_batch
from .bson_document import ELEMENT_TYPES
from .bson_window import WINDOW_BYTES, _Window, unpack_int32

logger = logging.getLogger(__name__)

#: BSON's document size limit (MongoDB's 16 MiB plus its 16 KiB allowance for
#: internal fields); a longer declared length is a corrupt prefix.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024 + 16 * 1024


@dataclass
class BsonIndex:
    """Where every product of a BSON file sits, as flat numpy arrays.

    Pictures are stored in compressed-row form: the pictures of product ``i``
    are ``img_offset[img_start[i]:img_start[i + 1]]`` (byte offset of the
    picture's data) with the matching ``img_length``.
    """

    product_id: np.ndarray
    category_id: np.ndarray
    has_category: np.ndarray
    doc_offset: np.ndarray
    img_start: np.ndarray
    img_offset: np.ndarray
    img_length: np.ndarray
    truncated_offset: int = -1

    def __len__(self) -> int:
        return len(self.doc_offset)

    @property
    def n_images(self) -> np.ndarray:
        """Number of pictures of each product."""
        return np.diff(self.img_start)


def _chain(buf: bytearray, rel: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Follow the length prefixes of the documents that lie whole in ``buf[rel:limit]``.

    The chain stops at the first document that is not whole or declares fewer
    than 5 bytes.

    Returns
    -------
    starts, lengths : ndarray of int64
        Position and length of each whole document, in file order.
    """
    starts = []
    add = starts.append
    unpack = unpack_int32
    while rel + 4 <= limit:
        length = unpack(buf, rel)[0]
        if length < 5 or rel + length > limit:
            break
        add(rel)
        rel += length
    starts = np.array(starts, dtype=np.int64)
    return starts, np.diff(starts, append=rel)


# --- The scan -------------------------------------------------------------------

#: Parses the whole documents at ``starts`` (with ``lengths``) of a window.
BatchParser = Callable[[_Window, np.ndarray, np.ndarray], Batch]


def scan_bson(path: str | os.PathLike, *, on_truncated: str = "raise") -> BsonIndex:
    """Build the :class:`BsonIndex` of a BSON file in one sequential pass.

    Parameters
    ----------
    path : str or path-like
        The BSON file.
    on_truncated : {"raise", "warn"}
        What to do when the file ends inside a document: raise
        :class:`~skproduct.exceptions.BsonTruncatedError`, or warn and keep the
        whole documents before it.

    Returns
    -------
    BsonIndex
        Where every product's pictures are.

    Raises
    ------
    BsonFormatError
        When a document is malformed, or the file is empty (0 bytes).
    BsonTruncatedError
        When the file ends inside a document and ``on_truncated="raise"``.
    """
    path = os.fspath(path)
    index, truncation = _scan(path, on_truncated, parse_batch)
    if truncation is not None:
        warn_truncated(path, *truncation)
    return index


def _scan(path: str, on_truncated: str, parse_batch: BatchParser) -> tuple[BsonIndex, tuple | None]:
    """Scan ``path`` window by window, parsing the whole documents of each with ``parse_batch``.

    :func:`scan_bson` passes the vectorised :func:`parse_batch`; passing
    :func:`parse_batch_pure` runs the reference parser on every document.

    Returns
    -------
    index : BsonIndex
    truncation : tuple or None
        ``(offset, n_kept, reason)`` to warn about when ``on_truncated="warn"``
        and the file ends inside a document.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise empty_file_error(path)
    batches, doc_offsets = [], []
    truncation = None
    with open(path, "rb", buffering=0) as f:
        window = _Window(f)
        pos = position = 0
        while pos < size:
            rel, length = window.length_at(pos)
            first_type = window.buf[rel + 4] if window.n - rel > 4 else None
            reason = _check_length(path, size, pos, position, length, first_type)
            if reason is not None:
                if on_truncated == "warn":
                    truncation = (pos, position, reason)
                    break
                raise truncated_error(path, pos, position, reason)
            if rel + length > window.n:
                window.load(pos, max(WINDOW_BYTES, length))
                rel = 0
            starts, lengths = _chain(window.buf, rel, min(window.n, size - window.start))
            if not starts.size:
                raise truncated_error(path, pos, position, "the file shrank while it was read")
            batches.append(_parse_window(path, window, starts, lengths, position, parse_batch))
            doc_offsets.append(starts + window.start)
            position += len(starts)
            pos = window.start + int(starts[-1] + lengths[-1])
    return _assemble(batches, doc_offsets, truncation[0] if truncation else -1), truncation


def _parse_window(
    path: str, window: _Window, starts: np.ndarray, lengths: np.ndarray, position: int, parse_batch: BatchParser
) -> Batch:
    """Parse whole documents of the window, the first being product ``position``.

    Returns
    -------
    Batch
        With picture offsets made absolute.

    Raises
    ------
    BsonFormatError
        For the first malformed document.
    """
    try:
        batch = parse_batch(window, starts, lengths)
    except BadDocument as exc:
        raise BsonFormatError(
            path,
            window.start + int(starts[exc.index]),
            position + exc.index,
            f"the document does not decode: {exc.reason}",
        ) from None
    batch.img_offset += window.start
    return batch


def _check_length(
    path: str, size: int, pos: int, position: int, length: int | None, first_type: int | None
) -> str | None:
    """Check the length a document declares (``None`` when fewer than 4 bytes are left).

    A length below 5 or above :data:`MAX_DOCUMENT_BYTES` is a corrupt length
    prefix, wherever it is. A plausible length that runs past the end of the
    file is a truncated file; for the first document that also needs a BSON
    element type after the prefix (``first_type``), or the file is not BSON at all.

    Returns
    -------
    str or None
        Why the file is truncated at this document, if it is.

    Raises
    ------
    BsonFormatError
        When the length is impossible.
    """
    plausible = length is not None and 5 <= length <= MAX_DOCUMENT_BYTES
    if position == 0 and not (plausible and (length <= size or first_type in ELEMENT_TYPES)):
        declared = "no length" if length is None else f"{length} bytes"
        raise BsonFormatError(
            path,
            pos,
            position,
            f"not a BSON file of documents: the first document declares {declared} but the file has {size}",
        )
    if length is None:
        return f"the file ends inside this document (only {size - pos} bytes are present)"
    if not plausible:
        raise BsonFormatError(
            path,
            pos,
            position,
            f"the document declares a length of {length} bytes (BSON documents have 5 to {MAX_DOCUMENT_BYTES}): "
            "its length prefix is corrupt",
        )
    if pos + length > size:
        return f"the file ends inside this document ({size - pos} of its {length} bytes are present)"
    return None


def _assemble(batches: list[Batch], doc_offsets: list[np.ndarray], truncated_offset: int) -> BsonIndex:
    """Join the batches of a scan into a :class:`BsonIndex`."""

    def join(arrays, dtype):
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    n_images = join([b.n_images for b in batches], np.int64)
    return BsonIndex(
        product_id=_id_array([b.product_id for b in batches]),
        category_id=join([b.category_id for b in batches], np.int64),
        has_category=join([b.has_category for b in batches], bool),
        doc_offset=join(doc_offsets, np.int64),
        img_start=np.concatenate([[0], np.cumsum(n_images)]).astype(np.int64),
        img_offset=join([b.img_offset for b in batches], np.int64),
        img_length=join([b.img_length for b in batches], np.int64),
        truncated_offset=truncated_offset,
    )


def warn_truncated(path: str, offset: int, n_kept: int, reason: str) -> None:
    """Warn (and log) that ``path`` ends inside the document at ``offset``."""
    message = f"{path}: {reason} at byte offset {offset}; kept the {n_kept} whole products before it"
    warnings.warn(message, UserWarning, stacklevel=5)  # the caller of read_bson
    logger.warning(message)


def empty_file_error(path: str) -> BsonFormatError:
    """The error for a zero-length file: no BSON file of products is empty (an interrupted download or copy?)."""
    return BsonFormatError(
        path, 0, 0, "the file is empty (0 bytes), not a BSON file of products (an interrupted download or copy?)"
    )


def truncated_error(path: str, offset: int, n_kept: int, reason: str) -> BsonTruncatedError:
    """The error for a file that ends inside the document at ``offset``."""
    return BsonTruncatedError(
        path, offset, n_kept, reason + "; pass on_truncated='warn' to keep the whole products before it"
    )


def _id_array(chunks: list[np.ndarray]) -> np.ndarray:
    """Integer ids as int64; any other id makes the whole column strings."""
    if all(chunk.dtype == np.int64 for chunk in chunks):
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return np.array([str(i) for i in np.concatenate(chunks).tolist()], dtype=str)
