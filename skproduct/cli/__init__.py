"""The ``skproduct`` command line: ``fit``, ``predict``, ``extract``, ``evaluate``, ``match`` and ``demo``.

Each subcommand is one function of the parsed arguments. Mistakes in how a
command is called end in one line on stderr, ``skproduct: error: <what and how
to fix it>``, and exit code 2; anything else is a bug and raises with its
traceback. The rule (:func:`is_user_error`):

- one line: :class:`CommandError` (the commands' own checks, argparse's usage
  errors), every error class of :mod:`skproduct.exceptions` (a malformed BSON
  file, a picture that does not decode, a missing device, an offline
  download...), :class:`OSError` (files, permissions, a full disk) and
  scikit-learn's ``InvalidParameterError`` (an option value an estimator
  rejects);
- a plain ``ValueError`` or ``KeyError`` is one line only where skproduct
  interprets the user's input: reading a data file or a tree, loading a
  model, resolving the backbone options. The commands wrap those calls
  (:func:`~skproduct.cli._data.user_input`), so elsewhere (the long work) a
  ``ValueError`` from numpy or torch keeps its traceback, as a bug should.

Ctrl-C ends in ``skproduct: interrupted`` and exit code 130: no output file is
left half written (they are written atomically) and the embedding cache keeps
the vectors it had stored.

The parser is in ``_parser``, the reading of data files (and the checking and
atomic writing of results) in ``_data``, the commands in ``_commands`` and the
printed and drawn scores of ``evaluate`` in ``_report``; this module runs a
command and reports its mistakes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

from ..exceptions import ImageDecodeError, SkproductWarning, WeightsUnavailableError

__all__ = ["CommandError", "build_parser", "is_user_error", "main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CommandError(Exception):
    """A mistake in how a command was called; :func:`main` prints it as one line and exits with code 2."""


def is_skproduct_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the error classes of :mod:`skproduct.exceptions`."""
    from .. import exceptions

    classes = tuple(
        value for name in exceptions.__all__
        if isinstance(value := getattr(exceptions, name), type) and issubclass(value, Exception)
        and not issubclass(value, Warning)
    )
    return isinstance(exc, classes)


def is_user_error(exc: BaseException) -> bool:
    """Whether :func:`main` reports ``exc`` as one line (a mistake in the call) rather than as a bug."""
    if isinstance(exc, (CommandError, OSError, argparse.ArgumentError)) or is_skproduct_error(exc):
        return True
    validation = sys.modules.get("sklearn.utils._param_validation")  # not imported: cannot be its error
    return validation is not None and isinstance(exc, validation.InvalidParameterError)


# The submodules raise CommandError, so it is defined before they are imported.
from ._parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skproduct`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 2 for a user mistake (reported as one line on stderr),
        130 when interrupted (Ctrl-C). ``--help`` and ``--version`` exit
        through :class:`SystemExit` with 0, as argparse does.
    """
    parser = build_parser()
    verbose, args = False, None
    try:
        args = parser.parse_args(argv)
        # -v and -q work before the command too ("skproduct -v predict ..."), and mean the same there.
        args.verbose = verbose = bool(getattr(args, "verbose", False) or getattr(args, "verbose_first", False))
        args.quiet = bool(getattr(args, "quiet", False) or getattr(args, "quiet_first", False))
        with _log_to_stderr(verbose):
            args.run(args)
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print("skproduct: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc):
            raise  # a bug: its traceback
        if verbose:
            traceback.print_exc()
        print(f"skproduct: error: {_user_error_message(exc, args)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _user_error_message(exc: Exception, args: argparse.Namespace | None = None) -> str:
    """The one-line message for a user mistake, in the words of the command line."""
    if isinstance(exc, WeightsUnavailableError):
        message = f"{exc}; on the command line: --weights FILE, or --no-pretrained"
    elif isinstance(exc, ImageDecodeError):
        message = f"{exc}; pass --on-error skip to leave such pictures out (or --on-error blank for a black picture)"
    elif isinstance(exc, OSError) and exc.strerror and not is_skproduct_error(exc):
        message = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
        cache = getattr(args, "cache", None)
        if cache is not None and exc.filename is not None and _is_under(os.fspath(exc.filename), cache):
            message = (
                f"the embedding cache --cache {cache} cannot be written ({message}): pass a --cache folder that can "
                "be written (and has space)"
            )
    else:
        message = str(exc)
    return " ".join(in_cli_words(message, errors=True).splitlines())


def _is_under(path: str, folder: str) -> bool:
    folder = os.path.abspath(os.path.expanduser(folder))
    return os.path.abspath(path) == folder or os.path.abspath(path).startswith(folder + os.sep)


#: The library's parameter names, as the command line's flags, in messages the command prints.
_CLI_WORDS = (
    (re.compile(r"\bon_truncated=(['\"])(\w+)\1"), r"--on-truncated \2"),
    (re.compile(r"\bon_missing=(['\"])(\w+)\1"), r"--on-missing \2"),
    (re.compile(r"\bon_error=(['\"])(\w+)\1"), r"--on-error \2"),
    (re.compile(r"\blabel_column=(?!['\"\w])"), "--label-column NAME"),
    (re.compile(r"\bweights=(['\"])path/to/file\1"), "--weights FILE"),
    (re.compile(r"\bpretrained=False\b"), "--no-pretrained"),
)
_DEVICE_WORD = (re.compile(r"(?<!set_params\()\bdevice=(['\"])([^'\"]+)\1"), r"--device \2")


def in_cli_words(message: str, *, errors: bool = False) -> str:
    """``message`` with the library's parameters (``on_truncated='warn'``) written as flags (``--on-truncated
    warn``); with ``errors``, ``device='cpu'`` too.

    Examples
    --------
    >>> in_cli_words("fix the paths or pass on_missing='drop'")
    'fix the paths or pass --on-missing drop'
    """
    for pattern, flag in _CLI_WORDS + ((_DEVICE_WORD,) if errors else ()):
        message = pattern.sub(flag, message)
    return message


@contextlib.contextmanager
def _log_to_stderr(verbose: bool) -> Iterator[None]:
    """Show skproduct's warnings (and with ``verbose`` its INFO messages) on stderr while a command runs.

    A warning is one line, ``skproduct: warning: ...``, every time it happens:
    skproduct's warning classes, and any warning raised on behalf of
    skproduct's code (a dropped row, a truncated file). An event the library
    both warns about and logs (warning first) is shown once.
    """
    package_logger = logging.getLogger("skproduct")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter("skproduct: %(levelname)s: %(message)s"))
    warned: set[str] = set()  # an event the library both warns about and logs is shown once, as the warning
    handler.addFilter(lambda record: record.levelno < logging.WARNING or record.getMessage() not in warned)
    previous = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        with warnings.catch_warnings():  # skproduct's warnings, one line each, every time they happen
            warnings.simplefilter("always", SkproductWarning)
            shown = warnings.showwarning

            def show(message, category, filename, *args, **kwargs):
                if issubclass(category, SkproductWarning) or os.path.abspath(filename).startswith(_PACKAGE + os.sep):
                    warned.add(str(message))
                    print(f"skproduct: warning: {in_cli_words(str(message))}", file=sys.stderr)
                else:
                    shown(message, category, filename, *args, **kwargs)

            warnings.showwarning = show
            yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return in_cli_words(super().format(record))
