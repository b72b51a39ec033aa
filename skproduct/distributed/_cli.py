"""The command line's cluster options: ``--scheduler ADDRESS`` or ``--workers N``, for ``extract`` and ``predict``.

The commands themselves do not change: :func:`with_cluster` wraps a command's
``run`` function in a :func:`~skproduct.distributed.cluster` block whose client
is made the first time pictures need extracting (a run whose pictures are all
cached starts nothing; a mistake in the other options is reported before any
cluster starts).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging

logger = logging.getLogger(__name__)

__all__ = ["add_cluster_options", "with_cluster"]


def add_cluster_options(parser: argparse.ArgumentParser, positive_int) -> None:
    """Add the ``cluster`` option group (``--scheduler``, ``--workers``, ``--shard-size``) to ``parser``."""
    group = parser.add_argument_group("cluster (Dask; needs pip install \"skproduct[distributed]\")")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="extract the pictures missing from --cache on the Dask cluster at ADDRESS (tcp://host:8786, or a "
        "scheduler file); the cache must be a folder every worker shares",
    )
    where.add_argument(
        "--workers", type=positive_int, metavar="N",
        help="extract on a local Dask cluster of N single-threaded CPU worker processes, threads pinned (for one "
        "worker per GPU, start the cluster as docs/cluster.rst shows and pass --scheduler)",
    )
    group.add_argument(
        "--shard-size", type=positive_int, default=1024, metavar="N",
        help="pictures per cluster task (default: %(default)s)",
    )


def with_cluster(run):
    """``run(args)``, inside a cluster block when ``--scheduler`` or ``--workers`` was given."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> None:
        scheduler, workers = getattr(args, "scheduler", None), getattr(args, "workers", None)
        if scheduler is None and workers is None:
            return run(args)
        from ..cli import CommandError
        from ._context import ClusterError, cluster
        from ._setup import require_distributed

        try:
            require_distributed()
        except ImportError as exc:
            raise CommandError(str(exc)) from exc
        with contextlib.ExitStack() as stack:
            def client():
                return _client(stack, scheduler, workers)

            try:
                with cluster(client, shard_size=args.shard_size):
                    return run(args)
            except ClusterError as exc:
                raise CommandError(str(exc)) from exc

    return wrapped


def _client(stack: contextlib.ExitStack, scheduler: str | None, workers: int | None):
    from distributed import Client

    if scheduler is not None:
        logger.info("connecting to the Dask scheduler at %s", scheduler)
        if scheduler.endswith(".json"):
            return stack.enter_context(Client(scheduler_file=scheduler))
        return stack.enter_context(Client(scheduler))
    from ._setup import local_cluster

    logger.info("starting a local Dask cluster of %d workers", workers)
    local = stack.enter_context(local_cluster(workers))
    return stack.enter_context(Client(local))
