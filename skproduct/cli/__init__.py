"""The ``skproduct`` command line: ``fit``, ``predict``, ``extract``, ``evaluate`` and ``demo``.

Each subcommand is one function of the parsed arguments. Mistakes in how a
command is called (a missing file, a model file that is not a model, data
without labels, an offline download) end in one line on stderr,
``skproduct: error: <what and how to fix it>``, and exit code 2; anything else
is a bug and raises with its traceback.

The parser is in ``_parser``, the reading of data files (and the atomic
writing of results) in ``_data``, the commands in ``_commands`` and the printed
and drawn scores of ``evaluate`` in ``_report``; this module runs a command and
reports its mistakes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

from ..exceptions import SkproductWarning, WeightsUnavailableError

__all__ = ["CommandError", "build_parser", "main"]

EXIT_USER_ERROR = 2


class CommandError(Exception):
    """A mistake in how a command was called; :func:`main` prints it as one line and exits with code 2."""


# The submodules raise CommandError, so it is defined before they are imported.
from ._parser import build_parser  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skproduct`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 2 for a user mistake (reported as one line on stderr).
        ``--help`` and ``--version`` exit through :class:`SystemExit` with 0,
        as argparse does.
    """
    parser = build_parser()
    verbose = False
    try:
        args = parser.parse_args(argv)
        verbose = args.verbose
        with _log_to_stderr(verbose):
            args.run(args)
    except (
        CommandError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, WeightsUnavailableError
    ) as exc:
        if verbose:
            traceback.print_exc()
        print(f"skproduct: error: {_user_error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _user_error_message(exc: Exception) -> str:
    """The one-line message for a user mistake."""
    if isinstance(exc, WeightsUnavailableError):
        message = f"{exc}; on the command line: --weights FILE, or --no-pretrained"
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}"
    else:
        message = str(exc)
    return " ".join(message.splitlines())


@contextlib.contextmanager
def _log_to_stderr(verbose: bool) -> Iterator[None]:
    """Show skproduct's warnings (and with ``verbose`` its INFO messages) on stderr while a command runs."""
    package_logger = logging.getLogger("skproduct")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("skproduct: %(levelname)s: %(message)s"))
    previous = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        with warnings.catch_warnings():  # skproduct's warnings, one line each, every time they happen
            warnings.simplefilter("always", SkproductWarning)
            shown = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if issubclass(category, SkproductWarning):
                    print(f"skproduct: warning: {message}", file=sys.stderr)
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous)
