"""Preprocessing: timm's own eval transform for each crop mode, JPEG draft decoding, open_clip's, fingerprints.

No weights are downloaded: timm's data configurations come from its registry of
pretrained configurations, and the network of the draft test has random weights.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import REPO_ROOT
from PIL import Image, ImageDraw
from timm.data import create_transform, resolve_data_config

from skproduct.backbones import (
    Preprocessing,
    fingerprint,
    parse_backbone,
    resolve_preprocessing,
    timm_preprocessing,
    weights_identity,
)
from skproduct.images import load_image

SIZES = [(300, 200), (180, 180), (97, 311), (40, 25)]  # (width, height): wide, square, tall, smaller than the input


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB picture: colour gradients, a few shapes, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + rng.uniform(0, 6))
                for _ in range(3)]
    array = (127.5 + 100 * np.stack(channels, axis=-1) + rng.normal(0, 4, (height, width, 3))).clip(0, 255)
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
        box = [x0, y0, x0 + rng.uniform(0.1, 0.3) * width, y0 + rng.uniform(0.1, 0.3) * height]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def timm_config(name: str) -> dict:
    return resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict(), use_test_size=False)


def assert_same_pixels(ours: torch.Tensor, theirs: torch.Tensor, std) -> None:
    assert ours.shape == theirs.shape
    difference = (ours - theirs).abs() * torch.tensor(std).view(3, 1, 1)  # back to [0, 1] pixel units
    assert difference.max().item() <= 1 / 255 + 1e-6


# (model name, image_size, the crop mode its configuration has)
REGISTERED = [
    ("test_resnet", None, "center"),                       # bilinear, crop_pct 0.95
    ("test_vit", None, "center"),
    ("test_resnet", 48, "center"),                         # image_size given: square, crop_pct kept
    ("convnext_tiny.in12k_ft_in1k_384", None, "squash"),
    ("convnext_tiny.in12k_ft_in1k_384", 64, "squash"),
    ("deepseek_vit_412m", None, "border"),
    ("deepseek_vit_412m", 64, "border"),
    ("vit_base_patch16_sapiens2", None, "squash"),         # non-square input (1024, 768)
]


@pytest.mark.parametrize("name, image_size, crop_mode", REGISTERED)
def test_registered_models_match_timm_create_transform(name, image_size, crop_mode):
    config = timm_config(name)
    pre = resolve_preprocessing(parse_backbone(f"timm:{name}"), image_size)
    assert pre.crop_mode == crop_mode == config["crop_mode"]
    if image_size:
        config["input_size"] = (3, image_size, image_size)
    assert pre.input_size == tuple(config["input_size"][1:])
    theirs, ours = create_transform(**config, is_training=False), pre.transform()
    for seed, (width, height) in enumerate(SIZES):
        image = picture(width, height, seed)
        assert_same_pixels(ours(image), theirs(image), pre.std)


BASE = {"input_size": (3, 48, 48), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.9, "crop_mode": "center"}
CONFIGS = [  # configurations no registered model has
    dict(BASE, input_size=(3, 48, 80)),                                  # centre crop, non-square
    dict(BASE, input_size=(3, 72, 40), crop_mode="border"),              # border, non-square, crop_pct < 1
    dict(BASE, input_size=(3, 56, 56), crop_mode="squash", crop_pct=0.875, interpolation="bilinear"),
    dict(BASE, crop_mode="border", crop_pct=1.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['crop_mode']}-{c['input_size'][1]}x{c['input_size'][2]}")
def test_configurations_match_timm_create_transform(config):
    pre = timm_preprocessing(config)
    theirs, ours = create_transform(**config, is_training=False), pre.transform()
    for seed, (width, height) in enumerate(SIZES):
        image = picture(width, height, seed)
        assert_same_pixels(ours(image), theirs(image), pre.std)


def test_draft_size_is_the_longer_side_of_the_resize_target():
    assert resolve_preprocessing(parse_backbone("timm:test_resnet")).draft_size == 168  # floor(160 / 0.95)
    assert timm_preprocessing(dict(BASE, input_size=(3, 48, 80))).draft_size == 88     # floor(80 / 0.9)
    assert timm_preprocessing(dict(BASE, input_size=(3, 72, 40))).draft_size == 80
    assert Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3, jpeg_draft=False).draft_size is None


def _jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    picture(width, height, seed).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


DRAFT_CASES = [  # (data configuration for the tiny network, image_size)
    (dict(timm_config("test_resnet")), None),
    (dict(timm_config("test_resnet")), 64),
    (dict(timm_config("test_resnet"), crop_mode="squash", crop_pct=1.0), 64),
    (dict(timm_config("test_resnet"), crop_mode="border", crop_pct=1.0), 64),
    (dict(timm_config("test_resnet"), input_size=(3, 48, 80)), None),
]


@pytest.mark.parametrize("config, image_size", DRAFT_CASES, ids=lambda v: str(v.get("crop_mode")) if isinstance(v, dict) else str(v))
def test_draft_decoding_keeps_the_features(config, image_size):
    """Our transform on a JPEG decoded at a reduced scale gives the features of timm's transform on the full decode."""
    pre = timm_preprocessing(config, image_size)
    if image_size:
        config = dict(config, input_size=(3, image_size, image_size))
    theirs = create_transform(**config, is_training=False)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    for seed, (width, height) in enumerate([(800, 600), (600, 800), (1000, 400)]):
        data = _jpeg(width, height, seed)
        drafted = load_image(data, draft_size=pre.draft_size)
        assert drafted.size[0] < width and min(drafted.size) >= pre.draft_size  # the draft did shrink the decode
        ours_pixels, timm_pixels = pre.transform()(drafted), theirs(load_image(data))
        mean_difference = ((ours_pixels - timm_pixels).abs() * torch.tensor(pre.std).view(3, 1, 1)).mean().item()
        assert mean_difference <= 0.01  # in [0, 1] pixel units; a random network's cosine alone is lenient
        with torch.inference_mode():
            ours_vector, timm_vector = model(torch.stack([ours_pixels, timm_pixels]))
        assert torch.nn.functional.cosine_similarity(ours_vector, timm_vector, dim=0).item() >= 0.995


