"""torch pieces of the image estimators: the picture dataset and device/precision choices.

Imported only when a model runs, so that ``import skproduct`` never imports torch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .images import BadImagePolicy


class PictureDataset(Dataset):
    """Decode and preprocess pictures by position, applying the bad-picture policy.

    Picklable, so that DataLoader workers decode in parallel.
    """

    def __init__(self, refs: list, transform, on_error: str, image_size: int, draft_size: int | None):
        self.refs = refs
        self.transform = transform
        self.draft_size = draft_size
        self.policy = BadImagePolicy(on_error, blank_size=(image_size, image_size))
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        """``(pixels, used, decoded, i)``: ``used`` is False for a skipped picture, ``decoded`` False for a bad one."""
        failed_before = self.policy.n_failed
        image = self.policy.load(self.refs[i], draft_size=self.draft_size)
        decoded = self.policy.n_failed == failed_before
        if image is None:
            return torch.zeros(3, self.image_size, self.image_size), False, False, i
        return self.transform(image), True, decoded, i


def picture_loader(dataset: PictureDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches of ``(pixels, used, decoded, positions)`` in order, decoded in ``num_workers`` processes."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def device_available(device: str) -> bool:
    """Whether a torch device string names a device this machine has."""
    kind = torch.device(device)
    if kind.type == "cuda":
        return torch.cuda.is_available() and (kind.index or 0) < torch.cuda.device_count()
    if kind.type == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind.type == "cpu"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 on CUDA devices that support it, else fp16 on CUDA, else fp32."""
    if precision != "auto":
        if precision != "fp32" and device.type != "cuda":
            raise ValueError(f"precision={precision!r} needs a CUDA device; this one is {device}: use 'fp32' or 'auto'")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
