"""The attack contract: construct with a config, then ``reconstruct(server, update)``.

The attacker sees what the server sees: the model it sent (:class:`ServerState`) and the update
(:class:`ClientUpdate`). Labels come from :mod:`gradleak.labels` unless the caller explicitly
hands ground-truth labels in (recorded as ``label_strategy="given"``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from gradleak.attacks.threat_model import Knowledge
from gradleak.config import from_dict
from gradleak.errors import ConfigError, UpdateError
from gradleak.labels import LabelResult, recover_labels
from gradleak.registry import Registry
from gradleak.threat.io import check_update
from gradleak.types import ClientUpdate, Reconstruction, ServerState


@dataclass(frozen=True)
class Progress:
    """What an attack reports every ``log_every`` iterations to a callback."""

    iteration: int
    total: int
    loss: float
    images: torch.Tensor


ProgressCallback = Callable[[Progress], "bool | None"]
"""Called every ``log_every`` iterations; returning ``True`` asks the attack to stop early and
return what it has (used for wall-clock budgets)."""


class Attack(ABC):
    """Base class of every gradient-inversion attack.

    Args:
        config: the attack's frozen config dataclass (or a dict of its fields).
        device: where to run.
        seed: seed of every random draw the attack makes (a ``torch.Generator``; the global RNG
            is not touched).
    """

    name: ClassVar[str] = "attack"
    Config: ClassVar[type]
    knowledge: ClassVar[Knowledge] = Knowledge()
    """What the attacker holds (:mod:`gradleak.attacks.threat_model`), in ``gradleak list attacks``."""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    adaptive: ClassVar[bool] = False
    """It can simulate the defense an update records (its config has ``adaptive``)."""
    iterative: ClassVar[bool] = True
    """It runs steps under an iteration budget (:meth:`budget`) and reports progress."""
    resumable: ClassVar[bool] = True
    """An interrupted run continues from its checkpoint (``resume=True``)."""
    needs_generator: ClassVar[bool] = False
    """It needs a pretrained generator (the attacker's surrogate data)."""
    uses_labels: ClassVar[bool] = True
    """Its images depend on the labels it is given (an audit tries it with labels recovered and known)."""
    matches_bn_stats: ClassVar[bool] = False
    """It matches BatchNorm statistics the client shared (its config's ``bn_stats``; an audit tries it
    using and ignoring them)."""
    feature_variant: ClassVar[bool] = False
    """An audit tries it with and without the last-layer features recovered from the update (its
    config's ``features``/``feature_init``): set where measurements say the term can help (IG on
    LeNet-ReLU, batch 4: mean SSIM 0.37 -> 0.52, docs/attacks.md), not where it was measured to
    hurt (CI-Net)."""
    centred_variant: ClassVar[bool] = False
    """It can match centred (its config's ``center``: :func:`gradleak.attacks.matching.centered`); an
    audit tries it centred and plain on a victim whose update barely depends on the images (a flat
    landscape, :func:`gradleak.audit.landscape.flat`)."""

    @classmethod
    def applicability(cls, server: ServerState, config: Any, *, local_steps: int = 1) -> str | None:
        """Why this attack cannot attack ``server``'s model with ``config``, or ``None`` when it can.

        Args:
            server: the victim the update comes from.
            config: the attack's resolved config.
            local_steps: the client's local steps (1: FedSGD, or a one-step delta).

        ``--attacks auto`` runs every attack whose answer is ``None``; an attack asked for by name
        whose answer is not is refused with the reason.
        """
        return None

    @classmethod
    def max_images(cls, server: ServerState, config: Any = None) -> int | None:
        """The most images (the batch times the clients) whose update it reads on ``server``'s model
        with ``config`` (``None``: its defaults); ``None``: any. An audit tries it on cells of at most
        this many and names it as not tried on the others."""
        return None

    def __init__(self, config: Any = None, *, device: str | torch.device = "cpu", seed: int = 0) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, Mapping):
            config = from_dict(self.Config, config, what=f"{self.name} config")
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: expected a {self.Config.__name__} or a dict, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(device)
        self.seed = seed

    @classmethod
    def malicious_model(cls, server: ServerState, size: int, *, batch_size: int,
                        public: torch.Tensor | None = None) -> ServerState:
        """The model a malicious server sends for this attack (``knowledge.active_manipulation``
        attacks only): ``server``'s victim behind the attack's block of ``size`` units, set for
        clients of ``batch_size`` images on the server's ``public`` images where the block needs
        them (:func:`gradleak.data.public_images`)."""
        raise ConfigError(f"{cls.name}: expected an attack on a model the server modified, got one on the honest "
                          "model (it has no malicious model)")

    @classmethod
    def budget(cls, iterations: int, config: Any) -> dict[str, int]:
        """The config fields that give ``config`` a budget of ``iterations`` steps in all.

        Used by ``--iterations`` and ``gradleak compare``; an attack whose steps are split into
        stages or restarts overrides it. Empty for an attack without an iteration count.
        """
        names = {f.name for f in dataclasses.fields(cls.Config)}
        return {"iterations": iterations} if "iterations" in names else {}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any:
        """The named preset's config, with ``overrides`` applied."""
        if name not in cls.presets:
            raise ConfigError(f"unknown {cls.name} preset '{name}'; expected one of: {', '.join(sorted(cls.presets))}")
        return from_dict(cls.Config, {**cls.presets[name], **overrides}, what=f"{cls.name}:{name} config")

    def resolve_labels(self, server: ServerState, update: ClientUpdate, labels: torch.Tensor | None,
                       strategy: str) -> LabelResult:
        """Labels to use, on the attack's device: the caller's (``"given"``) or recovered from the update.

        The result's ``info`` (e.g. iLRG's real-valued counts and consistency score) goes into the
        reconstruction's ``info["label_info"]`` and from there into a run's metrics.json.
        """
        if labels is not None:
            labels = torch.as_tensor(labels).long().view(-1)
            if labels.numel() != update.num_samples:
                raise UpdateError(f"given labels: expected {update.num_samples} (the update's batch size), "
                                  f"got {labels.numel()}")
            return LabelResult(labels.to(self.device), "given")
        if strategy == "scored":  # needs the matcher, so it lives with the attacks, not in gradleak.labels
            from gradleak.attacks.label_scoring import scored_labels

            result = scored_labels(server, update, device=self.device,
                                   adaptive=getattr(self.config, "adaptive", "auto"), seed=self.seed)
        else:
            result = recover_labels(server, update, strategy=strategy)
        return replace(result, labels=result.labels.to(self.device))

    def check(self, server: ServerState, update: ClientUpdate) -> None:
        check_update(update, model=server.model)

    @abstractmethod
    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        """Reconstruct the private batch behind ``update``.

        Args:
            server: the model the update was computed on and its public metadata.
            update: the client's update.
            labels: ground-truth labels to use instead of recovering them (isolates the image
                attack; recorded as ``label_strategy="given"``).
            callback: called with a :class:`Progress` every ``log_every`` iterations; if it
                returns ``True`` the attack stops and returns its current reconstruction.
            run_dir: where iterative attacks write their checkpoints.
            resume: continue from the checkpoint in ``run_dir``.

        Returns:
            A :class:`Reconstruction` with images (N, C, H, W) in [0, 1].
        """


