"""The basin: how far from the private batch the victim's gradient still points the update's way.

An attack that matches gradients can only find the batch if the gradient, taken at a candidate near
it, still points the way the update does. :func:`gradient_landscape` measures that on the victim
itself: the client's FedSGD gradient at ``(1 - t) x + t u`` (``x`` the private batch, ``u`` uniform
noise in [0, 1]) against the gradient at ``x``, each weight tensor's cosine similarity averaged over
tensors (every layer weighs the same; the whole-vector cosine is dominated by the last layer, which
barely depends on the images). ``radius`` is the first t of the grid at which that mean falls below
0.5. It uses the private batch: a measurement of a victim, never an attack.

Measured (docs/attacks.md, ``gradleak bench landscape``): every victim gradleak's attacks break
keeps a radius of 0.5 or more (ResNet-18-sigmoid 0.5, ResNet-18-ReLU in eval mode beyond 1); the
untrained ResNet-18-ReLU with train-mode BatchNorm, which no attack breaks, has 0.05 (the mean
cosine is 0.33 at 5% noise). A radius of :data:`NARROW` or less marks a cell's "not broken" as an
optimisation barrier of these attacks: the update still determines the batch (the cosine is 1 at
t = 0).

The opposite failure is a flat landscape: a victim whose gradient barely depends on the images at all.
ResNet-18-sigmoid with BatchNorm in eval mode on the untrained network's statistics (0 and 1: seventeen
unnormalised Sigmoid layers) keeps a mean cosine of 0.9992 between the update and the gradient at pure
noise, and the plain attacks do not break it even undefended; every victim they break stays at or below
0.95 there (LeNet-sigmoid at batch 4, the smoothest). :func:`flat` marks the first (1 - cosine at pure
noise below :data:`FLAT`): the images' share of the update is small, not absent, so a "not broken" there
is again a statement about the attacks, and centred matching (the mean update of noise batches taken
out of both sides, :func:`gradleak.attacks.matching.centered`) breaks that victim (0.537 at batch 1).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from gradleak.attacks.matching import noise_mean
from gradleak.errors import ConfigError
from gradleak.threat import fedsgd_update
from gradleak.types import ClientUpdate, ServerState

MIXES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The fractions of noise mixed in."""
DIRECTIONS = ("noise", "noise-4", "noise-8", "noise-16", "image", "blur", "grey", "mean-colour")
"""What is mixed in, ``(1 - t) x + t d``: ``noise`` uniform noise in [0, 1] per pixel (the default, what
the audit records); ``noise-K`` uniform noise drawn at K x K and upsampled bilinearly (low
frequencies only); ``image`` other natural images (``others``); ``blur`` the batch under a 5 x 5 box
blur; ``grey`` the batch's channel mean; ``mean-colour`` each image's mean colour, flat. The last
three stay on the batch's own content: a step an attack with an image prior could take.

Measured on the untrained ResNet-18-ReLU, train mode, batch 1 (docs/attacks.md): the mean cosine at
t = 0.05 is 0.33 towards noise, 0.44-0.54 towards low-frequency noise and another photo, 0.74-0.83
towards its own blur, grey or mean colour (and below 0.5 by t = 0.2); narrow in every direction,
natural ones included. In eval mode it stays at 0.99-1.00 at t = 0.05 in every direction."""
NARROW = 0.1
"""A radius at or below this is narrow: every victim the attacks failed on had 0.05-0.1, every one
they broke 0.5 or more (docs/attacks.md)."""
FLAT = 0.01
"""1 - mean cosine at pure noise below this is a flat landscape (measured: 0.0008 on the unbroken
ResNet-18-sigmoid in eval mode, 0.05 or more on every victim the attacks break; docs/attacks.md)."""


