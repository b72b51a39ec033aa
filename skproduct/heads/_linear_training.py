"""The training of :class:`~skproduct.heads.TorchLinearClassifier`: minibatch Adam on the standardised rows.

Holds the weighted standardisation of the features (numpy), the epochs run by
:class:`~skproduct._training.Trainer` on torch tensors (the hand-written gradient of the
softmax cross-entropy, the validation loss and accuracy), and the switch to one torch
thread for small CPU fits. Torch is imported inside the functions only, so importing this
module stays light.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

# Named after the estimator's module, where these messages were logged before the training moved here.
logger = logging.getLogger("skproduct.heads.linear")

# Below this many multiply-adds per step (batch x classes x features), CPU training runs on one torch
# thread: waking a second thread costs more than it saves, and on a busy machine far more (a 20-class,
# 40-feature fit took 7.8 s with two threads and 0.11 s with one on a loaded 2-core machine).
_SMALL_STEP = 1 << 22
# Plateaus of the training loss that divide the learning rate by 10 before the next one ends training.
_LR_DROPS = 2
_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"users": 0, "before": None}


def _weighted_standardisation(X, sample_weight, rows=None):
    """Weighted mean and standard deviation of the columns of ``X[rows]`` (float64), in blocks of 32 MB.

    Constant columns get scale 1.
    """
    w = sample_weight if rows is None else sample_weight[rows]
    w = w / w.sum()
    step = max(1, (1 << 22) // max(1, X.shape[1]))
    blocks = [slice(start, start + step) for start in range(0, len(w), step)]

    def block_of(part):
        return (X[part] if rows is None else X[rows[part]]).astype(np.float64)

    mean = np.zeros(X.shape[1], dtype=np.float64)
    for part in blocks:
        mean += w[part] @ block_of(part)
    var = np.zeros_like(mean)
    for part in blocks:
        centred = block_of(part) - mean
        var += w[part] @ (centred * centred)
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, scale


def _train(est, *, X, train, n_classes, **data):
    """Resolve the device and run the epochs, on one CPU thread when the steps are small."""
    from ..image_pipeline.device import resolve_device

    device = resolve_device(est.device)
    n_rows = X.shape[0] if train is None else len(train)
    small = device.type == "cpu" and min(est.batch_size, n_rows) * n_classes * X.shape[1] < _SMALL_STEP
    with _one_torch_thread() if small else contextlib.nullcontext():
        return _train_on(device, est, X=X, train=train, n_classes=n_classes, **data)


@contextlib.contextmanager
def _one_torch_thread():
    """Run torch on one intra-op thread, restoring the previous count when the last user leaves."""
    import torch

    with _THREADS_LOCK:
        if _THREADS_STATE["users"] == 0:
            _THREADS_STATE["before"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["users"] -= 1
            if _THREADS_STATE["users"] == 0:
                torch.set_num_threads(_THREADS_STATE["before"])


def _train_on(device, est, *, X, y, weight, train, val, mean, scale, n_classes, seed):
    """Run the epochs; return the standardised-space weights (float64 numpy) and the fitted curves."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    wide = torch.float32 if device.type == "mps" else torch.float64  # sums over epochs (MPS has no float64)

    def to_device(array, dtype):
        return torch.as_tensor(array, dtype=dtype).to(device)

    mean_t = to_device(mean, torch.float32)
    inv_scale_t = to_device(1.0 / scale, torch.float32)

    def standardised(rows, dtype=torch.float32):
        """Standardised copy of ``X[rows]`` (all rows for None) on the device, built in 64 MB blocks."""
        n = X.shape[0] if rows is None else len(rows)
        out = torch.empty((n, X.shape[1]), dtype=dtype, device=device)
        step = max(1, (1 << 24) // max(1, X.shape[1]))
        for start in range(0, n, step):
            part = X[start : start + step] if rows is None else X[rows[start : start + step]]
            with warnings.catch_warnings():  # read-only input (a memmap): only ever read here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                block = torch.from_numpy(part).to(device)
            # Never in place on ``block``: it may be the caller's read-only memory (a memmap).
            out[start : start + step] = torch.sub(block.to(torch.float32), mean_t).mul_(inv_scale_t)
        return out

    X_val = y_val = w_val = None
    if val is not None:
        X_val = standardised(val)
        y_val = to_device(y[val], torch.int64)
        w_val = to_device(weight[val], wide)

    compute = _matmul_dtype(est.precision, device)
    X_train = standardised(train, compute)
    y_fit, w_fit = (y, weight) if train is None else (y[train], weight[train])
    prior = np.bincount(y_fit, weights=w_fit, minlength=n_classes)
    prior = np.maximum(prior / prior.sum(), 1e-12)
    W = torch.zeros(n_classes, X_train.shape[1], dtype=torch.float32, device=device)
    b = to_device(np.log(prior) - np.log(prior).mean(), torch.float32)
    task = _LinearTask(
        est, X_train, to_device(y_fit, torch.int64),
        # Normalised so that a batch's loss is an unbiased estimate of the weighted mean over all rows.
        to_device(w_fit / w_fit.mean(), torch.float32), X_val, y_val, w_val, W, b, generator=generator, wide=wide,
        compute=compute,
    )
    from .._training import EarlyStopping, KeepBest, Progress, Trainer

    if val is not None:
        keep = KeepBest("valid_loss", task.weights, task.set_weights)
        parts = [EarlyStopping("valid_loss", patience=est.n_iter_no_change, tol=est.tol), keep]
    else:
        keep = None
        parts = [EarlyStopping("train_loss", patience=est.n_iter_no_change, tol=est.tol, reductions=_LR_DROPS,
                               reduce=task.divide_learning_rate)]
    parts.append(Progress(est.verbose, describe=_describe_epoch, label="TorchLinearClassifier"))
    trainer = Trainer(task, parts, est.max_iter)
    history = trainer.fit()
    if not trainer.should_stop:
        warnings.warn(
            f"TorchLinearClassifier: max_iter={est.max_iter} reached and the "
            f"{'validation loss' if val is not None else 'training loss'} still improves; "
            "raise max_iter (or tol)",
            ConvergenceWarning,
        )
    W, b = task.W, task.b
    return {
        "weights": (W.detach().cpu().double().numpy(), b.detach().cpu().double().numpy()),
        "n_iter_": len(history),
        "loss_curve_": [record["train_loss"] for record in history],
        "validation_scores_": None if val is None else [record["valid_accuracy"] for record in history],
        "validation_loss_curve_": None if val is None else [record["valid_loss"] for record in history],
        "best_iteration_": None if keep is None else keep.best_epoch,
    }


def _matmul_dtype(precision: str, device):
    """The dtype of the training matmuls: bf16 where ``precision`` asks for it or, for ``"auto"``, where the
    device computes it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16); float32 otherwise.

    Only the two products of a step (logits and the weight gradient) run in it: the weights, Adam's moments, the
    softmax and every sum stay float32, and the validation loss is computed in float32.
    """
    import torch

    from ..image_pipeline.device import cpu_native_bf16

    if precision == "fp32" or device.type == "mps":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_native_bf16()
    return torch.bfloat16 if native else torch.float32


def _describe_epoch(record: dict) -> str:
    text = f"epoch {record['epoch']}: loss {record['train_loss']:.6f}"
    if "valid_loss" in record:
        text += f", validation loss {record['valid_loss']:.5f}, accuracy {record['valid_accuracy']:.5f}"
    return text


class _LinearTask:
    """The softmax head's training as the :class:`~skproduct._training.Trainer` runs it: shuffled minibatch
    Adam steps on device tensors, the validation loss and accuracy, and its weights."""

    def __init__(self, est, X, y, w, X_val, y_val, w_val, W, b, *, generator, wide, compute):
        import torch

        self.X, self.y, self.w, self.X_val, self.y_val, self.w_val = X, y, w, X_val, y_val, w_val
        self.W, self.b, self.generator, self.wide, self.compute = W, b, generator, wide, compute
        self.W.grad, self.b.grad = torch.zeros_like(W), torch.zeros_like(b)
        self.optimizer = torch.optim.Adam([W, b], lr=est.learning_rate)
        self.batch_size = min(est.batch_size, len(X))
        self.smoothing, self.alpha, self.learning_rate = float(est.label_smoothing), float(est.alpha), est.learning_rate

    def train_epoch(self, trainer) -> dict:
        import torch

        n = len(self.X)
        order = torch.randperm(n, generator=self.generator).to(self.X.device)
        total = torch.zeros((), dtype=self.wide, device=self.X.device)
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            loss = _step(self.X[rows], self.y[rows], self.w[rows], self.W, self.b, self.smoothing, self.alpha,
                         self.compute)
            total += loss.to(self.wide) * len(rows)
            self.optimizer.step()
        loss = total.item() / n + 0.5 * self.alpha * float(torch.sum(self.W * self.W))
        if not math.isfinite(loss):
            raise ValueError(
                f"the training loss became {loss} at epoch {trainer.epoch + 1}: the learning_rate "
                f"{self.learning_rate} is too large for this data; lower it"
            )
        return {"train_loss": loss}

    def validate(self) -> dict:
        if self.X_val is None:
            return {}
        loss, accuracy = _loss_and_accuracy(self.X_val, self.y_val, self.w_val, self.W, self.b)
        return {"valid_loss": loss, "valid_accuracy": accuracy}

    def weights(self) -> dict:
        return {"W": self.W.detach().clone(), "b": self.b.detach().clone()}

    def set_weights(self, weights: dict) -> None:
        self.W, self.b = weights["W"], weights["b"]

    def divide_learning_rate(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] /= 10
        logger.info("training loss plateaued: learning rate divided by 10")

    def state_dict(self) -> dict:
        return {**self.weights(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.W.data.copy_(state["W"])
        self.b.data.copy_(state["b"])
        self.optimizer.load_state_dict(state["optimizer"])


def _step(xb, yb, wb, W, b, smoothing, alpha, compute=None):
    """Weighted smoothed cross-entropy of one batch; writes its gradients (plus the L2 term) into W.grad, b.grad.

    The gradient is written by hand (softmax minus target, in place on the one batch x classes array): about a
    third faster than autograd on CPU, and half the memory. With ``compute=torch.bfloat16`` (``xb`` already
    bf16) the two matrix products run in bf16 and everything else in float32.
    """
    import torch

    with torch.no_grad():
        n, k = len(yb), W.shape[0]
        low = compute is not None and compute != torch.float32
        z = torch.mm(xb, W.to(compute).T).float().add_(b) if low else torch.addmm(b, xb, W.T)
        z.sub_(z.amax(dim=1, keepdim=True))
        losses = z.gather(1, yb[:, None]).squeeze(1).mul_(smoothing - 1.0)
        if smoothing:
            losses.sub_(z.sum(dim=1), alpha=smoothing / k)
        p = z.exp_()
        norm = p.sum(dim=1)
        losses.add_(norm.log())
        scaled = wb / n
        loss = torch.dot(losses, scaled)

        p.mul_((scaled / norm)[:, None])  # weighted softmax
        p.scatter_add_(1, yb[:, None], (scaled * (smoothing - 1.0))[:, None])
        if smoothing:
            p.sub_((scaled * (smoothing / k))[:, None])
        if low:
            W.grad.copy_(torch.mm(p.T.to(compute), xb))
        else:
            W.grad.addmm_(p.T, xb, beta=0.0)
        torch.sum(p, dim=0, out=b.grad)
        if alpha:
            W.grad.add_(W, alpha=alpha)
    return loss


def _loss_and_accuracy(X, y, w, W, b, block=8192) -> tuple[float, float]:
    """Weighted mean log loss and accuracy of the rows ``X`` (standardised, on the device)."""
    import torch

    with torch.no_grad():
        loss = torch.zeros((), dtype=w.dtype, device=X.device)
        right = torch.zeros((), dtype=w.dtype, device=X.device)
        for start in range(0, X.shape[0], block):
            z = torch.addmm(b, X[start : start + block], W.T)
            rows = slice(start, start + block)
            picked = torch.log_softmax(z, dim=1).gather(1, y[rows, None]).squeeze(1)
            loss -= (w[rows] * picked.to(w.dtype)).sum()
            right += (w[rows] * (z.argmax(dim=1) == y[rows])).sum()
        total = w.sum()
        return float(loss / total), float(right / total)
