"""Benchmark :class:`skproduct.ImageEmbedder` against embetter and a bare torch forward.

Same pictures, same model, one run. For ``--model`` (timm, default
``resnet18``) at ``--image-size`` pixels it measures, in images per second:

1. **embetter**: ``make_pipeline(ImageLoader(convert="RGB"), TimmEncoder(model))``,
   ``fit_transform`` on the picture paths (embetter's ``fit`` is a no-op, and
   recent scikit-learn's ``Pipeline.transform`` calls embetter's steps "not
   fitted"). embetter's ``TimmEncoder`` always asks
   timm for pretrained weights; here ``timm.create_model`` is patched to
   ``pretrained=False`` and the encoder's model gets the very weights of the
   other methods, so every method runs the same network. (embetter keeps
   timm's model in training mode and runs it one picture at a time without
   ``torch.no_grad``: that is what it does, and what is timed.)
2. **ImageEmbedder**: ``ImageEmbedder("timm:<model>", pretrained=False,
   image_size=..., batch_size=..., num_workers=w, cache=None)``, one row per
   ``w`` in ``--workers`` (default 0, 1, 2); ``fit`` is not timed, ``transform``
   is (DataLoader workers are started inside each transform, so that cost is
   in).
3. **bare forward** (the ceiling): the same timm model (``num_classes=0``,
   ``eval()``, ``torch.inference_mode()``) on pictures decoded and
   preprocessed beforehand into one tensor, in batches of ``--batch-size``,
   contiguous and channels-last. Its ratio shows what the data pipeline costs.
4. **cache**: an ImageEmbedder with ``cache=<fresh temporary folder>``: the
   first transform (nothing cached: extracts and fills the cache), then a
   *fresh* ImageEmbedder on the same folder (``fit`` and ``transform``: fully
   cached, no model built, no picture decoded). The cached transform is also
   timed in a new Python process (page cache warm), as a later ``predict``
   would run.

Pictures: the Shopee sample photos (``--images``, default
``/work/shared/data/shopee-sample/images``, 126 JPEGs of 640-1024 px), the first
``--n-images`` of them, the list repeated ``--repeat`` times (default 2: 252
pictures) for the uncached methods. The cache rows use the distinct pictures
only (the cache is keyed by picture content: a repeated path is a hit).

Every method is warmed up once (on one batch of pictures; the cache warm-up
uses its own folder) before it is timed; methods are then timed round-robin
``--runs`` times and the best run is reported (all runs are in the JSON).
``torch.set_num_threads(--threads)`` (default: the number of CPUs) holds for all.

Engines and precisions (issue 16): on the CPU, ImageEmbedder is measured with
every ``--runtimes`` (torch, onnxruntime, openvino) at every precision it runs
(``--precisions``, default fp32 and bf16), and the bare forwards include
torch fp32 (contiguous, channels-last), torch bf16 autocast (channels-last),
ONNX Runtime fp32 and OpenVINO fp32 and bf16 (the exported graph on
pre-decoded pixels). ``--dataset fashion`` takes ``--n-images`` of
fashion-small's ~60x80 catalogue JPEGs (decoding is cheap there; written to a
temporary folder so that embetter reads files too), ``--dataset shopee`` (the
default) the 640-1024 px photos. A breakdown says where one picture's time
goes: decoding (PIL, with the reduced-scale draft), resizing and normalising,
and the fastest forward.

Targets on a CPU (from the issues): ImageEmbedder (best row) at least 2x
embetter anywhere, and on a CPU with native bf16 at least 5x embetter; at
least 80% of the best bare forward; the fully cached transform at least 50x
faster than the uncached one.

On CUDA (``--device cuda``, or ``auto`` where a GPU is present) the bare
forward and ImageEmbedder are also measured in bf16 (autocast, channels-last);
embetter (CPU only) is left out unless ``--embetter`` is given. The issue's GPU
setting::

    python benchmarks/bench_embed.py --device cuda --model resnet50 --image-size 180 \\
        --batch-size 256 --repeat 16 --workers 4,8,16

Run it from the repository root (needs ``pip install "embetter[vision]"``)::

    python benchmarks/bench_embed.py                      # resnet18 at 224 px on the CPU
    python benchmarks/bench_embed.py --runs 1 --repeat 1  # quicker
    python benchmarks/bench_embed.py --profile            # + cProfile of one ImageEmbedder transform

It prints a table and writes the figures, with the machine's description and
the library versions, to ``--out`` (default ``benchmarks/results/bench_embed.json``).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import cProfile
import datetime as _dt
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import _common  # benchmarks/_common.py, beside this script

DEFAULT_IMAGES = Path("/work/shared/data/shopee-sample/images")
FASHION_BSON = Path("/work/shared/data/fashion-small/fashion_small.bson")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_embed.json"
TARGETS = {
    "embedder_over_embetter_at_least": 2.0,
    "embedder_over_embetter_on_native_bf16_cpus_at_least": 5.0,
    "embedder_over_best_bare_forward_at_least": 0.8,
    "cached_speedup_at_least": 50.0,
}


# -- helpers ------------------------------------------------------------------
def machine_info(device) -> dict:
    import torch

    info = {
        **_common.machine_info(),
        "torch_threads": torch.get_num_threads(),
        "torch_parallel_backend": torch.__config__.parallel_info().splitlines()[-1].strip(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# -- the methods --------------------------------------------------------------
def make_embetter(model_name: str, state_dict):
    """embetter's pipeline, its timm model built without pretrained weights and given ``state_dict``."""
    import timm
    from embetter.vision import ImageLoader, TimmEncoder
    from sklearn.pipeline import make_pipeline

    original = timm.create_model
    def create_model(*args, **kwargs):
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    with mock.patch.object(timm, "create_model", side_effect=create_model) as patched:
        encoder = TimmEncoder(model_name)
    assert patched.call_count >= 1, "embetter's TimmEncoder did not call timm.create_model"
    encoder.model.load_state_dict(state_dict)
    return make_pipeline(ImageLoader(convert="RGB"), encoder)


