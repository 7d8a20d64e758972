"""BatchNorm running statistics a client shares with its update.

A train-mode BatchNorm layer normalises with its batch's statistics and moves its running ones:

    running_mean <- (1 - m) running_mean + m * mean(x)
    running_var  <- (1 - m) running_var  + m * var_unbiased(x)

with ``m`` the layer's momentum (or ``1 / (num_batches_tracked + 1)`` when momentum is None), the
mean and variance taken per channel over the batch and the spatial positions. A FedAvg client that
uploads its ``state_dict`` (Flower's examples do) sends the running statistics after its local
steps; the server, who sent the ones before, knows their change. Over one local step that change
gives every BatchNorm layer's batch mean and variance exactly (:func:`batch_statistics`); over
several it is a known weighted sum of each step's, which an attack replays
(:func:`predicted_changes`). Yin et al. ("See through Gradients", CVPR 2021) match such statistics to
recover batches of 48 ImageNet images from a ResNet-50.

The change travels in :attr:`gradleak.types.ClientUpdate.buffers`, named as the model's buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gradleak.errors import ConfigError, UpdateError
from gradleak.types import ClientUpdate

STATS = ("running_mean", "running_var")


def tracked_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers that keep running statistics, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None}


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's running statistics by the names they are shared under (``<layer>.running_mean``, ...)."""
    return {f"{name}.{stat}": getattr(m, stat) for name, m in tracked_layers(model).items() for stat in STATS}


def buffer_names(model: nn.Module) -> list[str]:
    """The names the shared statistics carry: ``<layer>.running_mean`` and ``<layer>.running_var``."""
    return list(_statistics(model))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's running statistics (before local training)."""
    return {k: t.detach().clone() for k, t in _statistics(model).items()}


def changes(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``after - before`` for each running statistic (what a client that shares them uploads).

    Raises:
        ConfigError: the model has no BatchNorm layer that keeps running statistics, or it is in eval
            mode (its statistics do not move: nothing to share).
    """
    layers = tracked_layers(model)
    if not layers or not any(m.training for m in layers.values()):
        raise ConfigError("share_bn_stats: expected a model with BatchNorm layers in train mode (bn_mode 'train'), got "
                          + ("none" if not layers else "them in eval mode"))
    now = snapshot(model)
    return {k: (now[k] - before[k]).detach().clone() for k in now}


def check_buffers(update: ClientUpdate, model: nn.Module) -> None:
    """Raise :class:`UpdateError` unless the update's statistics are the model's, finite, of their shapes."""
    if not update.buffers:
        return
    expected = {k: tuple(t.shape) for k, t in _statistics(model).items()}
    unexpected = [n for n in update.buffers if n not in expected]
    if unexpected:
        example = next(iter(expected), None)
        raise UpdateError(f"update BatchNorm statistics: expected names of the model's running statistics (such as "
                          f"'{example}'), got {', '.join(unexpected[:3])}" if example else
                          "update BatchNorm statistics: expected none (the model has no BatchNorm layer), got "
                          f"{', '.join(unexpected[:3])}")
    missing = [n for n in expected if n not in update.buffers]
    if missing:
        raise UpdateError(f"update BatchNorm statistics: expected all {len(expected)} running statistics of the model, "
                          f"missing {', '.join(missing[:3])}")
    for name, t in update.buffers.items():
        if tuple(t.shape) != expected[name]:
            raise UpdateError(f"update BatchNorm statistic '{name}': expected shape {expected[name]}, got {tuple(t.shape)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise UpdateError(f"update BatchNorm statistic '{name}': expected finite floating-point values")


def momenta(layer: _BatchNorm, steps: int) -> list[float]:
    """The factor of each of ``steps`` forward passes (momentum, or the cumulative average's 1/(t+1))."""
    if layer.momentum is not None:
        return [float(layer.momentum)] * steps
    tracked = int(layer.num_batches_tracked) if layer.num_batches_tracked is not None else 0
    return [1.0 / (tracked + k + 1) for k in range(steps)]


def batch_statistics(update: ClientUpdate, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm layer's batch mean and unbiased variance of its input, from one step's shared change.

    ``model`` is the model the server sent (its running statistics are the ones before). Exact: the
    change over one step is ``m (mean - running_mean)``, so ``mean = running_mean + change / m``;
    the variance likewise (the unbiased one, which PyTorch's running average keeps).

    Raises:
        UpdateError: the update shares no statistics, or its change mixes several local steps.
    """
    if not update.buffers:
        raise UpdateError("batch statistics: expected an update that shares BatchNorm statistics, got none")
    if update.local_steps != 1:
        raise UpdateError(f"batch statistics: expected one local step, got {update.local_steps} (their change mixes "
                          "the steps' statistics; an attack replays them instead)")
    check_buffers(update, model)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in tracked_layers(model).items():
        m = momenta(layer, 1)[0]
        mean0, var0 = layer.running_mean, layer.running_var
        assert mean0 is not None and var0 is not None
        mean = mean0 + update.buffers[f"{name}.running_mean"].to(mean0.device) / m
        var = var0 + update.buffers[f"{name}.running_var"].to(var0.device) / m
        out[name] = (mean.detach(), var.detach())  # var: unbiased, as the running average keeps it
    return out


def input_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of a BatchNorm layer's input (N, C, ...), differentiably."""
    dims = [0] + list(range(2, x.ndim))
    return x.mean(dims), x.var(dims, unbiased=True)


def predicted_changes(mean0: torch.Tensor, var0: torch.Tensor, factors: Sequence[float],
                      inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The change of a layer's running mean and variance after forward passes on ``inputs``, in order.

    Args:
        mean0, var0: the layer's running statistics before (the server's model, not a copy whose
            forward passes have moved them).
        factors: each pass's factor (:func:`momenta` of the server's layer).
        inputs: the layer's input at each pass (the candidates' activations).

    Differentiable in the inputs: the running average replayed from the statistics before.
    """
    mean, var = mean0, var0
    for m, x in zip(factors, inputs):
        mu, v = input_statistics(x)
        mean = (1 - m) * mean + m * mu
        var = (1 - m) * var + m * v
    return mean - mean0, var - var0


__all__ = ["STATS", "batch_statistics", "buffer_names", "changes", "check_buffers", "input_statistics", "momenta",
           "predicted_changes", "snapshot", "tracked_layers"]
