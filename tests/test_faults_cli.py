"""Faults of the command line (issue 11): every case injects its fault and checks the outcome.

Outputs (links, FIFOs, folders, stdout, formats, checked before the work), one clear line for every user mistake
and a traceback for every bug, flags named in messages, products without a usable picture predicted from the
training prior, Ctrl-C, and the warnings about labels that do not fit the output format. The tests make their own
links, FIFOs and files; none touches a real device node.
"""

from __future__ import annotations

import csv
import errno
import itertools
import json
import os
import re
from pathlib import Path

import joblib
import numpy as np
import pytest

from skproduct.cli import main

TINY = ["--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "--quiet"]


# -- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKPRODUCT_CACHE_DIR", str(tmp_path_factory.mktemp("faults-skproduct-cache")))
        yield


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("faults-embeddings"))


def _documents(cdiscount_sample, n: int) -> list[dict]:
    import bson

    with open(cdiscount_sample, "rb") as f:
        return list(itertools.islice(bson.decode_file_iter(f), n))


def _write_bson(path: Path, documents: list[dict]) -> Path:
    import bson

    path.write_bytes(b"".join(bson.encode(document) for document in documents))
    return path


@pytest.fixture(scope="module")
def small_bson(cdiscount_sample, tmp_path_factory) -> Path:
    """Twelve products of Cdiscount's sample."""
    return _write_bson(tmp_path_factory.mktemp("small") / "small.bson", _documents(cdiscount_sample, 12))


@pytest.fixture(scope="module")
def bad_bson(cdiscount_sample, tmp_path_factory) -> Path:
    """Five products of Cdiscount's sample, then one whose only picture is not a JPEG."""
    documents = _documents(cdiscount_sample, 5)
    documents.append({"_id": 99, "imgs": [{"picture": b"not a picture"}], "category_id": documents[0]["category_id"]})
    return _write_bson(tmp_path_factory.mktemp("bad") / "bad.bson", documents)


