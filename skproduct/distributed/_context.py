"""Where the cluster is: the ``cluster(...)`` context, read by the embedder at each call. Imports no Dask.

The handle lives in a :class:`contextvars.ContextVar`, never in an estimator: a
model saved, cloned or copied inside the context carries no client, and the
same model runs on one machine outside it (as ``joblib.parallel_config`` does
for scikit-learn's ``n_jobs``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from numbers import Integral

__all__ = ["ClusterConfig", "ClusterError", "cluster", "current_cluster", "distributed_extractor"]

_ACTIVE: contextvars.ContextVar[ClusterConfig | None] = contextvars.ContextVar("skproduct_cluster", default=None)


class ClusterError(RuntimeError):
    """Distributed extraction cannot go on as set up (no shared cache, workers that cannot run the model...).

    The message names what is wrong and the fix; the command line prints it as one line.
    """


@dataclass
class ClusterConfig:
    """The settings of one ``cluster(...)`` context, and what its runs did (:attr:`runs`).

    Attributes
    ----------
    shard_size : int
        Pictures per task.
    flush_every : int
        Vectors a worker writes into the cache together (a killed worker loses at most these).
    retries : int
        Dask's ``retries`` of a shard whose code raised (a worker that dies is
        rescheduled by the scheduler, up to ``distributed.scheduler.allowed-failures``).
    runs : list of dict
        One entry per distributed extraction in this context: ``pictures``,
        ``shards``, ``forward_rows`` (pictures the workers ran through the
        backbone, summed over the shards' finished attempts), ``already_cached``
        (pictures a shard found in the cache when it started: written by an
        earlier attempt), ``workers`` (forward rows per worker address),
        ``seconds`` (of which ``setup_seconds``: shards made and the embedder
        sent; ``tasks_seconds``: from the first task submitted to the last
        result; ``read_back_seconds``: the vectors read from the cache) and
        ``shard_reports``.
    """

    get_client: Callable[[], object]
    shard_size: int = 1024
    flush_every: int = 256
    retries: int = 2
    runs: list = field(default_factory=list)
    _client: object = None
    _payloads: dict = field(default_factory=dict)  # what was scattered to the workers, per embedder state

    def payload(self, name: tuple, make: Callable[[], object]):
        """The future of an embedder scattered to every worker once per block (a streaming ``predict`` calls the
        embedder chunk after chunk: its weights travel once)."""
        future = self._payloads.get(name)
        if future is None or future.status in ("error", "cancelled", "lost"):
            future = self._payloads[name] = self.client.scatter(make(), broadcast=True, hash=False)
        return future

    def release(self) -> None:
        """Let the workers drop what this block scattered."""
        futures, self._payloads = list(self._payloads.values()), {}
        if futures and self._client is not None:
            try:
                self._client.cancel(futures)
            except Exception:  # the client is already closed: the scheduler dropped them with it
                pass

    @property
    def client(self):
        """The ``distributed.Client``, started on first use when the context was given a factory."""
        if self._client is None:
            self._client = self.get_client()
        return self._client

    @property
    def started(self) -> bool:
        return self._client is not None


def _positive(name: str, value) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@contextlib.contextmanager
def cluster(
    client=None, *, shard_size: int = 1024, flush_every: int = 256, retries: int = 2
) -> Iterator[ClusterConfig]:
    """Run the picture extraction of every :class:`~skproduct.ImageEmbedder` in this block on a Dask cluster.

    Inside the block, ``transform`` (and ``fit_transform``, ``predict`` of a
    pipeline...) splits the pictures missing from the embedder's cache into
    shards of ``shard_size`` references, runs them on the workers (each builds
    the backbone once and writes its vectors straight into the cache folder,
    which every worker and this process must share) and reads the vectors back
    from the cache. The vectors are those of a one-process run; pictures already
    cached are never sent. Nothing about the cluster is stored in an estimator:
    models pickled or cloned inside the block carry no client.

    Parameters
    ----------
    client : distributed.Client or callable, optional
        The client of the cluster; a callable returning one (called the first
        time pictures need extracting, so that a run whose pictures are all
        cached starts no cluster); or ``None`` for Dask's current client
        (``distributed.get_client()``).
    shard_size : int, default=1024
        Pictures per task. Larger shards amortise the scheduler's overhead per
        task (see ``benchmarks/bench_distributed.py``); smaller ones lose less
        when a worker dies and balance better at the end of a run.
    flush_every : int, default=256
        Vectors a worker writes to the cache together: a killed worker loses
        at most these, and the retried shard computes only what is missing.
    retries : int, default=2
        Dask's ``retries`` for a shard whose code raised (a transient error
        of the shared file system, say). A worker that dies is rescheduled by
        the scheduler itself. A picture that does not decode under
        ``on_error="raise"`` is not retried: its error is raised here.

    Yields
    ------
    ClusterConfig
        The settings, and in ``runs`` a report of each distributed extraction.

    Examples
    --------
    Without Dask installed, entering the block says what to install; with
    it, a two-worker cluster on this machine::

        from distributed import Client, LocalCluster
        import skproduct.distributed as skd

        with LocalCluster(n_workers=2, threads_per_worker=1) as lc, Client(lc) as client:
            with skd.cluster(client) as run:
                vectors = ImageEmbedder("timm:resnet50", cache="/shared/emb").fit_transform(frame)
            print(run.runs[-1]["forward_rows"])

    The settings are checked on entry:

    >>> with cluster(lambda: None, shard_size=512) as config:
    ...     config.shard_size
    512
    """
    from ._setup import require_distributed

    shard_size = _positive("shard_size", shard_size)
    flush_every = _positive("flush_every", flush_every)
    if not isinstance(retries, Integral) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be 0 or a positive integer, got {retries!r}")
    if client is None:
        require_distributed()

        def get_client():
            from distributed import get_client as current

            return current()
    elif callable(client) and not hasattr(client, "submit"):
        get_client = client
    else:
        if not hasattr(client, "submit"):
            raise TypeError(f"client must be a distributed.Client, a callable returning one, or None; got {client!r}")

        def get_client():
            return client

    config = ClusterConfig(get_client, shard_size=shard_size, flush_every=flush_every, retries=int(retries))
    token = _ACTIVE.set(config)
    try:
        yield config
    finally:
        _ACTIVE.reset(token)
        config.release()


def current_cluster() -> ClusterConfig | None:
    """The settings of the innermost active :func:`cluster` block, or ``None`` outside one."""
    return _ACTIVE.get()


def distributed_extractor(embedder, cache):
    """The hook of :class:`~skproduct.ImageEmbedder`: ``None`` outside a :func:`cluster` block, else an object
    whose ``extract_into`` has the signature of the embedder's own (its pictures run on the cluster)."""
    config = _ACTIVE.get()
    if config is None:
        return None
    if cache is None:
        raise ClusterError(
            "distributed extraction writes the vectors into the embedder's cache, which every worker reads and "
            "writes: pass cache='DIR' (a folder every worker and this process share) to the ImageEmbedder"
        )
    from ._driver import DistributedExtractor

    return DistributedExtractor(embedder, config)
