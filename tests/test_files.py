"""atomic_write: all or nothing, synced, through symbolic links, and never over a folder, FIFO or device."""

from __future__ import annotations

import os
import stat

import pytest

from skproduct import _files
from skproduct._files import atomic_write, resolve_file_target, temporary_pattern


def _names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_writes_a_new_file_and_replaces_an_old_one(tmp_path):
    path = tmp_path / "model.bin"
    with atomic_write(path) as f:
        f.write(b"first")
    with atomic_write(str(path)) as f:
        f.write(b"second")
    assert path.read_bytes() == b"second"
    assert _names(tmp_path) == ["model.bin"]


def test_text_mode(tmp_path):
    path = tmp_path / "scores.json"
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("é\n")
    assert path.read_bytes() == "é\n".encode()


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, interruption):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    seen = []
    with pytest.raises(type(interruption)), atomic_write(path) as f:
        f.write(b"half of the new")
        f.flush()
        seen.append(_names(tmp_path))
        raise interruption
    assert len(seen[0]) == 2 and any(name.startswith(".model.bin.") for name in seen[0])  # it wrote beside
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["model.bin"]


def test_the_temporary_is_hidden_beside_the_target_and_matches_the_pattern(tmp_path):
    path = tmp_path / "seg.skemb"
    with atomic_write(path) as f:
        temporary = os.path.basename(f.name)
        assert list(tmp_path.glob(temporary_pattern("*.skemb"))) == [tmp_path / temporary]
    assert temporary.startswith(".seg.skemb.") and f".{os.getpid()}." in temporary and temporary.endswith(".tmp")


def test_file_and_folder_are_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(_files.os, "fsync", fsync)
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"x")
    assert synced[0] is False  # the file, before the rename
    if os.name == "posix":
        assert synced[1:] == [True]  # then its folder, after the rename


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.bin"
    target.write_bytes(b"old")
    link = tmp_path / "model.bin"
    link.symlink_to(target)
    with atomic_write(link) as f:
        f.write(b"new")
    assert link.is_symlink() and link.resolve() == target
    assert target.read_bytes() == b"new"
    assert _names(tmp_path / "real") == ["model.bin"] and _names(tmp_path) == ["model.bin", "real"]


def test_a_dangling_link_makes_its_target(tmp_path):
    link = tmp_path / "model.bin"
    link.symlink_to(tmp_path / "made.bin")
    with atomic_write(link) as f:
        f.write(b"new")
    assert link.is_symlink() and (tmp_path / "made.bin").read_bytes() == b"new"


def test_a_folder_is_refused_before_writing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    refused = r"out is a folder, not a regular file: pass a file path"
    with pytest.raises(IsADirectoryError, match=refused), atomic_write(folder) as f:
        f.write(b"never")
    assert _names(tmp_path) == ["out"] and _names(folder) == []
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(IsADirectoryError, match=r"link \(a link to .*out\) is a folder"):
        resolve_file_target(tmp_path / "link")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_is_refused_before_writing(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused = r"pipe is a FIFO, not a regular file: pass a file path"
    with pytest.raises(ValueError, match=refused), atomic_write(fifo) as f:
        f.write(b"never")
    (tmp_path / "link").symlink_to(fifo)
    with pytest.raises(ValueError, match="a FIFO"), atomic_write(tmp_path / "link") as f:
        f.write(b"never")
    assert _names(tmp_path) == ["link", "pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_permissions(tmp_path):
    old_umask = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "shared.bin", permissions=0o644) as f:
            f.write(b"x")
        with atomic_write(tmp_path / "private.bin") as f:
            f.write(b"x")
        (tmp_path / "kept.bin").write_bytes(b"x")
        os.chmod(tmp_path / "kept.bin", 0o640)
        with atomic_write(tmp_path / "kept.bin") as f:
            f.write(b"y")
    finally:
        os.umask(old_umask)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("shared.bin", "private.bin", "kept.bin")}
    assert modes == {"shared.bin": 0o644, "private.bin": 0o600, "kept.bin": 0o640}


def test_bad_mode_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"), atomic_write(tmp_path / "a.bin", "ab"):
        pass
    with pytest.raises(FileNotFoundError), atomic_write(tmp_path / "nowhere" / "a.bin"):
        pass
    assert _names(tmp_path) == []
