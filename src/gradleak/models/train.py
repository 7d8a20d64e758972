"""Train a victim for a few epochs, so that attacks can be measured on trained models, not only fresh ones.

A deployed model is trained: its softmax outputs are confident and its gradients on training data
small, which changes what an update carries (label recovery by the last layer's bias gradient
weakens; Geiping et al. 2020 report trained ResNets easier to invert than untrained ones at batch 1).
:func:`train_victim` is plain supervised training with Adam on a labelled batch, in the model's
own BatchNorm mode, seeded; ``gradleak train`` runs it on the built-in photos (or a local dataset)
and writes a model-state file that every command's ``--weights`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.config import check_ranges


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_victim`.

    Args:
        epochs: passes over the data.
        lr: Adam's learning rate.
        batch_size: mini-batch size.
        seed: seeds the shuffling.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("train", self, epochs=(1, 10_000), lr=(0, None, "open"), batch_size=(1, 1_000_000))


def train_victim(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 config: TrainConfig = TrainConfig()) -> list[dict[str, float]]:
    """Train ``model`` in place on ``(images, labels)``; return each epoch's mean loss and accuracy.

    The model trains in train mode (BatchNorm with batch statistics, running statistics updated) and
    is left in it; the caller sets the mode the client uses.
    """
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    history = []
    n = int(images.shape[0])
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        total, correct = 0.0, 0
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            if idx.numel() < 2 and n > 1:
                continue  # a batch of one breaks train-mode BatchNorm
            logits = model(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            correct += int((logits.argmax(1) == labels[idx]).sum())
        history.append({"epoch": epoch + 1, "loss": total / n, "accuracy": correct / n})
    return history


__all__ = ["TrainConfig", "train_victim"]
