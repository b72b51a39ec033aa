"""Fine-tuning checkpoints: what names one (a pure function of parameters, data and starting weights) and how
it is written and read (atomically, with a format version and a checksum, the last two kept).

A checkpoint is an ordinary ``torch.save`` file (a zip archive) whose archive
comment holds the SHA-256 of the file as torch wrote it: ``torch.load`` (and
any zip reader) still reads it, and :func:`load_checkpoint` verifies it before
unpickling anything. :class:`~skproduct._training.Checkpoint` keeps the last
two: before writing ``name.pt`` it renames the one there (when it verifies) to
``name.prev.pt``; :func:`load_latest_checkpoint` reads the newest good one and
says with a :class:`~skproduct.exceptions.StaleFileWarning` what it passed over.

Imported when a checkpoint is written or read; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .cache import EmbeddingCache
from .exceptions import ImageDecodeError, StaleFileWarning
from .images import describe_image_ref, picture_content

logger = logging.getLogger(__name__)

__all__ = [
    "DamagedCheckpointError",
    "checkpoint_name",
    "cpu_state",
    "keep_as_previous",
    "load_checkpoint",
    "load_latest_checkpoint",
    "previous_checkpoint_path",
    "save_checkpoint",
    "usable_checkpoint",
    "verify_checkpoint",
]

# The archive comment of a checkpoint: this marker, then the SHA-256 of the file as torch.save wrote it (whose
# end-of-central-directory record then ends with a comment length of zero).
_CHECKSUM_MARKER = b"skproduct-sha256-v1:"
_COMMENT_LENGTH = len(_CHECKSUM_MARKER) + hashlib.sha256().digest_size
_END_OF_DIRECTORY = b"PK\x05\x06"
_END_OF_DIRECTORY_BYTES = 22  # the record's fixed size, comment length included
_NO_COMMENT = b"\x00\x00"
_CHUNK = 1 << 20
_PREVIOUS = ".prev"


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


class DamagedCheckpointError(ValueError):
    """A checkpoint file is empty, cut short, altered after it was written, or carries no checksum."""


class _NoChecksum(DamagedCheckpointError):
    """The file does not end with skproduct's checksum: cut short, or written by an older skproduct."""


