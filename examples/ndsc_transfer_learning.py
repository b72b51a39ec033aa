"""Example 2, NDSC-style transfer learning: a frozen ResNet50, only the new head trained, with augmentation.

The National Data Science Challenge solutions started from an ImageNet ResNet50, froze
it, and trained a new classification head on augmented product photos, stopping when
the validation loss stopped falling. ``FineTuneClassifier(trainable="head")`` is that
recipe; ``trainable="head_then_all"`` continues into full fine-tuning.

This example uses fashion-small's photos (a few article types) from ``../shared/data``::

    python examples/ndsc_transfer_learning.py                       # ResNet50, pretrained
    python examples/ndsc_transfer_learning.py --backbone timm:test_resnet --no-pretrained --image-size 32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from skproduct import FineTuneClassifier, read_bson

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-small"
# Tshirts, Casual Shoes, Watches, Handbags, Sunglasses
LEAVES = [1000000104, 1000000111, 1000000046, 1000000009, 1000000023]


def main(data=SHARED, backbone="timm:resnet50", pretrained=True, image_size=None, per_class=100, max_iter=10,
         learning_rate=1e-3) -> dict:
    """Train the head of a frozen backbone; returns the held-out accuracy and the training history."""
    index = Path(tempfile.gettempdir()) / "skproduct-example-fashion.skpidx"
    products = read_bson(Path(data) / "fashion_small.bson", index_path=index)
    chosen = pd.concat([products[products["category_id"] == leaf].iloc[:per_class] for leaf in LEAVES])
    position = chosen.groupby("category_id").cumcount()
    train, test = chosen[position < 0.8 * per_class], chosen[position >= 0.8 * per_class]
    model = FineTuneClassifier(
        backbone, pretrained=pretrained, image_size=image_size,
        trainable="head",            # the backbone stays frozen, batch-norm statistics included
        augment=True,                # random resized crops, flips, small rotations and shifts
        early_stopping=True, validation_fraction=0.15, n_iter_no_change=3,
        max_iter=max_iter, learning_rate=learning_rate, random_state=0,
    )
    model.fit(train, train["category_id"])
    return {"accuracy": model.score(test, test["category_id"]), "best_epoch": model.best_epoch_,
            "history": pd.DataFrame(model.history_)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--backbone", default="timm:resnet50")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    result = main(args.data, args.backbone, args.pretrained, args.image_size, max_iter=args.epochs)
    print(result["history"].round(4).to_string(index=False))
    print(f"kept epoch {result['best_epoch']}; held-out accuracy {result['accuracy']:.3f} (chance 0.2)")
