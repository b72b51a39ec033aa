"""One sequential pass over a BSON file that records where each product's pictures are.

The scanner reads the file through a bounded window and walks the BSON element
headers of every document (length prefixes, type bytes, field names) without
decoding picture bytes. It keeps, per product, the ``_id``, the ``category_id``
and the byte ranges of its pictures, in any field order, skipping fields it
does not need. Memory grows with the number of products, never with the file.

Within a window, the length prefixes are chained in Python, then the whole
documents are parsed together with numpy (:func:`_parse_vectorised`). Any
document that parser cannot handle with certainty is parsed again by
:func:`_parse_document`, the reference parser, which also words the errors.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..exceptions import BsonFormatError, BsonTruncatedError

logger = logging.getLogger(__name__)

#: Bytes read at a time; a document larger than this is read whole.
WINDOW_BYTES = 4 << 20
#: Spare bytes past the window, so that vectorised reads may overrun a document.
_PADDING = 64

_unpack_int32 = struct.Struct("<i").unpack_from
_unpack_int64 = struct.Struct("<q").unpack_from

# BSON element type -> size of a value of fixed size.
_FIXED_SIZE = {
    0x01: 8,  # double
    0x06: 0,  # undefined
    0x07: 12,  # ObjectId
    0x08: 1,  # bool
    0x09: 8,  # UTC datetime
    0x0A: 0,  # null
    0x10: 4,  # int32
    0x11: 8,  # timestamp
    0x12: 8,  # int64
    0x13: 16,  # decimal128
    0x7F: 0,  # max key
    0xFF: 0,  # min key
}
_STRING_TYPES = (0x02, 0x0D, 0x0E)  # string, JavaScript code, symbol
_DOCUMENT_TYPES = (0x03, 0x04, 0x0F)  # document, array, code with scope
_BINARY = 0x05
_ELEMENT_TYPES = frozenset(_FIXED_SIZE) | {*_STRING_TYPES, *_DOCUMENT_TYPES, _BINARY, 0x0B, 0x0C}


class _Malformed(Exception):
    """Internal: a document is malformed; the caller adds file, offset and position."""


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


def _skip_value(buf: bytes, p: int, etype: int, end: int) -> int:
    """Return the position just past the value of type ``etype`` starting at ``p``."""
    size = _FIXED_SIZE.get(etype)
    if size is not None:
        q = p + size
    elif etype in _STRING_TYPES:
        _check_room(p, 4, end)
        n = _unpack_int32(buf, p)[0]
        if n < 1:
            raise _Malformed(f"a string declares a length of {n} bytes")
        q = p + 4 + n
    elif etype in _DOCUMENT_TYPES:
        _check_room(p, 4, end)
        n = _unpack_int32(buf, p)[0]
        if n < 5:
            raise _Malformed(f"an embedded document declares a length of {n} bytes")
        q = p + n
    elif etype == _BINARY:
        _check_room(p, 4, end)
        n = _unpack_int32(buf, p)[0]
        if n < 0:
            raise _Malformed(f"a binary field declares a length of {n} bytes")
        q = p + 5 + n
    elif etype == 0x0B:  # regular expression: two C strings
        q = _cstring_end(buf, _cstring_end(buf, p, end) + 1, end) + 1
    elif etype == 0x0C:  # DBPointer: string + ObjectId
        q = _skip_value(buf, p, 0x02, end) + 12
    else:
        raise _Malformed(f"unknown BSON element type 0x{etype:02x}")
    if q > end:
        raise _Malformed("a field runs past the end of its document")
    return q


def _check_room(p: int, n: int, end: int) -> None:
    if p + n > end:
        raise _Malformed("a field runs past the end of its document")


def _cstring_end(buf: bytes, p: int, end: int) -> int:
    q = buf.find(b"\x00", p, end)
    if q < 0:
        raise _Malformed("a field name is not terminated inside its document")
    return q


def _document_bounds(buf: bytes, p: int, end: int, what: str) -> int:
    """Check the embedded document starting at ``p``; return the position of its final null."""
    _check_room(p, 4, end)
    n = _unpack_int32(buf, p)[0]
    last = p + n - 1
    if n < 5 or last >= end or buf[last] != 0:
        raise _Malformed(f"{what} is not a valid embedded document")
    return last


def _parse_pictures(buf: bytes, p: int, end: int) -> list[tuple[int, int]]:
    """Return ``(data_start, data_length)`` for each picture of an ``imgs`` array at ``p``."""
    array_last = _document_bounds(buf, p, end, "'imgs'")
    pictures = []
    q = p + 4
    while q < array_last:
        etype = buf[q]
        q = _cstring_end(buf, q + 1, array_last) + 1
        if etype != 0x03:
            raise _Malformed(f"image {len(pictures)} in 'imgs' is not a document")
        image_last = _document_bounds(buf, q, array_last, f"image {len(pictures)}")
        picture = None
        r = q + 4
        while r < image_last:
            ftype = buf[r]
            name_end = _cstring_end(buf, r + 1, image_last)
            is_picture = buf[r + 1 : name_end] == b"picture"
            r = name_end + 1
            if is_picture:
                if ftype != _BINARY:
                    raise _Malformed(f"'picture' of image {len(pictures)} is not binary data")
                _check_room(r, 5, image_last)
                picture = (r + 5, _unpack_int32(buf, r)[0])
            r = _skip_value(buf, r, ftype, image_last)
        if r != image_last:
            raise _Malformed(f"image {len(pictures)} does not end where its length says")
        if picture is None:
            raise _Malformed(f"image {len(pictures)} has no 'picture' field")
        pictures.append(picture)
        q = image_last + 1
    if q != array_last:
        raise _Malformed("'imgs' does not end where its length says")
    return pictures


def _read_id(buf: bytes, p: int, etype: int):
    if etype == 0x10:
        return _unpack_int32(buf, p)[0]
    if etype == 0x12:
        return _unpack_int64(buf, p)[0]
    if etype == 0x02:
        n = _unpack_int32(buf, p)[0]
        return buf[p + 4 : p + 3 + n].decode("utf-8", errors="replace")
    if etype == 0x07:
        return buf[p : p + 12].hex()
    raise _Malformed(f"'_id' has BSON type 0x{etype:02x}; expected an integer, string or ObjectId")


def _read_category(buf: bytes, p: int, etype: int):
    if etype == 0x10:
        return _unpack_int32(buf, p)[0]
    if etype == 0x12:
        return _unpack_int64(buf, p)[0]
    if etype == 0x0A:
        return None
    raise _Malformed(f"'category_id' has BSON type 0x{etype:02x}; expected an integer")


def _parse_document(buf: bytes, start: int, length: int):
    """Return ``(product_id, category_id or None, pictures)`` of the document at ``start``."""
    last = start + length - 1
    if buf[last] != 0:
        raise _Malformed("the document does not end with a null byte")
    product_id = category_id = pictures = None
    has_id = False
    p = start + 4
    while p < last:
        etype = buf[p]
        name_end = _cstring_end(buf, p + 1, last)
        name = buf[p + 1 : name_end]
        p = name_end + 1
        if name == b"_id":
            _check_room(p, _FIXED_SIZE.get(etype, 4), last)
            product_id, has_id = _read_id(buf, p, etype), True
        elif name == b"category_id":
            _check_room(p, _FIXED_SIZE.get(etype, 4), last)
            category_id = _read_category(buf, p, etype)
        elif name == b"imgs":
            if etype != 0x04:
                raise _Malformed("'imgs' is not an array")
            pictures = _parse_pictures(buf, p, last)
        p = _skip_value(buf, p, etype, last)
    if p != last:
        raise _Malformed("the document's fields do not end where its length says")
    if not has_id:
        raise _Malformed("the document has no '_id'")
    if not pictures:
        raise _Malformed("the product has no picture ('imgs' is missing or empty)")
    return product_id, category_id, pictures


class _BadDocument(Exception):
    """Internal: document ``index`` of a batch is malformed, for ``reason``."""

    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)
        self.index = index
        self.reason = reason


@dataclass
class _Batch:
    """What the documents of one window hold, pictures flattened in document order.

    Picture offsets are relative to the start of the window.
    """

    product_id: np.ndarray
    category_id: np.ndarray
    has_category: np.ndarray
    n_images: np.ndarray
    img_offset: np.ndarray
    img_length: np.ndarray


class _Window:
    """A reusable read buffer over part of a file, with views to gather from it.

    The buffer has :data:`_PADDING` spare bytes past its capacity, so that the
    vectorised parser may read a few bytes past the end of a document before
    its bounds checks discard them. ``i32``, ``i64``, ``u32`` and ``u64`` are
    little-endian integer views that start at every byte (unaligned).

    Parameters
    ----------
    f : raw binary file
        The open file; ``start`` and ``n`` say which of its bytes the buffer holds.
    """

    def __init__(self, f):
        self._file = f
        self.start = 0
        self.n = 0
        self._allocate(WINDOW_BYTES)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf = bytearray(capacity + _PADDING)
        self.u8 = np.frombuffer(self.buf, dtype=np.uint8)
        self.i32, self.i64, self.u32, self.u64 = (
            np.ndarray(len(self.buf) - 7, dtype=dtype, buffer=self.buf, strides=(1,))
            for dtype in ("<i4", "<i8", "<u4", "<u8")
        )

    def load(self, pos: int, want: int) -> None:
        """Read up to ``want`` bytes of the file from byte ``pos`` into the buffer.

        The buffer grows for a document larger than :data:`WINDOW_BYTES` and
        shrinks back afterwards.
        """
        capacity = max(want, WINDOW_BYTES)
        if capacity != self.capacity:
            self._allocate(capacity)
        self._file.seek(pos)
        view = memoryview(self.buf)[:want]
        n = 0
        while n < want:
            got = self._file.readinto(view[n:])
            if not got:
                break
            n += got
        self.start, self.n = pos, n

    def length_at(self, pos: int) -> tuple[int, int]:
        """Return where the document at file offset ``pos`` is in the buffer, and its length.

        The window moves to ``pos`` when fewer than 4 bytes of it are loaded;
        the length is -1 when fewer than 4 bytes are left in the file.
        """
        rel = pos - self.start
        if rel + 4 > self.n:
            self.load(pos, WINDOW_BYTES)
            rel = 0
        length = _unpack_int32(self.buf, rel)[0] if self.n - rel >= 4 else -1
        return rel, length


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
    unpack = _unpack_int32
    while rel + 4 <= limit:
        length = unpack(buf, rel)[0]
        if length < 5 or rel + length > limit:
            break
        add(rel)
        rel += length
    starts = np.array(starts, dtype=np.int64)
    return starts, np.diff(starts, append=rel)


def _parse_batch_pure(window: _Window, starts: np.ndarray, lengths: np.ndarray) -> _Batch:
    """Parse documents one by one with :func:`_parse_document`, the reference parser.

    Raises
    ------
    _BadDocument
        For the first malformed document.
    """
    ids = []
    categories, has_category, n_images = array("q"), array("b"), array("q")
    img_offsets, img_lengths = array("q"), array("q")
    for k, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        try:
            product_id, category_id, pictures = _parse_document(window.buf, start, length)
        except _Malformed as exc:
            raise _BadDocument(k, str(exc)) from None
        ids.append(product_id)
        categories.append(category_id if category_id is not None else 0)
        has_category.append(category_id is not None)
        n_images.append(len(pictures))
        for data_start, data_length in pictures:
            img_offsets.append(data_start)
            img_lengths.append(data_length)
    all_int = all(isinstance(i, int) for i in ids)
    return _Batch(
        product_id=np.array(ids, dtype=np.int64 if all_int else object),
        category_id=np.frombuffer(categories, dtype=np.int64).copy(),
        has_category=np.frombuffer(has_category, dtype=np.int8).astype(bool),
        n_images=np.frombuffer(n_images, dtype=np.int64).copy(),
        img_offset=np.frombuffer(img_offsets, dtype=np.int64).copy(),
        img_length=np.frombuffer(img_lengths, dtype=np.int64).copy(),
    )


# --- Vectorised parser --------------------------------------------------------
#
# It parses all the documents of a window at once, element by element, and
# accepts a document only when every check of :func:`_parse_document` passes;
# anything else (rare types, string ids, image documents with extra fields,
# repeated fields, any bounds problem) is left to :func:`_parse_document`.

_MAX_NAME = 64  # longer field names are left to the reference parser

# Field codes: 0 is any other field.
_FIELD_ID, _FIELD_CATEGORY, _FIELD_IMGS = 1, 2, 3
_NAME_LENGTH = np.array([0, 3, 11, 4], dtype=np.int64)
_NAME_ID = int.from_bytes(b"_id\x00", "little")
_NAME_IMGS = int.from_bytes(b"imgs\x00", "little")
_NAME_CATEGORY = int.from_bytes(b"category", "little")
_LOW_32, _LOW_40 = (1 << 32) - 1, (1 << 40) - 1

# An image document {"picture": <binary>}: type and name, then the end of the name and the length.
_PICTURE_HEAD = int.from_bytes(b"\x05picture", "little")
_PICTURE_TAIL = int.from_bytes(b"ure\x00", "little")
_PICTURE_OVERHEAD = 19  # length prefix, element header, binary length and subtype, final null


def _type_tables():
    """Per BSON type: size base, whether a length prefix adds to it, least declared length.

    The size of a value is ``base + scale * declared`` where ``declared`` is
    the int32 at the value's start. Unsupported types get a size that no
    document can hold, so they fail the bounds check.
    """
    base = np.full(256, 1 << 40, dtype=np.int64)
    scale = np.zeros(256, dtype=np.int64)
    least = np.full(256, -(1 << 40), dtype=np.int64)
    for etype, size in _FIXED_SIZE.items():
        base[etype] = size
    for etypes, extra, smallest in ((_STRING_TYPES, 4, 1), (_DOCUMENT_TYPES, 0, 5), ((_BINARY,), 5, 0)):
        for etype in etypes:
            base[etype], scale[etype], least[etype] = extra, 1, smallest
    return base, scale, least


_SIZE_BASE, _SIZE_SCALE, _LEAST_DECLARED = _type_tables()

# _TYPE_OK[field, type]: whether the vectorised parser accepts that field with that type.
_TYPE_OK = np.zeros((4, 256), dtype=bool)
_TYPE_OK[0] = True
_TYPE_OK[_FIELD_ID, [0x10, 0x12]] = True
_TYPE_OK[_FIELD_CATEGORY, [0x0A, 0x10, 0x12]] = True
_TYPE_OK[_FIELD_IMGS, 0x04] = True


def _cstring_ends(u8: np.ndarray, start: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Position of the first null byte at or after ``start`` and before ``limit``.

    Where there is none within :data:`_MAX_NAME` bytes, the result is ``limit``.
    """
    end = limit.copy()
    pending = np.arange(len(start))
    for k in range(_MAX_NAME + 1):
        pos = start[pending] + k
        inside = pos < limit[pending]
        pending, pos = pending[inside], pos[inside]
        found = u8[pos] == 0
        end[pending[found]] = pos[found]
        pending = pending[~found]
        if not pending.size:
            break
    return end


