"""Write files atomically: a reader, or a process killed mid-way, never sees half a file.

:func:`atomic_write` is the one way skproduct writes a file that another run
may read (cache segments, BSON sidecar indexes, checkpoints, saved models). It
renames only over a regular file or over nothing: a symbolic link is followed
(its target is rewritten, the link stays), and a folder, FIFO, device or socket
is refused before anything is written.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

__all__ = ["atomic_write", "resolve_file_target", "temporary_pattern"]

TEMPORARY_SUFFIX = ".tmp"
_WRITE_MODES = ("wb", "w", "wt")
_NAME_KEPT = 200  # characters of the target's name kept in the temporary's: stays under the usual 255 limit
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def resolve_file_target(path: str | os.PathLike) -> Path:
    """Return the file that writing ``path`` replaces, after checking that it is a regular file or nothing.

    A symbolic link is followed to its final target (which may not exist yet),
    so that the link itself survives the write.

    Parameters
    ----------
    path : str or path-like
        Where the caller wants to write.

    Returns
    -------
    pathlib.Path
        The absolute path of the file to write, symbolic links resolved.

    Raises
    ------
    IsADirectoryError
        ``path`` (or what it links to) is a folder.
    ValueError
        ``path`` (or what it links to) is a FIFO, a socket or a device.

    Examples
    --------
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> os.symlink(os.path.join(folder, "real.bin"), os.path.join(folder, "link.bin"))
    >>> resolve_file_target(os.path.join(folder, "link.bin")).name
    'real.bin'
    >>> resolve_file_target(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    IsADirectoryError: ... is a folder, not a regular file: pass a file path
    """
    given = os.fspath(path)
    target = Path(os.path.realpath(given))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    shown = given if os.path.abspath(given) == str(target) else f"{given} (a link to {target})"
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{shown} is a folder, not a regular file: pass a file path")
    for is_kind, kind in _KINDS:
        if is_kind(mode):
            raise ValueError(f"{shown} is {kind}, not a regular file: pass a file path")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{shown} is not a regular file: pass a file path")
    return target


def temporary_pattern(target_name: str = "*") -> str:
    """The glob pattern of the temporary files :func:`atomic_write` makes for ``target_name``.

    A temporary file sits in the target's folder as
    ``.<target name>.<pid>.<random>.tmp``; a killed process leaves it behind,
    and housekeeping (:meth:`~skproduct.EmbeddingCache.prune`) finds it with
    this pattern.

    Examples
    --------
    >>> temporary_pattern("*.skemb")
    '.*.skemb.*.tmp'
    """
    return f".{target_name}.*{TEMPORARY_SUFFIX}"


@contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    permissions: int | None = None,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without an error.

    The temporary file is made in the target's folder (so the rename stays on
    one file system) under a hidden name with the process id and a random
    suffix (see :func:`temporary_pattern`). When the block ends, the file is
    flushed and synced to disk, renamed over the target with
    :func:`os.replace`, and the folder is synced too where the operating system
    allows it, so that the rename itself survives a power cut. When the block
    raises (including ``KeyboardInterrupt``), the temporary file is removed and
    the target is left as it was.

    Parameters
    ----------
    path : str or path-like
        The file to write. Its folder must exist. A symbolic link is followed:
        its target is replaced and the link kept.
    mode : {"wb", "w", "wt"}, default="wb"
        Binary or text.
    permissions : int, optional
        The file's permission bits (for example ``0o644`` for a file every
        user may read, whatever the umask). By default those of the file it
        replaces, or for a new file those :func:`open` would give (``0o666``
        less the umask).
    encoding, newline : str, optional
        For text mode, as in :func:`open`.

    Yields
    ------
    file object
        The open temporary file (its ``name`` is the temporary's path). Write
        to it; do not close it.

    Raises
    ------
    IsADirectoryError
        ``path`` is a folder; nothing is written.
    ValueError
        ``path`` is a FIFO, a socket or a device, or ``mode`` is not a write
        mode; nothing is written.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.bin")
    >>> with atomic_write(path) as f:
    ...     _ = f.write(b"weights")
    >>> open(path, "rb").read()
    b'weights'
    >>> with atomic_write(path) as f:
    ...     _ = f.write(b"half")
    ...     raise RuntimeError("interrupted")
    Traceback (most recent call last):
    ...
    RuntimeError: interrupted
    >>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
    (b'weights', ['model.bin'])
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"mode must be one of {_WRITE_MODES}, got {mode!r}")
    target = resolve_file_target(path)
    if permissions is None and target.exists():
        permissions = stat.S_IMODE(os.stat(target).st_mode)
    temporary = target.with_name(
        f".{target.name[:_NAME_KEPT]}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    )
    try:
        with open(temporary, mode, encoding=encoding, newline=newline, opener=_create) as f:
            if permissions is not None:
                os.chmod(temporary, permissions)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)


def _create(path: str, flags: int) -> int:
    """Open a new file only (never an existing one), with the permissions :func:`open` gives (0o666 less the umask)."""
    return os.open(path, _CREATE_FLAGS, 0o666)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; Windows cannot open a folder, and some file systems refuse."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        logger.debug("cannot open the folder %s to sync it: %s", folder, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        logger.debug("cannot sync the folder %s: %s", folder, exc)
    finally:
        os.close(fd)
