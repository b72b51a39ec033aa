"""The CPU engines and precision: bf16 on CPUs with native bf16, OpenVINO / ONNX Runtime behind one fingerprint rule."""

from __future__ import annotations

import threading

import joblib
import numpy as np
import pytest
import torch

from skproduct import EmbeddingCache, ImageEmbedder
from skproduct.image_pipeline.device import CPU_BF16_ENV, cpu_native_bf16, resolve_precision
from skproduct.runtimes import (
    AUTO_ORDER,
    COSINE_TOLERANCE,
    RuntimeUnavailableError,
    available_runtimes,
    export_onnx,
    resolve_runtime,
)

TINY = dict(pretrained=False, image_size=48, batch_size=8)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fashion_pictures(fashion_bson, tmp_path_factory):
    from skproduct.io import read_bson

    table = read_bson(fashion_bson, index_path=tmp_path_factory.mktemp("idx") / "fashion.skpidx")
    return table.sample(n=24, random_state=0)


@pytest.fixture(scope="module")
def torch_vectors(fashion_pictures):
    """The torch engine's vectors of ``fashion_pictures`` at each precision (computed once)."""
    return {precision: ImageEmbedder("timm:test_resnet", precision=precision, **TINY).fit_transform(fashion_pictures)
            for precision in ("fp32", "bf16")}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- precision ----------------------------------------------------------------------
