"""Reading a command's data: a .bson or .csv catalogue, its labels and category tree; writing results atomically."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from . import CommandError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# Kaggle's submission columns: Cdiscount's (BSON input) and Shopee's (CSV input).
BSON_COLUMNS = ("_id", "category_id")
CSV_COLUMNS = ("filename", "category")


@dataclass
class Data:
    """A catalogue read for a command: the frame the estimators take, its labels, and its submission columns."""

    path: str
    frame: pd.DataFrame
    labels: np.ndarray | None
    ids: np.ndarray
    columns: tuple[str, str]  # the submission's id and label columns
    n_pictures: int


def read_data(path: str, args: argparse.Namespace, *, need_labels: bool) -> Data:
    """Read a .bson or .csv catalogue; with ``need_labels``, one without labels is a mistake."""
    require_file(path, "data file", "pass a .bson file or a .csv file of images")
    suffix = Path(path).suffix.lower()
    if suffix == ".bson":
        data = _read_bson_data(path, need_labels)
    elif suffix == ".csv":
        data = _read_csv_data(path, args.images, args.label_column, need_labels)
    else:
        raise CommandError(f"{path} is neither a .bson nor a .csv file: pass Cdiscount's BSON or a CSV of image names")
    logger.info("read %d products (%d pictures) from %s", len(data.ids), data.n_pictures, path)
    if need_labels and data.labels is None:
        raise CommandError(f"{path} has no labels (a test file?): this command needs a labelled file")
    return data


def _read_bson_data(path: str, need_labels: bool) -> Data:
    from ..io import default_index_path, read_bson

    products = read_bson(path, index_path=default_index_path(path))
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


def _read_csv_data(path: str, images: str | None, label_column: str | None, need_labels: bool) -> Data:
    import pandas as pd

    from ..io import read_table

    root = Path(images) if images is not None else Path(path).parent / "images"
    if not root.is_dir():
        raise CommandError(f"no image folder at {root} for {path}: pass --images DIR, the folder that holds the images")
    header = list(pd.read_csv(path, nrows=0).columns)
    if CSV_COLUMNS[0] not in header:
        raise CommandError(f"{path} has no 'filename' column (columns: {header}): it must list image file names")
    label = label_column or CSV_COLUMNS[1]
    if label not in header:
        if label_column is not None or need_labels:
            raise CommandError(f"{path} has no label column {label!r} (columns: {header}): pass --label-column NAME")
        label = None
    table = read_table(path, root, label_column=label)
    labels = None if label is None else table[label].to_numpy()
    return Data(path, table, labels, table[CSV_COLUMNS[0]].to_numpy(), CSV_COLUMNS, len(table))


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


def check_leaves(labels: np.ndarray, tree, what: str) -> None:
    try:
        tree.leaf_positions(labels)
    except KeyError as exc:
        raise CommandError(f"{what}: {exc.args[0]}; pass the category tree they come from with --categories") from exc


def save(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Write ``path`` atomically (:func:`~skproduct._files.atomic_write`): ``write`` gets the open temporary file.

    A crash never leaves half a file, a symbolic link is followed, and a
    folder, FIFO or device is refused before anything is written.
    """
    from .._files import atomic_write

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, mode, **({"newline": ""} if "b" not in mode else {})) as f:
        write(f)
