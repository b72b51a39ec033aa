"""The OpenVINO engine: the exported graph compiled for the CPU at the precision the fingerprint says."""

from __future__ import annotations

import logging
from pathlib import Path

from ._base import Engine, require

logger = logging.getLogger(__name__)

__all__ = ["OpenVinoEngine"]

#: skproduct's precision names -> OpenVINO's ``INFERENCE_PRECISION_HINT`` values.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoEngine(Engine):
    """Run an exported backbone with OpenVINO on the CPU, its inference precision pinned.

    OpenVINO runs bf16 by default on CPUs with AMX; here
    ``INFERENCE_PRECISION_HINT`` is always set explicitly (``f32`` for fp32,
    ``bf16`` for bf16), and the compiled model is asked back which precision it
    took: a CPU that would silently run another one is an error, so that the
    vectors are those the fingerprint names.

    Parameters
    ----------
    path : path-like
        The ONNX file (OpenVINO reads ONNX directly).
    precision : {"fp32", "bf16"}
    threads : int
        ``INFERENCE_NUM_THREADS`` (one stream: the picture pipeline sends one batch at a time).
    """

    name = "openvino"
    precisions = tuple(PRECISION_HINTS)

    def __init__(self, path: str | Path, precision: str, threads: int):
        if precision not in PRECISION_HINTS:
            raise ValueError(f"runtime='openvino' runs fp32 or bf16 on CPUs, not {precision}: pass precision='fp32'")
        super().__init__(precision)
        ov = require("openvino")
        core = ov.Core()
        hint = PRECISION_HINTS[precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        took = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        took = took.get_type_name() if hasattr(took, "get_type_name") else str(took)
        if took != hint:
            raise ValueError(
                f"OpenVINO compiled the backbone in {took} although {hint} was asked for: this CPU cannot run "
                f"runtime='openvino' at precision={precision!r}; pass precision='fp32' or runtime='torch'"
            )
        self._request = self.compiled.create_infer_request()
        logger.debug("openvino model %s compiled at %s with %d threads", path, took, threads)

    def run(self, pixels):
        result = self._request.infer({0: pixels})
        return next(iter(result.values())).copy()
