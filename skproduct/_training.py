"""The trainer made of parts: one loop that runs epochs, and the parts it calls around them.

:class:`Trainer` runs the epochs of a *task* (an object with
``train_epoch(trainer)``, ``validate()``, ``state_dict()`` and
``load_state_dict()``; :class:`~skproduct.FineTuneClassifier` and
:class:`~skproduct.TorchLinearClassifier` each have one) and calls its parts
before and after each epoch. Each concern is one part, and each part keeps
its own state with ``state_dict()`` / ``load_state_dict()``, so that a
checkpoint is the trainer's, the task's and every part's state under their
names, and renaming a field breaks loudly (a new :data:`CHECKPOINT_FORMAT`),
never silently:

- :class:`EarlyStopping`: stop (or first lower the learning rate) after
  ``patience`` epochs without an improvement of ``tol`` in a monitored value;
- :class:`KeepBest`: keep the weights of the best epoch and restore them at the end;
- :class:`LearningRateSchedule`: linear warm-up and cosine decay, per step, per phase;
- :class:`Checkpoint`: write everything atomically after each epoch, resume from it;
- :class:`Progress`: a progress bar and a log line per epoch.

Nothing here imports torch at module level: the heads stay importable without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "EarlyStopping",
    "KeepBest",
    "LearningRateSchedule",
    "Part",
    "Progress",
    "Trainer",
    "holdout_split",
    "learning_rate_factor",
]

#: The layout of checkpoints; a file of another format is refused with a clear error.
CHECKPOINT_FORMAT = 2
_FINAL_LR_FRACTION = 0.01  # the cosine decays to 1% of the peak learning rate


class Part:
    """A piece of the training loop; every hook does nothing unless a part overrides it."""

    #: The key of this part's state in a checkpoint.
    name = "part"

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resume, before the first epoch still to run)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before each epoch."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """After each epoch, with its record (already in ``trainer.history``)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict:
        """The part's state, for a checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; unknown or missing keys are an error."""
        _check_keys(self.name, state, self.state_dict())
        for key, value in state.items():
            setattr(self, key, value)


def _check_keys(name: str, state: dict, expected: dict) -> None:
    if set(state) != set(expected):
        raise ValueError(
            f"the checkpoint's {name!r} state has keys {sorted(state)} but {sorted(expected)} were expected: "
            "it was written by another version of skproduct; remove it to train from the start"
        )


class Trainer:
    """Run ``max_iter`` epochs of ``task``, calling ``parts`` around each.

    Parameters
    ----------
    task : object
        ``train_epoch(trainer) -> dict`` (the epoch's figures, such as
        ``train_loss``), ``validate() -> dict`` (``{}`` without a validation
        set), ``state_dict()`` and ``load_state_dict(state)``.
    parts : list of Part
        Called in order; a :class:`Checkpoint` goes last.
    max_iter : int
        The most epochs.

    Attributes
    ----------
    epoch : int
        Epochs finished.
    history : list of dict
        One record per epoch: ``epoch`` (1-based), then the task's figures.
    should_stop : bool
        Set by a part to end training after the current epoch.

    Examples
    --------
    >>> class Count:
    ...     def __init__(self): self.loss = 1.0
    ...     def train_epoch(self, trainer): self.loss *= 0.5; return {"train_loss": self.loss}
    ...     def validate(self): return {}
    >>> trainer = Trainer(Count(), [EarlyStopping("train_loss", patience=1, tol=0.2)], max_iter=10)
    >>> [round(r["train_loss"], 3) for r in trainer.fit()]
    [0.5, 0.25, 0.125]
    """

    def __init__(self, task, parts: list[Part], max_iter: int, first_epoch: int = 0):
        self.task, self.parts, self.max_iter = task, list(parts), max_iter
        self.epoch, self.first_epoch = 0, first_epoch
        self.history: list[dict] = []
        self.should_stop = False
        self.learning_rate_at: Callable[[int], float] | None = None
        self.progress = None

    def fit(self) -> list[dict]:
        """Run the epochs; return :attr:`history`."""
        for part in self.parts:
            part.on_fit_start(self)
        while self.epoch < self.max_iter and not self.should_stop:
            for part in self.parts:
                part.on_epoch_start(self)
            record = {"epoch": self.first_epoch + self.epoch + 1, **self.task.train_epoch(self)}
            record.update(self.task.validate())
            self.history.append(record)
            self.epoch += 1
            for part in self.parts:
                part.on_epoch_end(self, record)
        for part in self.parts:
            part.on_fit_end(self)
        return self.history

    def state_dict(self) -> dict:
        """Epochs done, the history and whether a part asked to stop."""
        return {"epoch": self.epoch, "history": list(self.history), "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        _check_keys("trainer", state, self.state_dict())
        self.epoch, self.history, self.should_stop = state["epoch"], list(state["history"]), state["should_stop"]


def _better(value: float, best: float, mode: str, tol: float) -> bool:
    return value < best - tol if mode == "min" else value > best + tol


class EarlyStopping(Part):
    """Stop after ``patience`` epochs without an improvement of more than ``tol`` in ``monitor``.

    With ``reductions`` and ``reduce``, the first plateaus call ``reduce()``
    (which lowers the learning rate) and training goes on; the next one ends
    it. The first ``counts_from`` epochs of a fit (a head-only phase) update
    the best value but never use up patience.
    """

    name = "early_stopping"

    def __init__(self, monitor: str, *, mode: str = "min", patience: int, tol: float = 0.0, reductions: int = 0,
                 reduce: Callable[[], None] | None = None, counts_from: int = 0):
        self.monitor, self.mode, self.patience, self.tol = monitor, mode, patience, tol
        self.reductions, self.reduce, self.counts_from = reductions, reduce, counts_from
        self.best = math.inf if mode == "min" else -math.inf
        self.stale = 0
        self.reduced = 0

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        value = record[self.monitor]
        improved = _better(value, self.best, self.mode, self.tol)
        if value < self.best if self.mode == "min" else value > self.best:
            self.best = value
        if improved:
            self.stale = 0
        elif trainer.epoch > self.counts_from:
            self.stale += 1
        if self.stale >= self.patience:
            if self.reduced < self.reductions and self.reduce is not None:
                self.reduced += 1
                self.stale = 0
                self.reduce()
            else:
                trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"best": self.best, "stale": self.stale, "reduced": self.reduced}


