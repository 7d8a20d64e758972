"""An audit cell's client: the defended update the server sees, and the defense's utility cost.

For every cell the client update is simulated on the private batch (FedSGD, FedAvg with S local
steps, or an aggregate of K clients) and the defense is applied on the client
(:func:`gradleak.defenses.defended_update`). Beside privacy, the cell measures the defense's
utility cost on the same data: T rounds of the same protocol and defense applied to the victim
(FedSGD: ``theta -= lr * g``; FedAvg: ``theta += delta``), then the training loss and accuracy on
that batch.

References:
    Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019, Section 5 (noise and pruning defenses).
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD).
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.audit.plan import AuditCell
from gradleak.defenses import defended_update
from gradleak.errors import ConfigError, UnsupportedModelError
from gradleak.threat import simulate_clients
from gradleak.types import ClientUpdate, ServerState


def check_victim(server: ServerState, cells: Sequence[AuditCell]) -> None:
    """Refuse, before anything runs, a client-side defense on a victim whose train-mode BatchNorm couples
    samples, and shared BatchNorm statistics on a victim that has none to share."""
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in server.model.modules())
    if any(c.protocol.share_bn_stats for c in cells) and (not bn or server.bn_mode != "train"):
        raise ConfigError("--share-bn-stats: expected a victim with BatchNorm layers in train mode, got "
                          + ("none" if not bn else "bn_mode 'eval'"))
    dp = [c.defense for c in cells if any(p.client_side for p in c.parsed().parts())]
    if bn and dp and server.bn_mode == "train":
        raise UnsupportedModelError(f"audit defense '{dp[0]}': expected a victim without train-mode BatchNorm "
                                    "(per-sample clipping), got BatchNorm in train mode; use bn_mode='eval' (--bn-mode eval) or a "
                                    "model without BatchNorm such as lenet")


def cell_seed(seed: int, cell: AuditCell) -> int:
    """The seed of a cell's defense noise: the audit's seed mixed with the cell's name."""
    return (int(seed) * 1_000_003 + zlib.crc32(cell.name.encode())) % 2**62


def cell_update(server: ServerState, images: torch.Tensor, labels: torch.Tensor, *, cell: AuditCell,
                generator: torch.Generator) -> ClientUpdate:
    """What the server sees in ``cell``: each of K clients' defended update on its share, averaged.

    Args:
        server: the global model (not modified).
        images: all clients' data, shape (K*N, C, H, W), range [0, 1].
        labels: shape (K*N,).
        cell: the grid cell.
        generator: randomness of the defense.
    """
    one = functools.partial(defended_update, defense=cell.parsed(), generator=generator,
                            client=cell.protocol.client(cell.batch_size))
    if cell.protocol.clients == 1:
        return one(server, images, labels)
    return simulate_clients(server, images, labels, num_clients=cell.protocol.clients, client=one)


def utility(server: ServerState, images: torch.Tensor, labels: torch.Tensor, *, cell: AuditCell, steps: int,
            lr: float, generator: torch.Generator) -> dict[str, Any]:
    """Training loss and accuracy on ``(images, labels)`` after ``steps`` defended rounds of ``cell``.

    Each round the (copied) global model receives the cell's update: a gradient is applied with
    server learning rate ``lr``, a FedAvg delta is added as it is. Loss and accuracy are measured
    on the same batch, in the server's BatchNorm mode, without gradients.

    Returns:
        ``{"steps", "lr", "loss_start", "loss", "accuracy"}``.
    """
    model = copy.deepcopy(server.model)

    def evaluate() -> tuple[float, float]:
        model.train(server.bn_mode == "train")
        with torch.no_grad():
            logits = model(images)
        return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())

    start, _ = evaluate()
    for _ in range(steps):
        state = ServerState(model=model, input_shape=server.input_shape, num_classes=server.num_classes,
                            bn_mode=server.bn_mode, spec=server.spec)
        update = cell_update(state, images, labels, cell=cell, generator=generator)
        scale = -float(lr) if update.kind == "gradient" else 1.0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in update.tensors:
                    p.add_(update.tensors[name].to(p.device, p.dtype), alpha=scale)
    loss, acc = evaluate()
    return {"steps": steps, "lr": lr, "loss_start": start, "loss": loss, "accuracy": acc}


__all__ = ["cell_seed", "cell_update", "check_victim", "utility"]
