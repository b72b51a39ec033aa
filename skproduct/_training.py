"""The fine-tuner's torch mechanics: the network, augmentation, the schedule, one training epoch, checkpoints.

Imported only when :class:`~skproduct.finetune.FineTuneClassifier` trains or
predicts, so that ``import skproduct`` never imports torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._torch_data import PictureDataset, autocast_dtype
from .backbones import Preprocessing

CHECKPOINT_FORMAT = 1
_FINAL_LR_FRACTION = 0.01  # the cosine decays to 1% of the peak learning rate


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
        score = sum(
            F.log_softmax(level_logits.float(), dim=1)[:, self.leaf_codes[:, level]]
            for level, level_logits in enumerate(logits)
        )
        return F.log_softmax(score, dim=1)

    def leaf_proba(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.leaf_log_proba(self(pixels)).exp()


def training_transform(preprocessing: Preprocessing):
    """The default augmentation: random resized crop, horizontal flip, small rotation and shift."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(preprocessing.image_size, scale=(0.5, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomAffine(degrees=15, translate=(0.1, 0.1), fill=255),  # catalogue photos: white ground
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


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
    dataset: PictureDataset,
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
    from torch.utils.data import DataLoader

    network.train()
    if frozen_backbone:
        network.backbone.eval()  # batch-norm statistics stay those of the pretrained network
    dtype = autocast_dtype(precision)
    loader = DataLoader(
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
        loss = sum(
            _weighted_cross_entropy(level_logits.float(), batch_targets[:, level], batch_weights, label_smoothing)
            for level, level_logits in enumerate(logits)
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        weight = float(weights[kept].sum())
        total_loss += loss.detach() * weight
        total_weight += weight
        n_pictures += len(kept)
    return (float(total_loss) / total_weight if total_weight else float("nan")), n_pictures


def _weighted_cross_entropy(logits, targets, weights, label_smoothing: float) -> torch.Tensor:
    losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    return (losses * weights).sum() / weights.sum()


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state dict on the CPU."""
    return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, synced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a skproduct fine-tuning checkpoint of format {CHECKPOINT_FORMAT}")
    return payload
