"""ImageEmbedder on real pictures: backbones, pooling, the cache across a grid search, persistence, bad pictures."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import joblib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from skproduct import EmbeddingCache, ImageEmbedder
from skproduct.exceptions import BadPictureWarning, EmptyProductWarning, ImageDecodeError

TINY = dict(pretrained=False, image_size=48, batch_size=16)


@pytest.fixture(scope="module")
def cdiscount_products(cdiscount_sample, tmp_path_factory):
    from skproduct.io import read_bson

    return read_bson(cdiscount_sample, index_path=tmp_path_factory.mktemp("idx") / "sample.skpidx")


def _unique_pictures(products: pd.DataFrame) -> int:
    # BSON pictures are keyed by their byte range in the file (issue 14): each one is extracted once, and two
    # products that hold byte-identical pictures at different offsets each get their own
    return len({(ref.path, ref.offset) for refs in products["images"] for ref in refs})


def _count_extracted(monkeypatch) -> list[int]:
    """Record how many pictures each forward pass of a backbone takes (probes included)."""
    import skproduct.embed as embed

    runs: list[int] = []
    original = embed.build_backbone

    def counting(*args, **kwargs):
        module = original(*args, **kwargs)
        module.register_forward_pre_hook(lambda _, inputs: runs.append(len(inputs[0])))
        return module

    monkeypatch.setattr(embed, "build_backbone", counting)
    return runs


# -- backbones on real pictures ----------------------------------------------------
@pytest.mark.parametrize("backbone", ["timm:test_resnet", "timm:test_vit", "timm:test_efficientnet"])
def test_timm_backbones_on_multi_picture_products(cdiscount_products, backbone):
    products = cdiscount_products.head(20)
    embedder = ImageEmbedder(backbone, **TINY).fit(products)
    vectors = embedder.transform(products)
    assert vectors.shape == (20, embedder.n_features_out_) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all() and len(np.unique(vectors.round(5), axis=0)) > 10
    # a product's vector is the mean of its pictures' vectors
    multi = int(np.flatnonzero(products["n_images"].to_numpy() > 1)[0])
    singles = embedder.transform([[ref] for ref in products["images"].iloc[multi]])
    np.testing.assert_allclose(vectors[multi], singles.mean(axis=0), rtol=1e-5, atol=1e-6)
    maxed = clone(embedder).set_params(pooling="max").fit(products).transform(products.iloc[[multi]])
    np.testing.assert_allclose(maxed[0], singles.max(axis=0), rtol=1e-5, atol=1e-6)


def test_open_clip_image_tower_without_pretrained_weights(shopee_sample):
    paths = sorted(str(p) for p in (shopee_sample / "images").glob("0[0-2]/*.jpg"))
    embedder = ImageEmbedder("open_clip:ViT-S-32", pretrained=False, image_size=64, batch_size=8).fit(paths)
    vectors = embedder.transform(paths)
    assert vectors.shape == (len(paths), embedder.n_features_out_) == (9, 384)
    assert np.isfinite(vectors).all()
    assert embedder.preprocessing_.interpolation == "bicubic"


def test_shopee_table_input_and_pandas_output(shopee_sample):
    from skproduct.io import read_table

    table = read_table(shopee_sample / "train.csv", shopee_sample / "images").head(6)
    embedder = ImageEmbedder("timm:test_resnet", **TINY).set_output(transform="pandas")
    frame = embedder.fit_transform(table)
    assert isinstance(frame, pd.DataFrame) and frame.shape == (6, 96)
    assert list(frame.columns[:2]) == ["imageembedder0", "imageembedder1"]
    assert list(embedder.get_feature_names_out()) == list(frame.columns)


def test_batch_size_and_workers_do_not_change_results(cdiscount_products):
    products = cdiscount_products.head(12)
    reference = ImageEmbedder("timm:test_resnet", **TINY).fit_transform(products)
    for batch_size, workers in [(1, 0), (5, 2), (64, 1)]:
        other = ImageEmbedder("timm:test_resnet", **{**TINY, "batch_size": batch_size}, num_workers=workers)
        np.testing.assert_allclose(other.fit_transform(products), reference, rtol=1e-5, atol=1e-5)


# -- the cache -------------------------------------------------------------------
def test_grid_search_runs_the_backbone_once_per_unique_picture(cdiscount_products, tmp_path, monkeypatch):
    products = cdiscount_products.head(66)
    y = products["category_id"].astype(int).to_numpy() % 3  # three balanced-enough classes
    runs = _count_extracted(monkeypatch)
    cache = EmbeddingCache(tmp_path / "emb")
    pipeline = Pipeline([("embed", ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **TINY)),
                         ("head", LogisticRegression(max_iter=200))])
    folds = KFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(pipeline, {"head__C": [0.1, 1.0, 10.0]}, cv=folds)
    search.fit(products, y)
    search.predict(products)

    unique = _unique_pictures(products)
    # each transform looks up the distinct pictures of its rows: 3 candidates x 3 folds x (train + test),
    # then the refit and the predict on every row
    lookups = 3 * sum(_unique_pictures(products.iloc[train]) + _unique_pictures(products.iloc[test])
                      for train, test in folds.split(products)) + 2 * unique
    stats = cache.stats()
    assert sum(runs) == unique  # the backbone saw each unique picture once
    assert stats["misses"] == unique and stats["items"] == unique
    assert stats["hits"] == lookups - unique  # every later lookup was a hit


def test_fully_cached_transform_never_builds_the_model_nor_decodes(cdiscount_products, tmp_path, monkeypatch):
    products = cdiscount_products.head(10)
    first = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **TINY).fit_transform(products)
    import skproduct.embed as embed
    import skproduct.image_pipeline.data as torch_data

    monkeypatch.setattr(embed, "build_backbone", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setattr(torch_data.BadImagePolicy, "load", lambda *a, **k: pytest.fail("a picture was decoded"))
    again = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **TINY).fit(products)
    np.testing.assert_array_equal(again.transform(products), first)
    assert again._module is None


@pytest.mark.parametrize(
    "change",
    [dict(backbone="timm:test_efficientnet"), dict(random_state=1), dict(image_size=64)],
    ids=["backbone", "weights", "image-size"],
)
def test_cache_misses_after_a_change(cdiscount_products, tmp_path, change):
    products = cdiscount_products.head(5)
    cache = EmbeddingCache(tmp_path / "emb")
    base = ImageEmbedder("timm:test_resnet", cache=cache, **TINY)
    base.fit_transform(products)
    misses = cache.stats()["misses"]
    changed = clone(base).set_params(**change)
    changed.fit_transform(products)
    assert changed.fingerprint_ != base.fingerprint_
    assert cache.stats()["misses"] == 2 * misses


def test_cache_misses_when_picture_bytes_change(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path)
    cache = EmbeddingCache(tmp_path / "emb")
    embedder = ImageEmbedder("timm:test_resnet", cache=cache, **TINY).fit([str(path)])
    red = embedder.transform([str(path)])
    Image.new("RGB", (40, 40), (0, 0, 255)).save(path)  # same path, new picture
    blue = embedder.transform([str(path)])
    assert cache.stats()["misses"] == 2 and not np.allclose(red, blue)


def test_local_weights_change_the_fingerprint_and_the_vectors(cdiscount_products, tmp_path):
    import torch

    from skproduct.backbones import build_backbone, parse_backbone

    products = cdiscount_products.head(4)
    path = tmp_path / "w.pth"
    torch.save(build_backbone(parse_backbone("timm:test_resnet"), pretrained=False, weights=None,
                              image_size=None, seed=5).state_dict(), path)
    cache = EmbeddingCache(tmp_path / "emb")
    from_file = ImageEmbedder("timm:test_resnet", weights=path, cache=cache, **TINY).fit(products)
    seeded = ImageEmbedder("timm:test_resnet", cache=cache, **{**TINY, "random_state": 5}).fit(products)
    np.testing.assert_allclose(from_file.transform(products), seeded.transform(products), rtol=1e-6)
    assert from_file.fingerprint_ != seeded.fingerprint_
    torch.save(build_backbone(parse_backbone("timm:test_resnet"), pretrained=False, weights=None,
                              image_size=None, seed=6).state_dict(), path)  # new weights in the same file
    misses = cache.stats()["misses"]
    other = ImageEmbedder("timm:test_resnet", weights=path, cache=cache, **TINY).fit(products)
    assert not np.allclose(other.transform(products), seeded.transform(products))
    assert cache.stats()["misses"] == misses + _unique_pictures(products)


_RESUMABLE_RUN = """
import sys, time
import skproduct.embed as embed
from skproduct import ImageEmbedder
from skproduct.io import read_bson
embed._FLUSH_EVERY = 4
original = embed.ImageEmbedder._flush
def slow_flush(self, *args):
    original(self, *args)
    time.sleep(0.3)
