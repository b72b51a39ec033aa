"""Read a CSV of image file names and labels with its image folder (Shopee's layout)."""

from __future__ import annotations

import logging
import os
import warnings

import pandas as pd

from ..exceptions import MissingImagesError

logger = logging.getLogger(__name__)

_LAYOUTS = ("auto", "flat", "by_label")
_CHECKS = ("exists", "decode", None)
_ON_MISSING = ("raise", "drop")
_EXAMPLES_SHOWN = 5
_DEFAULT_LABEL_COLUMN = "category"


def read_table(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    filename_column: str = "filename",
    label_column: str | None = "category",
    layout: str = "auto",
    check: str | None = "exists",
    on_missing: str = "raise",
    image_column: str = "image",
) -> pd.DataFrame:
    """Read a table of image file names (and labels) and resolve each image's path.

    Shopee's Kaggle layout is ``train.csv`` with ``filename,category`` and the
    images either in one folder (``test/<filename>``) or in one folder per
    category (``train/03/<filename>``). Every image is checked before anything
    else happens, and all the missing or unreadable ones are reported at once.

    Parameters
    ----------
    csv_path : str or path-like
        The CSV file.
    image_root : str or path-like
        The folder that holds the images.
    filename_column : str, default="filename"
        The column of image file names (relative to ``image_root``, or to
        ``image_root/<label>`` in the per-category layout).
    label_column : str or None, default="category"
        The label column. Labels are kept exactly as written, as strings
        (Shopee's ``"03"`` stays ``"03"``). ``None``, or the default when the
        CSV has no ``category`` column, reads an unlabelled table (images
        then are looked for without a folder per label, and the error about
        missing images says that the column is absent); any other name must be
        a column of the CSV.
    layout : {"auto", "flat", "by_label"}, default="auto"
        ``"flat"``: ``image_root/<filename>``; ``"by_label"``:
        ``image_root/<label>/<filename>``; ``"auto"``: per row, the per-label
        path when that file exists, else the flat one.
    check : {"exists", "decode"} or None, default="exists"
        ``"exists"`` checks that each file exists, is readable and is not
        empty; ``"decode"`` also reads each image's header with Pillow;
        ``None`` checks nothing.
    on_missing : {"raise", "drop"}, default="raise"
        Raise :class:`~skproduct.exceptions.MissingImagesError` naming the
        count and the first bad rows, or drop those rows with a warning (the
        rows kept keep their row numbers in the CSV as the index).
    image_column : str, default="image"
        Name of the column of resolved paths that is added.

    Returns
    -------
    pandas.DataFrame
        The CSV's columns (file names and labels as strings) plus
        ``image_column`` with each image's path, in the CSV's row order.

    Examples
    --------
    >>> import os, tempfile
    >>> from PIL import Image
    >>> from skproduct.io import read_table
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(root, "images", "03"))
    >>> Image.new("RGB", (8, 8)).save(os.path.join(root, "images", "03", "a.jpg"))
    >>> with open(os.path.join(root, "train.csv"), "w") as f:
    ...     _ = f.write("filename,category\\na.jpg,03\\n")
    >>> table = read_table(os.path.join(root, "train.csv"), os.path.join(root, "images"))
    >>> table["category"].tolist()
    ['03']
    >>> os.path.relpath(table["image"][0], root)
    'images/03/a.jpg'
    """
    _check_choice("layout", layout, _LAYOUTS)
    _check_choice("check", check, _CHECKS)
    _check_choice("on_missing", on_missing, _ON_MISSING)
    csv_path, image_root = os.fspath(csv_path), os.path.abspath(os.fspath(image_root))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"the image folder {image_root!r} does not exist; pass the folder that holds the images")
    header = pd.read_csv(csv_path, nrows=0).columns
    if filename_column not in header:
        raise KeyError(f"{csv_path} has no column {filename_column!r} (columns: {list(header)}); pass filename_column=")
    has_labels = label_column is not None and label_column in header
    if label_column not in (None, _DEFAULT_LABEL_COLUMN) and not has_labels:
        raise KeyError(f"{csv_path} has no label column {label_column!r} (columns: {list(header)}); pass label_column=")
    if layout == "by_label" and not has_labels:
        raise ValueError(f"layout='by_label' needs the label column {label_column!r}, which {csv_path} does not have")
    text_columns = [filename_column] + ([label_column] if has_labels else [])
    table = pd.read_csv(csv_path, dtype={c: str for c in text_columns}, keep_default_na=False)
    if image_column in table.columns:
        raise ValueError(f"{csv_path} already has a column {image_column!r}; pass another image_column=")

    labels = table[label_column] if has_labels else None
    paths, problems = [], []
    for row, filename in enumerate(table[filename_column]):
        path = _resolve(image_root, filename, None if labels is None else labels.iat[row], layout)
        paths.append(path)
        what = _problem(path, check) if filename else "has an empty file name"
        if what:
            problems.append((row, filename, path, what))
    table[image_column] = paths

    if problems:
        message = _describe_problems(csv_path, image_root, len(table), problems)
        if label_column is not None and not has_labels:  # the default column is absent: say what that changed
            message += (
                f" ({csv_path} has no label column {label_column!r} (columns: {list(header)}), so every image was "
                f"looked for directly under {image_root}, not in a folder per label; pass label_column= to name "
                "its label column)"
            )
        if on_missing == "raise":
            raise MissingImagesError(message + "; fix the paths or pass on_missing='drop'", problems)
        warnings.warn(message + "; dropped those rows", UserWarning, stacklevel=2)
        logger.warning("%s; dropped those rows", message)
        table = table.drop(index=table.index[[row for row, *_ in problems]])
    return table


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _resolve(root: str, filename: str, label: str | None, layout: str) -> str:
    flat = os.path.join(root, filename)
    if layout == "flat" or label is None:
        return flat
    by_label = os.path.join(root, label, filename)
    if layout == "by_label" or os.path.isfile(by_label):
        return by_label
    return flat


def _problem(path: str, check: str | None) -> str | None:
    """Say what is wrong with the image file at ``path``, or ``None``."""
    if check is None:
        return None
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not os.path.isfile(path):
        return "is not a file"
    if size == 0:
        return "is empty"
    if not os.access(path, os.R_OK):
        return "is not readable"
    if check == "decode":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            return f"is not a readable image ({exc})"
    return None


def _describe_problems(csv_path: str, root: str, n_rows: int, problems: list) -> str:
    shown = "; ".join(
        f"row {row} {filename!r} {what} (looked for {path})" for row, filename, path, what in problems[:_EXAMPLES_SHOWN]
    )
    more = f"; and {len(problems) - _EXAMPLES_SHOWN} more" if len(problems) > _EXAMPLES_SHOWN else ""
    return f"{len(problems)} of {n_rows} images listed in {csv_path} are missing or unreadable under {root}: {shown}{more}"
