"""Export a backbone to ONNX once per fingerprint, beside the embedding cache, safely from several processes.

The exported graph is the fp32 network (the precision is the runtime's to
apply, pinned when it compiles), so one file serves every precision and both
ONNX Runtime and OpenVINO (which reads ONNX directly). The file is named by
the torch fp32 fingerprint of the backbone: model, weights (with the torch and
library versions) and preprocessing (the input size). It is written with
:func:`skproduct._files.atomic_write` (a reader never sees half a file) under
an exclusive lock (``fcntl.flock``, where the system has it), so that several
workers asking at once export it once and the others wait and read it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from .._files import atomic_write
from .._paths import user_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["export_folder", "export_onnx"]

ONNX_OPSET = 17
FOLDER_NAME = "engines"


def export_folder(cache=None) -> Path:
    """Where exported backbones are kept: ``<cache folder>/engines`` beside the vectors, else skproduct's user cache.

    Examples
    --------
    >>> import tempfile
    >>> from skproduct.cache import EmbeddingCache
    >>> folder = tempfile.mkdtemp()
    >>> export_folder(EmbeddingCache(folder)).name
    'engines'
    """
    if cache is not None:
        return Path(cache.directory) / FOLDER_NAME
    return user_cache_dir(FOLDER_NAME)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps readers safe
        yield
        return
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def onnx_bytes(module, input_size: tuple[int, int]) -> bytes:
    """The ONNX graph of ``module`` (fp32, on the CPU) for ``(batch, 3, H, W)`` inputs with a dynamic batch."""
    import torch

    height, width = input_size
    example = torch.zeros(2, 3, height, width)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # torch's TorchScript exporter: the most robust for timm and open_clip graphs; it announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), buffer, input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def export_onnx(key: str, folder: Path, module_factory: Callable[[], object], input_size: tuple[int, int]) -> Path:
    """The ONNX file of the backbone named ``key`` in ``folder``, exported from ``module_factory()`` if missing.

    ``module_factory`` is called only when the file is missing (a worker that
    finds the file never builds the torch model). Several processes may call
    this at once: one exports, the others wait on the lock and read its file.
    """
    folder = Path(folder)
    path = folder / f"{key}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / f".{key}.onnx.lock"):
        if path.is_file():  # another process exported it while this one waited
            return path
        import torch

        module = module_factory()
        parameter = next(module.parameters(), None)
        if parameter is not None and (parameter.device.type != "cpu" or parameter.dtype != torch.float32):
            import copy

            module = copy.deepcopy(module).to("cpu", torch.float32)
        module = module.eval()
        data = onnx_bytes(module, input_size)
        with atomic_write(path) as f:
            f.write(data)
        logger.info("exported the backbone %s to %s (%.1f MB)", key, path, len(data) / 1e6)
    with contextlib.suppress(OSError):
        (folder / f".{key}.onnx.lock").unlink()
    return path
