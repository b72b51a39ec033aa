"""load_image for every kind of reference, and the shared bad-image policy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from skproduct.exceptions import ImageDecodeError
from skproduct.images import BadImagePolicy, load_image
from skproduct.io import BsonImageRef


def _jpeg(size=(12, 8), colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_every_kind_of_reference_gives_the_same_picture(tmp_path):
    data = _jpeg()
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    bson_file = tmp_path / "x.bson"
    bson_file.write_bytes(b"junk" + data + b"junk")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    references = [
        str(path), path, data, bytearray(data), memoryview(data), Image.open(io.BytesIO(data)), expected,
        BsonImageRef(str(bson_file), 4, len(data), 1, 0),
    ]
    for reference in references:
        image = load_image(reference)
        assert image.mode == "RGB" and image.size == (12, 8)
        assert np.array_equal(np.asarray(image), expected), type(reference)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_uint8_arrays(shape):
    image = load_image(np.full(shape, 255, dtype=np.uint8))
    assert image.mode == "RGB" and image.size == (7, 5)
    assert np.asarray(image).min() == 255


def test_transparent_pictures_lie_on_white():
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert np.asarray(load_image(buffer.getvalue()))[0, 0].tolist() == [255, 255, 255]


def test_errors_name_the_picture(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"image bytes \(9 bytes\) is not a decodable image"):
        load_image(b"not jpeg!")
    with pytest.raises(ImageDecodeError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    truncated = tmp_path / "x.bson"
    truncated.write_bytes(_jpeg()[:40])
    with pytest.raises(ImageDecodeError, match=r"image 2 of product 2301 \(file .*x.bson, offset 0\)"):
        load_image(BsonImageRef(str(truncated), 0, 40, 2301, 2))
    with pytest.raises(ImageDecodeError, match="shorter than its index says"):
        load_image(BsonImageRef(str(truncated), 0, 400, 2301, 2))
    with pytest.raises(ImageDecodeError, match="astype"):
        load_image(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ImageDecodeError, match="H x W"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="pass a file path, encoded bytes"):
        load_image(42)


def test_policy_raise_skip_blank():
    bad, good = b"broken", _jpeg()
    with pytest.raises(ImageDecodeError):
        BadImagePolicy("raise").load(bad)

    skip = BadImagePolicy("skip")
    assert skip.load(bad) is None and skip.load(good).size == (12, 8)
    assert skip.n_failed == 1

    blank = BadImagePolicy("blank", blank_size=(6, 5))
    image = blank.load(bad)
    assert image.size == (6, 5) and np.asarray(image).max() == 0 and blank.n_failed == 1

    with pytest.raises(ValueError, match="on_error must be one of"):
        BadImagePolicy("ignore")


def test_cache_keys_of_palette_pictures_include_the_palette():
    from skproduct.images import picture_content

    first = Image.new("P", (4, 4), 1)
    first.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    second = first.copy()
    second.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert picture_content(first) != picture_content(second)


def test_decompression_bombs_go_through_the_policy(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ImageDecodeError, match="is not a decodable image"):
        load_image(_jpeg((40, 40)))
    assert BadImagePolicy("skip").load(_jpeg((40, 40))) is None


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["skip", "blank"]))
def test_random_bytes_never_escape_the_policy(data, on_error):
    policy = BadImagePolicy(on_error, blank_size=(4, 4))
    image = policy.load(data)
    if image is None:
        assert on_error == "skip" and policy.n_failed == 1
    else:
        assert image.mode == "RGB"


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400))
def test_cut_jpegs_raise_decode_errors(cut):
    data = _jpeg((40, 40))
    try:
        image = load_image(data[: min(cut, len(data) - 1)])
    except ImageDecodeError:
        return
    assert image.size == (40, 40)  # Pillow may fill a cut tail; it never crashes otherwise
