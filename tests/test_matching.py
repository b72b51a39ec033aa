"""Product matching: ProductMatcher, the matching F1, duplicates and ``skproduct match``.

Quality tests run on realistic groups built from real fashion-small photos
(``benchmarks/_match_groups.py``: re-uploads with crops, rescaling, padding,
colour shifts, text and re-compression, among distinct products of the same
article types) embedded with the real ImageNet weights of ``tf_efficientnet_lite0``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from skproduct import ImageEmbedder, ProductMatcher
from skproduct.exceptions import EmptyProductWarning
from skproduct.matching import (
    connected_groups,
    content_keys,
    duplicate_labels,
    find_duplicates,
    l2_normalize,
    nearest_neighbors,
)
from skproduct.metrics import groups_to_matches, matching_f1_samples, matching_f1_score

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 112  # pixels: fashion-small's photos are 60x80


def _benchmark_module(name: str):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _synthetic(n_groups=60, sizes=(1, 2, 3), noise=0.25, d=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_groups), rng.choice(sizes, size=n_groups))
    centres = rng.normal(size=(n_groups, d))
    return centres[labels] + noise * rng.normal(size=(len(labels), d)), labels


# -- the real thing: generated groups from real photos, real weights ------------------------------------------------
@pytest.fixture(scope="module")
def products(fashion_bson, tmp_path_factory):
    from skproduct import read_bson

    return read_bson(fashion_bson, index_path=tmp_path_factory.mktemp("fashion") / "f.skpidx")


@pytest.fixture(scope="module")
def groups(products):
    return _benchmark_module("_match_groups").make_groups(products, 100, 100, seed=0)


@pytest.fixture(scope="module")
def embedding_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def vectors(groups, real_weights, embedding_cache):
    embedder = ImageEmbedder("timm:tf_efficientnet_lite0", weights=real_weights, image_size=SIZE, batch_size=64,
                             cache=embedding_cache)
    return embedder.fit_transform(groups.frame)


def _held_out(X, y, make):
    """Mean F1 over the two halves of a GroupKFold, each scored by a matcher fitted on the other half."""
    return float(np.mean([make().fit(X[train], y[train]).score(X[test], y[test])
                          for train, test in GroupKFold(2).split(X, y, y)]))


def test_matching_f1_is_well_above_the_phash_baseline(groups, vectors):
    hashes = _benchmark_module("_match_groups")
    y = groups.y
    alone = matching_f1_score(y, [[i] for i in range(len(y))])  # every posting on its own
    exact = matching_f1_score(y, hashes.exact_hash_matches(groups.pictures))
    codes = hashes.phash_codes(groups.pictures)
    phash = matching_f1_score(y, hashes.phash_matches(codes, 0))
    _, phash_tuned = hashes.tuned_phash(codes, y)  # its best Hamming distance, chosen on the scored postings
    cosine = _held_out(vectors, y, ProductMatcher)  # tuned on other groups than it is scored on
    ours = _held_out(vectors, y, lambda: ProductMatcher(local_scaling=10))
    assert exact >= alone  # exact re-uploads are found, nothing else
    assert cosine > phash_tuned + 0.03, (cosine, phash_tuned, phash, exact, alone)
    assert ours > phash_tuned + 0.06, (ours, phash_tuned, phash, exact, alone)
    assert ours - alone > 2 * (phash_tuned - alone), (ours, phash_tuned, alone)  # twice phash's gain at least


def test_threshold_tuning_improves_held_out_f1(groups, vectors):
    y = groups.y
    tuned = _held_out(vectors, y, ProductMatcher)
    for fixed in (0.6, 0.9):  # a threshold picked without the groups: too loose, too strict
        untuned = _held_out(vectors, y, lambda: ProductMatcher(threshold=fixed, tune="off"))
        assert tuned > untuned + 0.01, (tuned, fixed, untuned)


def test_synthetic_tuning_finds_the_threshold_that_generalises():
    X, y = _synthetic(n_groups=120, noise=0.6, seed=1)
    train, test = next(GroupKFold(2).split(X, y, y))
    matcher = ProductMatcher(threshold=0.99, tune="threshold").fit(X[train], y[train])
    assert matcher.threshold_ < 0.99 and matcher.best_score_ == pytest.approx(matcher.tuning_["f1"].max())
    untuned = ProductMatcher(threshold=0.99, tune="off").fit(X[train]).score(X[test], y[test])
    assert matcher.score(X[test], y[test]) > untuned + 0.05


def test_exact_and_faiss_backends_give_the_same_matches(vectors):
    pytest.importorskip("faiss")
    X = vectors[:120]
    exact = ProductMatcher(10, threshold=0.7, tune="off", query_expansion=2).fit(X)
    fast = ProductMatcher(10, threshold=0.7, tune="off", query_expansion=2, backend="faiss").fit(X)
    m1, s1 = exact.matches(X, return_similarity=True)
    m2, s2 = fast.matches(X, return_similarity=True)
    assert [m.tolist() for m in m1] == [m.tolist() for m in m2]
    assert all(np.array_equal(a, b) for a, b in zip(s1, s2, strict=True))
    assert [m.tolist() for m in exact.match_catalogue(vectors[120:])] == \
        [m.tolist() for m in fast.match_catalogue(vectors[120:])]
    unit, _ = l2_normalize(X)
    for backend in ("exact", "faiss"):  # the raw search, too: same rows, bit-identical similarities
        sims, rows = nearest_neighbors(unit, unit, 7, backend=backend, exclude_self=True)
        if backend == "exact":
            reference = sims, rows
    assert np.array_equal(reference[1], rows) and np.array_equal(reference[0], sims)


def test_exact_search_holds_bounded_memory_and_agrees_with_a_full_sort():
    rng = np.random.default_rng(0)
    unit, _ = l2_normalize(rng.normal(size=(300, 8)))
    sims, rows = nearest_neighbors(unit, unit, 5, chunk_bytes=4 * 300 * 7)  # chunks of 7 queries
    full = unit @ unit.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert np.array_equal(rows, expected)
    assert np.allclose(sims, np.take_along_axis(full, expected, axis=1), atol=1e-6)



@pytest.mark.parametrize("tile_rows", [7, 64, 10_000])
def test_exact_search_in_tiles_of_the_base_agrees_with_a_full_sort(monkeypatch, tile_rows):
    """The base is scored tile by tile, keeping each query's best so far: ties (coarse vectors) included."""
    from skproduct.matching import _search

    monkeypatch.setattr(_search, "TILE_ROWS", tile_rows)
    rng = np.random.default_rng(1)
    unit, _ = l2_normalize(np.round(rng.normal(size=(500, 6))))  # rounded: many equal similarities
    sims, rows = nearest_neighbors(unit[:120], unit, 9, chunk_bytes=4 * 64 * 13)
    full = unit[:120] @ unit.T
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :9], atol=1e-6)
    tied = np.isclose(full[np.arange(120)[:, None], rows], sims, atol=1e-6)
    assert tied.all()  # every row found has the similarity of its rank (among ties, the lower rows come first)
    for q in range(120):
        cut = sims[q, -1]
        above = np.flatnonzero(full[q] > cut + 1e-6)
        assert set(above) <= set(rows[q])  # nothing strictly better was missed


