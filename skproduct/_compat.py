"""Reading estimators saved by other versions of skproduct and its libraries: renames upgraded, mismatches said.

Each saved estimator's ``__setstate__`` passes its state through the function
here, so that a model saved before a rename loads with the same behaviour
(and a file that no upgrade can read says so, instead of misbehaving later).
:class:`VersionStampMixin` records the versions of skproduct, torch, timm and
open_clip that a model was saved with, and warns
(:class:`~skproduct.exceptions.VersionMismatchWarning`) when it is loaded
under other ones, as scikit-learn does for its own estimators only.
"""

from __future__ import annotations

import functools
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

from .exceptions import VersionMismatchWarning

__all__ = [
    "VersionStampMixin",
    "library_versions",
    "upgrade_finetune_state",
    "upgrade_torch_linear_state",
    "version_mismatches",
]

#: The libraries whose version a saved estimator records: distribution name -> the module it is imported as.
#: skproduct itself is always recorded; the others when the saving process had imported them (see
#: :func:`library_versions`).
STAMPED_LIBRARIES = {"torch": "torch", "timm": "timm", "open_clip_torch": "open_clip"}

# (old name, new name) of parameters renamed in 0.1 (the one vocabulary of the torch estimators).
_FINETUNE_RENAMES = (("epochs", "max_iter"), ("lr", "learning_rate"))
_TORCH_LINEAR_RENAMES = (("max_epochs", "max_iter"),)


def _renamed(state: dict, renames) -> dict:
    state = dict(state)
    for old, new in renames:
        if old in state and new not in state:
            state[new] = state.pop(old)
    return state


def upgrade_finetune_state(state: dict) -> dict:
    """A :class:`~skproduct.FineTuneClassifier`'s pickled state in today's names.

    Examples
    --------
    >>> sorted(upgrade_finetune_state({"epochs": 4, "lr": 0.1}).items())
    [('learning_rate', 0.1), ('max_iter', 4), ('pooling', 'mean'), ('tol', 0.0)]
    """
    state = _renamed(state, _FINETUNE_RENAMES)
    state.setdefault("tol", 0.0)  # before 0.1 any fall of the validation loss counted
    state.setdefault("pooling", "mean")
    state.pop("_trained_on", None)  # the device is decided at each call now
    if "history_" in state:
        state.setdefault("n_iter_", len(state["history_"]))
    return state


def upgrade_torch_linear_state(state: dict) -> dict:
    """A :class:`~skproduct.TorchLinearClassifier`'s pickled state in today's names.

    Examples
    --------
    >>> upgrade_torch_linear_state({"max_epochs": 5})
    {'max_iter': 5, 'precision': 'fp32'}
    """
    state = _renamed(state, _TORCH_LINEAR_RENAMES)
    state.setdefault("precision", "fp32")  # before 0.1 the training matmuls always ran in float32
    return state


@functools.cache
def _installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, read from its metadata (nothing is imported), or ``None``."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _release(text: str | None) -> str | None:
    """A version without its local label: ``"2.4.1+cu121"`` and ``"2.4.1"`` are the same release of torch."""
    return None if text is None else str(text).split("+", 1)[0]


def library_versions() -> dict[str, str]:
    """The versions a model saved now records: skproduct's, and those of torch, timm and open_clip_torch.

    A library is recorded when this process has imported it (and its version
    is read from the installed metadata, so nothing is imported here): an
    estimator that holds torch tensors or a timm or open_clip network had to
    import that library to make them, while one that never touched it (a
    :class:`~skproduct.HierarchicalClassifier` over scikit-learn heads, fitted
    without torch) is not stamped with a version that cannot matter to it.

    Returns
    -------
    dict
        Distribution name -> version string.

    Examples
    --------
    >>> import skproduct
    >>> library_versions()["skproduct"] == skproduct.__version__
    True
    """
    from . import __version__

    found = {"skproduct": __version__}
    for distribution, module in STAMPED_LIBRARIES.items():
        if module in sys.modules:
            installed = _installed_version(distribution)
            if installed is not None:
                found[distribution] = installed
    return found


def version_mismatches(saved: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """The libraries whose release differs between ``saved`` (a model's record) and this environment.

    Local version labels are ignored (a model saved under ``torch 2.4.1+cu121``
    on a GPU machine matches ``torch 2.4.1`` on a laptop); a library that is
    not installed here is a mismatch (``None`` as its version here); a library
    that ``saved`` does not name is not compared: unknown is not a mismatch.

    Parameters
    ----------
    saved : dict
        Distribution name -> the version the model was saved with.

    Returns
    -------
    dict
        Distribution name -> ``(saved version, version here or None)``, only for the mismatches.

    Examples
    --------
    >>> import skproduct
    >>> version_mismatches({"skproduct": "0.0.1"})["skproduct"] == ("0.0.1", skproduct.__version__)
    True
    >>> version_mismatches({"skproduct": skproduct.__version__ + "+local"}), version_mismatches({})
    ({}, {})
    """
    from . import __version__

    mismatches = {}
    for distribution, then in saved.items():
        now = __version__ if distribution == "skproduct" else _installed_version(distribution)
        if _release(then) != _release(now):
            mismatches[distribution] = (str(then), now)
    return mismatches


def _describe_mismatches(name: str, mismatches: dict[str, tuple[str, str | None]]) -> str:
    saved = ", ".join(f"{lib} {then}" for lib, (then, _) in mismatches.items())
    here = ", ".join(f"{lib} {now}" if now is not None else f"no {lib}" for lib, (_, now) in mismatches.items())
    return (
        f"this {name} was saved with {saved} and is loaded with {here}: its results may differ (weights, "
        "preprocessing and defaults can change between versions); check its predictions, or load it where those "
        "versions are installed, or fit it again here"
    )


class VersionStampMixin:
    """Saves the versions of skproduct and of the libraries a model runs on with an estimator, and warns on load
    when they differ.

    The pickled state holds ``_skproduct_version`` (as before) and
    ``_library_versions`` (see :func:`library_versions`). On load, a library
    whose release differs from the one installed (or that is missing here)
    raises a :class:`~skproduct.exceptions.VersionMismatchWarning` that names
    the estimator and both versions; scikit-learn's own warning covers
    scikit-learn's estimators only, and torch, timm and open_clip change
    weights, preprocessing and numerics between releases.

    A file saved before the stamp existed (no ``_library_versions``, or no
    version at all) gives no warning: what it was saved with is unknown, and
    unknown is not a mismatch (such files load with warnings turned into errors
    in ``tests/test_compat.py``). A file stamped only with
    ``_skproduct_version`` is compared on skproduct alone.

    The state is a copy of the instance's ``__dict__``, so that the
    subclasses' ``__getstate__`` may remove and replace entries (a torch
    module by its CPU state dict) without touching the live estimator.
    """

    def __getstate__(self):
        from . import __version__

        state = dict(super().__getstate__())  # object.__getstate__ gives the live __dict__ itself
        state["_skproduct_version"] = __version__
        state["_library_versions"] = library_versions()
        return state

    def __setstate__(self, state):
        saved = state.get("_library_versions")
        if not isinstance(saved, dict):
            saved = {"skproduct": state["_skproduct_version"]} if "_skproduct_version" in state else {}
        mismatches = version_mismatches(saved)
        if mismatches:
            warnings.warn(_describe_mismatches(type(self).__name__, mismatches), VersionMismatchWarning,
                          stacklevel=2)
        super().__setstate__(state)
