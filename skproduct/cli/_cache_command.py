"""``skproduct cache verify|stats|prune|compact DIR``: the embedding cache's housekeeping on the command line.

Each action prints one line per result on stdout, then a summary line. Exit
codes: 0 when all is well; 1 when ``verify`` finds damage (with ``--repair``
too: the damage was dropped, and the pictures it held are computed again when
next needed), as ``fsck`` does for corrected errors; 2 for a mistake in the
call (a folder that does not exist, a size that is not a size, a cache that
cannot be written when it must be), reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from . import CommandError

__all__ = ["EXIT_DAMAGED", "add_cache_command", "parse_size"]

EXIT_DAMAGED = 1
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """A size in bytes from ``"500M"``, ``"10G"``, ``"1.5GiB"`` or ``"123"`` (k, M, G, T are powers of 1000).

    Examples
    --------
    >>> parse_size("1.5G"), parse_size("64KiB"), parse_size("0")
    (1500000000, 65536, 0)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write it as 500M, 10G, 1.5GiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def add_cache_command(commands, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``skproduct cache`` and its actions to the ``skproduct`` subparsers.

    Parameters
    ----------
    commands : argparse subparsers action
        The ``skproduct`` command's subparsers.
    add_command : callable
        ``_parser._add_command``: makes a subparser with the shared output options.
    """
    parser = commands.add_parser(
        "cache", help="check, inspect, prune or compact an embedding cache",
        description="""Housekeeping of an embedding cache folder (the --cache of 'extract', 'fit'...).

in short:
  verify DIR [--repair]        check every checksum; --repair drops damaged blocks
  stats DIR                    vectors, bytes and segments per backbone (cheap: no checksums)
  prune DIR --max-bytes SIZE   delete the least recently written backbones' vectors
  compact DIR                  merge each backbone's segments into one file

exit codes: 0 all is well; 1 'verify' found damage (dropped with --repair);
2 a mistake in the call.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(title="actions", dest="cache_action", required=True, metavar="ACTION")

    verify = add_command(
        actions, "verify", "check every checksum of the cache (exit 1 on damage)",
        """Read every block of every segment and check its checksum. One line per
damaged segment (which blocks, how many vectors), per segment in the old format
(no checksums to check), then a summary. Exit code 1 when damage was found,
0 when the cache is clean.

--repair rewrites each damaged segment without its damaged blocks (atomically)
and deletes segments that cannot be read at all: their pictures are computed
again when next needed. The exit code is still 1, to say damage was found.""",
        [],
    )
    verify.add_argument("directory", metavar="DIR", help="the cache folder")
    verify.add_argument("--repair", action="store_true", help="drop the damaged blocks and segments")
    verify.set_defaults(run=run_cache_verify)

    stats = add_command(actions, "stats", "vectors, bytes and segments per backbone",
                        "One line per backbone fingerprint, then the totals. Checks no checksum: use 'verify'.", [])
    stats.add_argument("directory", metavar="DIR", help="the cache folder")
    stats.set_defaults(run=run_cache_stats)

    prune = add_command(
        actions, "prune", "shrink the cache to a size",
        "Delete the vectors of the least recently written backbones until the cache holds at most SIZE, and\n"
        "the temporary files of killed runs (older than an hour).", [],
    )
    prune.add_argument("directory", metavar="DIR", help="the cache folder")
    prune.add_argument("--max-bytes", type=parse_size, required=True, metavar="SIZE",
                       help="the most the cache may hold: 500M, 10G, 1.5GiB or bytes")
    prune.set_defaults(run=run_cache_prune)

    compact = add_command(
        actions, "compact", "merge each backbone's segments into one file",
        "Merge each backbone's segments into one file (checking every block, leaving damaged ones out, and\n"
        "rewriting segments of the old format with checksums). A backbone that another process is compacting\n"
        "is skipped, and said so.", [],
    )
    compact.add_argument("directory", metavar="DIR", help="the cache folder")
    compact.add_argument("--fingerprint", metavar="FP", help="only this backbone fingerprint (a sub-folder of DIR)")
    compact.set_defaults(run=run_cache_compact)


def _count(number: int, word: str) -> str:
    """``"1 segment"``, ``"3 segments"``."""
    return f"{number} {word}{'' if number == 1 else 's'}"


def _open(directory: str):
    from ..cache import EmbeddingCache

    path = Path(directory).expanduser()
    if not path.exists():
        raise CommandError(f"{directory}: no such folder: pass an embedding cache folder (the --cache of 'extract')")
    if not path.is_dir():
        raise CommandError(f"{directory} is not a folder: pass an embedding cache folder (the --cache of 'extract')")
    return EmbeddingCache(path)


def _unwritable(cache, action: str, exc: OSError) -> CommandError:
    return CommandError(f"cannot {action} the cache {cache.directory}: {exc.strerror or exc}")


def run_cache_verify(args: argparse.Namespace) -> None:
    """``skproduct cache verify DIR [--repair]``; raises :class:`SystemExit` with code 1 when it finds damage."""
    cache = _open(args.directory)
    try:
        report = cache.verify(repair=args.repair)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise _unwritable(cache, "repair", exc) from exc
    for entry in report["damaged"]:
        if entry["blocks"] is None:
            line = f"damaged: {entry['path']}: unusable ({entry['reason']})"
            if entry["repaired"]:
                line += "; deleted"
        else:
            blocks = ", ".join(str(block) for block in entry["blocks"])
            several = len(entry["blocks"]) > 1
            line = (f"damaged: {entry['path']}: block{'s' * several} {blocks} (of {entry['n_blocks']}, counted from "
                    f"0) fail{'' if several else 's'} the checksum ({_count(entry['vectors'], 'vector')})")
            if entry["repaired"]:
                line += "; dropped"
        print(line)
    for path in report["legacy"]:
        print(f"unchecked: {path}: format 1, without checksums ('skproduct cache compact' rewrites it with them)")
    for fingerprint in report["busy"]:
        print(f"busy: {fingerprint}: another process is compacting it; not repaired")
    checked = (f"{_count(report['segments'], 'segment')} ({_count(report['blocks'], 'block')}, "
               f"{_count(report['vectors'], 'vector')})")
    if report["clean"]:
        print(f"clean: {checked} in {cache.directory}")
        return
    lost = sum(entry["vectors"] or 0 for entry in report["damaged"])
    unusable = sum(entry["blocks"] is None for entry in report["damaged"])
    repaired = sum(entry["repaired"] for entry in report["damaged"])
    print(f"damaged: {len(report['damaged'])} of {checked} in {cache.directory}, {_count(lost, 'vector')} lost"
          + (f" (and {_count(unusable, 'unusable file')})" if unusable else "")
          + (f"; {repaired} repaired (their pictures are computed again when next needed)" if repaired else
             "; run 'skproduct cache verify --repair' to drop the damage"))
    raise SystemExit(EXIT_DAMAGED)


def run_cache_stats(args: argparse.Namespace) -> None:
    """``skproduct cache stats DIR``."""
    cache = _open(args.directory)
    rows = cache.summary()
    for row in rows:
        legacy = f", {row['legacy']} in format 1 (no checksums)" if row["legacy"] else ""
        print(f"{row['fingerprint']}: {_count(row['items'], 'vector')} of {row['dimension']} floats, "
              f"{_count(row['bytes'], 'byte')} in {_count(row['segments'], 'segment')}{legacy}")
    print(f"total: {_count(sum(r['items'] for r in rows), 'vector')}, {_count(sum(r['bytes'] for r in rows), 'byte')}"
          f", {_count(len(rows), 'fingerprint')} in {cache.directory}")


def run_cache_prune(args: argparse.Namespace) -> None:
    """``skproduct cache prune DIR --max-bytes SIZE``."""
    cache = _open(args.directory)
    try:
        freed = cache.prune(args.max_bytes)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise _unwritable(cache, "prune", exc) from exc
    print(f"freed {_count(freed, 'byte')}: {cache.directory} holds {_count(cache.stats()['bytes'], 'byte')} "
          f"(at most {args.max_bytes})")


def run_cache_compact(args: argparse.Namespace) -> None:
    """``skproduct cache compact DIR [--fingerprint FP]``."""
    from ..exceptions import CacheWriteWarning

    cache = _open(args.directory)
    name = args.fingerprint
    if name is not None and (not name or "/" in name or "\\" in name or name.startswith(".")):
        raise CommandError(f"--fingerprint {name!r} is not a usable fingerprint: pass the name of a sub-folder of "
                           f"{args.directory} ('skproduct cache stats' lists them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWriteWarning)  # said once below, as the error
        results = cache._compact_each(args.fingerprint)
    for result in results:
        if result.status == "merged":
            dropped = f", {_count(result.dropped_blocks, 'damaged block')} left out" if result.dropped_blocks else ""
            print(f"{result.fingerprint}: merged {result.segments} segments into one "
                  f"({_count(result.vectors, 'vector')}{dropped})")
        elif result.status == "busy":
            print(f"{result.fingerprint}: another process is compacting it; merged 0 segments")
        elif result.status == "nothing":
            print(f"{result.fingerprint}: nothing to merge ({_count(result.segments, 'segment')})")
    unwritable = [result for result in results if result.status == "unwritable"]
    if unwritable:
        raise CommandError(f"cannot compact the cache {cache.directory}: {unwritable[0].reason}")
    print(f"compacted {cache.directory}: {_count(sum(result.removed for result in results), 'segment')} removed")
