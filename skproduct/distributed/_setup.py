"""Starting a cluster on this machine: one worker per GPU (or N CPU workers), threads pinned per worker."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["INSTALL_HINT", "local_cluster", "require_distributed", "thread_environment"]

INSTALL_HINT = 'pip install "skproduct[distributed]"'
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                     "NUMEXPR_NUM_THREADS", "SKPRODUCT_TORCH_THREADS")


def require_distributed():
    """Import ``distributed``, or raise an :class:`ImportError` that says what to install.

    Examples
    --------
    >>> require_distributed().__name__
    'distributed'
    """
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"running skproduct on a cluster needs Dask distributed, which is not installed: {INSTALL_HINT}"
        ) from exc
    return distributed


def thread_environment(threads: int) -> dict[str, str]:
    """The environment that pins BLAS, OpenMP and torch to ``threads`` threads in a worker process.

    Examples
    --------
    >>> thread_environment(4)["OMP_NUM_THREADS"]
    '4'
    """
    if threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return {name: str(threads) for name in _THREAD_VARIABLES}


def _visible_gpus(gpus) -> list[str]:
    if gpus is None or gpus is False:
        return []
    if gpus == "auto":
        try:
            import torch
        except ImportError:
            return []
        return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        return [str(i) for i in range(gpus)]
    return [str(g) for g in gpus]


def local_cluster(
    n_workers: int | None = None,
    *,
    gpus=None,
    cpu_threads: int | None = None,
    **kwargs,
):
    """A cluster on this machine made for extraction: one single-threaded worker process per GPU, or per CPU share.

    With ``gpus``, each worker sees one GPU (``CUDA_VISIBLE_DEVICES``), runs one
    task at a time (``threads_per_worker=1``) and advertises the resource
    ``GPU=1``, which every shard asks for: dask-cuda's ``LocalCUDACluster``
    where it is installed, else a ``LocalCluster`` whose workers are given
    their GPU one each. Without GPUs, ``n_workers`` CPU workers. Either way
    each worker's BLAS, OpenMP and torch threads are pinned to ``cpu_threads``
    (default: this machine's CPUs shared out between the workers), so that the
    workers do not oversubscribe the CPUs.

    Parameters
    ----------
    n_workers : int, optional
        CPU workers (default: 1); ignored when GPUs are given (one worker each).
    gpus : "auto", int or list, optional
        ``"auto"``: every CUDA device; an int: the first that many; a list: those
        device numbers.
    cpu_threads : int, optional
        Threads of BLAS/OpenMP/torch per worker.
    **kwargs
        Passed to the cluster class (``memory_limit``, ``dashboard_address``...).

    Returns
    -------
    distributed.LocalCluster or dask_cuda.LocalCUDACluster
        Use it with ``distributed.Client(cluster)``; close both when done
        (``with`` blocks).
    """
    require_distributed()
    devices = _visible_gpus(gpus)
    n = len(devices) if devices else (n_workers or 1)
    if n < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    threads = cpu_threads or max(1, (os.cpu_count() or 1) // n)
    env = {**thread_environment(threads), **kwargs.pop("env", {})}
    kwargs.setdefault("dashboard_address", ":0")  # a free port: several clusters may run on one machine
    if devices:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            logger.info("dask-cuda is not installed: one LocalCluster worker per GPU, given its GPU one each")
        else:
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), threads_per_worker=1,
                                    resources={"GPU": 1}, env=env, **kwargs)
        return _gpu_local_cluster(devices, env, **kwargs)
    from distributed import LocalCluster

    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, env=env, **kwargs)


def _gpu_local_cluster(devices: list[str], env: dict, **kwargs):
    """A ``LocalCluster`` whose worker ``i`` sees only GPU ``devices[i]`` (what ``LocalCUDACluster`` does)."""
    from distributed import LocalCluster, Nanny

    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, **kwargs)
    spec = {}
    for i, device in enumerate(devices):
        spec[f"gpu-{device}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "resources": {"GPU": 1}, "env": {**env, "CUDA_VISIBLE_DEVICES": device},
            "name": f"gpu-{device}", **{k: v for k, v in cluster.new_spec["options"].items()
                                          if k not in ("nthreads", "env", "resources", "name")},
        }}
    cluster.worker_spec.update(spec)
    cluster.scale(len(spec))  # starts the workers of the spec
    cluster.wait_for_workers(len(spec))
    return cluster