def _field_names(window: _Window, name: np.ndarray, limit: np.ndarray):
    """Recognise the field names starting at ``name``; return field codes and name ends."""
    first8 = window.u64[name]
    is_id = (first8 & _LOW_32) == _NAME_ID
    is_imgs = (first8 & _LOW_40) == _NAME_IMGS
    is_category = (first8 == _NAME_CATEGORY) & (window.u32[name + 8] == _NAME_ID)
    field = is_id * _FIELD_ID + is_category * _FIELD_CATEGORY + is_imgs * _FIELD_IMGS
    name_end = name + _NAME_LENGTH[field]
    if not field.all():
        other = np.flatnonzero(field == 0)
        name_end[other] = _cstring_ends(window.u8, name[other], limit[other])
    return field, name_end


def _value_ends(window: _Window, etype: np.ndarray, value: np.ndarray, limit: np.ndarray):
    """Where each value ends, and whether it is of a supported type and inside its document."""
    declared = window.i32[value].astype(np.int64)
    end = value + _SIZE_BASE[etype] + _SIZE_SCALE[etype] * declared
    good = (end <= limit) & (declared >= _LEAST_DECLARED[etype])
    return end, good


def _walk_fields(window: _Window, starts: np.ndarray, last: np.ndarray):
    """Walk the top-level fields of all documents at once.

    Returns
    -------
    ok : ndarray of bool
        Documents whose fields all pass, with exactly one ``_id`` and ``imgs``
        and at most one ``category_id``.
    value_pos, value_type : ndarray of shape (4, n_documents)
        Position and BSON type of the value of each field code.
    """
    n_docs = len(starts)
    ok = window.u8[last] == 0
    p = starts + 4
    count = np.zeros((4, n_docs), dtype=np.int64)
    value_pos = np.zeros((4, n_docs), dtype=np.int64)
    value_type = np.zeros((4, n_docs), dtype=np.uint8)
    active = np.flatnonzero(ok & (p < last))
    while active.size:
        limit = last[active]
        etype = window.u8[p[active]]
        field, name_end = _field_names(window, p[active] + 1, limit)
        end, good = _value_ends(window, etype, name_end + 1, limit)
        good &= (name_end < limit) & _TYPE_OK[field, etype]
        if not good.all():
            ok[active[~good]] = False
            active, limit, etype, field, name_end, end = (
                a[good] for a in (active, limit, etype, field, name_end, end)
            )
        count[field, active] += 1
        value_pos[field, active] = name_end + 1
        value_type[field, active] = etype
        p[active] = end
        active = active[end < limit]
    ok &= (count[_FIELD_ID] == 1) & (count[_FIELD_CATEGORY] <= 1) & (count[_FIELD_IMGS] == 1)
    return ok, value_pos, value_type


