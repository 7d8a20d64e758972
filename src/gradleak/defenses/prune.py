"""Top-k pruning (gradient sparsification): keep each tensor's largest-magnitude entries, zero the rest.

DLG reports that pruning more than 20% of the gradient's smallest entries starts to hurt its
attack, which ignores the pruning, and that 70% defeats it on LeNet (Zhu et al. 2019, Section 5).
An attacker that matches on the transmitted support only is not stopped: gradleak's adaptive
CI-Net recovers a LeNet image through 90% pruning (SSIM 0.89, docs/audit.md). The same operation is
Deep Gradient Compression's sparsifier (Lin et al. 2018).

References:
    Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019, Section 5 (gradient pruning).
    Lin et al., "Deep Gradient Compression", ICLR 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradleak.defenses.base import DEFENSES, Defense, check_number


def kept_entries(numel: int, sparsity: float) -> int:
    """k = ceil((1 - sparsity) * numel): how many entries of a tensor survive (at least one)."""
    return max(1, min(numel, math.ceil((1.0 - sparsity) * numel - 1e-9)))


@DEFENSES.register("prune")
@dataclass(frozen=True)
class TopKPruneDefense(Defense):
    """Per tensor, keep the k = ceil((1 - sparsity) * numel) entries of largest magnitude.

    Exactly k entries keep their value (ties are broken by ``torch.topk``); the others become 0.

    Args:
        sparsity: fraction of entries zeroed, in [0, 1) (0 keeps everything).

    Raises:
        ConfigError: ``sparsity`` outside [0, 1).
    """

    sparsity: float
    name: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        check_number(self.name, "sparsity", self.sparsity, low=0.0, high=1.0)

    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for n, t in tensors.items():
            flat = t.reshape(-1)
            k = kept_entries(flat.numel(), self.sparsity)
            keep = torch.topk(flat.abs(), k, sorted=False).indices
            pruned = torch.zeros_like(flat)
            pruned[keep] = flat[keep]
            out[n] = pruned.view_as(t)
        return out