def bare_forward(module, pixels, batch_size: int, device, dtype=None):
    """The model over pre-decoded ``pixels`` (already on ``device``), in batches; returns float32 numpy."""
    import torch

    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, len(pixels), batch_size):
            out.append(module(pixels[start:start + batch_size]).float())
    _sync(device)
    return torch.cat(out).cpu().numpy()


def fashion_files(folder: Path, n: int, bson: Path = FASHION_BSON) -> list[str]:
    """``n`` fashion-small pictures (drawn with seed 0) written as JPEG files, their bytes untouched."""
    from skproduct.io import read_bson

    folder.mkdir(parents=True, exist_ok=True)
    table = read_bson(bson, index_path=folder / "fashion.skpidx").sample(n=n, random_state=0)
    paths = []
    for product, refs in zip(table["product_id"], table["images"]):
        path = folder / f"{product}.jpg"
        path.write_bytes(refs[0].read_bytes())
        paths.append(str(path))
    return paths


def runtime_runs(runtime: str, precision: str) -> bool:
    return precision in {"torch": ("fp32", "bf16", "fp16"), "openvino": ("fp32", "bf16"),
                         "onnxruntime": ("fp32",)}[runtime]


def bare_engine(runtime: str, precision: str, model, reference, workdir: Path):
    """The exported graph of ``model`` on ``runtime`` (what ImageEmbedder(runtime=...) runs), for a bare forward."""
    from skproduct.runtimes import build_engine

    return build_engine(runtime, precision, module_factory=lambda: model, export_key=f"bare-{reference.fingerprint_}",
                        folder=workdir / "engines", input_size=reference.preprocessing_.input_size)