def _image_values(window: _Window, element: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Where the value of each element of an ``imgs`` array starts, for embedded documents.

    Element names are array indices, nearly always of one digit. The result is
    past ``limit`` for an element that is not an embedded document or whose
    name does not end before ``limit``.
    """
    head = window.u32[element]
    value = element + 3
    one_digit = ((head & 0xFF00FF) == 0x03) & ((head & 0xFF00) != 0)
    if not one_digit.all():
        other = np.flatnonzero(~one_digit)
        pos = element[other]
        name_end = _cstring_ends(window.u8, pos + 1, limit[other])
        value[other] = np.where(window.u8[pos] == 0x03, name_end + 1, limit[other] + 1)
    return value


def _walk_pictures(window: _Window, arrays: np.ndarray):
    """Walk the ``imgs`` arrays starting at ``arrays``, all at once.

    Only image documents made of a single binary ``picture`` field are
    accepted. The arrays' lengths were already checked against their documents.

    Returns
    -------
    good : ndarray of bool
        Arrays whose image documents all pass, with at least one picture.
    owner, rank, offset, length : ndarray
        For each picture of the good arrays: its array, its rank in it, and
        the position and length of its data.
    """
    u8 = window.u8
    array_last = arrays + window.i32[arrays] - 1
    good = u8[array_last] == 0
    element = arrays + 4
    count = np.zeros(len(arrays), dtype=np.int64)
    found = []
    active = np.flatnonzero(good & (element < array_last))
    while active.size:
        limit = array_last[active]
        q = _image_values(window, element[active], limit)
        tail = window.i64[q + 9]
        data_length = tail >> 32
        image_last = q + (_PICTURE_OVERHEAD - 1) + data_length
        ok = (q <= limit) & (window.u64[q + 4] == _PICTURE_HEAD) & ((tail & _LOW_32) == _PICTURE_TAIL)
        ok &= (data_length >= 0) & (window.i32[q] == data_length + _PICTURE_OVERHEAD) & (image_last < limit)
        ok &= u8[np.where(ok, image_last, 0)] == 0
        if not ok.all():
            good[active[~ok]] = False
            active, limit, q, data_length, image_last = (
                a[ok] for a in (active, limit, q, data_length, image_last)
            )
        found.append((active, count[active], q + (_PICTURE_OVERHEAD - 1), data_length))
        count[active] += 1
        element[active] = image_last + 1
        active = active[image_last + 1 < limit]
    good &= count > 0
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return good, empty, empty, empty, empty
    owner, rank, offset, length = (np.concatenate(parts) for parts in zip(*found))
    keep = good[owner]
    return good, owner[keep], rank[keep], offset[keep], length[keep]


def _read_integers(window: _Window, pos: np.ndarray, etype: np.ndarray) -> np.ndarray:
    """Read int32 (type 0x10) or int64 values; 0 for any other type."""
    value = np.where(etype == 0x10, window.i32[pos], window.i64[pos])
    return np.where((etype == 0x10) | (etype == 0x12), value, 0)


def _parse_vectorised(window: _Window, starts: np.ndarray, lengths: np.ndarray):
    """Parse all documents of a window at once.

    Returns
    -------
    batch : _Batch
        The documents' contents; documents not ``ok`` have no pictures.
    ok : ndarray of bool
        Documents parsed with certainty; the others need :func:`_parse_document`.
    """
    ok, value_pos, value_type = _walk_fields(window, starts, starts + lengths - 1)
    docs = np.flatnonzero(ok)
    good, owner, rank, offset, length = _walk_pictures(window, value_pos[_FIELD_IMGS, docs])
    ok[docs[~good]] = False
    n_images = np.zeros(len(starts), dtype=np.int64)
    n_images[docs[good]] = np.bincount(owner, minlength=len(docs))[good]
    slot = (np.cumsum(n_images) - n_images)[docs[owner]] + rank
    img_offset, img_length = (np.empty(len(slot), dtype=np.int64) for _ in range(2))
    img_offset[slot], img_length[slot] = offset, length
    category_type = value_type[_FIELD_CATEGORY]
    batch = _Batch(
        product_id=_read_integers(window, value_pos[_FIELD_ID], value_type[_FIELD_ID]),
        category_id=_read_integers(window, value_pos[_FIELD_CATEGORY], category_type),
        has_category=(category_type == 0x10) | (category_type == 0x12),
        n_images=n_images,
        img_offset=img_offset,
        img_length=img_length,
    )
    return batch, ok


def _parse_batch(window: _Window, starts: np.ndarray, lengths: np.ndarray) -> _Batch:
    """Parse the documents of a window: vectorised, the uncertain ones one by one.

    The result is identical to :func:`_parse_batch_pure`'s.

    Raises
    ------
    _BadDocument
        For the first malformed document.
    """
    batch, ok = _parse_vectorised(window, starts, lengths)
    redo = np.flatnonzero(~ok)
    if not redo.size:
        return batch
    try:
        pure = _parse_batch_pure(window, starts[redo], lengths[redo])
    except _BadDocument as exc:
        raise _BadDocument(int(redo[exc.index]), exc.reason) from None
    return _merge(batch, redo, pure)


def _merge(batch: _Batch, redo: np.ndarray, pure: _Batch) -> _Batch:
    """Put the documents ``redo`` of ``batch``, parsed again as ``pure``, in place."""
    product_id = batch.product_id.astype(pure.product_id.dtype)
    product_id[redo] = pure.product_id
    batch.category_id[redo] = pure.category_id
    batch.has_category[redo] = pure.has_category
    owner = np.concatenate(
        [np.repeat(np.arange(len(batch.n_images)), batch.n_images), np.repeat(redo, pure.n_images)]
    )
    order = np.argsort(owner, kind="stable")
    batch.n_images[redo] = pure.n_images
    return _Batch(
        product_id=product_id,
        category_id=batch.category_id,
        has_category=batch.has_category,
        n_images=batch.n_images,
        img_offset=np.concatenate([batch.img_offset, pure.img_offset])[order],
        img_length=np.concatenate([batch.img_length, pure.img_length])[order],
    )


# --- The scan -------------------------------------------------------------------

#: Parses the whole documents at ``starts`` (with ``lengths``) of a window.
_BatchParser = Callable[[_Window, np.ndarray, np.ndarray], _Batch]


def scan_bson(path: str | os.PathLike, on_truncated: str = "raise") -> BsonIndex:
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
        When a document is malformed.
    BsonTruncatedError
        When the file ends inside a document and ``on_truncated="raise"``.
    """
    path = os.fspath(path)
    index, truncation = _scan(path, on_truncated, _parse_batch)
    if truncation is not None:
        warn_truncated(path, *truncation)
    return index


def _scan(path: str, on_truncated: str, parse_batch: _BatchParser) -> tuple[BsonIndex, tuple | None]:
    """Scan ``path`` window by window, parsing the whole documents of each with ``parse_batch``.

    :func:`scan_bson` passes the vectorised :func:`_parse_batch`; passing
    :func:`_parse_batch_pure` runs the reference parser on every document.

    Returns
    -------
    index : BsonIndex
    truncation : tuple or None
        ``(offset, n_kept, reason)`` to warn about when ``on_truncated="warn"``
        and the file ends inside a document.
    """
    size = os.path.getsize(path)
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
    path: str, window: _Window, starts: np.ndarray, lengths: np.ndarray, position: int, parse_batch: _BatchParser
) -> _Batch:
    """Parse whole documents of the window, the first being product ``position``.

    Returns
    -------
    _Batch
        With picture offsets made absolute.

    Raises
    ------
    BsonFormatError
        For the first malformed document.
    """
    try:
        batch = parse_batch(window, starts, lengths)
    except _BadDocument as exc:
        raise BsonFormatError(
            path, window.start + int(starts[exc.index]), position + exc.index,
            f"the document does not decode: {exc.reason}",
        ) from None
    batch.img_offset += window.start
    return batch


