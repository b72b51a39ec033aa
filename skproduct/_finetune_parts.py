"""Fine-tuning's torch parts: the network (backbone + one head per tree level), the default augmentation, the
optimiser, and the task the :class:`~skproduct._training.Trainer` runs (one epoch of steps, validation, state).

Imported only when :class:`~skproduct.FineTuneClassifier` trains or predicts, so that ``import skproduct`` never
imports torch.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ._checkpoints import cpu_state
from .backbones import Preprocessing
from .heads._tree_training import leaf_log_proba, level_losses
from .image_pipeline.data import ImageDataset
from .image_pipeline.device import autocast_dtype
from .image_pipeline.worker_signals import WorkerLoader


class ClassifierNetwork(nn.Module):
    """A backbone with one linear head per tree level.

    ``forward`` returns the list of per-level logits; :meth:`leaf_log_proba`
    combines them over the tree's valid paths only (a flat classifier is a
    one-level tree), so every prediction is a leaf with a valid path.
    """

    def __init__(self, backbone: nn.Module, n_features: int, level_sizes: tuple[int, ...], leaf_codes: np.ndarray):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(n_features, size) for size in level_sizes)
        self.register_buffer("leaf_codes", torch.as_tensor(leaf_codes, dtype=torch.long), persistent=False)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.logits(self.backbone(pixels))

    def logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [head(features) for head in self.heads]

    def leaf_log_proba(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Leaf log-probabilities: the sum of each level's log-probability along the leaf's path, renormalised."""
        return leaf_log_proba(logits, self.leaf_codes)  # shared with TreeHeadClassifier

    def leaf_proba(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.leaf_log_proba(self(pixels)).exp()


def training_transform(preprocessing: Preprocessing):
    """The default augmentation: random resized crop, horizontal flip, small rotation and shift."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(preprocessing.input_size, scale=(0.5, 1.0)),  # (height, width)
            transforms.RandomHorizontalFlip(),
            transforms.RandomAffine(degrees=15, translate=(0.1, 0.1), fill=255),  # catalogue photos: white ground
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def make_optimizer(network: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and kernels only (not on biases and norm scales)."""
    decay, no_decay = [], []
    for parameter in network.parameters():
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled split of ``range(n)`` into batches; a last batch of one joins the one before (batch norm)."""
    order = rng.permutation(n)
    batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = np.concatenate(batches[-2:])
        batches.pop()
    return batches


def train_epoch(
    network: ClassifierNetwork,
    dataset: ImageDataset,
    batches: list[np.ndarray],
    targets: torch.Tensor,
    weights: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler,
    *,
    lr_at,
    frozen_backbone: bool,
    label_smoothing: float,
    device: torch.device,
    precision: str,
    num_workers: int,
    generator: torch.Generator,
    progress,
) -> tuple[float, int]:
    """One pass over ``batches``; returns the weighted mean loss and the number of pictures trained on.

    ``targets`` holds each picture's node code per level, ``weights`` its class
    weight; pictures the bad-picture policy skipped are left out of the batch.
    ``lr_at(i)`` is the learning rate of the epoch's ``i``-th step.
    """
    network.train()
    if frozen_backbone:
        network.backbone.eval()  # batch-norm statistics stay those of the pretrained network
    dtype = autocast_dtype(precision)
    loader = WorkerLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda", generator=generator
    )
    total_loss = torch.zeros((), device=device)  # summed on the device: no synchronisation per step
    total_weight, n_pictures = 0.0, 0
    for step, (pixels, used, _, positions) in enumerate(loader):
        progress.update(len(positions))
        kept = positions[used]  # skipped pictures stay out of the forward pass and its batch statistics
        batch_weights = weights[kept]
        if len(kept) < 2 or float(batch_weights.sum()) == 0.0:  # batch norm needs two pictures
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        pixels = pixels[used].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        batch_weights = batch_weights.to(device)
        batch_targets = targets[kept].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if frozen_backbone:
                with torch.no_grad():
                    features = network.backbone(pixels)
            else:
                features = network.backbone(pixels)
            logits = network.logits(features)
        loss = level_losses(logits, batch_targets, batch_weights, label_smoothing)  # shared with TreeHeadClassifier
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        weight = float(weights[kept].sum())
        total_loss += loss.detach() * weight
        total_weight += weight
        n_pictures += len(kept)
    return (float(total_loss) / total_weight if total_weight else float("nan")), n_pictures


class FineTuneTask:
    """A fine-tuning run as the :class:`~skproduct._training.Trainer` sees it: epochs of steps, validation, state.

    ``frozen(epoch)`` says whether the backbone is frozen in an epoch of this
    fit (0-based); ``validate()`` returns ``valid_loss`` and ``valid_accuracy``
    (``nan`` without held-out products).
    """

    def __init__(self, network: ClassifierNetwork, dataset: ImageDataset, targets: torch.Tensor,
                 weights: torch.Tensor, optimizer, scaler, *, device: torch.device, precision: str,
                 num_workers: int, batch_size: int, label_smoothing: float, random_state: int, frozen, validate):
        self.network, self.dataset, self.targets, self.weights = network, dataset, targets, weights
        self.optimizer, self.scaler, self.device, self.precision = optimizer, scaler, device, precision
        self.num_workers, self.batch_size, self.label_smoothing = num_workers, batch_size, label_smoothing
        self.random_state, self.frozen, self._validate = random_state, frozen, validate

    @property
    def steps_per_epoch(self) -> int:
        return len(epoch_batches(len(self.dataset), self.batch_size, np.random.default_rng(0)))

    def train_epoch(self, trainer) -> dict:
        seed = (self.random_state, trainer.first_epoch + trainer.epoch)
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        batches = epoch_batches(len(self.dataset), self.batch_size, np.random.default_rng(seed))
        start = time.perf_counter()
        loss, n_images = train_epoch(
            self.network, self.dataset, batches, self.targets, self.weights, self.optimizer, self.scaler,
            lr_at=trainer.learning_rate_at, frozen_backbone=self.frozen(trainer.epoch),
            label_smoothing=self.label_smoothing, device=self.device, precision=self.precision,
            num_workers=self.num_workers, generator=torch.Generator().manual_seed(int(torch.initial_seed() % 2**63)),
            progress=trainer.progress,
        )
        seconds = time.perf_counter() - start
        peak = max(trainer.learning_rate_at(step) for step in range(len(batches)))
        return {"train_loss": loss, "lr": peak, "images_per_second": n_images / seconds, "seconds": seconds}

    def validate(self) -> dict:
        loss, accuracy = self._validate()
        return {"valid_loss": loss, "valid_accuracy": accuracy}

    def state_dict(self) -> dict:
        return {"network": cpu_state(self.network), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():  # a checkpoint from another precision has none to give
            self.scaler.load_state_dict(state["scaler"])


def describe_epoch(record: dict) -> str:
    """The log line of a fine-tuning epoch."""
    return ("epoch {epoch}: train loss {train_loss:.4f}, valid loss {valid_loss:.4f}, valid accuracy "
            "{valid_accuracy:.4f}, {images_per_second:.1f} img/s").format(**record)


def train_network(est, network: ClassifierNetwork, refs: list, owner: np.ndarray, codes: np.ndarray,
                  product_weights: np.ndarray, train: np.ndarray, has_validation: bool, validate, checkpoint,
                  device: torch.device) -> tuple[list[dict], int]:
    """Assemble the trainer for a :class:`~skproduct.FineTuneClassifier` fit and run it.

    The parts: the learning-rate schedule (a fresh warm-up per phase), early
    stopping and keep-best on the validation loss (with held-out products),
    progress, and a checkpoint after every epoch (with ``checkpoint_dir``).
    Returns the new epochs' records and the epoch whose weights were kept.
    """
    from ._finetune_setup import phase
    from ._training import Checkpoint, EarlyStopping, KeepBest, LearningRateSchedule, Progress, Trainer

    rows = np.flatnonzero(np.isin(owner, train))
    dataset = ImageDataset(
        [refs[i] for i in rows], est._training_transform(), est.on_error, est.preprocessing_.input_size,
        est.preprocessing_.draft_size, compact=est.num_workers > 0,
    )
    first_epoch = len(est.history_)
    continuing = bool(first_epoch)

    def phase_of(epoch: int) -> tuple[bool, int, int]:
        return phase(est.trainable, est.head_epochs, est.max_iter, epoch, continuing)

    task = FineTuneTask(
        network, dataset, torch.as_tensor(codes[owner[rows]], dtype=torch.long),
        torch.as_tensor(product_weights[owner[rows]], dtype=torch.float32),
        make_optimizer(network, est.learning_rate_, est.weight_decay),
        torch.amp.GradScaler(device.type, enabled=est.precision_ == "fp16"), device=device,
        precision=est.precision_, num_workers=est.num_workers, batch_size=est.batch_size,
        label_smoothing=est.label_smoothing, random_state=est.random_state,
        frozen=lambda epoch: phase_of(epoch)[0], validate=validate,
    )
    parts = [LearningRateSchedule(est.learning_rate_, task.steps_per_epoch, est.warmup_fraction,
                                  lambda epoch: phase_of(epoch)[1:])]
    keep = None
    if has_validation:
        start = (task.validate()["valid_loss"], cpu_state(network)) if continuing else None  # must be beaten
        head_phase = est.head_epochs if est.trainable == "head_then_all" and not continuing else 0
        keep = KeepBest("valid_loss", lambda: cpu_state(network), network.load_state_dict, start=start,
                        start_epoch=first_epoch)
        parts += [EarlyStopping("valid_loss", patience=est.n_iter_no_change, tol=est.tol, counts_from=head_phase),
                  keep]
    parts.append(Progress(est.verbose, items_per_epoch=len(dataset), total_epochs=est.max_iter,
                          describe=describe_epoch))
    if checkpoint is not None:
        parts.append(Checkpoint(checkpoint, total_epochs=est.max_iter))
    history = Trainer(task, parts, est.max_iter, first_epoch=first_epoch).fit()
    network.eval()
    validated = keep is not None and keep.best_weights is not None
    return history, keep.best_epoch if validated else first_epoch + len(history)
