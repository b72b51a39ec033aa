"""Device decoding: JPEG *bytes* go to the device, are decoded there in batches, resized and normalised there.

On a GPU, decoding 180 px JPEGs with PIL in DataLoader workers caps extraction
at a few thousand pictures per second while the network could run several
times faster. This path ships bytes, not floats:

1. DataLoader workers only *read* each picture's bytes (a BSON slice, a file)
   and look at its JPEG header (:func:`jpeg_layout`). Pictures the device
   decoder does not take (PNG and other formats, CMYK and progressive JPEGs,
   PIL images and arrays) are decoded on the CPU in the worker (PIL, under the
   bad-picture policy) and travel as uint8 pixels. Batches are pinned on CUDA.
2. The main process decodes the batch's JPEGs with
   ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA,
   libjpeg-turbo on the CPU). A batch that fails is decoded picture by picture;
   a picture that fails there falls back to the CPU (PIL), and one that does
   not decode at all follows the shared bad-picture policy, per picture.
3. Pictures of one size are resized and cropped together as uint8 tensors on
   the device (:meth:`~skproduct.backbones.Preprocessing.geometry`, the very
   steps of the PIL path, run by torchvision on tensors: antialiased
   resizing, so the numbers differ slightly from PIL's), normalised, made
   channels-last and, for bf16 or fp16, cast to that dtype.
4. The forward of batch *k* is launched before the outputs of batch *k - 1*
   are copied back, so that host and device overlap; a batch that runs out of
   device memory is split in two and retried (down to one picture).

The same ``(positions, outputs, used, decoded)`` batches as
:func:`~skproduct.image_pipeline.data.run_module`; on the CPU everything runs
too (torchvision decodes there), which is how the tests exercise it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..exceptions import ImageDecodeError
from ..images import BadImagePolicy, picture_content
from .data import CompactRefs, warn_bad_pictures
from .device import autocast_dtype
from .worker_signals import WorkerLoader

logger = logging.getLogger(__name__)

__all__ = ["DECODE_CHOICES", "EncodedDataset", "decode_on_device", "jpeg_layout", "resolve_decode",
           "run_device_decoded", "to_network_input"]

DECODE_CHOICES = ("cpu", "device", "auto")
_SOF_BASELINE = (0xC0, 0xC1)  # baseline and extended sequential Huffman
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic


def resolve_decode(decode: str, device) -> str:
    """``"device"`` or ``"cpu"`` for the ``decode`` parameter: ``"auto"`` is ``"device"`` on CUDA only.

    Examples
    --------
    >>> import torch
    >>> resolve_decode("auto", torch.device("cpu")), resolve_decode("device", torch.device("cpu"))
    ('cpu', 'device')
    """
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {DECODE_CHOICES}, got {decode!r}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return decode


def jpeg_layout(data: bytes) -> str:
    """What kind of picture ``data`` holds, as far as the device decoder cares.

    ``"baseline"`` (a sequential JPEG with 1 or 3 components: the device
    decodes it), ``"progressive"``, ``"cmyk"`` (4 components), ``"other"``
    (another JPEG process, or a header that cannot be read), or
    ``"not-jpeg"``. Only the header is read.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> def jpeg(**kw):
    ...     buffer = io.BytesIO()
    ...     Image.new(kw.pop("mode", "RGB"), (16, 16)).save(buffer, "JPEG", **kw)
    ...     return buffer.getvalue()
    >>> jpeg_layout(jpeg()), jpeg_layout(jpeg(progressive=True)), jpeg_layout(jpeg(mode="CMYK"))
    ('baseline', 'progressive', 'cmyk')
    >>> jpeg_layout(b"\\x89PNG\\r\\n")
    'not-jpeg'
    """
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return "not-jpeg"
    at = 2
    while at + 4 <= len(view):
        if view[at] != 0xFF:
            return "other"
        marker = view[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        length = (view[at + 2] << 8) | view[at + 3]
        if marker in _SOF_BASELINE or marker == 0xC2 or marker in _SOF_OTHER:
            if at + 10 > len(view):
                return "other"
            components = view[at + 9]
            if marker == 0xC2:
                return "progressive"
            if marker in _SOF_OTHER:
                return "other"
            if components == 4:
                return "cmyk"
            return "baseline" if components in (1, 3) else "other"
        if marker in (0xDA, 0xD9):  # start of scan or end of image before any frame header
            return "other"
        at += 2 + length
    return "other"


def _encoded(ref) -> bool:
    import os

    from ..io.bson_refs import BsonImageRef

    return isinstance(ref, (bytes, bytearray, memoryview, str, os.PathLike, BsonImageRef)) or hasattr(ref, "read_bytes")


def _pixels(image) -> torch.Tensor:
    """A PIL RGB image as a uint8 ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EncodedDataset(Dataset):
    """Pictures by position as encoded JPEG bytes for the device, or as pixels decoded on the CPU.

    Items are ``(i, kind, tensor, used, decoded)``: ``kind`` is ``"jpeg"``
    (``tensor`` holds the file's bytes, for the device decoder), ``"pixels"``
    (decoded on the CPU here, under the bad-picture policy: formats the device
    does not take, or a ``"blank"`` stand-in) or ``"none"`` (skipped by the
    policy). Picklable, for DataLoader workers.
    """

    def __init__(self, refs: list, on_error: str, input_size: tuple[int, int], compact: bool = False):
        self.refs = CompactRefs.pack(refs) if compact else refs
        self.policy = BadImagePolicy(on_error, blank_size=tuple(input_size)[::-1])

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        ref = self.refs[i]
        if _encoded(ref):
            try:
                data = picture_content(ref)
            except ImageDecodeError:
                data = None  # unreadable: the policy below names it and decides
            if data is not None and jpeg_layout(data) == "baseline":
                return i, "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), True, True
        return (i, *cpu_fallback(self.policy, ref))


