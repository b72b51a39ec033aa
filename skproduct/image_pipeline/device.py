"""The one device and precision policy of the image estimators (and the torch heads).

- ``device="auto"`` picks CUDA, then Apple's MPS, then the CPU, at every call.
- A device asked for explicitly (``device="cuda"``, ``--device cuda``) that this
  machine lacks is an error: :class:`DeviceUnavailableError`.
- A device merely inherited from a fit on another machine (the model was
  saved there) is replaced by the CPU, with a
  :class:`~skproduct.exceptions.DeviceFallbackWarning`.
- ``precision="auto"``: bf16 on CUDA devices that support it, fp16 on older
  CUDA devices; on CPUs, for inference (``ImageEmbedder``), bf16 where the CPU
  computes it natively (AMX or AVX512-BF16: :func:`cpu_native_bf16`) and fp32
  elsewhere; for training on CPUs, fp32.
  ``"bf16"`` runs on CUDA and on CPUs (autocast); ``"fp16"`` needs CUDA.
- The precision chosen at fit is part of what the model computes (and of an
  embedder's cache fingerprint): a later call keeps it wherever the device can
  run it, and falls back to fp32 with a warning where it cannot.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

from ..exceptions import DeviceFallbackWarning, DeviceUnavailableError

__all__ = [
    "DeviceUnavailableError",
    "autocast_dtype",
    "cpu_native_bf16",
    "device_available",
    "parse_device",
    "precision_for_call",
    "resolve_device",
    "resolve_precision",
]


logger = logging.getLogger(__name__)

#: Set to ``1`` or ``0`` to say whether this CPU has native bf16, instead of detecting it.
CPU_BF16_ENV = "SKPRODUCT_CPU_BF16"
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16), so that bf16 inference pays.

    Read from torch's own CPU probes (``torch.cpu._is_amx_tile_supported``,
    ``_is_avx512_bf16_supported``) and, where those are missing, from the
    flags of ``/proc/cpuinfo``. The environment variable
    ``SKPRODUCT_CPU_BF16=1`` (or ``0``) overrides the detection.

    Examples
    --------
    >>> isinstance(cpu_native_bf16(), bool)
    True
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return _detect_cpu_bf16()


@functools.lru_cache(maxsize=1)
def _detect_cpu_bf16() -> bool:
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(callable(p) for p in probes):
        try:
            found = any(bool(p()) for p in probes)
            logger.debug("native bf16 on this CPU (torch's probes): %s", found)
            return found
        except RuntimeError:  # pragma: no cover - a torch build without the probes' kernels
            pass
    try:  # pragma: no cover - older torch
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # pragma: no cover - not Linux
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)  # pragma: no cover


def parse_device(device: str):
    """A :class:`torch.device` from a device string, or a one-line error for a string that names none.

    Examples
    --------
    >>> parse_device("cpu")
    device(type='cpu')
    """
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceUnavailableError(
            f"device={device!r} is not a torch device: use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None


def device_available(device) -> bool:
    """Whether a device (string or :class:`torch.device`) names one this machine has."""
    import torch

    kind = parse_device(device) if isinstance(device, str) else device
    if kind.type == "cuda":
        return torch.cuda.is_available() and (kind.index or 0) < torch.cuda.device_count()
    if kind.type == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind.type == "cpu"


def resolve_device(device: str, *, inherited: bool = False):
    """The :class:`torch.device` to run on for the parameter ``device``.

    ``"auto"`` picks CUDA, then MPS, then the CPU. An explicit device this
    machine lacks raises :class:`DeviceUnavailableError`; with ``inherited``
    (the parameter came with a model saved on another machine) it is
    replaced by the CPU, with a :class:`~skproduct.exceptions.DeviceFallbackWarning`.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = parse_device(device)
    if device_available(kind):
        return kind
    if inherited:
        warnings.warn(
            f"this model was set to run on {device}, which this machine lacks; it runs on the CPU "
            "(set_params(device='cpu') or device='auto' silences this)",
            DeviceFallbackWarning,
            stacklevel=4,
        )
        return torch.device("cpu")
    raise DeviceUnavailableError(
        f"device={device!r} was asked for but this machine has no such device "
        f"(CUDA devices: {torch.cuda.device_count()}): pass device='cpu' or 'auto'"
    )


def resolve_precision(precision: str, device, *, inference: bool = False) -> str:
    """The precision a fit uses: ``precision`` itself, or for ``"auto"`` the device's best.

    With ``inference`` (an embedder: no training), ``"auto"`` on a CPU is
    bf16 where :func:`cpu_native_bf16` says the CPU computes it natively, and
    fp32 elsewhere; training on a CPU stays fp32.

    Examples
    --------
    >>> import torch
    >>> resolve_precision("auto", torch.device("cpu"))
    'fp32'
    >>> resolve_precision("auto", torch.device("cpu"), inference=True) == ("bf16" if cpu_native_bf16() else "fp32")
    True
    >>> resolve_precision("bf16", torch.device("cpu"))
    'bf16'
    """
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if inference and device.type == "cpu" and cpu_native_bf16():
            return "bf16"
        return "fp32"
    if not _runs(precision, device):
        raise DeviceUnavailableError(
            f"precision={precision!r} needs a CUDA device; this one is {device}: use 'fp32', 'bf16' or 'auto'"
        )
    return precision


def _runs(precision: str, device) -> bool:
    return precision in ("fp32", "bf16") or device.type == "cuda"


def precision_for_call(fitted: str, device) -> str:
    """The precision of a call on ``device`` of a model fitted in ``fitted`` precision.

    The fitted precision stays wherever the device can run it (the numbers,
    and an embedder's cache keys, stay those of the fit); fp16 on a device
    without it falls back to fp32 with a :class:`~skproduct.exceptions.DeviceFallbackWarning`.
    """
    if _runs(fitted, device):
        return fitted
    warnings.warn(
        f"this model was fitted in {fitted} precision, which {device} cannot run; it runs in fp32 "
        "(its vectors differ slightly, and an embedder keys them apart in its cache)",
        DeviceFallbackWarning,
        stacklevel=4,
    )
    return "fp32"


def autocast_dtype(precision: str):
    """The torch autocast dtype of a precision (``None`` for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
