"""The ONNX Runtime engine: the exported fp32 graph on ONNX Runtime's CPU execution provider."""

from __future__ import annotations

import logging
from pathlib import Path

from ._base import Engine, require

logger = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeEngine"]


class OnnxRuntimeEngine(Engine):
    """Run an exported backbone with ONNX Runtime on the CPU, in fp32 (the only precision it runs there).

    Parameters
    ----------
    path : path-like
        The ONNX file (:func:`~skproduct.runtimes.export_onnx`).
    precision : {"fp32"}
        ONNX Runtime's CPU provider has no bf16 kernels for these networks; any other precision is an error.
    threads : int
        Intra-op threads (``torch.get_num_threads()`` by default where the embedder builds it).
    """

    name = "onnxruntime"
    precisions = ("fp32",)

    def __init__(self, path: str | Path, precision: str, threads: int):
        if precision not in self.precisions:
            raise ValueError(
                f"runtime='onnxruntime' runs fp32 only on CPUs, not {precision}: pass precision='fp32', "
                "or runtime='openvino' or 'torch' for bf16"
            )
        super().__init__(precision)
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        logger.debug("onnxruntime session on %s with %d threads", path, threads)

    def run(self, pixels):
        return self.session.run(None, {self._input: pixels})[0]
