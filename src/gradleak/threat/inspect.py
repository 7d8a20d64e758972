"""The client's check of a model it received: structures that make an update leak by design.

A malicious server (:mod:`gradleak.threat.malicious`) changes the model it sends so that the
update carries images verbatim. Before training on a received model, a client can look for:

- ``imprint-rows``: a linear layer on the raw input (``in_features`` = the image size) whose rows
  are near-identical and whose biases are graded. Such a layer cuts one statistic of the image
  into bins; honest layers' rows point in all directions. Score: the norm of the mean unit row
  (1 for identical rows, about ``1/sqrt(k)`` for k random ones).
- ``imprint-decoder``: a linear layer that writes back into the image (``out_features`` = the
  image size) whose columns are near-identical, so every bin receives the same backward signal.

- ``trap-units`` (with the client's own images): a linear layer on the raw input whose units,
  those that fire at all (a positive input to their ReLU), fire for few of the client's images.
  Trap weights (:mod:`gradleak.threat.trap`) are set to fire for about one image per batch, so
  that a unit alone with an image carries it verbatim in the update; their rows are random and
  pass the two checks above. Honest units fire for many images or none (an untrained unit's
  response is dominated by the image's overall brightness). Score: the share of firing units
  that fire for at most :data:`RARE` of the images. A server that sets its units to fire for more
  than that evades this check: trap units set for a batch of 4 or fewer fire for a quarter of the
  images or more, pass it, and give every image of such a batch back exactly (measured: 40 of 40
  built-in photos in batches of 2 and of 4, LeNet-ReLU and ResNet-18-ReLU, 1024 units).
- ``zero-sum-rows`` (from the arrays alone): a linear layer on the raw input of at least
  :data:`MIN_TRAP_UNITS` units whose rows mostly sum to zero (:data:`BLIND`, :data:`BLIND_SHARE`).
  gradleak's trap rows are built that way (blind to overall brightness), at any batch size; a
  random row is that close to zero-sum with probability about 1e-3. A server that gives its trap
  rows a random mean evades this one, and must then set its biases against the brightness.

Each finding has a score in [0, 1] and a plain explanation; :func:`threshold` and
:data:`RARE_SHARE` decide a flag. Not checked here: parameter statistics far from any honest
initialisation, and trap units behind other layers (only layers on the raw input are read).

References:
    Fowl et al., "Robbing the Fed", ICLR 2022; Boenisch et al., "When the Curious Abandon Honesty:
    Federated Learning Is Not Private", EuroS&P 2023 (trap weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from gradleak.errors import ConfigError

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

RARE_SHARE = 0.6
"""A raw-input layer is flagged as trap units when at least this share of its units that fire for
any of the client's images fire for at most :data:`RARE` of them. Measured (docs/threat.md): honest
MLP first layers, 8 seeds, untrained and trained, 16-128 client images, 0.03-0.34; trap units set
for batches of 8 or 64, 64 or 1024 units, 0.80-1.0."""

RARE = 0.25
"""A unit fires rarely when it fires for some of the client's images but at most this share."""

MIN_TRAP_UNITS = 32
"""Layers with fewer units are not flagged as traps (a classifier's few rows fire rarely by design)."""

MIN_IMAGES = 16
"""The fewest client images the trap check judges from (with fewer, firing for one image is common)."""


BLIND = 1e-3
"""A row is blind to overall brightness when its entries' sum is below this fraction of its norm.
A random row's sum over its norm is about N(0, 1), so an honest row is this blind with
probability about 8e-4."""

BLIND_SHARE = 0.5
"""A raw-input layer of at least :data:`MIN_TRAP_UNITS` units is flagged when at least this share
of its rows is blind to brightness (trap weights' rows sum to zero by construction). Measured
(tests/threat/test_inspect.py): every honest zoo model 0.0; every trap model gradleak builds 1.0,
at every batch size, where the firing-rate check (``trap-units``) misses the ones set for batches
of 4 or fewer (their units fire for a quarter of the images or more, as honest ones do)."""


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


def _trap_finding(module: str, w: torch.Tensor, bias: torch.Tensor, images: torch.Tensor) -> Finding:
    rate = ((images.flatten(1).double() @ w.T + bias.detach().double()) > 0).double().mean(0)  # per unit
    firing = rate > 0
    share = float((firing & (rate <= RARE)).double().sum() / firing.double().sum().clamp_min(1.0))
    flag = share >= RARE_SHARE and w.shape[0] >= MIN_TRAP_UNITS
    return Finding(module, "trap-units", share, flag,
                   f"{w.shape[0]} units read the raw image; {100 * share:.0f}% of those that fire for any of the "
                   f"client's {images.shape[0]} images fire for at most {100 * RARE:.0f}% of them (flagged from "
                   f"{100 * RARE_SHARE:.0f}%)" + (": trap weights, set to fire for about one image of a batch, so "
                                                    "that the unit's update is that image verbatim" if flag else ""))


