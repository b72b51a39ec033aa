"""Catalogue scale (issue 14): float16 cache, merged index, out-of-core vectors, BSON keys, several files, streaming."""

from __future__ import annotations

import csv
import itertools
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from skproduct import EmbeddingCache, ImageEmbedder
from skproduct.cache import _store
from skproduct.cache._format import MAGIC_V2, MAGIC_V3, Segment

TINY = {"pretrained": False, "image_size": 32, "batch_size": 16}


def _keys(n: int, tag: bytes = b"") -> np.ndarray:
    return EmbeddingCache.keys_for([tag + b"picture %d" % i for i in range(n)])


def _vectors(n: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _segments(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.skemb"))


@pytest.fixture(scope="module")
def small_bson(cdiscount_sample, tmp_path_factory) -> Path:
    """The first 24 products of Cdiscount's sample, as a BSON file of their own."""
    import bson

    with open(cdiscount_sample, "rb") as f:
        documents = list(itertools.islice(bson.decode_file_iter(f), 24))
    path = tmp_path_factory.mktemp("small") / "small.bson"
    path.write_bytes(b"".join(bson.encode(document) for document in documents))
    return path


def _split_bson(source: Path, folder: Path, parts: int) -> list[Path]:
    import bson

    with open(source, "rb") as f:
        documents = list(bson.decode_file_iter(f))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in range(parts):
        path = folder / f"part-{part}.bson"
        path.write_bytes(b"".join(bson.encode(d) for d in documents[part::parts]))
        paths.append(path)
    return paths


# -- float16 storage ------------------------------------------------------------------------------------------------
def test_float16_cache_stores_half_the_bytes_and_reads_float32(tmp_path):
    keys, vectors = _keys(300), _vectors(300, dim=256)
    full, half = EmbeddingCache(tmp_path / "full"), EmbeddingCache(tmp_path / "half", dtype="float16")
    full.put("m", keys, vectors)
    half.put("m", keys, vectors)
    got, found = half.get("m", keys)
    assert found.all() and got.dtype == np.float32
    np.testing.assert_allclose(got, vectors, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(got, vectors)  # rounded: float16 really is what is stored
    (segment,) = _segments(tmp_path / "half")
    assert segment.read_bytes()[:8] == MAGIC_V3 and Segment.open(segment).dtype == np.float16
    assert _segments(tmp_path / "full")[0].read_bytes()[:8] == MAGIC_V2  # float32 keeps format 2
    ratio = half.stats()["bytes"] / full.stats()["bytes"]
    assert 0.5 < ratio < 0.52  # the 16-byte keys and the checksums are the rest


def test_float16_segments_keep_their_checksums_compaction_and_repair(tmp_path):
    cache = EmbeddingCache(tmp_path / "c", dtype="float16")
    for part in range(3):
        cache.put("m", _keys(40, b"%d" % part), _vectors(40, seed=part))
    assert cache.compact() == 2
    (segment,) = _segments(tmp_path / "c")
    assert Segment.open(segment).dtype == np.float16  # compaction kept the storage type
    data = bytearray(segment.read_bytes())
    data[40 + 16 * 120 + 10] ^= 0xFF  # a byte of the first vector
    segment.write_bytes(bytes(data))
    report = cache.verify()
    assert not report["clean"] and report["damaged"][0]["blocks"] == [0]
    assert cache.verify(repair=True)["damaged"][0]["repaired"] and cache.verify()["clean"]


def test_float32_and_float16_segments_mix_in_one_folder(tmp_path):
    EmbeddingCache(tmp_path / "c").put("m", _keys(10, b"a"), _vectors(10))
    EmbeddingCache(tmp_path / "c", dtype="float16").put("m", _keys(10, b"b"), _vectors(10, seed=1))
    reader = EmbeddingCache(tmp_path / "c")
    assert reader.get("m", np.concatenate([_keys(10, b"a"), _keys(10, b"b")]))[1].all()
    reader.compact()  # float32 and float16 merged: float32, nothing lost
    (segment,) = _segments(tmp_path / "c")
    assert Segment.open(segment).dtype == np.float32


def test_a_bad_storage_type_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="float32 or float16"):
        EmbeddingCache(tmp_path, dtype="int8")


# -- the index: merged, never re-sorted ---------------------------------------------------------------------------
def test_each_refresh_merges_only_the_new_segment_into_the_index(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "c")
    merged = []
    original = _store.Store._merge
    monkeypatch.setattr(_store.Store, "_merge", lambda self, keys, *rest: merged.append(len(keys)) or
                        original(self, keys, *rest))
    everything = []
    for part in range(30):
        keys = _keys(50, b"%d-" % part)
        everything.append(keys)
        cache.put("m", keys, _vectors(50, seed=part))
        assert cache.get("m", keys)[1].all()
    assert merged == [50] * 30  # the new segment's keys only: no re-sort of what was indexed
    all_keys = np.concatenate(everything)
    vectors, found = cache.get("m", all_keys[::-1])
    assert found.all()
    np.testing.assert_array_equal(vectors[-50:][::-1], _vectors(50, seed=0))
    store = cache._stores["m"]
    assert (store.keys[1:] > store.keys[:-1]).all()  # one sorted array: one binary search per lookup


def test_a_key_written_twice_keeps_its_first_copy_across_refreshes(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = _keys(20)
    cache.put("m", keys, np.zeros((20, 4), np.float32))
    assert cache.get("m", keys)[1].all()
    cache.put("m", keys[5:15], np.ones((10, 4), np.float32))
    vectors, found = cache.get("m", keys)
    assert found.all() and not vectors.any()
    assert cache.stats()["items"] == 20


def test_stats_counts_items_without_vectors_kept_in_memory(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    cache.put("m", _keys(30), _vectors(30))
    cache._store("m").add_memory(_keys(5, b"mem"), _vectors(5))
    stats = cache.stats()
    assert stats["items"] == 30 and stats["fingerprints"] == 1


# -- out-of-core vectors ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return [[rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(1 + i % 3)] for i in range(18)]


def test_out_memmap_writes_a_read_only_npy_in_the_cache_folder(pictures, tmp_path):
    in_memory = ImageEmbedder("timm:test_resnet", cache=tmp_path / "c", **TINY).fit_transform(pictures)
    embedder = ImageEmbedder("timm:test_resnet", cache=tmp_path / "c", out="memmap", **TINY).fit()
    vectors = embedder.transform(pictures)
    assert isinstance(vectors, np.memmap) and not vectors.flags.writeable
    assert Path(vectors.filename).parent == tmp_path / "c" / ".vectors"
    np.testing.assert_array_equal(vectors, in_memory)
    assert not list((tmp_path / "c" / ".vectors").glob(".*.tmp"))  # written through a temporary, renamed
    assert EmbeddingCache(tmp_path / "c").stats()["fingerprints"] == 1  # .vectors is not a fingerprint


def test_out_path_gives_an_npy_that_numpy_reopens(pictures, tmp_path):
    target = tmp_path / "out" / "vectors.npy"
    vectors = ImageEmbedder("timm:test_resnet", out=target, **TINY).fit_transform(pictures)
    np.testing.assert_array_equal(np.load(target), vectors)
    assert vectors.shape == (len(pictures), 96)


def test_heads_fit_and_predict_on_memmapped_vectors_as_on_arrays(pictures, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from skproduct.heads import TorchLinearClassifier

    vectors = ImageEmbedder("timm:test_resnet", out=tmp_path / "v.npy", **TINY).fit_transform(pictures)
    y = np.arange(len(pictures)) % 3
    array = np.array(vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for head in (TorchLinearClassifier(max_iter=5, random_state=0), LogisticRegression(max_iter=50)):
            on_map = head.fit(vectors, y).predict(vectors)
            np.testing.assert_array_equal(on_map, head.fit(array, y).predict(array))


def test_lookups_in_blocks_give_the_same_vectors(small_bson, tmp_path, monkeypatch):
    import skproduct.embed as embed
    from skproduct.io import read_bson

    products = read_bson(small_bson, index_path=tmp_path / "i.skpidx")
    whole = ImageEmbedder("timm:test_resnet", cache=tmp_path / "c", **TINY).fit_transform(products)
    monkeypatch.setattr(embed, "_LOOKUP_BLOCK", 4)  # a product's pictures straddle blocks
    blocks = ImageEmbedder("timm:test_resnet", cache=tmp_path / "c", **TINY).fit_transform(products)
    fresh = ImageEmbedder("timm:test_resnet", cache=tmp_path / "other", **TINY).fit_transform(products)
    np.testing.assert_array_equal(blocks, whole)
    np.testing.assert_allclose(fresh, whole, rtol=1e-5, atol=1e-6)


def test_bad_out_values_are_clear_errors(pictures):
    with pytest.raises(ValueError, match="out='vectors.csv' is neither"):
        ImageEmbedder("timm:test_resnet", out="vectors.csv", **TINY).fit_transform(pictures[:2])


def test_torch_linear_predict_does_not_depend_on_its_internal_chunks(monkeypatch):
    from skproduct.heads import TorchLinearClassifier, linear

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((300, 6)).astype(np.float32), rng.integers(0, 5, 300)
    head = TorchLinearClassifier(max_iter=3, random_state=0).fit(X, y)
    whole = head.predict(X)
    monkeypatch.setattr(linear, "_SCORE_BLOCK_VALUES", 7)  # one row per block
    np.testing.assert_array_equal(head.predict(X), whole)
    np.testing.assert_array_equal(head.predict(X), head.classes_[head.predict_proba(X).argmax(axis=1)])


# -- BSON keys: from the byte ranges ----------------------------------------------------------------------------------
def test_a_cached_bson_transform_reads_no_picture(small_bson, tmp_path, monkeypatch):
    from skproduct.io import BsonImageRef, read_bson

    products = read_bson(small_bson, index_path=tmp_path / "i.skpidx")
    first = ImageEmbedder("timm:test_resnet", cache=tmp_path / "c", **TINY).fit_transform(products)
    monkeypatch.setattr(BsonImageRef, "read_bytes", lambda self: pytest.fail("a picture was read"))
    again = ImageEmbedder("timm:test_resnet", cache=tmp_path / "c", **TINY).fit_transform(products)
    np.testing.assert_array_equal(first, again)


def test_bson_keys_follow_the_content_of_the_file_not_its_name(small_bson, cdiscount_sample, tmp_path):
    from skproduct.image_pipeline.keys import bson_picture_keys
    from skproduct.io import read_bson

    keys = bson_picture_keys(read_bson(small_bson, index_path=tmp_path / "a.skpidx")["images"].array)
    assert len(np.unique(keys)) == len(keys)
    copy = tmp_path / "copy.bson"
    shutil.copy(small_bson, copy)  # another name and another modification time: the same pictures
    same = bson_picture_keys(read_bson(copy, index_path=tmp_path / "b.skpidx")["images"].array)
    np.testing.assert_array_equal(same, keys)
    other = bson_picture_keys(read_bson(cdiscount_sample, index_path=tmp_path / "c.skpidx")["images"].array)
    assert not np.isin(other, keys).any()  # another file: other keys, even for pictures at the same offsets


# -- several files ----------------------------------------------------------------------------------------------------
def test_read_bson_takes_a_glob_or_a_list_as_one_frame(cdiscount_sample, tmp_path):
    from skproduct.io import read_bson

    parts = _split_bson(cdiscount_sample, tmp_path / "parts", 3)
    whole = read_bson(str(tmp_path / "parts" / "part-*.bson"))
    listed = read_bson(parts)
    assert len(whole) == 82 and whole.index.tolist() == list(range(82))
    assert whole["product_id"].tolist() == listed["product_id"].tolist()
    assert {refs[0].path for refs in whole["images"]} == {str(p) for p in parts}  # each reference names its file
    row = int(np.flatnonzero(whole["product_id"].to_numpy() == read_bson(parts[2])["product_id"][0])[0])
    assert whole["images"][row][0].read_bytes() == read_bson(parts[2])["images"][0][0].read_bytes()
    with pytest.raises(FileNotFoundError, match="no BSON file matches"):
        read_bson(str(tmp_path / "nothing-*.bson"))
    with pytest.raises(ValueError, match="one index_path for 3 BSON files"):
        read_bson(parts, index_path=tmp_path / "one.skpidx")


# -- streaming commands -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(small_bson, tmp_path_factory) -> tuple[Path, Path]:
    from skproduct.cli import main

    folder = tmp_path_factory.mktemp("model")
    cache = folder / "cache"
    assert main(["fit", str(small_bson), "--head", "linear", "--backbone", "timm:test_resnet", "--no-pretrained",
                 "--image-size", "32", "--quiet", "--cache", str(cache), "--out", str(folder / "m.joblib")]) == 0
    return folder / "m.joblib", cache


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_predict_streams_in_chunks_and_writes_the_same_submission(small_bson, model_file, tmp_path, monkeypatch):
    from skproduct.cli import _data, main

    model, cache = model_file
    args = ["predict", str(model), str(small_bson), "--cache", str(cache), "--top-k", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one.csv")]) == 0
    monkeypatch.setattr(_data, "PRODUCTS_PER_CHUNK", 5)
    calls = []
    from skproduct.heads import TorchLinearClassifier

    original = TorchLinearClassifier.predict_proba
    monkeypatch.setattr(TorchLinearClassifier, "predict_proba", lambda self, X: calls.append(len(X)) or
                        original(self, X))
    assert main([*args, "--out", str(tmp_path / "chunks.csv")]) == 0
    assert calls == [5, 5, 5, 5, 4]  # never more than a chunk of probabilities
    assert _rows(tmp_path / "chunks.csv") == _rows(tmp_path / "one.csv")
    assert _rows(tmp_path / "one.csv")[0] == ["_id", "category_id", "category_id_2", "category_id_3"]
    assert len(_rows(tmp_path / "one.csv")) == 25


def test_a_predict_killed_half_way_leaves_no_file_and_a_rerun_reuses_the_cache(small_bson, model_file, tmp_path,
                                                                                monkeypatch):
    from skproduct.cli import _data, main
    from skproduct.heads import TorchLinearClassifier

    model, cache = model_file
    out = tmp_path / "submission.csv"
    monkeypatch.setattr(_data, "PRODUCTS_PER_CHUNK", 8)
    original, seen = TorchLinearClassifier.predict, []

    def interrupted(self, X):
        seen.append(len(X))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, X)

    monkeypatch.setattr(TorchLinearClassifier, "predict", interrupted)
    assert main(["predict", str(model), str(small_bson), "--cache", str(cache), "--out", str(out), "-q"]) == 130
    assert not out.exists() and not list(tmp_path.iterdir())  # no half file, no temporary left
    monkeypatch.setattr(TorchLinearClassifier, "predict", original)
    before = EmbeddingCache(cache).stats()
    assert main(["predict", str(model), str(small_bson), "--cache", str(cache), "--out", str(out), "-q"]) == 0
    after = EmbeddingCache(cache).stats()
    assert after["misses"] == before["misses"] and after["hits"] > before["hits"]  # every picture from the cache
    assert len(_rows(out)) == 25


def test_evaluate_in_chunks_scores_as_in_one_piece(small_bson, model_file, tmp_path, monkeypatch, capsys):
    import json

    from skproduct.cli import _data, main

    model, cache = model_file
    args = ["evaluate", str(model), str(small_bson), "--cache", str(cache), "--top-k", "2", "-q"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    monkeypatch.setattr(_data, "PRODUCTS_PER_CHUNK", 7)
    assert main([*args, "--json", str(tmp_path / "chunks.json")]) == 0
    one, chunks = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "chunks.json"))
    for name in ("accuracy", "top_k_accuracy", "n_products", "n_no_usable_picture"):
        assert one[name] == chunks[name]


def test_every_command_takes_several_files(cdiscount_sample, model_file, tmp_path):
    from skproduct.cli import main

    model, cache = model_file
    parts = _split_bson(cdiscount_sample, tmp_path / "parts", 2)
    out = tmp_path / "sub.csv"
    assert main(["predict", str(model), *map(str, parts), "--cache", str(cache), "--out", str(out), "-q"]) == 0
    assert len(_rows(out)) == 83
    assert main(["predict", str(model), str(tmp_path / "parts" / "part-*.bson"), "--cache", str(cache),
                 "--out", str(tmp_path / "glob.csv"), "-q"]) == 0
    assert _rows(tmp_path / "glob.csv") == _rows(out)
    assert main(["extract", *map(str, parts), "--backbone", "timm:test_resnet", "--no-pretrained", "--image-size",
                 "32", "-q", "--cache", str(cache), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (82, 96)
