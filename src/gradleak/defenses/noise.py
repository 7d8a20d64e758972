"""Additive noise on every entry of the update: Gaussian (``noise``) and Laplacian (``laplace``).

Zhu et al. (2019, Section 5) report that noise of variance at least 1e-2 defeats DLG (an attacker
that ignores the noise) but also hurts accuracy. How much noise resists an attacker who knows it
depends on the model: gradleak's adaptive CI-Net still recovers a ResNet-18-sigmoid image at
sigma 1e-3, and not a LeNet one (docs/audit.md). Without clipping the noise carries no
differential-privacy guarantee (use ``clip`` before it, or ``dpsgd``).

References:
    Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019, Section 5 (noisy gradients).
    Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014, Sections 3.3, 3.5
    (Laplace and Gaussian mechanisms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gradleak.defenses.base import DEFENSES, Defense, check_number


def _uniform_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)


@DEFENSES.register("noise")
@dataclass(frozen=True)
class GaussianNoiseDefense(Defense):
    """Add i.i.d. N(0, sigma^2) noise to every entry: ``g + sigma * z``.

    Args:
        sigma: the noise's standard deviation (absolute, in the update's units), >= 0.

    Raises:
        ConfigError: ``sigma`` negative or not finite.
    """

    sigma: float
    name: ClassVar[str] = "noise"

    def __post_init__(self) -> None:
        check_number(self.name, "sigma", self.sigma, low=0.0)

    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for n, t in tensors.items():
            z = torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)
            out[n] = t + self.sigma * z
        return out


@DEFENSES.register("laplace")
@dataclass(frozen=True)
class LaplaceNoiseDefense(Defense):
    """Add i.i.d. Laplace(0, b) noise to every entry (standard deviation ``sqrt(2) * b``).

    Drawn by inverting the CDF: ``-b * sign(u) * log(1 - 2|u|)`` with ``u`` uniform on (-1/2, 1/2).

    Args:
        scale: the Laplace scale b, >= 0.

    Raises:
        ConfigError: ``scale`` negative or not finite.
    """

    scale: float
    name: ClassVar[str] = "laplace"

    def __post_init__(self) -> None:
        check_number(self.name, "scale", self.scale, low=0.0)

    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for n, t in tensors.items():
            u = _uniform_like(t, generator) - 0.5
            # clamp keeps log finite when u hits -1/2 exactly (probability ~2^-24 per entry)
            z = -torch.sign(u) * torch.log1p(-2 * u.abs()).clamp_min(-80.0)
            out[n] = t + self.scale * z
        return out
