"""One registry of image backbones: ``"timm:<model>"`` and ``"open_clip:<model>[/<pretrained tag>]"``.

A backbone string names the same network everywhere (the embedder, the
fine-tuner, the command line). This module parses it, works out the network's
preprocessing without building it, builds it (pretrained from the internet,
from a local weights file, or seeded random weights), and computes the
*fingerprint* that keys the embedding cache: model id, weights, preprocessing
and precision. torch, timm and open_clip are imported only when needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from .exceptions import WeightsUnavailableError

logger = logging.getLogger(__name__)

FAMILIES = ("timm", "open_clip")
_OPEN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPEN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone string.

    Attributes
    ----------
    family : {"timm", "open_clip"}
    name : str
        The model name in that library (timm names may carry a ``.tag``).
    tag : str or None
        open_clip's pretrained tag (``"laion2b_s34b_b79k"``); ``None`` for timm.
    """

    family: str
    name: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.family}:{self.name}" + (f"/{self.tag}" if self.tag else "")


def parse_backbone(backbone: str) -> BackboneSpec:
    """Parse ``"timm:<model>"`` or ``"open_clip:<model>[/<tag>]"``.

    Examples
    --------
    >>> parse_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k")
    BackboneSpec(family='open_clip', name='ViT-B-32', tag='laion2b_s34b_b79k')
    >>> parse_backbone("timm:resnet50").name
    'resnet50'
    """
    if not isinstance(backbone, str) or ":" not in backbone:
        raise ValueError(
            f"backbone must be a string 'timm:<model>' or 'open_clip:<model>[/<tag>]', got {backbone!r}"
        )
    family, _, rest = backbone.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r} in {backbone!r}; use one of {FAMILIES}")
    name, _, tag = rest.partition("/")
    if not name or (family == "timm" and tag):
        raise ValueError(f"cannot read the model name in {backbone!r}")
    return BackboneSpec(family, name, tag or None)


@dataclass(frozen=True)
class Preprocessing:
    """How pictures become the network's input: resize, centre crop, normalise.

    Attributes
    ----------
    image_size : int
        Side of the square input, after the centre crop.
    resize : int
        The shorter side is resized to this before the crop.
    interpolation : str
        ``"bilinear"`` or ``"bicubic"``.
    mean, std : tuple of float
        Per-channel normalisation.
    jpeg_draft : bool
        Decode large JPEGs at a reduced scale that still covers ``resize``
        (:func:`skproduct.images.load_image`'s ``draft_size``).
    """

    image_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jpeg_draft: bool = True

    @property
    def draft_size(self) -> int | None:
        """The ``draft_size`` to decode with, or ``None``."""
        return self.resize if self.jpeg_draft else None

    def transform(self):
        """The torchvision transform from an RGB PIL image to a normalised tensor."""
        from torchvision import transforms

        interpolation = {
            "bilinear": transforms.InterpolationMode.BILINEAR,
            "bicubic": transforms.InterpolationMode.BICUBIC,
        }.get(self.interpolation, transforms.InterpolationMode.BILINEAR)
        return transforms.Compose(
            [
                transforms.Resize(self.resize, interpolation=interpolation),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )


def resolve_preprocessing(spec: BackboneSpec, image_size: int | None = None) -> Preprocessing:
    """The preprocessing the backbone was trained with, at ``image_size`` if given.

    timm models use their pretrained configuration (input size, crop fraction,
    mean and std); open_clip models use their vision tower's size and
    open_clip's normalisation. Nothing is built or downloaded.
    """
    if spec.family == "timm":
        import timm

        if not timm.is_model(spec.name.split(".")[0]):
            raise ValueError(f"timm has no model {spec.name!r}; see timm.list_models() for the names")
        cfg = timm.models.get_pretrained_cfg(spec.name)
        size = image_size or cfg.input_size[-1]
        crop_pct = cfg.crop_pct or 1.0
        return Preprocessing(
            size, int(math.floor(size / crop_pct)), cfg.interpolation or "bilinear", tuple(cfg.mean), tuple(cfg.std)
        )
    import open_clip

    config = open_clip.get_model_config(spec.name)
    if config is None:
        raise ValueError(f"open_clip has no model {spec.name!r}; see open_clip.list_models() for the names")
    pretrained = open_clip.get_pretrained_cfg(spec.name, spec.tag) if spec.tag else {}
    size = image_size or _first(config["vision_cfg"].get("image_size", 224))
    return Preprocessing(
        size,
        size,
        pretrained.get("interpolation", "bicubic"),
        tuple(pretrained.get("mean", _OPEN_CLIP_MEAN)),
        tuple(pretrained.get("std", _OPEN_CLIP_STD)),
    )


def _first(size) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the process's life."""
    path = os.path.abspath(os.fspath(path))
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"the weights file {path!r} does not exist") from None
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def weights_identity(spec: BackboneSpec, pretrained: bool, weights: str | None, seed: int) -> str:
    """Name the weights a backbone will have, without loading them."""
    versions = _library_versions(spec.family)  # an upgrade may change the forward pass or the random init
    if weights is not None:
        return f"file:{file_sha256(weights)}:{versions}"
    if not pretrained:
        return f"random:{seed}:{versions}"
    if spec.family == "open_clip":
        if not spec.tag:
            raise ValueError(
                f"{spec} names no pretrained tag: use 'open_clip:{spec.name}/<tag>' "
                "(see open_clip.list_pretrained_tags_by_model), pass weights=, or pretrained=False"
            )
        return f"pretrained:{spec.name}/{spec.tag}:{versions}"
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.name)
    return f"pretrained:{cfg.architecture}.{cfg.tag}:{versions}"


