"""read_table: Shopee's layout, flat folders, labels as written, all missing images reported at once."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from skproduct.exceptions import MissingImagesError
from skproduct.images import load_image
from skproduct.io import read_table


def test_shopee_sample_by_category_folders(shopee_sample):
    table = read_table(shopee_sample / "train.csv", shopee_sample / "images")
    assert len(table) == 126
    assert table["category"].nunique() == 42
    assert sorted(table["category"].unique()) == [f"{k:02d}" for k in range(42)]
    assert table["category"].map(type).eq(str).all()
    for _, row in table.iterrows():
        assert row["image"] == str(shopee_sample / "images" / row["category"] / row["filename"])
    assert load_image(table["image"].iloc[0]).mode == "RGB"


def test_flat_layout_and_unlabelled_table(shopee_sample, tmp_path):
    source = read_table(shopee_sample / "train.csv", shopee_sample / "images").head(6)
    flat = tmp_path / "test"
    flat.mkdir()
    for path in source["image"]:
        shutil.copy(path, flat)
    source[["filename"]].to_csv(tmp_path / "test.csv", index=False)
    table = read_table(tmp_path / "test.csv", flat)
    assert list(table.columns) == ["filename", "image"]
    assert table["image"].tolist() == [str(flat / name) for name in source["filename"]]
    source[["filename", "category"]].to_csv(tmp_path / "labelled.csv", index=False)
    assert read_table(tmp_path / "labelled.csv", flat, layout="flat")["category"].tolist() == source["category"].tolist()


def _table(tmp_path, rows: list[tuple[str, str]], present: set[str]):
    root = tmp_path / "images"
    for name, label in rows:
        if name in present:
            (root / label).mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.new("RGB", (4, 4)).save(root / label / name)
    (root).mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=["filename", "category"]).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path / "train.csv", root


def test_all_missing_images_are_reported_at_once(tmp_path):
    rows = [(f"{k}.jpg", "03") for k in range(10)]
    csv, root = _table(tmp_path, rows, present={"0.jpg", "1.jpg", "2.jpg"})
    with pytest.raises(MissingImagesError) as info:
        read_table(csv, root)
    message = str(info.value)
    assert message.startswith(f"7 of 10 images listed in {csv} are missing or unreadable")
    assert "row 3 '3.jpg' is missing" in message and "and 2 more" in message and "on_missing='drop'" in message
    assert [row for row, *_ in info.value.problems] == [3, 4, 5, 6, 7, 8, 9]


def test_drop_missing_images_with_a_warning(tmp_path):
    csv, root = _table(tmp_path, [("a.jpg", "01"), ("b.jpg", "01"), ("c.jpg", "02")], present={"a.jpg", "c.jpg"})
    with pytest.warns(UserWarning, match="1 of 3 images"):
        table = read_table(csv, root, on_missing="drop")
    assert table["filename"].tolist() == ["a.jpg", "c.jpg"]
    assert table["category"].tolist() == ["01", "02"]


def test_decode_check_finds_unreadable_images(tmp_path):
    csv, root = _table(tmp_path, [("a.jpg", "00"), ("b.jpg", "00")], present={"a.jpg", "b.jpg"})
    (root / "00" / "b.jpg").write_bytes(b"this is not a jpeg")
    assert len(read_table(csv, root)) == 2  # exists-only check passes
    with pytest.raises(MissingImagesError, match="'b.jpg' is not a readable image"):
        read_table(csv, root, check="decode")
    (root / "00" / "a.jpg").write_bytes(b"")
    with pytest.raises(MissingImagesError, match="'a.jpg' is empty"):
        read_table(csv, root)


def test_bad_arguments(tmp_path):
    csv, root = _table(tmp_path, [("a.jpg", "00")], present={"a.jpg"})
    with pytest.raises(FileNotFoundError, match="image folder"):
        read_table(csv, tmp_path / "nowhere")
    with pytest.raises(KeyError, match="pass filename_column="):
        read_table(csv, root, filename_column="file")
    with pytest.raises(ValueError, match="layout must be one of"):
        read_table(csv, root, layout="nested")
    with pytest.raises(KeyError, match="no label column 'label'"):
        read_table(csv, root, label_column="label")
    with pytest.raises(ValueError, match="needs the label column"):
        read_table(csv, root, label_column=None, layout="by_label")
    assert os.path.isfile(read_table(csv, root, layout="by_label")["image"][0])
