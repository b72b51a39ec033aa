"""Images to tensors with torch: the decoding ``Dataset``, the ordered loader, and the inference loop.

Imported only when a model runs, so that ``import skproduct`` never imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..exceptions import BadPictureWarning
from ..images import BadImagePolicy
from .device import autocast_dtype
from .worker_signals import WorkerLoader

__all__ = ["CompactRefs", "ImageDataset", "feature_size", "image_batches", "image_loader", "run_module",
           "warn_bad_pictures"]


class CompactRefs:
    """Picture references held in a few numpy arrays instead of one Python object each.

    DataLoader workers are forked: touching a Python object there writes its
    reference count and copies its memory page, so a list of 12 million
    references ends up copied into every worker. BSON picture references and
    file paths pack into arrays that workers only read.

    Examples
    --------
    >>> refs = CompactRefs.pack(["a.jpg", "photos/b.jpg"])
    >>> len(refs), refs[1]
    (2, 'photos/b.jpg')
    """

    def __init__(self, kind: str, columns: dict[str, np.ndarray]):
        self.kind, self.columns = kind, columns

    @classmethod
    def pack(cls, refs: list):
        """``refs`` packed when they are all BSON pictures (with integer product ids) or all path strings;
        else ``refs`` itself."""
        from ..io.bson_refs import BsonImageRef

        if refs and all(type(r) is BsonImageRef and isinstance(r.product_id, (int, np.integer)) for r in refs):
            files = sorted({r.path for r in refs})
            file_of = {path: k for k, path in enumerate(files)}
            table = np.array([(file_of[r.path], r.offset, r.length, r.product_id, r.index) for r in refs], np.int64)
            return cls("bson", {"files": np.array(files, dtype=object), "table": table})
        if refs and all(type(r) is str for r in refs):
            encoded = [r.encode("utf-8", "surrogateescape") for r in refs]
            ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
            return cls("path", {"buffer": np.frombuffer(b"".join(encoded), dtype=np.uint8), "ends": ends})
        return refs

    def __len__(self) -> int:
        return len(self.columns["table"] if self.kind == "bson" else self.columns["ends"])

    def __getitem__(self, i: int):
        if self.kind == "bson":
            from ..io.bson_refs import BsonImageRef

            file, offset, length, product_id, index = self.columns["table"][i].tolist()
            return BsonImageRef(self.columns["files"][file], offset, length, product_id, index)
        ends = self.columns["ends"]
        start = int(ends[i - 1]) if i else 0
        return self.columns["buffer"][start : int(ends[i])].tobytes().decode("utf-8", "surrogateescape")


class ImageDataset(Dataset):
    """Decode and preprocess pictures by position, applying the bad-picture policy.

    Picklable, so that DataLoader workers decode in parallel; with ``compact``
    (for worker processes) the references are held as :class:`CompactRefs`.
    """

    def __init__(
        self, refs: list, transform, on_error: str, image_size: int | tuple[int, int], draft_size: int | None,
        compact: bool = False,
    ):
        self.refs = CompactRefs.pack(refs) if compact else refs
        self.transform = transform
        self.draft_size = draft_size
        # (height, width) of the network's input: a skipped picture's placeholder has the transform's output shape
        self.input_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.policy = BadImagePolicy(on_error, blank_size=self.input_size[::-1])

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        """``(pixels, used, decoded, i)``: ``used`` is False for a skipped picture, ``decoded`` False for a bad one."""
        failed_before = self.policy.n_failed
        image = self.policy.load(self.refs[i], draft_size=self.draft_size)
        decoded = self.policy.n_failed == failed_before
        if image is None:
            return torch.zeros(3, *self.input_size), False, False, i
        return self.transform(image), True, decoded, i


def image_loader(dataset: ImageDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches of ``(pixels, used, decoded, positions)`` in order, decoded in ``num_workers`` processes."""
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def image_batches(
    module: Callable[[torch.Tensor], torch.Tensor],
    dataset: ImageDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    on_error: str,
    progress,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Run ``module`` over the pictures of ``dataset`` in order, in inference mode; yield each batch's results.

    Yields ``(positions, outputs, used, decoded)`` as numpy arrays, outputs in
    float32 (zeros for pictures the policy skipped). Pictures go through
    channels-last, under autocast for bf16/fp16, decoded in ``num_workers``
    processes; the number that did not decode is logged once at the end.
    """
    n_bad = 0
    dtype = autocast_dtype(precision)
    with torch.inference_mode(), progress:
        for pixels, batch_used, batch_decoded, positions in image_loader(dataset, batch_size, num_workers, device):
            pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = module(pixels)
            used, decoded = batch_used.numpy(), batch_decoded.numpy()
            n_bad += int((~decoded).sum())
            progress.update(len(positions))
            yield positions.numpy(), out.float().cpu().numpy() * used[:, None], used, decoded
    warn_bad_pictures(n_bad, len(dataset), on_error, stacklevel=3)


def warn_bad_pictures(n_bad: int, n_pictures: int, on_error: str, *, where: str = "",
                      stacklevel: int = 2) -> None:
    """One :class:`~skproduct.exceptions.BadPictureWarning` for the ``n_bad`` pictures that did not decode (none
    when ``n_bad`` is 0); ``where`` says where they were decoded (``" on the workers"``)."""
    if n_bad:
        done = "skipped" if on_error == "skip" else "replaced by blank pictures"
        warnings.warn(
            f"{n_bad} of {n_pictures} pictures could not be decoded{where} and were {done} (on_error={on_error!r})",
            BadPictureWarning, stacklevel=stacklevel + 1,
        )


def feature_size(module: torch.nn.Module, image_size: int | tuple[int, int]) -> int:
    """The size of the vectors a backbone returns, read from the model (timm's ``head_hidden_size`` or
    ``num_features``, open_clip's ``output_dim``); a one-image forward only for a module that says neither."""
    for name in ("head_hidden_size", "num_features", "output_dim"):
        size = getattr(module, name, None)
        if isinstance(size, int) and size > 0:
            return size
    parameter = next(module.parameters(), None)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    probe = torch.zeros(1, 3, height, width, device=None if parameter is None else parameter.device)
    with torch.inference_mode():
        return int(module(probe).shape[1])


def run_module(
    module: Callable[[torch.Tensor], torch.Tensor],
    refs: list,
    preprocessing,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    on_error: str,
    verbose: int = 0,
    desc: str = "images",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Decode ``refs`` with ``preprocessing``'s eval transform and run ``module`` over them in order.

    The one entry point both image estimators use for inference: the
    dataset, the loader, the progress bar and :func:`image_batches`' loop.
    """
    from tqdm.auto import tqdm

    dataset = ImageDataset(
        refs, preprocessing.transform(), on_error, preprocessing.input_size, preprocessing.draft_size,
        compact=num_workers > 0,
    )
    progress = tqdm(total=len(refs), unit="img", disable=not verbose, desc=desc)
    return image_batches(
        module, dataset, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
        on_error=on_error, progress=progress,
    )