def test_fit_searches_nothing_and_match_catalogue_scales_by_brute_force_csls(monkeypatch):
    """``fit`` without tuning searches nothing (``matches`` scales X within itself); ``match_catalogue``
    computes the catalogue's CSLS radii once, and its scores are ``2 cos - r(query) - r(product)`` over the
    nearest candidates by cosine."""
    from skproduct.matching import _matcher

    calls = []
    real = _matcher.nearest_neighbors
    monkeypatch.setattr(_matcher, "nearest_neighbors", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(3)
    catalogue, queries = rng.normal(size=(60, 5)), rng.normal(size=(7, 5))
    matcher = ProductMatcher(4, threshold=-1.0, tune="off", local_scaling=3).fit(catalogue)
    assert calls == []
    matcher.matches(catalogue)
    assert len(calls) == 1
    found, scores = matcher.match_catalogue(queries, return_similarity=True)
    matcher.match_catalogue(queries)
    assert len(calls) == 1 + 2 + 1  # the radii once, then one search per call
    unit_c, _ = l2_normalize(catalogue)
    unit_q, _ = l2_normalize(queries)
    within = unit_c @ unit_c.T
    np.fill_diagonal(within, -np.inf)
    r_catalogue = np.sort(within, axis=1)[:, ::-1][:, :3].mean(axis=1)
    across = unit_q @ unit_c.T
    r_query = np.sort(across, axis=1)[:, ::-1][:, :3].mean(axis=1)
    csls = 2 * across - r_query[:, None] - r_catalogue[None, :]
    for q in range(len(queries)):  # CSLS re-ranks the 4 nearest by cosine (the candidates of the search)
        candidates = np.argsort(-across[q], kind="stable")[:4]
        best = candidates[np.argsort(-csls[q, candidates], kind="stable")]
        assert found[q].tolist() == best.tolist()
        np.testing.assert_allclose(scores[q], csls[q, best], atol=1e-5)

def test_a_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    X, _ = _synthetic(n_groups=5)
    with pytest.raises(ImportError, match=r"faiss-cpu.*pip install|pip install.*faiss-cpu"):
        ProductMatcher(backend="faiss", tune="off").fit(X).matches(X)
    assert len(ProductMatcher(backend="auto", tune="off").fit(X).matches(X)) == len(X)  # auto: exact instead


def test_pipeline_from_pictures_to_group_ids(groups):
    """ImageEmbedder then ProductMatcher in one Pipeline: fit on groups, predict group ids, score the F1."""
    frame = groups.frame.iloc[:30]
    model = make_pipeline(ImageEmbedder("timm:test_resnet", pretrained=False, image_size=32),
                          ProductMatcher(tune="threshold"))
    model.fit(frame, frame["label_group"])
    ids = model.predict(frame)
    assert ids.shape == (30,) and ids.min() == 0
    assert 0 < model.score(frame, frame["label_group"]) <= 1


# -- model selection --------------------------------------------------------------------------------------------------
def test_grid_search_with_group_kfold():
    X, y = _synthetic(n_groups=90, noise=0.5, seed=2)
    search = GridSearchCV(ProductMatcher(tune="threshold"), {"n_neighbors": [1, 10], "query_expansion": [0, 2]},
                          cv=GroupKFold(3))
    search.fit(X, y, groups=y)
    assert search.best_params_["n_neighbors"] == 10  # groups of 3 need two matches
    assert search.best_score_ > 0.9
    scores = cross_val_score(ProductMatcher(), X, y, groups=y, cv=GroupKFold(3))
    assert scores.min() > 0.9


@parametrize_with_checks([ProductMatcher(), ProductMatcher(5, query_expansion=2, tune="threshold")])
def test_sklearn_compatible(estimator, check):
    check(estimator)


# -- bad input --------------------------------------------------------------------------------------------------------
def test_a_single_product_matches_itself():
    matcher = ProductMatcher().fit(np.ones((1, 4)), [3])
    assert [m.tolist() for m in matcher.matches(np.ones((1, 4)))] == [[0]]
    assert matcher.predict(np.ones((1, 4))).tolist() == [0]
    assert matcher.score(np.ones((1, 4)), [3]) == 1.0
    assert matcher.best_score_ is None and matcher.threshold_ == 0.8  # nothing to tune on one product


def test_identical_vectors_are_one_product():
    X = np.tile([[0.3, 0.1, 0.9]], (6, 1))
    matcher = ProductMatcher(tune="off").fit(X)
    assert matcher.predict(X).tolist() == [0] * 6
    assert all(sorted(m.tolist()) == list(range(6)) and m[0] == i for i, m in enumerate(matcher.matches(X)))
    tuned = ProductMatcher().fit(X, [0, 0, 0, 1, 1, 1])  # no threshold can tell them apart: a result, not a crash
    assert 0 < tuned.best_score_ < 1


def test_zero_vectors_match_nothing_with_a_warning():
    X, y = _synthetic(n_groups=10, sizes=(2,))
    X[[0, 5]] = 0  # products without a usable picture (the embedder's zero vector)
    with pytest.warns(EmptyProductWarning, match="2 of .* zero vector .*such as product 0"):
        matcher = ProductMatcher().fit(X, y)
    with pytest.warns(EmptyProductWarning):
        matches = matcher.matches(X)
    assert matches[0].tolist() == [0] and matches[5].tolist() == [5]
    assert not any(i in m[1:] for m in matches for i in (0, 5))


@pytest.mark.parametrize("X, message", [
    (np.array([[1.0, np.nan]]), "NaN"),
    (np.zeros((0, 3)), "0 sample"),
    (np.ones(3), "2D array"),
])
def test_bad_vectors_are_clear_errors(X, message):
    with pytest.raises(ValueError, match=message):
        ProductMatcher().fit(X)


def test_other_bad_input():
    X, y = _synthetic(n_groups=5)
    matcher = ProductMatcher().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        matcher.matches(X[:, :3])
    with pytest.raises(ValueError, match="match lists for 3 postings"):
        matching_f1_score(y, [[0], [1], [2]])
    with pytest.raises(ValueError, match="thresholds"):
        ProductMatcher(thresholds=[]).fit(X, y)


# -- outputs and metrics ----------------------------------------------------------------------------------------------
def test_matching_f1_against_a_brute_force_count():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, size=40)
    matches = [np.unique(np.concatenate([[i], rng.integers(0, 40, size=rng.integers(0, 5))])) for i in range(40)]
    expected = []
    for i, m in enumerate(matches):
        true, pred = set(np.flatnonzero(y == y[i])), set(m.tolist())
        expected.append(2 * len(true & pred) / (len(true) + len(pred)))
    assert np.allclose(matching_f1_samples(y, matches), expected)
    assert matching_f1_score(y, matches) == pytest.approx(np.mean(expected))
    groups = rng.integers(0, 9, size=40)  # group ids score as the match lists they stand for
    assert matching_f1_score(y, groups) == pytest.approx(matching_f1_score(y, groups_to_matches(groups)))
    assert matching_f1_score(y, y) == 1.0
    with pytest.raises(ValueError, match="outside 0..39"):
        matching_f1_score(y, [[40]] + matches[1:])


