"""Choose :class:`skproduct.FineTuneClassifier`'s default learning rate and augmentation, from scratch and pretrained.

Two problems on fashion-small (``../shared/data/fashion-small``), each a fixed
slice of the most frequent leaves, the training products and the held-out ones
disjoint:

* ``scratch``: the issue's case: 4 leaves, 600 training products, 600
  held-out, ``timm:test_resnet`` from random weights at 64 px, 4 epochs;
* ``pretrained``: 20 leaves, 600 training products, 1,000 held-out,
  ``timm:tf_efficientnet_lite0`` from the real ImageNet weights
  (``benchmarks/_real_weights.py``) at 112 px, 2 epochs.

Every other parameter keeps its default (early stopping on a 10% hold-out
included). Each configuration (a learning rate, or ``"auto"``, and
``augment``) is fitted with ``--seeds`` random states and the held-out leaf
accuracy is reported as mean and standard deviation, with the fit seconds.
``--batch-sizes`` repeats ``learning_rate="auto"`` at other batch sizes (the
rule scales with the batch). Writes ``--out`` (default
``benchmarks/results/bench_finetune_defaults.json``).

Run ``python benchmarks/bench_finetune_defaults.py`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # benchmarks/_common.py, beside this script
import _real_weights

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-small"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_finetune_defaults.json"
PROBLEMS = {
    "scratch": {"leaves": 4, "n_train": 600, "n_test": 600, "backbone": "timm:test_resnet", "image_size": 64,
                "max_iter": 4},
    "pretrained": {"leaves": 20, "n_train": 600, "n_test": 1000, "backbone": _real_weights.BACKBONE,
                   "image_size": 112, "max_iter": 2},
}


def slice_of(products, leaves: int, n_train: int, n_test: int):
    """The ``n_train`` + ``n_test`` first products (in a fixed shuffle) of the ``leaves`` most frequent leaves."""
    labels = products["category_id"].to_numpy()
    values, counts = np.unique(labels, return_counts=True)
    keep = values[np.argsort(-counts, kind="stable")[:leaves]]
    chosen = np.random.default_rng(0).permutation(np.flatnonzero(np.isin(labels, keep)))
    return products.iloc[np.sort(chosen[:n_train])], products.iloc[np.sort(chosen[n_train : n_train + n_test])]


def run(problem: dict, train, test, weights, *, learning_rate, augment, batch_size: int, seed: int) -> dict:
    from skproduct import FineTuneClassifier

    model = FineTuneClassifier(
        problem["backbone"], pretrained=weights is not None, weights=weights, image_size=problem["image_size"],
        max_iter=problem["max_iter"], learning_rate=learning_rate, augment=augment, batch_size=batch_size,
        random_state=seed,
    )
    start = time.perf_counter()
    model.fit(train, train["category_id"].to_numpy())
    fit_s = time.perf_counter() - start
    accuracy = float(np.mean(model.predict(test) == test["category_id"].to_numpy()))
    return {"accuracy": accuracy, "fit_s": fit_s, "epochs_run": len(model.history_)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-rates", default="3e-4,1e-3,3e-3,1e-2,auto")
    parser.add_argument("--batch-sizes", default="16,64", help="extra batch sizes for learning_rate='auto'")
    parser.add_argument("--problems", default="scratch,pretrained")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from skproduct import read_bson

    rates = [r if r == "auto" else float(r) for r in args.learning_rates.split(",")]
    results = {"machine": _common.machine_info(), "problems": PROBLEMS, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        products = read_bson(DATA / "fashion_small.bson", index_path=Path(work) / "fashion_small.skpidx")
        weights_file = _real_weights.real_weights_file(work)
        for name in args.problems.split(","):
            problem = PROBLEMS[name]
            train, test = slice_of(products, problem["leaves"], problem["n_train"], problem["n_test"])
            weights = weights_file if name == "pretrained" else None
            configs = [(rate, augment, 32) for rate in rates for augment in (True, False)]
            configs += [("auto", True, int(b)) for b in args.batch_sizes.split(",") if b]
            for rate, augment, batch_size in configs:
                runs = [run(problem, train, test, weights, learning_rate=rate, augment=augment,
                            batch_size=batch_size, seed=seed) for seed in range(args.seeds)]
                accuracy = [r["accuracy"] for r in runs]
                row = {"problem": name, "learning_rate": rate, "augment": augment, "batch_size": batch_size,
                       "accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
                       "fit_s_mean": float(np.mean([r["fit_s"] for r in runs])), "runs": runs}
                results["runs"].append(row)
                print(f"{name:10s} lr={rate!s:7s} augment={augment!s:5s} batch={batch_size:3d}  "
                      f"accuracy {row['accuracy_mean']:.3f} +- {row['accuracy_std']:.3f}  "
                      f"fit {row['fit_s_mean']:.1f} s", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2, default=str))  # after every row: a kill keeps them
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
