"""Turn any image reference into an RGB picture, and the policy for pictures that do not decode.

An image reference is a file path, raw encoded bytes, a :class:`PIL.Image.Image`,
a ``uint8`` array (``H x W``, ``H x W x 1``, ``H x W x 3`` or ``H x W x 4``) or
anything with a ``read_bytes()`` method, such as
:class:`~skproduct.io.BsonImageRef`. The embedder and the fine-tuner load their
pictures through :class:`BadImagePolicy`, so both treat a bad picture the same way.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np

from .exceptions import ImageDecodeError

logger = logging.getLogger(__name__)

#: The choices of ``on_error`` that every image estimator accepts.
ON_ERROR_CHOICES = ("raise", "skip", "blank")

_BLANK_COLOUR = (0, 0, 0)


def describe_image_ref(ref: Any) -> str:
    """Name an image reference for an error message.

    Examples
    --------
    >>> describe_image_ref("photos/a.jpg")
    "image file 'photos/a.jpg'"
    >>> describe_image_ref(b"not a picture")
    'image bytes (13 bytes)'
    """
    if hasattr(ref, "describe"):
        return ref.describe()
    if isinstance(ref, (str, os.PathLike)):
        return f"image file {os.fspath(ref)!r}"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(ref)} bytes)"
    if isinstance(ref, np.ndarray):
        return f"image array of shape {ref.shape} and dtype {ref.dtype}"
    return f"image {type(ref).__name__}"


def load_image(ref: Any, *, draft_size: int | None = None):
    """Decode an image reference into an RGB :class:`PIL.Image.Image`.

    Transparent pictures (RGBA, LA, palette with transparency) are laid on a
    white background, as product photos are shown.

    Parameters
    ----------
    ref : str, path-like, bytes, PIL.Image.Image, numpy.ndarray or BsonImageRef
        The picture.
    draft_size : int, optional
        The smallest side the caller needs. A JPEG much larger than that is
        decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT domain), which
        is several times faster; both sides stay at least ``draft_size``.

    Returns
    -------
    PIL.Image.Image
        A fully decoded picture in mode ``"RGB"``.

    Raises
    ------
    ImageDecodeError
        The reference names a picture that cannot be read or decoded; the
        message names the picture.
    TypeError
        ``ref`` is not a kind of image reference.

    Examples
    --------
    >>> import numpy as np
    >>> image = load_image(np.zeros((4, 6), dtype=np.uint8))
    >>> image.mode, image.size
    ('RGB', (6, 4))
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return _to_rgb(ref)
    if isinstance(ref, np.ndarray):
        return _from_array(ref)
    if hasattr(ref, "read_bytes") and not isinstance(ref, (str, os.PathLike)):
        source = io.BytesIO(ref.read_bytes())
    elif isinstance(ref, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(ref))
    elif isinstance(ref, (str, os.PathLike)):
        source = os.fspath(ref)
    else:
        raise TypeError(
            f"cannot load an image from a {type(ref).__name__}; pass a file path, encoded bytes, "
            "a PIL image, a uint8 array or a BsonImageRef"
        )
    try:
        with Image.open(source) as image:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return _to_rgb(image)
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{describe_image_ref(ref)} does not exist") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{describe_image_ref(ref)} is not a decodable image: {exc}") from exc


def _to_rgb(image):
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray):
    from PIL import Image

    if array.dtype != np.uint8:
        raise ImageDecodeError(
            f"{describe_image_ref(array)} is not uint8; scale it to 0-255 and pass array.astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        image = Image.fromarray(np.ascontiguousarray(array))
        return _to_rgb(image)
    raise ImageDecodeError(f"{describe_image_ref(array)} is not an H x W, H x W x 1, 3 or 4 picture")


def picture_content(ref: Any) -> bytes:
    """The bytes that identify a picture, for cache keys: its encoded bytes when it has any.

    Paths and :class:`~skproduct.io.BsonImageRef` are read (not decoded), so a
    changed file gives a new key; PIL images give their RGB pixels, arrays
    their pixels with their shape and dtype.

    Raises
    ------
    ImageDecodeError
        The picture cannot be read.
    """
    from PIL import Image

    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, (str, os.PathLike)):
        try:
            with open(ref, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ImageDecodeError(f"{describe_image_ref(ref)} cannot be read: {exc}") from exc
    if hasattr(ref, "read_bytes"):
        return ref.read_bytes()
    if isinstance(ref, Image.Image):  # the RGB pixels the model will see (a palette is applied)
        return f"pil:{ref.size}".encode() + _to_rgb(ref).tobytes()
    if isinstance(ref, np.ndarray):
        return f"array:{ref.dtype}:{ref.shape}".encode() + np.ascontiguousarray(ref).tobytes()
    raise TypeError(
        f"cannot load an image from a {type(ref).__name__}; pass a file path, encoded bytes, "
        "a PIL image, a uint8 array or a BsonImageRef"
    )


class BadImagePolicy:
    """What to do with a picture that does not decode; shared by every image estimator.

    Parameters
    ----------
    on_error : {"raise", "skip", "blank"}, default="raise"
        ``"raise"``: stop with :class:`~skproduct.exceptions.ImageDecodeError`
        naming the picture. ``"skip"``: leave the picture out (a product keeps
        its other pictures) and count it. ``"blank"``: use a black picture of
        ``blank_size`` instead and count it.
    blank_size : tuple of int, default=(224, 224)
        ``(width, height)`` of the blank picture.

    Attributes
    ----------
    n_failed : int
        Pictures that did not decode since the policy was made.

    Examples
    --------
    >>> policy = BadImagePolicy("skip")
    >>> policy.load(b"not a picture") is None
    True
    >>> policy.n_failed
    1
    >>> BadImagePolicy("blank", blank_size=(8, 8)).load(b"not a picture").size
    (8, 8)
    """

    def __init__(self, on_error: str = "raise", blank_size: tuple[int, int] = (224, 224)):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.on_error = on_error
        self.blank_size = tuple(blank_size)
        self.n_failed = 0

    def load(self, ref: Any, *, draft_size: int | None = None):
        """Load ``ref`` as RGB (see :func:`load_image`), or apply the policy; ``None`` means skipped."""
        try:
            return load_image(ref, draft_size=draft_size)
        except ImageDecodeError as exc:
            if self.on_error == "raise":
                raise
            self.n_failed += 1
            logger.debug("bad picture (%s): %s", self.on_error, exc)
            if self.on_error == "skip":
                return None
            from PIL import Image

            return Image.new("RGB", self.blank_size, _BLANK_COLOUR)
