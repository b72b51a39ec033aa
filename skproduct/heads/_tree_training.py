"""The torch side of the tree heads: the per-level loss and the valid-path combination that
:class:`~skproduct.heads.TreeHeadClassifier` and :class:`~skproduct.FineTuneClassifier`'s tree heads share,
and the tree head's network and its training task, run by :class:`~skproduct._training.Trainer`.

Rows are streamed from ``X`` (an array or a :class:`numpy.memmap`, float16, float32 or float64) by shuffled
blocks of contiguous rows: each epoch shuffles the order of the blocks, reads a few of them at a time (sequential
reads, a float32 copy of those rows only), shuffles the rows of that buffer and cuts it into minibatches. Nothing
copies the whole ``X``.

Imported only when a tree head trains, so that ``import skproduct`` never imports torch.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("skproduct.heads.tree")

# Rows read at once (one contiguous block of the training rows) and values per shuffle buffer (float32: 64 MB).
BLOCK_ROWS = 4096
BUFFER_VALUES = 1 << 24
# Values per block of the standardisation's passes (float64: 32 MB).
STAT_BLOCK_VALUES = 1 << 22


def weighted_standardisation(X, sample_weight: np.ndarray, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation (float64) of the columns of ``X[rows]``, two passes over blocks of
    rows (never a float64 copy of ``X``); constant columns get scale 1."""
    n = X.shape[0] if rows is None else len(rows)
    w = (sample_weight if rows is None else sample_weight[rows]).astype(np.float64)
    w = w / w.sum()
    step = max(1, STAT_BLOCK_VALUES // max(1, X.shape[1]))

    def blocks():
        for start in range(0, n, step):
            yield slice(start, start + step), _rows_of(X, rows, start, start + step).astype(np.float64)

    mean = np.zeros(X.shape[1])
    for part, block in blocks():
        mean += w[part] @ block
    var = np.zeros_like(mean)
    for part, block in blocks():
        block -= mean
        var += w[part] @ (block * block)
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, scale


# ---------------------------------------------------------------- shared with FineTuneClassifier


def leaf_log_proba(level_logits: list[torch.Tensor], leaf_codes: torch.Tensor) -> torch.Tensor:
    """Leaf log-probabilities from per-level logits: each level's log-softmax summed along the leaf's path, then
    renormalised over the leaves, so that only the tree's valid paths get probability.

    ``leaf_codes`` is :meth:`CategoryTree.encode` of the leaves, ``(n_leaves, depth)``.
    """
    score = sum(
        F.log_softmax(logits.float(), dim=1)[:, leaf_codes[:, level]] for level, logits in enumerate(level_logits)
    )
    return F.log_softmax(score, dim=1)


def level_losses(level_logits: list[torch.Tensor], targets: torch.Tensor, weights: torch.Tensor,
                 label_smoothing: float = 0.0, level_weights=None) -> torch.Tensor:
    """The summed per-level cross-entropies of a batch: ``sum_l level_weights[l] * CE_l``, where ``CE_l`` is the
    ``weights``-weighted mean cross-entropy (with label smoothing) of level ``l`` against ``targets[:, l]``."""
    total = weights.sum()
    loss = None
    for level, logits in enumerate(level_logits):
        losses = F.cross_entropy(logits.float(), targets[:, level], reduction="none", label_smoothing=label_smoothing)
        term = (losses * weights).sum() / total
        if level_weights is not None:
            term = term * float(level_weights[level])
        loss = term if loss is None else loss + term
    return loss


# ---------------------------------------------------------------- the tree head's network


class TreeHeadNetwork(nn.Module):
    """Standardisation, optional hidden layers (ReLU, dropout), and one linear softmax head per tree level."""

    def __init__(self, n_features: int, hidden_layer_sizes: tuple[int, ...], dropout: float,
                 level_sizes: tuple[int, ...], mean: np.ndarray, scale: np.ndarray, level_priors: list[np.ndarray]):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_scale", torch.as_tensor(1.0 / scale, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden_layer_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, size) for size in level_sizes)
        with torch.no_grad():  # each level starts at its prior: a long tail starts where it is
            for head, prior in zip(self.heads, level_priors):
                head.weight.zero_()
                log_prior = np.log(np.maximum(prior, 1e-12))
                head.bias.copy_(torch.as_tensor(log_prior - log_prior.mean(), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk((x - self.mean) * self.inv_scale)
        return [head(features) for head in self.heads]

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self.trunk if isinstance(m, nn.Linear)]


def _rows_of(X, rows, start: int, stop: int) -> np.ndarray:
    """A copy of ``X``'s rows ``start:stop`` of the training rows (all rows for None): a contiguous read when it
    can be; the pages read are then released from a memory-mapped ``X`` (:func:`~skproduct.heads.tree.release_pages`)."""
    from .tree import release_pages

    if rows is None:
        block = np.array(X[start:stop])
        release_pages(X, start, stop)
        return block
    part = rows[start:stop]
    if not len(part):
        return np.array(X[part])
    if part[-1] - part[0] == len(part) - 1:  # contiguous: a slice, not a gather
        block = np.array(X[part[0] : part[-1] + 1])
    else:
        block = np.asarray(X[part])
    release_pages(X, int(part[0]), int(part[-1]) + 1)
    return block


def _to_tensor(block: np.ndarray, device) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memmap is only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(block)).to(device=device, dtype=torch.float32)


def _check_block_finite(block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        raise ValueError("Input X contains NaN or infinity; remove or impute those rows before fitting")


class TreeHeadTask:
    """The tree head's training as the :class:`~skproduct._training.Trainer` runs it: an epoch of minibatch steps
    over shuffled blocks of rows, the validation loss and leaf accuracy, and the network's state."""

    def __init__(self, est, network: TreeHeadNetwork, X, codes: np.ndarray, weights: np.ndarray, train, val,
                 leaf_codes: np.ndarray, level_weights, *, device, seed: int):
        self.est, self.network, self.X, self.codes, self.weights = est, network, X, codes, weights
        self.train, self.val, self.device = train, val, device
        self.leaf_codes = torch.as_tensor(leaf_codes, dtype=torch.long, device=device)
        self.level_weights = level_weights
        self.n_train = X.shape[0] if train is None else len(train)
        self.batch_size = min(est.batch_size, self.n_train)
        self.block_rows = max(BLOCK_ROWS, self.batch_size)
        self.blocks_per_buffer = max(1, BUFFER_VALUES // (self.block_rows * max(1, X.shape[1])))
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        decay = [p for p in network.parameters() if p.ndim > 1]
        no_decay = [p for p in network.parameters() if p.ndim <= 1]
        # Adam's weight decay adds alpha * W to the gradient: the gradient of alpha / 2 * ||W||^2 (never on biases).
        self.optimizer = torch.optim.Adam(
            [{"params": decay, "weight_decay": float(est.alpha)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=est.learning_rate,
        )
        self.checked_finite = False

    def _buffers(self):
        """Yield ``(X, codes, weights)`` tensors of a few shuffled blocks of the training rows at a time."""
        starts = np.arange(0, self.n_train, self.block_rows)
        self.rng.shuffle(starts)
        for group in range(0, len(starts), self.blocks_per_buffer):
            chosen = np.sort(starts[group : group + self.blocks_per_buffer])  # read in file order
            pieces = [_rows_of(self.X, self.train, s, s + self.block_rows) for s in chosen]
            block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            if not self.checked_finite:
                _check_block_finite(block)
            index = np.concatenate([
                np.arange(s, min(s + self.block_rows, self.n_train)) if self.train is None
                else self.train[s : s + self.block_rows] for s in chosen
            ])
            yield (_to_tensor(block, self.device), torch.as_tensor(self.codes[index], device=self.device),
                   torch.as_tensor(self.weights[index], dtype=torch.float32, device=self.device))

    def train_epoch(self, trainer) -> dict:
        self.network.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        total_weight = 0.0
        for xb, cb, wb in self._buffers():
            order = torch.randperm(len(xb), generator=self.generator).to(self.device)
            for start in range(0, len(xb), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch_w = wb[rows]
                weight = float(batch_w.sum())
                if weight == 0.0:
                    continue
                loss = level_losses(self.network(xb[rows]), cb[rows], batch_w, self.est.label_smoothing,
                                    self.level_weights)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += loss.detach().double() * weight
                total_weight += weight
            if trainer.progress is not None:
                trainer.progress.update(len(xb))
        self.checked_finite = True
        loss = float(total) / max(total_weight, 1e-300)
        if not math.isfinite(loss):
            raise ValueError(
                f"the training loss became {loss} at epoch {trainer.epoch + 1}: the learning_rate "
                f"{self.est.learning_rate} is too large for this data; lower it"
            )
        return {"train_loss": loss}

    def validate(self) -> dict:
        if self.val is None:
            return {}
        self.network.eval()
        loss = right = weight = 0.0
        with torch.no_grad():
            for start in range(0, len(self.val), BLOCK_ROWS):
                index = self.val[start : start + BLOCK_ROWS]
                block = _rows_of(self.X, self.val, start, start + BLOCK_ROWS)
                if not self.checked_finite:
                    _check_block_finite(block)
                logits = self.network(_to_tensor(block, self.device))
                codes = torch.as_tensor(self.codes[index], device=self.device)
                w = torch.as_tensor(self.weights[index], dtype=torch.float32, device=self.device)
                w_sum = float(w.sum())
                if w_sum == 0.0:
                    continue
                loss += float(level_losses(logits, codes, w, 0.0, self.level_weights)) * w_sum
                predicted = leaf_log_proba(logits, self.leaf_codes).argmax(dim=1)
                right += float((w * (predicted == codes[:, -1])).sum())
                weight += w_sum
        return {"valid_loss": loss / weight, "valid_accuracy": right / weight}

    def weights_copy(self) -> dict:
        return {name: value.detach().clone() for name, value in self.network.state_dict().items()}

    def state_dict(self) -> dict:
        return {"network": self.weights_copy(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])


def _describe_epoch(record: dict) -> str:
    text = f"epoch {record['epoch']}: loss {record['train_loss']:.6f}"
    if "valid_loss" in record:
        text += f", validation loss {record['valid_loss']:.5f}, leaf accuracy {record['valid_accuracy']:.5f}"
    return text


def train_tree_head(est, *, X, codes, weights, train, val, mean, scale, level_sizes, level_priors, leaf_codes,
                    level_weights, seed: int) -> dict:
    """Build the network, run the epochs (early stopping, keep-best, progress) and return its weights as numpy.

    The returned ``"layers"`` are ``(W, b)`` float32 pairs on the *raw* features (the standardisation folded into
    the first layer): the hidden layers in order, then one pair per level.
    """
    from sklearn.exceptions import ConvergenceWarning

    from .._training import EarlyStopping, KeepBest, Progress, Trainer
    from ..image_pipeline.device import resolve_device
    from ._linear_training import _SMALL_STEP, _one_torch_thread

    device = resolve_device(est.device)
    n_rows = X.shape[0] if train is None else len(train)
    widest = max([X.shape[1], *est.hidden_layer_sizes])
    small = device.type == "cpu" and min(est.batch_size, n_rows) * sum(level_sizes) * widest < _SMALL_STEP
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        threads = _one_torch_thread() if small else _no_change()
        with threads:
            network = TreeHeadNetwork(X.shape[1], tuple(est.hidden_layer_sizes), float(est.dropout), level_sizes,
                                      mean, scale, level_priors).to(device)
            task = TreeHeadTask(est, network, X, codes, weights, train, val, leaf_codes, level_weights,
                                device=device, seed=seed)
            keep = None
            if val is not None:
                keep = KeepBest("valid_loss", task.weights_copy, network.load_state_dict)
                parts = [EarlyStopping("valid_loss", patience=est.n_iter_no_change, tol=est.tol), keep]
            else:
                parts = [EarlyStopping("train_loss", patience=est.n_iter_no_change, tol=est.tol)]
            parts.append(Progress(est.verbose, describe=_describe_epoch, items_per_epoch=n_rows, unit="row",
                                  label="TreeHeadClassifier"))
            trainer = Trainer(task, parts, est.max_iter)
            history = trainer.fit()
    if not trainer.should_stop:
        warnings.warn(
            f"TreeHeadClassifier: max_iter={est.max_iter} reached and the "
            f"{'validation loss' if val is not None else 'training loss'} still improves; raise max_iter (or tol)",
            ConvergenceWarning,
        )
    network.eval()
    return {
        "layers": _raw_layers(network, mean, scale),
        "n_iter_": len(history),
        "loss_curve_": [record["train_loss"] for record in history],
        "validation_scores_": None if val is None else [record["valid_accuracy"] for record in history],
        "validation_loss_curve_": None if val is None else [record["valid_loss"] for record in history],
        "best_iteration_": None if keep is None else keep.best_epoch,
    }


class _no_change:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _raw_layers(network: TreeHeadNetwork, mean: np.ndarray, scale: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """``(W (n_in, n_out), b)`` float32 pairs on raw features: the standardisation folded into the first layer."""
    def pair(linear: nn.Linear):
        return (linear.weight.detach().cpu().double().numpy().T, linear.bias.detach().cpu().double().numpy())

    pairs = [pair(layer) for layer in network.linear_layers()]
    heads = [pair(head) for head in network.heads]
    first = [pairs[0]] if pairs else heads
    for i, (W, b) in enumerate(first):
        W_raw = W / scale[:, None]
        first[i] = (W_raw, b - mean @ W_raw)
    if pairs:
        pairs[0] = first[0]
    else:
        heads = first
    return [(W.astype(np.float32), b.astype(np.float32)) for W, b in [*pairs, *heads]]