class _HashingWriter:
    """A write-only file object for ``torch.save`` that hashes what it passes on and keeps the last bytes."""

    def __init__(self, f):
        self._f, self.digest, self.tail, self.size = f, hashlib.sha256(), b"", 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")  # no copy of a tensor's bytes
        self.digest.update(view)
        self.tail = (self.tail + bytes(view[-_END_OF_DIRECTORY_BYTES:]))[-_END_OF_DIRECTORY_BYTES:]
        self.size += len(view)
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` with ``torch.save`` to ``path`` atomically, with its checksum in the archive comment.

    The file is written to a temporary file, synced and renamed (see
    :func:`~skproduct._files.atomic_write`); its zip archive comment holds the
    SHA-256 of the bytes torch wrote, so that :func:`verify_checkpoint` can tell
    a whole file from a damaged one while ``torch.load`` still reads it as it is.

    Parameters
    ----------
    path : path-like
        The file to write (its folder is made when missing).
    payload : dict
        Tensors and plain Python values (what ``torch.load(weights_only=True)`` reads back).

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "c.pt"
    >>> save_checkpoint(path, {"format": 2, "w": torch.ones(2)})
    >>> verify_checkpoint(path), torch.load(path, weights_only=True)["w"].tolist()
    (None, [1.0, 1.0])
    """
    import torch

    from ._files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        writer = _HashingWriter(f)
        torch.save(payload, writer)
        if not (writer.tail.startswith(_END_OF_DIRECTORY) and writer.tail.endswith(_NO_COMMENT)):
            raise RuntimeError(
                "torch.save did not end the checkpoint with a zip end-of-central-directory record without a "
                f"comment (torch {torch.__version__}): skproduct cannot add its checksum to {path}"
            )
        f.seek(writer.size - len(_NO_COMMENT))
        f.write(struct.pack("<H", _COMMENT_LENGTH) + _CHECKSUM_MARKER + writer.digest.digest())


def verify_checkpoint(path: Path) -> None:
    """Check that ``path`` is a whole checkpoint as :func:`save_checkpoint` wrote it (one pass over the file).

    Raises
    ------
    DamagedCheckpointError
        The file is empty, cut short, carries no skproduct checksum (written by
        an older skproduct, or by something else) or its content does not
        match its checksum (bytes changed after it was written).
    OSError
        The file cannot be read.
    """
    from ._files import resolve_file_target

    target = resolve_file_target(path)  # a FIFO or a folder is refused, never opened
    size = os.path.getsize(target)
    if size == 0:
        raise DamagedCheckpointError("the file is empty")
    trailer = len(_NO_COMMENT) + _COMMENT_LENGTH
    if size < _END_OF_DIRECTORY_BYTES + _COMMENT_LENGTH:
        raise DamagedCheckpointError(f"the file has only {size} bytes: it was cut short")
    with open(target, "rb") as f:
        f.seek(size - trailer)
        tail = f.read(trailer)
        expected_length = struct.pack("<H", _COMMENT_LENGTH)
        if tail[: len(_NO_COMMENT)] != expected_length or not tail[len(_NO_COMMENT):].startswith(_CHECKSUM_MARKER):
            raise _NoChecksum(
                "it carries no skproduct checksum at its end: it was cut short, or written by an older skproduct"
            )
        digest = hashlib.sha256()
        f.seek(0)
        left = size - trailer
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise DamagedCheckpointError("the file shrank while it was read")
            digest.update(chunk)
            left -= len(chunk)
        digest.update(_NO_COMMENT)
    if digest.digest() != tail[-digest.digest_size:]:
        raise DamagedCheckpointError("its content does not match its checksum: bytes changed after it was written")


def load_checkpoint(path: Path, format_version: int) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only), verified first.

    Parameters
    ----------
    path : path-like
        The checkpoint.
    format_version : int
        The payload format this skproduct reads
        (:data:`~skproduct._training.CHECKPOINT_FORMAT`).

    Returns
    -------
    dict
        The payload.

    Raises
    ------
    DamagedCheckpointError
        The file does not verify (see :func:`verify_checkpoint`); nothing was unpickled.
    ValueError
        A readable checkpoint of another ``format`` (from another version of
        skproduct, with or without a checksum): refused with an error that
        names it and says what to do, never treated as damage.
    """
    import torch

    path = Path(path)
    try:
        verify_checkpoint(path)
    except _NoChecksum:
        found = _format_of_unverified(path)  # another version's checkpoint is told apart from a cut-short file
        if found is not None and found != format_version:
            raise _format_error(path, found, format_version) from None
        raise
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # verified but unreadable: written by a torch that this one cannot read
        raise DamagedCheckpointError(f"torch cannot read it ({type(exc).__name__}: {exc})") from exc
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != format_version:
        raise _format_error(path, found, format_version)
    return payload


def _format_of_unverified(path: Path):
    """The ``format`` of a checkpoint that carries no checksum, when torch reads it whole; ``None`` otherwise."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # cut short, empty, garbage: damage, which the caller reports
        return None
    return payload.get("format", "missing") if isinstance(payload, dict) else "missing"


def _format_error(path: Path, found, format_version: int) -> ValueError:
    return ValueError(
        f"{path} is a checkpoint of format {found!r}, and this skproduct reads format {format_version}: "
        "remove it (or the checkpoint folder) to train from the start"
    )


def previous_checkpoint_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``name.pt`` -> ``name.prev.pt``.

    Examples
    --------
    >>> previous_checkpoint_path(Path("ckpt/finetune-ab12.pt")).name
    'finetune-ab12.prev.pt'
    """
    path = Path(path)
    return path.with_name(path.stem + _PREVIOUS + path.suffix)


def keep_as_previous(path: Path) -> None:
    """Rename the checkpoint at ``path`` to :func:`previous_checkpoint_path` before a new one is written there.

    The rename is atomic (:func:`os.replace` in one folder; the folder is
    synced when the new checkpoint is written), so that at any moment the
    folder holds the last checkpoint, the one before it, or both. A file at
    ``path`` that does not verify is left to be overwritten: a damaged
    checkpoint never replaces a good previous one.
    """
    from ._files import resolve_file_target

    path = Path(path)
    if not path.exists():
        return
    try:
        verify_checkpoint(path)
    except (DamagedCheckpointError, OSError) as exc:
        logger.info("not keeping %s as the previous checkpoint: %s", path, exc)
        return
    os.replace(resolve_file_target(path), resolve_file_target(previous_checkpoint_path(path)))


def usable_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint of ``path`` and its previous one that verifies (no warning, nothing unpickled).

    For a caller that must decide before training whether a resume will
    happen (to skip downloading starting weights that a checkpoint replaces).

    Examples
    --------
    >>> import tempfile
    >>> usable_checkpoint(Path(tempfile.mkdtemp()) / "none.pt") is None
    True
    """
    for candidate in (Path(path), previous_checkpoint_path(path)):
        try:
            verify_checkpoint(candidate)
        except (DamagedCheckpointError, OSError, ValueError):
            continue
        return candidate
    return None


def load_latest_checkpoint(path: Path, format_version: int) -> dict | None:
    """The payload of the newest good checkpoint: ``path``, else the previous one; ``None`` to start afresh.

    A damaged checkpoint (see :func:`verify_checkpoint`) is passed over with
    a :class:`~skproduct.exceptions.StaleFileWarning` that names it and says
    why, and the previous one is used; when none is good, the warning says
    that training restarts from the first epoch (the damaged files are
    overwritten by the new checkpoints). A missing ``path`` beside a good
    previous checkpoint (a run killed between the rename and the write) is
    resumed from quietly: nothing was damaged.

    Parameters
    ----------
    path : path-like
        The newest checkpoint's path (``name.pt``).
    format_version : int
        Passed to :func:`load_checkpoint`.

    Returns
    -------
    dict or None

    Raises
    ------
    ValueError
        A checkpoint of another format (see :func:`load_checkpoint`).
    """
    path = Path(path)
    previous = previous_checkpoint_path(path)
    passed_over = []
    for candidate in (path, previous):
        if not candidate.exists() and not candidate.is_symlink():
            continue
        try:
            payload = load_checkpoint(candidate, format_version)
        except DamagedCheckpointError as exc:
            passed_over.append(f"{candidate} is damaged ({exc})")
            continue
        except OSError as exc:
            passed_over.append(f"{candidate} cannot be read ({exc})")
            continue
        if passed_over:
            warnings.warn(f"the checkpoint {'; '.join(passed_over)}; resuming from the previous one, {candidate}",
                          StaleFileWarning, stacklevel=3)
        return payload
    if passed_over:
        warnings.warn(f"the checkpoint {' and '.join(passed_over)}: no good checkpoint is left, so training "
                      "restarts from the first epoch", StaleFileWarning, stacklevel=3)
    return None
