"""The skproduct command line on the shared data: fit, predict, extract, evaluate, demo, help, one-line errors."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import joblib
import pytest
from conftest import REPO_ROOT, SHARED_DATA

from skproduct.cli import main

TINY = ["--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "--quiet"]
COMMANDS = ("fit", "predict", "extract", "evaluate", "demo")


@pytest.fixture(scope="module", autouse=True)
def _shared_data_untouched(tmp_path_factory):
    """Nothing the command line does may write into the shared data (root may write in read-only folders)."""
    since = time.time()
    yield
    changed = [
        os.path.join(folder, name)
        for folder, folders, files in os.walk(SHARED_DATA)
        for name in [".", *folders, *files]
        if os.stat(os.path.join(folder, name)).st_mtime > since
    ]
    assert changed == [], f"the command line wrote into the shared data: {changed}"


@pytest.fixture(scope="module")
def module_env(tmp_path_factory):
    """Module fixtures run before conftest's per-test cache folder: give them their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKPRODUCT_CACHE_DIR", str(tmp_path_factory.mktemp("module-skproduct-cache")))
        yield


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> str:
    """One embedding cache for the module: every picture is embedded once."""
    return str(tmp_path_factory.mktemp("cli-embeddings"))


@pytest.fixture(scope="module")
def cdiscount_tree() -> str:
    return str(SHARED_DATA / "cdiscount" / "category_names.csv")


@pytest.fixture(scope="module")
def small_bson(cdiscount_sample, tmp_path_factory) -> Path:
    """The first 30 products of Cdiscount's sample, as a BSON file of their own."""
    import bson

    with open(cdiscount_sample, "rb") as f:
        documents = list(itertools.islice(bson.decode_file_iter(f), 30))
    path = tmp_path_factory.mktemp("small") / "small.bson"
    path.write_bytes(b"".join(bson.encode(document) for document in documents))
    return path


@pytest.fixture(scope="module")
def bson_with_a_bad_picture(cdiscount_sample, tmp_path_factory) -> Path:
    """Ten products of Cdiscount's sample, then one whose only picture is not a JPEG."""
    import bson

    with open(cdiscount_sample, "rb") as f:
        documents = list(itertools.islice(bson.decode_file_iter(f), 10))
    documents.append({"_id": 99, "imgs": [{"picture": b"not a picture"}], "category_id": documents[0]["category_id"]})
    path = tmp_path_factory.mktemp("bad") / "bad.bson"
    path.write_bytes(b"".join(bson.encode(document) for document in documents))
    return path