def _blind_finding(module: str, w: torch.Tensor) -> Finding:
    norms = w.norm(dim=1)
    live = norms > 0
    z = w.sum(1)[live].abs() / norms[live]
    share = float((z < BLIND).double().mean()) if bool(live.any()) else 0.0
    flag = share >= BLIND_SHARE
    return Finding(module, "zero-sum-rows", share, flag,
                   f"{100 * share:.0f}% of the {w.shape[0]} raw-input rows sum to zero (flagged from "
                   f"{100 * BLIND_SHARE:.0f}%; a random row does with probability about 0.1%)"
                   + (": they are blind to the image's overall brightness, as trap weights are built, so that a "
                      "bias set on public images makes each unit fire for about one image of a batch" if flag else ""))


def inspect_arrays(arrays: Mapping[str, torch.Tensor], input_shape: tuple[int, int, int], *,
                   images: torch.Tensor | None = None) -> list[Finding]:
    """The findings for every 2-D array that reads or writes the raw image, from the arrays alone
    (and, given the client's own ``images``, from which units fire for them).

    What a client receives is arrays (Flower's ``ArrayRecord``), not a module; a weight of shape
    (k, C*H*W) reads the image, one of shape (C*H*W, k) writes into it. The bias of a reading
    weight is the array of the same name with ``bias`` for ``weight``. ``images`` (M, C, H, W),
    M >= :data:`MIN_IMAGES`, adds the ``trap-units`` check of each reading layer with a bias.

    Raises:
        ConfigError: ``images`` of another shape, or fewer than :data:`MIN_IMAGES`.
    """
    if images is not None and (images.dim() != 4 or tuple(images.shape[1:]) != tuple(input_shape)
                               or images.shape[0] < MIN_IMAGES):
        raise ConfigError(f"inspect images: expected (M >= {MIN_IMAGES}, {', '.join(map(str, input_shape))}), "
                          f"got {tuple(images.shape)}")
    d = math.prod(input_shape)
    out = []
    for name, t in arrays.items():
        if t.dim() != 2 or not t.is_floating_point():
            continue
        w = t.detach().double()
        module = name.rsplit(".", 1)[0] if "." in name else name
        if w.shape[1] == d and w.shape[0] >= MIN_UNITS:
            k = int(w.shape[0])
            score, limit = _alignment(w), threshold(k)
            bias = arrays.get(name[: -len("weight")] + "bias") if name.endswith("weight") else None
            graded = bias is not None and int(torch.unique(bias.detach()).numel()) >= k // 2
            flag = score >= limit and graded
            out.append(Finding(module, "imprint-rows", score, flag,
                               f"{k} units read the raw image; their weight rows are "
                               f"{'near-identical' if score >= limit else 'spread'} (alignment {score:.3f}, flagged "
                               f"from {limit:.3f})" + (", with graded biases: they cut one image statistic into bins, "
                                                      "so an image alone in a bin can be read off the update exactly"
                                                      if flag else "")))
            if k >= MIN_TRAP_UNITS:
                out.append(_blind_finding(module, w))
            if images is not None and bias is not None:
                out.append(_trap_finding(module, w, bias, images))
        if w.shape[0] == d and w.shape[1] >= MIN_UNITS:
            k = int(w.shape[1])
            score, limit = _alignment(w.T), threshold(k)
            flag = score >= limit
            what = "near-identical: each receives the same backward signal, as an imprint block needs" if flag \
                else "spread"
            out.append(Finding(module, "imprint-decoder", score, flag,
                               f"{k} units write back into the image; their columns are {what} "
                               f"(alignment {score:.3f}, flagged from {limit:.3f})"))
    return out


def inspect_model(model: nn.Module, input_shape: tuple[int, int, int], *,
                  images: torch.Tensor | None = None) -> list[Finding]:
    """:func:`inspect_arrays` on a model's parameters: every layer that reads or writes the raw image
    (and, with the client's ``images``, which of its units fire for one image alone).

    Example:
        >>> from gradleak.threat.malicious import ImprintBlock
        >>> findings = inspect_model(nn.Sequential(ImprintBlock((3, 8, 8), bins=32)), (3, 8, 8))
        >>> [(f.module, f.kind, round(f.score, 3), f.flagged) for f in findings]
        [('0.encoder', 'imprint-rows', 1.0, True), ('0.encoder', 'zero-sum-rows', 0.0, False), ('0.decoder', 'imprint-decoder', 1.0, True)]
    """
    return inspect_arrays(dict(model.named_parameters()), input_shape, images=images)


def flagged(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.flagged]


__all__ = ["BLIND", "BLIND_SHARE", "CEILING", "CHANCE_FACTOR", "FLOOR", "Finding", "MIN_IMAGES", "MIN_UNITS", "RARE_SHARE", "flagged",
           "inspect_arrays", "inspect_model", "threshold"]
