"""Faults injected into the files skproduct keeps (issue 11): each case damages a file and checks what follows.

- Fine-tuning checkpoints: flipped, cut-short and empty files are reported and the previous checkpoint is used;
  with none good, training restarts from the first epoch; both ways, the result is an undamaged run's.
- BSON sidecar indexes: any flipped byte of a sidecar, or a BSON file changed behind the same size and
  modification time (within the sampled blocks), rebuilds the index with a warning and the right labels; a change
  outside the sampled blocks is the documented limit.
- Saved estimators: other versions of skproduct, torch, timm or open_clip warn on load; unknown versions do not.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import bson
import numpy as np
import pytest

from skproduct import _checkpoints, _compat
from skproduct._training import CHECKPOINT_FORMAT, Checkpoint, Trainer
from skproduct.exceptions import StaleFileWarning, VersionMismatchWarning
from skproduct.io import bson_sidecar, read_bson

torch = pytest.importorskip("torch")


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _flip(path: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


# -- fine-tuning checkpoints: the trainer's Checkpoint part -------------------------------------------------------
class _Walk:
    """A task whose weights are a tensor that each epoch moves by an amount that depends on the weights."""

    def __init__(self):
        self.weights = torch.zeros(256)
        self.trained = []

    def train_epoch(self, trainer):
        self.trained.append(trainer.first_epoch + trainer.epoch + 1)
        self.weights = self.weights * 0.5 + torch.arange(256.0) + trainer.epoch
        return {"train_loss": float(self.weights.sum())}

    def validate(self):
        return {}

    def state_dict(self):
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state):
        self.weights = state["weights"].clone()


def _train(path: Path, max_iter: int) -> _Walk:
    task = _Walk()
    Trainer(task, [Checkpoint(path, total_epochs=max_iter)], max_iter=max_iter).fit()
    return task


def _epoch_of(path: Path) -> int:
    return _checkpoints.load_checkpoint(path, CHECKPOINT_FORMAT)["trainer"]["epoch"]


@pytest.fixture
def three_epochs(tmp_path):
    """A checkpoint after 3 epochs (``c.pt``), the one after epoch 2 beside it, and an undamaged 4-epoch run."""
    path = tmp_path / "c.pt"
    _train(path, 3)
    return path, _train(tmp_path / "whole" / "c.pt", 4).weights


def test_the_last_two_checkpoints_are_kept(three_epochs):
    path, _ = three_epochs
    previous = _checkpoints.previous_checkpoint_path(path)
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == ["c.prev.pt", "c.pt"]
    assert (_epoch_of(path), _epoch_of(previous)) == (3, 2)
    assert torch.load(path, weights_only=True)["format"] == CHECKPOINT_FORMAT  # still an ordinary torch file


def _tensor_position(path: Path) -> int:
    """Where the bytes of the task's weights lie in the checkpoint (tensors are stored uncompressed)."""
    weights = torch.load(path, weights_only=True)["task"]["weights"]
    position = path.read_bytes().find(weights.numpy().tobytes())
    assert position > 0
    return position + 100


