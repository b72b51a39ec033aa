"""Reading a command's data: a .bson or .csv catalogue, its labels and category tree; checking and writing outputs.

Every output path of a command is checked before its long work starts
(:func:`check_outputs`): a folder, FIFO, socket or device is refused, a
symbolic link is followed (its target is rewritten, the link kept), a missing
parent folder is made at the write (its nearest existing ancestor must be a
folder), and an output that is one of the command's inputs is refused. ``-``
(or ``/dev/stdout``) writes a text output to stdout. Results are written
atomically (:func:`save`): an error or Ctrl-C never leaves half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from . import CommandError, is_skproduct_error

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# Kaggle's submission columns: Cdiscount's (BSON input) and Shopee's (CSV input).
BSON_COLUMNS = ("_id", "category_id")
CSV_COLUMNS = ("filename", "category")
STDOUT = "-"
_STDOUT_PATHS = ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")  # written as "-": never renamed over
#: The formats ``--confusion`` writes, by suffix (matplotlib's names).
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg", ".pdf": "pdf"}


@dataclass
class Data:
    """A catalogue read for a command: the frame the estimators take, its labels, and its submission columns.

    ``ids`` and ``labels`` cover every product of the file. ``frame`` holds the
    products that have pictures to read; with ``--on-missing drop`` the rows
    whose image file is missing are left out of it and marked in ``absent``
    (``None`` when every product is in ``frame``).
    """

    path: str
    frame: pd.DataFrame
    labels: np.ndarray | None
    ids: np.ndarray
    columns: tuple[str, str]  # the submission's id and label columns
    n_pictures: int
    absent: np.ndarray | None = None


# -- reading ----------------------------------------------------------------------------------------------------------
def data_paths(given: str | Sequence[str]) -> list[str]:
    """The data files a command was given: each path as it is, each quoted glob pattern expanded (sorted).

    Several files must all be .bson files (a catalogue split into parts); a
    .csv file comes alone.
    """
    import glob

    items = [given] if isinstance(given, str) else list(given)
    paths: list[str] = []
    for item in items:
        if set("*?[") & set(item) and not os.path.exists(item):
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise CommandError(f"no file matches {item!r}: check the pattern (quote it so that the shell "
                                   "passes it as it is)")
            paths.extend(matches)
        else:
            paths.append(item)
    if len(paths) > 1:
        for path in paths:
            if check_data_file(path) != ".bson":
                raise CommandError(f"{path}: several data files must all be .bson files (parts of one catalogue); "
                                   "pass one .csv file")
    return paths


def describe_paths(paths: Sequence[str]) -> str:
    """How a command's messages name its data files."""
    return paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]} ... {paths[-1]})"


def read_data(path: str | Sequence[str], args: argparse.Namespace, *, need_labels: bool,
              keep_every_product: bool = True) -> Data:
    """Read a .bson or .csv catalogue (or several .bson files, as one); without labels, ``need_labels`` refuses it.

    ``keep_every_product``: with ``--on-missing drop``, the rows whose image is
    missing stay in ``ids`` (and ``labels``), marked in ``absent``, so that
    every product gets an answer; otherwise (``fit``) they are dropped.
    """
    paths = data_paths(path)
    path = describe_paths(paths)
    suffix = check_data_file(paths[0])
    if suffix == ".bson":
        data = _read_bson_data(paths, need_labels, getattr(args, "on_truncated", "raise"))
    else:
        data = _read_csv_data(
            paths[0], args.images, args.label_column, need_labels, getattr(args, "on_missing", "raise"),
            keep_every_product,
        )
    logger.info("read %d products (%d pictures) from %s", len(data.ids), data.n_pictures, path)
    if len(data.ids) == 0:
        raise CommandError(f"{path} holds no products: pass a file with at least one")
    if need_labels and data.labels is None:
        raise CommandError(f"{path} has no labels (a test file?): this command needs a labelled file")
    return data


def check_data_file(path: str) -> str:
    """A data file exists and is a .bson or .csv file; returns its suffix."""
    require_file(path, "data file", "pass a .bson file or a .csv file of images")
    suffix = Path(path).suffix.lower()
    if suffix not in (".bson", ".csv"):
        raise CommandError(f"{path} is neither a .bson nor a .csv file: pass Cdiscount's BSON or a CSV of image names")
    return suffix


@contextlib.contextmanager
def user_input(what: str) -> Iterator[None]:
    """Around a call that interprets the user's input (a data file, a tree, the backbone options): a plain
    ``ValueError`` or ``KeyError`` raised there is about that input, and becomes one line (``what: message``).

    skproduct's own exception classes and scikit-learn's ``InvalidParameterError`` pass as they are (one line
    already); every other exception passes too: a bug keeps its traceback.
    """
    try:
        yield
    except (ValueError, KeyError) as exc:
        if is_skproduct_error(exc) or type(exc).__module__.startswith("sklearn."):
            raise
        detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CommandError(f"{what}: {detail}") from exc