def layer_cosines(update: ClientUpdate, target: ClientUpdate,
                  center: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """(mean over weight tensors of each tensor's cosine, the first weight tensor's cosine); with
    ``center``, of each side minus it."""
    c = center or {}
    cosines = [float(F.cosine_similarity((update.tensors[n] - c.get(n, 0)).flatten(), (t - c.get(n, 0)).flatten(),
                                         dim=0))
               for n, t in target.tensors.items() if t.dim() >= 2]
    return statistics.fmean(cosines), cosines[0]


def direction_of(images: torch.Tensor, direction: str = "noise", *, seed: int = 0,
                 others: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`gradient_landscape` mixes into ``images`` (one of :data:`DIRECTIONS`), their shape."""
    generator = torch.Generator().manual_seed(seed)
    if direction == "noise":
        return torch.rand(images.shape, generator=generator).to(images)
    if direction.startswith("noise-") and direction in DIRECTIONS:
        k = int(direction.removeprefix("noise-"))
        coarse = torch.rand((*images.shape[:2], k, k), generator=generator).to(images)
        return F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=False)
    if direction == "image":
        if others is None or others.shape != images.shape:
            raise ConfigError(f"landscape direction 'image': expected other images of shape {tuple(images.shape)}, "
                              f"got {None if others is None else tuple(others.shape)}")
        return others.to(images)
    if direction == "blur":
        return F.avg_pool2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    if direction == "grey":
        return images.mean(1, keepdim=True).expand_as(images)
    if direction == "mean-colour":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    raise ConfigError(f"landscape direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")


def gradient_landscape(server: ServerState, images: torch.Tensor, labels: torch.Tensor, *,
                       mixes: tuple[float, ...] = MIXES, seed: int = 0, direction: str = "noise",
                       others: torch.Tensor | None = None, center: int = 0) -> dict[str, Any]:
    """The client's gradient at the batch mixed with ``t`` of ``direction`` against its gradient at the batch.

    ``direction`` is one of :data:`DIRECTIONS` (uniform noise by default; ``image`` needs ``others``).
    ``center`` > 0 compares both sides minus the mean gradient of that many uniform-noise batches
    (seeded ``seed + 1``): the landscape a centred attack sees (:func:`gradleak.attacks.matching.centered`).
    Returns ``{"mixes": [...], "mean_cosine": [...], "first_cosine": [...], "radius": t or None}``;
    ``radius`` is the first mix whose mean cosine is below 0.5 (``None``: never within the grid).
    """
    towards = direction_of(images, direction, seed=seed, others=others)
    target = fedsgd_update(server, images, labels)
    middle: dict[str, torch.Tensor] | None = None
    if center > 0:
        names = list(target.tensors)
        means = noise_mean(lambda noise: [fedsgd_update(server, noise.to(images), labels).tensors[n] for n in names],
                           images.shape, center, seed=seed + 1, device=images.device)
        middle = dict(zip(names, means))
    mean, first = [], []
    for t in mixes:
        m, f = layer_cosines(fedsgd_update(server, (1 - t) * images + t * towards, labels), target, middle)
        mean.append(m)
        first.append(f)
    radius = next((t for t, m in zip(mixes, mean) if m < 0.5), None)
    return {"mixes": list(mixes), "mean_cosine": mean, "first_cosine": first, "radius": radius}


def narrow(basin: dict[str, Any] | None) -> bool:
    """Whether a recorded basin is narrow (radius <= :data:`NARROW`)."""
    radius = (basin or {}).get("radius")
    return radius is not None and float(radius) <= NARROW


def flat(basin: dict[str, Any] | None) -> float | None:
    """The mean cosine at pure noise (t = 1) when the recorded landscape is flat (1 - it < :data:`FLAT`), else None."""
    basin = basin or {}
    mixes, mean = basin.get("mixes") or [], basin.get("mean_cosine") or []
    if 1.0 not in mixes or len(mean) != len(mixes):
        return None
    at_noise = float(mean[mixes.index(1.0)])
    return at_noise if 1.0 - at_noise < FLAT else None


__all__ = ["DIRECTIONS", "FLAT", "MIXES", "NARROW", "direction_of", "flat", "gradient_landscape", "layer_cosines", "narrow"]
