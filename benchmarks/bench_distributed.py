"""Benchmark distributed extraction (:mod:`skproduct.distributed`) against the single-process path.

On a generated catalogue in Cdiscount's BSON layout (``--products`` products,
1-4 pictures each in Cdiscount's proportions, every picture a distinct
180x180 JPEG, so that the content-keyed cache deduplicates nothing), it
measures, in one run:

1. **single process**: ``ImageEmbedder(...).fit_transform(frame)`` with a
   fresh cache folder (the baseline);
2. **cluster, 1 and 2 workers**: the same call inside
   ``skproduct.distributed.cluster(client)`` on a ``local_cluster(n)``
   (single-threaded worker processes, BLAS/OpenMP/torch threads pinned to the
   CPUs shared out between the workers), each with a fresh cache folder, after
   a warm-up run on other pictures (the workers' imports and backbone are
   built once; the warm-up time is reported apart);
3. **scheduler overhead per shard** at ``--shard-sizes``, on one worker:
   ``(wall time of the distributed extraction - time the worker spent inside
   its shards) / shards``; and the bare round trip of a no-op Dask task
   (``client.submit`` + ``result``, and 500 no-op tasks in flight at once);
4. **implied scaling to N GPUs**: with the calling process's serial time per
   picture at scale (a fully cached transform of ``--serial-products``
   products: keys, lookups, pooling, which a distributed run does too), the
   overhead per shard measured at each shard size, the scheduler's time per
   task, and a per-picture compute time (this CPU's, and
   ``--gpu-images-per-second`` for one GPU), the model
   ``T(N) = n * serial + max(shards * scheduler, (n * compute + shards * overhead) / N)``
   gives the speed-up over one process for N workers, on Cdiscount's 12.4M
   pictures.

On 2 busy cores the speed-up of 2 workers is bounded by the cores (and by the
other processes on the machine); the overhead per shard is what carries over
to a cluster of GPUs. Timings are noisy on a shared machine: the JSON keeps
every run.

Run it from the repository root::

    python benchmarks/bench_distributed.py                        # 600 products, resnet18 at 128 px
    python benchmarks/bench_distributed.py --products 200 --model test_resnet --image-size 64   # quick
    python benchmarks/bench_distributed.py --products 4000 --shard-sizes 16,64,256,1024

It prints a table and writes the figures, with the machine's description, to
``--out`` (default ``benchmarks/results/bench_distributed.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # benchmarks/_common.py, beside this script
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
N_PICTURES_PROBABILITY = np.array([4369441, 1128588, 542792, 1029075], dtype=float)  # Cdiscount's 1..4 pictures
N_PICTURES_PROBABILITY /= N_PICTURES_PROBABILITY.sum()


def cpu_name() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return None


def generate_catalogue(path: Path, n_products: int, seed: int) -> dict:
    """A BSON catalogue of ``n_products`` products whose every picture is a distinct 180x180 JPEG."""
    import bson
    from PIL import Image

    rng = np.random.default_rng(seed)
    n_pictures = 0
    with open(path, "wb") as f:
        for product in range(n_products):
            pictures = []
            for _ in range(int(rng.choice(4, p=N_PICTURES_PROBABILITY)) + 1):
                coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((180, 180), Image.BILINEAR)
                noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (180, 180, 3)), 0, 255)
                buffer = io.BytesIO()
                Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=85)
                pictures.append({"picture": buffer.getvalue()})
            f.write(bson.encode({"_id": product + 1, "imgs": pictures, "category_id": 1000 + product % 7}))
            n_pictures += len(pictures)
    return {"products": n_products, "pictures": n_pictures, "bytes": path.stat().st_size}


def _embedder(args, cache):
    from skproduct import ImageEmbedder

    return ImageEmbedder(f"timm:{args.model}", pretrained=False, image_size=args.image_size,
                         batch_size=args.batch_size, device="cpu", precision="fp32", cache=cache)


def single_process(args, frame, warm_frame, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    _embedder(args, workdir / f"single-warm-{time.time_ns()}").fit_transform(warm_frame)  # imports, first forward
    warm_up = time.perf_counter() - start
    embedder = _embedder(args, workdir / f"single-{time.time_ns()}").fit()
    start = time.perf_counter()
    vectors = embedder.transform(frame)
    return {"seconds": time.perf_counter() - start, "warm_up_seconds": warm_up, "vectors": vectors}


def on_cluster(args, frame, warm_frame, workdir: Path, n_workers: int, shard_sizes: list[int]) -> dict:
    from distributed import Client

    import skproduct.distributed as skd

    out: dict = {"workers": n_workers, "runs": []}
    with skd.local_cluster(n_workers) as cluster, Client(cluster) as client:
        start = time.perf_counter()
        with skd.cluster(client, shard_size=max(4, len(warm_frame) // n_workers)):
            _embedder(args, workdir / f"warm-{n_workers}-{time.time_ns()}").fit_transform(warm_frame)
        out["warm_up_seconds"] = time.perf_counter() - start
        for shard_size in shard_sizes:
            embedder = _embedder(args, workdir / f"cluster-{n_workers}-{shard_size}-{time.time_ns()}").fit()
            with skd.cluster(client, shard_size=shard_size) as config:
                start = time.perf_counter()
                vectors = embedder.transform(frame)
                seconds = time.perf_counter() - start
            run = config.runs[-1]
            inside = sum(r["seconds"] for r in run["shard_reports"])
            out["runs"].append({
                "shard_size": shard_size, "shards": run["shards"], "seconds": seconds,
                "distributed_seconds": run["seconds"], "worker_seconds": inside,
                "setup_seconds": run["setup_seconds"], "tasks_seconds": run["tasks_seconds"],
                "read_back_seconds": run["read_back_seconds"],
                "driver_serial_seconds": seconds - run["seconds"],
                # the time the tasks took beyond the work inside them, per shard (scheduling, transfers, results)
                "overhead_per_shard_ms": 1000 * (run["tasks_seconds"] - inside / n_workers) / run["shards"],
                "forward_rows": run["forward_rows"], "vectors": vectors,
            })
        if n_workers == 1:
            out["noop"] = noop_overhead(client)
    return out


def noop_overhead(client, n: int = 500) -> dict:
    def noop(i):
        return i

    for i in range(20):  # warm-up
        client.submit(noop, i, pure=False).result()
    start = time.perf_counter()
    for i in range(100):
        client.submit(noop, i, pure=False).result()
    round_trip = (time.perf_counter() - start) / 100
    start = time.perf_counter()
    futures = [client.submit(noop, i, pure=False) for i in range(n)]
    client.gather(futures)
    in_flight = (time.perf_counter() - start) / n
    return {"round_trip_ms": 1000 * round_trip, "throughput_ms_per_task": 1000 * in_flight}


def driver_serial(args, workdir: Path, n_products: int) -> dict:
    """The calling process's own work per picture at scale: a fully cached transform (keys, lookups, pooling)."""
    from skproduct import ImageEmbedder
    from skproduct.io import read_bson

    path = workdir / f"serial-{n_products}.bson"
    catalogue = generate_catalogue(path, n_products, seed=7)
    frame = read_bson(path, index_path=workdir / (path.name + ".skpidx"), rebuild_index=True)
    cache = workdir / f"serial-{time.time_ns()}"
    settings = dict(pretrained=False, image_size=32, batch_size=64, device="cpu", precision="fp32")
    ImageEmbedder("timm:test_resnet", cache=cache, **settings).fit_transform(frame)  # fills the cache
    embedder = ImageEmbedder("timm:test_resnet", cache=cache, **settings).fit()
    start = time.perf_counter()
    embedder.transform(frame)
    seconds = time.perf_counter() - start
    return {"pictures": catalogue["pictures"], "seconds": seconds, "per_picture": seconds / catalogue["pictures"]}


