"""Product matching: F1, time and memory of ProductMatcher on realistic groups, against hash baselines.

Data (``benchmarks/_match_groups.py``): groups of 1-6 postings made from one
real fashion-small photo with re-upload edits (JPEG re-compression, rescaling,
crops of 70-95%, padding or borders, colour and brightness shifts, a text
overlay; some exact re-uploads), mixed with as many distinct products of the
same eight article types (hard negatives). ``--n-postings`` (default 10,000)
postings are generated and embedded for real with the real ImageNet weights of
``tf_efficientnet_lite0`` (``benchmarks/_real_weights.py``) at ``--image-size``
(default 224 px, the network's own resolution), through skproduct's cache (``--workdir``).

1. Matching F1 (Kaggle's mean per-posting F1), held out: the groups are split
   in two (``GroupKFold(2)``); every tuned method is tuned on one half and
   scored on the other, both ways, and the two scores averaged. Methods: each
   posting alone; exact file hash; imagehash's phash (equal hashes, Shopee's
   ``image_phash``; and the Hamming distance tuned on the other half);
   ProductMatcher with cosine and a fixed threshold (0.8, untuned); tuned;
   tuned + query expansion; tuned + local scaling (CSLS); both. Time: fit
   (tuning) and match of one half.
2. Duplicate lookup: the catalogue is each group's original photo, labelled
   (group, article type); every posting is looked up: a group's postings have
   a duplicate there (exact for the re-uploads, near for the edited ones), the
   distinct products have none. Per method: recall (postings with a duplicate
   whose best duplicate is of their group), precision (flagged postings whose
   best duplicate is of their group), and the accuracy of the looked-up
   article type on the flagged ones.
3. Scale: matching all postings at ``--n-postings`` and at ``--scale-to``
   (default 100,000) with the exact numpy backend and faiss (``Flat``: exact,
   up to ``--flat-max`` postings; ``HNSW32``: approximate): seconds, peak memory (``ru_maxrss`` growth of a
   fresh subprocess that loads the vectors and matches them), F1, and whether
   the matches equal the exact backend's. The 100,000 postings are **not**
   embedded pictures: they are the embedded set (tile 0) plus nine tiles of
   synthetic vectors made from it, each tile the whole set with its features
   permuted (one random permutation per tile) plus noise per posting
   (``--posting-noise`` x the per-feature standard deviation); each tile's
   labels are new groups. A tile keeps the real set's geometry inside it (its
   groups and hard negatives are as hard), and its postings are distinct
   products for the other tiles' (the JSON records the mean cosine between a
   copy and its original, ``copy_similarity``).

Prints Markdown tables and writes ``--out`` (default
``benchmarks/results/bench_matching.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _match_groups as mg  # noqa: E402
from _real_weights import BACKBONE, real_weights_file  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-small"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_matching.json"


def cpu_name() -> str | None:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return _common.machine_info()["cpu_model"]


def build(args):
    from skproduct import ImageEmbedder, read_bson

    products = read_bson(DATA / "fashion_small.bson", index_path=args.workdir / "fashion_small.skpidx")
    n_groups = int(round(args.n_postings / (1 + float(np.arange(1, 7) @ (mg.GROUP_SIZES / mg.GROUP_SIZES.sum())))))
    start = time.perf_counter()
    groups = mg.make_groups(products, n_groups, n_groups, seed=args.seed)
    generate_s = time.perf_counter() - start
    embedder = ImageEmbedder(BACKBONE, weights=real_weights_file(args.workdir), image_size=args.image_size,
                             batch_size=64, cache=args.workdir / "cache", verbose=1)
    start = time.perf_counter()
    X = embedder.fit_transform(groups.frame)
    embed_s = time.perf_counter() - start
    originals = originals_of(groups, products, n_groups)
    original_vectors = embedder.transform(originals)
    return groups, X, originals, original_vectors, {"generate_s": generate_s, "embed_s": embed_s,
                                                    "n_groups": n_groups}


# -- 1. matching F1 -----------------------------------------------------------------------------------------------------
def matcher_methods():
    from skproduct import ProductMatcher

    return {
        "cosine, fixed 0.8 (untuned)": lambda: ProductMatcher(threshold=0.8, tune="off"),
        "cosine, tuned": lambda: ProductMatcher(),
        "cosine, tuned + query expansion 2": lambda: ProductMatcher(query_expansion=2),
        "CSLS 10, tuned": lambda: ProductMatcher(local_scaling=10),
        "CSLS 10 + query expansion 2, tuned": lambda: ProductMatcher(local_scaling=10, query_expansion=2),
    }


def f1_table(groups, X):
    from sklearn.model_selection import GroupKFold

    from skproduct.metrics.matching import matching_f1_score

    y = groups.y
    halves = list(GroupKFold(2).split(X, y, y))
    pictures = groups.pictures
    codes = mg.phash_codes(pictures)
    rows = []

    def add(name, scores, fit_s=None, match_s=None, extra=None):
        rows.append({"method": name, "f1": float(np.mean(scores)), "f1_halves": [float(s) for s in scores],
                     "fit_s": fit_s, "match_s": match_s, **(extra or {})})

    add("each posting alone", [matching_f1_score(y[b], [[i] for i in range(len(b))]) for _, b in halves])
    start = time.perf_counter()
    scores = [matching_f1_score(y[b], mg.exact_hash_matches([pictures[i] for i in b])) for _, b in halves]
    add("exact file hash", scores, match_s=(time.perf_counter() - start) / 2)
    add("phash, equal (Shopee's image_phash)", [matching_f1_score(y[b], mg.phash_matches(codes[b], 0))
                                                for _, b in halves])
    scores, distances = [], []
    for a, b in halves:
        distance, _ = mg.tuned_phash(codes[a], y[a])
        distances.append(distance)
        scores.append(matching_f1_score(y[b], mg.phash_matches(codes[b], distance)))
    add("phash, Hamming distance tuned", scores, extra={"distances": distances})
    for name, make in matcher_methods().items():
        scores, fit_s, match_s, settings = [], [], [], []
        for a, b in halves:
            start = time.perf_counter()
            matcher = make().fit(X[a], y[a])
            fit_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            matches = matcher.matches(X[b])
            match_s.append(time.perf_counter() - start)
            scores.append(matching_f1_score(y[b], matches))
            settings.append({"threshold": matcher.threshold_, "n_neighbors": matcher.n_neighbors_})
        add(name, scores, float(np.mean(fit_s)), float(np.mean(match_s)), {"tuned": settings})
    return rows


# -- 2. duplicate lookup ------------------------------------------------------------------------------------------------
def duplicate_table(groups, X, originals, original_vectors, near_thresholds=(0.7, 0.8, 0.9)):
    """The catalogue holds each group's original photo, labelled (group, article type); every posting is looked up:
    a group's postings have a duplicate there (exact for the re-uploads, near for the edited), the distinct
    products (the negatives) have none."""
    import pandas as pd

    from skproduct.matching import content_keys, duplicate_labels, find_duplicates

    frame = groups.frame
    y = groups.y
    sizes = np.bincount(y)[y]
    negative = ~np.isin(y, originals["label_group"].to_numpy())
    catalogue_y = originals["label_group"].to_numpy()
    catalogue_category = originals["category_id"].to_numpy()
    has_duplicate = ~negative
    pictures = groups.pictures
    codes = mg.phash_codes(pictures)
    catalogue_codes = mg.phash_codes([images[0] for images in originals["images"]])
    rows = []

    def add(name, duplicates, seconds):
        labels, found = duplicate_labels(duplicates, catalogue_y, len(frame), fill=-1)
        right = found & (labels == y)
        looked_up, _ = duplicate_labels(duplicates, catalogue_category, len(frame), fill=-1)
        rows.append({
            "method": name, "flagged": int(found.sum()), "recall": float(right[has_duplicate].mean()),
            "precision": float(right[found].mean()) if found.any() else None,
            "label_accuracy": float((looked_up[found] == frame["category_id"].to_numpy()[found]).mean())
            if found.any() else None,
            "seconds": seconds,
        })

    start = time.perf_counter()
    keys = content_keys(frame), content_keys(originals)
    add("exact content hash", find_duplicates(*keys), time.perf_counter() - start)
    for distance in (0, 8):
        start = time.perf_counter()
        distance_matrix = np.bitwise_count(codes[:, None] ^ catalogue_codes[None, :])
        q, c = np.nonzero(distance_matrix <= distance)
        order = np.lexsort((distance_matrix[q, c], q))
        add(f"phash, Hamming <= {distance}", pd.DataFrame({"query": q[order], "catalogue": c[order]}),
            time.perf_counter() - start)
    for threshold in near_thresholds:
        start = time.perf_counter()
        duplicates = find_duplicates(*keys, X, original_vectors, threshold=threshold)
        add(f"exact hash + near duplicates (cosine >= {threshold})", duplicates, time.perf_counter() - start)
    info = {"catalogue": len(originals), "feed": len(frame), "with_duplicate": int(has_duplicate.sum()),
            "exact_reuploads": int((frame["edits"] == "original").to_numpy()[has_duplicate].sum()),
            "groups_of_one_in_feed": int(((sizes == 1) & has_duplicate).sum())}
    return rows, info


def originals_of(groups, products, n_groups: int):
    """The original photo of each matched group (labels ``0 .. n_groups - 1``; not the negatives): a labelled
    catalogue."""
    import pandas as pd

    frame = groups.frame
    by_group = frame[frame["label_group"] < n_groups].drop_duplicates("label_group").sort_values("label_group")
    position = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    rows = position.loc[by_group["source_id"].to_numpy()].to_numpy()
    return pd.DataFrame({
        "images": [[products["images"].iloc[r][0].read_bytes()] for r in rows],
        "label_group": by_group["label_group"].to_numpy(), "category_id": by_group["category_id"].to_numpy(),
    })


# -- 3. scale -----------------------------------------------------------------------------------------------------------
def synthetic_tiles(X, y, n_total, posting_noise, seed=0):
    """The embedded set plus tiles of copies with the features permuted, up to ``n_total`` postings (see the
    docstring)."""
    rng = np.random.default_rng(seed)
    std = X.std(axis=0, keepdims=True)
    tiles, labels = [X], [y]
    n_labels = y.max() + 1
    similarity = []
    t = 1
    while sum(len(v) for v in tiles) < n_total:
        permutation = rng.permutation(X.shape[1])
        copy = X[:, permutation] + posting_noise * std[:, permutation] * rng.standard_normal(X.shape).astype(
            np.float32)
        tiles.append(copy.astype(np.float32))
        labels.append(y + t * n_labels)
        a = X / np.linalg.norm(X, axis=1, keepdims=True)
        b = copy / np.linalg.norm(copy, axis=1, keepdims=True)
        similarity.append(float(np.einsum("ij,ij->i", a, b).mean()))
        t += 1
    V, L = np.concatenate(tiles)[:n_total], np.concatenate(labels)[:n_total]
    return V, L, float(np.mean(similarity)) if similarity else None


def probe(vectors_path: str, labels_path: str, backend: str, index: str, threshold: float, k: int, ls: int,
          matches_path: str) -> dict:
    """In a fresh process: load the vectors, match them, report seconds and peak memory growth."""
    from skproduct import ProductMatcher
    from skproduct.metrics.matching import matching_f1_score

    X = np.load(vectors_path)
    y = np.load(labels_path)
    import psutil

    before = psutil.Process().memory_info().rss // 1024  # KiB now, as ru_maxrss counts: the growth is the matching's
    start = time.perf_counter()
    matcher = ProductMatcher(k, threshold=threshold, tune="off", local_scaling=ls, backend=backend,
                             faiss_index=index).fit(X)
    matches = matcher.matches(X)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(matches_path, np.array([m.tolist() for m in matches], dtype=object), allow_pickle=True)
    return {"seconds": seconds, "peak_mib": (peak - before) / 1024, "f1": matching_f1_score(y, matches),
            "vectors_mib": X.nbytes / 2**20}


def scale_table(X, y, args, threshold, k, ls):
    results = []
    sizes = [len(X)] + ([args.scale_to] if args.scale_to and args.scale_to > len(X) else [])
    for n in sizes:
        V, L, copy_similarity = synthetic_tiles(X, y, n, args.posting_noise)
        folder = Path(tempfile.mkdtemp(dir=args.workdir))
        np.save(folder / "X.npy", V)
        np.save(folder / "y.npy", L)
        reference = None
        for backend, index in (("exact", "Flat"), ("faiss", "Flat"), ("faiss", "HNSW32")):
            if (backend, index) == ("faiss", "Flat") and n > args.flat_max:
                results.append({"n": n, "backend": "faiss Flat", "skipped": f"above --flat-max {args.flat_max}: "
                                "exact like the numpy backend (checked at the smaller size), and slower"})
                print(f"  n={n} faiss Flat: skipped (above --flat-max {args.flat_max})", flush=True)
                continue
            out = folder / f"{backend}-{index}.npy"
            command = [sys.executable, __file__, "--probe", str(folder / "X.npy"), str(folder / "y.npy"), backend,
                       index, str(threshold), str(k), str(ls), str(out)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.probe_timeout)
            if done.returncode != 0:
                results.append({"n": n, "backend": f"{backend} {index}", "error": done.stderr[-500:]})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            matches = np.load(out, allow_pickle=True)
            if reference is None:
                reference = matches
            row["same_as_exact"] = all(list(a) == list(b) for a, b in zip(reference, matches, strict=True))
            results.append({"n": n, "backend": f"{backend} {index}", "copy_similarity": copy_similarity, **row})
            print(f"  n={n} {backend} {index}: {row['seconds']:.1f} s, +{row['peak_mib']:.0f} MiB, "
                  f"F1 {row['f1']:.4f}, same as exact: {row['same_as_exact']}", flush=True)
    return results


def markdown(rows, columns) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        a = sys.argv[2:]
        print(json.dumps(probe(a[0], a[1], a[2], a[3], float(a[4]), int(a[5]), int(a[6]), a[7])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-postings", type=int, default=10_000)
    parser.add_argument("--scale-to", type=int, default=100_000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--posting-noise", type=float, default=0.1)
    parser.add_argument("--probe-timeout", type=int, default=1800)
    parser.add_argument("--flat-max", type=int, default=20_000,
                        help="run faiss's exact Flat index up to this many postings (it checks that faiss and the "
                             "numpy backend agree; above, exact numpy and faiss HNSW32 only)")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-from", type=Path, metavar="NPZ",
                        help="only part 3, on the vectors and labels (X, y) a previous run saved in its workdir")
    parser.add_argument("--threshold", type=float, default=0.095, help="with --scale-from: the CSLS threshold")
    parser.add_argument("--neighbors", type=int, default=50, help="with --scale-from: n_neighbors")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "skproduct-bench-matching")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    busy = _common.busy_cpu_seconds()
    started = time.time()
    if args.scale_from is not None:
        saved = np.load(args.scale_from)
        print(f"3. Scale from {args.scale_from} (CSLS 10, threshold {args.threshold}, n_neighbors {args.neighbors})")
        rows = scale_table(saved["X"], saved["y"], args, args.threshold, args.neighbors, 10)
        print(markdown(rows, ["n", "backend", "seconds", "peak_mib", "vectors_mib", "f1", "same_as_exact"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name(),
                                        "machine": _common.machine_info(), "scale_from": str(args.scale_from),
                                        "scale": rows, "command": " ".join(sys.argv)}, indent=2, default=float))
        return
    groups, X, originals, original_vectors, data = build(args)
    np.savez(args.workdir / "vectors.npz", X=X, y=groups.y)
    print(f"{len(X)} postings in {data['n_groups']} groups + {data['n_groups']} distinct products; generated in "
          f"{data['generate_s']:.1f} s, embedded in {data['embed_s']:.1f} s", flush=True)
    f1_rows = f1_table(groups, X)
    print("\n1. Matching F1, held out (tuned on one half of the groups, scored on the other)\n")
    print(markdown(f1_rows, ["method", "f1", "fit_s", "match_s"]), flush=True)
    dup_rows, dup_info = duplicate_table(groups, X, originals, original_vectors)
    print(f"\n2. Duplicate lookup: {dup_info['feed']} postings looked up in a catalogue of the {dup_info['catalogue']} "
          f"groups' original photos ({dup_info['with_duplicate']} have one there, {dup_info['exact_reuploads']} of "
          "them exact re-uploads)\n")
    print(markdown(dup_rows, ["method", "flagged", "recall", "precision", "label_accuracy", "seconds"]), flush=True)
    best = next(r for r in f1_rows if r["method"] == "CSLS 10, tuned")["tuned"][0]
    scale_rows = []
    if not args.skip_scale:
        print(f"\n3. Scale (CSLS 10, threshold {best['threshold']}, n_neighbors {best['n_neighbors']})", flush=True)
        scale_rows = scale_table(X, groups.y, args, best["threshold"], best["n_neighbors"], 10)
        print(markdown(scale_rows, ["n", "backend", "seconds", "peak_mib", "vectors_mib", "f1", "same_as_exact"]))
    busy_after = _common.busy_cpu_seconds()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name(), "machine": _common.machine_info(),
        "versions": _common.versions(("numpy", "scikit-learn", "faiss-cpu", "imagehash", "torch", "timm")),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {**data, "n_postings": len(X)}, "f1": f1_rows, "duplicates": {"rows": dup_rows, **dup_info},
        "scale": scale_rows, "wall_s": time.time() - started,
        "machine_busy_cpu_s": None if busy is None or busy_after is None else busy_after - busy,
        "command": " ".join(["python", "benchmarks/bench_matching.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    os.replace(tmp, args.out)
    print(f"\nCPU: {result['cpu']}; wrote {args.out}")


if __name__ == "__main__":
    main()
