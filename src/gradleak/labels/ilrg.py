"""iLRG: exact per-class label counts, repeats allowed, from the last layer's weight and bias gradients.

Ma et al. (2023) restore how many samples of each class a batch holds in three steps:

1. **Class-wise embeddings** (their Eq. 6): row c of the weight gradient divided by the bias
   gradient, ``e_c = dL/dW[c] / dL/db[c]``, a weighted mean of the batch's features dominated by the
   samples of class c.
2. **Class-wise probabilities** (Eq. 7): ``p_c = softmax(W e_c + b)``, passed through the server's
   own last layer.
3. **Counts** (Eq. 8-9): with counts ``k`` and ``N`` samples, the bias gradient satisfies
   ``N * grad_b = (P^T - I) k`` where column c of ``P^T`` is ``p_c``; together with
   ``sum(k) = N`` this is a linear system (C + 1 equations, C unknowns), solved in least squares
   and rounded.

The system is exact when every sample of a class has the same softmax output; ``N * grad_b`` is
exactly ``sum_i p_i - k``, so everything rests on estimating the batch's summed softmax output.

**What gradleak adds (stabilisation, documented here and in docs/labels.md).** Step 1 divides by
``dL/db[c] = p_bar_c - k_c / N``, which is near zero whenever a class holds about as many samples as
the model predicts for it, a common case with few classes (C = 10) and large batches; ``e_c`` then
explodes and its probabilities are meaningless. gradleak shrinks each ``e_c`` towards one pooled
embedding ``z`` (a ridge estimate), ``e_c(rho) = (g_c G_c + lam z) / (g_c^2 + lam)`` with
``g_c = dL/db[c]``, ``G_c = dL/dW[c]``, ``lam = (rho * max|g|)^2``; ``rho = 0`` is the paper's
estimator. ``z`` is the weighted least-squares fit of ``G_c ~ g_c z`` with weights ``1/(k_c + 1/2)``
(the variance of a class's deviation from the batch mean grows with its count), iterated with the
counts it implies. The counts are solved with ``k >= 0`` (non-negative least squares), and ``rho``
is chosen from a small grid by how close the real-valued counts come to integers and how well they
explain the bias gradient (true counts are integers; a wrong ``rho`` gives fractional ones). The
chosen ``rho`` and this consistency score are reported in ``LabelResult.info``; a poor score adds
a warning.

**An update of unknown scale** (``scale="search"``): a norm clip multiplies the whole update by
``s = C / ||g|| <= 1``, and the server does not know ``||g||``. The embeddings and probabilities
(steps 1-2) are ratios and do not change; only the counts' equation sees ``s``, and every ``s``
solves it with some real counts (``k(s) = N pi + s k_1``). The true one gives integer counts with
exact zeros for the absent classes, which is what the consistency score measures, so the update is
multiplied back by each ``u = 1/s`` of a log grid (:data:`SCALE_GRID`, refined around its best
point) and the ``u`` with the lowest score wins (gradleak; measured in docs/labels.md).

References:
    Ma, Sun, Yang, Wang, Lou and Chen, "Instance-wise Batch Label Restoration via Gradients in
    Federated Learning", ICLR 2023.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import nnls

from gradleak.errors import ConfigError, UpdateError
from gradleak.labels.last_layer import (
    LABEL_STRATEGIES,
    LabelResult,
    LastLayer,
    counting_layer,
    counts_to_labels,
    last_layer,
    make_result,
    require_batch,
)
from gradleak.types import ClientUpdate, ServerState

SHRINKAGE_GRID: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, math.inf)
"""Values of ``rho`` tried by ``shrinkage="auto"``: 0 is the paper's estimator, inf the pooled one."""

SCALE_GRID: tuple[float, ...] = tuple(10.0 ** (k / 20) for k in range(121))
"""Factors ``u`` by which ``scale="search"`` multiplies an update of unknown scale back: 1 to 1e6,
20 a decade (a clip only shrinks an update, so ``u >= 1``); the best one is refined 8x finer."""

LOW_CONFIDENCE = 0.15
"""Consistency score (mean distance of the real counts of present classes from integers, plus the
mean residual of the bias equations, in samples) above which a warning says the counts are likely
wrong; fractional parts drawn at random would score about 0.25. Calibrated on ``gradleak bench labels``."""


def pooled_embedding(layer: LastLayer, n: int, *, iterations: int = 10) -> torch.Tensor:
    """One embedding ``z`` with ``dL/dW[c] ~ dL/db[c] * z`` for every class, shape (M,).

    Weighted least squares over classes with weights ``1 / (k_c + 1/2)``, where ``k_c`` are the
    counts implied by ``softmax(W z + b)``; iterated from the unweighted fit.
    """
    bias, gb = layer.require_bias("ilrg")
    weight, gw = layer.weight, layer.grad_weight
    w = torch.ones_like(gb)
    z = gw.new_zeros(gw.shape[1])
    for _ in range(iterations + 1):
        z = (w[:, None] * gb[:, None] * gw).sum(0) / (w * gb.square()).sum().clamp_min(1e-300)
        k = (n * (torch.softmax(weight @ z + bias, dim=0) - gb)).clamp_min(0)
        w = 1.0 / (k + 0.5)
    return z


