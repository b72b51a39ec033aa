"""One unattended command for a lent GPU: extraction and fine-tuning images/s, from a generated Cdiscount BSON.

For resnet50 at 180 px and ViT-B/32 (timm's ``vit_base_patch32_224``; open_clip's ViT-B-32 where open_clip is
installed and ``--vit open_clip``) in bf16, random weights, it measures images per second of:

(a) the model alone on device tensors (bf16 autocast, channels-last, batch ``--batch-size``): the ceiling;
(b) ``ImageEmbedder(decode="cpu")``: PIL decoding and resizing in ``--workers`` DataLoader workers;
(c) ``ImageEmbedder(decode="device")``: JPEG bytes read by the workers, decoded by ``torchvision.io.decode_jpeg``
    on the GPU, resized and normalised there (:mod:`skproduct.image_pipeline.device_decode`);

each over every picture of a BSON file in Cdiscount's layout (``_id, imgs: [{picture}], category_id``; 1 to 4
180x180 JPEGs per product) generated first with numpy and PIL alone (no pymongo: skproduct's reader parses BSON
itself, and the writer here is a few lines of ``struct``), ``--pictures`` of them (default 50,000). Then
fine-tuning images/s for resnet50 at 180 px bf16: (d) one training step on device tensors (the ceiling) and
(e) ``FineTuneClassifier.fit`` for one epoch over ``--finetune-pictures`` pictures (PIL workers, augmentation on).
With ``--compile``, (a) and (c) are also measured with ``torch.compile``.

Targets (issue 16, H100/H200-class GPU): (c) >= 10,000 images/s and >= 80% of (a); fine-tuning >= 2,500 images/s.

What a bare GPU machine has is enough (torch, torchvision, timm, numpy, pillow, pandas, scikit-learn, tqdm); run
it from the repository root (it puts the checkout on ``sys.path``)::

    python benchmarks/bench_gpu.py                 # the full run, < 5 min on an H200
    python benchmarks/bench_gpu.py --smoke         # a tiny run on the CPU, to check the script itself

It prints a table and writes JSON to ``--out`` (default ``benchmarks/results/bench_gpu.json``, or
``bench_gpu_smoke.json``), and a copy into ``$OUT`` where that is set (the device tool's output folder).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_gpu.json"
TARGETS = {"device_decode_images_per_s_at_least": 10_000, "device_decode_over_model_alone_at_least": 0.8,
           "finetune_images_per_s_at_least": 2_500}


# -- a Cdiscount-layout BSON, written without pymongo --------------------------------------------------
def _element_int32(name: str, value: int) -> bytes:
    return b"\x10" + name.encode() + b"\x00" + struct.pack("<i", value)


def _document(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def _product(product_id: int, category_id: int, pictures: list[bytes]) -> bytes:
    images = [b"\x03" + str(k).encode() + b"\x00" + _document(
        [b"\x05picture\x00" + struct.pack("<i", len(p)) + b"\x00" + p]) for k, p in enumerate(pictures)]
    return _document([_element_int32("_id", product_id), b"\x04imgs\x00" + _document(images),
                      _element_int32("category_id", category_id)])


def _jpeg(seed: int, side: int = 180) -> bytes:
    """A 180x180 product-like JPEG: smooth colour fields, an object, some texture (5-10 KB like Cdiscount's)."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.integers(10, side // 2, 2)
    draw.ellipse([int(x0), int(y0), int(x0 + rng.integers(30, side // 2)), int(y0 + rng.integers(30, side // 2))],
                 fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _products_chunk(args: tuple[int, int, int]) -> bytes:
    start, stop, side = args
    out = []
    for product in range(start, stop):
        n_pictures = (1, 1, 1, 2, 1, 3, 1, 4)[product % 8]
        out.append(_product(product, 1000010000 + product % 50,
                            [_jpeg(product * 4 + k, side) for k in range(n_pictures)]))
    return b"".join(out)


def write_bson(path: Path, n_pictures: int, side: int = 180, processes: int | None = None) -> int:
    """Write products until ``n_pictures`` pictures; returns the number of products."""
    per_product = 14 / 8  # the pattern above: 14 pictures every 8 products
    n_products = int(np.ceil(n_pictures / per_product))
    chunks = [(s, min(s + 500, n_products), side) for s in range(0, n_products, 500)]
    with open(path, "wb") as f, Pool(processes or os.cpu_count()) as pool:
        for data in pool.imap(_products_chunk, chunks):
            f.write(data)
    return n_products


# -- measurements -----------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_alone(name: str, size: int, batch: int, device, iters: int, compile_: bool = False) -> float:
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=0, **_size_kwargs(name, size)).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    dtype = torch.bfloat16
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
        for _ in range(3):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    return iters * batch / (time.perf_counter() - t0)


def train_step_alone(size: int, batch: int, device, iters: int) -> float:
    import timm
    import torch

    model = timm.create_model("resnet50", pretrained=False, num_classes=50).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 50, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return iters * batch / (time.perf_counter() - t0)


def _size_kwargs(name: str, size: int) -> dict:
    return {"img_size": size} if "vit" in name else {}


def embedder_rate(backbone: str, size: int, table, n_pictures: int, device, batch: int, workers: int, decode: str,
                  compile_: bool = False) -> tuple[float, np.ndarray]:
    from skproduct import ImageEmbedder

    embedder = ImageEmbedder(backbone, pretrained=False, image_size=size, batch_size=batch, num_workers=workers,
                             precision="bf16", device=str(device), decode=decode, compile=compile_)
    embedder.fit(table.iloc[:8])
    embedder.transform(table.iloc[: max(8, batch // 2)])  # warm-up: workers, kernels (and the compilation)
    _sync(device)
    t0 = time.perf_counter()
    vectors = embedder.transform(table)
    _sync(device)
    return n_pictures / (time.perf_counter() - t0), vectors


def finetune_rate(table, n_pictures: int, device, batch: int, workers: int, size: int) -> float:
    from skproduct import FineTuneClassifier

    model = FineTuneClassifier("timm:resnet50", pretrained=False, image_size=size, batch_size=batch, max_iter=1,
                               early_stopping=False, num_workers=workers, precision="bf16", device=str(device))
    t0 = time.perf_counter()
    model.fit(table, table["category_id"].to_numpy())
    _sync(device)
    return n_pictures / (time.perf_counter() - t0)


def _cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except OSError:
        return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run on the CPU with timm's test models (checks the script, no figures)")
    parser.add_argument("--pictures", type=int, default=None, help="pictures in the BSON (default 50000)")
    parser.add_argument("--finetune-pictures", type=int, default=None, help="pictures fine-tuned on (default 20000)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (smoke 16)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs, at most 16)")
    parser.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    parser.add_argument("--vit", choices=("timm", "open_clip"), default="timm",
                        help="timm's vit_base_patch32_224 (default) or open_clip's ViT-B-32 (if installed)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile for (a) and (c)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --smoke (or --device cpu) to run on the CPU")
    n_pictures = args.pictures or (96 if smoke else 50_000)
    n_finetune = args.finetune_pictures or (48 if smoke else 20_000)
    batch = args.batch_size or (16 if smoke else 256)
    workers = args.workers if args.workers is not None else (2 if smoke else min(16, os.cpu_count() or 1))
    iters = 3 if smoke else 30
    out_path = args.out or (DEFAULT_OUT.with_name("bench_gpu_smoke.json") if smoke else DEFAULT_OUT)
    models = ([("timm:test_resnet", "test_resnet", 64), ("timm:test_vit", "test_vit", 64)] if smoke else
              [("timm:resnet50", "resnet50", 180), ("timm:vit_base_patch32_224", "vit_base_patch32_224", 224)])
    if args.vit == "open_clip" and not smoke:
        models[1] = ("open_clip:ViT-B-32", None, 224)
    ft_size = 64 if smoke else 180
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    work = Path(args.workdir or tempfile.mkdtemp(prefix="skproduct-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SKPRODUCT_CACHE_DIR", str(work / "skproduct-cache"))
    from skproduct.io import read_bson

    t0 = time.perf_counter()
    bson_path = work / "generated.bson"
    n_products = write_bson(bson_path, n_pictures, side=64 if smoke else 180)
    generate_s = time.perf_counter() - t0
    table = read_bson(bson_path, index_path=work / "generated.skpidx")
    n_total = int(table["n_images"].sum())
    print(f"generated {bson_path} ({bson_path.stat().st_size / 1e6:.0f} MB): {n_products} products, {n_total} "
          f"pictures in {generate_s:.1f} s; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", batch {batch}, {workers} workers", flush=True)

    results: dict = {}
    rows = []
    for backbone, timm_name, size in models:
        r: dict = {}
        label = backbone.split(":", 1)[1]
        if timm_name is not None:
            r["a_model_alone"] = model_alone(timm_name, size, batch, device, iters)
            if args.compile:
                r["a_model_alone_compiled"] = model_alone(timm_name, size, batch, device, iters, compile_=True)
        print(f"  {label}: (a) {r.get('a_model_alone', float('nan')):.0f} images/s", flush=True)
        r["b_embedder_pil"], pil = embedder_rate(backbone, size, table, n_total, device, batch, workers, "cpu")
        print(f"  {label}: (b) {r['b_embedder_pil']:.0f} images/s", flush=True)
        r["c_embedder_device_decode"], dev = embedder_rate(backbone, size, table, n_total, device, batch, workers,
                                                           "device")
        print(f"  {label}: (c) {r['c_embedder_device_decode']:.0f} images/s", flush=True)
        if args.compile:
            r["c_embedder_device_decode_compiled"], _ = embedder_rate(
                backbone, size, table, n_total, device, batch, workers, "device", compile_=True)
        cos = _cosine(pil, dev)
        r["product_vectors_cosine_device_vs_pil"] = {"min": float(cos.min()), "mean": float(cos.mean())}
        if "a_model_alone" in r:
            r["c_over_a"] = r["c_embedder_device_decode"] / r["a_model_alone"]
        r["c_over_b"] = r["c_embedder_device_decode"] / r["b_embedder_pil"]
        results[label] = r
        rows.append([f"{label} @ {size} px bf16", f"{r.get('a_model_alone', float('nan')):.0f}",
                     f"{r['b_embedder_pil']:.0f}", f"{r['c_embedder_device_decode']:.0f}",
                     f"{r.get('c_over_a', float('nan')):.0%}", f"{r['c_over_b']:.2f}x", f"{cos.mean():.5f}"])

    ft: dict = {"d_train_step_alone": train_step_alone(ft_size, batch, device, iters)}
    ft_table = table.iloc[: max(2, int(n_finetune / (14 / 8)))]
    ft_n = int(ft_table["n_images"].sum())
    ft["e_finetune_classifier_fit"] = finetune_rate(ft_table, ft_n, device, batch, workers, ft_size)
    ft["pictures"] = ft_n
    print(f"  fine-tuning resnet50 @ {ft_size}: (d) {ft['d_train_step_alone']:.0f}, (e) "
          f"{ft['e_finetune_classifier_fit']:.0f} images/s", flush=True)

    header = ["model", "(a) alone", "(b) PIL", "(c) device decode", "(c)/(a)", "(c)/(b)", "cos(b,c)"]
    table_text = _table(header, rows)
    table_text += "\n\n" + _table(["fine-tuning resnet50 bf16", "images/s"], [
        [f"(d) train step on device tensors @ {ft_size}", f"{ft['d_train_step_alone']:.0f}"],
        [f"(e) FineTuneClassifier.fit, 1 epoch, {ft_n} pictures", f"{ft['e_finetune_classifier_fit']:.0f}"]])
    first = results[models[0][0].split(":", 1)[1]]
    checks = {
        "(c) images/s, first model": (first["c_embedder_device_decode"], TARGETS["device_decode_images_per_s_at_least"]),
        "(c)/(a), first model": (first.get("c_over_a", float("nan")), TARGETS["device_decode_over_model_alone_at_least"]),
        "fine-tuning images/s (e)": (ft["e_finetune_classifier_fit"], TARGETS["finetune_images_per_s_at_least"]),
    }
    check_lines = [f"  {k}: {v:.2f} (target >= {t}): {'MET' if v >= t else 'NOT MET'}" for k, (v, t) in checks.items()]
    print()
    print(table_text)
    print("\nTargets (H100/H200-class GPU" + ("; a smoke run on the CPU proves nothing" if smoke else "") + "):")
    print("\n".join(check_lines))

    import skproduct

    result = {
        "benchmark": "bench_gpu", "smoke": smoke,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
                     "timm": __import__("timm").__version__, "skproduct": skproduct.__version__},
        "settings": {"pictures": n_total, "products": n_products, "batch_size": batch, "workers": workers,
                     "iters_model_alone": iters, "precision": "bf16", "weights": "random (pretrained=False)",
                     "generate_s": generate_s, "compile": args.compile, "finetune_pictures": ft_n},
        "targets": TARGETS, "results": results, "finetune": ft,
        "checks": {k: {"value": v, "target": t, "met": bool(v >= t)} for k, (v, t) in checks.items()},
        "table": table_text + "\n\n" + "\n".join(check_lines),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    if os.environ.get("OUT"):
        shutil.copy(out_path, Path(os.environ["OUT"]) / out_path.name)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