@pytest.mark.parametrize("damage", ["flipped tensor byte", "cut short", "empty", "no checksum (older skproduct)"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_is_used(three_epochs, damage):
    path, uninterrupted = three_epochs
    reasons = {"flipped tensor byte": "does not match its checksum", "cut short": "no skproduct checksum",
               "empty": "is empty", "no checksum (older skproduct)": "no skproduct checksum"}
    if damage == "flipped tensor byte":
        _flip(path, _tensor_position(path))
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # format 2 as skproduct wrote it before checksums: same payload, no checksum to trust it by
        torch.save(torch.load(path, weights_only=True), path)
    with pytest.warns(StaleFileWarning, match=rf"c\.pt is damaged \(.*{reasons[damage]}.*resuming from the previous "
                                              r"one, .*c\.prev\.pt"):
        resumed = _train(path, 4)
    assert resumed.trained == [3, 4]  # epoch 3 again, from epoch 2's checkpoint
    torch.testing.assert_close(resumed.weights, uninterrupted, rtol=0, atol=0)
    assert (_epoch_of(path), _epoch_of(_checkpoints.previous_checkpoint_path(path))) == (4, 3)


def test_with_no_good_checkpoint_training_restarts_from_the_first_epoch(three_epochs):
    path, uninterrupted = three_epochs
    _flip(path, _tensor_position(path))
    previous = _checkpoints.previous_checkpoint_path(path)
    previous.write_bytes(previous.read_bytes()[:-7])
    with pytest.warns(StaleFileWarning, match=r"c\.pt is damaged .* and .*c\.prev\.pt is damaged .*training "
                                              "restarts from the first epoch"):
        restarted = _train(path, 4)
    assert restarted.trained == [1, 2, 3, 4]
    torch.testing.assert_close(restarted.weights, uninterrupted, rtol=0, atol=0)
    _checkpoints.verify_checkpoint(path)
    _checkpoints.verify_checkpoint(previous)


def test_a_damaged_checkpoint_never_replaces_a_good_previous_one(three_epochs):
    path, _ = three_epochs
    _flip(path, _tensor_position(path))
    before = _checkpoints.previous_checkpoint_path(path).read_bytes()
    _checkpoints.keep_as_previous(path)  # what the Checkpoint part does before writing the next epoch
    assert _checkpoints.previous_checkpoint_path(path).read_bytes() == before


def test_a_run_killed_between_the_rename_and_the_write_resumes_quietly(three_epochs, no_warnings):
    path, uninterrupted = three_epochs
    _checkpoints.keep_as_previous(path)  # c.pt -> c.prev.pt, and then the process died
    assert not path.exists()
    resumed = _train(path, 4)
    assert resumed.trained == [4]
    torch.testing.assert_close(resumed.weights, uninterrupted, rtol=0, atol=0)


def test_every_flipped_byte_of_a_checkpoint_is_detected(tmp_path):
    path = tmp_path / "small.pt"
    _checkpoints.save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "w": torch.arange(4.0)})
    good = path.read_bytes()
    for position in range(len(good)):
        damaged = bytearray(good)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(_checkpoints.DamagedCheckpointError):
            _checkpoints.load_checkpoint(path, CHECKPOINT_FORMAT)


def test_a_readable_checkpoint_of_another_format_is_an_error_not_damage(three_epochs):
    path, _ = three_epochs
    _checkpoints.save_checkpoint(path, {"format": CHECKPOINT_FORMAT + 1})
    with pytest.raises(ValueError, match=f"format {CHECKPOINT_FORMAT + 1}.*remove it"):
        _train(path, 4)


def test_usable_checkpoint_skips_damaged_files(three_epochs, no_warnings):
    path, _ = three_epochs
    assert _checkpoints.usable_checkpoint(path) == path
    path.write_bytes(b"")
    assert _checkpoints.usable_checkpoint(path) == _checkpoints.previous_checkpoint_path(path)
    _checkpoints.previous_checkpoint_path(path).write_bytes(b"x")
    assert _checkpoints.usable_checkpoint(path) is None


# -- fine-tuning checkpoints: FineTuneClassifier end to end ------------------------------------------------------
TINY = {"backbone": "timm:test_resnet", "pretrained": False, "image_size": 32, "batch_size": 16,
        "early_stopping": False, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 4)
    products = [[(rng.integers(0, 90, (32, 32, 3)) + 80 * label).astype(np.uint8)] for label in y]
    return products, y


def test_a_fine_tuner_resumes_from_the_previous_checkpoint_when_the_last_is_damaged(pictures, tmp_path):
    from skproduct.finetune import FineTuneClassifier

    products, y = pictures
    uninterrupted = FineTuneClassifier(**TINY, max_iter=2, checkpoint_dir=tmp_path).fit(products, y)
    [last] = tmp_path.glob("finetune-*[0-9a-f].pt")
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the weights: before checksums, this resumed silently with other predictions
    last.write_bytes(bytes(data))
    with pytest.warns(StaleFileWarning, match="is damaged .*resuming from the previous one"):
        resumed = FineTuneClassifier(**TINY, max_iter=2, checkpoint_dir=tmp_path).fit(products, y)
    assert [r["epoch"] for r in resumed.history_] == [1, 2]
    np.testing.assert_allclose(resumed.predict_proba(products), uninterrupted.predict_proba(products), atol=1e-5)