def class_embeddings(layer: LastLayer, *, rho: float, pooled: torch.Tensor | None) -> torch.Tensor:
    """iLRG's class-wise embeddings (Ma et al. 2023, Eq. 6), shrunk towards ``pooled`` by ``rho``, (C, M)."""
    gw, gb = layer.grad_weight, layer.require_bias("ilrg")[1]
    if rho == 0.0 or pooled is None:
        safe = torch.where(gb.abs() > 1e-300, gb, torch.full_like(gb, 1e-300))
        return gw / safe[:, None]
    if math.isinf(rho):
        return pooled.expand(gw.shape[0], -1).clone()
    lam = (rho * float(gb.abs().max())) ** 2
    return (gb[:, None] * gw + lam * pooled[None]) / (gb.square()[:, None] + lam)


def solve_counts(probs: torch.Tensor, grad_bias: torch.Tensor, n: int, *,
                 nonnegative: bool = True) -> tuple[torch.Tensor, float]:
    """Solve ``N grad_b = (P^T - I) k``, ``sum(k) = N`` for the counts k (Eq. 8-9).

    Args:
        probs: class-wise probabilities, row c = ``p_c``, shape (C, C).
        grad_bias: the bias gradient, shape (C,).
        n: the batch size N.
        nonnegative: non-negative least squares with the sum constraint weighted heavily
            (gradleak); ``False``: the published pseudo-inverse solution of all C + 1 equations,
            negative values then set to 0.

    Returns:
        The real counts (C,) and the mean absolute residual of the C bias equations, in samples.
    """
    c = probs.shape[0]
    a = (probs.T - torch.eye(c, dtype=probs.dtype)).numpy()
    rhs = (n * grad_bias).numpy()
    if not nonnegative:
        k = np.clip(np.linalg.pinv(np.vstack([np.ones((1, c)), a])) @ np.concatenate([[n], rhs]), 0, None)
        return torch.from_numpy(k), float(np.abs(a @ k - rhs).mean())
    scale = 100.0  # the sum constraint is exact, the bias equations approximate: weigh it heavily
    a_aug = np.vstack([scale * np.ones((1, c)), a])
    rhs_aug = np.concatenate([[scale * n], rhs])
    try:
        k, _ = nnls(a_aug, rhs_aug, maxiter=50 * c)
    except RuntimeError:  # no convergence: fall back to clamped least squares, and say so
        warnings.warn(f"iLRG: non-negative least squares did not converge in {50 * c} iterations; the label counts "
                      "come from clamped least squares instead (less exact)", RuntimeWarning, stacklevel=2)
        k = np.clip(np.linalg.lstsq(a_aug, rhs_aug, rcond=None)[0], 0, None)
    residual = float(np.abs(a @ k - rhs).mean())
    return torch.from_numpy(k), residual


def _score(counts: torch.Tensor, residual: float) -> float:
    """Mean distance from integers over the classes given any samples, plus the mean residual.

    Classes the solver sets to (almost) zero are left out, so that a small batch's many absent
    classes do not dilute the fractional counts of the present ones.
    """
    present = counts[counts > 0.05]
    gap = float((present - present.round()).abs().mean()) if present.numel() else 0.0
    return gap + residual


def _evaluate(layer: LastLayer, n: int, rho: float, pooled: torch.Tensor | None, *,
              nonnegative: bool = True) -> tuple[torch.Tensor, float, float]:
    bias, grad_b = layer.require_bias("ilrg")
    emb = class_embeddings(layer, rho=rho, pooled=pooled)
    probs = torch.softmax(emb @ layer.weight.T + bias, dim=1)
    if not torch.isfinite(probs).all():
        return torch.full((layer.num_classes,), math.nan, dtype=torch.float64), math.inf, math.inf
    counts, residual = solve_counts(probs, grad_b, n, nonnegative=nonnegative)
    return counts, residual, _score(counts, residual)


def _rescaled(layer: LastLayer, factor: float) -> LastLayer:
    """``layer`` with its gradients multiplied by ``factor``."""
    grad_bias = None if layer.grad_bias is None else layer.grad_bias * factor
    return dataclasses.replace(layer, grad_weight=layer.grad_weight * factor, grad_bias=grad_bias)


def _best_rho(layer: LastLayer, n: int, rhos: list[float], *,
              nonnegative: bool) -> tuple[float, torch.Tensor, float, float]:
    """(rho, counts, residual, score) of the ``rho`` with the smallest score (the earlier on a tie)."""
    pooled = pooled_embedding(layer, n) if any(r != 0.0 for r in rhos) else None
    tried = [(rho, *_evaluate(layer, n, rho, pooled, nonnegative=nonnegative)) for rho in rhos]
    return min(tried, key=lambda t: (round(t[3], 9), rhos.index(t[0])))


