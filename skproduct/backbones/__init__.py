"""One registry of image backbones: ``"timm:<model>"`` and ``"open_clip:<model>[/<pretrained tag>]"``.

A backbone string names the same network everywhere (the embedder, the
fine-tuner, the command line). The part before ``:`` picks a registered
*family* object (:class:`TimmFamily`, :class:`OpenClipFamily`, or one of your
own: subclass :class:`BackboneFamily` and call :func:`register_family`), which
parses the rest, works out the network's preprocessing without building it,
builds it (pretrained from the internet, from a local weights file, or seeded
random weights) and names its weights. The module-level functions here
dispatch to the family, and :func:`fingerprint` computes the key of the
embedding cache: model id, weights, preprocessing and precision. torch, timm
and open_clip are imported only when needed.

Submodules: ``_family`` (spec, base class, registry), ``_preprocessing``
(:class:`Preprocessing` and its transform), ``_weights`` (local files),
``_timm`` and ``_open_clip`` (one family each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from ._family import FAMILIES, BackboneFamily, BackboneSpec, family_of, register_family, unregister_family
from ._open_clip import OpenClipFamily
from ._preprocessing import CROP_MODES, CenterCropOrPad, Preprocessing, ResizeKeepRatio
from ._timm import TimmFamily, timm_preprocessing
from ._weights import file_sha256, load_weights_file

__all__ = [
    "CROP_MODES",
    "FAMILIES",
    "BackboneFamily",
    "BackboneSpec",
    "CenterCropOrPad",
    "OpenClipFamily",
    "Preprocessing",
    "ResizeKeepRatio",
    "TimmFamily",
    "build_backbone",
    "family_of",
    "file_sha256",
    "fingerprint",
    "load_weights_file",
    "parse_backbone",
    "register_family",
    "resolve_preprocessing",
    "timm_preprocessing",
    "unregister_family",
    "weights_identity",
]

logger = logging.getLogger(__name__)

register_family(TimmFamily())
register_family(OpenClipFamily())


def parse_backbone(backbone: str) -> BackboneSpec:
    """Parse ``"timm:<model>"`` or ``"open_clip:<model>[/<tag>]"`` (or a registered family's string).

    Only the syntax is checked; whether the library has the model is checked
    by :func:`resolve_preprocessing` and :func:`build_backbone`.

    Examples
    --------
    >>> parse_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k")
    BackboneSpec(family='open_clip', name='ViT-B-32', tag='laion2b_s34b_b79k')
    >>> parse_backbone("timm:resnet50").name
    'resnet50'
    """
    if not isinstance(backbone, str) or ":" not in backbone:
        forms = " or ".join(repr(family.syntax) for family in FAMILIES.values())
        raise ValueError(f"backbone must be a string {forms}, got {backbone!r}")
    prefix = backbone.partition(":")[0]
    if prefix not in FAMILIES:
        raise ValueError(f"unknown backbone family {prefix!r} in {backbone!r}; use one of {tuple(FAMILIES)}")
    return FAMILIES[prefix].parse(backbone)


def resolve_preprocessing(spec: BackboneSpec, image_size: int | None = None) -> Preprocessing:
    """The preprocessing the backbone was evaluated with, at ``image_size`` (square) if given.

    timm models use timm's data configuration (input size, ``crop_pct``,
    ``crop_mode``, interpolation, mean and std: what
    ``timm.data.create_transform`` builds); open_clip models use their vision
    tower's size and the pretrained tag's normalisation. Nothing is built or
    downloaded.

    Raises
    ------
    ValueError
        The library has no such model.

    Examples
    --------
    >>> pre = resolve_preprocessing(parse_backbone("timm:test_resnet"), 32)
    >>> pre.input_size, pre.resize, pre.interpolation, pre.crop_mode
    ((32, 32), 33, 'bilinear', 'center')
    """
    family = family_of(spec)
    family.validate(spec)
    preprocessing = family.preprocessing(spec, image_size)
    logger.debug("preprocessing of %s at image_size=%s: %s", spec, image_size, preprocessing)
    return preprocessing


def weights_identity(spec: BackboneSpec, pretrained: bool, weights: str | os.PathLike | None, seed: int) -> str:
    """Name the weights a backbone will have, without loading them.

    A local file is named by its SHA-256, random weights by their seed,
    pretrained ones by their published name; the torch and library versions
    follow, since an upgrade may change the forward pass or the random init.

    Examples
    --------
    >>> weights_identity(parse_backbone("timm:test_resnet"), False, None, 3).startswith("random:3:torch-")
    True
    """
    return family_of(spec).weights_identity(spec, pretrained, weights, seed)


def fingerprint(
    spec: BackboneSpec, weights_id: str, preprocessing: Preprocessing, precision: str, *, runtime: str = "torch",
    decode: str = "cpu",
) -> str:
    """A short hash that changes when the model, its weights, preprocessing, precision, runtime or decoder change.

    The preprocessing enters through :meth:`Preprocessing.fingerprint_payload`,
    which keeps the fingerprints of square centre-crop configurations what
    they were before crop modes existed. ``runtime`` (the inference engine:
    ``"openvino"``, ``"onnxruntime"``) and ``decode`` (``"device"``: pictures
    decoded and resized as tensors, :mod:`skproduct.image_pipeline.device_decode`)
    enter only when they are not the defaults, so that the fingerprints of the
    torch engine with PIL decoding stay what they were.

    Examples
    --------
    >>> pre = Preprocessing(224, 256, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    >>> a = fingerprint(parse_backbone("timm:resnet18"), "random:0", pre, "fp32")
    >>> a == fingerprint(parse_backbone("timm:resnet18"), "random:0", pre, "bf16")
    False
    >>> a == fingerprint(parse_backbone("timm:resnet18"), "random:0", pre, "fp32", runtime="torch", decode="cpu")
    True
    >>> a == fingerprint(parse_backbone("timm:resnet18"), "random:0", pre, "fp32", runtime="openvino")
    False
    """
    payload = {
        "backbone": str(spec), "weights": weights_id, "preprocessing": preprocessing.fingerprint_payload(),
        "precision": precision,
    }
    if runtime != "torch":
        payload["runtime"] = runtime
    if decode != "cpu":
        payload["decode"] = decode
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def build_backbone(
    spec: BackboneSpec, *, pretrained: bool, weights: str | os.PathLike | None, image_size: int | None, seed: int
) -> Any:
    """Build the feature extractor, in eval mode: a module mapping ``(N, 3, H, W)`` to ``(N, D)``.

    timm models are built without their classifier (pooled pre-logit features);
    open_clip models contribute their image tower. ``weights`` (a local file)
    wins over ``pretrained``; random weights are seeded with ``seed`` without
    touching the caller's torch random state.

    Raises
    ------
    WeightsUnavailableError
        Pretrained weights could not be downloaded; the message says how to pass a local file.
    ValueError
        The library has no such model, or the weights file does not fit it.

    Examples
    --------
    >>> import torch
    >>> module = build_backbone(parse_backbone("timm:test_resnet"), pretrained=False, weights=None,
    ...                         image_size=None, seed=0)
    >>> module(torch.zeros(1, 3, 32, 32)).ndim
    2
    """
    import torch

    family = family_of(spec)
    family.validate(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = family.build(spec, pretrained=pretrained, weights=weights, image_size=image_size)
    logger.debug("built %s (pretrained=%s, weights=%s, seed=%s)", spec, pretrained, weights, seed)
    return module.eval()
