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
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode != 0
    assert "pretrained weights for timm:test_resnet.r160_in1k could not be downloaded (offline?)" in result.stderr
    assert "pass weights='path/to/file'" in result.stderr


def test_a_third_family_is_one_class_and_one_registration():
    import torch

    from skproduct.backbones import (
        FAMILIES,
        BackboneFamily,
        Preprocessing,
        family_of,
        register_family,
        unregister_family,
    )

    class ToyFamily(BackboneFamily):
        prefix, syntax, distribution = "toy", "toy:<name>", "torch"

        def validate(self, spec):
            if spec.name != "identity":
                raise ValueError(f"toy has no model {spec.name!r}")

        def preprocessing(self, spec, image_size=None):
            size = image_size or 16
            return Preprocessing(size, size, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_mode="squash")

        def create(self, spec, *, pretrained, image_size):
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def pretrained_name(self, spec):
            return f"toy-{spec.name}-v1"

    register_family(ToyFamily())
    try:
        spec = parse_backbone("toy:identity")
        assert (spec.family, spec.name, spec.tag) == ("toy", "identity", None)
        assert isinstance(family_of(spec), ToyFamily)
        pre = resolve_preprocessing(spec, 24)
        assert (pre.input_size, pre.crop_mode) == ((24, 24), "squash")
        with pytest.raises(ValueError, match="toy has no model 'other'"):
            resolve_preprocessing(parse_backbone("toy:other"))
        assert weights_identity(spec, True, None, 0).startswith("pretrained:toy-identity-v1:torch-")
        assert weights_identity(spec, False, None, 5).startswith("random:5:torch-")
        first = build_backbone(spec, pretrained=False, weights=None, image_size=24, seed=3)
        again = build_backbone(spec, pretrained=False, weights=None, image_size=24, seed=3)
        pixels = torch.rand(2, 3, 24, 24)
        assert not first.training and torch.equal(first(pixels), again(pixels)) and first(pixels).shape == (2, 4)
        assert fingerprint(spec, weights_identity(spec, False, None, 0), pre, "fp32") != fingerprint(
            parse_backbone("timm:test_resnet"), weights_identity(spec, False, None, 0), pre, "fp32")
        with pytest.raises(ValueError, match="already registered"):
            register_family(ToyFamily())
        with pytest.raises(ValueError, match="cannot read the model name"):
            parse_backbone("toy:identity/tag")  # the toy family takes no tags
    finally:
        unregister_family("toy")
    assert "toy" not in FAMILIES
    with pytest.raises(ValueError, match="unknown backbone family 'toy'"):
        parse_backbone("toy:identity")
    with pytest.raises(TypeError, match="not the class"):
        register_family(ToyFamily)


def test_pretrained_weights_need_a_tag_the_library_has():
    with pytest.raises(ValueError, match="timm has no pretrained weights 'resnet50.no_such_tag'"):
        weights_identity(parse_backbone("timm:resnet50.no_such_tag"), True, None, 0)
    with pytest.raises(ValueError, match="timm has no model"):  # a typo is not reported as being offline
        build_backbone(parse_backbone("timm:resnet_does_not_exist"), pretrained=True, weights=None,
                       image_size=None, seed=0)
