"""Example 3, Cdiscount: embeddings, a hierarchical LightGBM head over the category tree, and a submission file.

Cdiscount ships ``train.bson`` / ``test.bson`` and ``category_names.csv`` (5,270 leaves under
49 and 486 nodes). The pictures are embedded once (cached), a ``HierarchicalClassifier``
fits LightGBM at the top level and logistic regression below, and the predictions on
the test file become Kaggle's ``_id,category_id`` submission, one row per product.

Without arguments the example writes a synthetic catalogue in the same layout::

    python examples/cdiscount_hierarchical_lgbm.py
    python examples/cdiscount_hierarchical_lgbm.py --train train.bson --test test.bson \\
        --categories category_names.csv --backbone timm:resnet50
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from lightgbm import LGBMClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skproduct import CategoryTree, HierarchicalClassifier, ImageEmbedder, read_bson
from skproduct.datasets import make_category_tree, write_synthetic_bson
from skproduct.metrics import hierarchical_f1_score, level_accuracy_score


def synthetic_catalogue(folder: Path) -> tuple[Path, Path, Path]:
    """A labelled train file, an unlabelled test file and the tree's CSV, in Cdiscount's layout."""
    tree = make_category_tree((4, 3, 3))
    tree.to_frame().to_csv(folder / "category_names.csv", index=False)
    write_synthetic_bson(folder / "train.bson", n_products=600, tree=tree, max_images=2, random_state=0)
    write_synthetic_bson(folder / "test.bson", n_products=200, tree=tree, max_images=2, random_state=1)
    return folder / "train.bson", folder / "test.bson", folder / "category_names.csv"


def main(train=None, test=None, categories=None, backbone="timm:test_resnet", pretrained=False, image_size=32,
         out=None) -> dict:
    """Fit, score on the labelled test products (if labelled), and write the submission; returns the figures."""
    folder = Path(tempfile.mkdtemp(prefix="skproduct-cdiscount-"))
    if train is None:
        train, test, categories = synthetic_catalogue(folder)
    tree = CategoryTree.from_csv(categories)
    train_products, test_products = read_bson(train), read_bson(test)
    model = Pipeline([
        ("embed", ImageEmbedder(backbone, pretrained=pretrained, image_size=image_size, cache=folder / "cache")),
        ("scale", StandardScaler()),
        ("head", HierarchicalClassifier(
            {0: LGBMClassifier(n_estimators=100, min_sum_hessian_in_leaf=1.0, verbose=-1),
             1: LogisticRegression(max_iter=1000), 2: LogisticRegression(max_iter=1000)},
            tree=tree, strategy="per_parent")),
    ])
    model.fit(train_products, train_products["category_id"])
    predicted = model.predict(test_products)
    out = Path(out or folder / "submission.csv")
    pd.DataFrame({"_id": test_products["product_id"], "category_id": predicted}).to_csv(out, index=False)
    result = {"submission": out, "rows": len(predicted)}
    if test_products["category_id"].notna().all():  # the synthetic test file is labelled: score it
        truth = test_products["category_id"].to_numpy()
        result["level_accuracy"] = [level_accuracy_score(truth, predicted, tree=tree, level=k) for k in range(3)]
        result["hierarchical_f1"] = hierarchical_f1_score(truth, predicted, tree=tree)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path)
    parser.add_argument("--test", type=Path)
    parser.add_argument("--categories", type=Path)
    parser.add_argument("--backbone", default="timm:test_resnet")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = main(args.train, args.test, args.categories, args.backbone, args.pretrained, args.image_size, args.out)
    print(f"wrote {result['rows']} rows to {result['submission']}")
    if "level_accuracy" in result:
        print("accuracy per level:", [round(a, 3) for a in result["level_accuracy"]],
              f"hierarchical F1 {result['hierarchical_f1']:.3f}")
