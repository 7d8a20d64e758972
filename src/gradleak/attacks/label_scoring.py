"""Labels by vote of the update itself: every strategy's label multiset, scored by a short matching run.

Under a defense the label strategies disagree (pruning, quantization and noise break the
assumptions iLRG and bias-count check, and LLG and Yin then guess differently), and a wrong label
costs more than any number of iterations: on LeNet-sigmoid, batch 4, ``prune:0.9``, CI-Net with
the recovered labels (accuracy 0.5) reaches SSIM 0.01, with the true ones 0.55. Strategy
``scored`` collects the distinct multisets of every strategy that applies (ground truth never
enters), runs the same short image optimisation against the update with each (the attack's own
matcher, so a recorded defense is simulated when the attacker is defense-aware), and keeps the
multiset whose matching loss ends lowest: the labels under which some images explain the update
best.

References:
    Geiping et al., "Inverting Gradients", NeurIPS 2020 (the image optimisation: Adam on the
    cosine distance).
    Ma et al., "Instance-wise Batch Label Restoration via Gradients in Federated Learning" (iLRG),
    ICLR 2023; Wainakh et al., "User-Level Label Leakage from Gradients" (LLG), PETS 2022.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from gradleak.attacks.matching import build_matcher
from gradleak.errors import GradleakError
from gradleak.labels import LabelResult, recover_labels
from gradleak.types import ClientUpdate, ServerState

CANDIDATES = ("ilrg", "bias-count", "llg", "yin", "idlg")
"""The strategies whose answers are scored (each where its assumptions hold)."""

SCORING_STEPS = 60
"""Adam steps of each candidate's matching run."""


def candidate_labels(server: ServerState, update: ClientUpdate) -> list[LabelResult]:
    """The distinct label multisets of every strategy in :data:`CANDIDATES` that applies, first answer first."""
    seen: dict[tuple[int, ...], LabelResult] = {}
    for name in CANDIDATES:
        try:
            result = recover_labels(server, update, strategy=name)
        except GradleakError:
            continue
        key = tuple(sorted(result.labels.tolist()))
        if len(key) == update.num_samples and key not in seen:
            seen[key] = result
    return list(seen.values())


def matching_score(server: ServerState, update: ClientUpdate, labels: torch.Tensor, *, device: torch.device,
                   adaptive: str = "auto", steps: int = SCORING_STEPS, seed: int = 0) -> float:
    """The lowest matching loss a short image optimisation reaches with ``labels`` (lower: the labels fit better)."""
    victim = copy.deepcopy(server.model).to(device)
    victim.train(server.bn_mode == "train")
    matcher = build_matcher(update, victim, device=device, adaptive=adaptive)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((update.num_samples, *server.input_shape), generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)
    y = labels.to(device)
    best = float("inf")
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = matcher.distance("cosine", matcher.simulate(torch.sigmoid(z), y))
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if value == value:  # not NaN
            best = min(best, value)
    return best


def scored_labels(server: ServerState, update: ClientUpdate, *, device: torch.device | str = "cpu",
                  adaptive: str = "auto", steps: int = SCORING_STEPS, seed: int = 0) -> LabelResult:
    """The candidate multiset with the lowest :func:`matching_score` (one candidate: it, unscored).

    Returns:
        A :class:`~gradleak.labels.LabelResult` with strategy ``scored:<winner>`` and, in ``info``,
        every candidate's strategy, labels and score.

    Raises:
        UpdateError: no strategy applies to the update.
    """
    from gradleak.errors import UpdateError

    candidates = candidate_labels(server, update)
    if not candidates:
        raise UpdateError(f"label strategy 'scored': expected at least one of {', '.join(CANDIDATES)} to apply to "
                          "the update, got none")
    dev = torch.device(device)
    scores = ([matching_score(server, update, c.labels, device=dev, adaptive=adaptive, steps=steps, seed=seed)
               for c in candidates] if len(candidates) > 1 else [float("nan")])
    best = min(range(len(candidates)), key=lambda i: scores[i] if scores[i] == scores[i] else float("inf"))
    winner = candidates[best]
    info: dict[str, Any] = {"candidates": [{"strategy": c.strategy, "labels": c.labels.tolist(), "score": s}
                                           for c, s in zip(candidates, scores)],
                            "steps": steps, "chosen": winner.strategy}
    notes = list(winner.warnings)
    if len(candidates) > 1:
        notes.append(f"scored {len(candidates)} candidate label multisets by a {steps}-step matching run; kept "
                     f"{winner.strategy}'s")
    return LabelResult(winner.labels, f"scored:{winner.strategy}", notes, info)


__all__ = ["CANDIDATES", "SCORING_STEPS", "candidate_labels", "matching_score", "scored_labels"]
