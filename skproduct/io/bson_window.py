"""A reusable read buffer over part of a file, shared by the scan and the batch parser."""

from __future__ import annotations

import struct

import numpy as np

unpack_int32 = struct.Struct("<i").unpack_from

#: Bytes read at a time; a document larger than this is read whole.
WINDOW_BYTES = 4 << 20
#: Spare bytes past the window, so that vectorised reads may overrun a document.
_PADDING = 64


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

    def length_at(self, pos: int) -> tuple[int, int | None]:
        """Return where the document at file offset ``pos`` is in the buffer, and its length.

        The window moves to ``pos`` when fewer than 4 bytes of it are loaded;
        the length is ``None`` when fewer than 4 bytes are left in the file.
        """
        rel = pos - self.start
        if rel + 4 > self.n:
            self.load(pos, WINDOW_BYTES)
            rel = 0
        length = unpack_int32(self.buf, rel)[0] if self.n - rel >= 4 else None
        return rel, length
