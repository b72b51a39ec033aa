"""How pictures become a network's input: :class:`Preprocessing` and the eval transform it builds.

The transform reproduces timm's eval pipeline (``transforms_imagenet_eval``)
for its three crop modes, so that a timm model sees exactly the numbers it
was evaluated with:

- ``"center"``: keep the aspect ratio, resize so that the picture covers the
  resize target (the shorter side to ``resize`` when square), centre crop;
- ``"squash"``: resize both sides to the resize target, ignoring the aspect
  ratio, then centre crop;
- ``"border"``: keep the aspect ratio, fit the longer side inside the resize
  target, then centre crop or pad with the mean colour.

Only torchvision is needed (not timm), so open_clip and other families use it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# The fields the fingerprint hashed before crop modes and non-square inputs existed: for a square centre-crop
# configuration the payload is exactly these, so the caches keyed by it stay valid.
_FINGERPRINT_FIELDS = ("image_size", "resize", "interpolation", "mean", "std", "jpeg_draft")
_NEW_FIELDS = {"crop_mode": "center", "input_size": None, "resize_size": None}


def _pair(value: Any, side: int) -> tuple[int, int]:
    if value is None:
        return (int(side), int(side))
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


@dataclass(frozen=True)
class Preprocessing:
    """How pictures become the network's input: resize, crop (or pad), normalise.

    Attributes
    ----------
    image_size : int
        Side of the square input after the crop; for a non-square input, its width.
    resize : int
        Side of the square resize target (in ``"center"`` mode the shorter side
        of the picture is resized to it); for a non-square target, its width.
    interpolation : str
        ``"bilinear"``, ``"bicubic"`` (or another torchvision interpolation name).
    mean, std : tuple of float
        Per-channel normalisation.
    jpeg_draft : bool, default=True
        Decode large JPEGs at a reduced scale that still covers the resize
        target (:func:`skproduct.images.load_image`'s ``draft_size``).
    crop_mode : {"center", "squash", "border"}, default="center"
        timm's crop modes (see the module docstring).
    input_size : tuple of int, optional
        ``(height, width)`` of the input; defaults to ``(image_size, image_size)``.
    resize_size : tuple of int, optional
        ``(height, width)`` of the resize target (timm's ``scale_size``,
        ``floor(input_size / crop_pct)``); defaults to ``(resize, resize)``.

    Examples
    --------
    >>> pre = Preprocessing(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    >>> pre.input_size, pre.resize_size, pre.draft_size
    ((224, 224), (256, 256), 256)
    >>> wide = Preprocessing(64, 64, "bicubic", (0.5,) * 3, (0.5,) * 3, crop_mode="squash",
    ...                      input_size=(48, 64), resize_size=(48, 64))
    >>> sorted(set(wide.fingerprint_payload()) - set(pre.fingerprint_payload()))
    ['crop_mode', 'input_size', 'resize_size']
    """

    image_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jpeg_draft: bool = True
    crop_mode: str = "center"
    input_size: tuple[int, int] | None = None
    resize_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        input_size, resize_size = _pair(self.input_size, self.image_size), _pair(self.resize_size, self.resize)
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if input_size[1] != self.image_size or resize_size[1] != self.resize:
            raise ValueError(
                f"image_size and resize must be the widths of input_size and resize_size, got image_size="
                f"{self.image_size}, input_size={input_size}, resize={self.resize}, resize_size={resize_size}"
            )
        object.__setattr__(self, "input_size", input_size)
        object.__setattr__(self, "resize_size", resize_size)
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    def __setstate__(self, state: dict) -> None:
        # objects pickled before crop_mode/input_size/resize_size existed (a fitted estimator saved earlier)
        state = {**_NEW_FIELDS, **state}
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    @property
    def draft_size(self) -> int | None:
        """The ``draft_size`` to decode with (the longer side of the resize target), or ``None``."""
        return max(self.resize_size) if self.jpeg_draft else None

    def fingerprint_payload(self) -> dict[str, Any]:
        """What the backbone fingerprint hashes: every number that changes the transform's output.

        The six original fields always; ``crop_mode``, ``input_size`` and
        ``resize_size`` only where they differ from the centre crop of a
        square input, so that fingerprints of such configurations stay as
        they were before those fields existed.
        """
        payload: dict[str, Any] = {name: getattr(self, name) for name in _FINGERPRINT_FIELDS}
        if self.crop_mode != "center":
            payload["crop_mode"] = self.crop_mode
        if self.input_size != (self.image_size, self.image_size):
            payload["input_size"] = list(self.input_size)
        if self.resize_size != (self.resize, self.resize):
            payload["resize_size"] = list(self.resize_size)
        return payload

    def transform(self) -> Any:
        """The torchvision transform from an RGB PIL image to a normalised ``(3, H, W)`` float tensor.

        Examples
        --------
        >>> from PIL import Image
        >>> pre = Preprocessing(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> pre.transform()(Image.new("RGB", (90, 40))).shape
        torch.Size([3, 32, 32])
        """
        from torchvision import transforms

        return transforms.Compose([*self.geometry(), transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def geometry(self) -> list:
        """The resize and crop (or pad) steps of :meth:`transform`, without the conversion and normalisation.

        They take PIL images or uint8 tensors ``(..., 3, H, W)`` alike (torchvision's
        functional API): the device decoder runs them on batches of tensors.

        Examples
        --------
        >>> import torch
        >>> pre = Preprocessing(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> x = torch.zeros(2, 3, 40, 90, dtype=torch.uint8)
        >>> for step in pre.geometry():
        ...     x = step(x)
        >>> tuple(x.shape), x.dtype
        ((2, 3, 32, 32), torch.uint8)
        """
        from torchvision import transforms

        mode = _interpolation_mode(self.interpolation)
        (height, width), (scale_h, scale_w) = self.input_size, self.resize_size
        if self.crop_mode == "squash":
            return [transforms.Resize((scale_h, scale_w), interpolation=mode), transforms.CenterCrop((height, width))]
        if self.crop_mode == "border":
            fill = tuple(round(255 * v) for v in self.mean)
            return [ResizeKeepRatio((scale_h, scale_w), mode, longest=1.0), CenterCropOrPad((height, width), fill)]
        # torchvision's shorter-side resize when square (as timm does), else the keep-ratio cover resize
        steps = [transforms.Resize(scale_h, interpolation=mode) if scale_h == scale_w
                 else ResizeKeepRatio((scale_h, scale_w), mode, longest=0.0)]
        steps.append(transforms.CenterCrop((height, width)))
        return steps


def _interpolation_mode(name: str):
    from torchvision.transforms import InterpolationMode

    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; use one of {INTERPOLATIONS}")
    return InterpolationMode(name)


class ResizeKeepRatio:
    """Resize keeping the aspect ratio, as timm's ``ResizeKeepRatio`` (without its random parts).

    ``longest=0`` makes the picture cover ``size`` (both sides at least the
    target); ``longest=1`` fits it inside ``size``.

    Parameters
    ----------
    size : tuple of int
        ``(height, width)`` target.
    interpolation : torchvision.transforms.InterpolationMode
    longest : float, default=0.0

    Examples
    --------
    >>> from PIL import Image
    >>> from torchvision.transforms import InterpolationMode
    >>> ResizeKeepRatio((40, 60), InterpolationMode.BILINEAR, longest=1.0)(Image.new("RGB", (300, 100))).size
    (60, 20)
    """

    def __init__(self, size: tuple[int, int], interpolation: Any, longest: float = 0.0):
        self.size = tuple(size)
        self.interpolation = interpolation
        self.longest = float(longest)

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms import functional as F

        image_h, image_w = F.get_dimensions(image)[1:]
        ratio_h, ratio_w = image_h / self.size[0], image_w / self.size[1]
        ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1.0 - self.longest)
        return F.resize(image, [round(image_h / ratio), round(image_w / ratio)], self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value}, longest={self.longest})"


class CenterCropOrPad:
    """Centre crop to ``size``, padding with ``fill`` first where the picture is smaller (timm's ``CenterCropOrPad``).

    Examples
    --------
    >>> from PIL import Image
    >>> padded = CenterCropOrPad((4, 4), fill=(255, 0, 0))(Image.new("RGB", (4, 2)))
    >>> padded.size, padded.getpixel((0, 0))
    ((4, 4), (255, 0, 0))
    """

    def __init__(self, size: tuple[int, int], fill: int | tuple[int, ...] = 0):
        self.size = tuple(size)
        self.fill = fill

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms import functional as F

        crop_h, crop_w = self.size
        _, image_h, image_w = F.get_dimensions(image)
        if crop_w > image_w or crop_h > image_h:
            padding = [
                (crop_w - image_w) // 2 if crop_w > image_w else 0,
                (crop_h - image_h) // 2 if crop_h > image_h else 0,
                (crop_w - image_w + 1) // 2 if crop_w > image_w else 0,
                (crop_h - image_h + 1) // 2 if crop_h > image_h else 0,
            ]
            image = _pad(image, padding, self.fill)
            _, image_h, image_w = F.get_dimensions(image)
            if (crop_h, crop_w) == (image_h, image_w):
                return image
        top, left = round((image_h - crop_h) / 2.0), round((image_w - crop_w) / 2.0)
        return F.crop(image, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


def _pad(image: Any, padding: list[int], fill: Any) -> Any:
    """``F.pad`` with a per-channel ``fill`` also for tensors (torchvision takes one number there)."""
    from torchvision.transforms import functional as F

    if isinstance(fill, (int, float)) or not hasattr(image, "ndim"):
        return F.pad(image, padding, fill=fill)
    import torch

    channels = [F.pad(image[..., c : c + 1, :, :], padding, fill=value) for c, value in enumerate(fill)]
    return torch.cat(channels, dim=-3)
