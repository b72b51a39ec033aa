"""The driver's side: shards out to the workers, vectors back from the shared cache.

:class:`DistributedExtractor` stands in for the embedder's own
``_extract_into`` inside a :func:`~skproduct.distributed.cluster` block: same
arguments, same result (the table rows filled), but the pictures run on the
cluster and come back through the cache folder.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from ..image_pipeline.data import warn_bad_pictures
from ._context import ClusterConfig, ClusterError
from ._shards import make_shards

logger = logging.getLogger(__name__)

__all__ = ["DistributedExtractor"]


class DistributedExtractor:
    """Extract an embedder's missing pictures on the cluster of ``config``."""

    def __init__(self, embedder, config: ClusterConfig):
        self.embedder = embedder
        self.config = config

    def extract_into(self, refs, table, table_used, rows, cache, key, keys, device, precision) -> None:
        """Run ``refs`` on the workers (their vectors go into ``cache``), then fill ``table[rows]`` from the cache."""
        from ._setup import require_distributed

        require_distributed()
        from distributed import as_completed

        config, embedder = self.config, self.embedder
        client = config.client
        started = time.perf_counter()
        shards = make_shards(refs, keys, config.shard_size)
        state = (embedder.fingerprint_, str(cache.directory), repr(sorted(embedder.get_params(deep=False).items())))
        payload = config.payload(state, lambda: _payload(embedder, str(cache.directory)))
        tasks_started = time.perf_counter()
        token = uuid.uuid4().hex[:12]
        resources = {"GPU": 1} if _workers_have_gpus(client) else None
        futures = [
            client.submit(_run_shard, shard, payload, str(cache.directory), key, precision, config.flush_every,
                          key=f"skproduct-shard-{token}-{shard.number}", retries=config.retries, pure=False,
                          resources=resources)
            for shard in shards
        ]
        reports = []
        progress = _progress(embedder, len(refs))
        try:
            for future, report in as_completed(futures, with_results=True):
                if "error" in report:
                    raise report["error"]
                reports.append(report)
                progress.update(report["pictures"])
                future.release()
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            progress.close()
        read_started = time.perf_counter()
        self._read_back(reports, shards, table, table_used, rows, cache, key, keys)
        timings = {"setup_seconds": tasks_started - started, "tasks_seconds": read_started - tasks_started,
                   "read_back_seconds": time.perf_counter() - read_started}
        self._record(reports, shards, len(refs), time.perf_counter() - started, timings)

    def _read_back(self, reports, shards, table, table_used, rows, cache, key, keys) -> None:
        """The vectors the workers wrote, from the cache; the pictures that did not decode, from the reports."""
        vectors, found = cache.get(key, keys)
        with cache._lock:  # reading back what the workers wrote is not a hit of this process's lookups
            cache.hits -= int(found.sum())
            cache.misses -= int((~found).sum())
        table[rows[found]], table_used[rows[found]] = vectors, True
        n_bad = 0
        for report in reports:
            positions, bad_vectors, used = report["bad"]
            if len(positions):
                where = shards[report["number"]].start + positions
                table[rows[where]], table_used[rows[where]] = bad_vectors, used
                found[where] = True
                n_bad += len(positions)
        if not found.all():
            raise ClusterError(
                f"the workers extracted {int((~found).sum())} pictures whose vectors this process cannot find in "
                f"the cache folder {cache.directory}: the cache must be one folder that every worker and this "
                "process share, at the same path (a network file system mounted alike everywhere), not a local "
                "folder of each machine"
            )
        warn_bad_pictures(n_bad, len(keys), self.embedder.on_error, where=" on the workers", stacklevel=5)

    def _record(self, reports, shards, n_pictures: int, seconds: float, timings: dict) -> None:
        per_worker: dict = {}
        for report in reports:
            per_worker[report["worker"]] = per_worker.get(report["worker"], 0) + report["forward_rows"]
        run = {
            "pictures": n_pictures, "shards": len(shards),
            "forward_rows": sum(r["forward_rows"] for r in reports),
            "already_cached": sum(r["already_cached"] for r in reports),
            "workers": per_worker, "seconds": seconds, **timings,
            "shard_reports": [{k: v for k, v in r.items() if k != "bad"} for r in
                              sorted(reports, key=lambda r: r["number"])],
        }
        self.config.runs.append(run)
        logger.info("extracted %d pictures in %d shards on %d workers in %.1f s (%d found cached by a retried shard)",
                    n_pictures, len(shards), len(per_worker), seconds, run["already_cached"])


def _run_shard(shard, embedder, cache_dir, key, precision, flush_every):
    from ._worker import extract_shard

    return extract_shard(shard, embedder, cache_dir, key, precision, flush_every)


def _payload(embedder, cache_dir: str):
    """The embedder as the workers need it: its weights (when built) travel once per run, its cache as the folder."""
    state = embedder.__getstate__()
    payload = object.__new__(type(embedder))
    payload.__setstate__(state)
    payload.cache, payload.verbose = cache_dir, 0  # (a worker without the device falls back, as a loaded model does)
    return payload


def _workers_have_gpus(client) -> bool:
    """Whether the workers advertise a ``GPU`` resource (then each shard asks for one)."""
    workers = client.scheduler_info().get("workers", {})
    return bool(workers) and any(w.get("resources", {}).get("GPU") for w in workers.values())


def _progress(embedder, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", disable=not embedder.verbose,
                desc=f"embedding on the cluster ({embedder.backbone})", mininterval=0.5 if os.isatty(2) else 5)
