"""What an inference engine is: the :class:`Engine` interface, the torch engine, and the missing-package error."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Engine", "RuntimeUnavailableError", "TorchEngine", "require"]

#: The package each runtime imports, and the extra of skproduct that installs it.
PACKAGES = {"openvino": ("openvino", "openvino"), "onnxruntime": ("onnxruntime", "onnxruntime")}


class RuntimeUnavailableError(ImportError):
    """An inference runtime was asked for but its package is not installed; the message says what to install."""


def installed(runtime: str) -> bool:
    """Whether the package of ``runtime`` can be imported (``"torch"`` always can)."""
    if runtime == "torch":
        return True
    module, _ = PACKAGES[runtime]
    return importlib.util.find_spec(module) is not None


def require(runtime: str) -> Any:
    """Import the package of ``runtime``, or raise :class:`RuntimeUnavailableError` with the ``pip`` command."""
    module, extra = PACKAGES[runtime]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"runtime={runtime!r} needs the {module} package, which is not installed: "
            f'pip install "skproduct[{extra}]" (or pass runtime="torch")'
        ) from exc


class Engine:
    """A backbone ready to run: maps a float32 ``(N, 3, H, W)`` tensor to float32 ``(N, D)`` features.

    Every engine pins its numerical precision to :attr:`precision` (what the
    embedder's fingerprint says) and runs on the CPU threads torch is set to
    use (``torch.get_num_threads()``). Subclasses implement :meth:`run` on
    numpy arrays; calling the engine takes and returns torch tensors, so that
    it drops into the picture pipeline where a torch module would.

    Attributes
    ----------
    name : str
        ``"torch"``, ``"openvino"`` or ``"onnxruntime"``.
    precision : str
        ``"fp32"`` or ``"bf16"`` (and ``"fp16"`` for torch on CUDA).
    """

    name = "engine"

    def __init__(self, precision: str):
        self.precision = precision

    def run(self, pixels):  # pragma: no cover - abstract
        """Features of a C-contiguous float32 numpy batch, as a float32 numpy array."""
        raise NotImplementedError

    def __call__(self, pixels):
        import torch

        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.run(array))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r})"


class TorchEngine(Engine):
    """The torch module itself: autocast for bf16/fp16 is applied by the picture pipeline around the call.

    Examples
    --------
    >>> import torch
    >>> engine = TorchEngine(torch.nn.Flatten(), "fp32")
    >>> engine(torch.ones(2, 3, 1, 1)).shape
    torch.Size([2, 3])
    """

    name = "torch"

    def __init__(self, module, precision: str):
        super().__init__(precision)
        self.module = module

    def __call__(self, pixels):
        return self.module(pixels)

    def run(self, pixels):
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(pixels)).float().numpy()