def _check_length(
    path: str, size: int, pos: int, position: int, length: int, first_type: int | None
) -> str | None:
    """Check the length a document declares (-1 when fewer than 4 bytes are left).

    A first document longer than the file is a truncated BSON file when its
    first element type (``first_type``) is a BSON type, and not BSON at all
    otherwise (a text file's first bytes read as a huge length).

    Returns
    -------
    str or None
        Why the file is truncated at this document, if it is.

    Raises
    ------
    BsonFormatError
        When the length is impossible.
    """
    cut_first_document = length > size and first_type in _ELEMENT_TYPES
    if position == 0 and not (5 <= length <= size or cut_first_document):
        raise BsonFormatError(
            path, pos, position,
            f"not a BSON file of documents: the first document declares {length} bytes "
            f"but the file has {size}",
        )
    if length == -1 or pos + length > size:
        return (
            f"the file ends inside this document ({size - pos} of its "
            f"{length if length > 0 else 'at least 5'} bytes are present)"
        )
    if length < 5:
        raise BsonFormatError(path, pos, position, f"the document declares a length of {length} bytes")
    return None


def _assemble(batches: list[_Batch], doc_offsets: list[np.ndarray], truncated_offset: int) -> BsonIndex:
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
    warnings.warn(message, UserWarning, stacklevel=4)
    logger.warning(message)


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
