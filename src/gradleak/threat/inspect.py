"""The client's check of a model it received: structures that make an update leak by design.

A malicious server (:mod:`gradleak.threat.malicious`) changes the model it sends so that the
update carries images verbatim. Before training on a received model, a client can look for:

- ``imprint-rows``: a linear layer on the raw input (``in_features`` = the image size) whose rows
  are near-identical and whose biases are graded. Such a layer cuts one statistic of the image
  into bins; honest layers' rows point in all directions. Score: the norm of the mean unit row
  (1 for identical rows, about ``1/sqrt(k)`` for k random ones).
- ``imprint-decoder``: a linear layer that writes back into the image (``out_features`` = the
  image size) whose columns are near-identical, so every bin receives the same backward signal.

Each finding has a score in [0, 1] and a plain explanation; :func:`threshold` decides a flag. Not
checked here: units that fire for a single sample of the client's data, and parameter statistics
far from any honest initialisation (trap weights without a raw-input linear layer pass).

References:
    Fowl et al., "Robbing the Fed", ICLR 2022; Boenisch et al., "When the Curious Abandon Honesty:
    Federated Learning Is Not Private", EuroS&P 2023 (trap weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

CHANCE_FACTOR = 3.0
"""k unit rows pointing in random directions have a mean of norm about ``1/sqrt(k)``; a layer is
flagged from ``CHANCE_FACTOR`` times that (and from :data:`FLOOR` at least)."""

FLOOR = 0.2
"""The lowest alignment that flags, whatever k (honest trained rows share some direction)."""

CEILING = 0.9
"""The highest: a few identical rows (k = 8) are flagged too."""


def threshold(units: int) -> float:
    """The alignment from which ``units`` rows (or columns) flag a layer: ``max(FLOOR, 3 / sqrt(k))``,
    at most :data:`CEILING`.

    Honest raw-input layers of gradleak's zoo score 0.06-0.32 against thresholds of 0.9 (10 rows)
    and 0.2 (512); an imprint block scores 1.0, and 0.45 with noise twice its rows' norm on them
    (docs/threat.md, ``gradleak bench imprint``).
    """
    return min(CEILING, max(FLOOR, CHANCE_FACTOR / math.sqrt(max(units, 1))))

MIN_UNITS = 8
"""Layers with fewer rows (or columns) are not judged: a few random rows can align by chance."""


@dataclass(frozen=True)
class Finding:
    """One structure that makes an update leak, with its score and what it means."""

    module: str
    kind: str
    score: float
    flagged: bool
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _alignment(vectors: torch.Tensor) -> float:
    """The norm of the mean unit vector of the rows of ``vectors`` (1: all parallel)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return float(unit.mean(0).norm())


def inspect_model(model: nn.Module, input_shape: tuple[int, int, int]) -> list[Finding]:
    """The findings for every linear layer that reads or writes the raw image, flagged or not.

    Example:
        >>> from gradleak.threat.malicious import ImprintBlock
        >>> findings = inspect_model(nn.Sequential(ImprintBlock((3, 8, 8), bins=32)), (3, 8, 8))
        >>> [(f.kind, round(f.score, 3), f.flagged) for f in findings]
        [('imprint-rows', 1.0, True), ('imprint-decoder', 1.0, True)]
    """
    d = math.prod(input_shape)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach().double()
        if m.in_features == d and m.out_features >= MIN_UNITS:
            score = _alignment(w)
            graded = m.bias is not None and int(torch.unique(m.bias.detach()).numel()) >= m.out_features // 2
            flagged = score >= threshold(m.out_features) and graded
            out.append(Finding(name, "imprint-rows", score, flagged,
                               f"{m.out_features} units read the raw image; their weight rows are "
                               f"{'near-identical' if score >= threshold(m.out_features) else 'spread'} "
                               f"(alignment {score:.3f}, flagged from {threshold(m.out_features):.3f})"
                               + (", with graded biases: they cut one image statistic into bins, so an image "
                                  "alone in a bin can be read off the update exactly" if flagged else "")))
        if m.out_features == d and m.in_features >= MIN_UNITS:
            score = _alignment(w.T)
            flagged = score >= threshold(m.in_features)
            what = "near-identical: each receives the same backward signal, as an imprint block needs" if flagged \
                else "spread"
            out.append(Finding(name, "imprint-decoder", score, flagged,
                               f"{m.in_features} units write back into the image; their columns are {what} "
                               f"(alignment {score:.3f}, flagged from {threshold(m.in_features):.3f})"))
    return out


def flagged(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.flagged]


__all__ = ["CEILING", "CHANCE_FACTOR", "FLOOR", "Finding", "MIN_UNITS", "flagged", "inspect_model", "threshold"]
