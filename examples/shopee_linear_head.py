"""Example 1, Shopee's layout: a frozen backbone and a linear head with class weights for the long tail.

Shopee's product-detection data is a ``train.csv`` of ``filename,category`` with the
pictures in one folder per category. A frozen backbone turns every picture into a
vector once (kept in an embedding cache), and a torch softmax head with
``class_weight="balanced"`` weighs rare categories up. The cache makes the
cross-validation and the final fit reuse one extraction.

Run on the real data (pretrained weights need internet, or ``--weights FILE``)::

    python examples/shopee_linear_head.py --data ../shared/data/shopee-sample

Offline, with random weights (the numbers then only show that it runs)::

    python examples/shopee_linear_head.py --backbone timm:test_resnet --no-pretrained --image-size 64
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skproduct import ImageEmbedder, TorchLinearClassifier, read_table

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shopee-sample"


def main(data=SHARED, backbone="timm:resnet50", pretrained=True, image_size=None, cache=None) -> dict:
    """Cross-validate and fit the pipeline; returns the scores."""
    data = Path(data)
    products = read_table(data / "train.csv", data / "images")  # labels stay strings: "03" is "03"
    y = products["category"]
    cache = cache or Path(tempfile.gettempdir()) / "skproduct-example-cache"
    model = make_pipeline(
        ImageEmbedder(backbone, pretrained=pretrained, image_size=image_size, cache=cache),
        StandardScaler(),
        TorchLinearClassifier(class_weight="balanced", label_smoothing=0.1, random_state=0),
    )
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    scores = cross_val_score(model, products, y, cv=folds)  # every fold reuses the cached vectors
    model.fit(products, y)
    return {"cv_accuracy": float(scores.mean()), "classes": len(model.classes_), "chance": 1 / y.nunique()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--backbone", default="timm:resnet50")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image-size", type=int)
    args = parser.parse_args()
    result = main(args.data, args.backbone, args.pretrained, args.image_size)
    print(f"3-fold accuracy {result['cv_accuracy']:.3f} over {result['classes']} categories "
          f"(chance {result['chance']:.3f})")
