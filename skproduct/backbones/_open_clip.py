"""The open_clip family: ``"open_clip:<model>[/<pretrained tag>]"``, contributing the image tower.

Preprocessing is open_clip's eval transform: the shorter side resized to the
tower's input size and a centre crop (``resize_mode="shortest"``), or both
sides resized to it for tags published with ``resize_mode="squash"``; the
interpolation, mean and std of the pretrained tag (bicubic and CLIP's
normalisation by default). open_clip is imported only when used.
"""

from __future__ import annotations

import logging
from typing import Any

from ._family import BackboneFamily, BackboneSpec
from ._preprocessing import Preprocessing

logger = logging.getLogger(__name__)

_OPEN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPEN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _first(size: Any) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class OpenClipFamily(BackboneFamily):
    """open_clip models; the built module is the image tower ``(N, 3, S, S) -> (N, embed_dim)``.

    Examples
    --------
    >>> from skproduct.backbones import parse_backbone
    >>> family = OpenClipFamily()
    >>> spec = parse_backbone("open_clip:ViT-B-32/openai")
    >>> family.pretrained_name(spec)
    'ViT-B-32/openai'
    >>> pre = family.preprocessing(spec)
    >>> pre.image_size, pre.interpolation, pre.crop_mode
    (224, 'bicubic', 'center')
    """

    prefix = "open_clip"
    syntax = "open_clip:<model>[/<tag>]"
    distribution = "open_clip_torch"
    takes_tag = True
    weights_prefix = "visual."  # a whole CLIP checkpoint or the image tower's own state dict

    def validate(self, spec: BackboneSpec) -> None:
        import open_clip

        if open_clip.get_model_config(spec.name) is None:
            raise ValueError(f"open_clip has no model {spec.name!r}; see open_clip.list_models() for the names")

    def preprocessing(self, spec: BackboneSpec, image_size: int | None = None) -> Preprocessing:
        import open_clip

        config = open_clip.get_model_config(spec.name)
        if config is None:
            self.validate(spec)
        pretrained = open_clip.get_pretrained_cfg(spec.name, spec.tag) if spec.tag else {}
        size = int(image_size) if image_size else _first(config["vision_cfg"].get("image_size", 224))
        interpolation = pretrained.get("interpolation") or "bicubic"
        if interpolation == "random":  # open_clip evaluates "random" as bicubic
            interpolation = "bicubic"
        return Preprocessing(
            size,
            size,
            interpolation,
            tuple(pretrained.get("mean", _OPEN_CLIP_MEAN)),
            tuple(pretrained.get("std", _OPEN_CLIP_STD)),
            crop_mode="squash" if pretrained.get("resize_mode") == "squash" else "center",
        )

    def create(self, spec: BackboneSpec, *, pretrained: bool, image_size: int | None) -> Any:
        import open_clip

        source = spec.tag if pretrained else None
        try:
            model = open_clip.create_model(spec.name, pretrained=source, force_image_size=image_size)
        except (OSError, RuntimeError) as exc:
            if source is not None:
                raise self.offline_error(spec, exc) from exc
            raise
        return model.visual

    def pretrained_name(self, spec: BackboneSpec) -> str:
        if not spec.tag:
            raise ValueError(
                f"{spec} names no pretrained tag: use 'open_clip:{spec.name}/<tag>' "
                "(see open_clip.list_pretrained_tags_by_model), pass weights=, or pretrained=False"
            )
        return f"{spec.name}/{spec.tag}"
