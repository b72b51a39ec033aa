"""Fine-tuning checkpoints: what names one (a pure function of parameters, data and starting weights) and how
it is written and read (atomically, with a format version).

Imported when a checkpoint is written or read; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .cache import EmbeddingCache
from .exceptions import ImageDecodeError
from .images import describe_image_ref, picture_content

__all__ = ["checkpoint_name", "cpu_state", "load_checkpoint", "save_checkpoint"]


def checkpoint_name(
    params: Mapping[str, str], refs: Iterable, owner: np.ndarray, labels: Iterable, start_weights=None
) -> str:
    """The file name of a fit's checkpoint: a hash of its parameters, its data and the weights it starts from.

    ``params`` maps parameter names to stable strings (the caller turns trees
    and weight files into content hashes); the images are named by path,
    size and modification time (a BSON image's offset and length too), or by
    content when they live in memory; ``start_weights`` is the state dict a
    warm start begins from. Two fits share a name only when all of these agree.

    Examples
    --------
    >>> import numpy as np
    >>> a = checkpoint_name({"lr": "0.1"}, [b"x"], np.array([0]), ["cat"])
    >>> a == checkpoint_name({"lr": "0.2"}, [b"x"], np.array([0]), ["cat"]), a.startswith("finetune-")
    (False, True)
    """
    digest = hashlib.sha256(json.dumps(dict(params), sort_keys=True).encode())
    stats: dict = {}
    for ref in refs:  # streamed: files are named by path, size and time, never read here
        digest.update(_image_identity(ref, stats))
    digest.update(np.asarray(owner, dtype=np.int64).tobytes())
    digest.update(json.dumps([str(v) for v in labels]).encode())
    if start_weights is not None:
        for name, value in start_weights.items():
            digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return f"finetune-{digest.hexdigest()[:24]}.pt"


def _image_identity(ref, stats: dict) -> bytes:
    """What names an image in a checkpoint's name: a file's path, size and modification time (a BSON image's
    offset and length too), or an in-memory image's content hash."""
    path = getattr(ref, "path", ref) if not isinstance(ref, (bytes, bytearray, memoryview)) else None
    if isinstance(path, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(path))
        if path not in stats:
            try:
                stat = os.stat(path)
                stats[path] = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                stats[path] = "missing"  # the bad-image policy deals with it in training
        where = f":{ref.offset}:{ref.length}" if hasattr(ref, "offset") else ""
        return f"{path}:{stats[path]}{where}\n".encode()
    try:
        return EmbeddingCache.keys_for([picture_content(ref)])[0]
    except ImageDecodeError:
        return f"unreadable:{describe_image_ref(ref)}".encode()


def cpu_state(module) -> dict:
    """A copy of a torch module's state dict on the CPU."""
    return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` with ``torch.save`` to ``path`` atomically (a temporary file, synced, renamed)."""
    import torch

    from ._files import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(path)) as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, format_version: int) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only).

    A file of another ``format`` is refused with an error that names it and says what to do.
    """
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != format_version:
        raise ValueError(
            f"{path} is a checkpoint of format {found!r}, and this skproduct reads format {format_version}: "
            "remove it (or the checkpoint folder) to train from the start"
        )
    return payload
