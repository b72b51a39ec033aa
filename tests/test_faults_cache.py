"""Faults of the embedding cache, each injected on purpose: damaged bytes, unusable files, files of the earlier
format, a folder that cannot be written, two compactors at once; and the ``skproduct cache`` command."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skproduct import EmbeddingCache
from skproduct.cache import _cache as cache_module
from skproduct.cache import _format
from skproduct.cache._format import HEADER_V1, MAGIC_V1, MAGIC_V2, Segment, SegmentError, write_segment
from skproduct.cache._housekeeping import folder_lock
from skproduct.exceptions import CacheWriteWarning, StaleFileWarning

FORMAT0 = Path(__file__).parent / "data" / "format0"
DIM = 4
ROWS_PER_BLOCK = 10


# -- helpers --------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_blocks(monkeypatch):
    """Checksum blocks of 10 rows for vectors of 4 floats, so that small segments have several blocks."""
    monkeypatch.setattr(_format, "BLOCK_BYTES", ROWS_PER_BLOCK * (16 + 4 * DIM))


def _keys(n: int, tag: bytes = b"") -> np.ndarray:
    return EmbeddingCache.keys_for([tag + b"picture %d" % i for i in range(n)])


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _reopen(directory) -> EmbeddingCache:
    """The cache as a new process sees it (one object per folder and process, otherwise)."""
    cache_module._OPEN.pop(os.path.abspath(directory), None)
    return EmbeddingCache(directory)


def _put_as(cache: EmbeddingCache, fingerprint: str, name: str, keys, vectors) -> Path:
    """Put one segment and give it a known name (segments are read in name order)."""
    folder = cache.directory / fingerprint
    before = set(folder.glob("*.skemb")) if folder.exists() else set()
    cache.put(fingerprint, keys, vectors)
    (new,) = set(folder.glob("*.skemb")) - before
    return new.rename(folder / name)


def _flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    """Flip bits of one byte in place (the file keeps its inode, as a disk error would)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def _key_offset(row: int) -> int:
    return 32 + 16 * row


def _vector_offset(n: int, row: int, dim: int = DIM) -> int:
    return 32 + 16 * n + 4 * dim * row


def _write_format_1(path: Path, keys: np.ndarray, vectors: np.ndarray) -> None:
    path.write_bytes(HEADER_V1.pack(MAGIC_V1, len(keys), vectors.shape[1]) + keys.tobytes() + vectors.tobytes())


# -- the format ------------------------------------------------------------------------------------------------------
def test_new_segments_are_format_2_with_one_checksum_per_block(tmp_path, small_blocks):
    cache = EmbeddingCache(tmp_path / "c")
    cache.put("m", _keys(35), _vectors(35))
    (path,) = (tmp_path / "c" / "m").glob("*.skemb")
    assert path.read_bytes()[:8] == MAGIC_V2
    assert path.stat().st_size == 32 + 35 * 16 + 35 * DIM * 4 + 4 * 4 + 4
    segment = Segment.open(path)
    assert (segment.version, segment.n_blocks, segment.block_rows, segment.check_all()) == (2, 4, 10, [])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 30), dim=st.integers(1, 5), block_rows=st.integers(1, 12), data=st.data())
