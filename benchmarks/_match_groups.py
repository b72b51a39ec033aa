"""Realistic product-matching groups from real catalogue photos, and the hash baselines to measure against.

No Shopee matching images are in ``../shared/data``, so groups are built from
fashion-small's real photos the way sellers' re-uploads look: a group is 1-6
postings of one product photo (Shopee's groups are mostly pairs), each posting
the photo after a random mix of the edits re-uploads show (JPEG re-compression
at another quality, rescaling, a crop of 70-95%, padding to a square or a
border, small colour and brightness shifts, a text overlay); now and then a
posting is the very same file (an exact re-upload). Every group's photo, and
the many single-posting distinct products mixed in (the hard negatives), come
from the same few article types, so that the non-matches look alike too.

Tests (through ``tests/conftest.py``'s path, as for ``_real_weights``) and
``bench_matching.py`` share this module; it stays out of the package.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

#: P(group size = 1..6) for the matched groups (Shopee: most groups are pairs).
GROUP_SIZES = np.array([0.0, 0.50, 0.22, 0.13, 0.09, 0.06])
EXACT_REUPLOAD = 0.10  # a posting that is the original file, byte for byte
TEXTS = ("SALE", "-30%", "NEW", "FREE SHIPPING", "ORI 100%", "PROMO", "BEST SELLER", "COD")


@dataclass
class Groups:
    """Generated postings: ``frame`` (``posting_id``, ``images``: a list with one JPEG's bytes, ``label_group``,
    ``category_id``, ``source_id``, ``edits``), for :class:`~skproduct.ImageEmbedder` and the CLI."""

    frame: object

    @property
    def y(self) -> np.ndarray:
        return self.frame["label_group"].to_numpy()

    @property
    def pictures(self) -> list[bytes]:
        return [images[0] for images in self.frame["images"]]


def choose_sources(products, n_groups: int, n_negatives: int, *, n_categories: int = 8, seed: int = 0):
    """Distinct real photos for the groups and for the negatives, all from the ``n_categories`` largest article
    types (hard negatives): ``(group rows, negative rows)`` of ``products`` (a :func:`read_bson` frame)."""
    rng = np.random.default_rng(seed)
    counts = products["category_id"].value_counts()
    chosen = counts.index[:n_categories]
    pool = np.flatnonzero(products["category_id"].isin(chosen).to_numpy())
    need = n_groups + n_negatives
    if need > len(pool):
        raise ValueError(f"{need} photos asked for, the {n_categories} largest categories hold {len(pool)}")
    picked = rng.choice(pool, size=need, replace=False)
    return picked[:n_groups], picked[n_groups:]


def edit(picture: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One seller's re-upload of ``picture``: a random mix of edits, always re-compressed; ``(JPEG bytes, what)``."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

    image = Image.open(io.BytesIO(picture)).convert("RGB")
    done = []
    while not done:
        if rng.random() < 0.5:
            w, h = image.size
            fw, fh = rng.uniform(0.70, 0.95, size=2)
            cw, ch = max(8, int(w * fw)), max(8, int(h * fh))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((x, y, x + cw, y + ch))
            done.append(f"crop{fw:.2f}x{fh:.2f}")
        if rng.random() < 0.5:
            factor = float(rng.uniform(0.6, 2.0))
            image = image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))),
                                 Image.Resampling.BICUBIC)
            done.append(f"scale{factor:.2f}")
        if rng.random() < 0.25:
            side = max(image.size)
            fill = tuple(int(v) for v in rng.choice([255, 245, 0], size=1).repeat(3))
            image = ImageOps.pad(image, (side, side), color=fill)
            done.append("square")
        elif rng.random() < 0.2:
            border = int(rng.integers(2, 9))
            image = ImageOps.expand(image, border=border, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            done.append(f"border{border}")
        if rng.random() < 0.5:
            brightness, colour = rng.uniform(0.85, 1.15, size=2)
            image = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(brightness)).enhance(colour)
            done.append(f"colour{brightness:.2f}/{colour:.2f}")
        if rng.random() < 0.3:
            draw = ImageDraw.Draw(image)
            size = max(8, image.height // 8)
            try:
                font = ImageFont.load_default(size=size)
            except TypeError:  # Pillow < 10.1
                font = ImageFont.load_default()
            text = str(rng.choice(TEXTS))
            x, y = int(rng.integers(0, max(1, image.width // 3))), int(rng.integers(0, max(1, image.height - size)))
            draw.text((x, y), text, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font)
            done.append("text")
    quality = int(rng.integers(40, 96))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), "+".join([*done, f"jpeg{quality}"])


def make_groups(products, n_groups: int, n_negatives: int, *, seed: int = 0, n_categories: int = 8) -> Groups:
    """``n_groups`` matched groups (1-6 postings of one photo, edited) and ``n_negatives`` distinct products.

    ``products`` is fashion-small read with :func:`skproduct.read_bson`. Postings are shuffled; each group label
    is an int (negatives have their own).
    """
    import pandas as pd

    rng = np.random.default_rng(seed + 1)
    groups, negatives = choose_sources(products, n_groups, n_negatives, n_categories=n_categories, seed=seed)
    sizes = rng.choice(np.arange(1, 7), size=n_groups, p=GROUP_SIZES / GROUP_SIZES.sum())
    records = []
    for label, (row, size) in enumerate(zip(groups, sizes, strict=True)):
        original = products["images"].iloc[row][0].read_bytes()
        for member in range(size):
            if member == 0 and rng.random() < 0.3 or member > 0 and rng.random() < EXACT_REUPLOAD:
                picture, what = original, "original"
            else:
                picture, what = edit(original, rng)
            records.append((picture, label, row, what))
    for offset, row in enumerate(negatives):
        original = products["images"].iloc[row][0].read_bytes()
        picture, what = (original, "original") if rng.random() < 0.5 else edit(original, rng)
        records.append((picture, n_groups + offset, row, what))
    order = rng.permutation(len(records))
    records = [records[i] for i in order]
    frame = pd.DataFrame({
        "posting_id": [f"posting_{i:06d}" for i in range(len(records))],
        "images": [[r[0]] for r in records],
        "label_group": np.array([r[1] for r in records], dtype=np.int64),
        "category_id": products["category_id"].to_numpy()[[r[2] for r in records]],
        "source_id": products["product_id"].to_numpy()[[r[2] for r in records]],
        "edits": [r[3] for r in records],
    })
    return Groups(frame)


# -- the hash baselines -----------------------------------------------------------------------------------------------
def exact_hash_matches(pictures: list[bytes]) -> list[np.ndarray]:
    """Matches by identical file content (the embedding cache's keys): exact re-uploads only."""
    from skproduct.cache import EmbeddingCache
    from skproduct.metrics.matching import groups_to_matches

    return groups_to_matches(EmbeddingCache.keys_for(pictures))


def phash_codes(pictures: list[bytes]) -> np.ndarray:
    """imagehash's 64-bit perceptual hash of each picture (Shopee's ``image_phash`` column), as uint64."""
    import imagehash
    from PIL import Image

    codes = np.empty(len(pictures), dtype=np.uint64)
    for i, picture in enumerate(pictures):
        bits = imagehash.phash(Image.open(io.BytesIO(picture))).hash.ravel()
        codes[i] = np.uint64(int("".join("1" if b else "0" for b in bits), 2))
    return codes


def phash_matches(codes: np.ndarray, max_distance: int = 0, *, chunk: int = 2048) -> list[np.ndarray]:
    """Matches by phash: postings whose hashes differ in at most ``max_distance`` bits (0: Shopee's equal
    ``image_phash``), itself first."""
    out = []
    for start in range(0, len(codes), chunk):
        distance = np.bitwise_count(codes[start : start + chunk, None] ^ codes[None, :])
        for offset, row in enumerate(distance):
            i = start + offset
            found = np.flatnonzero(row <= max_distance)
            out.append(np.concatenate([[i], found[found != i]]).astype(np.int64))
    return out


def tuned_phash(codes: np.ndarray, y: np.ndarray, distances=range(0, 21)) -> tuple[int, float]:
    """The Hamming distance with the best matching F1 on ``y`` (tuned in-sample: the baseline's best case)."""
    from skproduct.metrics.matching import matching_f1_score

    scores = [(matching_f1_score(y, phash_matches(codes, d)), d) for d in distances]
    best, distance = max(scores)
    return distance, best
