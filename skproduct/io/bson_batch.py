"""Parse all the whole documents of a read window at once.

:func:`parse_batch` walks the elements of every document of a window together
with numpy and accepts a document only when every check of
:func:`~skproduct.io.bson_document.parse_document` passes; the documents it
cannot handle with certainty are parsed again by that reference parser.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from .bson_document import (
    BINARY,
    DOCUMENT_TYPES,
    FIXED_SIZE,
    STRING_TYPES,
    Malformed,
    parse_document,
)
from .bson_window import _Window


class BadDocument(Exception):
    """Internal: document ``index`` of a batch is malformed, for ``reason``."""

    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)
        self.index = index
        self.reason = reason


@dataclass
class Batch:
    """What the documents of one window hold, pictures flattened in document order.

    Picture offsets are relative to the start of the window.
    """

    product_id: np.ndarray
    category_id: np.ndarray
    has_category: np.ndarray
    n_images: np.ndarray
    img_offset: np.ndarray
    img_length: np.ndarray


def parse_batch_pure(window: _Window, starts: np.ndarray, lengths: np.ndarray) -> Batch:
    """Parse documents one by one with :func:`parse_document`, the reference parser.

    Raises
    ------
    BadDocument
        For the first malformed document.
    """
    ids = []
    categories, has_category, n_images = array("q"), array("b"), array("q")
    img_offsets, img_lengths = array("q"), array("q")
    for k, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        try:
            product_id, category_id, pictures = parse_document(window.buf, start, length)
        except Malformed as exc:
            raise BadDocument(k, str(exc)) from None
        ids.append(product_id)
        categories.append(category_id if category_id is not None else 0)
        has_category.append(category_id is not None)
        n_images.append(len(pictures))
        for data_start, data_length in pictures:
            img_offsets.append(data_start)
            img_lengths.append(data_length)
    all_int = all(isinstance(i, int) for i in ids)
    return Batch(
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
# accepts a document only when every check of :func:`parse_document` passes;
# anything else (rare types, string ids, image documents with extra fields,
# repeated fields, any bounds problem) is left to :func:`parse_document`.

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
    for etype, size in FIXED_SIZE.items():
        base[etype] = size
    for etypes, extra, smallest in ((STRING_TYPES, 4, 1), (DOCUMENT_TYPES, 0, 5), ((BINARY,), 5, 0)):
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
            active, limit, etype, field, name_end, end = (a[good] for a in (active, limit, etype, field, name_end, end))
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
            active, limit, q, data_length, image_last = (a[ok] for a in (active, limit, q, data_length, image_last))
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
    batch : Batch
        The documents' contents; documents not ``ok`` have no pictures.
    ok : ndarray of bool
        Documents parsed with certainty; the others need :func:`parse_document`.
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
    batch = Batch(
        product_id=_read_integers(window, value_pos[_FIELD_ID], value_type[_FIELD_ID]),
        category_id=_read_integers(window, value_pos[_FIELD_CATEGORY], category_type),
        has_category=(category_type == 0x10) | (category_type == 0x12),
        n_images=n_images,
        img_offset=img_offset,
        img_length=img_length,
    )
    return batch, ok


def parse_batch(window: _Window, starts: np.ndarray, lengths: np.ndarray) -> Batch:
    """Parse the documents of a window: vectorised, the uncertain ones one by one.

    The result is identical to :func:`parse_batch_pure`'s.

    Raises
    ------
    BadDocument
        For the first malformed document.
    """
    batch, ok = _parse_vectorised(window, starts, lengths)
    redo = np.flatnonzero(~ok)
    if not redo.size:
        return batch
    try:
        pure = parse_batch_pure(window, starts[redo], lengths[redo])
    except BadDocument as exc:
        raise BadDocument(int(redo[exc.index]), exc.reason) from None
    return _merge(batch, redo, pure)


def _merge(batch: Batch, redo: np.ndarray, pure: Batch) -> Batch:
    """Put the documents ``redo`` of ``batch``, parsed again as ``pure``, in place."""
    product_id = batch.product_id.astype(pure.product_id.dtype)
    product_id[redo] = pure.product_id
    batch.category_id[redo] = pure.category_id
    batch.has_category[redo] = pure.has_category
    owner = np.concatenate([np.repeat(np.arange(len(batch.n_images)), batch.n_images), np.repeat(redo, pure.n_images)])
    order = np.argsort(owner, kind="stable")
    batch.n_images[redo] = pure.n_images
    return Batch(
        product_id=product_id,
        category_id=batch.category_id,
        has_category=batch.has_category,
        n_images=batch.n_images,
        img_offset=np.concatenate([batch.img_offset, pure.img_offset])[order],
        img_length=np.concatenate([batch.img_length, pure.img_length])[order],
    )
