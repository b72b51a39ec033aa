"""The timm family: ``"timm:<model>[.<pretrained tag>]"``, with timm's own eval preprocessing.

The preprocessing is read from the model's pretrained configuration through
``timm.data.resolve_data_config`` (input size, interpolation, mean, std,
``crop_pct``, ``crop_mode``), the same source as ``timm.data.create_transform``,
so no weights are needed to know it. timm is imported only when used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ._family import BackboneFamily, BackboneSpec
from ._preprocessing import Preprocessing

logger = logging.getLogger(__name__)


def timm_preprocessing(config: Mapping[str, Any], image_size: int | None = None) -> Preprocessing:
    """The :class:`Preprocessing` of a timm data configuration, as ``create_transform(**config)`` evaluates.

    Parameters
    ----------
    config : mapping
        The output of ``timm.data.resolve_data_config``: ``input_size``,
        ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.
    image_size : int, optional
        Make the input square of this side, keeping ``crop_pct`` and ``crop_mode``.

    Returns
    -------
    Preprocessing

    Examples
    --------
    >>> config = {"input_size": (3, 160, 160), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
    ...           "std": (0.5, 0.5, 0.5), "crop_pct": 0.95, "crop_mode": "center"}
    >>> pre = timm_preprocessing(config)
    >>> pre.input_size, pre.resize_size
    ((160, 160), (168, 168))
    >>> timm_preprocessing(dict(config, input_size=(3, 96, 128), crop_mode="squash")).resize_size
    (101, 134)
    >>> timm_preprocessing(dict(config, input_size=(3, 96, 128)), image_size=64).input_size
    (64, 64)
    """
    from timm.data.constants import DEFAULT_CROP_MODE, DEFAULT_CROP_PCT

    height, width = (int(image_size), int(image_size)) if image_size else tuple(config["input_size"][-2:])
    crop_pct = config.get("crop_pct") or DEFAULT_CROP_PCT
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))  # as transforms_imagenet_eval
    crop_mode = config.get("crop_mode") or DEFAULT_CROP_MODE
    if crop_mode not in ("squash", "border"):
        crop_mode = "center"  # timm's eval transform treats any other mode as a centre crop
    return Preprocessing(
        width, scale[1], config.get("interpolation") or "bicubic", tuple(config["mean"]), tuple(config["std"]),
        crop_mode=crop_mode, input_size=(height, width), resize_size=scale,
    )


class TimmFamily(BackboneFamily):
    """timm models, built without their classifier (pooled pre-logit features).

    Examples
    --------
    >>> from skproduct.backbones import parse_backbone
    >>> family = TimmFamily()
    >>> spec = parse_backbone("timm:resnet50.a1_in1k")
    >>> family.pretrained_name(spec)
    'resnet50.a1_in1k'
    >>> family.preprocessing(spec).crop_mode, family.preprocessing(spec, 180).input_size
    ('center', (180, 180))
    """

    prefix = "timm"
    syntax = "timm:<model>"
    distribution = "timm"

    def validate(self, spec: BackboneSpec) -> None:
        import timm

        if not timm.is_model(spec.name.split(".")[0]):
            raise ValueError(f"timm has no model {spec.name!r}; see timm.list_models() for the names")

    def pretrained_cfg(self, spec: BackboneSpec) -> Any:
        """timm's ``PretrainedCfg`` for the name (its default tag when it has none), or ``None``."""
        import timm

        self.validate(spec)
        try:
            return timm.models.get_pretrained_cfg(spec.name)
        except RuntimeError as exc:  # a tag the architecture does not have
            architecture = spec.name.split(".")[0]
            raise ValueError(f"timm has no pretrained weights {spec.name!r} ({exc}); see "
                             f"timm.list_pretrained({architecture + '.*'!r}) for the tags") from None

    def data_config(self, spec: BackboneSpec) -> dict[str, Any]:
        """``timm.data.resolve_data_config`` of the model's pretrained configuration (train-time input size)."""
        from timm.data import resolve_data_config

        cfg = self.pretrained_cfg(spec)
        if cfg is None:
            return resolve_data_config(args={"in_chans": 3}, use_test_size=False)  # timm's defaults
        return resolve_data_config(pretrained_cfg=cfg.to_dict(), use_test_size=False)

    def preprocessing(self, spec: BackboneSpec, image_size: int | None = None) -> Preprocessing:
        return timm_preprocessing(self.data_config(spec), image_size)

    def create(self, spec: BackboneSpec, *, pretrained: bool, image_size: int | None) -> Any:
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0}
        cfg = timm.models.get_pretrained_cfg(spec.name)
        if image_size and cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = image_size
        try:
            return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            if pretrained:
                raise self.offline_error(spec, exc) from exc
            raise

    def pretrained_name(self, spec: BackboneSpec) -> str:
        cfg = self.pretrained_cfg(spec)
        if cfg is None:
            raise ValueError(f"timm has no pretrained weights for {spec}: pass weights= or pretrained=False")
        return f"{cfg.architecture}.{cfg.tag}"
