"""TorchLinearClassifier with its defaults against scikit-learn's lbfgs on the problem the heads issue named.

A synthetic problem of ``--classes`` classes (default 2,000) x ``--rows`` rows
(40,000) x ``--features`` features (256): class means drawn from a standard
normal, rows = mean + noise of ``--noise`` (default 2.0, so that neither head is
perfect), a long-tailed class frequency (Zipf, exponent 1.0) with every class
present at least twice, split 75 / 25 stratified. Both heads see standardised
float32 inputs; ``LogisticRegression`` uses lbfgs with ``--logreg-max-iter``.
The third row pins the torch head's matmuls to float32 (``precision="fp32"``),
to show what the default ``precision="auto"`` (bf16 matmuls on CPUs with AMX or
AVX512-BF16) buys. Each head runs ``--repeats`` times (interleaved); the median fit time is quoted
with the accuracy. Prints a table and writes ``--out``
(default ``benchmarks/results/bench_torch_head.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_torch_head.json"


def problem(args):
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(args.seed)
    weights = 1.0 / np.arange(1, args.classes + 1)
    counts = 2 + rng.multinomial(args.rows - 2 * args.classes, weights / weights.sum())
    y = np.repeat(np.arange(args.classes), counts)
    means = rng.normal(size=(args.classes, args.features)).astype(np.float32)
    X = means[y] + args.noise * rng.normal(size=(len(y), args.features)).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=args.seed)
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    return (X_train - mean) / std, (X_test - mean) / std, y_train, y_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--noise", type=float, default=2.0)
    parser.add_argument("--logreg-max-iter", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from skproduct import TorchLinearClassifier
    from skproduct.image_pipeline.device import cpu_native_bf16

    native_bf16 = cpu_native_bf16()

    X_train, X_test, y_train, y_test = problem(args)
    heads = {
        "TorchLinearClassifier (defaults)": lambda: TorchLinearClassifier(random_state=0),
        "LogisticRegression (lbfgs)": lambda: LogisticRegression(max_iter=args.logreg_max_iter),
        # The same head with its matmuls pinned to float32: what precision="auto" buys on this CPU.
        "TorchLinearClassifier (precision='fp32')": lambda: TorchLinearClassifier(precision="fp32", random_state=0),
    }
    runs: dict[str, list[dict]] = {name: [] for name in heads}
    for _ in range(args.repeats):
        for name, make in heads.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                start = time.perf_counter()
                model = make().fit(X_train, y_train)
                fit_s = time.perf_counter() - start
            runs[name].append({"fit_s": fit_s, "accuracy": float(model.score(X_test, y_test)),
                               "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)})
            print(name, runs[name][-1], flush=True)
    summary = {name: {"median_fit_s": float(np.median([r["fit_s"] for r in rs])),
                      "accuracy": float(np.median([r["accuracy"] for r in rs])), "runs": rs}
               for name, rs in runs.items()}
    torch_name, lbfgs_name, fp32_name = list(heads)
    ratio = summary[lbfgs_name]["median_fit_s"] / summary[torch_name]["median_fit_s"]
    gap = summary[torch_name]["accuracy"] - summary[lbfgs_name]["accuracy"]
    print("| head | test accuracy | fit s (median) |\n| --- | ---: | ---: |")
    for name, s in summary.items():
        print(f"| {name} | {s['accuracy']:.4f} | {s['median_fit_s']:.1f} |")
    fp32_ratio = summary[lbfgs_name]["median_fit_s"] / summary[fp32_name]["median_fit_s"]
    print(f"lbfgs time / torch time: {ratio:.2f}x (with fp32 matmuls {fp32_ratio:.2f}x); "
          f"accuracy torch - lbfgs: {100 * gap:+.2f} points; native bf16 on this CPU: {native_bf16}")
    payload = {"date": time.strftime("%Y-%m-%d"), "machine": _common.machine_info(),
               "versions": _common.versions(("skproduct", "torch", "scikit-learn")),
               "settings": {k: str(v) for k, v in vars(args).items()}, "results": summary,
               "speedup_over_lbfgs": ratio, "fp32_speedup_over_lbfgs": fp32_ratio,
               "accuracy_gap_points": 100 * gap, "cpu_native_bf16": native_bf16}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