embed.ImageEmbedder._flush = slow_flush
products = read_bson(sys.argv[1], index_path=sys.argv[3])
ImageEmbedder("timm:test_resnet", pretrained=False, image_size=48, batch_size=4, cache=sys.argv[2]).fit_transform(products)
"""


def test_a_killed_run_leaves_whole_vectors_and_the_rerun_computes_only_the_rest(
    cdiscount_sample, cdiscount_products, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "emb"
    process = subprocess.Popen(
        [sys.executable, "-c", _RESUMABLE_RUN, str(cdiscount_sample), str(cache_dir), str(tmp_path / "i.skpidx")]
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache_dir.glob("*/seg-*.skemb"))) < 3:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = EmbeddingCache(cache_dir).stats()["items"]
    unique = _unique_pictures(cdiscount_products)
    assert 0 < written < unique, "the run should have been killed half way"

    runs = _count_extracted(monkeypatch)
    resumed = ImageEmbedder("timm:test_resnet", cache=cache_dir, **TINY).fit_transform(cdiscount_products)
    assert sum(runs) == unique - written
    fresh = ImageEmbedder("timm:test_resnet", **TINY).fit_transform(cdiscount_products)
    np.testing.assert_allclose(resumed, fresh, rtol=1e-5, atol=1e-5)


_EXTRACT_SLICE = """
import sys
from skproduct import ImageEmbedder
from skproduct.io import read_bson
products = read_bson(sys.argv[1], index_path=sys.argv[3]).iloc[int(sys.argv[4]):int(sys.argv[5])]
ImageEmbedder("timm:test_resnet", pretrained=False, image_size=48, batch_size=4, cache=sys.argv[2]).fit_transform(products)
"""


def test_two_processes_extracting_overlapping_sets_into_one_cache(cdiscount_sample, cdiscount_products, tmp_path):
    cache_dir = tmp_path / "emb"
    processes = [
        subprocess.Popen([sys.executable, "-c", _EXTRACT_SLICE, str(cdiscount_sample), str(cache_dir),
                          str(tmp_path / f"i{k}.skpidx"), str(start), str(stop)])
        for k, (start, stop) in enumerate([(0, 55), (27, 82)])
    ]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    cache = EmbeddingCache(cache_dir)
    embedder = ImageEmbedder("timm:test_resnet", cache=cache, **TINY).fit(cdiscount_products)
    cached = embedder.transform(cdiscount_products)
    assert cache.stats()["misses"] == 0 and cache.stats()["items"] == _unique_pictures(cdiscount_products)
    fresh = ImageEmbedder("timm:test_resnet", **TINY).fit_transform(cdiscount_products)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-5)


def test_local_weights_file_for_open_clip(shopee_sample, tmp_path):
    import open_clip
    import torch

    paths = sorted(str(p) for p in (shopee_sample / "images").glob("00/*.jpg"))
    torch.manual_seed(3)
    full_model = open_clip.create_model("ViT-S-32", pretrained=None, force_image_size=64)
    torch.save(full_model.state_dict(), tmp_path / "clip.pt")
    options = dict(image_size=64, batch_size=8)
    from_file = ImageEmbedder("open_clip:ViT-S-32", weights=tmp_path / "clip.pt", **options).fit(paths)
    seeded = ImageEmbedder("open_clip:ViT-S-32", pretrained=False, random_state=3, **options).fit(paths)
    np.testing.assert_allclose(from_file.transform(paths), seeded.transform(paths), rtol=1e-5, atol=1e-6)


# -- persistence -------------------------------------------------------------------
def test_joblib_round_trip_of_embedder_and_pipeline(cdiscount_products, tmp_path):
    products = cdiscount_products.head(30)
    y = np.arange(30) % 2
    pipeline = Pipeline([("embed", ImageEmbedder("timm:test_resnet", **TINY)),  # no cache: the weights must travel
                         ("head", LogisticRegression())]).fit(products, y)
    joblib.dump(pipeline, tmp_path / "model.joblib")
    assert (tmp_path / "model.joblib").stat().st_size < 5_000_000  # weights and settings, not the cache
    loaded = joblib.load(tmp_path / "model.joblib")
    np.testing.assert_array_equal(loaded.predict_proba(products), pipeline.predict_proba(products))

    embedder = ImageEmbedder("timm:test_resnet", **TINY).fit(products)
    expected = embedder.transform(products)
    joblib.dump(embedder, tmp_path / "embedder.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "embedder.joblib").transform(products), expected)


def test_a_loaded_embedder_refitted_with_other_weights_uses_them(cdiscount_products, tmp_path):
    products = cdiscount_products.head(6)
    embedder = ImageEmbedder("timm:test_resnet", **TINY).fit(products)
    embedder.transform(products)  # builds the model, so the pickle holds its weights
    joblib.dump(embedder, tmp_path / "e.joblib")
    refitted = joblib.load(tmp_path / "e.joblib").set_params(random_state=1).fit(products)
    expected = ImageEmbedder("timm:test_resnet", **{**TINY, "random_state": 1}).fit_transform(products)
    np.testing.assert_array_equal(refitted.transform(products), expected)


def test_an_embedder_fitted_on_a_missing_device_loads_on_the_cpu(cdiscount_products, tmp_path):
    from skproduct.exceptions import DeviceFallbackWarning, DeviceUnavailableError

    products = cdiscount_products.head(4)
    embedder = ImageEmbedder("timm:test_resnet", **TINY).fit(products)
    expected = embedder.transform(products)
    embedder.__dict__.update(device="cuda:7", device_="cuda:7")  # as if fitted with device="cuda:7" on a GPU machine
    joblib.dump(embedder, tmp_path / "e.joblib")
    loaded = joblib.load(tmp_path / "e.joblib")
    with pytest.warns(DeviceFallbackWarning, match="cuda:7"):  # inherited from the file: the CPU, with a warning
        np.testing.assert_array_equal(loaded.transform(products), expected)
    assert loaded.device_ == "cuda:7"  # where it was fitted stays on record
    with pytest.raises(DeviceUnavailableError, match="cuda:7"):  # asked for now: an error
        loaded.set_params(device="cuda:7").transform(products)


def test_the_device_is_decided_at_the_call_and_keeps_the_cache_keys(cdiscount_products, tmp_path):
    from skproduct.exceptions import DeviceUnavailableError

    products = cdiscount_products.head(4)
    cache = EmbeddingCache(tmp_path / "emb")
    embedder = ImageEmbedder("timm:test_resnet", cache=cache, **TINY).fit(products)
    first = embedder.transform(products)
    key, misses = embedder.fingerprint_, cache.stats()["misses"]
    embedder.set_params(device="cpu")  # no refit
    np.testing.assert_array_equal(embedder.transform(products), first)
    assert embedder.fingerprint_ == key and cache.stats()["misses"] == misses  # every vector came from the cache
    with pytest.raises(DeviceUnavailableError, match="is not a torch device"):
        embedder.set_params(device="gpu").transform(products)


# -- bad pictures ---------------------------------------------------------------------
def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("cached", [False, True])
def test_bad_pictures_under_each_policy(tmp_path, cached):
    good, other, bad = _jpeg((200, 0, 0)), _jpeg((0, 200, 0)), b"not a picture"
    products = [[good, bad], [bad], [other]]
    options = dict(TINY, cache=tmp_path / "emb" if cached else None)

    with pytest.raises(ImageDecodeError, match=r"image bytes \(13 bytes\)"):
        ImageEmbedder("timm:test_resnet", **options).fit_transform(products)

    reference = ImageEmbedder("timm:test_resnet", **options).fit_transform([[good], [other]])
    with pytest.warns(EmptyProductWarning, match="1 of 3 products had no usable picture"), \
            pytest.warns(BadPictureWarning, match="could not be decoded and were skipped"):
        skipped = ImageEmbedder("timm:test_resnet", on_error="skip", **options).fit_transform(products)
    np.testing.assert_allclose(skipped[0], reference[0], rtol=1e-5, atol=1e-6)
    assert not skipped[1].any()
    np.testing.assert_allclose(skipped[2], reference[1], rtol=1e-5, atol=1e-6)

    with pytest.MonkeyPatch.context() as patch:
        runs = _count_extracted(patch)
        ImageEmbedder("timm:test_resnet", on_error="skip", **options).fit_transform(products)
    assert sum(runs) == (1 if cached else 4)  # cached: the bad picture alone is tried; never twice

    with pytest.warns(BadPictureWarning, match="could not be decoded and were replaced by blank pictures"):
        blank = ImageEmbedder("timm:test_resnet", on_error="blank", **options).fit_transform(products)
    black = ImageEmbedder("timm:test_resnet", **options).fit_transform([np.zeros((48, 48, 3), np.uint8)])
    np.testing.assert_allclose(blank[1], black[0], rtol=1e-5, atol=1e-5)


def test_bad_input_is_explained():
    embedder = ImageEmbedder("timm:test_resnet", **TINY)
    with pytest.raises(TypeError, match="X is a numeric array"):
        embedder.fit(np.zeros((3, 4))).transform(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no 'images' or 'image' column"):
        embedder.fit(pd.DataFrame({"x": [1]})).transform(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="product 1 has no pictures"):
        embedder.transform([["a.jpg"], []])
    with pytest.raises(ValueError, match="pooling"):
        ImageEmbedder(pooling="median").fit(["a.jpg"])


# -- scikit-learn's estimator checks ------------------------------------------------------
_NOT_PICTURES = "feeds numeric feature arrays; ImageEmbedder takes picture references (tested on real pictures above)"
_NO_FEATURE_COLUMNS = "inputs are pictures, not feature columns: there is no n_features_in_"
_FIT_LEARNS_NOTHING = "fit learns nothing from X (the backbone is pretrained or seeded); pictures are checked in transform"


class _EmbedderUnderChecks(ImageEmbedder):
    """Declares 2-D input so that scikit-learn runs its full battery instead of silently skipping it."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.string = False
        return tags


