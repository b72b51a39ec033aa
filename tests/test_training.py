"""The trainer made of parts: each part's state round-trips, and checkpoints of another layout are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skproduct._training import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    EarlyStopping,
    KeepBest,
    LearningRateSchedule,
    Trainer,
    holdout_split,
)


class _Quadratic:
    """A task whose loss follows a given curve; its 'weights' are the epoch reached."""

    def __init__(self, curve):
        self.curve, self.weights = list(curve), {"epoch": 0}

    def train_epoch(self, trainer):
        self.weights = {"epoch": trainer.epoch + 1}
        return {"train_loss": self.curve[trainer.epoch]}

    def validate(self):
        return {}

    def state_dict(self):
        return dict(self.weights)

    def load_state_dict(self, state):
        self.weights = dict(state)


def test_early_stopping_waits_for_patience_and_keep_best_restores():
    curve = [5.0, 3.0, 2.0, 2.5, 2.4, 2.6, 1.0]
    task = _Quadratic(curve)
    keep = KeepBest("train_loss", lambda: dict(task.weights), task.load_state_dict)
    trainer = Trainer(task, [EarlyStopping("train_loss", patience=3), keep], max_iter=len(curve))
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]  # three epochs without improvement after epoch 3
    assert keep.best_epoch == 3 and task.weights == {"epoch": 3}


def test_plateaus_first_lower_the_learning_rate():
    drops = []
    curve = [1.0] * 10
    stopping = EarlyStopping("train_loss", patience=2, reductions=2, reduce=lambda: drops.append(1))
    history = Trainer(_Quadratic(curve), [stopping], max_iter=10).fit()
    assert len(drops) == 2 and len(history) == 7  # 1 + 2 (drop) + 2 (drop) + 2 (stop)


def test_parts_state_round_trips():
    stopping = EarlyStopping("valid_loss", patience=3, tol=0.1)
    stopping.best, stopping.stale, stopping.reduced = 0.5, 2, 1
    again = EarlyStopping("valid_loss", patience=3, tol=0.1)
    again.load_state_dict(stopping.state_dict())
    assert again.state_dict() == stopping.state_dict()
    with pytest.raises(ValueError, match="another version of skproduct"):
        again.load_state_dict({"best": 1.0, "stale_epochs": 0, "reduced": 0})  # a renamed field breaks loudly


def test_a_checkpoint_resumes_and_one_of_another_format_is_refused(tmp_path):
    import torch

    path = tmp_path / "c.pt"
    curve = [4.0, 3.0, 2.0, 1.0]
    first = Trainer(_Quadratic(curve), [EarlyStopping("train_loss", patience=5), Checkpoint(path, total_epochs=2)],
                    max_iter=2)
    first.fit()
    task = _Quadratic(curve)
    resumed = Trainer(task, [EarlyStopping("train_loss", patience=5), Checkpoint(path, total_epochs=4)], max_iter=4)
    history = resumed.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and task.weights == {"epoch": 4}

    torch.save({"format": CHECKPOINT_FORMAT - 1}, path)
    with pytest.raises(ValueError, match="format 1.*remove it"):
        Trainer(_Quadratic(curve), [Checkpoint(path, total_epochs=4)], max_iter=4).fit()


def test_the_schedule_warms_up_then_decays_per_phase():
    schedule = LearningRateSchedule(1.0, 4, 0.25, phase_of=lambda epoch: (0, 2) if epoch < 2 else (2, 2))
    trainer = Trainer(_Quadratic([1.0] * 4), [schedule], max_iter=4)
    rates = []
    for epoch in range(4):
        trainer.epoch = epoch
        schedule.on_epoch_start(trainer)
        rates.append([trainer.learning_rate_at(s) for s in range(4)])
    assert rates[0][:2] == rates[2][:2] == [0.5, 1.0] and math.isclose(rates[1][-1], 0.01)  # a fresh warm-up per phase


def test_holdout_split_rounds_up_and_stratifies():
    labels = np.array([0] * 15 + [1] * 15)
    train, valid = holdout_split(labels, 0.1, 0)
    assert len(valid) == 3 and len(train) == 27 and set(labels[valid]) == {0, 1}
    with pytest.raises(ValueError, match="early_stopping"):
        holdout_split(labels[:1], 0.5, 0)
