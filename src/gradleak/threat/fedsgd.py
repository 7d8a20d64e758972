"""FedSGD: the client uploads one gradient of the mean loss over its N private samples."""

from __future__ import annotations

import torch

from gradleak.errors import DataError
from gradleak.functional import model_gradients
from gradleak.threat import batchnorm
from gradleak.types import ClientUpdate, ServerState


def fedsgd_update(server: ServerState, images: torch.Tensor, labels: torch.Tensor, *,
                  share_bn_stats: bool = False) -> ClientUpdate:
    """Compute the FedSGD update a client with the private batch ``(images, labels)`` uploads.

    Args:
        server: the global model and its public metadata; the model is not modified
            (BatchNorm running statistics are restored after the forward pass).
        images: private batch, shape (N, C, H, W), range [0, 1].
        labels: private labels, shape (N,), int64 in [0, C).
        share_bn_stats: also upload the change the forward pass made to the BatchNorm running
            statistics (:attr:`ClientUpdate.buffers`; :mod:`gradleak.threat.batchnorm`).

    Returns:
        A ``ClientUpdate`` with ``kind="gradient"``, ``protocol="fedsgd"``, ``num_samples=N``.

    Raises:
        DataError: the batch does not fit the model's input shape or class count.
        ConfigError: ``share_bn_stats`` for a model without train-mode BatchNorm layers.
    """
    check_batch(server, images, labels)
    model = server.model
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train(server.bn_mode == "train")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = batchnorm.snapshot(model)
    grads = model_gradients(model, images, labels)
    shared = batchnorm.changes(model, before) if share_bn_stats else {}
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return ClientUpdate(
        tensors={n: g.detach().clone() for n, g in zip(names, grads)},
        kind="gradient",
        num_samples=int(images.shape[0]),
        protocol="fedsgd",
        buffers=shared,
    )


def check_batch(server: ServerState, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise :class:`DataError` unless ``images``/``labels`` fit the server's model."""
    expected = tuple(server.input_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DataError(f"images: expected shape (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
    if not torch.is_floating_point(images) or images.min() < 0 or images.max() > 1:
        raise DataError("images: expected floats in [0, 1]")
    if labels.shape != (images.shape[0],):
        raise DataError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= server.num_classes):
        raise DataError(f"labels: expected class indices in [0, {server.num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]")