@pytest.fixture(scope="module")
def model(module_env, small_bson, embeddings, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "model.joblib"
    assert main(["fit", str(small_bson), "--out", str(out), "--cache", embeddings, *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def shopee_csv(shopee_sample, tmp_path_factory) -> Path:
    """Twenty rows of Shopee's sample (seven categories, images in one folder per category), as a CSV of their own."""
    with open(shopee_sample / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [row for row in rows if row["category"] < "07"][:20]  # three pictures per category in the sample
    assert len(rows) == 20
    path = tmp_path_factory.mktemp("shopee") / "train.csv"
    _write_csv(path, rows)
    return path


@pytest.fixture(scope="module")
def shopee_model(module_env, shopee_csv, shopee_sample, embeddings, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shopee-model") / "model.joblib"
    images = ["--images", str(shopee_sample / "images")]
    assert main(["fit", str(shopee_csv), *images, "--out", str(out), "--cache", embeddings, *TINY]) == 0
    return out


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("skproduct: warning:")]
    assert len(lines) == 1 and lines[0].startswith("skproduct: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command reads its data or loads its model: its output checks must come first."""
    import skproduct.cli._commands as commands

    def forbidden(*args, **kwargs):
        raise AssertionError("the command started its work before checking its outputs")

    monkeypatch.setattr(commands, "read_data", forbidden)
    monkeypatch.setattr(commands, "_load_model", forbidden)


# -- 1. outputs ---------------------------------------------------------------------------------------------------------
def test_predict_out_through_a_link_rewrites_the_target_and_keeps_the_link(model, small_bson, tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert main(["predict", str(model), str(small_bson), "--out", str(link), "-q"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert list(_read_csv(target)[0]) == ["_id", "category_id"] and len(_read_csv(target)) == 12
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "not-yet.csv")  # a link to a file not written yet: the file is made
    assert main(["predict", str(model), str(small_bson), "--out", str(dangling), "-q"]) == 0
    assert dangling.is_symlink() and len(_read_csv(tmp_path / "not-yet.csv")) == 12


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to a folder"])
def test_a_fifo_or_folder_out_is_one_line_before_any_work(kind, tmp_path, capsys, no_work):
    out = tmp_path / "out.csv"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "folder":
        out.mkdir()
    else:
        (tmp_path / "folder").mkdir()
        out.symlink_to(tmp_path / "folder")
    words = {"fifo": "is a FIFO", "folder": "is a folder", "link to a folder": "is a folder"}[kind]
    assert main(["predict", "model.joblib", "test.bson", "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", words, "pass a file path")
    assert main(["fit", "train.bson", "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", words)
    assert main(["extract", "data.bson", "--cache", str(tmp_path / "c"), "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", words)
    assert main(["evaluate", "model.joblib", "data.bson", "--json", str(out)]) == 2
    _one_line_error(capsys, "--json", words)
    if kind == "fifo":
        os.mkfifo(tmp_path / "confusion.png")
        assert main(["evaluate", "model.joblib", "data.bson", "--confusion", str(tmp_path / "confusion.png")]) == 2
        _one_line_error(capsys, "--confusion", "is a FIFO")
    assert not (tmp_path / "c").exists()


def test_out_dash_and_dev_stdout_write_the_submission_to_stdout(model, small_bson, capsys):
    for out in ("-", "/dev/stdout"):
        assert main(["predict", str(model), str(small_bson), "--out", out, "-q"]) == 0
        captured = capsys.readouterr()
        rows = list(csv.DictReader(captured.out.splitlines()))
        assert list(rows[0]) == ["_id", "category_id"] and len(rows) == 12
        assert "predicted 12 products" in captured.err and "wrote stdout" in captured.err  # the summary: stderr


def test_evaluate_json_to_stdout(model, small_bson, capsys):
    assert main(["evaluate", str(model), str(small_bson), "--json", "-", "-q"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_products"] == 12
    assert "accuracy" in captured.err


def test_binary_outputs_refuse_stdout(tmp_path, capsys, no_work):
    assert main(["fit", "train.bson", "--out", "-"]) == 2
    _one_line_error(capsys, "--out -", "cannot go to stdout")
    assert main(["evaluate", "m.joblib", "d.bson", "--confusion", "-"]) == 2
    _one_line_error(capsys, "--confusion -", "cannot go to stdout")


def test_a_missing_parent_folder_is_made_and_a_file_in_the_way_is_refused(model, small_bson, tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "submission.csv"
    assert main(["predict", str(model), str(small_bson), "--out", str(out), "-q"]) == 0
    assert len(_read_csv(out)) == 12
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main(["predict", str(model), str(small_bson), "--out", str(tmp_path / "file" / "s.csv")]) == 2
    _one_line_error(capsys, "--out", "file")
    assert main(["predict", str(model), str(small_bson), "--out", str(tmp_path / "file" / "a" / "s.csv")]) == 2
    _one_line_error(capsys, "--out", "is a file, not a folder")


def test_an_output_that_is_an_input_or_another_output_is_refused(model, small_bson, tmp_path, capsys):
    copy = tmp_path / "test.bson"
    copy.write_bytes(small_bson.read_bytes())
    assert main(["predict", str(model), str(copy), "--out", str(copy)]) == 2
    _one_line_error(capsys, "--out", "is a file this command reads")
    assert copy.read_bytes() == small_bson.read_bytes()
    assert main(["predict", str(model), str(copy), "--out", str(model)]) == 2
    _one_line_error(capsys, "is a file this command reads")
    both = str(tmp_path / "same.pdf")
    assert main(["evaluate", str(model), str(copy), "--json", both, "--confusion", both]) == 2
    _one_line_error(capsys, "--json and --confusion name the same file")


@pytest.mark.parametrize(
    "name, magic", [("conf.jpg", b"\xff\xd8\xff"), ("conf.png", b"\x89PNG"), ("conf.pdf", b"%PDF"),
                    ("conf.svg", b"<?xml")],
)
def test_confusion_is_written_in_the_format_its_suffix_names(name, magic, model, small_bson, tmp_path, capsys):
    path = tmp_path / name
    assert main(["evaluate", str(model), str(small_bson), "--confusion", str(path), "-q"]) == 0
    assert path.read_bytes()[: len(magic)] == magic


@pytest.mark.parametrize("name", ["conf.bmp", "conf"])
def test_an_unknown_confusion_suffix_is_refused_before_any_work(name, tmp_path, capsys, no_work):
    assert main(["evaluate", "model.joblib", "data.bson", "--confusion", str(tmp_path / name)]) == 2
    _one_line_error(capsys, "--confusion", "names no image format", ".png, .jpg")


# -- 2. one clear line for every user mistake; a traceback for a bug ------------------------------------------------
def test_cuda_without_a_gpu_is_one_line(model, small_bson, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for argv in (["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY],
                 ["predict", str(model), str(small_bson), "--out", str(tmp_path / "s.csv")],
                 ["evaluate", str(model), str(small_bson)]):
        assert main([*argv, "--device", "cuda"]) == 2
        _one_line_error(capsys, "--device cuda", "no such device")
    assert main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY, "--device", "gpu"]) == 2
    _one_line_error(capsys, "--device gpu is not a torch device")
    assert not list(tmp_path.iterdir())


def test_a_weights_file_that_is_not_weights_is_one_line_before_any_picture(small_bson, cdiscount_tree_path, tmp_path,
                                                                             capsys, monkeypatch):
    import skproduct.embed

    def embedding(*args, **kwargs):
        raise AssertionError("pictures were embedded before the weights were checked")

    monkeypatch.setattr(skproduct.embed.ImageEmbedder, "transform", embedding)
    argv = ["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), "--backbone", "timm:test_resnet",
            "--weights", str(cdiscount_tree_path), "--image-size", "32", "-q"]
    assert main(argv) == 2
    _one_line_error(capsys, "category_names.csv", "weights")
    assert main([*argv, "--head", "finetune"]) == 2  # the fine-tuner builds its backbone in fit: checked first too
    _one_line_error(capsys, "category_names.csv", "weights")
    assert not (tmp_path / "m.joblib").exists()


@pytest.fixture(scope="module")
def cdiscount_tree_path(shared_data) -> Path:
    return shared_data / "cdiscount" / "category_names.csv"


def test_a_cache_that_is_a_file_is_one_line(model, small_bson, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    for argv in (["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY],
                 ["extract", str(small_bson), *TINY],
                 ["predict", str(model), str(small_bson), "--out", str(tmp_path / "s.csv")]):
        assert main([*argv, "--cache", str(cache)]) == 2
        _one_line_error(capsys, f"--cache {cache} is not a folder")
    assert main(["extract", str(small_bson), *TINY, "--cache", str(cache / "sub")]) == 2
    _one_line_error(capsys, "is not a folder", "is a file")


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])
def test_a_cache_that_cannot_be_written(code, small_bson, tmp_path, capsys, monkeypatch):
    """Whatever the cache lets escape is one line naming --cache; what it handles itself is a warning."""
    from skproduct.cache import EmbeddingCache

    cache = tmp_path / "cache"

    def unwritable(self, fingerprint, keys, vectors):
        raise OSError(code, os.strerror(code), str(cache / fingerprint / "seg-1.skemb"))

    with monkeypatch.context() as patch:
        patch.setattr(EmbeddingCache, "put", unwritable)
        assert main(["extract", str(small_bson), "--cache", str(cache), *TINY]) == 2
        _one_line_error(capsys, f"the embedding cache --cache {cache} cannot be written", os.strerror(code))
    # the cache's own handling of an unwritable folder (the vectors stay in memory, with a warning)
    import skproduct.cache._cache as cache_module

    if not hasattr(cache_module, "write_segment"):
        pytest.skip("the cache writes its segments in another way")

    def failing_write(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(cache_module, "write_segment", failing_write)
    rc = main(["extract", str(small_bson), "--cache", str(tmp_path / "other"), *TINY])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 0:
        assert "skproduct: warning: " in err and "could not be written" in err
    else:
        assert rc == 2 and len([line for line in err.splitlines() if line.startswith("skproduct: error:")]) == 1


def test_a_full_disk_when_saving_is_one_line_and_leaves_nothing(small_bson, embeddings, tmp_path, capsys,
                                                                 monkeypatch):
    import joblib as joblib_module

    def full(value, f, *args, **kwargs):
        f.write(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(joblib_module, "dump", full)
    out = tmp_path / "m.joblib"
    assert main(["fit", str(small_bson), "--out", str(out), "--cache", embeddings, *TINY]) == 2
    _one_line_error(capsys, f"could not write {out}", "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no model, no temporary file


def test_evaluate_on_an_empty_bson_file_names_it(model, tmp_path, capsys):
    empty = tmp_path / "empty.bson"
    empty.write_bytes(b"")
    assert main(["evaluate", str(model), str(empty)]) == 2
    _one_line_error(capsys, "empty.bson", "the file is empty (0 bytes)")
    assert main(["predict", str(model), str(empty), "--out", str(tmp_path / "s.csv")]) == 2
    _one_line_error(capsys, "empty.bson", "empty")


def test_a_csv_without_products_is_one_line(model, shopee_sample, tmp_path, capsys):
    header_only = tmp_path / "test.csv"
    header_only.write_text("filename\n")
    assert main(["predict", str(model), str(header_only), "--images", str(shopee_sample / "images"),
                 "--out", str(tmp_path / "s.csv")]) == 2
    _one_line_error(capsys, "holds no products")


def test_verbose_and_quiet_before_the_command(model, small_bson, tmp_path, capsys):
    assert main(["-v", "predict", str(model), str(small_bson), "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    assert "skproduct: INFO: read 12 products" in capsys.readouterr().err
    assert main(["-q", "predict", str(model), str(small_bson), "--out", str(tmp_path / "s.csv")]) == 0
    assert "img/s" not in capsys.readouterr().err  # no progress bar
    assert main(["-v", "predict", str(model), str(tmp_path / "nope.bson"), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("skproduct: error: no data file")


def test_invalid_parameter_values_are_one_line(small_bson, tmp_path, capsys):
    assert main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY, "--random-state", "-1"]) == 2
    _one_line_error(capsys, "random_state")
    assert main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY, "--num-workers", "-1"]) == 2
    _one_line_error(capsys, "--num-workers", "must be 0 or a positive integer")
    assert main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), "--backbone", "timm:no_such_net",
                 "--no-pretrained"]) == 2
    _one_line_error(capsys, "no_such_net")


def test_a_malformed_csv_and_one_class_are_one_line(shopee_sample, tmp_path, capsys):
    images = ["--images", str(shopee_sample / "images")]
    broken = tmp_path / "broken.csv"
    broken.write_text('filename,category\n"a.jpg,00\n')
    assert main(["fit", str(broken), *images, "--out", str(tmp_path / "m.joblib"), *TINY]) == 2
    _one_line_error(capsys, "cannot read", "broken.csv")
    one_class = tmp_path / "one.csv"
    names = sorted(p.name for p in (shopee_sample / "images" / "00").iterdir())[:3]
    _write_csv(one_class, [{"filename": name, "category": "00"} for name in names])
    assert main(["fit", str(one_class), *images, "--out", str(tmp_path / "m.joblib"), *TINY]) == 2
    _one_line_error(capsys, "has the label '00'", "two classes or more")


@pytest.mark.parametrize("error", [
    ValueError("operands could not be broadcast together with shapes (3,) (4,)"),
    IndexError("index 5 is out of bounds"),
    TypeError("unsupported operand"),
], ids=["ValueError", "IndexError", "TypeError"])
def test_a_bug_during_the_work_keeps_its_traceback(error, small_bson, tmp_path, monkeypatch):
    import skproduct.embed

    def broken(self, X):
        raise error

    monkeypatch.setattr(skproduct.embed.ImageEmbedder, "transform", broken)
    with pytest.raises(type(error), match=re.escape(str(error))):
        main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY])


# -- 3. messages that name flags; every product answered ----------------------------------------------------------------
def test_a_truncated_bson_file_names_the_flag_and_the_flag_works(model, small_bson, tmp_path, capsys):
    cut = tmp_path / "cut.bson"
    cut.write_bytes(small_bson.read_bytes()[:-100])
    assert main(["predict", str(model), str(cut), "--out", str(tmp_path / "s.csv"), "-q"]) == 2
    line = _one_line_error(capsys, "--on-truncated warn")
    assert "on_truncated=" not in line
    assert main(["predict", str(model), str(cut), "--out", str(tmp_path / "s.csv"), "-q", "--on-truncated",
                 "warn"]) == 0
    err = capsys.readouterr().err
    assert "kept the 11 whole products before it" in err
    assert len(_read_csv(tmp_path / "s.csv")) == 11


def test_missing_images_name_the_flag_and_every_product_is_answered(shopee_model, shopee_csv, shopee_sample,
                                                                     tmp_path, capsys):
    rows = _read_csv(shopee_csv)
    rows.insert(3, {"filename": "missing.jpg", "category": "00"})
    data = _write_csv(tmp_path / "test.csv", rows)
    images = ["--images", str(shopee_sample / "images")]
    out = tmp_path / "s.csv"
    assert main(["predict", str(shopee_model), str(data), *images, "--out", str(out), "-q"]) == 2
    line = _one_line_error(capsys, "missing.jpg", "--on-missing drop")
    assert "on_missing=" not in line
    assert main(["predict", str(shopee_model), str(data), *images, "--out", str(out), "-q", "--on-missing",
                 "drop"]) == 0
    captured = capsys.readouterr()
    assert "1 product had no usable picture and was predicted from the training prior" in captured.out
    submitted = _read_csv(out)
    assert [row["filename"] for row in submitted] == [row["filename"] for row in rows]  # every product, in order
    prior = joblib.load(shopee_model).class_prior_
    classes = joblib.load(shopee_model).classes_
    assert submitted[3]["category"] == classes[np.argmax(prior)]
    assert len([line for line in captured.err.splitlines() if "missing.jpg" in line]) == 1  # warned and logged: once
    # evaluate answers it the same way; fit leaves it out
    assert main(["evaluate", str(shopee_model), str(data), *images, "-q", "--on-missing", "drop",
                 "--json", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n_products"] == 21 and scores["n_no_usable_picture"] == 1
    assert main(["fit", str(data), *images, "--out", str(tmp_path / "m.joblib"), *TINY, "--on-missing", "drop"]) == 0
    assert "fitted a logistic model on 20 products" in capsys.readouterr().out
    assert main(["extract", str(data), *images, "--cache", str(tmp_path / "c"), *TINY, "--on-missing", "drop",
                 "--out", str(tmp_path / "v.npy")]) == 0
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape[0] == 21 and not vectors[3].any() and vectors[[0, 4]].any(axis=1).all()


def test_an_undecodable_picture_names_on_error(model, bad_bson, tmp_path, capsys):
    assert main(["predict", str(model), str(bad_bson), "--out", str(tmp_path / "s.csv"), "--on-error",
                 "raise", "-q"]) == 2
    _one_line_error(capsys, "product 99", "--on-error skip")


def test_products_without_a_usable_picture_are_predicted_from_the_prior(model, bad_bson, tmp_path, capsys):
    fitted = joblib.load(model)
    most_frequent = fitted.classes_[np.argmax(fitted.class_prior_)]
    out = tmp_path / "s.csv"
    assert main(["predict", str(model), str(bad_bson), "--out", str(out), "-q", "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    assert "1 product had no usable picture and was predicted from the training prior" in captured.out
    row = _read_csv(out)[-1]
    assert row["_id"] == "99" and int(row["category_id"]) == most_frequent
    ranked = fitted.classes_[np.argsort(-fitted.class_prior_, kind="stable")[:3]]
    assert [int(row[c]) for c in ("category_id", "category_id_2", "category_id_3")] == ranked.tolist()
    assert main(["evaluate", str(model), str(bad_bson), "-q", "--json", str(tmp_path / "j.json")]) == 0
    assert "1 product had no usable picture" in capsys.readouterr().out
    assert json.loads((tmp_path / "j.json").read_text())["n_no_usable_picture"] == 1


def test_a_model_without_a_saved_prior_says_what_it_did(model, bad_bson, tmp_path, capsys):
    old = joblib.load(model)
    del old.class_prior_  # a model saved by an earlier skproduct fit
    joblib.dump(old, tmp_path / "old.joblib")
    assert main(["predict", str(tmp_path / "old.joblib"), str(bad_bson), "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    assert "1 product had no usable picture and was predicted from a zero vector" in capsys.readouterr().out


def test_a_fine_tuner_answers_from_its_own_prior():
    """Products a fine-tuner answered with its training prior are found, counted and answered from the prior."""
    import pandas as pd

    from skproduct.cli._commands import _predict
    from skproduct.cli._data import BSON_COLUMNS, Data

    class FineTuned:
        classes_ = np.array([10, 20, 30])
        _prior = np.array([0.2, 0.5, 0.3])

        def get_params(self, deep=True):
            return {}

        def predict(self, X):
            raise AssertionError("predict_proba is enough")

        def predict_proba(self, X):
            return np.array([[0.9, 0.05, 0.05], self._prior, [0.1, 0.1, 0.8]], dtype=np.float32)

    data = Data("t.bson", pd.DataFrame({"images": [["a"], ["b"], ["c"]]}), None, np.array([1, 2, 3]), BSON_COLUMNS, 3)
    predictions = _predict(FineTuned(), data, want_proba=True)
    assert predictions.labels.tolist() == [10, 20, 30]
    assert predictions.no_picture.tolist() == [False, True, False] and predictions.from_prior
    assert predictions.summary() == "1 product had no usable picture and was predicted from the training prior"


# -- 4. Ctrl-C ----------------------------------------------------------------------------------------------------------
def test_ctrl_c_while_saving_leaves_no_file(small_bson, embeddings, tmp_path, capsys, monkeypatch):
    import joblib as joblib_module

    def interrupted(value, f, *args, **kwargs):
        f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(joblib_module, "dump", interrupted)
    assert main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), "--cache", embeddings, *TINY]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "skproduct: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_predicting_keeps_the_previous_submission(model, small_bson, tmp_path, capsys, monkeypatch):
    import skproduct.embed

    out = tmp_path / "s.csv"
    out.write_text("the previous submission\n")

    def interrupted(self, X):
        raise KeyboardInterrupt

    monkeypatch.setattr(skproduct.embed.ImageEmbedder, "transform", interrupted)
    assert main(["predict", str(model), str(small_bson), "--out", str(out), "-q"]) == 130
    assert capsys.readouterr().err.strip() == "skproduct: interrupted"
    assert out.read_text() == "the previous submission\n" and sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


def test_ctrl_c_during_extract_keeps_what_the_cache_stored(small_bson, tmp_path, capsys, monkeypatch):
    from skproduct.cache import EmbeddingCache

    stored = EmbeddingCache.put

    def put_then_interrupt(self, fingerprint, keys, vectors):
        stored(self, fingerprint, keys, vectors)
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(EmbeddingCache, "put", put_then_interrupt)
        assert main(["extract", str(small_bson), "--cache", str(cache), *TINY, "--out", str(tmp_path / "v.npy")]) == 130
    assert capsys.readouterr().err.strip() == "skproduct: interrupted"
    assert not (tmp_path / "v.npy").exists()
    assert main(["extract", str(small_bson), "--cache", str(cache), *TINY]) == 0
    assert re.search(r": 12 hits, 0 misses", capsys.readouterr().out)


# -- 5. read_table and an absent label column ------------------------------------------------------------------------
def test_read_table_says_the_label_column_is_absent(shopee_sample, tmp_path):
    from skproduct.exceptions import MissingImagesError
    from skproduct.io import read_table

    names = sorted(p.name for p in (shopee_sample / "images" / "00").iterdir())[:2]
    table = tmp_path / "table.csv"
    table.write_text("filename,label\n" + "".join(f"{name},00\n" for name in names))
    with pytest.raises(MissingImagesError, match=r"has no label column 'category' \(columns: \['filename', 'label'\]\)"
                                                 r".*looked for directly under"):
        read_table(table, shopee_sample / "images", label_column="category")
    assert read_table(table, shopee_sample / "images", label_column="label")["label"].tolist() == ["00", "00"]


# -- 6. model files run code ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_help_of_commands_that_load_a_model_warns_about_pickles(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "loading one runs the code it holds" in out and "trusted source" in out


# -- 7. labels that do not fit the output format; duplicate file names -------------------------------------------------
def test_a_csv_model_on_a_bson_file_warns(shopee_model, small_bson, tmp_path, capsys):
    assert main(["predict", str(shopee_model), str(small_bson), "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "are not integer category ids" in err and "will not score" in err


def test_a_bson_model_on_a_csv_file_warns(model, shopee_csv, shopee_sample, tmp_path, capsys):
    argv = ["predict", str(model), str(shopee_csv), "--images", str(shopee_sample / "images")]
    assert main([*argv, "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    assert "are integer category ids" in capsys.readouterr().err


def test_duplicate_file_names_warn(shopee_model, shopee_csv, shopee_sample, tmp_path, capsys):
    rows = _read_csv(shopee_csv)
    data = _write_csv(tmp_path / "test.csv", rows + rows[:2])
    argv = ["predict", str(shopee_model), str(data), "--images", str(shopee_sample / "images")]
    assert main([*argv, "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    assert "2 file names appear more than once" in capsys.readouterr().err
    assert len(_read_csv(tmp_path / "s.csv")) == 22