def engine_forward(engine, pixels, batch_size: int):
    """An engine over pre-decoded contiguous float32 ``pixels`` (numpy batches, as it runs them)."""
    array = pixels.numpy()
    return np.concatenate([engine.run(np.ascontiguousarray(array[start:start + batch_size]))
                           for start in range(0, len(array), batch_size)])


def time_breakdown(paths: list[str], preprocessing, forward, batch_size: int) -> dict:
    """Seconds per picture of decoding (PIL + draft), resizing + normalising, and ``forward`` (one process)."""
    import torch

    from skproduct.images import load_image

    transform = preprocessing.transform()
    t0 = time.perf_counter()
    images = [load_image(p, draft_size=preprocessing.draft_size) for p in paths]
    t1 = time.perf_counter()
    pixels = torch.stack([transform(image) for image in images])
    t2 = time.perf_counter()
    forward(pixels)
    t3 = time.perf_counter()
    n = len(paths)
    sides = [max(image.size) for image in images]
    return {"decode_s_per_picture": (t1 - t0) / n, "resize_normalise_s_per_picture": (t2 - t1) / n,
            "forward_s_per_picture": (t3 - t2) / n, "decoded_longer_side_median_px": float(np.median(sides)),
            "batch_size": batch_size}


_CACHED_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from skproduct import ImageEmbedder
t1 = time.perf_counter()
cfg = json.loads(sys.argv[1])
paths = cfg.pop("paths")
emb = ImageEmbedder(**cfg)
t2 = time.perf_counter()
emb.fit(paths)
t3 = time.perf_counter()
X = emb.transform(paths)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "fit_s": t3 - t2, "transform_s": t4 - t3, "shape": list(X.shape),
                  "imported_torch": "torch" in sys.modules}))
