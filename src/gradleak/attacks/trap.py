"""The trap-weights attack: images read off the units of a malicious model that fired for one image.

Given a FedSGD gradient (or a FedAvg delta) of a model that starts with trap units
(:mod:`gradleak.threat.trap`), every unit that fired has the ratio ``x_i = grad_W[i] / grad_b[i]``:
the image itself where the unit fired for one image alone, a blend where it fired for several.
Ratios outside [0, 1] are blends (of backward signals of both signs) and are dropped. An image
alone in several units comes back identical from each, so the ratios are grouped (equal to
``duplicate`` in RMS, relative to their norm), and groups of two or more, most units first, are
taken as images; single ratios fill up what is left, largest bias share first. The result is
padded with grey when fewer ratios than the batch are found. No iteration, no prior, no labels
needed. Its one reported "loss" is the share of the units' bias gradient that the kept images do
not explain.

A threat model beyond the honest-but-curious server: the server modified the model it sent (SoK
threat model F, active manipulation of the model).

References:
    Boenisch et al., "When the Curious Abandon Honesty: Federated Learning Is Not Private",
    EuroS&P 2023.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradleak.attacks.base import ATTACKS
from gradleak.attacks.imprint import BlockAttack
from gradleak.config import check_ranges
from gradleak.errors import ConfigError
from gradleak.threat.trap import find_trap, trap_model
from gradleak.types import ServerState


@dataclass(frozen=True)
class TrapConfig:
    """Settings of the trap-weights attack.

    Args:
        tolerance: a unit did not fire when its bias share is below this fraction of the largest.
        margin: how far outside [0, 1] a recovered pixel may lie (rounding) before the ratio is
            dropped as a blend.
        duplicate: two ratios are the same image when their RMS difference is below this fraction
            of their RMS (one image alone in two units agrees to float rounding).
        label_strategy: how labels are recovered from the victim's part of the update.
    """

    tolerance: float = 1e-6
    margin: float = 1e-3
    duplicate: float = 1e-3
    label_strategy: str = "auto"

    def __post_init__(self) -> None:
        check_ranges("TrapConfig", self, tolerance=(0, 1), margin=(0, 1), duplicate=(0, 1))


@ATTACKS.register("trap")
class TrapAttack(BlockAttack):
    """Closed-form recovery of the images alone in a trap unit, confirmed by the units that agree.

    Example:
        >>> import gradleak
        >>> gradleak.attacks.create("trap").config.duplicate
        0.001
    """

    name = "trap"
    Config = TrapConfig
    block_name = "trap units"
    needs = "needs a model with trap units (a malicious server: gradleak simulate --trap-units)"
    matching = "trap units (closed form)"
    find_block = staticmethod(find_trap)

    @classmethod
    def malicious_model(cls, server: ServerState, size: int, *, batch_size: int,
                        public: torch.Tensor | None = None) -> ServerState:
        if public is None:
            raise ConfigError("trap: expected the server's public images to set its units on, got none")
        return trap_model(server, size, public=public, batch_size=batch_size)

    def recover(self, block: Any, gw: torch.Tensor, gb: torch.Tensor, n: int,
                shape: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        floor = cfg.tolerance * float(gb.abs().max().clamp_min(1e-300))
        fired = (gb.abs() > floor).nonzero().flatten()
        ratios = gw[fired] / gb[fired, None]
        m = cfg.margin
        plausible = (ratios.amin(1) >= -m) & (ratios.amax(1) <= 1 + m)
        ratios, shares = ratios[plausible], gb[fired][plausible].abs()
        # group the ratios that are one image: RMS difference below `duplicate` of their RMS
        rms = ratios.square().mean(1).sqrt().clamp_min(1e-12)
        dist = torch.cdist(ratios, ratios) / ratios.shape[1] ** 0.5
        same = dist <= cfg.duplicate * torch.minimum(rms[:, None], rms[None, :])
        groups: list[list[int]] = []
        taken = torch.zeros(len(ratios), dtype=torch.bool)
        for i in sorted(range(len(ratios)), key=lambda j: -float(shares[j])):
            if taken[i]:
                continue
            members = (same[i] & ~taken).nonzero().flatten().tolist()
            taken[members] = True
            groups.append(members)
        groups.sort(key=lambda g: (-len(g), -float(shares[g].sum())))
        chosen = groups[:n]
        images = [ratios[g[0]].clamp(0, 1).view(*shape) for g in chosen]
        images += [torch.full(shape, 0.5, dtype=torch.float64)] * (n - len(images))
        explained = sum(float(shares[g].sum()) for g in chosen)
        info = {"units": int(gb.shape[0]), "units_fired": int(fired.numel()),
                "ratios_plausible": int(plausible.sum()), "images_found": len(groups),
                "confirmed": sum(len(g) > 1 for g in groups), "padded": max(0, n - len(groups)),
                "unexplained": 1.0 - explained / float(gb.abs().sum().clamp_min(1e-300))}
        return torch.stack(images), info


__all__ = ["TrapAttack", "TrapConfig"]