def _library_versions(family: str) -> str:
    from importlib.metadata import version

    return f"torch-{version('torch')}+{family}-{version('timm' if family == 'timm' else 'open_clip_torch')}"


def fingerprint(
    spec: BackboneSpec, weights_id: str, preprocessing: Preprocessing, precision: str
) -> str:
    """A short hash that changes when the model, its weights, preprocessing or precision change.

    Examples
    --------
    >>> pre = Preprocessing(224, 256, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    >>> a = fingerprint(parse_backbone("timm:resnet18"), "random:0", pre, "fp32")
    >>> a == fingerprint(parse_backbone("timm:resnet18"), "random:0", pre, "bf16")
    False
    """
    payload = {"backbone": str(spec), "weights": weights_id, "preprocessing": asdict(preprocessing), "precision": precision}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def build_backbone(
    spec: BackboneSpec, *, pretrained: bool, weights: str | None, image_size: int | None, seed: int
):
    """Build the feature extractor: a module mapping ``(N, 3, S, S)`` to ``(N, D)``.

    timm models are built without their classifier (pooled pre-logit features);
    open_clip models contribute their image tower. ``weights`` (a local file)
    wins over ``pretrained``; random weights are seeded with ``seed``.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.family == "timm":
            module = _build_timm(spec, pretrained and weights is None, image_size)
            if weights is not None:
                load_weights_file(module, weights, str(spec))
        else:
            module = _build_open_clip(spec, pretrained, weights, image_size)
    return module.eval()


def _offline_error(spec: BackboneSpec, exc: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for {spec} could not be downloaded (offline?): pass weights='path/to/file' "
        f"with a local copy, or pretrained=False for random weights ({type(exc).__name__}: {exc})"
    )


def _build_timm(spec: BackboneSpec, pretrained: bool, image_size: int | None):
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    cfg = timm.models.get_pretrained_cfg(spec.name)
    if image_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise _offline_error(spec, exc) from exc
        raise


def _build_open_clip(spec: BackboneSpec, pretrained: bool, weights: str | None, image_size: int | None):
    import open_clip

    source = spec.tag if pretrained and weights is None else None
    try:
        model = open_clip.create_model(spec.name, pretrained=source, force_image_size=image_size)
    except (OSError, RuntimeError) as exc:
        if source is not None:
            raise _offline_error(spec, exc) from exc
        raise
    if weights is not None:  # a whole CLIP checkpoint or the image tower's own state dict
        load_weights_file(model.visual, weights, str(spec), prefix="visual.")
    return model.visual  # the image tower: (N, 3, S, S) -> (N, embed_dim)


def load_weights_file(module, path: str | os.PathLike, name: str, prefix: str | None = None) -> None:
    """Load a local checkpoint into ``module``, ignoring classifier weights the module does not have.

    Accepts a plain state dict or one nested under ``"state_dict"`` or
    ``"model"``. With ``prefix`` (``"visual."`` for a CLIP image tower), keys
    under it are taken without it when the file has any. Raises
    ``ValueError`` naming the missing parameters when the file does not fit
    the architecture.
    """
    import torch

    file_sha256(path)  # a clear error for a missing file
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if prefix is not None and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = sorted(set(own) - set(usable))
    if missing:
        raise ValueError(
            f"the weights file {os.fspath(path)!r} does not fit {name}: {len(missing)} parameters are missing or "
            f"of another shape, for example {missing[:3]}"
        )
    module.load_state_dict(usable)