def implied_scaling(n_pictures: int, serial: float, compute: float, shard_size: int, overhead: float,
                    scheduler_per_task: float, workers=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Speed-up over one process of N workers: ``T(N) = n*serial + max(shards*sched, (n*compute + shards*o)/N)``."""
    shards = -(-n_pictures // shard_size)
    single = n_pictures * (serial + compute)
    rows = []
    for n in workers:
        parallel = max(shards * scheduler_per_task, (n_pictures * compute + shards * overhead) / n)
        total = n_pictures * serial + parallel
        rows.append({"workers": n, "speedup": single / total, "efficiency": single / total / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=600, help="products of the catalogue (default 600)")
    parser.add_argument("--model", default="resnet18", help="timm model, random weights (default resnet18)")
    parser.add_argument("--image-size", type=int, default=128, help="input side in pixels (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="pictures per forward pass (default 32)")
    parser.add_argument("--shard-sizes", default="16,64,256",
                        help="shard sizes for the overhead (comma-separated; default 16,64,256)")
    parser.add_argument("--gpu-images-per-second", type=float, default=2000.0,
                        help="one GPU's throughput for the implied scaling (default 2000, resnet50 bf16 class)")
    parser.add_argument("--serial-products", type=int, default=5000,
                        help="products of the fully cached transform that times the driver's serial part (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "skproduct-bench-distributed")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "bench_distributed.json")
    args = parser.parse_args(argv)
    shard_sizes = [int(s) for s in args.shard_sizes.split(",")]

    from skproduct.io import read_bson

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"catalogue-{args.products}-{args.seed}.bson"
    catalogue = generate_catalogue(path, args.products, args.seed)
    warm_path = args.workdir / "warm-up.bson"
    generate_catalogue(warm_path, 16, args.seed + 1)
    frame = read_bson(path, index_path=args.workdir / (path.name + ".skpidx"), rebuild_index=True)
    warm_frame = read_bson(warm_path, index_path=args.workdir / "warm-up.skpidx", rebuild_index=True)
    n = catalogue["pictures"]
    print(f"catalogue: {catalogue['products']} products, {n} distinct pictures; model {args.model} at "
          f"{args.image_size} px; CPU {cpu_name()} x {os.cpu_count()}", flush=True)

    single = single_process(args, frame, warm_frame, args.workdir)
    print(f"single process: {single['seconds']:.1f} s", flush=True)
    one = on_cluster(args, frame, warm_frame, args.workdir, 1, shard_sizes)
    print("1 worker done", flush=True)
    two = on_cluster(args, frame, warm_frame, args.workdir, 2, [shard_sizes[len(shard_sizes) // 2]])
    for run in one["runs"] + two["runs"]:
        run["same_vectors"] = bool(np.allclose(run.pop("vectors"), single["vectors"], rtol=1e-4, atol=1e-5))
        run["speedup_vs_single"] = single["seconds"] / run["seconds"]
    single.pop("vectors")

    # the model of N workers: the driver's serial time per picture at scale (a fully cached transform), the overhead
    # per shard measured at each shard size, the compute per picture of this CPU (single process) or of one GPU
    serial_run = driver_serial(args, args.workdir, args.serial_products)
    serial = serial_run["per_picture"]
    print(f"driver serial: {serial_run['seconds']:.2f} s for {serial_run['pictures']} cached pictures", flush=True)
    cpu_compute = max(single["seconds"] / n - serial, 1e-9)
    scheduler = one["noop"]["throughput_ms_per_task"] / 1000
    overheads = {run["shard_size"]: max(run["overhead_per_shard_ms"], 0.0) / 1000 for run in one["runs"]}
    middle = one["runs"][len(one["runs"]) // 2]
    scaling_cpu = implied_scaling(n, serial, cpu_compute, middle["shard_size"], overheads[middle["shard_size"]],
                                  scheduler)
    gpu_compute = 1.0 / args.gpu_images_per_second
    big = 12_371_293  # Cdiscount's train.bson pictures
    scaling_gpu = {size: implied_scaling(big, serial, gpu_compute, size, overhead, scheduler)
                   for size, overhead in overheads.items()}

    print()
    print(f"distributed extraction, {n} pictures (times in s; speed-up = single process / run)")
    print(f"{'run':<16}{'shard':>7}{'shards':>8}{'wall':>8}{'speed-up':>10}{'setup':>8}{'read back':>11}"
          f"{'ovh/shard ms':>14}{'same':>6}")
    print(f"{'single process':<16}{'':>7}{'':>8}{single['seconds']:>8.2f}{1.0:>10.2f}{'':>8}{'':>11}{'':>14}{'':>6}")
    for label, result in (("1 worker", one), ("2 workers", two)):
        for run in result["runs"]:
            print(f"{label:<16}{run['shard_size']:>7}{run['shards']:>8}{run['seconds']:>8.2f}"
                  f"{run['speedup_vs_single']:>10.2f}{run['setup_seconds']:>8.2f}{run['read_back_seconds']:>11.2f}"
                  f"{run['overhead_per_shard_ms']:>14.1f}{'yes' if run['same_vectors'] else 'NO':>6}")
    print("(setup: shards made and the embedder with its weights sent to the workers, once per run; "
          "ovh/shard: task time beyond the work inside the shards, per shard)")
    print(f"warm-up (imports + backbone built once per process): single process {single['warm_up_seconds']:.1f} s, "
          f"1 worker {one['warm_up_seconds']:.1f} s, 2 workers {two['warm_up_seconds']:.1f} s")
    print(f"no-op Dask task: round trip {one['noop']['round_trip_ms']:.2f} ms, "
          f"{one['noop']['throughput_ms_per_task']:.2f} ms per task with 500 in flight")
    print(f"driver serial time per picture: {1000 * serial:.4f} ms (a fully cached transform of "
          f"{serial_run['pictures']} pictures: keys, lookups, pooling)")
    print()
    print(f"implied speed-up for N GPUs on Cdiscount's {big:,} pictures at {args.gpu_images_per_second:.0f} "
          "images/s per GPU, by shard size (with its measured overhead)")
    print(f"{'N':>4}" + "".join(f"{f'shard {s}':>12}" for s in scaling_gpu))
    for i, n_workers in enumerate(r["workers"] for r in scaling_cpu):
        print(f"{n_workers:>4}" + "".join(f"{scaling_gpu[s][i]['speedup']:>12.1f}" for s in scaling_gpu))

    report = {
        "benchmark": "bench_distributed",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_common.machine_info(), "cpu_name_lscpu": cpu_name(),
                    **_common.versions(("torch", "timm", "dask", "distributed"))},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "catalogue": catalogue,
        "single_process": single,
        "one_worker": one,
        "two_workers": two,
        "driver_serial": serial_run,
        "model": {"serial_seconds_per_picture": serial, "cpu_compute_seconds_per_picture": cpu_compute,
                  "gpu_compute_seconds_per_picture": gpu_compute,
                  "overhead_seconds_per_shard": {str(k): v for k, v in overheads.items()},
                  "scheduler_seconds_per_task": scheduler,
                  "implied_scaling_this_cpu": scaling_cpu,
                  "implied_scaling_gpus_cdiscount": {str(k): v for k, v in scaling_gpu.items()}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
