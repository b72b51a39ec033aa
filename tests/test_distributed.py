"""Extraction, search and prediction on a Dask cluster (skproduct.distributed), on a local two-worker cluster."""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed")  # the dev extra installs it: in CI these tests run

from distributed import Client  # noqa: E402

import skproduct.distributed as skd  # noqa: E402
from skproduct import EmbeddingCache, ImageEmbedder  # noqa: E402

TINY = dict(pretrained=False, image_size=32, batch_size=8)


@pytest.fixture(scope="module")
def client():
    """One LocalCluster(n_workers=2, threads_per_worker=1, processes=True) for the module, warmed up (imports)."""
    with skd.local_cluster(2, cpu_threads=1) as cluster, Client(cluster) as client:
        client.run(importlib.import_module, "skproduct.embed")  # torch and timm, imported once per worker
        yield client


def _run_on_workers(client, function):
    """``client.run(function)`` for a function of this test module (pickled by value: workers cannot import it)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        return client.run(function)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cdiscount(tmp_path_factory, cdiscount_sample):
    from skproduct.io import read_bson

    return read_bson(cdiscount_sample, index_path=tmp_path_factory.mktemp("idx") / "cdiscount.skpidx")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, fashion_bson):
    """60 fashion-small products of 3 categories (20 each), one picture each."""
    from skproduct.io import read_bson

    frame = read_bson(fashion_bson, index_path=tmp_path_factory.mktemp("idx") / "fashion.skpidx").iloc[:3000]
    top = frame["category_id"].value_counts().index[:3]
    parts = [frame[frame["category_id"] == c].iloc[:20] for c in top]
    import pandas as pd

    return pd.concat(parts).sort_index()


# -- the same vectors, each picture once --------------------------------------------------------------------------
def test_cdiscount_sample_same_vectors_as_one_process_each_picture_once(client, cdiscount, tmp_path):
    local = ImageEmbedder("timm:test_resnet", **TINY).fit_transform(cdiscount)
    embedder = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **TINY)
    with skd.cluster(client, shard_size=32) as run:
        vectors = embedder.fit_transform(cdiscount)
        again = embedder.transform(cdiscount)  # everything cached now: nothing goes to the cluster
    np.testing.assert_allclose(vectors, local, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again, vectors)
    assert len(run.runs) == 1
    report = run.runs[0]
    n_keys = EmbeddingCache(tmp_path / "emb").stats()["items"]  # the distinct pictures, as the cache keys them
    assert n_keys in (109, 110)  # 110 pictures (one of them twice: keyed by content, once; by place, twice)
    assert report["pictures"] == n_keys and report["shards"] == -(-n_keys // 32)
    # Forward rows counted on the workers: every distinct picture once across the cluster.
    assert report["forward_rows"] == sum(report["workers"].values()) == n_keys
    assert report["already_cached"] == 0


def test_fashion_slice_same_vectors_max_pooling_and_a_partly_cached_catalogue(client, fashion, tmp_path):
    settings = dict(TINY, pooling="max")
    local = ImageEmbedder("timm:test_efficientnet", **settings).fit_transform(fashion)
    embedder = ImageEmbedder("timm:test_efficientnet", cache=tmp_path / "emb", **settings).fit(fashion)
    embedder.transform(fashion.iloc[:25])  # 25 pictures cached by this process, before the cluster
    with skd.cluster(client, shard_size=8) as run:
        embedder.transform(fashion.iloc[:40])
        vectors = embedder.transform(fashion)  # as a streaming predict calls it: chunk after chunk
        assert len(run._payloads) == 1  # the embedder (and its weights) went to the workers once
    np.testing.assert_allclose(vectors, local, rtol=1e-5, atol=1e-6)
    # Only the missing pictures were sent, and run once.
    assert [r["pictures"] for r in run.runs] == [r["forward_rows"] for r in run.runs] == [15, len(fashion) - 40]
    assert [r["shards"] for r in run.runs] == [2, 3]
    assert not run._payloads  # released at the end of the block


def test_shards_pickle_bson_references_as_file_and_offsets_never_bytes(cdiscount):
    from skproduct.distributed._shards import make_shards

    refs = [ref for row in cdiscount["images"] for ref in row]
    pictures = [ref.read_bytes() for ref in refs[:8]]
    shard = make_shards(refs[:8], EmbeddingCache.keys_for(pictures), shard_size=8)[0]
    data = pickle.dumps(shard)
    assert len(data) < 2000 < sum(map(len, pictures))
    assert not any(picture[100:164] in data for picture in pictures)
    assert pickle.loads(data).ref_list() == refs[:8]


def test_no_client_in_a_model_clone_or_pickle_made_inside_the_block(client, tmp_path):
    from sklearn.base import clone

    embedder = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **TINY).fit()
    with skd.cluster(client):
        copied = clone(embedder)
        saved = pickle.dumps(embedder)
        assert skd.current_cluster() is not None
    assert skd.current_cluster() is None
    assert "client" not in embedder.get_params() and copied.get_params() == embedder.get_params()
    assert b"distributed" not in saved and b"Client" not in saved


def test_a_cluster_without_a_cache_is_a_clear_error(client):
    pictures = [np.full((32, 32, 3), 9, dtype=np.uint8)]
    embedder = ImageEmbedder("timm:test_resnet", **TINY).fit(pictures)
    with skd.cluster(client), pytest.raises(skd.ClusterError, match="pass cache="):
        embedder.transform(pictures)


def test_bad_pictures_follow_the_policy_on_the_workers(client, tmp_path):
    from skproduct.exceptions import BadPictureWarning, ImageDecodeError

    good = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (10, 200)]
    broken = b"\xff\xd8 not a jpeg at all"
    pictures = [good[0], broken, good[1]]
    with pytest.warns(BadPictureWarning):
        local = ImageEmbedder("timm:test_resnet", on_error="blank", **TINY).fit_transform(pictures)
    embedder = ImageEmbedder("timm:test_resnet", on_error="blank", cache=tmp_path / "emb", **TINY)
    with skd.cluster(client, shard_size=1), pytest.warns(BadPictureWarning, match="1 of 3 pictures"):
        vectors = embedder.fit_transform(pictures)
    np.testing.assert_allclose(vectors, local, rtol=1e-5, atol=1e-6)
    raising = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb2", **TINY).fit(pictures)
    with skd.cluster(client, shard_size=1), pytest.raises(ImageDecodeError):
        raising.transform(pictures)


# -- faults -------------------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_shard_loses_only_its_unwritten_vectors(client, fashion, tmp_path):
    frame = fashion.iloc[:24]
    local = ImageEmbedder("timm:test_resnet", **{**TINY, "batch_size": 2}).fit_transform(frame)
    folder = tmp_path / "emb"
    embedder = ImageEmbedder("timm:test_resnet", cache=folder, **{**TINY, "batch_size": 2}).fit(frame)
    segments = folder / embedder.fingerprint_

    def slow_forward():  # every forward pass of the backbone takes 0.4 s on this worker (until it restarts)
        import time as time_module

        import torch

        def pause(module, inputs):
            if type(module).__name__ == "ResNet":
                time_module.sleep(0.4)

        torch._skproduct_test_pause = torch.nn.modules.module.register_module_forward_pre_hook(pause)
        return os.getpid()

    def normal_forward():
        import torch

        handle = getattr(torch, "_skproduct_test_pause", None)
        if handle is not None:
            handle.remove()

    pids = set(_run_on_workers(client, slow_forward).values())
    result: dict = {}

    def run():
        with skd.cluster(client, shard_size=12, flush_every=4) as config:
            result["vectors"] = embedder.transform(frame)
        result["run"] = config.runs[0]

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline:  # the first vectors a worker writes: kill it mid-shard
        writers = {int(p.name.split("-")[1]) for p in segments.glob("seg-*.skemb")} & pids if segments.is_dir() else ()
        if writers:
            killed = min(writers)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    thread.join(timeout=240)
    _run_on_workers(client, normal_forward)
    assert killed is not None and not thread.is_alive()
    np.testing.assert_allclose(result["vectors"], local, rtol=1e-5, atol=1e-6)
    report = result["run"]
    retried = [r for r in report["shard_reports"] if r["already_cached"]]
    assert len(retried) == 1 and killed not in {r["pid"] for r in report["shard_reports"]}
    assert retried[0]["already_cached"] >= 4  # the killed attempt's written vectors were kept...
    assert retried[0]["forward_rows"] == 12 - retried[0]["already_cached"]  # ...and only the missing computed
    assert report["forward_rows"] + report["already_cached"] == 24
    cache = EmbeddingCache(folder)
    assert cache.verify()["clean"] and cache.stats()["items"] == 24  # whole vectors only, each picture once
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker


# -- searches over heads, and the workers' settings ----------------------------------------------------------------
def test_grid_search_and_cross_val_score_on_the_cluster_equal_the_local_ones(client, fashion, tmp_path):
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_val_score

    embedder = ImageEmbedder("timm:test_resnet", cache=tmp_path / "emb", **TINY)
    with skd.cluster(client):
        X = embedder.fit_transform(fashion)  # extracted on the cluster, cached; the search runs on cached vectors
    y = fashion["category_id"].to_numpy()
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}
    local = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3).fit(X, y)
    scores_local = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=3)
    with joblib.parallel_config(backend="dask"):
        remote = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=-1).fit(X, y)
        scores_remote = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=3, n_jobs=-1)
    assert remote.best_params_ == local.best_params_
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"])
    np.testing.assert_allclose(scores_remote, scores_local)


def test_local_cluster_pins_each_workers_threads(client):
    def threads():
        import torch

        from skproduct.distributed._worker import _pin_torch_threads

        _pin_torch_threads()
        return os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"], torch.get_num_threads()

    found = _run_on_workers(client, threads)
    assert list(found.values()) == [("1", "1", 1)] * 2
    info = client.scheduler_info()["workers"].values()
    assert [w["nthreads"] for w in info] == [1, 1]


def test_gpu_recipe_gives_each_worker_one_device_and_a_gpu_resource():
    """The one-worker-per-GPU recipe without dask-cuda, on CPU workers: device numbers and resources are set."""
    with skd.local_cluster(gpus=[0, 1], cpu_threads=1) as cluster, Client(cluster) as gpu_client:
        seen = gpu_client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        info = gpu_client.scheduler_info()["workers"].values()
        assert sorted(seen.values()) == ["0", "1"]
        assert [w["resources"] for w in info] == [{"GPU": 1}, {"GPU": 1}]
        assert {w["nthreads"] for w in info} == {1}
        from skproduct.distributed._driver import _workers_have_gpus

        assert _workers_have_gpus(gpu_client)


# -- the command line -----------------------------------------------------------------------------------------------
def test_extract_and_predict_take_a_scheduler_or_a_number_of_workers(client, cdiscount_sample, tmp_path, capsys,
                                                                      monkeypatch):
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from skproduct.cli import main

    common = ["--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "-q"]
    assert main(["extract", str(cdiscount_sample), *common, "--cache", str(tmp_path / "local"),
                 "--out", str(tmp_path / "local.npy")]) == 0
    address = client.scheduler.address
    assert main(["extract", str(cdiscount_sample), *common, "--cache", str(tmp_path / "shared"),
                 "--out", str(tmp_path / "cluster.npy"), "--scheduler", address, "--shard-size", "40"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "cluster.npy"), np.load(tmp_path / "local.npy"), rtol=1e-5,
                               atol=1e-6)
    counts = re.findall(r"(\d+) hits, (\d+) misses", capsys.readouterr().out)  # reading back is not a hit
    assert len(counts) == 2 and counts[0] == counts[1] and counts[0][0] == "0"

    from skproduct.io import read_bson

    frame = read_bson(cdiscount_sample, index_path=tmp_path / "x.skpidx")
    model = Pipeline([("embed", ImageEmbedder("timm:test_resnet", **TINY)),
                      ("head", LogisticRegression(max_iter=200))]).fit(frame, frame["category_id"].astype(int))
    joblib.dump(model, tmp_path / "model.joblib")
    asked = []

    @contextlib.contextmanager
    def local_cluster(n_workers):  # --workers N: the module's cluster stands in for a new one of N workers
        asked.append(n_workers)
        yield client.cluster

    monkeypatch.setattr("skproduct.distributed._setup.local_cluster", local_cluster)
    runs = (("one", []), ("scheduler", ["--scheduler", address]), ("workers", ["--workers", "2"]))
    for name, extra in runs:
        assert main(["predict", str(tmp_path / "model.joblib"), str(cdiscount_sample), "--cache",
                     str(tmp_path / f"emb-{name}"), "--out", str(tmp_path / f"{name}.csv"), "-q", *extra]) == 0
    assert asked == [2]
    worker_pids = set(client.run(os.getpid).values())
    for name in ("scheduler", "workers"):
        assert (tmp_path / f"{name}.csv").read_text() == (tmp_path / "one.csv").read_text()
        assert (EmbeddingCache(tmp_path / f"emb-{name}").stats()["items"]
                == EmbeddingCache(tmp_path / "emb-one").stats()["items"])
        writers = {int(p.name.split("-")[1]) for p in (tmp_path / f"emb-{name}").glob("*/seg-*.skemb")}
        assert writers and writers <= worker_pids  # the workers extracted, not this process


def test_without_dask_the_message_says_what_to_install(monkeypatch, tmp_path, capsys):
    from skproduct.cli import main

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    with pytest.raises(ImportError, match=r'pip install "skproduct\[distributed\]"'):
        skd.require_distributed()
    with pytest.raises(ImportError, match=r'pip install "skproduct\[distributed\]"'):
        skd.local_cluster(2)
    data = tmp_path / "data.bson"
    data.write_bytes(b"")
    code = main(["extract", str(data), "--cache", str(tmp_path / "emb"), "--workers", "2"])
    assert code == 2
    assert 'pip install "skproduct[distributed]"' in capsys.readouterr().err


def test_cluster_settings_are_checked():
    with pytest.raises(ValueError, match="shard_size"):
        with skd.cluster(lambda: None, shard_size=0):
            pass
    with pytest.raises(TypeError, match="distributed.Client"):
        with skd.cluster(42):
            pass