def test_a_restart_after_damage_starts_from_the_weights_a_fresh_fit_starts_from(pictures, tmp_path):
    from skproduct.backbones import build_backbone, parse_backbone
    from skproduct.finetune import FineTuneClassifier

    products, y = pictures
    weights = tmp_path / "start.pt"
    start = build_backbone(parse_backbone(TINY["backbone"]), pretrained=False, weights=None, image_size=32, seed=7)
    torch.save(start.state_dict(), weights)
    params = dict(TINY, max_iter=1, weights=weights, checkpoint_dir=tmp_path / "checkpoints")
    fresh = FineTuneClassifier(**params).fit(products, y)
    [last] = (tmp_path / "checkpoints").glob("finetune-*.pt")
    last.write_bytes(b"")
    with pytest.warns(StaleFileWarning, match="restarts from the first epoch"):
        restarted = FineTuneClassifier(**params).fit(products, y)
    np.testing.assert_allclose(restarted.predict_proba(products), fresh.predict_proba(products), atol=1e-5)


# -- BSON sidecar indexes ----------------------------------------------------------------------------------------
def _documents(n: int, picture_bytes: int = 40) -> list[dict]:
    rng = np.random.default_rng(n)
    return [{"_id": i, "category_id": 1000 + i % 7, "imgs": [{"picture": b"\xff\xd8" + rng.bytes(picture_bytes)}]}
            for i in range(n)]


def _write(path: Path, documents: list[dict]) -> Path:
    path.write_bytes(b"".join(bson.encode(doc) for doc in documents))
    return path


def _content(frame) -> tuple:
    pictures = [ref.read_bytes() for refs in frame["images"] for ref in refs]
    return frame["product_id"].tolist(), frame["category_id"].tolist(), frame["n_images"].tolist(), pictures


def test_every_flipped_byte_of_a_sidecar_is_detected(tmp_path):
    path = _write(tmp_path / "t.bson", _documents(3))
    index = tmp_path / "t.skpidx"
    read_bson(path, index_path=index)
    signature = bson_sidecar._file_signature(str(path))
    good = index.read_bytes()
    assert bson_sidecar._read_sidecar(index, signature) is not None
    for position in range(len(good)):
        damaged = bytearray(good)
        damaged[position] ^= 0x04
        index.write_bytes(bytes(damaged))
        with pytest.warns(StaleFileWarning, match="rebuilding it"):
            assert bson_sidecar._read_sidecar(index, signature) is None, f"byte {position}"


@pytest.mark.parametrize("where", ["header", "category_id array", "padding", "trailer"])
def test_a_flipped_byte_in_a_sidecar_rebuilds_it_with_a_warning_and_the_right_labels(tmp_path, where):
    path = _write(tmp_path / "t.bson", _documents(6))
    index = tmp_path / "t.skpidx"
    expected = _content(read_bson(path, index_path=index))
    good = index.read_bytes()
    categories = np.asarray(expected[1], dtype=np.int64).tobytes()
    position = {"header": good.index(b'"truncated_offset"') + 3, "category_id array": good.index(categories) + 8,
                "padding": good.index(b"\0\0\0\0", good.index(b'"arrays"')), "trailer": len(good) - 1}[where]
    _flip(index, position)
    with pytest.warns(StaleFileWarning, match="damaged after it was written|unreadable index|is stale"):
        assert _content(read_bson(path, index_path=index)) == expected
    assert index.read_bytes() == good  # rebuilt in place, whole


