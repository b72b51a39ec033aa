"""The documentation's worked examples run, on the shared data or the synthetic generator, with tiny settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {"backbone": "timm:test_resnet", "pretrained": False}


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shopee_linear_head(shopee_sample, tmp_path):
    result = _example("shopee_linear_head").main(shopee_sample, image_size=64, cache=tmp_path / "cache", **TINY)
    assert result["classes"] == 42
    assert 0.0 <= result["cv_accuracy"] <= 1.0  # random weights and 2 pictures per class: it runs, nothing more


def test_ndsc_transfer_learning(shared_data):
    result = _example("ndsc_transfer_learning").main(
        shared_data / "fashion-small", image_size=32, per_class=40, max_iter=15, learning_rate=3e-2, **TINY
    )
    assert result["accuracy"] > 0.3  # chance is 0.2 over five article types; only a head on random frozen features
    assert 1 <= result["best_epoch"] <= len(result["history"])


def test_cdiscount_hierarchical_lgbm_writes_a_submission(tmp_path):
    result = _example("cdiscount_hierarchical_lgbm").main(out=tmp_path / "submission.csv", image_size=32, **TINY)
    submission = pd.read_csv(result["submission"])
    assert list(submission.columns) == ["_id", "category_id"] and len(submission) == 200
    assert submission["_id"].is_unique
    assert result["level_accuracy"][0] > 0.5  # four top-level categories


def test_finetune_then_heads(shared_data):
    result = _example("finetune_then_heads").main(shared_data / "fashion-small", **TINY)  # its own tiny defaults
    assert result["finetuned_accuracy"] > 1 / 6 + 0.15
    assert result["head_accuracy"] > 1 / 6 + 0.15