def _read_bson_data(paths: list[str], need_labels: bool, on_truncated: str) -> Data:
    from ..io import default_index_path, read_bson

    path = describe_paths(paths)
    for part in paths[1:]:
        require_file(part, "data file", "pass .bson files that exist")
    with user_input(f"cannot read {path}"):
        products = read_bson(paths, index_path=[default_index_path(p) for p in paths], on_truncated=on_truncated)
    missing = products["category_id"].isna()
    if need_labels and missing.any() and not missing.all():
        raise CommandError(
            f"{int(missing.sum())} of {len(products)} products in {path} have no category_id (for example _id "
            f"{products['product_id'][missing].iloc[0]}): this command needs every product labelled"
        )
    labels = None if missing.any() else products["category_id"].to_numpy(dtype=np.int64)
    return Data(
        path, products, labels, products["product_id"].to_numpy(), BSON_COLUMNS, int(products["n_images"].sum())
    )


def _check_csv(path: str, images: str | None, label_column: str | None, need_labels: bool) -> tuple[Path, str | None]:
    """The cheap checks of a CSV input (its image folder, its columns); returns the folder and the label column."""
    import pandas as pd

    root = Path(images) if images is not None else Path(path).parent / "images"
    if not root.is_dir():
        raise CommandError(f"no image folder at {root} for {path}: pass --images DIR, the folder that holds the images")
    with user_input(f"cannot read {path}"):
        header = list(pd.read_csv(path, nrows=0).columns)
    if CSV_COLUMNS[0] not in header:
        raise CommandError(f"{path} has no 'filename' column (columns: {header}): it must list image file names")
    label = label_column or CSV_COLUMNS[1]
    if label not in header:
        if label_column is not None or need_labels:
            raise CommandError(f"{path} has no label column {label!r} (columns: {header}): pass --label-column NAME")
        label = None
    return root, label


def _read_csv_data(
    path: str, images: str | None, label_column: str | None, need_labels: bool, on_missing: str,
    keep_every_product: bool,
) -> Data:
    from ..io import read_table

    root, label = _check_csv(path, images, label_column, need_labels)
    with user_input(f"cannot read {path}"):
        table = read_table(path, root, label_column=label, on_missing=on_missing)
        every = table
        if keep_every_product and on_missing == "drop":
            every = read_table(path, root, label_column=label, check=None)  # every row, nothing checked again
    absent = None
    if len(every) != len(table):  # the dropped rows keep their place: they get the prior's answer
        absent = ~np.isin(np.arange(len(every)), table.index.to_numpy())
    table = table.reset_index(drop=True)
    labels = None if label is None else every[label].to_numpy()
    return Data(path, table, labels, every[CSV_COLUMNS[0]].to_numpy(), CSV_COLUMNS, len(table), absent)


def require_file(path: str, what: str, fix: str) -> None:
    if not os.path.isfile(path):
        raise CommandError(f"no {what} at {path}: {fix}")


def read_tree(path: str):
    from ..taxonomy import CategoryTree

    require_file(path, "category tree", "pass Cdiscount's category_names.csv (or a CSV in its layout)")
    try:
        return CategoryTree.from_csv(path)
    except KeyError as exc:
        raise CommandError(f"{path} is not a category tree in Cdiscount's layout: {exc.args[0]}") from exc
    except ValueError as exc:
        if is_skproduct_error(exc):
            raise
        raise CommandError(f"{path} is not a category tree in Cdiscount's layout: {exc}") from exc


def check_leaves(labels: np.ndarray, tree, what: str) -> None:
    try:
        tree.leaf_positions(labels)
    except KeyError as exc:
        raise CommandError(f"{what}: {exc.args[0]}; pass the category tree they come from with --categories") from exc


# -- outputs ----------------------------------------------------------------------------------------------------------
def is_stdout(path: str | None) -> bool:
    """Whether ``path`` means stdout: ``-``, or ``/dev/stdout`` (written to, never replaced)."""
    return path is not None and (path == STDOUT or os.path.normpath(path) in _STDOUT_PATHS)