def test_open_clip_matches_its_own_eval_transform():
    open_clip = pytest.importorskip("open_clip")
    for backbone in ["open_clip:ViT-B-32/openai", "open_clip:ViT-B-16-SigLIP/webli"]:
        spec = parse_backbone(backbone)
        cfg = open_clip.get_pretrained_cfg(spec.name, spec.tag)
        pre = resolve_preprocessing(spec, 64)
        assert pre.crop_mode == {"shortest": "center", "squash": "squash"}[cfg["resize_mode"]]
        theirs = open_clip.image_transform(64, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                           resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
        for seed, (width, height) in enumerate(SIZES):
            image = picture(width, height, seed)
            assert_same_pixels(pre.transform()(image), theirs(image), pre.std)


# Recorded with the implementation before crop modes existed: caches keyed by these must stay valid.
OLD_FINGERPRINTS = [
    ("timm:test_resnet", 32, "e3862eb14feb728529975bc9"),
    ("timm:test_resnet", None, "df69d3bfdc2322444c545453"),
    ("timm:resnet18", None, "83926795422e325d134ab470"),
    ("timm:resnet18", 180, "4803956dfe84b31a60da5a37"),
    ("timm:test_vit", None, "92d94bb3adb1f07d75803466"),
    ("timm:resnet50.a1_in1k", None, "6ba964f9597219785098a758"),
    ("open_clip:ViT-B-32/openai", None, "4a1b21197e53a6c868e3fdd9"),
    ("open_clip:ViT-B-32", 64, "7e2c087ec9086e3a07912163"),
]


@pytest.mark.parametrize("backbone, image_size, expected", OLD_FINGERPRINTS)
def test_fingerprints_of_unchanged_configurations_stay_byte_identical(backbone, image_size, expected):
    spec = parse_backbone(backbone)
    assert fingerprint(spec, "random:0", resolve_preprocessing(spec, image_size), "fp32") == expected


def test_fingerprint_recorded_in_the_format0_data():
    recorded = json.loads((REPO_ROOT / "tests" / "data" / "format0" / "README.json").read_text())["fingerprint"]
    assert recorded == "209f9524aaf3a832ba22fa91"
    spec = parse_backbone("timm:test_resnet")
    weights_id = weights_identity(spec, False, None, 0)
    if weights_id != "random:0:torch-2.14.1+timm-1.0.31":
        pytest.skip(f"recorded with torch 2.14.1 and timm 1.0.31, here {weights_id}: the library versions are "
                    "part of the fingerprint by design (the version-free pins above still hold)")
    assert fingerprint(spec, weights_id, resolve_preprocessing(spec, 32), "fp32") == recorded


def test_fingerprint_changes_where_the_numbers_change():
    square = timm_preprocessing(BASE)
    assert set(square.fingerprint_payload()) == {"image_size", "resize", "interpolation", "mean", "std", "jpeg_draft"}
    variants = [timm_preprocessing(dict(BASE, crop_mode="squash")), timm_preprocessing(dict(BASE, crop_mode="border")),
                timm_preprocessing(dict(BASE, input_size=(3, 48, 80)))]
    spec = parse_backbone("timm:test_resnet")
    prints = {fingerprint(spec, "random:0", pre, "fp32") for pre in [square, *variants]}
    assert len(prints) == 4
    squash = resolve_preprocessing(parse_backbone("timm:convnext_tiny.in12k_ft_in1k_384"))
    assert squash.fingerprint_payload()["crop_mode"] == "squash"


def test_preprocessing_validates_and_unpickles_old_objects():
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3, crop_mode="zoom")
    with pytest.raises(ValueError, match="widths of input_size"):
        Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3, input_size=(32, 40))
    with pytest.raises(ValueError, match="unknown interpolation"):
        Preprocessing(32, 36, "sinc", (0.5,) * 3, (0.5,) * 3).transform()
    pre = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert pickle.loads(pickle.dumps(pre)) == pre
    old = Preprocessing.__new__(Preprocessing)  # as pickled before crop_mode, input_size and resize_size existed
    old.__setstate__({"image_size": 32, "resize": 36, "interpolation": "bilinear", "mean": (0.5,) * 3,
                      "std": (0.5,) * 3, "jpeg_draft": True})
    assert old == pre and old.input_size == (32, 32) and old.draft_size == 36
    transform = pickle.loads(pickle.dumps(timm_preprocessing(dict(BASE, crop_mode="border")).transform()))
    assert transform(picture(30, 60)).shape == (3, 48, 48)  # DataLoader workers may pickle the transform
