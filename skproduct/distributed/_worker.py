"""What runs on a Dask worker: one shard through the backbone, its vectors into the shared cache.

The backbone is built once per worker process and kept (:data:`_MODELS`, keyed
by fingerprint and device) for every later shard and run with the same model.
A shard first looks its keys up in the cache: pictures an earlier attempt
wrote (a worker that died mid-shard) are not computed again. Vectors are
written every ``flush_every`` pictures as whole, checksummed segments
(temporary file, then rename): a worker killed at any point leaves only whole
vectors behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import warnings
from collections import OrderedDict

import numpy as np

from ..exceptions import BadPictureWarning, ImageDecodeError

logger = logging.getLogger(__name__)

__all__ = ["extract_shard", "forget_models"]

_MODELS: OrderedDict = OrderedDict()  # (fingerprint, device) -> built backbone, most recently used last
_MODELS_LOCK = threading.Lock()
_KEEP_MODELS = 2  # backbones kept per worker process (GPU memory is the limit)


def forget_models() -> int:
    """Drop the backbones this worker process keeps; returns how many there were (``client.run(forget_models)``)."""
    with _MODELS_LOCK:
        n = len(_MODELS)
        _MODELS.clear()
    return n


_KEPT_STATE = ("_module", "_module_device", "_engine", "_compiled", "_compiled_for")  # what building costs


def _worker_embedder(embedder, device):
    """A private copy of ``embedder`` that reuses this process's built backbone (and engine) for its fingerprint and
    device; ``(copy, name, built)``: ``built`` when nothing was kept, so that this shard builds it."""
    local = object.__new__(type(embedder))
    local.__dict__.update(embedder.__dict__)  # not copy.copy: that pickles the weights
    name = (embedder.fingerprint_, str(device))
    with _MODELS_LOCK:
        kept = _MODELS.get(name)
        if kept is not None:
            _MODELS.move_to_end(name)
    if kept is None:
        local._module = None
        return local, name, True
    local.__dict__.update(kept)
    return local, name, False


def _keep(local, name) -> None:
    """Keep the backbone (and engine) ``local`` built, for the next shards of this worker process."""
    state = {attr: local.__dict__[attr] for attr in _KEPT_STATE if attr in local.__dict__}
    if state.get("_module") is None and state.get("_engine") is None:
        return
    with _MODELS_LOCK:
        _MODELS[name] = state
        _MODELS.move_to_end(name)
        while len(_MODELS) > _KEEP_MODELS:
            _MODELS.popitem(last=False)


def _pin_torch_threads() -> None:
    """Follow ``OMP_NUM_THREADS`` of this worker (set by :func:`~skproduct.distributed.local_cluster` or by hand)."""
    wanted = os.environ.get("SKPRODUCT_TORCH_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if wanted and wanted.isdigit() and int(wanted) > 0:
        import torch

        if torch.get_num_threads() != int(wanted):
            torch.set_num_threads(int(wanted))


def extract_shard(shard, embedder, cache_dir: str, key: str, precision: str, flush_every: int) -> dict:
    """Extract the pictures of ``shard`` missing from the cache at ``cache_dir`` and write their vectors there.

    Returns a small report (no vectors but those of pictures that did not
    decode, which are never cached): ``number``, ``pictures``,
    ``already_cached``, ``forward_rows``, ``written``, ``bad`` (positions in
    the shard, their vectors and whether they count), ``worker``, ``pid``,
    ``seconds`` and ``built`` (whether this call built the backbone); or
    ``error`` (the exception to raise on the driver) for a picture that did not
    decode under ``on_error="raise"`` or a cache the worker cannot write.
    """
    from ..cache import EmbeddingCache
    from ..exceptions import CacheWriteWarning
    from ..image_pipeline.device import precision_for_call

    start_time = time.perf_counter()
    report = {"number": shard.number, "pictures": shard.pictures, "pid": os.getpid(), "worker": _worker_address(),
              "already_cached": 0, "forward_rows": 0, "written": 0, "built": False,
              "bad": (np.empty(0, np.int64), None, np.empty(0, bool))}
    _pin_torch_threads()
    cache = EmbeddingCache(cache_dir)
    _, found = cache.get(key, shard.keys)
    report["already_cached"] = int(found.sum())
    todo = np.flatnonzero(~found)
    if not len(todo):
        report["seconds"] = time.perf_counter() - start_time
        return report
    device = embedder._call_device_only()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback is an error here, below
        runs = precision_for_call(precision, device)
    if runs != precision:
        report["error"] = _error(
            f"the worker {report['worker']} runs on {device}, which cannot run the {precision} precision this "
            f"model's vectors are keyed by: give the workers a device that runs it, or refit the embedder with "
            f"precision='fp32'")
        return report
    local, name, report["built"] = _worker_embedder(embedder, device)
    if local.num_workers and multiprocessing.current_process().daemon:
        logger.info("the Dask worker is a daemon process, which cannot start DataLoader workers: decoding in it "
                    "(set distributed.worker.daemon: False for num_workers > 0)")
        local.num_workers = 0
    refs = [shard.refs[i] for i in todo]
    keys = shard.keys[todo]
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    bad_positions, bad_vectors, bad_used = [], [], []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadPictureWarning)  # counted, and reported once by the driver
            warnings.simplefilter("error", CacheWriteWarning)  # vectors kept in a worker's memory are lost
            for positions, vectors, used, decoded in local._batches(refs, device, precision):
                report["forward_rows"] += len(positions)
                pending.append((keys[positions[decoded]], vectors[decoded]))
                if (~decoded).any():
                    bad_positions.append(todo[positions[~decoded]])
                    bad_vectors.append(vectors[~decoded])
                    bad_used.append(used[~decoded])
                if sum(len(k) for k, _ in pending) >= flush_every:
                    report["written"] += _flush(cache, key, pending)
            report["written"] += _flush(cache, key, pending)
    except ImageDecodeError as exc:  # on_error="raise": the same on every attempt, so not retried
        report["written"] += _flush(cache, key, pending)
        report["error"] = exc
        return report
    except CacheWriteWarning as exc:
        report["error"] = _error(
            f"the worker {report['worker']} cannot write the cache folder {cache_dir} ({exc}): every worker must "
            "be able to write the shared cache folder")
        return report
    finally:
        _keep(local, name)  # the backbone serves this worker's next shards, whatever became of this one
    if bad_positions:
        report["bad"] = (np.concatenate(bad_positions), np.concatenate(bad_vectors), np.concatenate(bad_used))
    report["seconds"] = time.perf_counter() - start_time
    logger.debug("shard %d: %d pictures, %d cached before, %d run", shard.number, shard.pictures,
                 report["already_cached"], report["forward_rows"])
    return report


def _flush(cache, key: str, pending: list) -> int:
    if not pending:
        return 0
    keys = np.concatenate([k for k, _ in pending])
    vectors = np.concatenate([v for _, v in pending])
    pending.clear()
    if len(keys):
        cache.put(key, keys, vectors)
    return len(keys)


def _error(message: str):
    from ._context import ClusterError

    return ClusterError(message)


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None