def cpu_fallback(policy: BadImagePolicy, ref) -> tuple[str, torch.Tensor | None, bool, bool]:
    """``(kind, pixels, used, decoded)`` of one picture decoded on the CPU (PIL) under ``policy``."""
    failed_before = policy.n_failed
    image = policy.load(ref, draft_size=None)  # full size, as the device decodes: the geometry is the same
    decoded = policy.n_failed == failed_before
    if image is None:
        return "none", None, False, False
    return "pixels", _pixels(image), True, decoded


def decode_on_device(datas: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors on ``device`` in one call; a failing batch picture by picture (``None`` if it fails).

    Examples
    --------
    >>> import io, torch
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (20, 10), (255, 0, 0)).save(buffer, "JPEG")
    >>> good = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    >>> bad = torch.frombuffer(bytearray(b"\\xff\\xd8 truncated"), dtype=torch.uint8)
    >>> [None if x is None else tuple(x.shape) for x in decode_on_device([good, bad], torch.device("cpu"))]
    [(3, 10, 20), None]
    """
    if not datas:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 announces that torchcodec will take over its decoders; its decode_jpeg is what a bare
        # GPU machine has
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            pass
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out


def to_network_input(images: list[torch.Tensor], preprocessing, device, dtype=None) -> torch.Tensor:
    """uint8 ``(3, H, W)`` pictures to the normalised ``(N, 3, h, w)`` channels-last input, on ``device``.

    Pictures of one size are resized and cropped together; ``dtype`` (bf16,
    fp16) is the dtype of the result, float32 by default.

    Examples
    --------
    >>> import torch
    >>> from skproduct.backbones import Preprocessing
    >>> pre = Preprocessing(16, 18, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    >>> pictures = [torch.full((3, 20, 30), 255, dtype=torch.uint8), torch.zeros(3, 40, 40, dtype=torch.uint8)]
    >>> x = to_network_input(pictures, pre, torch.device("cpu"))
    >>> tuple(x.shape), x[0].max().item(), x[1].min().item()
    ((2, 3, 16, 16), 1.0, -1.0)
    """
    height, width = preprocessing.input_size
    out = torch.empty(len(images), 3, height, width, device=device, dtype=torch.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(k)
    steps = preprocessing.geometry()
    for members in groups.values():
        x = torch.stack([images[k].to(device, non_blocking=True) for k in members])
        for step in steps:
            x = step(x)
        out[torch.as_tensor(members, device=device)] = x.float()
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255.0
    out = ((out - mean) / std).contiguous(memory_format=torch.channels_last)
    return out if dtype is None else out.to(dtype)


def _as_list(batch: list) -> list:
    return batch


def _forward(module, pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return module(pixels)


class _Batches:
    """Decode, preprocess and run one loader batch on the device; split and retry when the device runs out."""

    def __init__(self, module, refs, preprocessing, device, precision: str, on_error: str):
        self.module, self.refs, self.preprocessing = module, refs, preprocessing
        self.device, self.dtype = device, autocast_dtype(precision)
        self.policy = BadImagePolicy(on_error, blank_size=tuple(preprocessing.input_size)[::-1])
        self.n_split = 0

    def __call__(self, items: list) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """``(outputs on the device, positions, used, decoded)`` of ``items`` in their order."""
        try:
            return self._run(items)
        except torch.OutOfMemoryError:
            if len(items) == 1:
                raise
            self.n_split += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(items) // 2
            logger.warning("the device ran out of memory on a batch of %d pictures: retrying it in two halves",
                           len(items))
            first, second = self(items[:half]), self(items[half:])
            return (torch.cat([first[0], second[0]]), *(np.concatenate([a, b]) for a, b in zip(first[1:], second[1:])))

    def _run(self, items: list):
        positions = np.array([item[0] for item in items], dtype=np.int64)
        used = np.array([item[3] for item in items], dtype=bool)
        decoded = np.array([item[4] for item in items], dtype=bool)
        pictures: list[torch.Tensor | None] = [None] * len(items)
        jpegs = [k for k, item in enumerate(items) if item[1] == "jpeg"]
        for k, image in zip(jpegs, decode_on_device([items[k][2] for k in jpegs], self.device)):
            if image is None:  # the device decoder refused it: the CPU path, then the bad-picture policy
                kind, image, used[k], decoded[k] = cpu_fallback(self.policy, self.refs[int(positions[k])])
            pictures[k] = image
        for k, item in enumerate(items):
            if item[1] == "pixels":
                pictures[k] = item[2]
        height, width = self.preprocessing.input_size
        present = [k for k, p in enumerate(pictures) if p is not None]
        pixels = None if len(present) == len(items) else torch.zeros(
            len(items), 3, height, width, device=self.device, dtype=self.dtype or torch.float32
        ).contiguous(memory_format=torch.channels_last)
        if len(present) == len(items):
            pixels = to_network_input(pictures, self.preprocessing, self.device, self.dtype)
        elif present:
            pixels[torch.as_tensor(present, device=self.device)] = to_network_input(
                [pictures[k] for k in present], self.preprocessing, self.device, self.dtype)
        out = _forward(self.module, pixels, self.device, self.dtype).float()
        out = out * torch.as_tensor(used, device=out.device)[:, None]
        return out, positions, used, decoded


def run_device_decoded(
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
    """Run ``module`` over ``refs`` decoded on ``device``; yield ``(positions, outputs, used, decoded)`` in order.

    The device-decoding counterpart of
    :func:`~skproduct.image_pipeline.data.run_module`, with the same
    arguments and batches (outputs float32 numpy, zeros for skipped pictures).

    Examples
    --------
    >>> import io, torch
    >>> from PIL import Image
    >>> from skproduct.backbones import Preprocessing
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "JPEG")
    >>> pre = Preprocessing(16, 18, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    >>> module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    >>> [(p.tolist(), out.shape) for p, out, _, _ in run_device_decoded(
    ...     module, [buffer.getvalue()] * 3, pre, batch_size=2, num_workers=0, device=torch.device("cpu"),
    ...     precision="fp32", on_error="raise")]
    [([0, 1], (2, 3)), ([2], (1, 3))]
    """
    from tqdm.auto import tqdm

    dataset = EncodedDataset(refs, on_error, preprocessing.input_size, compact=num_workers > 0)
    loader = WorkerLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    run = _Batches(module, refs, preprocessing, device, precision, on_error)
    progress = tqdm(total=len(refs), unit="img", disable=not verbose, desc=desc)
    n_bad = 0
    pending = None
    with torch.inference_mode(), progress:
        for items in loader:
            out, positions, used, decoded = run(items)
            if device.type == "cuda":  # copy back without waiting; the next batch is launched before it is read
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                out = (host, event)
            if pending is not None:
                yield _finish(pending)
            pending = (positions, out, used, decoded)
            n_bad += int((~decoded).sum())
            progress.update(len(positions))
        if pending is not None:
            yield _finish(pending)
    warn_bad_pictures(n_bad, len(dataset), on_error, stacklevel=3)


def _finish(pending) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    positions, out, used, decoded = pending
    if isinstance(out, tuple):
        host, event = out
        event.synchronize()
        return positions, host.numpy(), used, decoded
    return positions, out.cpu().numpy(), used, decoded