ATTACKS: Registry[type[Attack]] = Registry("attack")


def create(name: str, config: Any = None, *, device: str | torch.device = "cpu", seed: int = 0) -> Attack:
    """Build the attack registered as ``name``: ``create("cinet", {"iterations": 500})``."""
    return ATTACKS.create(name, config, device=device, seed=seed)


def resolve_config(name: str, *, preset: str | None = None, overrides: Mapping[str, Any] | None = None,
                   iterations: int | None = None) -> Any:
    """Attack ``name``'s config: its preset (or its defaults), then ``overrides``, then an iteration budget.

    The one resolver behind the CLI, ``compare``, audits, sweeps and the Flower strategy.

    Raises:
        ConfigError: an unknown attack, preset or field, a value of the wrong type or range, or a
            budget for an attack without an iteration count.
    """
    cls = ATTACKS.get(name)
    cfg = cls.preset(preset, **dict(overrides or {})) if preset else from_dict(
        cls.Config, dict(overrides or {}), what=f"{name} config")
    if iterations is None:
        return cfg
    budget = cls.budget(iterations, cfg)
    if not budget:
        raise ConfigError(f"iterations: {name} has no iteration count (see gradleak list presets)")
    return replace(cfg, **budget)


def available() -> list[str]:
    """Names of the registered attacks."""
    return ATTACKS.available()


def supports_adaptive(name: str) -> bool:
    """Whether the registered attack ``name`` can simulate a recorded defense (:attr:`Attack.adaptive`)."""
    return ATTACKS.get(name).adaptive


def target_gradients(update: ClientUpdate) -> list[torch.Tensor]:
    """The gradient a single-step update stands for (a FedSGD gradient, or -delta/lr for one local step).

    Raises:
        UpdateError: a multi-step FedAvg delta (needs an attack that simulates local steps).
    """
    if update.kind == "gradient":
        return update.gradients()
    if update.local_steps == 1 and update.local_lr:
        return [-t / update.local_lr for t in update.gradients()]
    raise UpdateError(f"update: expected a gradient or a one-step delta with its local_lr, got a delta of "
                      f"{update.local_steps} local steps (lr={update.local_lr})")