def test_group_ids_are_connected_components():
    assert connected_groups([[0, 3], [1], [2, 1], [3], [4]]).tolist() == [0, 1, 1, 0, 2]
    X, y = _synthetic(n_groups=30, sizes=(2, 3), noise=0.05)  # no singletons: at_least_one would pair them
    matcher = ProductMatcher().fit(X, y)
    ids = matcher.predict(X)
    assert pd.crosstab(ids, y).astype(bool).sum(axis=1).max() == 1  # no predicted group mixes two true groups
    assert len(np.unique(ids)) == len(np.unique(y))


# -- duplicates -------------------------------------------------------------------------------------------------------
def test_duplicates_exact_and_near_with_the_label_lookup(groups, vectors, products, real_weights, embedding_cache):
    """The catalogue holds each group's original photo; the postings are looked up in it."""
    frame = groups.frame
    matched = frame[frame["label_group"] < 100].drop_duplicates("label_group")
    where = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    catalogue = [[products["images"].iloc[r][0].read_bytes()] for r in where.loc[matched["source_id"]].to_numpy()]
    embedder = ImageEmbedder("timm:tf_efficientnet_lite0", weights=real_weights, image_size=SIZE,
                             cache=embedding_cache).fit()
    duplicates = find_duplicates(content_keys(frame), content_keys(catalogue), vectors, embedder.transform(catalogue),
                                 threshold=0.8)
    exact = duplicates[duplicates["kind"] == "exact"]
    reuploads = np.flatnonzero((frame["edits"] == "original").to_numpy() & (frame["label_group"] < 100).to_numpy())
    assert sorted(exact["query"].unique().tolist()) == reuploads.tolist() and len(reuploads) > 5
    assert np.allclose(exact["similarity"], 1, atol=1e-4)
    assert (duplicates.loc[duplicates["kind"] == "near", "similarity"] >= 0.8).all()
    labels, found = duplicate_labels(duplicates, matched["label_group"].to_numpy(), len(frame), fill=-1)
    truth = frame["label_group"].to_numpy()
    assert found.sum() > 1.5 * len(reuploads)  # near duplicates add to the exact ones
    assert np.mean(labels[found] == truth[found]) > 0.8  # and a duplicate's label is mostly right
    assert (labels[~found] == -1).all()


