"""Learning-rate schedules shared by the iterative attacks, and their checkpointable state."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradleak.errors import ConfigError

DECAYS = ("none", "step", "cosine", "warmup-cosine")
WARMUP = 0.05
"""The share of the run ``"warmup-cosine"`` spends rising linearly to the full rate."""


def make_scheduler(opt: torch.optim.Optimizer, kind: str, iterations: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``"step"``: x0.1 at 3/8, 5/8 and 7/8 of the run (Geiping et al. 2020); ``"cosine"``;
    ``"warmup-cosine"``: a linear rise over the first :data:`WARMUP` of the run, then cosine decay to 0
    (the schedule of breaching's modern attacks); ``"none"``."""
    if kind == "step":
        marks = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=0.1)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    if kind == "warmup-cosine":
        warm = max(1, int(iterations * WARMUP))
        rest = max(1, iterations - warm)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / warm if step < warm else
                                                 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / rest))))
    if kind == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ConfigError(f"lr_decay: expected one of {', '.join(DECAYS)}, got {kind!r}")


def scheduler_state(sched: Any) -> dict[str, Any]:
    """A scheduler's state for JSON, without MultiStepLR's milestones.

    JSON turns the milestones' integer keys into strings, which then never match the epoch, so a
    resumed run would stop decaying; the milestones are rebuilt from the config instead.
    """
    return {k: v for k, v in sched.state_dict().items() if k != "milestones"}


def soft_sign(grad: torch.Tensor, iteration: int, total: int) -> torch.Tensor:
    """The soft-signed gradient of breaching's optimisation attacks (``signed="soft"``), at ``iteration`` of ``total``.

    Breaching's rule is ``tanh(s g) / s`` with ``s = 1 - t / T`` falling linearly from 1 towards 0
    over the run (``t`` counted from 0): near a hard sign at the start (for gradients of order one),
    the unsigned gradient by the end. Here it is applied to the gradient in units of its own mean
    absolute value, ``m tanh(s g / m) / s`` with ``m = mean |g|`` per tensor: the image and generator
    gradients gradleak's attacks see are 1e-6..1e-2 in raw units, where ``tanh`` is the identity and
    the raw rule would be plain (unsigned) Adam from the first step.

    Example:
        >>> g = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
        >>> soft_sign(g, 1, 100).round(decimals=2)  # s = 1, m = 1.6: m tanh(g / m)
        tensor([-1.5300, -0.8900,  0.0000,  0.8900,  1.5300])
        >>> torch.allclose(soft_sign(g, 100, 100), g, atol=1e-3)  # s = 0.01: nearly unsigned
        True
    """
    if total < 1 or not 1 <= iteration <= total:
        raise ValueError(f"soft_sign: expected 1 <= iteration <= total, got iteration {iteration} of {total}")
    s = 1.0 - (iteration - 1) / total
    m = grad.abs().mean()
    if not bool(m > 0):
        return grad.clone()
    return torch.tanh(grad * (s / m)) * (m / s)
