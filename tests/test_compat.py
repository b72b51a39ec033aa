"""Files written before the redesign (skproduct at commit 2592dc6, in tests/data/format0) keep working.

A saved embedder and fine-tuner load and give the numbers they gave; a cache
filled then is read, not recomputed; a BSON sidecar written then (format 1,
without a checksum) is rebuilt once with a warning. See
tests/data/format0/README.json for how the files were made.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

FORMAT0 = Path(__file__).parent / "data" / "format0"
RECORD = json.loads((FORMAT0 / "README.json").read_text())
SAME_LIBRARIES = (version("torch"), version("timm")) == ("2.14.1+cu130", "1.0.31") or (
    version("torch").split("+")[0], version("timm")) == ("2.14.1", "1.0.31")
needs_same_libraries = pytest.mark.skipif(
    not SAME_LIBRARIES, reason="the old files were written under torch 2.14.1 and timm 1.0.31, which fingerprints name"
)


@pytest.fixture
def pictures():
    return list(np.load(FORMAT0 / "pictures.npy"))


@needs_same_libraries
def test_an_old_embedder_loads_and_reads_its_old_cache_without_recomputing(pictures, tmp_path, monkeypatch):
    import skproduct.embed as embed

    shutil.copytree(FORMAT0 / "cache", tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: same machine kind, same libraries
        old = joblib.load(FORMAT0 / "embedder.joblib")
    assert old.fingerprint_ == RECORD["fingerprint"]
    np.testing.assert_allclose(old.set_params(cache=None).transform(pictures), np.load(FORMAT0 / "embedder_vectors.npy"),
                               rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(embed, "build_backbone", lambda *a, **k: pytest.fail("the old cache was recomputed"))
    # precision pinned: the old cache is fp32, and "auto" picks bf16 on CPUs with native bf16 (a new fingerprint)
    fresh = embed.ImageEmbedder("timm:test_resnet", pretrained=False, image_size=32, cache=tmp_path / "cache",
                                precision="fp32")
    np.testing.assert_array_equal(fresh.fit(pictures).fingerprint_, RECORD["fingerprint"])
    np.testing.assert_array_equal(fresh.transform(pictures), np.load(FORMAT0 / "embedder_vectors.npy"))


def test_an_old_fine_tuner_loads_with_its_parameters_renamed(pictures):
    old = joblib.load(FORMAT0 / "finetune.joblib")
    params = old.get_params()
    assert params["max_iter"] == 2 and params["learning_rate"] == 3e-4 and "epochs" not in params
    assert old.n_iter_ == len(old.history_) == 2
    np.testing.assert_allclose(old.predict_proba(pictures), np.load(FORMAT0 / "finetune_proba.npy"), rtol=1e-5,
                               atol=1e-6)


def test_an_old_bson_sidecar_is_rebuilt_once_with_a_warning(shared_data, tmp_path, monkeypatch):
    """A format-1 sidecar has no checksum of its own: reading it unverified would keep any damage it holds, so it
    is rebuilt once (in format 2), with a warning, and the new one is used from then on."""
    import skproduct.io.bson_sidecar as sidecar
    from skproduct.exceptions import StaleFileWarning
    from skproduct.io import read_bson

    bson = tmp_path / "train_example.bson"
    shutil.copyfile(shared_data / "cdiscount" / "train_example.bson", bson)
    os.utime(bson, ns=(RECORD["bson_mtime_ns"], RECORD["bson_mtime_ns"]))  # the file the sidecar was made for
    index = tmp_path / "train_example.skpidx"
    shutil.copyfile(FORMAT0 / "train_example.skpidx", index)
    with pytest.warns(StaleFileWarning, match="older skproduct .format 1, without a checksum"):
        products = read_bson(bson, index_path=index)
    assert len(products) == 82 and products["n_images"].sum() == 110
    assert index.read_bytes() != (FORMAT0 / "train_example.skpidx").read_bytes()  # rewritten in format 2
    monkeypatch.setattr(sidecar, "scan_bson", lambda *a, **k: pytest.fail("the new sidecar was rebuilt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = read_bson(bson, index_path=index)
    pd.testing.assert_frame_equal(again.drop(columns="images"), products.drop(columns="images"))


def test_a_stale_sidecar_or_a_damaged_segment_is_said_out_loud(shared_data, tmp_path, pictures):
    from skproduct import EmbeddingCache, ImageEmbedder
    from skproduct.exceptions import StaleFileWarning
    from skproduct.io import read_bson

    bson = tmp_path / "train_example.bson"
    shutil.copyfile(shared_data / "cdiscount" / "train_example.bson", bson)  # a new mtime: the old index is stale
    index = tmp_path / "train_example.skpidx"
    shutil.copyfile(FORMAT0 / "train_example.skpidx", index)
    with pytest.warns(StaleFileWarning, match="is stale"):
        assert len(read_bson(bson, index_path=index)) == 82

    embedder = ImageEmbedder("timm:test_resnet", pretrained=False, image_size=32, cache=tmp_path / "cache")
    expected = embedder.fit_transform(pictures)
    segment = next((tmp_path / "cache").glob("*/*.skemb"))
    segment.write_bytes(b"not a segment")
    with pytest.warns(StaleFileWarning, match="unreadable cache segment"):
        again = ImageEmbedder("timm:test_resnet", pretrained=False, image_size=32, cache=EmbeddingCache(tmp_path / "cache"))
        np.testing.assert_allclose(again.fit_transform(pictures), expected, rtol=1e-5, atol=1e-6)  # computed again