"""


def cached_in_new_process(config: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", _CACHED_CHILD, json.dumps(config)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def profile_transform(embedder, images, top: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    embedder.transform(images)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


# -- main ---------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="pictures per forward pass (default 32)")
    parser.add_argument("--n-images", type=int, default=None, help="distinct pictures used (default: all)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="times the picture list is repeated for the uncached methods (default 2)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs of each method, round-robin; the best is reported (default 3)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated num_workers values for ImageEmbedder (default 0,1,2; on CUDA 0,4,8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads for every method (default: the number of CPUs)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default auto)")
    parser.add_argument("--embetter", action=argparse.BooleanOptionalAction, default=None,
                        help="measure embetter (default: on the CPU only)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help=f"folder of JPEG pictures, searched recursively (default {DEFAULT_IMAGES})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the cache folders go (default: a fresh temporary folder, removed afterwards)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one ImageEmbedder transform (num_workers=0) and print the top functions")
    parser.add_argument("--dataset", choices=("shopee", "fashion"), default="shopee",
                        help="shopee: the --images folder of 640-1024 px photos; fashion: --n-images (default 256) "
                             "of fashion-small's ~60x80 JPEGs (default shopee)")
    parser.add_argument("--runtimes", default="torch,onnxruntime,openvino",
                        help="ImageEmbedder runtimes measured on the CPU (default torch,onnxruntime,openvino)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="precisions measured on the CPU, where a runtime runs them (default fp32,bf16)")
    parser.add_argument("--no-cache-rows", action="store_true", help="skip the cache measurements")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    import torch

    import skproduct
    from skproduct import ImageEmbedder
    from skproduct.backbones import build_backbone, parse_backbone
    from skproduct.images import load_image

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    on_cuda = device.type == "cuda"
    workers = [int(w) for w in (args.workers or ("0,4,8" if on_cuda else "0,1,2")).split(",")]
    use_embetter = (not on_cuda) if args.embetter is None else args.embetter
    backbone = f"timm:{args.model}"

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="skproduct-bench-embed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir is None:  # removed at exit, also when the run fails
        atexit.register(shutil.rmtree, workdir, True)
    if args.dataset == "fashion":
        paths = fashion_files(workdir / "fashion", args.n_images or 256)
    else:
        paths = sorted(str(p) for p in args.images.rglob("*.jpg"))
        if not paths:
            parser.error(f"no .jpg pictures under {args.images}")
        paths = paths[: args.n_images] if args.n_images else paths
    images = paths * args.repeat
    n = len(images)
    warm = images[: min(args.batch_size, n)]
    print(f"{len(paths)} distinct pictures x {args.repeat} = {n}; {backbone} at {args.image_size} px, "
          f"batch {args.batch_size}, {args.threads} torch threads, device {device}", flush=True)

    os.environ.setdefault("SKPRODUCT_CACHE_DIR", str(workdir / "skproduct-cache"))  # exported engines go there
    machine = machine_info(device)
    precisions = ["fp32", "bf16"] if on_cuda else args.precisions.split(",")
    runtimes = ["torch"] if on_cuda else args.runtimes.split(",")

    def embedder(**kw):
        params = {"pretrained": False, "image_size": args.image_size, "batch_size": args.batch_size,
                  "device": str(device), "precision": "fp32"}
        params.update(kw)
        return ImageEmbedder(backbone, **params)

    # The reference model: the very weights ImageEmbedder(pretrained=False, random_state=0) builds.
    model = build_backbone(parse_backbone(backbone), pretrained=False, weights=None,
                           image_size=args.image_size, seed=0).eval()
    reference = embedder().fit(warm)
    transform = reference.preprocessing_.transform()

    # Pre-decoded pixels for the bare forward (decoding is not timed there).
    t0 = time.perf_counter()
    decoded = torch.stack([transform(load_image(p)) for p in paths])
    decode_s = time.perf_counter() - t0
    index = torch.arange(n) % len(paths)
    pixels_cpu = decoded[index]
    module_cont = model.to(device)
    pixels_cont = pixels_cpu.to(device)
    module_cl = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)
    pixels_cl = pixels_cont.contiguous(memory_format=torch.channels_last)

    methods: dict[str, dict] = {}  # name -> {"fn", "kind", "n"}
    if use_embetter:
        pipe = make_embetter(args.model, model.state_dict())
        # fit_transform, as embetter's documentation does: its fit is a no-op, and with scikit-learn >= 1.6
        # Pipeline.transform refuses embetter's steps as "not fitted" (they set no fitted attributes).
        methods["embetter ImageLoader + TimmEncoder"] = {"fn": lambda: pipe.fit_transform(images), "kind": "embetter"}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        sfx = f" {precision}" if on_cuda else ""
        if on_cuda or precision == "fp32":
            methods[f"bare forward, contiguous{sfx}"] = {
                "fn": (lambda d=dtype: bare_forward(module_cont, pixels_cont, args.batch_size, device, d)),
                "kind": "bare"}
            methods[f"bare forward, channels-last{sfx}"] = {
                "fn": (lambda d=dtype: bare_forward(module_cl, pixels_cl, args.batch_size, device, d)), "kind": "bare"}
        if not on_cuda and precision == "bf16":
            methods["bare forward, channels-last bf16 autocast"] = {
                "fn": (lambda: bare_forward(module_cl, pixels_cl, args.batch_size, device, torch.bfloat16)),
                "kind": "bare"}
        for runtime in runtimes:
            if runtime != "torch" and not on_cuda and runtime_runs(runtime, precision):
                engine = bare_engine(runtime, precision, model, reference, workdir)
                methods[f"bare forward, {runtime} {precision}"] = {
                    "fn": (lambda e=engine: engine_forward(e, pixels_cont, args.batch_size)), "kind": "bare"}
            if not runtime_runs(runtime, precision):
                continue
            for w in workers:
                emb = embedder(num_workers=w, precision=precision, runtime=runtime).fit(warm)
                label = f" {runtime} {precision}" if not on_cuda else sfx
                methods[f"ImageEmbedder num_workers={w}{label}"] = {
                    "fn": (lambda e=emb: e.transform(images)), "kind": "embedder", "estimator": emb}

    # Warm-up: each method once on one batch.
    for name, m in methods.items():
        if m["kind"] == "embetter":
            pipe.fit_transform(warm)
        elif m["kind"] == "embedder":
            m["estimator"].transform(warm)
        else:
            m["fn"]()  # a bare forward over the whole tensor is cheap enough next to the others
    warm_cache = workdir / "cache-warmup"
    if not args.no_cache_rows:
        embedder(cache=warm_cache).fit(warm).transform(warm)
        embedder(cache=warm_cache).fit(warm).transform(warm)

    # Timed runs, round-robin; other processes' CPU use over them is recorded (a noise indicator).
    busy0, own0, wall0 = _common.busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, np.ndarray] = {}
    cache_runs: list[dict] = []
    for run in range(args.runs):
        for name, m in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            out = m["fn"]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            outputs.setdefault(name, np.asarray(out))
            print(f"  run {run + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
        if args.no_cache_rows:
            continue
        cache_dir = workdir / f"cache-run{run}"
        filler = embedder(cache=cache_dir)
        t0 = time.perf_counter()
        filler.fit(paths)
        t1 = time.perf_counter()
        filled = filler.transform(paths)
        t2 = time.perf_counter()
        fresh = embedder(cache=cache_dir)
        fresh.fit(paths)
        t3 = time.perf_counter()
        cached = fresh.transform(paths)
        t4 = time.perf_counter()
        child = cached_in_new_process({
            "backbone": backbone, "pretrained": False, "image_size": args.image_size,
            "batch_size": args.batch_size, "device": str(device), "precision": "fp32",
            "cache": str(cache_dir), "paths": paths})
        cache_runs.append({
            "uncached_fit_s": t1 - t0, "uncached_transform_s": t2 - t1,
            "cached_fit_s": t3 - t2, "cached_transform_s": t4 - t3,
            "cached_identical": bool(np.array_equal(filled, cached)),
            "new_process": child,
        })
        print(f"  run {run + 1}: cache: uncached {t2 - t1:.2f} s, cached {1e3 * (t4 - t3):.1f} ms "
              f"(fit {1e3 * (t3 - t2):.1f} ms), new process {1e3 * child['transform_s']:.1f} ms", flush=True)
        shutil.rmtree(cache_dir, ignore_errors=True)

    busy1, own1, wall1 = _common.busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    other_cpu = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0))
    if other_cpu is not None:
        machine["other_processes_cpu_s_during_timing"] = other_cpu
        machine["timing_wall_s"] = wall1 - wall0

    # Figures.
    rate = {name: n / min(ts) for name, ts in times.items()}
    embetter_name = next((k for k, m in methods.items() if m["kind"] == "embetter"), None)
    bare_names = [k for k, m in methods.items() if m["kind"] == "bare"]
    embedder_names = [k for k, m in methods.items() if m["kind"] == "embedder"]
    best_bare = max(bare_names, key=rate.get)
    best_embedder = max(embedder_names, key=rate.get)

    # Sanity: the same numbers from every method that runs the model in eval mode.
    ref_out = outputs[bare_names[0]]
    agreement = {name: float(np.max(np.abs(outputs[name] - ref_out)) / (np.max(np.abs(ref_out)) + 1e-12))
                 for name in methods if methods[name]["kind"] != "embetter"}
    if embetter_name:
        agreement[embetter_name + " (train-mode BatchNorm, differs by design)"] = float(
            np.max(np.abs(outputs[embetter_name] - ref_out)) / (np.max(np.abs(ref_out)) + 1e-12))

    keys = ("uncached_fit_s", "uncached_transform_s", "cached_fit_s", "cached_transform_s")
    best_cache = {k: min((r[k] for r in cache_runs), default=float("nan")) for k in keys}
    best_cache["new_process_transform_s"] = min((r["new_process"]["transform_s"] for r in cache_runs),
                                                default=float("nan"))
    best_cache["new_process_fit_s"] = min((r["new_process"]["fit_s"] for r in cache_runs), default=float("nan"))
    speedup = best_cache["uncached_transform_s"] / best_cache["cached_transform_s"]
    speedup_fit = ((best_cache["uncached_fit_s"] + best_cache["uncached_transform_s"])
                   / (best_cache["cached_fit_s"] + best_cache["cached_transform_s"]))
    speedup_child = best_cache["uncached_transform_s"] / best_cache["new_process_transform_s"]

    header = ["method", "images/s", "s (best)", "vs embetter", "vs best bare"]
    rows = []
    for name in methods:
        r = rate[name]
        rows.append([name, f"{r:.1f}", f"{min(times[name]):.2f}",
                     f"{r / rate[embetter_name]:.2f}x" if embetter_name else "-",
                     f"{r / rate[best_bare]:.0%}"])
    m = len(paths)
    cache_rows = [
        ["uncached transform (fills the cache)", f"{m / best_cache['uncached_transform_s']:.1f}",
         f"{best_cache['uncached_transform_s']:.3f}", "1x"],
        ["cached transform, fresh ImageEmbedder", f"{m / best_cache['cached_transform_s']:.0f}",
         f"{best_cache['cached_transform_s']:.4f}", f"{speedup:.0f}x"],
        ["cached fit + transform, fresh ImageEmbedder", "-",
         f"{best_cache['cached_fit_s'] + best_cache['cached_transform_s']:.4f}", f"{speedup_fit:.0f}x (vs fit+transform)"],
        ["cached transform, new process", f"{m / best_cache['new_process_transform_s']:.0f}",
         f"{best_cache['new_process_transform_s']:.4f}", f"{speedup_child:.0f}x"],
    ]

    from skproduct.image_pipeline.device import cpu_native_bf16

    native_bf16 = (not on_cuda) and cpu_native_bf16()
    machine["cpu_native_bf16"] = native_bf16
    checks = []
    if embetter_name:
        v = rate[best_embedder] / rate[embetter_name]
        checks.append(("ImageEmbedder / embetter", v, TARGETS["embedder_over_embetter_at_least"], f"{v:.2f}x", "2x"))
        if native_bf16:
            checks.append(("ImageEmbedder / embetter (CPU with native bf16)", v,
                           TARGETS["embedder_over_embetter_on_native_bf16_cpus_at_least"], f"{v:.2f}x", "5x"))
    v = rate[best_embedder] / rate[best_bare]
    checks.append(("ImageEmbedder / best bare forward", v, TARGETS["embedder_over_best_bare_forward_at_least"],
                   f"{v:.0%}", "80%"))
    if cache_runs:
        checks.append(("cached / uncached speedup", speedup, TARGETS["cached_speedup_at_least"], f"{speedup:.0f}x",
                       "50x"))

    # Where one picture's time goes, in one process: decoding, resizing + normalising, the fastest bare forward.
    fastest = methods[best_bare]["fn"]
    breakdown = time_breakdown(paths, reference.preprocessing_, lambda _pixels: fastest(), args.batch_size)
    breakdown["forward_s_per_picture"] = min(times[best_bare]) / n  # the timed runs' figure, not a one-off
    breakdown["forward"] = best_bare

    table = _format_table(header, rows)
    cache_table = _format_table([f"cache ({m} distinct pictures)", "images/s", "s (best)", "speedup"], cache_rows)
    target_lines = []
    for what, value, goal, shown, goal_shown in checks:
        status = "MET" if value >= goal else "NOT MET"
        target_lines.append(f"  {what}: {shown} (target >= {goal_shown}): {status}")
    print()
    print(table)
    print()
    if cache_runs:
        print(cache_table)
        print()
    b = breakdown
    breakdown_line = (
        f"Where one picture's time goes ({len(paths)} distinct pictures, median decoded side "
        f"{b['decoded_longer_side_median_px']:.0f} px): decode {1e3 * b['decode_s_per_picture']:.2f} ms, "
        f"resize + normalise {1e3 * b['resize_normalise_s_per_picture']:.2f} ms, forward "
        f"({b['forward']}) {1e3 * b['forward_s_per_picture']:.2f} ms")
    print(breakdown_line)
    print()
    print(f"Targets (ImageEmbedder: best row, {best_embedder}; bare: {best_bare}):")
    print("\n".join(target_lines))
    print(f"\nOutputs vs {bare_names[0]} (max abs diff / max abs): "
          + ", ".join(f"{k}: {v:.1e}" for k, v in agreement.items()))
    if other_cpu is not None:
        print(f"Other processes used {other_cpu:.1f} CPU-s during the {wall1 - wall0:.0f} s of timed runs "
              f"(out of {os.cpu_count() * (wall1 - wall0):.0f} CPU-s): "
              + ("the machine was quiet." if other_cpu < 0.05 * (wall1 - wall0) else "figures may be noisy."))
    print(f"Decoding + preprocessing the {len(paths)} distinct pictures in one process (untimed setup of the bare "
          f"forward): {decode_s:.2f} s, {len(paths) / decode_s:.1f} images/s")

    profile_text = None
    if args.profile:
        prof_emb = embedder(num_workers=0).fit(warm)
        prof_emb.transform(warm)
        profile_text = profile_transform(prof_emb, images)
        print("\ncProfile of one ImageEmbedder transform (num_workers=0), by own time:")
        print(profile_text)

    result = {
        "benchmark": "bench_embed",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "versions": _common.versions(("skproduct", "torch", "torchvision", "timm", "pillow", "numpy", "scikit-learn", "embetter")),
        "settings": {
            "model": args.model, "backbone": backbone, "image_size": args.image_size,
            "batch_size": args.batch_size, "images": str(args.images), "distinct_pictures": len(paths),
            "repeat": args.repeat, "pictures_timed": n, "runs": args.runs, "workers": workers,
            "threads": args.threads, "device": str(device), "precisions": precisions, "runtimes": runtimes,
            "dataset": args.dataset,
            "preprocessing": {k: getattr(reference.preprocessing_, k)
                              for k in ("image_size", "resize", "interpolation", "mean", "std")},
            "timing": "best of --runs round-robin runs after one warm-up per method; all runs listed",
            "embetter": "timm.create_model patched to pretrained=False, weights replaced by the shared ones; "
                        "embetter runs the model in training mode, one picture at a time, with autograd on",
            "skproduct_version": getattr(skproduct, "__version__", None),
        },
        "targets": TARGETS,
        "results": {
            "methods": {name: {"images_per_s": rate[name], "median_images_per_s": n / statistics.median(times[name]),
                               "seconds": times[name], "kind": methods[name]["kind"],
                               "vs_embetter": rate[name] / rate[embetter_name] if embetter_name else None,
                               "vs_best_bare": rate[name] / rate[best_bare]} for name in methods},
            "best_embedder": best_embedder, "best_bare": best_bare,
            "cache": {"distinct_pictures": m, "best": best_cache, "runs": cache_runs,
                      "speedup_transform": speedup, "speedup_fit_transform": speedup_fit,
                      "speedup_new_process": speedup_child},
            "checks": {what: {"value": value, "target": goal, "met": value >= goal}
                       for what, value, goal, *_ in checks},
            "output_agreement": agreement,
            "setup_decode_preprocess_images_per_s": len(paths) / decode_s,
            "time_breakdown": breakdown,
        },
        "table": table + "\n\n" + (cache_table + "\n\n" if cache_runs else "") + breakdown_line + "\n\n"
                 + "\n".join(target_lines),
    }
    if profile_text:
        result["profile"] = profile_text
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
