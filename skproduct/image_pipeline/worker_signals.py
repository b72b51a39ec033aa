"""skproduct's DataLoaders run their workers without torch's process-wide SIGCHLD handler.

The first multi-process ``torch.utils.data.DataLoader`` of a process installs a
Python SIGCHLD handler (to report a worker that died at once) and leaves it
installed until the process exits: from then on every child that exits (a
worker, or any ``subprocess.run`` later) runs torch's check of its workers.
In a process that also held OpenVINO compiled models this crashed the interpreter
(SIGSEGV, during the loader or in a later ``subprocess.run``; reproduced with
three of skproduct's tests, gone when the handler was not installed).

Decision: skproduct's loaders are :class:`WorkerLoader`, a DataLoader whose
worker iterators start under :func:`without_sigchld_handler`, so torch never
installs it for them. A worker that dies is still reported: the loader
checks its workers whenever it waits for a batch (every 5 seconds,
``torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL``), so the error comes up to
5 seconds later instead of at once. A handler that a loader of the user's
installed before is left as it is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch.utils.data import DataLoader

__all__ = ["WorkerLoader", "without_sigchld_handler"]


def _torch_signal_state():
    """torch's module that records whether its SIGCHLD handler is installed, or ``None`` if this torch has none."""
    try:
        from torch.utils.data._utils import signal_handling
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return signal_handling if hasattr(signal_handling, "_SIGCHLD_handler_set") else None


@contextlib.contextmanager
def without_sigchld_handler() -> Iterator[None]:
    """Run the block's DataLoaders without installing torch's SIGCHLD handler (see the module's docstring).

    Examples
    --------
    >>> import signal, torch
    >>> before = signal.getsignal(signal.SIGCHLD)
    >>> with without_sigchld_handler():
    ...     batches = list(torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1))
    >>> batches, signal.getsignal(signal.SIGCHLD) is before
    ([tensor([0, 1]), tensor([2, 3])], True)
    """
    state = _torch_signal_state()
    if state is None or state._SIGCHLD_handler_set or threading.current_thread() is not threading.main_thread():
        yield  # no such handler in this torch, one installed before, or not the main thread (torch installs none)
        return
    state._SIGCHLD_handler_set = True  # torch's loaders now take it as installed, and install none
    try:
        yield
    finally:
        state._SIGCHLD_handler_set = False


class WorkerLoader(DataLoader):
    """A :class:`torch.utils.data.DataLoader` that starts its workers without torch's SIGCHLD handler.

    torch installs the handler when a multi-process iterator is created; this
    loader creates its iterators under :func:`without_sigchld_handler`.

    Examples
    --------
    >>> import signal
    >>> before = signal.getsignal(signal.SIGCHLD)
    >>> [b.tolist() for b in WorkerLoader(list(range(4)), batch_size=2, num_workers=1)]
    [[0, 1], [2, 3]]
    >>> signal.getsignal(signal.SIGCHLD) is before
    True
    """

    def _get_iterator(self):
        with without_sigchld_handler():
            return super()._get_iterator()
