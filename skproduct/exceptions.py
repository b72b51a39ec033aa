"""Exceptions that skproduct raises for bad input, and the warnings it gives for events that change results.

The warnings go through :func:`warnings.warn`, as scikit-learn's
``ConvergenceWarning`` does, so that users see them without configuring
logging, and can filter them by class::

    import warnings
    from skproduct.exceptions import EmptyProductWarning
    warnings.simplefilter("error", EmptyProductWarning)  # a product without a picture is now an error
"""

from __future__ import annotations

__all__ = [
    "BadPictureWarning",
    "BsonFormatError",
    "BsonTruncatedError",
    "CacheWriteWarning",
    "ImageDecodeError",
    "DeviceFallbackWarning",
    "DeviceUnavailableError",
    "EmptyProductWarning",
    "MissingImagesError",
    "SkproductWarning",
    "StaleFileWarning",
    "VersionMismatchWarning",
    "WeightsUnavailableError",
]


class BsonFormatError(ValueError):
    """A BSON file is not a valid sequence of product documents.

    Attributes
    ----------
    path : str
        The file.
    offset : int
        Byte offset of the offending document in the file.
    position : int
        Zero-based position of the offending product in the file.
    reason : str
        What is wrong.
    """

    def __init__(self, path: str, offset: int, position: int, reason: str):
        self.path = str(path)
        self.offset = int(offset)
        self.position = int(position)
        self.reason = reason
        super().__init__(
            f"{self.path}: product {self.position} at byte offset {self.offset}: {reason}"
        )

    def __reduce__(self):
        return type(self), (self.path, self.offset, self.position, self.reason)


class BsonTruncatedError(BsonFormatError):
    """The file ends inside a document (an interrupted download or copy).

    Pass ``on_truncated="warn"`` to :func:`skproduct.io.read_bson` to keep the
    whole documents before the truncated tail.
    """


class ImageDecodeError(ValueError):
    """An image reference could not be turned into an RGB picture."""


class MissingImagesError(FileNotFoundError):
    """Image files named by a table are missing or unreadable.

    Attributes
    ----------
    problems : list of tuple
        ``(row, filename, path_tried, what)`` for every bad row.
    """

    def __init__(self, message: str, problems: list[tuple[int, str, str, str]]):
        self.problems = problems
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.args[0], self.problems)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (offline, or the model hub is unreachable).

    The message says how to go on: pass ``weights='path/to/file'`` with a local
    copy of the weights, or ``pretrained=False`` for random (seeded) weights.
    """


class DeviceUnavailableError(ValueError):
    """A device was asked for explicitly (``device="cuda"``, ``--device cuda``) and this machine lacks it, or the
    string names no torch device."""


class SkproductWarning(UserWarning):
    """Base class of skproduct's warnings: something happened that changes the results."""


class BadPictureWarning(SkproductWarning):
    """Pictures did not decode and were skipped or replaced by blank ones (the ``on_error`` policy)."""


class EmptyProductWarning(SkproductWarning):
    """Products had no usable picture: an embedder gives them a zero vector, a classifier its training prior."""


class DeviceFallbackWarning(SkproductWarning):
    """A model runs on another device or precision than the one it was fitted with (the device is missing here)."""


class StaleFileWarning(SkproductWarning):
    """A file skproduct keeps beside its data (a BSON index, a cache segment) was out of date or damaged and is
    rebuilt or ignored."""


class CacheWriteWarning(SkproductWarning):
    """The embedding cache could not be written (a read-only folder, no permission, a full disk): the vectors are
    kept in the process's memory only, and later runs compute them again."""


class VersionMismatchWarning(SkproductWarning):
    """A saved model is loaded under other versions of skproduct, torch, timm or open_clip than it was saved with
    (its results may differ); a model saved before versions were recorded gives none."""
