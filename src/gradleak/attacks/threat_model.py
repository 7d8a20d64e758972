"""What each attacker knows, stated per attack and per run, and mapped to the SoK's threat models.

Carletti et al. (USENIX Security 2025) classify gradient-inversion attackers by what they hold
besides the model updates: basic knowledge, training details, surrogate data, the client's data
distribution, active manipulation of the model, and control of client selection; their threat
models A-H are combinations of these (A: updates only, "Eavesdropper"; B: plus basic knowledge;
C: plus training details; D: plus surrogate data; E: plus the data distribution; F-H actively
manipulate the model or the client selection). Every gradleak attacker but one is passive (an
honest-but-curious server or an eavesdropper on it); ``imprint`` is a malicious server that sent a
modified model (:mod:`gradleak.threat.malicious`), threat model F.

The SoK places DLG and iDLG in A, Inverting Gradients and closed-form inversion in B, and GIAS-style
generative priors (a generator pretrained on public data) in D; CI-Net, which needs what Inverting
Gradients needs and no data, is placed in B here. A run moves to C when the attacker also uses
training details: the local steps, learning rate and batch size it replays for a FedAvg delta, or
the defense and its parameters it simulates (the adaptive attacker).

References:
    Carletti, Foggia, Mazzocca, Parrella, Vento, "SoK: Gradient Inversion Attacks in Federated
    Learning", USENIX Security 2025, Section 3 (threat models A-H).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gradleak.types import ClientUpdate


@dataclass(frozen=True)
class Knowledge:
    """What an attack assumes its attacker holds, before any update is seen.

    Args:
        weights: the global model's architecture and weights (every attack here).
        labels: ``"recovered"`` (from the update, :mod:`gradleak.labels`), ``"joint"`` (optimised
            with the images, DLG) or ``"none"`` (not needed).
        batchnorm_statistics: ``"batch"`` (train-mode BatchNorm is simulated with the candidates'
            own statistics: nothing of the client's is known), or ``"running"`` when the client
            runs BatchNorm in eval mode (its running statistics are part of the weights). A run
            records "shared by the client" instead when the update carried the client's statistics
            (:mod:`gradleak.threat.batchnorm`), and whether the attack matched them.
        surrogate_data: a model trained on public data (GIAS's pretrained generator).
        sok: the SoK threat model of the attack without training details.
        active_manipulation: the server changed the model it sent (a malicious server, SoK F).
    """

    weights: bool = True
    labels: str = "recovered"
    batchnorm_statistics: str = "batch"
    surrogate_data: bool = False
    sok: str = "B"
    active_manipulation: bool = False

    def describe(self, *, adaptive: bool) -> str:
        """One line for ``gradleak list attacks``; ``adaptive``: whether the attack simulates defenses."""
        parts = ["weights and architecture", f"labels {self.labels}"]
        if self.active_manipulation:
            parts.insert(0, "sends a modified model (malicious server)")
        parts.append("surrogate data (a pretrained generator)" if self.surrogate_data else "no data")
        parts.append("simulates a recorded defense" if adaptive else "ignores defenses")
        sok = f"SoK {self.sok}" + (" (C with training details)" if self.sok in ("A", "B") else "")
        return f"{sok}: " + "; ".join(parts)


def run_threat_model(knowledge: Knowledge, update: ClientUpdate, info: dict[str, Any], *,
                     bn_mode: str = "train", labels: str | None = None) -> dict[str, Any]:
    """What the attacker of one run knew and used (recorded in its ``metrics.json``).

    Args:
        knowledge: the attack's :class:`Knowledge`.
        update: the attacked update.
        info: the reconstruction's ``info`` (its ``adaptive`` record).
        bn_mode: the client's BatchNorm mode.
        labels: ``"given"`` when ground-truth labels were handed to the attack.
    """
    adaptive = bool((info.get("adaptive") or {}).get("active"))
    replayed = update.kind == "delta"
    training = []
    if replayed:
        training.append(f"local steps {update.local_steps}, lr {update.local_lr}, batch {update.local_batch_size}")
    if update.protocol == "aggregate":
        training.append(f"{update.num_clients} clients' sample counts")
    if adaptive:
        training.append(f"defense {info['adaptive'].get('defense')}")
    sok = knowledge.sok
    if training and sok in ("A", "B"):
        sok = "C"
    return {**asdict(knowledge), "labels": "given (ground truth)" if labels == "given" else knowledge.labels,
            "batchnorm_statistics": _bn_knowledge(knowledge, info, bn_mode),
            "last_layer_features": bool((info.get("auxiliary") or {}).get("features")),
            "adaptive": adaptive, "training_details": training, "defense_known": adaptive,
            "sok": sok, "sok_reference": "Carletti et al., USENIX Security 2025, threat models A-H",
            "active_manipulation": knowledge.active_manipulation}


def _bn_knowledge(knowledge: Knowledge, info: dict[str, Any], bn_mode: str) -> str:
    if bn_mode == "eval":
        return "running (in the weights)"
    shared = (info.get("auxiliary") or {}).get("bn_stats")
    if shared:
        if shared.get("layers"):
            return f"shared by the client, matched ({shared['layers']} layers, weight {shared['weight']})"
        return "shared by the client, ignored"
    return knowledge.batchnorm_statistics


__all__ = ["Knowledge", "run_threat_model"]