@pytest.mark.parametrize("damage", ["empty", "cut short", "no trailer"])
def test_a_cut_short_sidecar_is_rebuilt(tmp_path, damage):
    path = _write(tmp_path / "t.bson", _documents(5))
    index = tmp_path / "t.skpidx"
    expected = _content(read_bson(path, index_path=index))
    good = index.read_bytes()
    index.write_bytes({"empty": b"", "cut short": good[: len(good) // 2], "no trailer": good[:-8]}[damage])
    with pytest.warns(StaleFileWarning, match="unreadable index"):
        assert _content(read_bson(path, index_path=index)) == expected


def _category_position(path: Path, product: int) -> int:
    """The byte offset of product ``product``'s int32 ``category_id`` value in a file made by :func:`_write`."""
    offsets = bson_sidecar.scan_bson(path).doc_offset
    start = int(offsets[product])
    key = b"\x10category_id\x00"
    found = path.read_bytes().find(key, start)
    assert start < found < start + 64
    return found + len(key)


def _relabel_keeping_size_and_time(path: Path, product: int, label: int) -> None:
    stat = path.stat()
    position = _category_position(path, product)
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(int(label).to_bytes(4, "little", signed=True))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_a_relabelled_real_file_with_the_same_size_and_time_is_detected(shared_data, tmp_path):
    bson_path = tmp_path / "train_example.bson"
    shutil.copyfile(shared_data / "cdiscount" / "train_example.bson", bson_path)
    index = tmp_path / "train_example.skpidx"
    before = read_bson(bson_path, index_path=index)
    assert bson_path.stat().st_size <= 10 * bson_sidecar.SAMPLE_BLOCK_BYTES  # small enough to be hashed whole
    product = 41
    new_label = int(before["category_id"][0]) if before["category_id"][product] != before["category_id"][0] else 1
    offsets = bson_sidecar.scan_bson(bson_path).doc_offset
    document = bson_path.read_bytes()[int(offsets[product]):int(offsets[product + 1])]
    key = b"category_id\x00"
    value_at = int(offsets[product]) + document.index(key) + len(key)
    kind = document[document.index(key) - 1]
    stat = bson_path.stat()
    with open(bson_path, "r+b") as f:
        f.seek(value_at)
        f.write(int(new_label).to_bytes(4 if kind == 0x10 else 8, "little", signed=True))
    os.utime(bson_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.warns(StaleFileWarning, match="is stale: its BSON file changed"):
        after = read_bson(bson_path, index_path=index)
    assert after["category_id"][product] == new_label
    assert after["category_id"].drop(product).tolist() == before["category_id"].drop(product).tolist()


@pytest.fixture
def large_bson(tmp_path):
    """A BSON file of about 1.5 MB: larger than the ten sampled blocks, so parts of it are not sampled."""
    path = _write(tmp_path / "large.bson", _documents(3000, picture_bytes=480))
    assert path.stat().st_size > 20 * bson_sidecar.SAMPLE_BLOCK_BYTES
    return path


def _products_by_sampling(path: Path) -> tuple[int, int]:
    """A product whose category_id lies in a sampled block, and one whose category_id lies in none."""
    spans = bson_sidecar.sample_spans(path.stat().st_size)
    inside = outside = None
    for product in range(0, 3000, 7):
        position = _category_position(path, product)
        sampled = any(offset <= position < offset + length for offset, length in spans)
        if sampled and inside is None and product > 0:
            inside = product
        if not sampled and outside is None:
            outside = product
        if inside is not None and outside is not None:
            return inside, outside
    raise AssertionError("no such products")


def test_a_change_inside_a_sampled_block_is_detected(large_bson, tmp_path):
    index = tmp_path / "large.skpidx"
    read_bson(large_bson, index_path=index)
    inside, _ = _products_by_sampling(large_bson)
    _relabel_keeping_size_and_time(large_bson, inside, 4242)
    with pytest.warns(StaleFileWarning, match="is stale: its BSON file changed"):
        assert read_bson(large_bson, index_path=index)["category_id"][inside] == 4242


def test_a_change_outside_the_sampled_blocks_is_the_documented_limit(large_bson, tmp_path, no_warnings):
    """Sampling cannot see what it does not read (see skproduct.io.bson_sidecar): one byte edited in place with
    the modification time set back keeps the old index; ``rebuild_index=True`` is the way after such an edit."""
    index = tmp_path / "large.skpidx"
    original = read_bson(large_bson, index_path=index)["category_id"]
    _, outside = _products_by_sampling(large_bson)
    _relabel_keeping_size_and_time(large_bson, outside, 4242)
    assert read_bson(large_bson, index_path=index)["category_id"][outside] == original[outside]  # the old label
    assert read_bson(large_bson, index_path=index, rebuild_index=True)["category_id"][outside] == 4242


def test_opening_reads_only_the_sampled_blocks(large_bson, tmp_path, monkeypatch):
    index = tmp_path / "large.skpidx"
    read_bson(large_bson, index_path=index)
    monkeypatch.setattr(bson_sidecar, "scan_bson", lambda *a, **k: pytest.fail("the sidecar should be used"))
    spans = bson_sidecar.sample_spans(large_bson.stat().st_size)
    assert len(spans) == 10 and sum(length for _, length in spans) == 10 * bson_sidecar.SAMPLE_BLOCK_BYTES
    assert len(read_bson(large_bson, index_path=index)) == 3000


# -- saved estimators and library versions -----------------------------------------------------------------------
def _estimators():
    from sklearn.linear_model import LogisticRegression

    from skproduct import CategoryTree, ImageEmbedder
    from skproduct.heads import HierarchicalClassifier, TorchLinearClassifier

    rng = np.random.default_rng(0)
    X, labels = rng.normal(size=(40, 4)), np.array(["a1", "a2", "b1", "b2"] * 10)
    tree = CategoryTree.from_paths([("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")])
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    return {
        "ImageEmbedder": ImageEmbedder("timm:test_resnet", pretrained=False, image_size=32).fit(images),
        "TorchLinearClassifier": TorchLinearClassifier(max_iter=2).fit(X, labels),
        "HierarchicalClassifier": HierarchicalClassifier(LogisticRegression(), tree=tree).fit(X, labels),
    }


@pytest.fixture(scope="module")
def estimators():
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # two epochs are enough to have something to save
        return _estimators()


def _saved_under(estimator, monkeypatch, **versions) -> bytes:
    recorded = {**_compat.library_versions(), **versions}
    with monkeypatch.context() as patch:
        patch.setattr(_compat, "library_versions", lambda: dict(recorded))
        return pickle.dumps(estimator)


@pytest.mark.parametrize("name", ["ImageEmbedder", "TorchLinearClassifier", "HierarchicalClassifier"])
def test_other_library_versions_warn_on_load(estimators, name, monkeypatch):
    saved = _saved_under(estimators[name], monkeypatch, torch="1.13.0", timm="0.6.0", skproduct="0.0.1")
    with pytest.warns(VersionMismatchWarning, match=rf"this {name} was saved with skproduct 0\.0\.1, torch 1\.13\.0, "
                                                    r"timm 0\.6\.0 and is loaded with skproduct .*, torch .*, timm "
                                                    r".*: its results may differ.*fit it again here"):
        loaded = pickle.loads(saved)
    assert type(loaded).__name__ == name


def test_the_same_versions_give_no_warning_and_pickling_leaves_the_estimator_as_it_was(estimators, no_warnings):
    for estimator in estimators.values():
        before = dict(vars(estimator))
        loaded = pickle.loads(pickle.dumps(estimator))
        assert vars(estimator).keys() == before.keys()  # the live estimator keeps its torch module
        assert all(vars(estimator)[key] is value for key, value in before.items())
        assert loaded._library_versions == _compat.library_versions()


def test_a_local_version_label_is_the_same_release(estimators, monkeypatch, no_warnings):
    torch_release = _compat._release(_compat._installed_version("torch"))
    pickle.loads(_saved_under(estimators["ImageEmbedder"], monkeypatch, torch=torch_release + "+cu130"))


def test_a_library_missing_here_is_a_mismatch(estimators, monkeypatch):
    saved = _saved_under(estimators["ImageEmbedder"], monkeypatch, not_a_library_here="1.0")
    with pytest.warns(VersionMismatchWarning, match="saved with not_a_library_here 1.0 and is loaded with no "
                                                    "not_a_library_here"):
        pickle.loads(saved)


@pytest.mark.parametrize("stamp", ["none (before 0.1)", "skproduct only"])
def test_files_without_library_versions_give_no_warning_unknown_is_not_a_mismatch(estimators, stamp, no_warnings):
    estimator = estimators["TorchLinearClassifier"]
    state = estimator.__getstate__()
    del state["_library_versions"]
    if stamp == "none (before 0.1)":
        del state["_skproduct_version"]
    loaded = type(estimator).__new__(type(estimator))
    loaded.__setstate__(state)
    np.testing.assert_array_equal(loaded.coef_, estimator.coef_)


def test_an_estimator_fitted_without_torch_records_no_torch_version():
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from sklearn.linear_model import LogisticRegression
        from skproduct.heads import HierarchicalClassifier
        X, y = np.random.default_rng(0).normal(size=(20, 3)), np.array(["a", "b"] * 10)
        state = HierarchicalClassifier(LogisticRegression()).fit(X, y).__getstate__()
        print("torch" in sys.modules, sorted(state["_library_versions"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[0] == "False ['skproduct']", done.stderr
