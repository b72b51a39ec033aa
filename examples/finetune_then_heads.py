"""Example 4, fine-tune a backbone, then fit heads on its features (the winning Cdiscount recipe).

The top Cdiscount teams fine-tuned their CNNs and then trained their final heads on the
fine-tuned network's features. ``FineTuneClassifier.export_embedder`` saves the fine-tuned
backbone and returns an ``ImageEmbedder`` on it whose vectors are cached, so a grid
search over heads extracts every picture once.

Runs offline on fashion-small from scratch (tiny model, low resolution)::

    python examples/finetune_then_heads.py
    python examples/finetune_then_heads.py --backbone timm:resnet50 --pretrained --image-size 160
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skproduct import FineTuneClassifier, read_bson

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-small"
LEAVES = [1000000104, 1000000098, 1000000111, 1000000116, 1000000046, 1000000009]  # two leaves per top category


def main(data=SHARED, backbone="timm:test_resnet", pretrained=False, image_size=32, per_class=80, max_iter=6) -> dict:
    """Fine-tune, export the backbone, grid-search a head on its cached features; returns both accuracies."""
    folder = Path(tempfile.mkdtemp(prefix="skproduct-finetune-"))
    products = read_bson(Path(data) / "fashion_small.bson", index_path=folder / "fashion.skpidx")
    chosen = pd.concat([products[products["category_id"] == leaf].iloc[:per_class] for leaf in LEAVES])
    position = chosen.groupby("category_id").cumcount()
    train, test = chosen[position < 0.75 * per_class], chosen[position >= 0.75 * per_class]

    finetuned = FineTuneClassifier(backbone, pretrained=pretrained, image_size=image_size, max_iter=max_iter, learning_rate=3e-3,
                                   random_state=0)
    finetuned.fit(train, train["category_id"])
    embedder = finetuned.export_embedder(folder / "finetuned.pt", cache=folder / "cache")
    heads = GridSearchCV(
        make_pipeline(embedder, StandardScaler(), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": [0.1, 1.0]}, cv=3,
    )
    heads.fit(train, train["category_id"])  # folds and candidates share the cached fine-tuned vectors
    return {"finetuned_accuracy": finetuned.score(test, test["category_id"]),
            "head_accuracy": heads.score(test, test["category_id"]), "best_params": heads.best_params_}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--backbone", default="timm:test_resnet")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    result = main(args.data, args.backbone, args.pretrained, args.image_size, max_iter=args.epochs)
    print(f"fine-tuned network: {result['finetuned_accuracy']:.3f}; logistic head on its features: "
          f"{result['head_accuracy']:.3f} ({result['best_params']}); chance 1/6")
