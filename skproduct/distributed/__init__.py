"""Extraction on a Dask cluster: the cluster is a context, never a parameter of a model.

Inside ``with skproduct.distributed.cluster(client):`` every
:class:`~skproduct.ImageEmbedder` sends the pictures missing from its cache to
the workers in picklable shards of references (a BSON picture travels as file,
offset and length); each worker builds the backbone once (kept per worker
process, by fingerprint) and writes its vectors straight into the shared cache
folder, and the embedder reads them back from there: the vectors of a
one-process run, each picture extracted once. A worker killed mid-shard loses
at most the vectors it had not written; the scheduler runs the shard again, and
the new attempt computes only what the cache lacks.

Why a context and not an ``ImageEmbedder(client=...)`` parameter: a client is
a live connection. As a parameter it would be pickled with every saved model,
deep-copied by ``clone`` (every ``GridSearchCV`` candidate) and listed by
``get_params``; as a context, as ``joblib.parallel_config(backend="dask")``
is for scikit-learn's ``n_jobs``, the same saved model runs on a laptop and
on a cluster, and where it runs is decided by the code that calls it.

Searches over heads need nothing from here: scikit-learn's own
``joblib.parallel_config(backend="dask")`` spreads ``GridSearchCV`` and
``cross_val_score`` over the same cluster (see ``docs/cluster.rst``).

Dask is optional (``pip install "skproduct[distributed]"``); this package
imports without it, and what needs it says what to install.

Public API: :func:`cluster` (the context), :func:`local_cluster` (one worker
per GPU, or N CPU workers, threads pinned), :func:`thread_environment`,
:class:`ClusterError`, :func:`forget_models` (run on workers to free their kept
backbones).
"""

from ._context import ClusterConfig, ClusterError, cluster, current_cluster
from ._setup import INSTALL_HINT, local_cluster, require_distributed, thread_environment
from ._worker import forget_models

__all__ = [
    "INSTALL_HINT",
    "ClusterConfig",
    "ClusterError",
    "cluster",
    "current_cluster",
    "forget_models",
    "local_cluster",
    "require_distributed",
    "thread_environment",
]
