"""EmbeddingCache: keys per model, memory-mapped reads, atomic segments, concurrent writers, housekeeping."""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest

from skproduct import EmbeddingCache


def _vectors_for(keys: np.ndarray, dim: int = 8) -> np.ndarray:
    """A deterministic vector per key, so that any process computes the same one."""
    return np.frombuffer(np.asarray(keys).tobytes(), dtype=np.uint8).reshape(len(keys), 16)[:, :dim].astype(np.float32)


def test_put_get_per_fingerprint(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = EmbeddingCache.keys_for([b"a", b"b", b"c"])
    cache.put("m1", keys[:2], _vectors_for(keys[:2]))
    vectors, found = cache.get("m1", keys)
    assert found.tolist() == [True, True, False]
    assert np.array_equal(vectors, _vectors_for(keys[:2]))
    assert not cache.get("m2", keys)[1].any()
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["items"], stats["fingerprints"]) == (2, 4, 2, 1)
    assert stats["bytes"] > 2 * 8 * 4
    assert cache.dimension("m1") == 8 and cache.dimension("m2") is None


def test_reads_are_memory_mapped_and_segments_immutable(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = EmbeddingCache.keys_for([b"x"])
    cache.put("m", keys, np.ones((1, 4), np.float32))
    cache.get("m", keys)
    assert all(isinstance(segment, np.memmap) for segment in cache._stores["m"].segments)
    cache.put("m", EmbeddingCache.keys_for([b"y"]), np.zeros((1, 4), np.float32))
    assert len(list((tmp_path / "c" / "m").glob("seg-*.skemb"))) == 2


def test_one_object_per_folder_shared_by_copies_and_pickles(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    assert EmbeddingCache(str(tmp_path / "c")) is cache
    assert copy.deepcopy(cache) is cache
    assert pickle.loads(pickle.dumps(cache)) is cache
    assert len(pickle.dumps(cache)) < 300
    home_cache = EmbeddingCache("~/.skproduct-test-cache")
    assert b"~/.skproduct-test-cache" in pickle.dumps(home_cache)  # portable to another user's home


def test_leftovers_of_a_killed_write_are_ignored_and_pruned(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = EmbeddingCache.keys_for([b"x"])
    cache.put("m", keys, np.ones((1, 4), np.float32))
    (tmp_path / "c" / "m" / ".tmp-12345.skemb").write_bytes(b"SKEMB\x00\x01\x00 half a vector")
    (tmp_path / "c" / "m" / "seg-cut.skemb").write_bytes(b"SKEMB\x00\x01\x00" + b"\x05" + b"\x00" * 15)
    assert cache.get("m", keys)[1].all()
    assert cache.stats()["items"] == 1
    assert cache.prune(max_bytes=10**9) == 0  # a young temporary file may be a write in progress
    old = time.time() - 7200
    os.utime(tmp_path / "c" / "m" / ".tmp-12345.skemb", (old, old))
    assert cache.prune(max_bytes=10**9) > 0  # an old one is a killed run's leftover
    assert not (tmp_path / "c" / "m" / ".tmp-12345.skemb").exists()


def test_prune_removes_old_temporaries_of_atomic_writes(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = EmbeddingCache.keys_for([b"x"])
    cache.put("m", keys, np.ones((1, 4), np.float32))
    leftover = tmp_path / "c" / "m" / ".seg-1-ab.skemb.12345.0badc0de.tmp"  # atomic_write's temporary
    leftover.write_bytes(b"SKEMB\x00\x01\x00 half a vector")
    assert cache.get("m", keys)[1].all() and cache.stats()["items"] == 1
    assert cache.prune(max_bytes=10**9) == 0
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert cache.prune(max_bytes=10**9) > 0 and not leftover.exists()
    assert cache.get("m", keys)[1].all()


def test_housekeeping_leaves_other_folders_alone(tmp_path):
    cache = EmbeddingCache(tmp_path)
    (tmp_path / "my_photos").mkdir()
    (tmp_path / "my_photos" / "cat.jpg").write_bytes(b"jpeg")
    (tmp_path / ".git").mkdir()
    cache.put("m", EmbeddingCache.keys_for([b"x"]), np.ones((1, 4), np.float32))
    (tmp_path / "m" / "notes.txt").write_text("mine")
    assert cache.stats()["fingerprints"] == 1
    cache.prune(max_bytes=0)
    cache.clear()
    assert (tmp_path / "my_photos" / "cat.jpg").exists() and (tmp_path / ".git").is_dir()
    assert (tmp_path / "m" / "notes.txt").exists() and not list((tmp_path / "m").glob("*.skemb"))


def test_clear_and_prune_to_a_size(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    for i, name in enumerate(["old", "mid", "new"]):
        keys = EmbeddingCache.keys_for([b"%d-%d" % (i, k) for k in range(50)])
        cache.put(name, keys, np.ones((50, 16), np.float32))
        for segment in (tmp_path / "c" / name).iterdir():
            os.utime(segment, (time.time() - 100 + i, time.time() - 100 + i))
    per_model = cache.stats()["bytes"] // 3
    cache.prune(max_bytes=2 * per_model)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["mid", "new"]
    cache.clear("mid")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["new"]
    cache.clear()
    assert cache.stats() == {"hits": 0, "misses": 0, "items": 0, "bytes": 0, "fingerprints": 0}


def _writer(directory: str, start: int, stop: int) -> None:
    cache = EmbeddingCache(directory)
    for begin in range(start, stop, 7):
        keys = EmbeddingCache.keys_for([b"picture %d" % i for i in range(begin, min(begin + 7, stop))])
        _, found = cache.get("shared-model", keys)
        if (~found).any():
            cache.put("shared-model", keys[~found], _vectors_for(keys[~found]))


def test_concurrent_writers_in_real_processes(tmp_path):
    directory = str(tmp_path / "c")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(directory, start, start + 300)) for start in (0, 150, 75)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    cache = EmbeddingCache(directory)
    keys = EmbeddingCache.keys_for([b"picture %d" % i for i in range(450)])
    vectors, found = cache.get("shared-model", keys)
    assert found.all()
    assert np.array_equal(vectors, _vectors_for(keys))
    assert cache.stats()["items"] == 450


def test_bad_fingerprints_and_shapes(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    with pytest.raises(ValueError, match="not a usable fingerprint"):
        cache.get("../escape", EmbeddingCache.keys_for([b"a"]))
    with pytest.raises(ValueError, match="one row of vectors per key"):
        cache.put("m", EmbeddingCache.keys_for([b"a", b"b"]), np.ones((1, 3), np.float32))


def test_compact_merges_segments_and_keeps_every_vector(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    rng = np.random.default_rng(0)
    keys = EmbeddingCache.keys_for([f"picture {i}".encode() for i in range(50)])
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    for start in range(0, 50, 10):  # five flushes, the last one repeating a key of the first
        chosen = np.r_[start : start + 10, 0]
        cache.put("model", keys[chosen], vectors[chosen])
    cache.put("other", keys[:3], vectors[:3])
    folder = tmp_path / "cache" / "model"
    assert len(list(folder.glob("*.skemb"))) == 5

    assert cache.compact() == 4  # "other" has a single segment: nothing to merge
    assert len(list(folder.glob("*.skemb"))) == 1
    found_vectors, found = cache.get("model", keys)
    assert found.all()
    np.testing.assert_array_equal(found_vectors, vectors)
    assert cache.stats()["items"] == 53
    assert cache.compact() == 0


def test_a_healthy_cache_verifies_clean_and_clear_leaves_no_lock_file(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    for i in range(3):
        cache.put("m", EmbeddingCache.keys_for([b"%d-%d" % (i, k) for k in range(4)]), np.ones((4, 8), np.float32))
    report = cache.verify()
    assert report["clean"] and (report["segments"], report["vectors"], report["damaged"]) == (3, 12, [])
    assert cache.summary() == [{"fingerprint": "m", "items": 12, "bytes": cache.stats()["bytes"], "segments": 3,
                                "dimension": 8, "legacy": 0}]
    assert cache.compact() == 2 and (tmp_path / "c" / "m" / ".compact.lock").exists()
    assert cache.verify(repair=True)["clean"] and cache.get("m", cache.keys_for([b"0-0"]))[1].all()
    cache.clear()
    assert not (tmp_path / "c" / "m").exists()
