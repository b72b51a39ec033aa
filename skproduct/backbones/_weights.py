"""Local weights files: their SHA-256 (remembered per path, size and mtime) and loading them into a module."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the process's life.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "w.pt")
    ...     _ = open(path, "wb").write(b"abc")
    ...     file_sha256(path)[:12]
    'ba7816bf8f01'
    """
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


def load_weights_file(module: Any, path: str | os.PathLike, name: str, prefix: str | None = None) -> None:
    """Load a local checkpoint into ``module``, ignoring classifier weights the module does not have.

    Accepts a plain state dict or one nested under ``"state_dict"`` or
    ``"model"``. With ``prefix`` (``"visual."`` for a CLIP image tower), keys
    under it are taken without it when the file has any.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file does not fit the architecture; the message names missing parameters.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> source, target = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "linear.pt")
    ...     torch.save({"state_dict": source.state_dict()}, path)
    ...     load_weights_file(target, path, "a linear layer")
    >>> torch.equal(source.weight, target.weight)
    True
    """
    import torch

    file_sha256(path)  # a clear error for a missing file
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...) for a non-weights file
        raise ValueError(
            f"the weights file {os.fspath(path)!r} is not a torch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}): pass a state dict saved with torch.save"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(
            f"the weights file {os.fspath(path)!r} holds a {type(state).__name__}, not a state dict: pass a file "
            "saved with torch.save(model.state_dict(), path)"
        )
    if prefix is not None and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # What load_state_dict itself fills in: BatchNorm's step counters, which many exported checkpoints drop.
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(usable) - optional)
    if missing:
        raise ValueError(
            f"the weights file {os.fspath(path)!r} does not fit {name}: {len(missing)} parameters are missing or "
            f"of another shape, for example {missing[:3]}"
        )
    result = module.load_state_dict(usable, strict=False)
    unexpected_missing = sorted(set(result.missing_keys) - optional)
    if unexpected_missing:  # cannot happen after the check above; a guard against a silent partial load
        raise ValueError(f"the weights file {os.fspath(path)!r} left {unexpected_missing[:3]} of {name} unset")
    logger.debug("loaded %d tensors from %s into %s", len(usable), os.fspath(path), name)