@pytest.fixture(scope="module")
def cdiscount_model(module_env, cdiscount_sample, cdiscount_tree, embeddings, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cdiscount-model") / "model.joblib"
    argv = ["fit", str(cdiscount_sample), "--categories", cdiscount_tree, "--head", "hierarchical", "--out", str(out)]
    assert main([*argv, "--cache", embeddings, *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def shopee_model(module_env, shopee_sample, embeddings, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shopee-model") / "model.joblib"
    assert main(["fit", str(shopee_sample / "train.csv"), "--out", str(out), "--cache", embeddings, *TINY]) == 0
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- fit and predict: Kaggle's submission formats ----------------------------------------------------------------------
def test_cdiscount_fit_and_predict_top_3(cdiscount_model, cdiscount_sample, read_shared_bson, tmp_path, capsys):
    from skproduct import CategoryTree, HierarchicalClassifier

    submission = tmp_path / "submission.csv"
    assert main(["predict", str(cdiscount_model), str(cdiscount_sample), "--out", str(submission), "--top-k", "3",
                 "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = _read_csv(submission)
    assert list(rows[0]) == ["_id", "category_id", "category_id_2", "category_id_3"]
    products = read_shared_bson(cdiscount_sample)
    assert [int(row["_id"]) for row in rows] == products["product_id"].tolist()  # every product once, in order
    tree = CategoryTree.from_csv(SHARED_DATA / "cdiscount" / "category_names.csv")
    for row in rows:
        ranked = [int(row[c]) for c in ("category_id", "category_id_2", "category_id_3")]
        assert len(set(ranked)) == 3 and all(leaf in tree for leaf in ranked)
    model = joblib.load(cdiscount_model)
    assert [name for name, _ in model.steps] == ["embed", "head"]
    assert isinstance(model.named_steps["head"], HierarchicalClassifier)
    plain = tmp_path / "plain.csv"
    assert main(["predict", str(cdiscount_model), str(cdiscount_sample), "--out", str(plain), "--quiet"]) == 0
    assert [row["category_id"] for row in _read_csv(plain)] == [row["category_id"] for row in rows]


def test_shopee_fit_and_predict_keep_string_labels(shopee_model, shopee_sample, tmp_path, capsys):
    submission = tmp_path / "submission.csv"
    assert main(["predict", str(shopee_model), str(shopee_sample / "train.csv"), "--out", str(submission),
                 "--top-k", "2", "--quiet"]) == 0
    rows = _read_csv(submission)
    assert list(rows[0]) == ["filename", "category", "category_2"]
    assert [row["filename"] for row in rows] == [row["filename"] for row in _read_csv(shopee_sample / "train.csv")]
    assert all(re.fullmatch(r"\d\d", row["category"]) for row in rows)  # "03" stays "03"
    assert sum(row["category"].startswith("0") for row in rows) > 0


def test_a_bad_picture_stops_fit_but_never_drops_a_product_from_predict(
    cdiscount_model, bson_with_a_bad_picture, tmp_path, capsys
):
    assert main(["fit", str(bson_with_a_bad_picture), "--out", str(tmp_path / "m.joblib"), *TINY]) == 2
    _assert_one_line_error(capsys, "image 0 of product 99", "bad.bson")
    submission = tmp_path / "submission.csv"
    assert main(["predict", str(cdiscount_model), str(bson_with_a_bad_picture), "--out", str(submission), "-q"]) == 0
    assert [row["_id"] for row in _read_csv(submission)][-2:] == ["9", "99"]
    assert "no usable picture" in capsys.readouterr().err
    assert main(["predict", str(cdiscount_model), str(bson_with_a_bad_picture), "--out", str(submission), "-q",
                 "--on-error", "raise"]) == 2
    _assert_one_line_error(capsys)


def test_fit_reports_time_and_training_accuracy(small_bson, tmp_path, capsys):
    assert main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fitted a logistic model on 30 products \(\d+ pictures, \d+ classes\) in [\d.]+ s; "
                     r"training accuracy [01]\.\d{3}", out)
    assert not list(tmp_path.glob(".*.tmp"))  # the model went through a temporary file, now gone


@pytest.mark.parametrize(
    "head",
    [
        ["--head", "logistic"],
        ["--head", "linear"],
        ["--head", "lgbm"],
        ["--head", "hierarchical", "--strategy", "per_level", "--local-estimator", "lgbm"],
    ],
    ids=["logistic", "linear", "lgbm", "hierarchical-lgbm"],
)
def test_every_head_fits_and_predicts(head, small_bson, cdiscount_tree, embeddings, tmp_path):
    from lightgbm import LGBMClassifier
    from sklearn.linear_model import LogisticRegression

    from skproduct import HierarchicalClassifier, TorchLinearClassifier

    out = tmp_path / "model.joblib"
    categories = ["--categories", cdiscount_tree] if "hierarchical" in head else []
    assert main(["fit", str(small_bson), "--out", str(out), "--cache", embeddings, *head, *categories, *TINY]) == 0
    fitted = joblib.load(out).named_steps["head"]
    expected = {"logistic": LogisticRegression, "linear": TorchLinearClassifier, "lgbm": LGBMClassifier,
                "hierarchical": HierarchicalClassifier}[head[1]]
    assert isinstance(fitted, expected)
    if head[1] == "lgbm":
        assert fitted.get_params()["min_sum_hessian_in_leaf"] == 1.0
    if head[1] == "hierarchical":
        assert fitted.strategy == "per_level" and isinstance(fitted.estimator, LGBMClassifier)
    submission = tmp_path / "submission.csv"
    assert main(["predict", str(out), str(small_bson), "--out", str(submission), "--quiet"]) == 0
    assert len(_read_csv(submission)) == 30


@pytest.mark.skipif(not (REPO_ROOT / "skproduct" / "finetune.py").exists(), reason="FineTuneClassifier not written yet")
def test_finetune_head(small_bson, tmp_path):
    from skproduct.finetune import FineTuneClassifier

    out = tmp_path / "model.joblib"
    argv = ["fit", str(small_bson), "--out", str(out), "--head", "finetune", "--max-iter", "1", "--batch-size", "8"]
    assert main([*argv, *TINY]) == 0
    assert isinstance(joblib.load(out), FineTuneClassifier)
    submission = tmp_path / "submission.csv"
    assert main(["predict", str(out), str(small_bson), "--out", str(submission), "--top-k", "2", "--quiet"]) == 0
    assert len(_read_csv(submission)) == 30
    # --device reaches the fine-tuned model too, without refitting it
    again = tmp_path / "again.csv"
    predict = ["predict", str(out), str(small_bson), "--out", str(again), "--top-k", "2", "--quiet"]
    assert main([*predict, "--device", "cpu"]) == 0
    assert _read_csv(again) == _read_csv(submission)


@pytest.mark.parametrize("device", ["cuda:7", "gpu"])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(device, cdiscount_model, small_bson, tmp_path,
                                                                  capsys):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    out = tmp_path / "never.csv"
    assert main(["predict", str(cdiscount_model), str(small_bson), "--out", str(out), "--device", device]) == 2
    _assert_one_line_error(capsys, device)
    assert not out.exists()
    assert main(["extract", str(small_bson), "--cache", str(tmp_path / "c"), "--device", device, *TINY]) == 2
    _assert_one_line_error(capsys, device)
    assert not (tmp_path / "c").exists()


# -- extract: resumable through the cache ------------------------------------------------------------------------------
def test_extract_twice_second_run_is_all_cache_hits(small_bson, tmp_path, capsys):
    import numpy as np

    argv = ["extract", str(small_bson), "--cache", str(tmp_path / "cache"), *TINY]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert re.search(r"embedded 30 products \(41 pictures\) .* in [\d.]+ s \([\d.]+ images/s\)", first)
    assert ": 0 hits, 41 misses; 41 vectors" in first  # BSON pictures are keyed by their byte range (issue 14)
    assert main([*argv, "--out", str(tmp_path / "vectors.npy")]) == 0
    second = capsys.readouterr().out
    assert ": 41 hits, 0 misses; 41 vectors" in second
    assert np.load(tmp_path / "vectors.npy").shape == (30, 96)


# -- evaluate ----------------------------------------------------------------------------------------------------------
def test_evaluate_with_the_tree_writes_png_and_json(
    cdiscount_model, cdiscount_sample, cdiscount_tree, tmp_path, capsys
):
    png, scores = tmp_path / "confusion.png", tmp_path / "scores.json"
    argv = ["evaluate", str(cdiscount_model), str(cdiscount_sample), "--categories", cdiscount_tree, "--top-k", "3"]
    assert main([*argv, "--confusion", str(png), "--json", str(scores), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "level 1 accuracy (49 nodes)" in out and "hierarchical F1" in out and "top-3 accuracy" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads(scores.read_text())
    assert figures["n_products"] == 82 and figures["top_k"] == 3
    assert len(figures["level_accuracy"]) == 3 and figures["level_accuracy"][2] == figures["accuracy"]
    assert figures["level_accuracy"][0] >= figures["level_accuracy"][1] >= figures["level_accuracy"][2]
    assert 0 <= figures["hierarchical_f1"] <= 1 and figures["top_k_accuracy"] >= figures["accuracy"]
    # without --categories, the tree the hierarchical model was fitted with
    assert main(["evaluate", str(cdiscount_model), str(cdiscount_sample), "--json", str(scores), "--quiet"]) == 0
    assert json.loads(scores.read_text())["level_accuracy"] == figures["level_accuracy"]


def test_evaluate_without_a_tree_scores_the_classes(shopee_model, shopee_sample, tmp_path, capsys):
    png, scores = tmp_path / "confusion.png", tmp_path / "scores.json"
    argv = ["evaluate", str(shopee_model), str(shopee_sample / "train.csv"), "--confusion", str(png)]
    assert main([*argv, "--json", str(scores), "--quiet"]) == 0
    figures = json.loads(scores.read_text())
    assert "level_accuracy" not in figures and figures["n_products"] == 126 and figures["top_k"] == 5
    assert png.stat().st_size > 0 and "top-5 accuracy" in capsys.readouterr().out


# -- demo --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_beats_chance_at_every_level(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--products", "200", "--quiet"]) == 0
    out = capsys.readouterr().out
    levels = re.findall(r"^\s+(\d)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert [(level, nodes) for level, nodes, _, _ in levels] == [("1", "6"), ("2", "24"), ("3", "72")]
    for _, _, accuracy, chance in levels:
        assert float(accuracy) > float(chance) + 0.3
    assert "grid search best parameters: {'head__estimator__C'" in out
    assert (tmp_path / "model.joblib").is_file() and (tmp_path / "catalogue.bson").is_file()


# -- help --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: skproduct {command}") and "--verbose" in out and "--quiet" in out


def test_python_m_skproduct_help():
    result = subprocess.run(
        [sys.executable, "-m", "skproduct", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: skproduct") and all(command in result.stdout for command in COMMANDS)


# -- mistakes: one line, exit code 2 -----------------------------------------------------------------------------------
def _assert_one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skproduct: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.fixture
def not_a_model(tmp_path) -> Path:
    path = tmp_path / "dict.joblib"
    joblib.dump({"weights": [1, 2, 3]}, path)
    return path


@pytest.fixture
def unlabelled_bson(tmp_path) -> Path:
    from skproduct.datasets import write_synthetic_bson

    return Path(write_synthetic_bson(tmp_path / "test.bson", 5, labelled=False, random_state=0))


@pytest.fixture
def csv_without_labels(shopee_sample, tmp_path) -> Path:
    path = tmp_path / "test.csv"
    path.write_text("filename\n" + "".join(f"00/{p.name}\n" for p in (shopee_sample / "images" / "00").iterdir()))
    return path


def test_missing_files_and_wrong_formats(tmp_path, shopee_sample, capsys):
    cases = [
        (["fit", str(tmp_path / "train.bson"), "--out", "m.joblib"], ["no data file at", "train.bson"]),
        (["predict", str(tmp_path / "nope.joblib"), str(tmp_path / "t.bson"), "--out", "s.csv"],
         ["no model file at", "skproduct fit"]),
        (["predict", str(shopee_sample / "train.csv"), str(shopee_sample / "train.csv"), "--out", "s.csv"],
         ["is not a readable model file", "train.csv"]),
        (["fit", str(REPO_ROOT / "pyproject.toml"), "--out", "m.joblib"], ["neither a .bson nor a .csv"]),
        (["fit", str(shopee_sample / "train.csv"), "--images", str(tmp_path / "nowhere"), "--out", "m.joblib"],
         ["no image folder at", "--images DIR"]),
        (["evaluate", str(tmp_path / "m.joblib"), "x.bson", "--categories", str(tmp_path / "tree.csv")],
         ["no model file at"]),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        _assert_one_line_error(capsys, *expected)


def test_usage_mistakes(capsys, small_bson, shopee_sample, cdiscount_tree):
    cases = [
        ([], ["the following arguments are required: COMMAND", "skproduct --help"]),
        (["fit", str(small_bson)], ["--out", "skproduct fit --help"]),
        (["fit", str(small_bson), "--out", "m.joblib", "--head", "svm"], ["invalid choice: 'svm'"]),
        (["predict", "m.joblib", "t.bson", "--out", "s.csv", "--top-k", "0"], ["must be a positive integer"]),
        (["fit", str(small_bson), "--out", "m.joblib", "--head", "hierarchical"],
         ["--head hierarchical needs the category tree", "--categories"]),
        (["extract", str(small_bson)], ["--cache"]),
        (["fit", str(shopee_sample / "train.csv"), "--categories", cdiscount_tree, "--out", "m.joblib"],
         ["labels of", "are not leaves of the tree", "--categories"]),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        _assert_one_line_error(capsys, *expected)


def test_data_without_labels(capsys, unlabelled_bson, csv_without_labels, shopee_sample, small_bson, tmp_path):
    assert main(["fit", str(unlabelled_bson), "--out", str(tmp_path / "m.joblib")]) == 2
    _assert_one_line_error(capsys, "has no labels (a test file?)")
    mixed = tmp_path / "mixed.bson"
    mixed.write_bytes(small_bson.read_bytes() + unlabelled_bson.read_bytes())
    assert main(["fit", str(mixed), "--out", str(tmp_path / "m.joblib")]) == 2
    _assert_one_line_error(capsys, "5 of 35 products", "have no category_id")
    images = ["--images", str(shopee_sample / "images")]
    assert main(["fit", str(csv_without_labels), *images, "--out", str(tmp_path / "m.joblib")]) == 2
    _assert_one_line_error(capsys, "has no label column 'category'", "--label-column NAME")
    argv = ["fit", str(csv_without_labels), *images, "--label-column", "class", "--out", str(tmp_path / "m.joblib")]
    assert main(argv) == 2
    _assert_one_line_error(capsys, "has no label column 'class'")


def test_models_that_do_not_fit_the_data(capsys, not_a_model, shopee_model, cdiscount_sample, tmp_path):
    assert main(["predict", str(not_a_model), str(cdiscount_sample), "--out", str(tmp_path / "s.csv")]) == 2
    _assert_one_line_error(capsys, "holds a dict, not a scikit-learn model")
    assert main(["evaluate", str(shopee_model), str(cdiscount_sample), "--quiet"]) == 2
    _assert_one_line_error(capsys, "none of the labels of", "are classes of the model", "'00'")
    assert not (tmp_path / "s.csv").exists()


def test_offline_download_failure_is_one_line(small_bson, tmp_path, monkeypatch, capsys):
    import timm

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("the test expects a pretrained build")

    monkeypatch.setattr(timm, "create_model", offline)
    argv = ["fit", str(small_bson), "--backbone", "timm:test_resnet", "--out", str(tmp_path / "m.joblib"), "-q"]
    assert main(argv) == 2
    _assert_one_line_error(capsys, "could not be downloaded (offline?)", "--weights FILE, or --no-pretrained")
    assert not (tmp_path / "m.joblib").exists()


def test_bugs_still_raise(small_bson, tmp_path, monkeypatch):
    import skproduct.cli._commands

    def broken(model, data):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(skproduct.cli._commands, "_fit_and_score", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY])
    monkeypatch.setattr(skproduct.cli._commands, "_fit_and_score", lambda model, data: {}["bug"])
    with pytest.raises(KeyError):
        main(["fit", str(small_bson), "--out", str(tmp_path / "m.joblib"), *TINY])