def test_auto_precision_on_cpus_follows_native_bf16_for_inference_only(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_native_bf16()
    assert resolve_precision("auto", CPU, inference=True) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"  # training on a CPU stays fp32
    assert ImageEmbedder("timm:test_resnet", **TINY).fit().precision_ == "bf16"
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert not cpu_native_bf16()
    assert ImageEmbedder("timm:test_resnet", **TINY).fit().precision_ == "fp32"


def test_native_bf16_is_detected_from_the_cpu(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert cpu_native_bf16() == any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def test_a_cache_filled_at_fp32_is_reused_when_fp32_is_pinned(fashion_pictures, tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")  # filled on a CPU without native bf16: "auto" is fp32 there
    filler = ImageEmbedder("timm:test_resnet", cache=tmp_path, **TINY).fit(fashion_pictures)
    assert filler.precision_ == "fp32"
    first = filler.transform(fashion_pictures)
    monkeypatch.setenv(CPU_BF16_ENV, "1")  # read on a CPU with native bf16
    auto = ImageEmbedder("timm:test_resnet", cache=tmp_path, **TINY).fit(fashion_pictures)
    pinned = ImageEmbedder("timm:test_resnet", cache=tmp_path, precision="fp32", **TINY).fit(fashion_pictures)
    assert auto.precision_ == "bf16" and auto.fingerprint_ != filler.fingerprint_
    assert pinned.fingerprint_ == filler.fingerprint_
    cache = EmbeddingCache(tmp_path)
    hits = cache.stats()["hits"]
    np.testing.assert_array_equal(pinned.transform(fashion_pictures), first)
    assert cache.stats()["hits"] - hits == len(fashion_pictures)


def test_bf16_vectors_stay_close_to_fp32(torch_vectors):
    assert _cosine(torch_vectors["bf16"], torch_vectors["fp32"]).min() > COSINE_TOLERANCE["bf16"]


# -- runtimes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "runtime, precision", [("openvino", "fp32"), ("openvino", "bf16"), ("onnxruntime", "fp32")]
)
def test_runtime_vectors_match_torch_at_the_same_precision(fashion_pictures, torch_vectors, tmp_path, runtime,
                                                          precision):
    reference = torch_vectors[precision]
    embedder = ImageEmbedder("timm:test_resnet", precision=precision, runtime=runtime, cache=tmp_path, **TINY)
    vectors = embedder.fit_transform(fashion_pictures)
    assert (embedder.runtime_, embedder.precision_) == (runtime, precision)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    assert _cosine(vectors, reference).min() >= COSINE_TOLERANCE[precision]
    assert len(list((tmp_path / "engines").glob("*.onnx"))) == 1  # the export lives beside the cache


def test_openvino_precision_is_pinned_to_the_fingerprint(fashion_pictures):
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        embedder = ImageEmbedder("timm:test_resnet", precision=precision, runtime="openvino", **TINY)
        embedder.fit_transform(fashion_pictures.head(2))
        assert embedder._engine.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == hint


def test_the_runtime_is_part_of_the_fingerprint_and_the_export_is_made_once(fashion_pictures, tmp_path):
    fingerprints = {ImageEmbedder("timm:test_resnet", precision="fp32", runtime=r, **TINY).fit().fingerprint_
                    for r in ("torch", "openvino", "onnxruntime")}
    assert len(fingerprints) == 3
    first = ImageEmbedder("timm:test_resnet", precision="fp32", runtime="onnxruntime", cache=tmp_path, **TINY)
    first.fit_transform(fashion_pictures.head(4))
    (onnx_file,) = (tmp_path / "engines").glob("*.onnx")
    stamp = onnx_file.stat().st_mtime_ns
    # OpenVINO at bf16 reads the same export: one fp32 graph per backbone, the precision is the runtime's
    ImageEmbedder("timm:test_resnet", precision="bf16", runtime="openvino", cache=tmp_path, **TINY).fit_transform(
        fashion_pictures.head(4))
    assert list((tmp_path / "engines").glob("*.onnx")) == [onnx_file] and onnx_file.stat().st_mtime_ns == stamp


def test_several_workers_asking_at_once_export_once(tmp_path):
    calls, results, errors = [], [], []

    def factory():
        calls.append(1)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def ask():
        try:
            results.append(export_onnx("key", tmp_path, factory, (16, 16)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and len(set(results)) == 1
    import onnx

    onnx.checker.check_model(onnx.load(str(results[0])))
    assert [p.name for p in tmp_path.iterdir()] == ["key.onnx"]  # no temporary or lock file left
    assert export_onnx("key", tmp_path, lambda: pytest.fail("rebuilt"), (16, 16)) == results[0]


def test_auto_runtime_follows_the_documented_order():
    assert AUTO_ORDER == ("openvino", "onnxruntime", "torch")
    assert resolve_runtime("auto", CPU, "bf16") == ("openvino", "bf16")
    assert resolve_runtime("auto", CPU, "fp32") == (available_runtimes()[0], "fp32")
    assert resolve_runtime("auto", torch.device("cuda"), "bf16") == ("torch", "bf16")


def test_runtime_misuse_is_explained():
    with pytest.raises(ValueError, match="runs on CPUs only"):
        resolve_runtime("openvino", torch.device("cuda"), "bf16")
    with pytest.raises(ValueError, match="cannot run precision='bf16'"):
        resolve_runtime("onnxruntime", CPU, "bf16", precision_asked="bf16")
    assert resolve_runtime("onnxruntime", CPU, "bf16", precision_asked="auto") == ("onnxruntime", "fp32")


def test_a_missing_runtime_package_says_what_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ModuleNotFoundError("No module named 'openvino'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_openvino)
    with pytest.raises(RuntimeUnavailableError, match=r'pip install "skproduct\[openvino\]"'):
        ImageEmbedder("timm:test_resnet", runtime="openvino", **TINY).fit()


def test_an_embedder_on_an_engine_pickles_and_runs_again(fashion_pictures, tmp_path):
    embedder = ImageEmbedder("timm:test_resnet", precision="fp32", runtime="openvino", **TINY)
    expected = embedder.fit_transform(fashion_pictures.head(6))
    joblib.dump(embedder, tmp_path / "embedder.joblib")
    loaded = joblib.load(tmp_path / "embedder.joblib")
    assert loaded._engine is None
    np.testing.assert_allclose(loaded.transform(fashion_pictures.head(6)), expected, rtol=1e-5, atol=1e-6)
