"""FineTuneClassifier on tiny timm models and small slices of the real data."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from skproduct import CategoryTree
from skproduct.exceptions import ImageDecodeError
from skproduct.finetune import FineTuneClassifier

TINY = {"backbone": "timm:test_resnet", "pretrained": False, "image_size": 32, "batch_size": 32}
# Tshirts, Casual Shoes, Watches, Handbags: four fashion-small leaves under three top-level categories
FASHION_LEAVES = [1000000104, 1000000111, 1000000046, 1000000009]
FASHION_SLICE = """
import pandas as pd
from skproduct import read_bson

def fashion_slice(path, index_path, leaves, per_class):
    products = read_bson(path, index_path=index_path)
    return pd.concat([products[products["category_id"] == leaf].iloc[:per_class] for leaf in leaves])
"""
exec(FASHION_SLICE)  # the same slice in this process and in the killed subprocess below


@pytest.fixture(scope="module")
def fashion(shared_data, tmp_path_factory):
    """90 products of each of four leaves: 60 to train on, 30 to test on."""
    index = tmp_path_factory.mktemp("fashion") / "fashion_small.skpidx"
    products = fashion_slice(shared_data / "fashion-small" / "fashion_small.bson", index, FASHION_LEAVES, 90)  # noqa: F821
    position = products.groupby("category_id").cumcount().to_numpy()
    return products[position < 60], products[position >= 60]


@pytest.fixture(scope="module")
def fashion_tree(shared_data):
    return CategoryTree.from_csv(shared_data / "fashion-small" / "category_names.csv")


@pytest.fixture(scope="module")
def cdiscount(cdiscount_sample, shared_data, tmp_path_factory):
    from skproduct.io import read_bson

    products = read_bson(cdiscount_sample, index_path=tmp_path_factory.mktemp("cd") / "sample.skpidx")
    return products, CategoryTree.from_csv(shared_data / "cdiscount" / "category_names.csv")


@pytest.fixture(scope="module")
def fitted(fashion):
    train, _ = fashion
    model = FineTuneClassifier(**TINY, max_iter=6, learning_rate=3e-3)
    return model.fit(train, train["category_id"].to_numpy())


def test_training_loss_falls_and_accuracy_beats_chance(fitted, fashion):
    _, test = fashion
    losses = [record["train_loss"] for record in fitted.history_]
    assert losses[-1] < 0.8 * losses[0]
    assert fitted.score(test, test["category_id"]) >= 0.5  # chance is 0.25
    assert set(fitted.history_[0]) == {
        "epoch", "train_loss", "valid_loss", "valid_accuracy", "lr", "images_per_second", "seconds"
    }
    assert [record["epoch"] for record in fitted.history_] == list(range(1, 7))
    np.testing.assert_array_equal(fitted.classes_, sorted(FASHION_LEAVES))


def test_same_seed_same_model_and_the_split_is_held_out(fitted, fashion):
    train, _ = fashion
    again = clone(fitted).fit(train, train["category_id"].to_numpy())
    np.testing.assert_allclose(again.predict_proba(train.iloc[:20]), fitted.predict_proba(train.iloc[:20]), atol=1e-6)
    assert len(fitted.validation_products_) == round(0.1 * len(train))
    held_out = train["category_id"].to_numpy()[fitted.validation_products_]
    assert len(np.unique(held_out)) == 4  # stratified


def test_early_stopping_restores_the_best_epoch(fashion):
    train, _ = fashion
    y = train["category_id"].to_numpy()
    model = FineTuneClassifier(**TINY, max_iter=30, learning_rate=3e-2, n_iter_no_change=2, validation_fraction=0.2,
                               augment=False, label_smoothing=0.0)
    model.fit(train, y)
    losses = [record["valid_loss"] for record in model.history_]
    assert len(losses) < 30, "training should stop when the validation loss stops improving"
    assert model.best_epoch_ == int(np.argmin(losses)) + 1
    assert model.best_epoch_ == len(losses) - 2  # two epochs without improvement, then the best weights back
    valid = model.validation_products_
    proba = model.predict_proba(train.iloc[valid])
    picked = proba[np.arange(len(valid)), np.searchsorted(model.classes_, y[valid])]
    assert -np.log(picked).mean() == pytest.approx(min(losses), rel=1e-5)


def test_prediction_in_chunks_matches_one_pass(fitted, fashion, monkeypatch):
    import skproduct.image_pipeline.pooling as pooling

    _, test = fashion
    whole, labels = fitted.predict_proba(test), fitted.predict(test)
    monkeypatch.setattr(pooling, "PRODUCTS_PER_CHUNK", 7)  # products straddle chunk borders
    np.testing.assert_allclose(fitted.predict_proba(test), whole, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(fitted.predict(test), labels)
    np.testing.assert_array_equal(labels, fitted.classes_[whole.argmax(axis=1)])


def test_worker_processes_train_and_predict_the_same(cdiscount):
    products, _ = cdiscount
    products = products.head(24)
    y = products["category_id"].to_numpy() % 2  # two classes
    options = dict(TINY, max_iter=2, augment=False, early_stopping=False)
    alone = FineTuneClassifier(**options).fit(products, y)
    workers = FineTuneClassifier(**options, num_workers=2).fit(products, y)
    np.testing.assert_allclose(workers.predict_proba(products), alone.predict_proba(products), rtol=1e-5, atol=1e-6)


def test_multi_picture_products_average_their_pictures(cdiscount):
    products, tree = cdiscount
    model = FineTuneClassifier(**TINY, max_iter=1, tree=tree, early_stopping=False)
    model.fit(products, products["category_id"].to_numpy())
    several = products[products["n_images"] >= 3].iloc[:2]
    proba = model.predict_proba(several)
    for row, pictures in zip(proba, several["images"]):
        alone = model.predict_proba([[picture] for picture in pictures])
        np.testing.assert_allclose(row, alone.mean(axis=0), rtol=1e-5, atol=1e-9)


def test_tree_predictions_are_valid_paths(cdiscount):
    products, tree = cdiscount
    model = FineTuneClassifier(**TINY, max_iter=2, tree=tree, learning_rate=3e-3, early_stopping=False)
    model.fit(products, products["category_id"].to_numpy())
    assert [head.out_features for head in model._model().heads] == [49, 486, 5270]
    np.testing.assert_array_equal(model.classes_, tree.leaves)
    proba = model.predict_proba(products)
    assert proba.shape == (len(products), 5270)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert np.isin(model.predict(products), tree.leaves).all()
    # each level's probabilities, summed over the tree, are a distribution whose best node is on the best path
    leaf_codes = tree.encode(model.classes_)
    best = model.predict(products)
    for level in range(3):
        level_proba = np.zeros((len(products), tree.level_sizes[level]))
        np.add.at(level_proba.T, leaf_codes[:, level], proba.T)
        np.testing.assert_allclose(level_proba.sum(axis=1), 1.0, rtol=1e-6)
        assert np.isin(tree.encode(best)[:, level], np.arange(tree.level_sizes[level])).all()


def test_tree_mode_learns_the_fashion_levels(fashion, fashion_tree):
    train, test = fashion
    model = FineTuneClassifier(**TINY, max_iter=6, learning_rate=3e-3, tree=fashion_tree)
    model.fit(train, train["category_id"].to_numpy())
    from skproduct.metrics import level_accuracy_score

    predicted = model.predict(test)
    top = level_accuracy_score(test["category_id"], predicted, tree=fashion_tree, level=0)
    assert top >= 0.5  # three top-level categories, the most frequent of which holds half the products


def test_joblib_round_trip_predicts_identically(fitted, fashion, tmp_path):
    _, test = fashion
    joblib.dump(fitted, tmp_path / "model.joblib")
    loaded = joblib.load(tmp_path / "model.joblib")
    np.testing.assert_array_equal(loaded.predict_proba(test), fitted.predict_proba(test))
    np.testing.assert_array_equal(loaded.transform(test.iloc[:5]), fitted.transform(test.iloc[:5]))


def test_a_model_trained_on_a_gpu_predicts_on_a_cpu(fitted, fashion, tmp_path):
    from skproduct.exceptions import DeviceFallbackWarning

    _, test = fashion
    joblib.dump(fitted, tmp_path / "model.joblib")
    gpu_model = joblib.load(tmp_path / "model.joblib")
    # as if trained with device="cuda:7" in fp16 on a GPU machine
    gpu_model.__dict__.update(device="cuda:7", device_="cuda:7", precision_="fp16")
    joblib.dump(gpu_model, tmp_path / "gpu.joblib")
    loaded = joblib.load(tmp_path / "gpu.joblib")
    with pytest.warns(DeviceFallbackWarning) as caught:  # the CPU, and fp32 since a CPU has no fp16
        np.testing.assert_array_equal(loaded.predict(test), fitted.predict(test))
    assert {"cuda:7", "fp16"} <= {word.strip(",;()") for w in caught for word in str(w.message).split()}
    joblib.dump(loaded, tmp_path / "again.joblib")  # saved again on the CPU machine: it remembers its GPU
    again = joblib.load(tmp_path / "again.joblib")
    assert (again.device, again.device_, again.precision_) == ("cuda:7", "cuda:7", "fp16")


def test_grid_search_over_two_learning_rates(fashion):
    train, _ = fashion
    small = train.groupby("category_id").head(16)
    search = GridSearchCV(
        FineTuneClassifier(**TINY, max_iter=2, early_stopping=False), {"learning_rate": [1e-4, 3e-3]}, cv=2
    )
    search.fit(small, small["category_id"].to_numpy())
    assert search.best_params_["learning_rate"] in (1e-4, 3e-3)
    assert len(search.best_estimator_.history_) == 2
    assert not hasattr(clone(search.best_estimator_), "history_")


def test_transform_gives_the_fine_tuned_features_and_export_feeds_a_cached_head(fitted, fashion, tmp_path):
    train, test = fashion
    features = fitted.transform(test)
    assert features.shape == (len(test), fitted.n_features_out_) and features.dtype == np.float32
    assert fitted.get_feature_names_out()[:2].tolist() == ["finetuneclassifier0", "finetuneclassifier1"]
    embedder = fitted.export_embedder(tmp_path / "finetuned.pt", cache=tmp_path / "cache")
    np.testing.assert_allclose(embedder.fit_transform(test), features, rtol=1e-4, atol=1e-5)
    head = LogisticRegression(max_iter=500).fit(embedder.transform(train), train["category_id"])
    assert head.score(embedder.transform(test), test["category_id"]) >= 0.5


def test_head_only_training_leaves_the_backbone_untouched(fashion):
    from skproduct.backbones import build_backbone, parse_backbone

    train, _ = fashion
    small = train.groupby("category_id").head(10)
    y = small["category_id"].to_numpy()
    initial = build_backbone(parse_backbone(TINY["backbone"]), pretrained=False, weights=None, image_size=32, seed=0)
    initial = initial.state_dict()
    head_only = FineTuneClassifier(**TINY, max_iter=2, trainable="head", early_stopping=False).fit(small, y)
    for name, value in head_only._model().backbone.state_dict().items():  # batch-norm statistics included
        np.testing.assert_array_equal(value.numpy(), initial[name].numpy(), err_msg=name)
    staged = FineTuneClassifier(**TINY, max_iter=2, trainable="head_then_all", early_stopping=False).fit(small, y)
    changed = [
        not np.array_equal(value.numpy(), initial[name].numpy())
        for name, value in staged._model().backbone.state_dict().items()
    ]
    assert any(changed)


def test_warm_start_continues_training(fashion):
    train, _ = fashion
    small = train.groupby("category_id").head(10)
    y = small["category_id"].to_numpy()
    model = FineTuneClassifier(**TINY, max_iter=2, warm_start=True, early_stopping=False).fit(small, y)
    model.fit(small, y)
    assert [record["epoch"] for record in model.history_] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="labels the model does not know"):
        model.fit(small, np.where(y == y[0], 7, y))


def _worsening_validation(monkeypatch):
    """Make every validation worse than the one before, whatever the network does."""
    calls = []

    def validate(self, products, leaf_index, device):
        calls.append(1)
        return float(len(calls)), 0.0

    monkeypatch.setattr(FineTuneClassifier, "_validate", validate)
    return calls


def test_head_then_all_always_reaches_the_unfrozen_phase(fashion, monkeypatch):
    train, _ = fashion
    small = train.groupby("category_id").head(10)
    _worsening_validation(monkeypatch)
    model = FineTuneClassifier(**TINY, max_iter=6, trainable="head_then_all", head_epochs=3, n_iter_no_change=1)
    model.fit(small, small["category_id"].to_numpy())
    assert len(model.history_) == 4  # three head epochs never stop early; the first unfrozen one runs out of patience
    assert model.best_epoch_ == 1


def test_warm_start_keeps_the_starting_model_when_it_does_not_improve(fashion, monkeypatch):
    train, test = fashion
    small = train.groupby("category_id").head(10)
    y = small["category_id"].to_numpy()
    model = FineTuneClassifier(**TINY, max_iter=2, warm_start=True).fit(small, y)
    before = model.predict_proba(test)
    _worsening_validation(monkeypatch)
    model.set_params(learning_rate=5e-2).fit(small, y)
    assert len(model.history_) == 4 and model.best_epoch_ == 2  # worse epochs 3 and 4: epoch 2's weights stay
    np.testing.assert_allclose(model.predict_proba(test), before, rtol=1e-6, atol=1e-9)


def test_warm_start_checkpoints_are_named_by_their_starting_weights(fashion, tmp_path):
    train, _ = fashion
    a, b = train.groupby("category_id").head(6), train.groupby("category_id").tail(6)
    params = dict(TINY, max_iter=1, early_stopping=False, warm_start=True, checkpoint_dir=tmp_path)
    first = FineTuneClassifier(**params).fit(a, a["category_id"].to_numpy())
    first.fit(b, b["category_id"].to_numpy())
    second = FineTuneClassifier(**params).fit(b, b["category_id"].to_numpy())
    second.fit(b, b["category_id"].to_numpy())  # same data and epoch count as first's continuation, other weights
    assert len(list(tmp_path.glob("finetune-*.pt"))) == 4
    assert not np.allclose(first.transform(b), second.transform(b))


def test_a_failed_refit_does_not_look_fitted(fitted, fashion, tmp_path):
    import torch
    from sklearn.exceptions import NotFittedError

    train, test = fashion
    small = train.groupby("category_id").head(10)
    model = clone(fitted).set_params(max_iter=1).fit(small, small["category_id"].to_numpy())
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        model.set_params(weights=tmp_path / "wrong.pt").fit(small, small["category_id"].to_numpy())
    with pytest.raises(NotFittedError):
        model.predict(test)


def test_resume_after_a_killed_fit(shared_data, tmp_path):
    """A fit killed after its second epoch's checkpoint resumes and ends where an uninterrupted fit ends."""
    bson = shared_data / "fashion-small" / "fashion_small.bson"
    params = dict(TINY, max_iter=4, learning_rate=3e-3, checkpoint_dir=str(tmp_path / "checkpoints"))
    script = FASHION_SLICE + textwrap.dedent(f"""
        import os, signal
        import skproduct._checkpoints as training
        from skproduct.finetune import FineTuneClassifier

        saved = []
        original = training.save_checkpoint
        def save_then_die(path, payload):
            original(path, payload)
            saved.append(path)
            if len(saved) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        training.save_checkpoint = save_then_die
        products = fashion_slice({str(bson)!r}, {str(tmp_path / 'index')!r}, {FASHION_LEAVES!r}, 20)
        FineTuneClassifier(**{params!r}).fit(products, products["category_id"].to_numpy())
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    # epoch 2's checkpoint and epoch 1's kept before it (name.pt, name.prev.pt); no temporary file left behind
    assert sorted(p.name.endswith(".prev.pt") for p in checkpoints) == [False, True]
    assert all(p.suffix == ".pt" for p in checkpoints) and len({p.name.split(".")[0] for p in checkpoints}) == 1

    products = fashion_slice(bson, tmp_path / "index", FASHION_LEAVES, 20)  # noqa: F821
    y = products["category_id"].to_numpy()
    trained_epochs = []
    resumed = FineTuneClassifier(**params)
    original_train_epoch = __import__("skproduct._finetune_parts", fromlist=["train_epoch"]).train_epoch

    def counting(*args, **kwargs):
        trained_epochs.append(1)
        return original_train_epoch(*args, **kwargs)

    import skproduct._finetune_parts as training

    training.train_epoch, saved_function = counting, training.train_epoch
    try:
        resumed.fit(products, y)
    finally:
        training.train_epoch = saved_function
    assert len(trained_epochs) == 2  # epochs 3 and 4 only
    uninterrupted = FineTuneClassifier(**dict(params, checkpoint_dir=None)).fit(products, y)
    assert [r["epoch"] for r in resumed.history_] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [r["train_loss"] for r in resumed.history_], [r["train_loss"] for r in uninterrupted.history_], rtol=1e-5
    )
    np.testing.assert_allclose(resumed.predict_proba(products), uninterrupted.predict_proba(products), atol=1e-5)


def test_bad_pictures_follow_the_shared_policy(fashion, tmp_path):
    train, _ = fashion
    small = train.groupby("category_id").head(8)
    pictures = [[ref] for ref in small["images"].map(lambda refs: refs[0])]
    pictures[3] = [b"not a jpeg"]
    pictures[5] = [pictures[5][0], b"\xff\xd8 truncated"]
    y = small["category_id"].to_numpy()
    with pytest.raises(ImageDecodeError, match="not"):
        FineTuneClassifier(**TINY, max_iter=1, early_stopping=False).fit(pictures, y)
    for policy in ("skip", "blank"):
        model = FineTuneClassifier(**TINY, max_iter=1, early_stopping=False, on_error=policy).fit(pictures, y)
        proba = model.predict_proba(pictures)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    skipping = FineTuneClassifier(**TINY, max_iter=1, early_stopping=False, on_error="skip").fit(pictures, y)
    prior = np.bincount(np.searchsorted(skipping.classes_, y), minlength=4) / len(y)
    np.testing.assert_allclose(skipping.predict_proba([[b"junk"]])[0], prior)


def test_class_weight_dict_weighs_the_loss(fashion):
    train, test = fashion
    small = train.groupby("category_id").head(10)
    only = FASHION_LEAVES[2]
    weights = {leaf: 0.0 for leaf in FASHION_LEAVES if leaf != only}  # only one class counts in the loss
    model = FineTuneClassifier(**TINY, max_iter=3, learning_rate=1e-2, early_stopping=False, class_weight=weights)
    model.fit(small, small["category_id"].to_numpy())
    assert (model.predict(test) == only).all()


def test_checkpoints_with_unreadable_pictures_under_skip(fashion, tmp_path):
    train, _ = fashion
    small = train.groupby("category_id").head(6)
    pictures = [[ref] for ref in small["images"].map(lambda refs: refs[0])]
    pictures[0] = [pictures[0][0], str(tmp_path / "missing.jpg")]
    y = small["category_id"].to_numpy()
    model = FineTuneClassifier(**TINY, max_iter=1, early_stopping=False, on_error="skip", checkpoint_dir=tmp_path / "c")
    model.fit(pictures, y)
    assert len(list((tmp_path / "c").glob("finetune-*.pt"))) == 1


def test_clear_errors_for_wrong_input(fashion, fashion_tree):
    train, _ = fashion
    small = train.iloc[:12]
    with pytest.raises(ValueError, match="not leaves of the tree"):
        FineTuneClassifier(**TINY, tree=fashion_tree).fit(small, np.arange(12))
    with pytest.raises(ValueError, match="has 12 products but y has 3"):
        FineTuneClassifier(**TINY).fit(small, [1, 2, 3])
    with pytest.raises(ValueError, match="too few"):
        FineTuneClassifier(**TINY).fit(small.iloc[:2], [1, 2])
    with pytest.raises(ValueError, match="trainable"):
        FineTuneClassifier(**TINY, trainable="backbone").fit(small, small["category_id"])


def test_class_weight_balanced_and_open_clip(shopee_sample):
    frame = pd.read_csv(shopee_sample / "train.csv", dtype=str).iloc[:12]
    paths = [str(shopee_sample / "images" / c / f) for f, c in zip(frame["filename"], frame["category"])]
    model = FineTuneClassifier(
        "open_clip:ViT-S-32", pretrained=False, image_size=64, max_iter=1, batch_size=6, early_stopping=False,
        class_weight="balanced",
    )
    model.fit(paths, frame["category"])
    assert model.predict(paths[:2]).dtype == object  # "00"-style labels stay strings
    assert model.transform(paths[:2]).shape == (2, model.n_features_out_)


class _FineTunerUnderChecks(FineTuneClassifier):
    """Declares 2-D input so that scikit-learn runs its full battery instead of silently skipping it."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.string = False
        return tags


_NUMERIC_INPUT = (
    "feeds numeric feature arrays (X is checked before anything else); FineTuneClassifier takes picture "
    "references, and the same behaviours are tested on real pictures above"
)
_EXPECTED_FAILED = {
    name: _NUMERIC_INPUT
    for name in [
        "check_class_weight_classifiers", "check_classifier_data_not_an_array", "check_classifiers_classes",
        "check_classifiers_train", "check_dict_unchanged", "check_dont_overwrite_parameters", "check_dtype_object",
        "check_estimator_sparse_array", "check_estimator_sparse_matrix", "check_estimator_sparse_tag",
        "check_estimators_dtypes", "check_estimators_empty_data_messages", "check_estimators_fit_returns_self",
        "check_estimators_nan_inf", "check_estimators_overwrite_params", "check_estimators_pickle",
        "check_f_contiguous_array_estimator", "check_fit1d", "check_fit2d_1feature", "check_fit2d_predict1d",
        "check_fit_check_is_fitted", "check_fit_idempotent", "check_fit_score_takes_y",
        "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_n_features_in",
        "check_n_features_in_after_fitting", "check_non_transformer_estimators_n_iter", "check_pipeline_consistency",
        "check_positive_only_tag_during_fit", "check_transformer_n_iter",
        "check_readonly_memmap_input", "check_supervised_y_2d", "check_transformer_data_not_an_array",
        "check_transformer_general", "check_transformer_preserve_dtypes",
    ]
}


@parametrize_with_checks(
    [_FineTunerUnderChecks("timm:test_resnet", pretrained=False, image_size=32, max_iter=1)],
    expected_failed_checks=lambda estimator: _EXPECTED_FAILED,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_the_device_is_decided_at_the_call(fitted, fashion):
    from skproduct.exceptions import DeviceUnavailableError

    _, test = fashion
    expected = fitted.predict_proba(test.iloc[:8])
    moved = clone(fitted).set_params(device="cpu")
    moved.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_") or k.startswith("_")})
    np.testing.assert_allclose(moved.predict_proba(test.iloc[:8]), expected, rtol=1e-6, atol=1e-9)  # no refit
    with pytest.raises(DeviceUnavailableError, match="cuda:5"):
        moved.set_params(device="cuda:5").predict(test.iloc[:2])


def test_max_pooling_of_a_products_pictures(cdiscount):
    products, _ = cdiscount
    products = products.head(24)
    y = products["category_id"].to_numpy() % 2
    several = np.flatnonzero(products["n_images"].to_numpy() > 1)
    model = FineTuneClassifier(**TINY, max_iter=1, augment=False, early_stopping=False).fit(products, y)
    mean = model.predict_proba(products)
    top = model.set_params(pooling="max").predict_proba(products)
    np.testing.assert_allclose(top.sum(axis=1), 1.0)  # renormalised
    single = np.setdiff1d(np.arange(len(products)), several)
    np.testing.assert_allclose(top[single], mean[single], rtol=1e-6)  # one picture: nothing to pool
    assert len(several) and not np.allclose(top[several], mean[several])
    embeddings = model.transform(products)
    assert (model.set_params(pooling="mean").transform(products)[several] <= embeddings[several] + 1e-6).all()


def test_a_lambda_augment_cannot_name_a_checkpoint(fashion, tmp_path):
    train, _ = fashion
    model = FineTuneClassifier(**TINY, max_iter=1, augment=lambda image: image, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"augment=.*<lambda> has no stable identity.*checkpoint_dir=None"):
        small = train.groupby("category_id").head(2)
        model.fit(small, small["category_id"].to_numpy())
    assert not list(tmp_path.iterdir())


def test_learning_rate_auto_depends_on_the_starting_weights_and_the_batch(fashion, tmp_path):
    """From random weights "auto" trains at 1e-2, from a weights file at 1e-3, both scaled by sqrt(batch / 32)."""
    import torch

    from skproduct.backbones import build_backbone, parse_backbone

    train, _ = fashion
    small = train.groupby("category_id").head(4)
    y = small["category_id"].to_numpy()
    options = {**TINY, "max_iter": 1, "early_stopping": False, "warmup_fraction": 0.0, "batch_size": 8}
    scratch = FineTuneClassifier(**options).fit(small, y)
    assert scratch.learning_rate_ == pytest.approx(1e-2 * 0.5)
    assert scratch.history_[0]["lr"] == pytest.approx(scratch.learning_rate_)  # what the optimiser really used
    weights = tmp_path / "start.pt"
    torch.save(build_backbone(parse_backbone(TINY["backbone"]), pretrained=False, weights=None, image_size=32,
                              seed=0).state_dict(), weights)
    pretrained = FineTuneClassifier(**{**options, "weights": weights}).fit(small, y)
    assert pretrained.learning_rate_ == pytest.approx(1e-3 * 0.5)
    assert pretrained.history_[0]["lr"] == pytest.approx(pretrained.learning_rate_)
    fixed = FineTuneClassifier(**{**options, "learning_rate": 1e-3}).fit(small, y)
    assert fixed.learning_rate_ == fixed.history_[0]["lr"] == pytest.approx(1e-3)
