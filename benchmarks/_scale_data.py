"""Generated Cdiscount-layout BSON files of a given number of products, for benchmarks/bench_scale.py.

Reuses bench_bson's picture pool (real train_example pictures re-encoded at 2-10 KB), its proportions of 1-4
pictures per product (Cdiscount's) and its category weights (Cdiscount's tree with its long tail, from
``category_counts``). Each picture gets 8 random bytes after its JPEG end marker, so that every picture of the
file is distinct (decoders ignore trailing bytes) and no cache can answer one picture for another.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import bench_bson  # beside this script
import bson
import numpy as np

GENERATOR_VERSION = 1


def generated_products(workdir: Path, n_products: int, seed: int = 0) -> tuple[Path, dict]:
    """The generated file of ``n_products`` products, written unless an identical one exists."""
    path = Path(workdir) / f"scale_{n_products}.bson"
    meta_path = path.with_name(path.name + ".json")
    params = {"generator_version": GENERATOR_VERSION, "n_products": n_products, "seed": seed}
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("params") == params and meta.get("file_size") == path.stat().st_size:
            return path, meta
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pool = bench_bson._picture_pool(rng)
    category_ids, category_p = bench_bson._category_ids()
    tmp = path.with_name(path.name + ".tmp")
    n_pictures = 0
    product_id = 0
    with open(tmp, "wb", buffering=8 << 20) as f:
        for begin in range(0, n_products, 10_000):
            chunk = min(10_000, n_products - begin)
            n_pics = rng.choice(4, size=chunk, p=bench_bson.N_PICTURES_PROBABILITY) + 1
            cats = rng.choice(category_ids, size=chunk, p=category_p)
            gaps = rng.integers(1, 4, size=chunk)
            picks = rng.integers(len(pool), size=(chunk, 4))
            salt = rng.bytes(chunk * 4 * 8)
            for k in range(chunk):
                product_id += int(gaps[k])
                imgs = [{"picture": pool[j] + salt[(4 * k + i) * 8:(4 * k + i + 1) * 8]}
                        for i, j in enumerate(picks[k, : n_pics[k]])]
                f.write(bson.encode({"_id": product_id, "imgs": imgs, "category_id": int(cats[k])}))
                n_pictures += int(n_pics[k])
    os.replace(tmp, path)
    meta = {"params": params, "file_size": path.stat().st_size, "n_products": n_products, "n_pictures": n_pictures,
            "generation_seconds": round(time.perf_counter() - start, 1)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta


if __name__ == "__main__":
    import sys

    for n in sys.argv[2:]:
        print(generated_products(Path(sys.argv[1]), int(n)), flush=True)
