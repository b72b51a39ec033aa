"""Inference engines for :class:`~skproduct.ImageEmbedder`: torch, OpenVINO, ONNX Runtime, behind one interface.

``ImageEmbedder(runtime=...)`` picks the engine that runs the backbone:

- ``"torch"`` (the default): the torch module, channels-last, under autocast
  for bf16; on every device.
- ``"openvino"``: the backbone exported to ONNX once, compiled by OpenVINO for
  the CPU with its precision pinned (``INFERENCE_PRECISION_HINT``) to the
  embedder's: ``pip install "skproduct[openvino]"``.
- ``"onnxruntime"``: the same ONNX file on ONNX Runtime's CPU provider, fp32
  only: ``pip install "skproduct[onnxruntime]"``.
- ``"auto"``: on a CPU, the first installed of :data:`AUTO_ORDER` that runs
  the embedder's precision; on CUDA or MPS, torch. The order is fixed (set
  from the measurements of ``benchmarks/bench_embed.py``, see
  :doc:`/performance`), never decided by timing at run time.

The exported graph lives beside the embedding cache (``<cache>/engines/``, or
skproduct's user cache folder without one), named by the backbone's fp32
fingerprint, written atomically once even when several workers ask at once
(:mod:`skproduct.runtimes._export`). A runtime other than torch is part of
the embedder's fingerprint: its vectors agree with torch's to a cosine
similarity of at least :data:`COSINE_TOLERANCE` per vector at the same
precision, but they are not bit-identical, so they are cached apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ._base import Engine, RuntimeUnavailableError, TorchEngine, installed, require
from ._export import export_folder, export_onnx

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_ORDER",
    "COSINE_TOLERANCE",
    "RUNTIME_CHOICES",
    "Engine",
    "RuntimeUnavailableError",
    "TorchEngine",
    "available_runtimes",
    "build_engine",
    "export_folder",
    "export_onnx",
    "resolve_runtime",
]

RUNTIME_CHOICES = ("auto", "torch", "openvino", "onnxruntime")
#: ``runtime="auto"``'s order of preference on a CPU (the first installed that runs the precision wins).
#: Measured with bench_embed.py (Intel Xeon with AMX-BF16, 2 threads, batch 32): OpenVINO is the fastest
#: at fp32 and at bf16; ONNX Runtime beats torch at fp32 but has no bf16; torch always runs.
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
#: The smallest cosine similarity between a runtime's vector and torch's for the same picture, same precision
#: (fp32: typically > 0.99999; bf16, where each engine rounds its own way: > 0.99).
COSINE_TOLERANCE = {"fp32": 0.9999, "bf16": 0.99}
_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",)}


def available_runtimes() -> list[str]:
    """The runtimes whose packages are installed, in :data:`AUTO_ORDER`.

    Examples
    --------
    >>> "torch" in available_runtimes()
    True
    """
    return [name for name in AUTO_ORDER if installed(name)]


def resolve_runtime(runtime: str, device, precision: str, *, precision_asked: str = "auto") -> tuple[str, str]:
    """``(runtime, precision)`` of a fit: the engine for ``runtime`` on ``device`` and the precision it runs.

    ``precision`` is the one the device policy resolved; where the runtime
    cannot run it and the user left ``precision="auto"``, the runtime's best
    (fp32 for ONNX Runtime) is taken; a pinned precision it cannot run is an
    error. Runtimes other than torch run on CPUs only.

    Raises
    ------
    RuntimeUnavailableError
        The runtime's package is missing (the message names the ``pip install``).
    ValueError
        The runtime cannot run on ``device`` or at the pinned precision.

    Examples
    --------
    >>> import torch
    >>> resolve_runtime("torch", torch.device("cpu"), "bf16")
    ('torch', 'bf16')
    >>> resolve_runtime("onnxruntime", torch.device("cpu"), "bf16", precision_asked="auto")
    ('onnxruntime', 'fp32')
    """
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {RUNTIME_CHOICES}, got {runtime!r}")
    on_cpu = device.type == "cpu"
    if runtime == "auto":
        if not on_cpu:
            return "torch", precision
        for name in AUTO_ORDER:
            if installed(name) and precision in _PRECISIONS[name]:
                logger.debug("runtime='auto' picked %s for %s", name, precision)
                return name, precision
        return "torch", precision  # pragma: no cover - torch runs everything
    if runtime == "torch":
        return runtime, precision
    require(runtime)
    if not on_cpu:
        raise ValueError(f"runtime={runtime!r} runs on CPUs only, and device is {device}: pass device='cpu' "
                         "or runtime='torch'")
    if precision not in _PRECISIONS[runtime]:
        if precision_asked == "auto":
            return runtime, _PRECISIONS[runtime][0]
        raise ValueError(f"runtime={runtime!r} cannot run precision={precision!r} on CPUs: pass one of "
                         f"{_PRECISIONS[runtime]} or runtime='torch'")
    return runtime, precision


def build_engine(
    runtime: str, precision: str, *, module_factory: Callable[[], object], export_key: str, folder: str | Path,
    input_size: tuple[int, int], threads: int | None = None,
) -> Engine:
    """The engine for ``runtime`` at ``precision``; the ONNX export (named ``export_key`` in ``folder``) made if missing.

    ``module_factory`` returns the torch backbone; for OpenVINO and ONNX
    Runtime it is called only when the export is missing.

    Examples
    --------
    >>> import torch
    >>> engine = build_engine("torch", "fp32", module_factory=lambda: torch.nn.Flatten(), export_key="unused",
    ...                       folder=".", input_size=(1, 1))
    >>> engine.name, engine(torch.ones(2, 3, 1, 1)).shape
    ('torch', torch.Size([2, 3]))
    """
    if runtime == "torch":
        return TorchEngine(module_factory(), precision)
    import torch

    threads = threads or torch.get_num_threads()
    path = export_onnx(export_key, Path(folder), module_factory, tuple(input_size))
    if runtime == "openvino":
        from ._openvino import OpenVinoEngine

        return OpenVinoEngine(path, precision, threads)
    if runtime == "onnxruntime":
        from ._onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, precision, threads)
    raise ValueError(f"runtime must be one of {RUNTIME_CHOICES[1:]} here, got {runtime!r}")
