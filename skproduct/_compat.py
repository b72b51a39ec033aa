"""Reading estimators saved by earlier versions of skproduct: renamed parameters and attributes, upgraded on load.

Each saved estimator's ``__setstate__`` passes its state through the function
here, so that a model saved before a rename loads with the same behaviour
(and a file that no upgrade can read says so, instead of misbehaving later).
"""

from __future__ import annotations

__all__ = ["VersionStampMixin", "upgrade_finetune_state", "upgrade_torch_linear_state"]

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
    {'max_iter': 5}
    """
    return _renamed(state, _TORCH_LINEAR_RENAMES)


class VersionStampMixin:
    """Saves the skproduct version with an estimator (``_skproduct_version`` in its pickled state), as
    scikit-learn saves its own, so that a file says which format it holds."""

    def __getstate__(self):
        from . import __version__

        state = super().__getstate__()
        state["_skproduct_version"] = __version__
        return state
