"""Where an embedder's product vectors go: an array in memory, or a memory-mapped ``.npy`` file on disk.

``ImageEmbedder(out=...)`` chooses. Pooled rows are written chunk by chunk as
they stream from the backbone (:func:`~skproduct.image_pipeline.pool_products`),
so with a file the process never holds more than one chunk of products.

Trade-offs
----------
``"memory"`` (the default)
    A plain float32 :class:`numpy.ndarray`: fastest to use, but it must fit in
    RAM (Cdiscount's 7M products x 1,280 features are 36 GB).
``"memmap"``
    A float32 ``.npy`` file in the cache folder's ``.vectors/`` sub-folder (the
    system's temporary folder without a cache), written through a temporary
    name and renamed (a killed run leaves no half file), then reopened
    read-only: the result is a :class:`numpy.memmap` whose pages the operating
    system loads on demand and evicts under memory pressure. scikit-learn
    estimators, :class:`~skproduct.heads.TorchLinearClassifier` and numpy read it
    without a copy (``validate_data`` keeps a float32, C-ordered memmap as it
    is; an estimator that needs float64, such as ``LogisticRegression``,
    converts it, and that copy is in RAM). Costs: disk space (4 bytes x
    features per product), a first pass that reads from disk when the pages
    are not cached, and files to delete (``result.filename`` names it; they are
    not part of the cache's segments, so ``cache.clear()`` leaves them).
``"auto"``
    ``"memmap"`` when the vectors would take more than :data:`MEMMAP_ABOVE`
    bytes, else ``"memory"``.
a path
    The same as ``"memmap"``, at that path (an ``.npy`` file that
    ``numpy.load(path, mmap_mode="r")`` reopens later).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import atomic_write

__all__ = ["MEMMAP_ABOVE", "OUT_CHOICES", "VectorOutput", "check_out", "vector_output"]

#: ``out="auto"`` memory-maps vectors above this many bytes (2 GiB).
MEMMAP_ABOVE = 2 << 30
OUT_CHOICES = ("memory", "memmap", "auto")
_FOLDER = ".vectors"


def check_out(out) -> None:
    """``out`` is one of :data:`OUT_CHOICES` or a path to an ``.npy`` file; anything else is a clear error."""
    if isinstance(out, str) and out in OUT_CHOICES:
        return
    if isinstance(out, (str, os.PathLike)):
        if os.fspath(out).endswith(".npy"):
            return
        raise ValueError(f"out={out!r} is neither one of {OUT_CHOICES} nor a path ending in .npy: pass "
                         "out='memmap', or a file name such as 'vectors.npy'")
    raise TypeError(f"out must be one of {OUT_CHOICES} or a path, got {type(out).__name__}")


@dataclass
class VectorOutput:
    """The rows being written (``array``) and, once the ``with`` block ends, what the caller gets (``result``)."""

    array: np.ndarray
    result: np.ndarray | None = None


def _file_for(out, cache_folder: Path | None, name: str) -> Path | None:
    if isinstance(out, os.PathLike) or (isinstance(out, str) and out not in OUT_CHOICES):
        return Path(os.path.expanduser(os.fspath(out)))
    folder = (cache_folder / _FOLDER) if cache_folder is not None else Path(tempfile.gettempdir()) / "skproduct-vectors"
    return folder / f"vectors-{name[:16]}-{os.getpid()}-{secrets.token_hex(4)}.npy"


@contextmanager
def vector_output(out, shape: tuple[int, int], *, cache_folder: Path | None = None,
                  name: str = "vectors") -> Iterator[VectorOutput]:
    """Rows to fill, in memory or in a memory-mapped file; ``output.result`` holds them after the block.

    Parameters
    ----------
    out : {"memory", "memmap", "auto"} or path
        See the module's trade-offs.
    shape : (n_products, n_features)
        The float32 matrix to write.
    cache_folder : Path, optional
        The cache folder whose ``.vectors/`` holds ``"memmap"`` files.
    name : str
        A prefix of the file's name (the embedder passes its fingerprint).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "v.npy"
    >>> with vector_output(target, (3, 2)) as output:
    ...     output.array[1] = [1.0, 2.0]
    >>> type(output.result).__name__, output.result.tolist(), output.result.flags.writeable
    ('memmap', [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]], False)
    >>> with vector_output("memory", (2, 2)) as output:
    ...     pass
    >>> type(output.result).__name__
    'ndarray'
    """
    check_out(out)
    n, d = int(shape[0]), int(shape[1])
    if out == "memory" or (out == "auto" and n * d * 4 <= MEMMAP_ABOVE):
        output = VectorOutput(np.zeros((n, d), dtype=np.float32))
        yield output
        output.result = output.array
        return
    path = _file_for(out, cache_folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # numpy maps the temporary file by its name; atomic_write syncs and renames it
        array = np.lib.format.open_memmap(f.name, mode="w+", dtype=np.float32, shape=(n, d))
        output = VectorOutput(array)
        try:
            yield output
            array.flush()
        finally:
            del array
            output.array = None
    output.result = np.load(path, mmap_mode="r")
