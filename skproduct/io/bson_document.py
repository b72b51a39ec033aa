"""The BSON element layout, and the reference parser of one product document.

:func:`parse_document` walks one document's elements in pure Python, checking
every length and bound; it is the reference that the vectorised parser in
:mod:`skproduct.io.bson_batch` must agree with, and it words the errors for
malformed documents.
"""

from __future__ import annotations

import struct

_unpack_int32 = struct.Struct("<i").unpack_from
_unpack_int64 = struct.Struct("<q").unpack_from

# BSON element type -> size of a value of fixed size.
FIXED_SIZE = {
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
STRING_TYPES = (0x02, 0x0D, 0x0E)  # string, JavaScript code, symbol
DOCUMENT_TYPES = (0x03, 0x04, 0x0F)  # document, array, code with scope
BINARY = 0x05
ELEMENT_TYPES = frozenset(FIXED_SIZE) | {*STRING_TYPES, *DOCUMENT_TYPES, BINARY, 0x0B, 0x0C}


class Malformed(Exception):
    """Internal: a document is malformed; the caller adds file, offset and position."""


def _skip_value(buf: bytes, p: int, etype: int, end: int) -> int:
    """Return the position just past the value of type ``etype`` starting at ``p``."""
    size = FIXED_SIZE.get(etype)
    if size is not None:
        q = p + size
    elif etype in STRING_TYPES:
        _check_room(p, 4, end)
        n = _unpack_int32(buf, p)[0]
        if n < 1:
            raise Malformed(f"a string declares a length of {n} bytes")
        q = p + 4 + n
    elif etype in DOCUMENT_TYPES:
        _check_room(p, 4, end)
        n = _unpack_int32(buf, p)[0]
        if n < 5:
            raise Malformed(f"an embedded document declares a length of {n} bytes")
        q = p + n
    elif etype == BINARY:
        _check_room(p, 4, end)
        n = _unpack_int32(buf, p)[0]
        if n < 0:
            raise Malformed(f"a binary field declares a length of {n} bytes")
        q = p + 5 + n
    elif etype == 0x0B:  # regular expression: two C strings
        q = _cstring_end(buf, _cstring_end(buf, p, end) + 1, end) + 1
    elif etype == 0x0C:  # DBPointer: string + ObjectId
        q = _skip_value(buf, p, 0x02, end) + 12
    else:
        raise Malformed(f"unknown BSON element type 0x{etype:02x}")
    if q > end:
        raise Malformed("a field runs past the end of its document")
    return q


def _check_room(p: int, n: int, end: int) -> None:
    if p + n > end:
        raise Malformed("a field runs past the end of its document")


def _cstring_end(buf: bytes, p: int, end: int) -> int:
    q = buf.find(b"\x00", p, end)
    if q < 0:
        raise Malformed("a field name is not terminated inside its document")
    return q


def _document_bounds(buf: bytes, p: int, end: int, what: str) -> int:
    """Check the embedded document starting at ``p``; return the position of its final null."""
    _check_room(p, 4, end)
    n = _unpack_int32(buf, p)[0]
    last = p + n - 1
    if n < 5 or last >= end or buf[last] != 0:
        raise Malformed(f"{what} is not a valid embedded document")
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
            raise Malformed(f"image {len(pictures)} in 'imgs' is not a document")
        image_last = _document_bounds(buf, q, array_last, f"image {len(pictures)}")
        picture = None
        r = q + 4
        while r < image_last:
            ftype = buf[r]
            name_end = _cstring_end(buf, r + 1, image_last)
            is_picture = buf[r + 1 : name_end] == b"picture"
            r = name_end + 1
            if is_picture:
                if ftype != BINARY:
                    raise Malformed(f"'picture' of image {len(pictures)} is not binary data")
                _check_room(r, 5, image_last)
                picture = (r + 5, _unpack_int32(buf, r)[0])
            r = _skip_value(buf, r, ftype, image_last)
        if r != image_last:
            raise Malformed(f"image {len(pictures)} does not end where its length says")
        if picture is None:
            raise Malformed(f"image {len(pictures)} has no 'picture' field")
        pictures.append(picture)
        q = image_last + 1
    if q != array_last:
        raise Malformed("'imgs' does not end where its length says")
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
    raise Malformed(f"'_id' has BSON type 0x{etype:02x}; expected an integer, string or ObjectId")


def _read_category(buf: bytes, p: int, etype: int):
    if etype == 0x10:
        return _unpack_int32(buf, p)[0]
    if etype == 0x12:
        return _unpack_int64(buf, p)[0]
    if etype == 0x0A:
        return None
    raise Malformed(f"'category_id' has BSON type 0x{etype:02x}; expected an integer")


def parse_document(buf: bytes, start: int, length: int):
    """Return ``(product_id, category_id or None, pictures)`` of the document at ``start``."""
    last = start + length - 1
    if buf[last] != 0:
        raise Malformed("the document does not end with a null byte")
    product_id = category_id = pictures = None
    has_id = False
    p = start + 4
    while p < last:
        etype = buf[p]
        name_end = _cstring_end(buf, p + 1, last)
        name = buf[p + 1 : name_end]
        p = name_end + 1
        if name == b"_id":
            _check_room(p, FIXED_SIZE.get(etype, 4), last)
            product_id, has_id = _read_id(buf, p, etype), True
        elif name == b"category_id":
            _check_room(p, FIXED_SIZE.get(etype, 4), last)
            category_id = _read_category(buf, p, etype)
        elif name == b"imgs":
            if etype != 0x04:
                raise Malformed("'imgs' is not an array")
            pictures = _parse_pictures(buf, p, last)
        p = _skip_value(buf, p, etype, last)
    if p != last:
        raise Malformed("the document's fields do not end where its length says")
    if not has_id:
        raise Malformed("the document has no '_id'")
    if not pictures:
        raise Malformed("the product has no picture ('imgs' is missing or empty)")
    return product_id, category_id, pictures
