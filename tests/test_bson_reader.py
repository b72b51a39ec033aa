"""read_bson: real files, round trips in any field order, the sidecar index, and bad input."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tracemalloc
from pathlib import Path

import bson
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skproduct.exceptions import BsonFormatError, BsonTruncatedError
from skproduct.images import load_image
from skproduct.io import BsonImageRef, bson_sidecar, default_index_path, read_bson


def _decoded(path) -> list[dict]:
    with open(path, "rb") as f:
        return list(bson.decode_file_iter(f))


def _write(path: Path, documents: list[dict]) -> Path:
    path.write_bytes(b"".join(bson.encode(doc) for doc in documents))
    return path


# -- the real files -------------------------------------------------------------
def test_cdiscount_sample_facts(cdiscount_sample, read_shared_bson):
    products = read_shared_bson(cdiscount_sample)
    assert len(products) == 82
    assert products["n_images"].sum() == 110
    assert products["n_images"].value_counts().to_dict() == {1: 67, 2: 7, 3: 3, 4: 5}
    assert products["category_id"].nunique() == 36
    assert str(products["category_id"].dtype) == "Int64"
    for refs in products["images"]:
        for ref in refs:
            image = load_image(ref)
            assert (image.mode, image.size) == ("RGB", (180, 180))


def test_cdiscount_sample_matches_pymongo(cdiscount_sample, read_shared_bson):
    products = read_shared_bson(cdiscount_sample)
    documents = _decoded(cdiscount_sample)
    assert products["product_id"].tolist() == [doc["_id"] for doc in documents]
    assert products["category_id"].tolist() == [doc["category_id"] for doc in documents]
    for refs, doc in zip(products["images"], documents):
        assert [ref.read_bytes() for ref in refs] == [img["picture"] for img in doc["imgs"]]
        assert [ref.index for ref in refs] == list(range(len(doc["imgs"])))


@pytest.mark.slow
def test_fashion_small_other_field_order(fashion_bson, read_shared_bson):
    products = read_shared_bson(fashion_bson)
    assert len(products) == 44_072
    assert (products["n_images"] == 1).all()
    with open(fashion_bson, "rb") as f:
        iterator = bson.decode_file_iter(f)
        head = [next(iterator) for _ in range(200)]
    assert list(head[0]) == ["_id", "category_id", "imgs"]
    assert products["product_id"].head(200).tolist() == [doc["_id"] for doc in head]
    assert products["category_id"].head(200).tolist() == [doc["category_id"] for doc in head]
    assert [refs[0].read_bytes() for refs in products["images"].head(200)] == [
        doc["imgs"][0]["picture"] for doc in head
    ]


# -- round trips ------------------------------------------------------------------
_EXTRA_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.floats(allow_nan=False), st.booleans(),
    st.none(), st.binary(max_size=30), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(0, 9), max_size=3),
)
_PRODUCT = st.fixed_dictionaries(
    {
        "_id": st.integers(-(2**63), 2**63 - 1),
        "pictures": st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4),
        "category_id": st.one_of(st.none(), st.integers(0, 2**40)),
        "extra": st.dictionaries(st.sampled_from(["title", "price", "x", "imgs_count", "_ids"]), _EXTRA_VALUES),
    }
)


def _document(product: dict, order: list[str]) -> dict:
    fields = {"_id": product["_id"], "imgs": [{"picture": p} for p in product["pictures"]], **product["extra"]}
    if product["category_id"] is not None:
        fields["category_id"] = product["category_id"]
    return {name: fields[name] for name in order if name in fields}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(products=st.lists(_PRODUCT, min_size=1, max_size=12), data=st.data())  # 0 products: an empty file, an error
def test_round_trip_any_field_order(tmp_path_factory, products, data):
    folder = tmp_path_factory.mktemp("roundtrip")
    documents = []
    for product in products:
        order = data.draw(st.permutations(["_id", "imgs", "category_id", *product["extra"]]))
        documents.append(_document(product, order))
    path = _write(folder / "products.bson", documents)

    frame = read_bson(path)

    assert frame["product_id"].tolist() == [p["_id"] for p in products]
    expected_categories = [pd.NA if p["category_id"] is None else p["category_id"] for p in products]
    assert frame["category_id"].astype(object).tolist() == expected_categories
    assert frame["n_images"].tolist() == [len(p["pictures"]) for p in products]
    assert [[ref.read_bytes() for ref in refs] for refs in frame["images"]] == [p["pictures"] for p in products]


def test_test_file_without_labels(tmp_path):
    path = _write(tmp_path / "test.bson", [{"_id": i, "imgs": [{"picture": b"jpeg"}]} for i in range(3)])
    frame = read_bson(path)
    assert frame["category_id"].isna().all()
    assert str(frame["category_id"].dtype) == "Int64"


def test_empty_file_is_an_error_naming_it(tmp_path):
    """A zero-length file is no catalogue (an interrupted download or copy): an error naming it, not 0 products."""
    from skproduct.io.bson_scan import scan_bson

    path = tmp_path / "empty.bson"
    path.write_bytes(b"")
    for read in (read_bson, scan_bson):
        with pytest.raises(BsonFormatError, match=r"empty\.bson.*the file is empty \(0 bytes\)"):
            read(path)


def test_string_ids_are_kept(tmp_path):
    path = _write(tmp_path / "s.bson", [{"_id": "sku-1", "imgs": [{"picture": b"a"}]}])
    assert read_bson(path)["product_id"].tolist() == ["sku-1"]


# -- the images column ------------------------------------------------------------------
def test_images_column_survives_selection_concat_and_pickle(tmp_path):
    first = _write(tmp_path / "a.bson", [{"_id": i, "imgs": [{"picture": bytes([i]) * (i + 1)}]} for i in range(5)])
    second = _write(tmp_path / "b.bson", [{"_id": 100 + i, "imgs": [{"picture": b"b%d" % i}] * 2} for i in range(3)])
    a, b = read_bson(first), read_bson(second)

    subset = a.iloc[[4, 0, 2]]
    assert [refs[0].read_bytes() for refs in subset["images"]] == [b"\x04" * 5, b"\x00", b"\x02" * 3]

    assert a.reindex([0, 99])["images"].isna().tolist() == [False, True]

    both = pd.concat([a, b], ignore_index=True)
    assert len(both) == 8
    assert [ref.read_bytes() for ref in both["images"][6]] == [b"b1", b"b1"]
    assert both["images"][6][0].product_id == 101

    restored = pickle.loads(pickle.dumps(both))
    assert [[r.read_bytes() for r in refs] for refs in restored["images"]] == [
        [r.read_bytes() for r in refs] for refs in both["images"]
    ]
    assert restored["images"].equals(both["images"])


def _read_in_worker(ref: BsonImageRef) -> bytes:
    return ref.read_bytes()


def test_refs_pickle_small_and_read_in_worker_processes(tmp_path):
    pictures = [os.urandom(5000) for _ in range(6)]
    path = _write(tmp_path / "p.bson", [{"_id": i, "imgs": [{"picture": p}]} for i, p in enumerate(pictures)])
    refs = [refs[0] for refs in read_bson(path)["images"]]
    assert all(len(pickle.dumps(ref)) < 300 for ref in refs)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_read_in_worker, refs) == pictures


def test_reading_one_product_reads_only_its_bytes(tmp_path, monkeypatch):
    path = _write(tmp_path / "p.bson", [{"_id": i, "imgs": [{"picture": os.urandom(10_000)}]} for i in range(20)])
    ref = read_bson(path)["images"][7][0]
    import builtins

    sizes = []
    real_open = builtins.open

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            sizes.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    assert len(ref.read_bytes()) == 10_000
    assert sizes == [10_000]


def test_memory_grows_with_products_not_file_size(tmp_path):
    big = os.urandom(1_000_000)
    path = _write(tmp_path / "big.bson", [{"_id": i, "imgs": [{"picture": big}] * 2} for i in range(24)])
    assert path.stat().st_size > 45_000_000
    tracemalloc.start()
    try:
        frame = read_bson(path, rebuild_index=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frame) == 24
    assert peak < 10_000_000, f"indexing a {path.stat().st_size} byte file peaked at {peak} bytes"


# -- the sidecar index ------------------------------------------------------------------
def test_sidecar_is_reused_then_rebuilt_after_a_change(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.bson", [{"_id": i, "imgs": [{"picture": b"x"}]} for i in range(3)])
    read_bson(path)
    assert Path(str(path) + ".skpidx").exists()

    def no_scan(*args, **kwargs):
        raise AssertionError("the sidecar should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(bson_sidecar, "scan_bson", no_scan)
        assert len(read_bson(path)) == 3

    with open(path, "ab") as f:
        f.write(bson.encode({"_id": 3, "imgs": [{"picture": b"y"}]}))
    frame = read_bson(path)
    assert frame["product_id"].tolist() == [0, 1, 2, 3]
    assert frame["images"][3][0].read_bytes() == b"y"


def test_sidecar_falls_back_to_the_cache_folder(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}])
    Path(str(path) + ".skpidx").mkdir()  # the preferred place cannot take a file
    cache = tmp_path / "cache"
    monkeypatch.setenv("SKPRODUCT_CACHE_DIR", str(cache))
    assert len(read_bson(path)) == 1
    saved = list((cache / "bson-index").glob("t.bson-*.skpidx"))
    assert len(saved) == 1
    monkeypatch.setattr(bson_sidecar, "scan_bson", lambda *a, **k: pytest.fail("should reuse the cached index"))
    assert len(read_bson(path)) == 1


def test_corrupt_sidecar_is_rebuilt(tmp_path):
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}])
    read_bson(path)
    Path(str(path) + ".skpidx").write_bytes(b"garbage")
    assert read_bson(path)["product_id"].tolist() == [1]


def test_index_path_is_a_regular_file_or_a_link_to_one(tmp_path):
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}])
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="folder is a folder, not a regular file: pass a file path"):
        read_bson(path, index_path=tmp_path / "folder")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(ValueError, match="pipe is a FIFO, not a regular file"):
            read_bson(path, index_path=tmp_path / "pipe")
    link = tmp_path / "link.skpidx"
    link.symlink_to(tmp_path / "real.skpidx")
    assert len(read_bson(path, index_path=link)) == 1
    assert link.is_symlink() and (tmp_path / "real.skpidx").is_file()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_where_the_sidecar_goes_is_never_opened(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}])
    os.mkfifo(str(path) + ".skpidx")
    monkeypatch.setenv("SKPRODUCT_CACHE_DIR", str(tmp_path / "cache"))
    assert len(read_bson(path)) == 1  # opening the FIFO would block
    assert len(list((tmp_path / "cache" / "bson-index").glob("t.bson-*.skpidx"))) == 1


def test_default_index_path_leaves_the_data_folder_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SKPRODUCT_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}])
    where = default_index_path(path)
    assert where.parent == tmp_path / "cache" / "bson-index"
    read_bson(path, index_path=where)
    assert where.is_file() and sorted(os.listdir(tmp_path)) == ["cache", "t.bson"]
    read_bson(path, rebuild_index=True)  # read_bson's own choice: beside the file
    assert default_index_path(path) == Path(str(path) + ".skpidx")


# -- bad input --------------------------------------------------------------------------
def test_not_a_bson_file(tmp_path):
    path = tmp_path / "notes.bson"
    path.write_text("product_id,category\n1,2\n")
    with pytest.raises(BsonFormatError, match="not a BSON file") as info:
        read_bson(path)
    assert info.value.path == str(path)
    assert (info.value.offset, info.value.position) == (0, 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), cut=st.integers(1, 10_000))
def test_truncated_tail_raises_or_keeps_whole_products(tmp_path_factory, n, cut):
    folder = tmp_path_factory.mktemp("truncated")
    documents = [{"_id": i, "imgs": [{"picture": os.urandom(50 + i)}], "category_id": 7} for i in range(n)]
    whole = b"".join(bson.encode(doc) for doc in documents)
    last_start = len(whole) - len(bson.encode(documents[-1]))
    keep = last_start + 1 + cut % (len(whole) - last_start - 1)
    path = folder / "cut.bson"
    path.write_bytes(whole[:keep])

    if keep - last_start < 5 and n == 1:  # too little left to tell a cut BSON file from any other file
        with pytest.raises(BsonFormatError, match="not a BSON file"):
            read_bson(path, index_path=folder / "idx.npz")
        return
    with pytest.raises(BsonTruncatedError) as info:
        read_bson(path, index_path=folder / "idx.npz")
    assert (info.value.offset, info.value.position) == (last_start, n - 1)
    with pytest.warns(UserWarning, match=f"kept the {n - 1} whole products"):
        frame = read_bson(path, on_truncated="warn", index_path=folder / "idx.npz")
    assert frame["product_id"].tolist() == list(range(n - 1))
    if n > 1:
        assert str(path) in str(info.value) and "on_truncated='warn'" in str(info.value)
        with pytest.raises(BsonTruncatedError):  # a saved index does not hide the truncation
            read_bson(path, index_path=folder / "idx.npz")


def _set_type(document: bytes, name: bytes, etype: int) -> bytes:
    at = document.index(name + b"\x00") - 1
    return document[:at] + bytes([etype]) + document[at + 1 :]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: _set_type(d, b"title", 0x42), "unknown BSON element type 0x42"),
        (lambda d: _set_type(d, b"category_id", 0x02), "'category_id' has BSON type 0x02"),
        (lambda d: d[:-1] + b"\x07", "does not end with a null byte"),
        (lambda d: d.replace(b"picture\x00", b"pictura\x00"), "has no 'picture' field"),
    ],
    ids=["unknown-type", "category-not-integer", "no-terminator", "no-picture-field"],
)
def test_document_that_does_not_decode(tmp_path, corrupt, message):
    documents = [
        bson.encode({"_id": i, "title": "a lamp", "imgs": [{"picture": b"jpeg%d" % i}], "category_id": 5})
        for i in range(4)
    ]
    offset = sum(map(len, documents[:2]))
    documents[2] = corrupt(documents[2])
    path = tmp_path / "bad.bson"
    path.write_bytes(b"".join(documents))
    with pytest.raises(BsonFormatError, match=message) as info:
        read_bson(path)
    assert (info.value.offset, info.value.position) == (offset, 2)
    assert f"{path}: product 2 at byte offset {offset}" in str(info.value)


@pytest.mark.parametrize("imgs", [[], None], ids=["empty-imgs", "no-imgs"])
def test_product_without_pictures(tmp_path, imgs):
    bad = {"_id": 9, "category_id": 1} | ({} if imgs is None else {"imgs": imgs})
    path = _write(tmp_path / "bad.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}, bad])
    with pytest.raises(BsonFormatError, match="has no picture") as info:
        read_bson(path)
    assert info.value.position == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="on_truncated"):
        read_bson(tmp_path / "x.bson", on_truncated="ignore")
    with pytest.raises(FileNotFoundError, match="no BSON file"):
        read_bson(tmp_path / "missing.bson")


def test_scan_results_are_plain_arrays(tmp_path):
    path = _write(tmp_path / "t.bson", [{"_id": 5, "imgs": [{"picture": b"ab"}] * 3, "category_id": 2}])
    frame = read_bson(path)
    assert frame["images"].array.nbytes > 0
    assert isinstance(frame["images"][0], list)
    assert np.asarray(frame["images"]).dtype == object


@pytest.mark.parametrize("declared", [-1, 3, 10**9, 2**31 - 1])
def test_corrupt_length_prefix_mid_file_is_not_truncation(tmp_path, declared):
    documents = [bson.encode({"_id": i, "imgs": [{"picture": b"p" * 40}], "category_id": 1}) for i in range(3)]
    offset = len(documents[0])
    documents[1] = declared.to_bytes(4, "little", signed=True) + documents[1][4:]
    path = tmp_path / "bad.bson"
    path.write_bytes(b"".join(documents))
    for on_truncated in ("raise", "warn"):  # never silently drops the rest of the file
        with pytest.raises(BsonFormatError) as info:
            read_bson(path, on_truncated=on_truncated, rebuild_index=True)
        assert not isinstance(info.value, BsonTruncatedError)
        assert (info.value.offset, info.value.position) == (offset, 1)
        assert "length prefix is corrupt" in str(info.value)


def _scan_both(path):
    """Scan with the vectorised parser and with the reference parser: (index or error) for each."""
    from skproduct.io import bson_scan
    from skproduct.io.bson_batch import parse_batch, parse_batch_pure

    outcomes = []
    for parse in (parse_batch, parse_batch_pure):
        try:
            outcomes.append(bson_scan._scan(str(path), "raise", parse)[0])
        except BsonFormatError as exc:
            outcomes.append(exc)
    return outcomes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4), data=st.data())
def test_corrupted_files_fail_cleanly_and_both_parsers_agree(tmp_path_factory, flips, data):
    folder = tmp_path_factory.mktemp("flips")
    documents = [
        _document(
            {"_id": i, "pictures": [b"%d" % i * (i + 3)] * (1 + i % 3), "category_id": i, "extra": {"title": "t"}},
            data.draw(st.permutations(["_id", "imgs", "category_id", "title"])),
        )
        for i in range(5)
    ]
    whole = bytearray(b"".join(bson.encode(doc) for doc in documents))
    for at, xor in flips:
        whole[at % len(whole)] ^= xor
    path = folder / "flipped.bson"
    path.write_bytes(bytes(whole))

    fast, reference = _scan_both(path)
    if isinstance(reference, BsonFormatError):
        assert type(fast) is type(reference) and str(fast) == str(reference)
    else:
        for name in ("product_id", "category_id", "has_category", "doc_offset", "img_start", "img_offset", "img_length"):
            assert np.array_equal(getattr(fast, name), getattr(reference, name)), name


def test_both_parsers_agree_on_the_real_sample(cdiscount_sample):
    fast, reference = _scan_both(cdiscount_sample)
    assert np.array_equal(fast.img_offset, reference.img_offset)
    assert np.array_equal(fast.product_id, reference.product_id)


def test_sidecar_is_rebuilt_when_only_the_mtime_changes(tmp_path):
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"ab"}], "category_id": 1}])
    assert read_bson(path)["category_id"].tolist() == [1]
    stat = path.stat()
    _write(path, [{"_id": 1, "imgs": [{"picture": b"ab"}], "category_id": 2}])  # same size, new label
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert read_bson(path)["category_id"].tolist() == [2]


def test_images_column_supports_common_pandas_operations(tmp_path):
    path = _write(tmp_path / "t.bson", [{"_id": i, "imgs": [{"picture": b"%d" % i}] * (1 + i % 2)} for i in range(4)])
    images = read_bson(path)["images"]
    doubled = pd.concat([images, images], ignore_index=True)
    assert len(doubled.unique()) == 4 and doubled.nunique() == 4
    assert (images.array == images[2]).tolist() == [False, False, True, False]
    exploded = images.explode()
    assert len(exploded) == 6 and all(isinstance(ref, BsonImageRef) for ref in exploded)
    assert exploded.index.tolist() == [0, 1, 1, 2, 3, 3]
    assert images.astype(str)[0].startswith("[BsonImageRef(")
    copied = images.array.copy()
    assert not np.shares_memory(copied._start, images.array._start) and copied.equals(images.array)


def test_sidecar_is_readable_by_other_users(tmp_path):
    path = _write(tmp_path / "t.bson", [{"_id": 1, "imgs": [{"picture": b"x"}]}])
    read_bson(path)
    assert Path(str(path) + ".skpidx").stat().st_mode & 0o777 == 0o644


def test_truncation_warning_points_at_the_caller(tmp_path):
    whole = b"".join(bson.encode({"_id": i, "imgs": [{"picture": b"x" * 30}]}) for i in range(2))
    path = tmp_path / "cut.bson"
    path.write_bytes(whole[:-10])
    for _ in range(2):  # the scan, then the saved index
        with pytest.warns(UserWarning) as record:
            read_bson(path, on_truncated="warn")
        assert record[0].filename == __file__