def test_any_flipped_bit_is_caught_in_the_block_it_hits(n, dim, block_rows, data):
    keys = np.array([bytes([i]) * 16 for i in range(n)], dtype="S16")
    vectors = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seg.skemb"
        write_segment(path, keys, dim, [vectors[: n // 2], vectors[n // 2:]], block_rows=block_rows)
        segment = Segment.open(path)
        assert segment.check_all() == [] and np.array_equal(segment.keys(), keys)
        assert np.array_equal(segment.vectors, vectors)
        del segment
        size = path.stat().st_size
        offset = data.draw(st.integers(0, size - 1), label="offset")
        _flip(path, offset, 1 << data.draw(st.integers(0, 7), label="bit"))
        if offset < 32 or offset >= _vector_offset(n, n, dim):  # the header or the checksum table
            with pytest.raises(SegmentError):
                Segment.open(path)
            return
        row = (offset - 32) // 16 if offset < _vector_offset(n, 0, dim) else (offset - _vector_offset(n, 0, dim)) // (
            4 * dim)
        assert Segment.open(path).check_all() == [row // block_rows]


# -- damaged blocks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region", ["keys", "vectors"])
def test_a_damaged_block_is_reported_once_dropped_and_the_rest_served(tmp_path, small_blocks, region):
    keys, vectors = _keys(35), _vectors(35)
    path = _put_as(EmbeddingCache(tmp_path / "c"), "m", "seg-a.skemb", keys, vectors)
    _flip(path, _key_offset(23) + 5 if region == "keys" else _vector_offset(35, 23) + 3)  # block 2: rows 20-29
    cache = _reopen(tmp_path / "c")
    with pytest.warns(StaleFileWarning, match=rf"{re.escape(str(path))} has a damaged block: block 2 \(of 4") as record:
        found_vectors, found = cache.get("m", keys)
    assert len(record) == 1
    damaged = (np.arange(35) >= 20) & (np.arange(35) < 30)
    assert found.tolist() == (~damaged).tolist()
    np.testing.assert_array_equal(found_vectors, vectors[~damaged])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert cache.get("m", keys)[1].tolist() == (~damaged).tolist()
    assert cache.stats()["items"] == 25


def test_the_embedder_recomputes_the_pictures_of_a_damaged_block(tmp_path, monkeypatch):
    from skproduct import ImageEmbedder, embed

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(10)]
    options = {"pretrained": False, "image_size": 32, "batch_size": 4}
    expected = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **options).fit_transform(pictures)
    (path,) = (tmp_path / "emb").glob("*/*.skemb")
    n, dim = struct.unpack("<QQ", path.read_bytes()[8:24])
    with open(path, "r+b") as f:  # the damage: bytes of a vector overwritten, values up to 1.8e27
        f.seek(_vector_offset(n, 3, dim))
        f.write(np.float32(1.8e27).tobytes() * 2)

    cache = _reopen(tmp_path / "emb")
    with pytest.warns(StaleFileWarning, match="damaged block"):
        again = ImageEmbedder("timm:test_resnet", cache=cache, **options).fit_transform(pictures)
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(again).max() < 1e3 and cache.stats()["misses"] == 10

    monkeypatch.setattr(embed, "build_backbone", lambda *a, **k: pytest.fail("recomputed a stored picture"))
    third = _reopen(tmp_path / "emb")  # the recomputed vectors were stored: a new process computes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleFileWarning)
        np.testing.assert_allclose(ImageEmbedder("timm:test_resnet", cache=third, **options).fit_transform(pictures),
                                   expected, rtol=1e-5, atol=1e-6)
    assert third.stats()["misses"] == 0


def test_a_good_copy_in_another_segment_replaces_a_damaged_one(tmp_path, small_blocks):
    keys, vectors = _keys(20), _vectors(20)
    cache = EmbeddingCache(tmp_path / "c")
    first = _put_as(cache, "m", "seg-a.skemb", keys, vectors)
    _put_as(cache, "m", "seg-b.skemb", keys[:5], vectors[:5])  # two processes wrote keys 0-4
    _flip(first, _vector_offset(20, 7))  # block 0 of the first copy: rows 0-9
    cache = _reopen(tmp_path / "c")
    with pytest.warns(StaleFileWarning, match="seg-a.skemb has a damaged block: block 0"):
        found_vectors, found = cache.get("m", keys)
    assert found.tolist() == [True] * 5 + [False] * 5 + [True] * 10
    np.testing.assert_array_equal(found_vectors, vectors[found])


def test_lookups_check_only_the_blocks_they_touch_and_stats_checks_none(tmp_path, small_blocks, monkeypatch):
    keys = _keys(1000)
    EmbeddingCache(tmp_path / "c").put("m", keys, _vectors(1000))  # 100 blocks
    checked = []
    check_block = Segment.check_block
    monkeypatch.setattr(Segment, "check_block", lambda self, block: checked.append(block) or check_block(self, block))
    cache = _reopen(tmp_path / "c")
    assert cache.stats()["items"] == 1000 and cache.dimension("m") == DIM and cache.summary()[0]["items"] == 1000
    assert checked == []
    assert cache.get("m", keys[[5, 15, 17]])[1].all()
    assert checked == [0, 1]
    cache.get("m", keys[[5, 15, 999]])
    assert checked == [0, 1, 99]  # each block once


@pytest.mark.parametrize("damage, reason", [
    ("empty", "empty"),
    ("cut", "cut short"),
    ("longer", "too long"),
    ("header", "header fails its checksum"),
    ("table", "table of block checksums fails"),
    ("newer", "format 4, written by a newer skproduct"),
    ("garbage", "not an skproduct cache segment"),
])
def test_a_segment_that_cannot_be_used_at_all_is_ignored_then_repaired(tmp_path, small_blocks, damage, reason):
    cache = EmbeddingCache(tmp_path / "c")
    good, bad = _keys(12, b"good"), _keys(12, b"bad")
    _put_as(cache, "m", "seg-a.skemb", good, _vectors(12))
    path = _put_as(cache, "m", "seg-b.skemb", bad, _vectors(12, seed=1))
    content = path.read_bytes()
    path.write_bytes({
        "empty": b"",
        "cut": content[:-3],
        "longer": content + b"\x00",
        "header": content[:10] + bytes([content[10] ^ 1]) + content[11:],
        "table": content[:-6] + bytes([content[-6] ^ 1]) + content[-5:],
        "newer": b"SKEMB\x00\x04\x00" + content[8:],
        "garbage": b"not a segment",
    }[damage])
    cache = _reopen(tmp_path / "c")
    with pytest.warns(StaleFileWarning, match=rf"unreadable cache segment {re.escape(str(path))}: .*{reason}"):
        assert cache.get("m", good)[1].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert not cache.get("m", bad)[1].any()
    report = cache.verify()
    assert not report["clean"] and [(e["path"], e["blocks"]) for e in report["damaged"]] == [(str(path), None)]
    assert reason in report["damaged"][0]["reason"] and path.exists()
    assert cache.verify(repair=True)["damaged"][0]["repaired"] and not path.exists()
    assert cache.verify()["clean"] and cache.get("m", good)[1].all()


# -- the earlier format ------------------------------------------------------------------------------------------------
def test_format_1_segments_stay_readable_and_compact_rewrites_them_with_checksums(tmp_path):
    shutil.copytree(FORMAT0 / "cache", tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("*/*.skemb")
    assert path.read_bytes()[:8] == MAGIC_V1
    old = Segment.open(path)
    keys, vectors, fingerprint = old.keys(), np.array(old.vectors), path.parent.name
    cache = EmbeddingCache(tmp_path / "cache")
    found_vectors, found = cache.get(fingerprint, keys)
    assert found.all() and np.array_equal(found_vectors, vectors)
    report = cache.verify()
    assert report["clean"] and report["legacy"] == [str(path)] and report["blocks"] == 0
    assert cache.summary()[0]["legacy"] == 1

    assert cache.compact() == 0  # one segment, none removed: rewritten in format 2
    (new,) = (tmp_path / "cache").glob("*/*.skemb")
    assert new.read_bytes()[:8] == MAGIC_V2
    report = cache.verify()
    assert report["clean"] and report["legacy"] == [] and report["segments"] == 1
    found_vectors, found = _reopen(tmp_path / "cache").get(fingerprint, keys)
    assert found.all() and np.array_equal(found_vectors, vectors)


def test_segments_of_both_formats_are_merged(tmp_path, small_blocks):
    keys, vectors = _keys(30), _vectors(30)
    folder = tmp_path / "c" / "m"
    folder.mkdir(parents=True)
    _write_format_1(folder / "seg-old.skemb", keys[:20], vectors[:20])
    cache = EmbeddingCache(tmp_path / "c")
    cache.put("m", keys[10:], vectors[10:])
    assert cache.compact() == 1
    found_vectors, found = _reopen(tmp_path / "c").get("m", keys)
    assert found.all() and np.array_equal(found_vectors, vectors)
    assert [Segment.open(p).version for p in folder.glob("*.skemb")] == [2]


# -- compaction ------------------------------------------------------------------------------------------------------
def test_a_second_compactor_merges_nothing_and_says_so(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path / "c")
    for i in range(3):
        cache.put("m", _keys(5, b"%d" % i), _vectors(5, seed=i))
    folder = tmp_path / "c" / "m"
    with folder_lock(folder) as held:  # flock is per open file: this is what another process holding it looks like
        assert held
        with caplog.at_level(logging.INFO, logger="skproduct.cache"):
            assert cache.compact() == 0
        assert "another process is compacting" in caplog.text
        assert [r.status for r in cache._compact_each("m")] == ["busy"]
        assert len(list(folder.glob("*.skemb"))) == 3
    assert cache.compact() == 2 and len(list(folder.glob("*.skemb"))) == 1


def _compactor(directory: str, barrier, results) -> None:
    cache = EmbeddingCache(directory)
    barrier.wait()
    results.put(cache.compact())


def test_two_processes_compacting_at_once_leave_one_copy(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = _keys(6000)
    vectors = _vectors(6000, dim=64)
    for start in range(0, 6000, 200):  # 30 segments
        cache.put("m", keys[start: start + 200], vectors[start: start + 200])
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_compactor, args=(str(tmp_path / "c"), barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert sorted([results.get(timeout=10), results.get(timeout=10)]) == [0, 29]
    segments = list((tmp_path / "c" / "m").glob("*.skemb"))
    assert len(segments) == 1 and sum(Segment.open(p).n for p in segments) == 6000  # one copy, not two
    found_vectors, found = _reopen(tmp_path / "c").get("m", keys)
    assert found.all() and np.array_equal(found_vectors, vectors)


def test_a_reader_keeps_working_while_another_process_compacts(tmp_path, monkeypatch):
    keys, vectors = _keys(30), _vectors(30)
    writer = EmbeddingCache(tmp_path / "c")
    for start in range(0, 30, 10):
        writer.put("m", keys[start: start + 10], vectors[start: start + 10])
    reader = _reopen(tmp_path / "c")
    assert reader.get("m", keys[:5])[1].all()  # its segments are open (memory-mapped)
    assert _reopen(tmp_path / "c").compact() == 2  # "another process" merges and deletes them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found_vectors, found = reader.get("m", keys)  # the old mappings, then the merged file's duplicates
        assert found.all() and np.array_equal(found_vectors, vectors)
        monkeypatch.setattr(Segment, "open", _refuse(errno.ENOENT))  # a segment gone between listing and opening
        writer.put("m", _keys(3, b"new"), _vectors(3))
        assert not reader.get("m", _keys(3, b"new"))[1].any()  # not seen yet: missing, no warning, no error


def test_compaction_streams_block_by_block(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    keys = _keys(10_000)
    vectors = _vectors(10_000, dim=512)  # 20 MB of vectors in 40 segments; checksum blocks of 1 MiB
    for start in range(0, 10_000, 250):
        cache.put("m", keys[start: start + 250], vectors[start: start + 250])
    cache = _reopen(tmp_path / "c")
    tracemalloc.start()
    try:
        assert cache.compact() == 39
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < vectors.nbytes / 4, f"compaction held {peak / 1e6:.1f} MB for {vectors.nbytes / 1e6:.1f} MB"
    found_vectors, found = _reopen(tmp_path / "c").get("m", keys)
    assert found.all() and np.array_equal(found_vectors, vectors)


def test_compaction_checks_every_block_and_leaves_damaged_ones_out(tmp_path, small_blocks):
    keys, vectors = _keys(40), _vectors(40)
    cache = EmbeddingCache(tmp_path / "c")
    first = _put_as(cache, "m", "seg-a.skemb", keys[:20], vectors[:20])
    _put_as(cache, "m", "seg-b.skemb", keys[20:], vectors[20:])
    _flip(first, _vector_offset(20, 12))  # block 1 of seg-a: keys 10-19
    with pytest.warns(StaleFileWarning, match="seg-a.skemb has a damaged block: block 1"):
        assert cache.compact() == 1
    assert cache.verify()["clean"]
    found_vectors, found = _reopen(tmp_path / "c").get("m", keys)
    assert found.tolist() == [True] * 10 + [False] * 10 + [True] * 20
    np.testing.assert_array_equal(found_vectors, vectors[found])


# -- verify and repair ------------------------------------------------------------------------------------------------
def test_verify_reports_damaged_blocks_and_repair_rewrites_atomically(tmp_path, small_blocks, monkeypatch):
    keys, vectors = _keys(35), _vectors(35)
    cache = EmbeddingCache(tmp_path / "c")
    path = _put_as(cache, "m", "seg-a.skemb", keys, vectors)
    _put_as(cache, "m", "seg-b.skemb", _keys(5, b"b"), _vectors(5))
    _flip(path, _vector_offset(35, 11))
    _flip(path, _key_offset(31))  # blocks 1 and 3 (the last, of 5 rows)
    damaged_bytes = path.read_bytes()
    report = cache.verify()
    assert (report["segments"], report["blocks"], report["vectors"], report["clean"]) == (2, 5, 40, False)
    assert report["damaged"] == [{"fingerprint": "m", "path": str(path), "blocks": [1, 3], "n_blocks": 4,
                                  "vectors": 15, "reason": "checksum mismatch", "repaired": False}]
    assert path.read_bytes() == damaged_bytes  # verify alone changes nothing

    with folder_lock(tmp_path / "c" / "m"):  # a compaction in progress: checked, not repaired
        report = cache.verify(repair=True)
    assert report["busy"] == ["m"] and not report["damaged"][0]["repaired"] and path.read_bytes() == damaged_bytes

    written = []
    atomic_write = _format.atomic_write
    monkeypatch.setattr(_format, "atomic_write", lambda target, **kw: written.append(Path(target)) or atomic_write(
        target, **kw))
    assert cache.verify(repair=True)["damaged"][0]["repaired"]
    assert written == [path] and Segment.open(path).n == 20
    assert sorted(p.name for p in path.parent.iterdir()) == [".compact.lock", "seg-a.skemb", "seg-b.skemb"]
    assert cache.verify()["clean"]
    found_vectors, found = cache.get("m", keys)
    kept = (np.arange(35) // 10) % 2 == 0
    assert found.tolist() == kept.tolist() and np.array_equal(found_vectors, vectors[kept])


def test_stats_and_summary_stay_cheap(tmp_path, small_blocks, monkeypatch):
    EmbeddingCache(tmp_path / "c").put("m", _keys(100), _vectors(100))
    monkeypatch.setattr(Segment, "check_block", lambda *a: pytest.fail("stats checked a block"))
    cache = _reopen(tmp_path / "c")
    assert cache.stats()["items"] == 100
    assert cache.summary() == [{"fingerprint": "m", "items": 100, "bytes": cache.stats()["bytes"], "segments": 1,
                                "dimension": DIM, "legacy": 0}]


# -- a cache that cannot be written -------------------------------------------------------------------------------------
def _refuse(code: int):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)

    return refuse


@pytest.mark.parametrize("code, why", [
    (errno.EROFS, "the file system is read-only"),
    (errno.EACCES, "no permission to write there"),
    (errno.ENOSPC, "the disk is full"),
])
def test_an_unwritable_cache_keeps_the_vectors_in_memory_with_one_warning(tmp_path, monkeypatch, code, why):
    cache = EmbeddingCache(tmp_path / "c")
    keys, vectors = _keys(20), _vectors(20)
    monkeypatch.setattr(os, "replace", _refuse(code))  # atomic_write's rename fails
    with pytest.warns(CacheWriteWarning, match=rf"{re.escape(str(tmp_path / 'c'))} could not be written \({why}") as \
            record:
        cache.put("m", keys[:10], vectors[:10])
    assert len(record) == 1 and "kept in this process's memory only" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        cache.put("m", keys[10:], vectors[10:])
    found_vectors, found = cache.get("m", keys)
    assert found.all() and np.array_equal(found_vectors, vectors) and cache.dimension("m") == DIM
    assert list((tmp_path / "c" / "m").iterdir()) == []  # no temporary file left behind
    assert cache.stats()["items"] == 0  # nothing on disk


def test_a_disk_that_fills_up_while_writing_and_a_folder_that_cannot_be_made(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "full")
    monkeypatch.setattr(_format._BlockWriter, "finish", _refuse(errno.ENOSPC))
    with pytest.warns(CacheWriteWarning, match="the disk is full"):
        cache.put("m", _keys(3), _vectors(3))
    assert cache.get("m", _keys(3))[1].all() and list((tmp_path / "full" / "m").iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setattr(Path, "mkdir", _refuse(errno.EACCES))
    cache = EmbeddingCache(tmp_path / "locked")
    with pytest.warns(CacheWriteWarning, match="no permission"):
        cache.put("m", _keys(3), _vectors(3))
    assert cache.get("m", _keys(3))[1].all()


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _refuse(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        EmbeddingCache(tmp_path / "c").put("m", _keys(3), _vectors(3))


def test_an_embedder_on_a_read_only_cache_does_not_abort(tmp_path, monkeypatch):
    from skproduct import ImageEmbedder

    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(6)]
    options = {"pretrained": False, "image_size": 32, "batch_size": 4}
    expected = ImageEmbedder("timm:test_resnet", **options).fit_transform(pictures)
    cache = EmbeddingCache(tmp_path / "ro")
    cache.put("other-model", _keys(2), _vectors(2))
    cache.put("other-model", _keys(2, b"x"), _vectors(2))
    monkeypatch.setattr(os, "replace", _refuse(errno.EROFS))
    embedder = ImageEmbedder("timm:test_resnet", cache=cache, **options)
    with pytest.warns(CacheWriteWarning, match="read-only"):
        np.testing.assert_allclose(embedder.fit_transform(pictures), expected, rtol=1e-5, atol=1e-6)
    misses = cache.stats()["misses"]
    np.testing.assert_allclose(embedder.transform(pictures), expected, rtol=1e-5, atol=1e-6)
    assert cache.stats()["misses"] == misses  # kept in memory: not computed twice
    assert cache.compact() == 0  # as 'skproduct extract' does after extracting: nothing merged, no error
    assert len(list((tmp_path / "ro" / "other-model").glob("*.skemb"))) == 2


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True).returncode == 0


_WRITE_IN_NAMESPACE = """
import sys, warnings
import numpy as np
from skproduct import EmbeddingCache
from skproduct.exceptions import CacheWriteWarning
cache = EmbeddingCache(sys.argv[1])
keys = EmbeddingCache.keys_for([b"%d" % i for i in range(int(sys.argv[2]))])
vectors = np.ones((len(keys), 256), np.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cache.put("m", keys, vectors)
assert cache.get("m", keys)[1].all()
print("|".join(f"{w.category.__name__}: {w.message}" for w in caught))
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs 'unshare -m' (a private mount namespace: root on Linux)")
@pytest.mark.parametrize("mount, pictures, expected", [
    ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"', 10, "the file system is read-only"),
    ('mount -t tmpfs -o size=64k tmpfs "$1"', 200, "the disk is full"),  # 200 KB of vectors
])
def test_for_real_a_read_only_mount_and_a_full_disk(tmp_path, mount, pictures, expected):
    folder = tmp_path / "cache"
    folder.mkdir()
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'{mount} && exec "$2" -c "$3" "$1" "$4"', "sh", str(folder), sys.executable,
         _WRITE_IN_NAMESPACE, str(pictures)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("CacheWriteWarning") and expected in done.stdout, done.stdout
    assert list(folder.iterdir()) == []  # nothing leaked out of the namespace


# -- the command line -------------------------------------------------------------------------------------------------
def test_cache_command(tmp_path, small_blocks, capsys):
    from skproduct.cli import main

    cache = EmbeddingCache(tmp_path / "c")
    path = _put_as(cache, "m", "seg-a.skemb", _keys(30), _vectors(30))
    _put_as(cache, "m", "seg-b.skemb", _keys(5, b"b"), _vectors(5))
    directory = str(tmp_path / "c")
    capsys.readouterr()

    assert main(["cache", "stats", directory]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"m: 35 vectors of 4 floats, {cache.stats()['bytes']} bytes in 2 segments",
        f"total: 35 vectors, {cache.stats()['bytes']} bytes, 1 fingerprint in {directory}",
    ]
    assert main(["cache", "verify", directory]) == 0
    assert capsys.readouterr().out == f"clean: 2 segments (4 blocks, 35 vectors) in {directory}\n"

    _flip(path, _vector_offset(30, 15))
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "verify", directory])
    assert exit_.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"damaged: {path}: block 1 (of 3, counted from 0) fails the checksum (10 vectors)"
    assert lines[1].startswith(f"damaged: 1 of 2 segments (4 blocks, 35 vectors) in {directory}, 10 vectors lost")
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "verify", "--repair", directory])
    assert exit_.value.code == 1 and capsys.readouterr().out.splitlines()[0].endswith("(10 vectors); dropped")
    assert main(["cache", "verify", directory]) == 0
    assert capsys.readouterr().out.startswith("clean: 2 segments (3 blocks, 25 vectors)")

    with folder_lock(tmp_path / "c" / "m"):
        assert main(["cache", "compact", directory]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "m: another process is compacting it; merged 0 segments", f"compacted {directory}: 0 segments removed"]
    assert main(["cache", "compact", directory]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "m: merged 2 segments into one (25 vectors)", f"compacted {directory}: 1 segment removed"]
    assert main(["cache", "prune", directory, "--max-bytes", "1M"]) == 0
    assert capsys.readouterr().out.startswith("freed 0 bytes")
    size = cache.stats()["bytes"]
    assert main(["cache", "prune", directory, "--max-bytes", "0"]) == 0
    assert capsys.readouterr().out == f"freed {size} bytes: {directory} holds 0 bytes (at most 0)\n"

    (tmp_path / "file").write_text("not a folder")
    for argv, message in [
        (["cache", "stats", str(tmp_path / "nope")], "no such folder"),
        (["cache", "verify", str(tmp_path / "file")], "is not a folder"),
        (["cache", "prune", directory, "--max-bytes", "lots"], "not a size"),
        (["cache"], "required"),
        (["cache", "compact", directory, "--fingerprint", "../up"], "not a usable fingerprint"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_cache_verify_exit_codes_of_the_program(tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    cache.put("m", _keys(5), _vectors(5))
    command = [sys.executable, "-m", "skproduct", "cache", "verify", str(tmp_path / "c")]
    assert subprocess.run(command, check=False, capture_output=True).returncode == 0
    (path,) = (tmp_path / "c" / "m").glob("*.skemb")
    _flip(path, _vector_offset(5, 2))
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout.startswith(f"damaged: {path}")
