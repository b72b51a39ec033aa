"""The backbone registry: parsing, preprocessing, fingerprints, local weights, the offline error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from skproduct.backbones import (
    build_backbone,
    fingerprint,
    parse_backbone,
    resolve_preprocessing,
    weights_identity,
)


def test_parse_backbone_strings():
    assert str(parse_backbone("timm:resnet50.a1_in1k")) == "timm:resnet50.a1_in1k"
    spec = parse_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert (spec.family, spec.name, spec.tag) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    for bad, message in [("resnet50", "must be a string"), ("keras:resnet50", "unknown backbone family"),
                         ("timm:", "cannot read the model name"), ("timm:resnet50/x", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            parse_backbone(bad)


def test_preprocessing_comes_from_each_library():
    timm_pre = resolve_preprocessing(parse_backbone("timm:resnet18"))
    assert (timm_pre.image_size, timm_pre.resize, timm_pre.mean) == (224, 235, (0.485, 0.456, 0.406))
    assert resolve_preprocessing(parse_backbone("timm:resnet18"), 180).image_size == 180
    clip_pre = resolve_preprocessing(parse_backbone("open_clip:ViT-B-32/openai"))
    assert clip_pre.image_size == 224 and clip_pre.interpolation == "bicubic"
    with pytest.raises(ValueError, match="timm has no model"):
        resolve_preprocessing(parse_backbone("timm:resnet_does_not_exist"))
    with pytest.raises(ValueError, match="open_clip has no model"):
        resolve_preprocessing(parse_backbone("open_clip:NoSuchModel/x"))


def test_fingerprint_changes_with_model_weights_size_and_precision(tmp_path):
    spec = parse_backbone("timm:test_resnet")
    pre = resolve_preprocessing(spec, 64)
    base = fingerprint(spec, weights_identity(spec, False, None, 0), pre, "fp32")
    assert base == fingerprint(spec, weights_identity(spec, False, None, 0), pre, "fp32")
    variants = {
        fingerprint(parse_backbone("timm:test_vit"), weights_identity(spec, False, None, 0), pre, "fp32"),
        fingerprint(spec, weights_identity(spec, False, None, 1), pre, "fp32"),
        fingerprint(spec, weights_identity(spec, True, None, 0), pre, "fp32"),
        fingerprint(spec, weights_identity(spec, False, None, 0), resolve_preprocessing(spec, 96), "fp32"),
        fingerprint(spec, weights_identity(spec, False, None, 0), pre, "bf16"),
    }
    assert base not in variants and len(variants) == 5
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights one")
    second.write_bytes(b"weights two")
    assert weights_identity(spec, True, str(first), 0) != weights_identity(spec, True, str(second), 0)


def test_open_clip_needs_a_tag_for_pretrained_weights():
    with pytest.raises(ValueError, match="names no pretrained tag"):
        weights_identity(parse_backbone("open_clip:ViT-B-32"), True, None, 0)


def test_local_weights_file_for_timm(tmp_path):
    import torch

    spec = parse_backbone("timm:test_resnet")
    trained = build_backbone(spec, pretrained=False, weights=None, image_size=None, seed=7)
    path = tmp_path / "test_resnet.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    loaded = build_backbone(spec, pretrained=True, weights=str(path), image_size=None, seed=0)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(trained(pixels), loaded(pixels))
    with pytest.raises(ValueError, match="does not fit timm:test_vit"):
        build_backbone(parse_backbone("timm:test_vit"), pretrained=False, weights=str(path), image_size=None, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(spec, pretrained=False, weights=str(tmp_path / "missing.pth"), image_size=None, seed=0)


def test_pretrained_download_offline_says_how_to_pass_weights(tmp_path):
    code = (
        "from skproduct.backbones import build_backbone, parse_backbone\n"
        "build_backbone(parse_backbone('timm:test_resnet.r160_in1k'), pretrained=True, weights=None,"
        " image_size=None, seed=0)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))  # no weights cached from earlier runs
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "pretrained weights for timm:test_resnet.r160_in1k could not be downloaded (offline?)" in result.stderr
    assert "pass weights='path/to/file'" in result.stderr