def check_outputs(
    outputs: Sequence[tuple[str, str | None]], inputs: Sequence[str | None] = (), *, to_stdout: Sequence[str] = (),
    image: Sequence[str] = (),
) -> None:
    """Refuse, before any work, an output the command could not write at the end.

    Parameters
    ----------
    outputs : sequence of (option, path)
        The command's outputs (``path`` ``None`` when the option is not given).
    inputs : sequence of str
        The files the command reads: an output may not replace one.
    to_stdout : sequence of str
        The options that may be ``-`` (stdout); the others may not.
    image : sequence of str
        The options whose suffix names an image format (:data:`IMAGE_FORMATS`).
    """
    from .._files import resolve_file_target

    read = {os.path.realpath(p) for p in inputs if p is not None and os.path.exists(p)}
    seen: dict[str, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        if is_stdout(path):
            if option not in to_stdout:
                raise CommandError(f"{option} {path}: this output cannot go to stdout: pass a file path")
            continue
        if option in image:
            image_format(path, option)
        try:
            target = resolve_file_target(path)
        except (IsADirectoryError, ValueError) as exc:  # a folder, FIFO, socket or device: nothing is written
            raise CommandError(f"{option} {exc}") from exc
        except OSError as exc:  # a part of the path is a file, a link loop...
            _check_folder_for(Path(os.path.abspath(path)), option, path)
            raise CommandError(f"{option} {path}: {exc.strerror or exc}: pass a path in a folder") from exc
        if str(target) in read:
            raise CommandError(f"{option} {path} is a file this command reads: pass another path for the output")
        if str(target) in seen:
            raise CommandError(f"{seen[str(target)]} and {option} name the same file {path}: pass two paths")
        seen[str(target)] = option
        _check_folder_for(target, option, path)


def _check_folder_for(target: Path, option: str, given: str) -> None:
    """The folder of ``target`` exists or can be made (its nearest existing ancestor is a writable folder)."""
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{option} {given}: {ancestor} is a file, not a folder: pass a path in a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CommandError(
            f"{option} {given}: the folder {ancestor} cannot be written (permission denied): pass a path in a folder "
            "you can write"
        )


def check_folder_option(option: str, path: str | None) -> None:
    """A folder option (``--cache``, ``--workdir``): a folder or nothing yet, never a file."""
    if path is None:
        return
    folder = Path(path).expanduser()
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        shown = path if ancestor == folder else f"{path} ({ancestor} is a file)"
        raise CommandError(f"{option} {shown} is not a folder: pass a folder (it is made when missing)")


def image_format(path: str, option: str = "--confusion") -> str:
    """The matplotlib format that the suffix of ``path`` names; an unknown suffix is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise CommandError(
            f"{option} {path}: the suffix {suffix or '(none)'!s} names no image format this command writes: "
            f"end the name with one of {', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def save(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Write ``path`` atomically (:func:`~skproduct._files.atomic_write`): ``write`` gets the open temporary file.

    A crash or Ctrl-C never leaves half a file, a symbolic link is followed,
    and a folder, FIFO or device is refused before anything is written. A
    missing parent folder is made. ``-`` (or ``/dev/stdout``) writes to stdout
    instead. A write that fails (a full disk) is one line naming the file.
    """
    from .._files import atomic_write

    if is_stdout(path):
        stream = sys.stdout if "b" not in mode else sys.stdout.buffer
        write(stream)
        stream.flush()
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CommandError(f"could not write {path} ({reason}); nothing was written there") from exc


# -- streaming ----------------------------------------------------------------------------------------------------------
#: Products a streaming command (predict, evaluate, extract) embeds, predicts and writes together.
PRODUCTS_PER_CHUNK = 16384


def data_chunks(data: Data, size: int | None = None) -> Iterator[Data]:
    """``data`` in chunks of ``size`` products (:data:`PRODUCTS_PER_CHUNK`), in order, each a :class:`Data` of its
    own (frames share the picture arrays).

    Examples
    --------
    >>> import pandas as pd
    >>> whole = Data("x.csv", pd.DataFrame({"image": ["a", "b", "c"]}), None, np.arange(4), CSV_COLUMNS, 3,
    ...              np.array([False, True, False, False]))
    >>> [(part.ids.tolist(), part.frame["image"].tolist()) for part in data_chunks(whole, 2)]
    [([0, 1], ['a']), ([2, 3], ['b', 'c'])]
    """
    size = size or PRODUCTS_PER_CHUNK
    n = len(data.ids)
    if n <= size:
        yield data
        return
    present = np.ones(n, dtype=bool) if data.absent is None else ~data.absent
    frame_row = np.cumsum(present) - 1
    for start in range(0, n, size):
        stop = min(n, start + size)
        here = present[start:stop]
        rows = frame_row[start:stop][here]
        frame = data.frame.iloc[rows].reset_index(drop=True)
        labels = None if data.labels is None else data.labels[start:stop]
        absent = None if data.absent is None else ~here
        n_pictures = int(frame["n_images"].sum()) if "n_images" in frame.columns else len(frame)
        yield Data(data.path, frame, labels, data.ids[start:stop], data.columns, n_pictures, absent)


class Progress:
    """Products done and products per second: a tqdm bar on stderr for long runs, and a log line per chunk."""

    def __init__(self, total: int, what: str, enabled: bool):
        import time

        self.total, self.what, self.done, self.start = total, what, 0, time.perf_counter()
        self.bar = None
        if enabled and total > PRODUCTS_PER_CHUNK:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=what, unit=" products", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        import time

        self.done += n
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update(n)
        logger.info("%s: %d of %d products (%.0f products/s)", self.what, self.done, self.total,
                    self.done / max(seconds, 1e-9))

    def close(self) -> float:
        import time

        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start


def write_npy_header(f: IO, shape: tuple[int, int]) -> None:
    """The header of a float32, C-ordered ``.npy`` file of ``shape``: its rows follow, written chunk by chunk."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                            "fortran_order": False, "shape": tuple(int(v) for v in shape)})