class KeepBest(Part):
    """Keep the task's weights of the epoch with the best ``monitor``; restore them when training ends.

    ``start`` is ``(value, weights)`` of the model training starts from (a
    warm start): an epoch must beat it to replace it.
    """

    name = "keep_best"

    def __init__(self, monitor: str, get_weights: Callable[[], dict], set_weights: Callable[[dict], None], *,
                 mode: str = "min", start: tuple[float, dict] | None = None, start_epoch: int = 0):
        self.monitor, self.mode = monitor, mode
        self.get_weights, self.set_weights = get_weights, set_weights
        self.best_value = math.inf if mode == "min" else -math.inf
        self.best_epoch, self.best_weights = start_epoch, None
        if start is not None:
            self.best_value, self.best_weights = start

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        value = record[self.monitor]
        if value < self.best_value if self.mode == "min" else value > self.best_value:
            self.best_value, self.best_epoch, self.best_weights = value, record["epoch"], self.get_weights()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.best_weights is not None and trainer.history and self.best_epoch != trainer.history[-1]["epoch"]:
            self.set_weights(self.best_weights)
            logger.info("kept the weights of epoch %d (best %s)", self.best_epoch, self.monitor)

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_weights": self.best_weights}


def learning_rate_factor(step: int, n_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 1% of the peak.

    Examples
    --------
    >>> [round(learning_rate_factor(s, 10, 0.2), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.395, 0.01]
    """
    warmup = math.ceil(warmup_fraction * n_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, n_steps - warmup - 1))
    return _FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


class LearningRateSchedule(Part):
    """Per-step learning rates: linear warm-up then cosine decay within each phase.

    ``phase_of(epoch) -> (first epoch of the phase, epochs in the phase)``;
    each phase warms up afresh. Sets ``trainer.learning_rate_at(step)`` before
    each epoch.
    """

    name = "learning_rate_schedule"

    def __init__(self, peak: float, steps_per_epoch: int, warmup_fraction: float,
                 phase_of: Callable[[int], tuple[int, int]]):
        self.peak, self.steps_per_epoch, self.warmup_fraction, self.phase_of = (
            peak, steps_per_epoch, warmup_fraction, phase_of
        )

    def on_epoch_start(self, trainer: Trainer) -> None:
        phase_start, phase_epochs = self.phase_of(trainer.epoch)
        base, total = (trainer.epoch - phase_start) * self.steps_per_epoch, phase_epochs * self.steps_per_epoch

        def at(step: int) -> float:
            return self.peak * learning_rate_factor(base + step, total, self.warmup_fraction)

        trainer.learning_rate_at = at


class Progress(Part):
    """A progress bar (when ``verbose``) and one INFO log line per epoch.

    With ``items_per_epoch``, one bar per epoch counts items (the task calls
    ``trainer.progress.update(n)``); without, one bar counts epochs.
    """

    name = "progress"

    def __init__(self, verbose: int, *, describe: Callable[[dict], str], items_per_epoch: int | None = None,
                 unit: str = "img", label: str = "epoch", total_epochs: int | None = None):
        self.verbose, self.describe, self.items_per_epoch = verbose, describe, items_per_epoch
        self.unit, self.label, self.total_epochs = unit, label, total_epochs
        self._bar = None

    def _tqdm(self, **kwargs):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.verbose, **kwargs)

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.items_per_epoch is None:
            self._bar = self._tqdm(total=trainer.max_iter, initial=trainer.epoch, desc=self.label, unit="epoch")

    def on_epoch_start(self, trainer: Trainer) -> None:
        if self.items_per_epoch is not None:
            total = self.total_epochs or trainer.max_iter
            trainer.progress = self._tqdm(
                total=self.items_per_epoch, unit=self.unit,
                desc=f"{self.label} {trainer.first_epoch + trainer.epoch + 1}/{trainer.first_epoch + total}",
            )

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if trainer.progress is not None:
            trainer.progress.close()
            trainer.progress = None
        if self._bar is not None:
            self._bar.update(1)
        if self.verbose:
            logger.info(self.describe(record))

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()


class Checkpoint(Part):
    """Write the trainer's, the task's and every part's state to ``path`` after each epoch; resume from it.

    The file is written atomically (a killed run leaves the previous
    checkpoint whole), holds :data:`CHECKPOINT_FORMAT` and carries its SHA-256
    (see :mod:`skproduct._checkpoints`). The last two are kept: before each
    write, the checkpoint there (when it verifies) becomes ``name.prev.pt``. On
    resume, a damaged checkpoint is passed over with a
    :class:`~skproduct.exceptions.StaleFileWarning` for the previous one, and
    when neither is good training restarts from the first epoch (with that
    warning); a file of another format is refused with an error that says to
    remove it.
    """

    name = "checkpoint"

    def __init__(self, path: Path, *, total_epochs: int):
        self.path, self.total_epochs = Path(path), total_epochs

    def on_fit_start(self, trainer: Trainer) -> None:
        from ._checkpoints import load_latest_checkpoint

        payload = load_latest_checkpoint(self.path, CHECKPOINT_FORMAT)
        if payload is None:
            return
        trainer.load_state_dict(payload["trainer"])
        trainer.task.load_state_dict(payload["task"])
        parts = {part.name: part for part in trainer.parts if part is not self}
        _check_keys("parts", payload["parts"], parts)
        for name, state in payload["parts"].items():
            parts[name].load_state_dict(state)
        logger.info("resuming from %s: %d of %d epochs done", self.path, trainer.epoch, self.total_epochs)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        from . import _checkpoints

        payload = {
            "format": CHECKPOINT_FORMAT,
            "trainer": trainer.state_dict(),
            "task": trainer.task.state_dict(),
            "parts": {part.name: part.state_dict() for part in trainer.parts if part is not self},
        }
        _checkpoints.keep_as_previous(self.path)
        _checkpoints.save_checkpoint(self.path, payload)


def holdout_split(labels: np.ndarray, fraction: float, random_state, what: str = "rows") -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions ``(train, validation)``: ``ceil(fraction * n)`` held out (as scikit-learn's
    ``train_test_split`` rounds), stratified when every class can be split.

    Examples
    --------
    >>> train, valid = holdout_split(np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1]), 0.2, 0)
    >>> len(train), len(valid)
    (8, 2)
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_valid = math.ceil(fraction * n)
    if n < 2 or n_valid >= n:
        raise ValueError(
            f"early_stopping needs at least one training and one validation {what[:-1]}, but {n} {what} with "
            f"validation_fraction={fraction} leave none for one of them: use more {what} or set early_stopping=False"
        )
    index = np.arange(n)
    try:
        train, valid = train_test_split(index, test_size=n_valid, random_state=random_state, stratify=labels)
    except ValueError:  # a class with one member, or fewer held-out items than classes
        train, valid = train_test_split(index, test_size=n_valid, random_state=random_state)
    return np.sort(train), np.sort(valid)
