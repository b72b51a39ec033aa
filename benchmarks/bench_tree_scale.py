"""Catalogue scale for :class:`skproduct.heads.TreeHeadClassifier`: a float16 memmap, 5,270 leaves, one epoch.

The data: ``--n`` (default 1,000,000) rows x ``--d`` (256) float16 vectors in a memory-mapped ``.npy`` file on
disk (``--workdir``, default ``/tmp/skproduct-bench-tree-scale``: 512 MB at the defaults), leaves drawn from
Cdiscount's real tree (49 / 486 / 5,270 nodes, ``../shared/data/cdiscount/category_names.csv``) with its real long
tail (``category_counts/``, matched as in ``bench_heads.py``), features nested along the tree (every node a centre,
its parent's plus N(0, 0.3^2); a row its leaf's centre plus N(0, 1) noise).

Each measurement runs in its own Python process, which opens the file with ``numpy.load(mmap_mode="r")``:

* ``fit`` at ``--small`` rows (default 100,000: the first rows of the same file) and at ``--n`` rows: one epoch
  (``max_iter=1``) of ``TreeHeadClassifier(tree, batch_size=1024, device=--device)``, one linear softmax per level
  (49 + 486 + 5,270 outputs); wall time, time per row, peak resident memory (``resource.getrusage``
  ``ru_maxrss``, which counts the memmap's pages read into memory, and ``psutil`` after the fit). The baseline is
  the small fit, measured in the same run: the figure is the ratio of the times per row (target <= 1.3) and the
  peak memory of the large fit (target < 1.5 GB, so no float32 copy of ``X``, 1 GB at the defaults, is made).
* ``predict`` of ``--predict-rows`` (100,000) rows x 5,270 leaves with the model of the small fit, chunked:
  ``predict`` with ``decision="path"`` and with ``decision="crm"``, and ``predict_proba`` into a float64 array
  (which is itself rows x leaves x 8 bytes: 4.2 GB at 100k rows, so it is only timed up to ``--proba-rows``).

Run it from the repository root::

    python benchmarks/bench_tree_scale.py                      # the issue's sizes (~10-20 min on 2 busy cores)
    python benchmarks/bench_tree_scale.py --n 200000 --small 20000 --predict-rows 20000   # a quick look

It prints a table and writes ``benchmarks/results/bench_tree_scale.json`` (``--out``). The machine it was written
on had 2 cores shared with other jobs, so the timings are noisy; rerun on a quiet machine for clean figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import _common  # benchmarks/_common.py, beside this script
import numpy as np

SHARED = Path("/work/shared/data")
CDISCOUNT_TREE = SHARED / "cdiscount" / "category_names.csv"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_tree_scale.json"
DEFAULT_WORKDIR = Path("/tmp/skproduct-bench-tree-scale")
RESULT = "@@RESULT@@"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _common.machine_info()["cpu_model"] or "unknown"


def make_data(workdir: Path, n: int, d: int, seed: int) -> tuple[Path, Path]:
    """Write the float16 memmap and the labels (once per size and seed); return their paths."""
    from bench_heads import cdiscount_leaf_counts

    from skproduct import CategoryTree

    x_path, y_path = workdir / f"X_{n}x{d}_f16_s{seed}.npy", workdir / f"y_{n}_s{seed}.npy"
    if x_path.exists() and y_path.exists():
        return x_path, y_path
    workdir.mkdir(parents=True, exist_ok=True)
    tree = CategoryTree.from_csv(CDISCOUNT_TREE)
    counts, _ = cdiscount_leaf_counts(tree)
    rng = np.random.default_rng(seed)
    codes = tree.encode(tree.leaves)
    centres = np.zeros((len(tree.leaves), d), dtype=np.float32)
    for level in range(tree.depth):
        centres += rng.normal(0.0, 0.3, size=(tree.level_sizes[level], d)).astype(np.float32)[codes[:, level]]
    leaves = rng.choice(len(tree.leaves), size=n, p=counts / counts.sum())
    tmp = x_path.with_name(x_path.name + ".tmp")
    X = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
    step = 65536
    for start in range(0, n, step):
        rows = leaves[start : start + step]
        X[start : start + len(rows)] = centres[rows] + rng.standard_normal((len(rows), d), dtype=np.float32)
    X.flush()
    del X
    os.replace(tmp, x_path)
    np.save(y_path, tree.leaves[leaves])
    return x_path, y_path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    """One measurement, in this fresh process."""
    import pickle

    import psutil
    import torch
    from sklearn.exceptions import ConvergenceWarning

    from skproduct import CategoryTree
    from skproduct.heads import TreeHeadClassifier

    torch.set_num_threads(spec["threads"])
    tree = CategoryTree.from_csv(CDISCOUNT_TREE)
    X = np.load(spec["X"], mmap_mode="r")
    y = np.load(spec["y"])
    rows = spec["rows"]
    out: dict = {"rows": rows, "rss_loaded_mib": psutil.Process().memory_info().rss / 2**20,
                 "peak_loaded_mib": _peak_mib()}
    if spec["mode"] == "fit":
        Xs = X[:rows]  # a memmap view: nothing read yet
        model = TreeHeadClassifier(tree, batch_size=spec["batch_size"], max_iter=1, device=spec["device"],
                                   random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            model.fit(Xs, y[:rows])
            out["fit_s"] = time.perf_counter() - t0
            out["fit_cpu_s"] = time.process_time() - cpu0
        out["s_per_row"] = out["fit_s"] / rows
        out["us_per_row"] = 1e6 * out["s_per_row"]
        out["peak_rss_mib"] = _peak_mib()
        out["rss_after_fit_mib"] = psutil.Process().memory_info().rss / 2**20
        out["x_dtype"], out["x_is_memmap"] = str(Xs.dtype), isinstance(Xs, np.memmap)
        out["train_loss"] = model.loss_curve_[-1]
        blob = pickle.dumps(model)
        out["pickle_mib"] = len(blob) / 2**20
        if spec.get("save"):
            Path(spec["save"]).write_bytes(blob)
    else:
        with open(spec["model"], "rb") as f:
            model = pickle.load(f)
        Xp = X[-rows:]  # rows the small fit did not see
        truth = y[-rows:]
        for decision in ("path", "crm"):
            model.set_params(decision=decision)
            t0 = time.perf_counter()
            predicted = model.predict(Xp)
            out[f"predict_{decision}_s"] = time.perf_counter() - t0
            out[f"accuracy_{decision}"] = float(np.mean(predicted == truth))
            from skproduct.metrics import mistake_severity

            out[f"severity_{decision}"] = mistake_severity(truth, predicted, tree=tree).overall
        proba_rows = min(rows, spec["proba_rows"])
        t0 = time.perf_counter()
        proba = model.predict_proba(Xp[:proba_rows])
        out["predict_proba_s"] = time.perf_counter() - t0
        out["predict_proba_rows"] = proba_rows
        out["proba_shape"] = list(proba.shape)
        del proba
        out["peak_rss_mib"] = _peak_mib()
    return out


def launch(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--_child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT):])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--predict-rows", type=int, default=100_000)
    parser.add_argument("--proba-rows", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args._child:
        print(RESULT + json.dumps(child(json.loads(args._child))), flush=True)
        return 0

    machine = _common.machine_info()
    machine["lscpu_model_name"] = cpu_name()
    busy0, wall0 = _common.busy_cpu_seconds(), time.perf_counter()
    t0 = time.perf_counter()
    x_path, y_path = make_data(args.workdir, args.n, args.d, args.seed)
    make_s = time.perf_counter() - t0
    print(f"data: {x_path} ({x_path.stat().st_size / 2**20:.0f} MiB, float16 {args.n} x {args.d}), "
          f"made in {make_s:.0f} s; CPU {machine['lscpu_model_name']}", flush=True)
    base = {"X": str(x_path), "y": str(y_path), "threads": args.threads, "device": args.device,
            "batch_size": args.batch_size}
    model_path = args.workdir / "model_small.pkl"
    small = launch({**base, "mode": "fit", "rows": args.small, "save": str(model_path)})
    print(f"fit {args.small} rows: {small['fit_s']:.1f} s ({small['us_per_row']:.1f} us/row), "
          f"peak RSS {small['peak_rss_mib']:.0f} MiB", flush=True)
    large = launch({**base, "mode": "fit", "rows": args.n})
    print(f"fit {args.n} rows: {large['fit_s']:.1f} s ({large['us_per_row']:.1f} us/row), "
          f"peak RSS {large['peak_rss_mib']:.0f} MiB", flush=True)
    predict = launch({**base, "mode": "predict", "rows": args.predict_rows, "model": str(model_path),
                      "proba_rows": args.proba_rows})
    busy1, wall1 = _common.busy_cpu_seconds(), time.perf_counter()
    ratio = large["s_per_row"] / small["s_per_row"]
    rows = [
        ["fit, 1 epoch", f"{args.small:,}", f"{small['fit_s']:.1f}", f"{small['us_per_row']:.1f}",
         f"{small['peak_rss_mib']:.0f}", "baseline"],
        ["fit, 1 epoch", f"{args.n:,}", f"{large['fit_s']:.1f}", f"{large['us_per_row']:.1f}",
         f"{large['peak_rss_mib']:.0f}", f"per-row ratio {ratio:.2f} (target <= 1.3); peak < 1536 MiB: "
         f"{'met' if large['peak_rss_mib'] < 1536 else 'NOT met'}"],
        ["predict path", f"{args.predict_rows:,}", f"{predict['predict_path_s']:.1f}",
         f"{1e6 * predict['predict_path_s'] / args.predict_rows:.1f}", f"{predict['peak_rss_mib']:.0f}",
         f"leaf acc {predict['accuracy_path']:.3f}, severity {predict['severity_path']:.3f}"],
        ["predict crm", f"{args.predict_rows:,}", f"{predict['predict_crm_s']:.1f}",
         f"{1e6 * predict['predict_crm_s'] / args.predict_rows:.1f}", "", f"leaf acc {predict['accuracy_crm']:.3f}, "
         f"severity {predict['severity_crm']:.3f}"],
        ["predict_proba", f"{predict['predict_proba_rows']:,}", f"{predict['predict_proba_s']:.1f}",
         f"{1e6 * predict['predict_proba_s'] / predict['predict_proba_rows']:.1f}", "", "float64 rows x 5,270 out"],
    ]
    header = ["what", "rows", "s", "us/row", "peak MiB", "note"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])
    other = None if busy0 is None else max(0.0, (busy1 - busy0) - (wall1 - wall0) * 0)  # whole-machine busy CPU-s
    print(table)
    print(f"machine busy {other:.0f} CPU-s over {wall1 - wall0:.0f} s wall ({os.cpu_count()} CPUs; this run used at "
          f"most {args.threads} threads): timings are noisy when other jobs run.")
    result = {
        "benchmark": "bench_tree_scale",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/bench_tree_scale.py", *raw]),
        "machine": machine,
        "versions": _common.versions(("skproduct", "numpy", "scipy", "scikit-learn", "torch")),
        "settings": vars(args) | {"workdir": str(args.workdir), "out": str(args.out)},
        "data": {"file": str(x_path), "bytes": x_path.stat().st_size, "make_s": make_s},
        "fit_small": small, "fit_large": large, "predict": predict,
        "per_row_ratio_large_over_small": ratio,
        "machine_busy_cpu_s": other, "wall_s": wall1 - wall0,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
