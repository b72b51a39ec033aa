"""Lazy references to pictures stored inside a BSON file.

:class:`BsonImageRef` names one picture by file, byte offset and length; reading
it reads only those bytes. :class:`BsonImagesArray` is the ``images`` column of
:func:`~skproduct.io.read_bson`: a pandas extension array backed by flat numpy
arrays, so that a frame of millions of products holds no Python object per
picture until a row is asked for. Its rows are lists of :class:`BsonImageRef`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from pandas.api.extensions import (
    ExtensionArray,
    ExtensionDtype,
    register_extension_dtype,
)

from ..exceptions import ImageDecodeError


class BsonImageRef(NamedTuple):
    """One picture inside a BSON file: where its bytes are, and whose picture it is.

    Pickles small (no picture bytes), so it can travel to worker processes.

    Examples
    --------
    >>> ref = BsonImageRef("train.bson", offset=1200, length=5012, product_id=2301, index=0)
    >>> ref.describe()
    'image 0 of product 2301 (file train.bson, offset 1200)'
    """

    path: str
    offset: int
    length: int
    product_id: object
    index: int

    def read_bytes(self) -> bytes:
        """Read this picture's bytes, and only them, from the file."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.length)
        except OSError as exc:
            raise ImageDecodeError(f"{self.describe()} cannot be read: {exc}") from exc
        if len(data) != self.length:
            raise ImageDecodeError(
                f"{self.describe()}: the file is shorter than its index says; it changed since "
                "read_bson indexed it: call read_bson again"
            )
        return data

    def describe(self) -> str:
        """A human description for error messages."""
        return f"image {self.index} of product {self.product_id} (file {self.path}, offset {self.offset})"


@register_extension_dtype
class BsonImagesDtype(ExtensionDtype):
    """Dtype of :class:`BsonImagesArray`: each row a list of :class:`BsonImageRef`."""

    name = "bson_images"
    type = list
    na_value = None

    @classmethod
    def construct_array_type(cls):
        return BsonImagesArray