def test_content_keys_are_the_same_for_a_picture_wherever_it_is(fashion_bson, tmp_path):
    from skproduct import read_bson

    products = read_bson(fashion_bson, index_path=tmp_path / "f.skpidx").iloc[:3]
    raw = [images[0].read_bytes() for images in products["images"]]
    (tmp_path / "a.jpg").write_bytes(raw[1])
    from_bson = content_keys(products)
    assert [k.tolist() for k in from_bson] == [k.tolist() for k in content_keys(raw)]
    assert content_keys([str(tmp_path / "a.jpg")])[0].tolist() == from_bson[1].tolist()
    with pytest.raises(ValueError, match="both query_vectors and catalogue_vectors"):
        find_duplicates(query_vectors=np.ones((1, 2)))


# -- the command line -------------------------------------------------------------------------------------------------
def _write_postings(frame, folder: Path, name: str, label: str, column: str) -> Path:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    names = []
    for posting, pictures in zip(frame["posting_id"], frame["images"], strict=True):
        (images / f"{posting}.jpg").write_bytes(pictures[0])
        names.append(f"{posting}.jpg")
    path = folder / name
    pd.DataFrame({"filename": names, column: frame[label].to_numpy()}).to_csv(path, index=False)
    return path


def test_cli_match_end_to_end(groups, vectors, products, real_weights, embedding_cache, tmp_path, capsys):
    from skproduct.cli import main

    frame = groups.frame
    csv = _write_postings(frame, tmp_path, "postings.csv", "label_group", "label_group")
    out = tmp_path / "matches.csv"
    backbone = ["--backbone", "timm:tf_efficientnet_lite0", "--weights", str(real_weights), "--image-size",
                str(SIZE), "--cache", str(embedding_cache), "-q"]  # the cache the fixtures filled: nothing embedded
    code = main(["match", str(csv), "--images", str(tmp_path / "images"), *backbone, "--out", str(out),
                 "--groups", "label_group", "--tune"])
    printed, errors = capsys.readouterr()
    assert code == 0, errors
    written = pd.read_csv(out, dtype=str)
    assert list(written.columns) == ["posting_id", "matches"] and len(written) == len(frame)
    ids = written["posting_id"].tolist()
    lists = [m.split(" ") for m in written["matches"]]
    assert all(m[0] == posting for posting, m in zip(ids, lists, strict=True))  # each posting first, Kaggle-style
    where = {posting: i for i, posting in enumerate(ids)}
    f1 = matching_f1_score(frame["label_group"].to_numpy(), [[where[p] for p in m] for m in lists])
    assert f"F1 against --groups label_group (Kaggle's mean per-product F1): {f1:.4f}" in printed
    assert f1 == pytest.approx(ProductMatcher().fit(vectors, groups.y).score(vectors, groups.y), abs=1e-4)

    # --against: the catalogue holds each group's original photo, labelled with its group; every posting is looked up
    matched = frame[frame["label_group"] < 100].drop_duplicates("label_group")
    where = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    originals = pd.DataFrame({
        "posting_id": "original_" + matched["posting_id"],
        "images": [[products["images"].iloc[r][0].read_bytes()] for r in where.loc[matched["source_id"]].to_numpy()],
        "label_group": matched["label_group"].to_numpy(),
    })
    (tmp_path / "cat").mkdir()
    catalogue = _write_postings(originals, tmp_path / "cat", "catalogue.csv", "label_group", "category")
    out = tmp_path / "duplicates.csv"
    code = main(["match", str(csv), "--images", str(tmp_path / "images"), *backbone, "--out", str(out),
                 "--against", str(catalogue), "--near-threshold", "0.8"])  # its images: beside it, by default
    printed, errors = capsys.readouterr()
    assert code == 0, errors
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["posting_id", "matches", "kind", "similarity", "category"]
    assert len(written) == len(frame)
    reuploads = set((frame["posting_id"] + ".jpg")[(frame["edits"] == "original") & (frame["label_group"] < 100)])
    exact = written[written["kind"] == "exact"]
    assert set(exact["posting_id"]) == reuploads and f"{len(exact)} exact duplicates" in printed
    truth = dict(zip((frame["posting_id"] + ".jpg").tolist(), frame["label_group"].astype(str).tolist(), strict=True))
    assert all(truth[posting] == label for posting, label in zip(exact["posting_id"], exact["category"], strict=True))
    flagged = written[written["kind"] != ""]
    assert np.mean([truth[p] == c for p, c in zip(flagged["posting_id"], flagged["category"], strict=True)]) > 0.8


def test_cli_match_mistakes_are_one_line(tmp_path, capsys):
    from skproduct.cli import main

    (tmp_path / "images").mkdir()
    csv = tmp_path / "p.csv"
    pd.DataFrame({"filename": []}).to_csv(csv, index=False)
    assert main(["match", str(csv), "--out", str(tmp_path / "m.csv"), "--tune"]) == 2
    assert "--tune needs group labels" in capsys.readouterr().err
    assert main(["match", str(csv), "--out", str(tmp_path / "m.csv"), "--threshold", "2"]) == 2
    assert "cosine similarity between -1 and 1" in capsys.readouterr().err


def test_warnings_do_not_leak_from_fit_on_clean_vectors():
    X, y = _synthetic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProductMatcher(query_expansion=3).fit(X, y).predict(X)
