"""Read a Cdiscount-style BSON file into a frame of products with lazy picture references."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import pandas as pd

from .bson_refs import BsonImagesArray
from .bson_scan import empty_file_error
from .bson_sidecar import load_index

_ON_TRUNCATED = ("raise", "warn")


_GLOB_CHARACTERS = frozenset("*?[")


def bson_paths(path) -> list[str]:
    """The files ``path`` names: one path, a glob pattern (sorted matches), or a sequence of either.

    Examples
    --------
    >>> bson_paths("train.bson")
    ['train.bson']
    >>> bson_paths(["a.bson", "b.bson"])
    ['a.bson', 'b.bson']
    """
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise ValueError("no BSON file given: pass a path, a glob pattern such as 'train-*.bson', or a list of paths")
    paths: list[str] = []
    for item in items:
        item = os.fspath(item)
        if _GLOB_CHARACTERS & set(item) and not os.path.exists(item):
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FileNotFoundError(f"no BSON file matches {item!r}")
            paths.extend(matches)
        else:
            paths.append(item)
    return paths


def read_bson(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_truncated: str = "raise",
    index_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    rebuild_index: bool = False,
) -> pd.DataFrame:
    """Read BSON files of products (Cdiscount's layout) without loading their pictures.

    Each document holds an ``_id``, an optional ``category_id`` and an ``imgs``
    array of ``{"picture": <JPEG bytes>}``, in any field order; other fields are
    ignored. The first call scans the file once and saves an offset index in a
    sidecar file (``<path>.skpidx``, or skproduct's cache folder when the
    file's folder cannot be written); later calls read the sidecar, and a file
    whose size or modification time changed is scanned again. Memory grows with
    the number of products, not with the size of the file.

    Parameters
    ----------
    path : str, path-like, or a sequence of them
        The ``.bson`` file (for example Cdiscount's ``train.bson`` or
        ``test.bson``), a glob pattern (``"train-*.bson"``, matches sorted by
        name) or a list of files: a catalogue split into several files reads
        as one frame, in the order given, each picture reference naming its
        own file (``ref.path``). Each file keeps its own sidecar.
    on_truncated : {"raise", "warn"}, default="raise"
        A file that ends inside a document (an interrupted download) raises
        :class:`~skproduct.exceptions.BsonTruncatedError`; with ``"warn"`` the
        whole products before the truncated tail are kept and a warning says so.
    index_path : str, path-like, or a sequence of them, optional
        Keep the offset index in this file instead of the automatic places (a
        regular file or nothing yet; a symbolic link is followed); one per
        file when several are read.
        :func:`~skproduct.io.default_index_path` gives one that never writes
        into the BSON file's folder.
    rebuild_index : bool, default=False
        Scan the file again even when a fresh index exists.

    Returns
    -------
    pandas.DataFrame
        One row per product, in file order, with columns

        - ``product_id``: the document's ``_id`` (int64, or strings for
          non-integer ids);
        - ``category_id``: nullable ``Int64``, all missing for a file without
          labels (Cdiscount's ``test.bson``);
        - ``n_images``: the number of pictures;
        - ``images``: per product a list of
          :class:`~skproduct.io.BsonImageRef`, each of which reads only its own
          picture's bytes (``ref.read_bytes()``) and pickles small.

    Raises
    ------
    BsonFormatError
        The file is not BSON, or is empty (0 bytes), or a document does not
        decode, or a product has no picture. The message names the file, the
        byte offset and the product's position.
    BsonTruncatedError
        The file ends inside a document and ``on_truncated="raise"``.
    IsADirectoryError, ValueError
        ``index_path`` is a folder, a FIFO, a socket or a device.

    Examples
    --------
    >>> import tempfile, os
    >>> from skproduct.datasets import write_synthetic_bson
    >>> from skproduct.io import read_bson
    >>> folder = tempfile.mkdtemp()
    >>> path = write_synthetic_bson(os.path.join(folder, "train.bson"), n_products=5, random_state=0)
    >>> products = read_bson(path)
    >>> products.columns.tolist()
    ['product_id', 'category_id', 'n_images', 'images']
    >>> len(products)
    5
    >>> picture = products["images"][0][0].read_bytes()
    >>> picture[:2] == b"\\xff\\xd8"  # a JPEG
    True
    """
    if on_truncated not in _ON_TRUNCATED:
        raise ValueError(f"on_truncated must be one of {_ON_TRUNCATED}, got {on_truncated!r}")
    paths = bson_paths(path)
    if len(paths) > 1 or not isinstance(path, (str, os.PathLike)):
        if index_path is None or isinstance(index_path, (str, os.PathLike)):
            if index_path is not None and len(paths) > 1:
                raise ValueError(f"one index_path for {len(paths)} BSON files: pass a list of {len(paths)} paths "
                                 "(or none)")
            index_paths = [index_path] * len(paths)
        else:
            index_paths = list(index_path)
            if len(index_paths) != len(paths):
                raise ValueError(f"{len(index_paths)} index paths for {len(paths)} BSON files: pass one per file")
        frames = []
        for part, part_index in zip(paths, index_paths, strict=True):
            frames.append(read_bson(part, on_truncated=on_truncated, index_path=part_index,
                                    rebuild_index=rebuild_index))
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    path = paths[0]  # one file: read here, so that warnings point at the caller of read_bson
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no BSON file at {path!r}")
    if os.path.getsize(path) == 0:  # before any sidecar: an empty file is never a catalogue
        raise empty_file_error(path)
    index = load_index(path, on_truncated=on_truncated, index_path=index_path, rebuild=rebuild_index)
    category = pd.arrays.IntegerArray(index.category_id, ~index.has_category)
    images = BsonImagesArray.from_index(
        os.path.abspath(path),
        product_id=index.product_id,
        img_start=index.img_start,
        img_offset=index.img_offset,
        img_length=index.img_length,
    )
    return pd.DataFrame(
        {
            "product_id": index.product_id,
            "category_id": category,
            "n_images": index.n_images,
            "images": images,
        },
        copy=False,  # the index's arrays are the frame's: no copy of 7M rows at every open
    )