class BsonImagesArray(ExtensionArray):
    """Per-product lists of picture references, backed by numpy arrays.

    Row ``i`` holds the pictures ``img_offset[start[i]:start[i] + count[i]]`` of
    file ``paths[path_code[i]]``; a row with ``count == -1`` is missing.
    Selecting rows (``take``, slicing, ``iloc``) shares the picture arrays and
    copies only the per-row arrays. The array is read-only: assign a new
    column rather than editing rows. ``Series.explode()`` gives one
    :class:`BsonImageRef` per row.
    """

    def __init__(self, paths, path_code, product_id, start, count, img_offset, img_length):
        self._paths = tuple(paths)
        self._path_code = np.asarray(path_code, dtype=np.int32)
        self._product_id = np.asarray(product_id)
        self._start = np.asarray(start, dtype=np.int64)
        self._count = np.asarray(count, dtype=np.int64)
        self._img_offset = np.asarray(img_offset, dtype=np.int64)
        self._img_length = np.asarray(img_length, dtype=np.int64)

    @classmethod
    def from_index(cls, path: str, *, product_id, img_start, img_offset, img_length) -> BsonImagesArray:
        """Build the column of one file from its compressed-row picture arrays."""
        n = len(img_start) - 1
        return cls((path,), np.zeros(n, np.int32), product_id, img_start[:-1], np.diff(img_start), img_offset, img_length)

    # -- what pandas needs -------------------------------------------------
    @property
    def dtype(self) -> BsonImagesDtype:
        return BsonImagesDtype()

    def __len__(self) -> int:
        return len(self._start)

    def _row(self, i: int):
        count = int(self._count[i])
        if count < 0:
            return None
        start = int(self._start[i])
        path = self._paths[self._path_code[i]]
        product_id = self._product_id[i].item()
        return [
            BsonImageRef(path, int(offset), int(length), product_id, k)
            for k, (offset, length) in enumerate(
                zip(self._img_offset[start : start + count], self._img_length[start : start + count])
            )
        ]

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            n = len(self)
            if not -n <= item < n:
                raise IndexError(f"row {item} is out of range for {n} products")
            return self._row(int(item) % n)
        item = pd.api.indexers.check_array_indexer(self, item)
        return self._select(item)

    def _select(self, rows) -> BsonImagesArray:
        return BsonImagesArray(
            self._paths, self._path_code[rows], self._product_id[rows], self._start[rows],
            self._count[rows], self._img_offset, self._img_length,
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self._row(i)

    def take(self, indices, allow_fill: bool = False, fill_value=None) -> BsonImagesArray:
        indices = np.asarray(indices, dtype=np.intp)
        if not allow_fill:
            return self._select(indices)
        if not (fill_value is None or (pd.api.types.is_scalar(fill_value) and pd.isna(fill_value))):
            raise ValueError("only a missing value can fill a BsonImagesArray")
        if (indices < -1).any():
            raise ValueError("indices below -1 are not allowed when allow_fill=True")
        missing = indices == -1
        if len(self) == 0 and missing.all():
            safe = np.zeros(len(indices), dtype=np.intp)
            result = BsonImagesArray(("",), safe.astype(np.int32), np.zeros(len(indices), np.int64), safe, safe, [], [])
        else:
            if len(self) == 0:
                raise IndexError("cannot take rows from an empty BsonImagesArray")
            result = self._select(np.where(missing, 0, indices))
        result._count = np.where(missing, -1, result._count)
        return result

    def copy(self) -> BsonImagesArray:
        return BsonImagesArray(
            self._paths, self._path_code.copy(), self._product_id.copy(), self._start.copy(),
            self._count.copy(), self._img_offset.copy(), self._img_length.copy(),
        )

    @classmethod
    def _concat_same_type(cls, to_concat: Sequence[BsonImagesArray]) -> BsonImagesArray:
        paths: list[str] = []
        codes, ids, starts, counts, offsets, lengths = [], [], [], [], [], []
        shift = 0
        for part in to_concat:
            remap = np.array([_index_of(paths, p) for p in part._paths], dtype=np.int32)
            codes.append(remap[part._path_code] if len(part) else part._path_code)
            ids.append(part._product_id)
            starts.append(part._start + shift)
            counts.append(part._count)
            offsets.append(part._img_offset)
            lengths.append(part._img_length)
            shift += len(part._img_offset)
        return cls(paths, np.concatenate(codes), _concat_ids(ids), np.concatenate(starts),
                   np.concatenate(counts), np.concatenate(offsets), np.concatenate(lengths))

    @classmethod
    def _from_sequence(cls, scalars, *, dtype=None, copy: bool = False) -> BsonImagesArray:
        if isinstance(scalars, cls):
            return scalars.copy() if copy else scalars
        paths: list[str] = []
        codes, ids, starts, counts, offsets, lengths = [], [], [], [], [], []
        for row in scalars:
            starts.append(len(offsets))
            if row is None:
                codes.append(0), ids.append(0), counts.append(-1)
                continue
            row = list(row)
            if not row or not all(isinstance(ref, BsonImageRef) for ref in row):
                raise TypeError("each row of a BsonImagesArray is a non-empty list of BsonImageRef")
            if len({(ref.path, ref.product_id) for ref in row}) != 1:
                raise ValueError("the pictures of one row must belong to one product of one file")
            codes.append(_index_of(paths, row[0].path))
            ids.append(row[0].product_id)
            counts.append(len(row))
            offsets.extend(ref.offset for ref in row)
            lengths.extend(ref.length for ref in row)
        return cls(paths or [""], codes, _concat_ids([np.array(ids)]), starts, counts, offsets, lengths)

    @classmethod
    def _from_factorized(cls, values, original) -> BsonImagesArray:
        return cls._from_sequence([None if v is None else list(v) for v in values])

    def _values_for_factorize(self):
        return self.astype(object, tuples=True), None

    def isna(self) -> np.ndarray:
        return self._count < 0

    @property
    def nbytes(self) -> int:
        per_row = self._path_code.nbytes + self._product_id.nbytes + self._start.nbytes + self._count.nbytes
        return per_row + self._img_offset.nbytes + self._img_length.nbytes

    def __eq__(self, other):
        mine = self.astype(object, tuples=True)
        if isinstance(other, BsonImagesArray):
            if len(other) != len(self):
                raise ValueError(f"cannot compare {len(self)} rows with {len(other)} rows")
            return np.array([a == b for a, b in zip(mine, other.astype(object, tuples=True))], dtype=bool)
        if isinstance(other, (list, tuple)):  # one row, compared with every row
            row = tuple(other)
            return np.array([a == row for a in mine], dtype=bool)
        return NotImplemented

    def unique(self) -> BsonImagesArray:
        codes, _ = pd.factorize(self.astype(object, tuples=True), use_na_sentinel=False)
        _, first = np.unique(codes, return_index=True)
        return self._select(np.sort(first))

    def _explode(self) -> tuple[np.ndarray, np.ndarray]:
        """One picture reference per row (a missing row stays one missing value)."""
        rows = [row if row is not None else [None] for row in self]
        values = np.empty(sum(map(len, rows)), dtype=object)
        values[:] = [ref for row in rows for ref in row]
        return values, np.array([len(row) for row in rows], dtype=np.uint64)

    def astype(self, dtype, copy: bool = True, tuples: bool = False):
        if isinstance(dtype, BsonImagesDtype):
            return self.copy() if copy else self
        if pd.api.types.pandas_dtype(dtype) != np.dtype(object):
            return super().astype(dtype, copy=copy)
        out = np.empty(len(self), dtype=object)
        for i in range(len(self)):
            row = self._row(i)
            out[i] = tuple(row) if tuples and row is not None else row
        return out

    def __array__(self, dtype=None, copy=None):
        return self.astype(object)

    def _formatter(self, boxed: bool = False):
        def short(row):
            if row is None:
                return "None"
            return f"<{len(row)} image{'s' if len(row) != 1 else ''}>"

        return short


def _index_of(items: list, value) -> int:
    if value not in items:
        items.append(value)
    return items.index(value)


def _concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate product-id arrays; mixed integer and string ids become strings."""
    parts = [p for p in parts if len(p)] or parts[:1]
    if len({p.dtype.kind for p in parts}) > 1:
        parts = [p.astype(str) for p in parts]
    return np.concatenate(parts)
