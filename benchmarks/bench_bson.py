"""Benchmark :func:`skproduct.io.read_bson` against a full ``bson.decode_file_iter`` pass.

For each BSON file (the real ``fashion_small.bson`` and a generated file of at
least ``--size-gb`` GiB with realistic 2-10 KB JPEG pictures, 1-4 per product)
it measures

1. the baseline: one full ``for doc in bson.decode_file_iter(f)`` pass that
   counts the documents;
2. first open: ``read_bson(path, index_path=..., rebuild_index=True)`` (scan
   the file and write the sidecar index);
3. re-open: ``read_bson(path, index_path=...)`` with the sidecar present;
4. random access: the latency of reading all the pictures of one random
   product (``[r.read_bytes() for r in df["images"].iloc[i]]``), median and
   95th percentile over ``--n-random`` random products;
5. peak memory: the first open, the re-open and the ``decode_file_iter`` pass
   each run in a fresh subprocess, which reports its ``ru_maxrss`` minus its
   own baseline taken after the imports and a warm-up on a tiny file;

and checks the issue's targets: first open at least 2x faster than the
``decode_file_iter`` pass, re-open at least 100x faster than the full pass,
peak memory far below (here: at most 10% of) the file size.

Every file is read once before it is timed, so all the methods are measured
with the file warm in the page cache (a cold cache is not measured). Times are
the best of ``--repeat`` runs (the medians are in the JSON too); the ratios use
the best times.

The generated file, its parameters (``<file>.json``) and the sidecar indexes go
to ``--workdir`` (default ``<system temp dir>/skproduct-bench``); a generated
file that already exists with the recorded parameters and size is reused.
Nothing is written next to the shared data.

Run it from the repository root::

    python benchmarks/bench_bson.py --size-gb 1
    python benchmarks/bench_bson.py --skip-generated          # fashion_small only
    python benchmarks/bench_bson.py --workdir /scratch/bench --repeat 5

It prints a table and writes the figures, with the machine's description, to
``--out`` (default ``benchmarks/results/bench_bson.json``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bson
import numpy as np
import pandas as pd
import pymongo

import skproduct
from skproduct.io import read_bson
import _common  # benchmarks/_common.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path("/work/shared/data")
FASHION_SMALL = SHARED / "fashion-small" / "fashion_small.bson"
TRAIN_EXAMPLE = SHARED / "cdiscount" / "train_example.bson"
CATEGORY_NAMES = SHARED / "cdiscount" / "category_names.csv"
CATEGORY_COUNTS = SHARED / "cdiscount" / "category_counts" / "category_count_level3.csv"

# Targets of the issue.
TARGET_FIRST_OPEN_SPEEDUP = 2.0  # decode_file_iter pass / first open
TARGET_REOPEN_SPEEDUP = 100.0  # full pass / re-open
TARGET_MEMORY_FRACTION = 0.10  # peak memory of first open / file size ("far below")

# Cdiscount's train.bson: 7,069,896 products with 1, 2, 3 and 4 pictures:
# 4,369,441 / 1,128,588 / 542,792 / 1,029,075.
N_PICTURES_PROBABILITY = np.array([4369441, 1128588, 542792, 1029075], dtype=float)
N_PICTURES_PROBABILITY /= N_PICTURES_PROBABILITY.sum()

GENERATOR_VERSION = 1
PICTURE_MIN_BYTES = 2 * 1024
PICTURE_MAX_BYTES = 10 * 1024
POOL_SIZE = 320

MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# Generating the big file
# ---------------------------------------------------------------------------
def _picture_pool(rng: np.random.Generator, pool_size: int = POOL_SIZE) -> list[bytes]:
    """JPEGs of 2-10 KB, spread evenly over that range, from train_example's real pictures.

    Each real 180x180 picture is decoded and re-encoded many times with a
    random crop, a random output size (96-300 px) and a random JPEG quality
    (35-95); the candidates are binned by size in 1 KB bins and the pool takes
    the same number from every bin.
    """
    from PIL import Image

    with open(TRAIN_EXAMPLE, "rb") as f:
        sources = [
            Image.open(io.BytesIO(img["picture"])).convert("RGB")
            for doc in bson.decode_file_iter(f)
            for img in doc["imgs"]
        ]
    n_bins = (PICTURE_MAX_BYTES - PICTURE_MIN_BYTES) // 1024
    per_bin = -(-pool_size // n_bins)
    bins: list[list[bytes]] = [[] for _ in range(n_bins)]
    attempts = 0
    while min(len(b) for b in bins) < per_bin and attempts < 50 * pool_size:
        attempts += 1
        image = sources[rng.integers(len(sources))]
        w, h = image.size
        crop = rng.uniform(0.6, 1.0)
        cw, ch = int(w * crop), int(h * crop)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        side = int(rng.integers(96, 301))
        variant = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            variant = variant.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        variant.save(buffer, format="JPEG", quality=int(rng.integers(35, 96)))
        data = buffer.getvalue()
        if PICTURE_MIN_BYTES <= len(data) < PICTURE_MAX_BYTES:
            k = (len(data) - PICTURE_MIN_BYTES) // 1024
            if len(bins[k]) < per_bin:
                bins[k].append(data)
    pool = [data for b in bins for data in b]
    if len(pool) < pool_size // 2:
        raise RuntimeError(f"could only make {len(pool)} pictures of 2-10 KB")
    return pool


def _category_ids() -> tuple[np.ndarray, np.ndarray]:
    """Cdiscount's category ids, weighted by their level-3 product counts when known."""
    counts: dict[str, int] = {}
    if CATEGORY_COUNTS.is_file():
        with open(CATEGORY_COUNTS, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[-1].strip().isdigit():
                    counts[",".join(row[:-1]).strip()] = int(row[-1])
    ids, weights = [], []
    with open(CATEGORY_NAMES, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ids.append(int(row["category_id"]))
            weights.append(max(counts.get(row["category_level3"].strip(), 1), 1))
    weights_arr = np.asarray(weights, dtype=float)
    return np.asarray(ids, dtype=np.int64), weights_arr / weights_arr.sum()


def generated_file(workdir: Path, size_gb: float, seed: int = 0) -> tuple[Path, dict]:
    """Return the generated file of at least ``size_gb`` GiB, writing it unless it already exists."""
    path = workdir / f"synthetic_{size_gb:g}gb.bson"
    meta_path = path.with_name(path.name + ".json")
    params = {"generator_version": GENERATOR_VERSION, "size_gb": size_gb, "seed": seed}
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("params") == params and meta.get("file_size") == path.stat().st_size:
            print(f"reusing {path} ({meta['file_size'] / MIB:.0f} MiB, {meta['n_products']} products)")
            return path, meta
    print(f"generating {path} (at least {size_gb:g} GiB) ...", flush=True)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pool = _picture_pool(rng)
    category_ids, category_p = _category_ids()
    target = int(size_gb * 1024**3)
    tmp = path.with_name(path.name + ".tmp")
    written = n_products = n_pictures = 0
    product_id = 0
    with open(tmp, "wb") as f:
        while written < target:
            chunk = 10_000
            n_pics = rng.choice(4, size=chunk, p=N_PICTURES_PROBABILITY) + 1
            cats = rng.choice(category_ids, size=chunk, p=category_p)
            gaps = rng.integers(1, 4, size=chunk)
            picks = rng.integers(len(pool), size=(chunk, 4))
            for k in range(chunk):
                product_id += int(gaps[k])
                doc = {
                    "_id": product_id,
                    "imgs": [{"picture": pool[j]} for j in picks[k, : n_pics[k]]],
                    "category_id": int(cats[k]),
                }
                data = bson.encode(doc)
                f.write(data)
                written += len(data)
                n_products += 1
                n_pictures += int(n_pics[k])
                if written >= target:
                    break
    os.replace(tmp, path)
    sizes = np.array([len(p) for p in pool])
    meta = {
        "params": params,
        "file_size": path.stat().st_size,
        "n_products": n_products,
        "n_pictures": n_pictures,
        "picture_pool": {
            "n": len(pool),
            "min_bytes": int(sizes.min()),
            "median_bytes": int(np.median(sizes)),
            "max_bytes": int(sizes.max()),
        },
        "n_pictures_probability": [round(p, 4) for p in N_PICTURES_PROBABILITY],
        "n_categories": len(category_ids),
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": round(time.perf_counter() - start, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"  wrote {meta['file_size'] / MIB:.0f} MiB, {n_products} products, {n_pictures} pictures "
          f"in {meta['generation_seconds']} s")
    return path, meta


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------
def warm_page_cache(path: Path) -> float:
    """Read the whole file once so that every method finds it in the page cache; return MiB/s."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MIB):
            pass
    return path.stat().st_size / MIB / (time.perf_counter() - start)


def decode_file_iter_pass(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for _doc in bson.decode_file_iter(f):
            n += 1
    return n


def _timed(function, repeat: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result


def _summary(times: list[float]) -> dict:
    return {"best_s": min(times), "median_s": statistics.median(times), "all_s": times}


def _expected_pictures(path: Path, rows: np.ndarray) -> dict[int, list[bytes]]:
    """The pictures of the products at ``rows`` (positions in file order), by decode_file_iter."""
    wanted = set(int(r) for r in rows)
    found: dict[int, list[bytes]] = {}
    with open(path, "rb") as f:
        for position, doc in enumerate(bson.decode_file_iter(f)):
            if position in wanted:
                found[position] = [img["picture"] for img in doc["imgs"]]
    return found


def random_access(df: pd.DataFrame, n: int, rng: np.random.Generator) -> dict:
    images = df["images"]
    rows = rng.integers(len(df), size=n)
    for i in rows[:50]:  # warm up
        [r.read_bytes() for r in images.iloc[i]]
    latencies = np.empty(n)
    n_pictures = n_bytes = 0
    for k, i in enumerate(rows):
        start = time.perf_counter_ns()
        pictures = [r.read_bytes() for r in images.iloc[i]]
        latencies[k] = (time.perf_counter_ns() - start) / 1000
        n_pictures += len(pictures)
        n_bytes += sum(len(p) for p in pictures)
    return {
        "n_products": n,
        "median_us": float(np.median(latencies)),
        "p95_us": float(np.percentile(latencies, 95)),
        "mean_pictures_per_product": n_pictures / n,
        "mean_bytes_per_product": n_bytes / n,
    }


def verify(path: Path, df: pd.DataFrame, n_docs: int, rng: np.random.Generator, n: int = 200) -> dict:
    """Check read_bson against decode_file_iter: product count and the bytes of random products."""
    if len(df) != n_docs:
        raise AssertionError(f"read_bson found {len(df)} products, decode_file_iter {n_docs}")
    rows = np.unique(rng.integers(len(df), size=n))
    expected = _expected_pictures(path, rows)
    for i in rows:
        got = [r.read_bytes() for r in df["images"].iloc[int(i)]]
        if got != expected[int(i)]:
            raise AssertionError(f"the pictures of product at row {i} differ from decode_file_iter's")
    return {"n_products_checked": len(rows), "ok": True}


# -- peak memory, in fresh subprocesses -------------------------------------
def _maxrss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (MIB if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _rss_anon_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _AnonSampler(threading.Thread):
    """Samples the process's anonymous RSS (Linux), to tell heap from file-backed pages."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, _rss_anon_mib(), threading.Event()

    def run(self):
        while not self._halt.is_set():
            value = _rss_anon_mib()
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value
            time.sleep(self.interval)

    def stop(self) -> float | None:
        self._halt.set()
        self.join()
        value = _rss_anon_mib()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value
        return self.peak


def _proc_status_mib(*fields: str) -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in fields:
                    values[name] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return values


def _reset_high_water_mark() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(mode: str, path: str, index_path: str, warmup_index: str) -> None:
    """Run one method in this (fresh) process and print its peak memory as JSON."""
    operations = {
        "decode_file_iter": lambda p, idx: decode_file_iter_pass(Path(p)),
        "first_open": lambda p, idx: read_bson(p, index_path=idx, rebuild_index=True),
        "reopen": lambda p, idx: read_bson(p, index_path=idx),
    }
    operation = operations[mode]
    if TRAIN_EXAMPLE.is_file():  # load what is imported lazily, so the baseline includes it
        for _ in range(2):
            warm = operation(str(TRAIN_EXAMPLE), warmup_index)
        del warm
    gc.collect()
    baseline, anon_baseline = _maxrss_mib(), _rss_anon_mib()
    hwm_reset = _reset_high_water_mark()
    rss_baseline = _proc_status_mib("VmRSS").get("VmRSS")
    sampler = _AnonSampler()
    sampler.start()
    start = time.perf_counter()
    result = operation(path, index_path)  # noqa: F841 - kept alive: its memory is what callers hold
    seconds = time.perf_counter() - start
    anon_peak = sampler.stop()
    peak = _maxrss_mib()
    hwm = _proc_status_mib("VmHWM").get("VmHWM")
    print(json.dumps({
        "mode": mode,
        "baseline_maxrss_mib": baseline,
        "maxrss_mib": peak,
        "peak_mib": peak - baseline,
        "peak_hwm_mib": hwm - rss_baseline if hwm_reset and hwm is not None and rss_baseline else None,
        "peak_anon_mib": None if anon_peak is None or anon_baseline is None else anon_peak - anon_baseline,
        "seconds": seconds,
    }))


def peak_memory(mode: str, path: Path, index_path: Path, workdir: Path) -> dict:
    command = [
        sys.executable, os.path.abspath(__file__), "--_child", mode,
        "--_path", str(path), "--_index", str(index_path),
        "--_warmup-index", str(workdir / "index" / f"warmup-{mode}.skpidx"),
    ]
    if os.name == "posix" and os.path.exists("/bin/sh"):
        # Start the child from a forked shell, not straight from this process: a
        # process started by (v)fork + exec inherits its parent's ru_maxrss,
        # which would hide the child's own peak under this process's.
        command = ["/bin/sh", "-c", '"$@" & wait $!', "sh", *command]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {mode} subprocess failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def bench_file(path: Path, label: str, workdir: Path, repeat: int, n_random: int, seed: int) -> dict:
    print(f"\n== {label}: {path}", flush=True)
    size = path.stat().st_size
    index_path = workdir / "index" / f"{label}.skpidx"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    warm_mib_s = warm_page_cache(path)
    print(f"  warmed the page cache (read the file once at {warm_mib_s:.0f} MiB/s)", flush=True)

    decode_times, n_docs = _timed(lambda: decode_file_iter_pass(path), repeat)
    print(f"  decode_file_iter pass: {n_docs} documents, best {min(decode_times):.3f} s", flush=True)

    first_times, df = _timed(lambda: read_bson(path, index_path=index_path, rebuild_index=True), repeat)
    del df
    print(f"  first open:            best {min(first_times):.3f} s", flush=True)

    reopen_repeat = max(repeat, 10)  # cheap, and short times are noisy
    reopen_times, df = _timed(lambda: read_bson(path, index_path=index_path), reopen_repeat)
    print(f"  re-open:               best {min(reopen_times) * 1000:.2f} ms", flush=True)

    access = random_access(df, n_random, rng)
    print(f"  random access:         median {access['median_us']:.1f} us, p95 {access['p95_us']:.1f} us",
          flush=True)
    check = verify(path, df, n_docs, rng)
    print(f"  verified {check['n_products_checked']} random products against decode_file_iter", flush=True)
    n_products, n_pictures = len(df), int(df["n_images"].sum())
    del df
    gc.collect()

    memory = {
        mode: peak_memory(mode, path, index_path, workdir)
        for mode in ("decode_file_iter", "first_open", "reopen")
    }
    print("  peak memory (MiB):     " + ", ".join(f"{m} {r['peak_mib']:.1f}" for m, r in memory.items()),
          flush=True)

    decode, first, reopen = _summary(decode_times), _summary(first_times), _summary(reopen_times)
    first_speedup = decode["best_s"] / first["best_s"]
    reopen_speedup = decode["best_s"] / reopen["best_s"]
    memory_fraction = memory["first_open"]["peak_mib"] / (size / MIB)
    return {
        "label": label,
        "path": str(path),
        "file_size_bytes": size,
        "file_size_mib": size / MIB,
        "n_products": n_products,
        "n_pictures": n_pictures,
        "page_cache": f"warm (file read once at {warm_mib_s:.0f} MiB/s before timing)",
        "decode_file_iter": decode,
        "first_open": first,
        "reopen": {**reopen, "repeat": reopen_repeat},
        "random_access": access,
        "verification": check,
        "peak_memory": memory,
        "ratios": {
            "decode_over_first_open": first_speedup,
            "full_pass_over_reopen": reopen_speedup,
            "first_open_peak_memory_over_file_size": memory_fraction,
        },
        "targets": {
            "first_open_at_least_2x_faster": first_speedup >= TARGET_FIRST_OPEN_SPEEDUP,
            "reopen_at_least_100x_faster": reopen_speedup >= TARGET_REOPEN_SPEEDUP,
            "peak_memory_at_most_10pct_of_file": memory_fraction <= TARGET_MEMORY_FRACTION,
        },
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _met(flag: bool) -> str:
    return "MET" if flag else "NOT MET"


def format_table(results: list[dict]) -> str:
    rows: list[tuple[str, list[str]]] = [
        ("file", [r["label"] for r in results]),
        ("size (MiB)", [f"{r['file_size_mib']:.1f}" for r in results]),
        ("products / pictures", [f"{r['n_products']} / {r['n_pictures']}" for r in results]),
        ("decode_file_iter pass (s)", [f"{r['decode_file_iter']['best_s']:.3f}" for r in results]),
        ("first open, rebuild (s)", [f"{r['first_open']['best_s']:.3f}" for r in results]),
        ("re-open with sidecar (ms)", [f"{r['reopen']['best_s'] * 1000:.2f}" for r in results]),
        ("random product, median (us)", [f"{r['random_access']['median_us']:.1f}" for r in results]),
        ("random product, p95 (us)", [f"{r['random_access']['p95_us']:.1f}" for r in results]),
        ("peak mem decode_file_iter (MiB)", [f"{r['peak_memory']['decode_file_iter']['peak_mib']:.1f}"
                                             for r in results]),
        ("peak mem first open (MiB)", [f"{r['peak_memory']['first_open']['peak_mib']:.1f}" for r in results]),
        ("peak mem re-open (MiB)", [f"{r['peak_memory']['reopen']['peak_mib']:.1f}" for r in results]),
        ("decode / first open (>= 2x)", [
            f"{r['ratios']['decode_over_first_open']:.2f}x {_met(r['targets']['first_open_at_least_2x_faster'])}"
            for r in results]),
        ("full pass / re-open (>= 100x)", [
            f"{r['ratios']['full_pass_over_reopen']:.0f}x {_met(r['targets']['reopen_at_least_100x_faster'])}"
            for r in results]),
        ("peak mem / file size (<= 10%)", [
            f"{100 * r['ratios']['first_open_peak_memory_over_file_size']:.1f}% "
            f"{_met(r['targets']['peak_memory_at_most_10pct_of_file'])}"
            for r in results]),
    ]
    first_width = max(len(name) for name, _ in rows)
    widths = [max(len(values[k]) for _, values in rows) for k in range(len(results))]
    lines = []
    for n, (name, values) in enumerate(rows):
        lines.append("  ".join([name.ljust(first_width)] + [v.rjust(w) for v, w in zip(values, widths)]))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def machine_info() -> dict:
    return {
        **_common.machine_info(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pymongo": pymongo.version,
        "bson_c_extension": bson.has_c(),
        "skproduct": getattr(skproduct, "__version__", None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="size of the generated file in GiB (default 1.0)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "skproduct-bench",
                        help="where the generated file and the sidecar indexes go "
                             "(default <temp dir>/skproduct-bench)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each method; the best is reported (default 3)")
    parser.add_argument("--n-random", type=int, default=2000,
                        help="random products read for the access latency (default 2000)")
    parser.add_argument("--skip-generated", action="store_true", help="benchmark fashion_small.bson only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated file and the random rows")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "bench_bson.json",
                        help="JSON file of the results (default benchmarks/results/bench_bson.json)")
    parser.add_argument("--_child", choices=("decode_file_iter", "first_open", "reopen"), help=argparse.SUPPRESS)
    parser.add_argument("--_path", help=argparse.SUPPRESS)
    parser.add_argument("--_index", help=argparse.SUPPRESS)
    parser.add_argument("--_warmup-index", dest="_warmup_index", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        child(args._child, args._path, args._index, args._warmup_index)
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    workdir = args.workdir.resolve()
    if workdir == SHARED or SHARED in workdir.parents:
        parser.error("--workdir must not be inside the shared (read-only) data folder")
    workdir.mkdir(parents=True, exist_ok=True)

    files: list[tuple[Path, str, dict | None]] = [(FASHION_SMALL, "fashion_small", None)]
    if not args.skip_generated:
        path, meta = generated_file(workdir, args.size_gb, seed=args.seed)
        files.append((path, path.stem, meta))

    results = []
    for path, label, meta in files:
        result = bench_file(path, label, workdir, args.repeat, args.n_random, args.seed)
        if meta is not None:
            result["generated"] = meta
        results.append(result)

    table = format_table(results)
    print()
    print("read_bson vs bson.decode_file_iter (files warm in the page cache; times are the best of "
          f"{args.repeat} runs, re-open of max({args.repeat}, 10); peak memory = ru_maxrss of a fresh "
          "subprocess minus its baseline after imports)")
    print(table)

    report = {
        "benchmark": "bench_bson",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "repeat": args.repeat,
            "n_random": args.n_random,
            "seed": args.seed,
            "size_gb": None if args.skip_generated else args.size_gb,
            "workdir": str(workdir),
            "page_cache": "warm: every file is read once before it is timed",
            "timing": "best of --repeat runs (median also given); re-open runs max(repeat, 10) times",
            "peak_memory": "ru_maxrss of a fresh subprocess minus its ru_maxrss after imports and a "
                           "warm-up on train_example.bson; peak_anon_mib is the sampled anonymous RSS",
        },
        "targets": {
            "decode_over_first_open_at_least": TARGET_FIRST_OPEN_SPEEDUP,
            "full_pass_over_reopen_at_least": TARGET_REOPEN_SPEEDUP,
            "first_open_peak_memory_over_file_size_at_most": TARGET_MEMORY_FRACTION,
        },
        "results": results,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
