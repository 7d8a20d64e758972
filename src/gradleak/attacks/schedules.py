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
