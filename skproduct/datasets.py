"""Synthetic product catalogues: a category tree and labelled pictures, written in Cdiscount's BSON layout.

The pictures are drawn so that every level of the tree is visible in them (the
top level sets the background colour, the second the shape, the third the
shape's colour), which makes a catalogue that a model can learn, for examples,
tests and demos that need no downloaded data.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Sequence

import numpy as np

from .taxonomy import CategoryTree

__all__ = ["make_category_tree", "render_product_picture", "write_synthetic_bson"]

_BACKGROUNDS = [(230, 230, 230), (250, 220, 200), (200, 220, 250), (210, 245, 210), (245, 240, 190), (235, 205, 240)]
_INKS = [(200, 30, 30), (30, 120, 200), (30, 160, 60), (120, 60, 160), (230, 140, 20), (40, 40, 40)]
_SHAPES = ("square", "disc", "triangle", "bar")
DEFAULT_FIELD_ORDER = ("_id", "imgs", "category_id")


def make_category_tree(branching: Sequence[int] = (3, 2, 2), first_id: int = 1000) -> CategoryTree:
    """A balanced synthetic tree with integer leaf ids, Cdiscount-style.

    Parameters
    ----------
    branching : sequence of int, default=(3, 2, 2)
        Children per node at each level (the first entry is the number of top
        level nodes).
    first_id : int, default=1000
        The first leaf id; leaves are numbered from it.

    Returns
    -------
    CategoryTree

    Examples
    --------
    >>> make_category_tree((3, 2, 2)).level_sizes
    (3, 6, 12)
    """
    if not branching or min(branching) < 1:
        raise ValueError(f"branching needs at least one level and positive counts, got {tuple(branching)}")
    paths = [
        tuple(f"L{level + 1}-" + ".".join(map(str, index[: level + 1])) for level in range(len(index)))
        for index in itertools.product(*(range(n) for n in branching))
    ]
    return CategoryTree(np.arange(first_id, first_id + len(paths)), paths)


def render_product_picture(codes: Sequence[int], rng: np.random.Generator, size: int = 64) -> bytes:
    """Draw one JPEG picture of a product whose path has node ``codes`` (one per level).

    The top level chooses the background, the second the shape, the third the
    ink colour; position, scale and noise vary from picture to picture.
    """
    from PIL import Image, ImageDraw

    background = _BACKGROUNDS[codes[0] % len(_BACKGROUNDS)]
    shape = _SHAPES[codes[1] % len(_SHAPES)] if len(codes) > 1 else "square"
    ink = _INKS[codes[2] % len(_INKS)] if len(codes) > 2 else _INKS[0]
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = size * rng.uniform(0.2, 0.35)
    cx, cy = size * rng.uniform(0.35, 0.65, size=2)
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "square":
        draw.rectangle(box, fill=ink)
    elif shape == "disc":
        draw.ellipse(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=ink)
    else:
        draw.rectangle([cx - half, cy - half / 3, cx + half, cy + half / 3], fill=ink)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_synthetic_bson(
    path: str | os.PathLike,
    n_products: int = 100,
    *,
    tree: CategoryTree | None = None,
    max_images: int = 4,
    image_size: int = 64,
    labelled: bool = True,
    field_order: Sequence[str] = DEFAULT_FIELD_ORDER,
    random_state: int | None = None,
) -> str:
    """Write a synthetic catalogue to ``path`` in Cdiscount's BSON layout.

    Parameters
    ----------
    path : str or path-like
        The file to write (replaced if it exists).
    n_products : int, default=100
        Number of products.
    tree : CategoryTree, optional
        The category tree; defaults to :func:`make_category_tree` ``()``.
    max_images : int, default=4
        Each product gets 1 to ``max_images`` pictures.
    image_size : int, default=64
        Side of the square pictures, in pixels.
    labelled : bool, default=True
        Write ``category_id`` (a training file) or leave it out (a test file).
    field_order : sequence of str, default=("_id", "imgs", "category_id")
        The order of the fields in each document.
    random_state : int, optional
        Seed for repeatable files.

    Returns
    -------
    str
        ``path``, for chaining into :func:`skproduct.io.read_bson`.

    Examples
    --------
    >>> import os, tempfile
    >>> from skproduct.io import read_bson
    >>> path = write_synthetic_bson(os.path.join(tempfile.mkdtemp(), "train.bson"), 3, random_state=0)
    >>> bool(read_bson(path)["n_images"].between(1, 4).all())
    True
    """
    import bson

    if sorted(field_order) != sorted(DEFAULT_FIELD_ORDER):
        raise ValueError(f"field_order must order the fields {DEFAULT_FIELD_ORDER}, got {tuple(field_order)}")
    tree = make_category_tree() if tree is None else tree
    rng = np.random.default_rng(random_state)
    leaf_positions = rng.integers(0, len(tree), size=n_products)
    codes = tree.encode(tree.leaves[leaf_positions])
    path = os.fspath(path)
    with open(path, "wb") as f:
        for product_id, (leaf_position, product_codes) in enumerate(zip(leaf_positions, codes)):
            n_images = int(rng.integers(1, max_images + 1))
            fields = {
                "_id": product_id,
                "imgs": [{"picture": render_product_picture(product_codes, rng, image_size)} for _ in range(n_images)],
                "category_id": tree.leaves[leaf_position].item(),
            }
            f.write(bson.encode({name: fields[name] for name in field_order if labelled or name != "category_id"}))
    return path