_EXPECTED_FAILED = {
    **{name: _NOT_PICTURES for name in [
        "check_fit_score_takes_y", "check_estimators_dtypes", "check_dtype_object", "check_complex_data",
        "check_pipeline_consistency", "check_estimators_pickle", "check_f_contiguous_array_estimator",
        "check_transformer_data_not_an_array", "check_transformer_general", "check_transformer_preserve_dtypes",
        "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_dict_unchanged",
        "check_fit_idempotent", "check_fit1d", "check_fit2d_predict1d",
    ]},
    "check_n_features_in_after_fitting": _NO_FEATURE_COLUMNS,
    "check_n_features_in": _NO_FEATURE_COLUMNS,
    "check_estimators_empty_data_messages": _FIT_LEARNS_NOTHING,
    "check_estimators_nan_inf": _FIT_LEARNS_NOTHING,
    "check_estimator_sparse_tag": _FIT_LEARNS_NOTHING,
}


@parametrize_with_checks(
    [_EmbedderUnderChecks("timm:test_resnet", pretrained=False, image_size=32)],
    expected_failed_checks=lambda estimator: _EXPECTED_FAILED,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_the_real_tags_say_pictures_not_arrays():
    tags = ImageEmbedder().__sklearn_tags__()
    assert tags.input_tags.two_d_array is False and tags.transformer_tags is not None


def test_references_for_worker_processes_pack_into_arrays(cdiscount_products):
    import pickle

    from skproduct.image_pipeline.data import CompactRefs

    refs = [ref for images in cdiscount_products["images"] for ref in images]
    packed = CompactRefs.pack(refs)
    assert isinstance(packed, CompactRefs) and [packed[i] for i in range(len(refs))] == refs
    assert packed.columns["table"].shape == (len(refs), 5) and len(packed.columns["files"]) == 1  # no object each
    assert [pickle.loads(pickle.dumps(packed))[i] for i in (0, len(refs) - 1)] == [refs[0], refs[-1]]
    paths = ["a.jpg", "dossier/été.jpg", ""]
    assert [CompactRefs.pack(paths)[i] for i in range(3)] == paths
    mixed = [refs[0], "a.jpg"]
    assert CompactRefs.pack(mixed) is mixed  # anything else stays a list


def test_bson_pictures_cached_under_content_keys_are_found_and_not_recomputed(cdiscount_sample, tmp_path,
                                                                                 monkeypatch):
    """A cache filled before BSON pictures were keyed by their place (content keys) still serves them."""
    import skproduct.embed as embed
    from skproduct import read_bson
    from skproduct.images import picture_content

    products = read_bson(cdiscount_sample, index_path=tmp_path / "sample.skpidx").iloc[:12]
    as_bytes = [[picture_content(ref) for ref in refs] for refs in products["images"]]  # content keys only
    options = {"backbone": "timm:test_resnet", "pretrained": False, "image_size": 32, "precision": "fp32",
               "cache": tmp_path / "cache"}
    expected = embed.ImageEmbedder(**options).fit(as_bytes).transform(as_bytes)
    monkeypatch.setattr(embed, "build_backbone", lambda *a, **k: pytest.fail("a cached picture was recomputed"))
    from skproduct import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache")
    again = embed.ImageEmbedder(**{**options, "cache": cache}).fit(products)
    before = cache.hits, cache.misses
    np.testing.assert_array_equal(again.transform(products), expected)
    distinct = len({bytes(b) for refs in as_bytes for b in refs})
    assert (cache.hits - before[0], cache.misses - before[1]) == (distinct, 0)  # one hit per picture, no miss
    np.testing.assert_array_equal(again.transform(products), expected)  # now found under their place keys