def _search_scale(layer: LastLayer, n: int, rhos: list[float], *,
                  nonnegative: bool) -> tuple[float, tuple[float, torch.Tensor, float, float]]:
    """The factor of :data:`SCALE_GRID` (then refined) whose rescaled gradient scores best, and its fit."""
    def best(factors: Iterable[float]) -> tuple[float, tuple[float, torch.Tensor, float, float]]:
        fits = ((u, _best_rho(_rescaled(layer, u), n, rhos, nonnegative=nonnegative)) for u in factors)
        return min(fits, key=lambda t: round(t[1][3], 9))

    coarse, _ = best(SCALE_GRID)
    step = SCALE_GRID[1] / SCALE_GRID[0]
    return best(u for u in (coarse * step ** (k / 8) for k in range(-8, 9)) if u >= 1.0)


@LABEL_STRATEGIES.register("ilrg")
def ilrg(server: ServerState, update: ClientUpdate, *, layer: LastLayer | None = None,
         shrinkage: float | str = "auto", grid: Sequence[float] = SHRINKAGE_GRID,
         scale: str = "known") -> LabelResult:
    """Recover per-class counts, repeats allowed, by iLRG (Ma et al. 2023) with gradleak's stabilisation.

    Assumptions (checked where they can be):

    * the model ends in an ``nn.Linear`` with bias (checked);
    * the loss is the mean softmax cross-entropy with hard labels and the update is unmodified:
      the bias gradient must sum to zero over classes (checked; defenses usually break it);
    * one FedSGD gradient, or a one-step delta with ``local_lr`` (a multi-step delta with
      ``local_lr`` is accepted as the trajectory's mean gradient, with a warning; without
      ``local_lr`` it raises);
    * samples of a class have nearly the same softmax output: true for untrained models, not for
      trained ones, where a confidently classified sample barely moves the gradient. Not checkable
      directly; the consistency score in ``info`` measures it, and above
      :data:`LOW_CONFIDENCE` a warning is recorded.
    * ``num_samples`` is the true batch size. A wrong one mostly shows as fractional counts
      (a poor score); an exact multiple of the true size cannot be told apart.

    Args:
        server: the model the update was computed on.
        update: the client's update; ``num_samples`` is N.
        layer: the result of :func:`~gradleak.labels.last_layer.last_layer`, when already computed.
        shrinkage: ``"auto"`` (choose ``rho`` from ``grid`` by the consistency score), ``"paper"``
            (Ma et al.'s method as published: ``rho = 0`` and the pseudo-inverse solution, negative
            counts set to 0) or a number ``rho >= 0`` (``math.inf``: one pooled embedding for every
            class).
        grid: the values of ``rho`` tried by ``"auto"``.
        scale: ``"known"``: the update is at the gradient's own scale; ``"search"``: it was
            shrunk by an unknown factor (a norm clip), found as the one that gives integer counts.

    Returns:
        A :class:`~gradleak.labels.LabelResult` with N labels; ``info`` holds ``counts`` (real),
        ``rho`` and ``score``, and with ``scale="search"`` the factor ``scale`` the update was
        multiplied back by.

    Raises:
        UnsupportedModelError: no final ``nn.Linear`` with bias.
        UpdateError: a delta without ``local_lr``; a bias gradient that does not sum to zero.
        ConfigError: an invalid ``shrinkage``.
    """
    if shrinkage == "paper":
        rhos: list[float] = [0.0]
    elif shrinkage == "auto":
        rhos = list(grid)
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and shrinkage >= 0:
        rhos = [float(shrinkage)]
    else:
        raise ConfigError(f"ilrg shrinkage: expected 'auto', 'paper' or a number >= 0, got {shrinkage!r}")
    if not rhos:
        raise ConfigError("ilrg shrinkage grid: expected at least one value, got none")
    if scale not in ("known", "search"):
        raise ConfigError(f"ilrg scale: expected 'known' or 'search', got {scale!r}")
    layer = layer or last_layer(server, update)
    n = require_batch("ilrg", update)
    layer, _ = counting_layer("ilrg", layer)
    factor = 1.0
    nonnegative = shrinkage != "paper"
    if scale == "search":
        factor, (rho, counts, residual, score) = _search_scale(layer, n, rhos, nonnegative=nonnegative)
    else:
        rho, counts, residual, score = _best_rho(layer, n, rhos, nonnegative=nonnegative)
    notes: list[str] = []
    if not math.isfinite(score):
        raise UpdateError("label strategy 'ilrg': expected finite class-wise probabilities, got none finite for "
                          "any shrinkage (is the update a gradient of this model?)")
    if score > LOW_CONFIDENCE:
        notes.append(f"ilrg: low confidence (consistency score {score:.2f} > {LOW_CONFIDENCE}: the real-valued "
                     f"counts are far from integers or do not explain the bias gradient); iLRG's assumptions "
                     f"(untrained model, one step, true batch size) may not hold and counts may be wrong")
    info = {"counts": [round(float(c), 4) for c in counts], "rho": rho if math.isfinite(rho) else "inf",
            "score": round(score, 4), "residual": round(residual, 4)}
    if scale == "search":
        info["scale"] = round(factor, 4)
    return make_result(counts_to_labels(counts, n), "ilrg", layer, warnings=notes, info=info)
