"""How many iterations an attack needed to plateau, as measured here, and a warning when an audit gives less.

A verdict of "not broken" from a run stopped before its attack would have plateaued says nothing.
The audit reads each run's own curve for that (:func:`gradleak.audit.verdicts.improvement`); this
table adds what was measured beforehand, so that a budget too small is named before the audit
spends its time. An entry is the iterations after which CI-Net's mean SSIM (default settings, one
seed) stayed within 0.02 of its best on that victim and batch size (for ``layerwise``, whose
schedule depends on its budget, the budget past which a run twice as long read no better); ``None``
means it had not plateaued within the longest run measured (``measured_up_to``). Batch sizes between entries take
the largest measured batch below them, a lower bound: larger batches need more. An entry holds for
the client's BatchNorm mode it was measured in (``bn_mode``; ``None`` for a victim without BatchNorm):
the same ResNet-18-ReLU is noise at every budget in train mode and breaks in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradleak.types import ModelSpec


@dataclass(frozen=True)
class Plateau:
    """The iterations ``attack`` needed on one victim and batch size (``None``: not within ``measured_up_to``)."""

    model: str
    activation: str
    batch_size: int
    attack: str
    iterations: int | None
    measured_up_to: int
    source: str
    bn_mode: str | None = "train"


MEASURED: tuple[Plateau, ...] = (
    Plateau("lenet", "sigmoid", 1, "cinet", 150, 200, "docs/audit.md, LeNet worst-case audit (100-150 of 200)", None),
    Plateau("lenet", "sigmoid", 4, "cinet", 150, 300, "docs/audit.md, LeNet worst-case audit and the prune:0.9 cell",
            None),
    Plateau("resnet18", "sigmoid", 4, "cinet", 125, 300, "docs/audit.md, ResNet-18-sigmoid batch 4 audit (100-125 of 300)"),
    Plateau("resnet18", "sigmoid", 8, "cinet", 225, 300, "README, iterations to SSIM 0.95 (125-225 over 3 seeds)"),
    Plateau("resnet18", "sigmoid", 16, "cinet", 150, 150, "README, large batches (0.921 at 150, still rising)"),
    Plateau("resnet18", "sigmoid", 32, "cinet", 450, 450, "README, large batches (0.907 at 450)"),
    Plateau("resnet18", "sigmoid", 64, "cinet", None, 500, "README, large batches (0.418 at 500, +0.014 per 25)"),
    Plateau("resnet18", "relu", 1, "layerwise", 5000, 10000,
            "docs/attacks.md, layerwise's budget on photo 0 (0.613 at 2500, 0.889 at 5000, 0.858 at 10000)"),
    Plateau("resnet18", "relu", 4, "cinet", 300, 400,
            "docs/audit.md, eval-mode ResNet-18-ReLU batch 4 audit (within 0.02 of the best from 200-300 of 400)", "eval"),
)


def needed(spec: ModelSpec, batch_size: int, attack: str) -> Plateau | None:
    """The measured entry that bounds ``attack`` on ``spec`` at ``batch_size`` from below (``None``: not measured).

    Example:
        >>> needed(ModelSpec("resnet18", activation="sigmoid"), 20, "cinet").batch_size
        16
        >>> needed(ModelSpec("resnet18", activation="relu"), 8, "cinet") is None
        True
        >>> needed(ModelSpec("resnet18", activation="relu", bn_mode="eval"), 8, "cinet").iterations
        300
    """
    rows = [p for p in MEASURED if (p.model, p.activation, p.attack) == (spec.name, spec.activation, attack)
            and p.bn_mode in (None, spec.bn_mode) and p.batch_size <= batch_size]
    return max(rows, key=lambda p: p.batch_size, default=None)


def budget_warnings(spec: ModelSpec, batch_sizes: Sequence[int], configs: Mapping[str, Any]) -> list[str]:
    """One line per (attack, batch size) whose iteration budget is below what was measured to plateau.

    Example:
        >>> from gradleak.attacks.cinet import CINetConfig
        >>> budget_warnings(ModelSpec("resnet18", activation="sigmoid"), [8, 64], {"cinet": CINetConfig(iterations=200)})
        ... # doctest: +NORMALIZE_WHITESPACE
        ['cinet at batch 8: 200 iterations, below the 225 it needed to plateau on resnet18-sigmoid at batch 8
          (README, iterations to SSIM 0.95 (125-225 over 3 seeds))', 'cinet at batch 64: 200 iterations; on
          resnet18-sigmoid at batch 64 it was still improving after 500 (README, large batches (0.418 at 500, +0.014
          per 25))']
    """
    out = []
    for name, config in configs.items():
        budget = getattr(config, "iterations", None)
        if not isinstance(budget, int):
            continue
        for n in sorted(set(batch_sizes)):
            p = needed(spec, n, name)
            if p is None:
                continue
            mode = f" (BatchNorm {p.bn_mode} mode)" if p.bn_mode == "eval" else ""
            where = f"{spec.name}-{spec.activation}{mode} at batch {p.batch_size}"
            if p.iterations is None:
                out.append(f"{name} at batch {n}: {budget} iterations; on {where} it was still improving after "
                           f"{p.measured_up_to} ({p.source})")
            elif budget < p.iterations:
                out.append(f"{name} at batch {n}: {budget} iterations, below the {p.iterations} it needed to plateau "
                           f"on {where} ({p.source})")
    return out


def trained_warnings(configs: Mapping[str, Any]) -> list[str]:
    """What was measured to hold back the default attacks on a trained victim (an audit given ``--weights``).

    Example:
        >>> from gradleak.attacks.cinet import CINetConfig
        >>> len(trained_warnings({"cinet": CINetConfig()})), trained_warnings({"cinet": CINetConfig(loss="cosine-layer")})
        (1, [])
    """
    config = configs.get("cinet")
    if config is None or getattr(config, "loss", None) != "cosine":
        return []
    return ["trained victim: on a ResNet-18-sigmoid trained 10 epochs, CI-Net's default cosine distance reached SSIM "
            "0.065 at batch 1 after 300 iterations and the per-layer one 0.190 (docs/attacks.md, trained victims); "
            "audit again with --set cinet.loss=cosine-layer (on a trained ResNet-18-ReLU it did worse: run both) and a "
            "larger --iterations before reading 'not broken'"]


__all__ = ["MEASURED", "Plateau", "budget_warnings", "needed", "trained_warnings"]
