"""Terms beside gradient matching, from what else the update gives away.

* **Last-layer features** (``features`` > 0): the input of the victim's last linear layer, recovered
  from the update (:mod:`gradleak.attacks.features`), matched by the candidates' own:
  ``sum_i ||phi(x_i) - f_i||^2 / sum_i ||f_i||^2``. ``feature_init`` runs that many iterations on
  this term alone before the gradient matching starts: the features as an initialisation target.
* **BatchNorm statistics** (``bn_stats`` > 0, used whenever the update shares them,
  :mod:`gradleak.threat.batchnorm`): every BatchNorm layer's running-statistics change, replayed on
  the candidates (one forward for FedSGD, every local step for FedAvg), against the shared one, as
  Yin et al. (CVPR 2021) match batch statistics: the mean over layers of
  ``||mu(x) - mu*|| + ||var(x) - var*||``, in batch-statistic units (the change divided by the
  momentum).

Both read the victim's activations with forward pre-hooks during the matcher's own simulation, so
they cost no extra forward pass; where the simulation does not run the plain layers (DP-SGD's
per-sample ``vmap``), a separate forward reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradleak.attacks.features import FeatureRecovery, recover_features
from gradleak.errors import ConfigError, UpdateError
from gradleak.threat import batchnorm
from gradleak.threat.fedavg import schedule_of
from gradleak.types import ClientUpdate, ServerState

if TYPE_CHECKING:
    from gradleak.attacks.loop import LoopConfig

_EPS = 1e-12


def _batched(t: torch.Tensor) -> bool:
    """A tensor inside a functorch transform (``vmap``, or ``grad`` around it, as DP-SGD's per-sample
    simulation runs): its values cannot leave the transform, so the term takes a forward pass of its own."""
    f = torch._C._functorch
    return bool(f.is_batchedtensor(t) or f.is_functorch_wrapped_tensor(t))


@dataclass
class Auxiliary:
    """The extra terms of one run, and the hooks that feed them (built by :meth:`build`)."""

    victim: nn.Module
    feature_weight: float = 0.0
    bn_weight: float = 0.0
    feature: FeatureRecovery | None = None
    feature_module: nn.Module | None = None
    feature_index: torch.Tensor | None = None
    bn_layers: dict[str, nn.Module] = field(default_factory=dict)
    bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bn_before: dict[str, tuple[torch.Tensor, torch.Tensor, list[float]]] = field(default_factory=dict)
    bn_steps: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    _captured: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _recording: bool = False

    @classmethod
    def build(cls, cfg: LoopConfig, server: ServerState, update: ClientUpdate, victim: nn.Module,
              labels: torch.Tensor, *, seed: int, device: torch.device) -> Auxiliary:
        """The terms ``cfg`` asks for and the update allows, on ``victim`` (the attack's copy).

        Raises:
            ConfigError: ``features`` without labels (DLG's joint soft labels).
            UnsupportedModelError / UpdateError: ``features`` on a victim or update they do not fit
                (:func:`~gradleak.attacks.features.recover_features`).
        """
        aux = cls(victim=victim, feature_weight=float(cfg.features), bn_weight=float(cfg.bn_stats))
        if cfg.features > 0 or cfg.feature_init > 0:
            if labels.numel() != update.num_samples:
                raise ConfigError("features: expected labels to recover the features with (recovered or given), got "
                                  "an attack that optimises them jointly (soft_labels); set features=0")
            aux.feature = recover_features(server, update, labels, seed=seed)
            aux.feature_module = dict(victim.named_modules())[aux.feature.layer]
            order = list(range(update.num_samples))
            if update.kind == "delta":
                order = schedule_of(update)[0]
            aux.feature_index = torch.as_tensor(order, device=device)
            aux.feature.features = aux.feature.features.to(device)
            aux.info["features"] = {**aux.feature.describe(), "weight": aux.feature_weight,
                                    "init_iterations": int(cfg.feature_init)}
        if update.buffers and cfg.bn_stats > 0:
            batchnorm.check_buffers(update, server.model)
            if update.protocol == "aggregate":
                raise UpdateError("BatchNorm statistics: expected one client's update, got an aggregate")
            layers = batchnorm.tracked_layers(victim)
            sent = batchnorm.tracked_layers(server.model)  # the statistics before: the copy's move as it runs
            aux.bn_steps = update.local_steps if update.kind == "delta" else 1
            for name, layer in layers.items():
                aux.bn_targets[name] = (update.buffers[f"{name}.running_mean"].to(device),
                                        update.buffers[f"{name}.running_var"].to(device))
                before = sent[name]
                aux.bn_before[name] = (before.running_mean.detach().clone().to(device),  # type: ignore[union-attr]
                                       before.running_var.detach().clone().to(device),  # type: ignore[union-attr]
                                       batchnorm.momenta(before, aux.bn_steps))
                aux.bn_layers[name] = layer
            aux.info["bn_stats"] = {"layers": len(layers), "weight": aux.bn_weight, "steps": aux.bn_steps,
                                    "term": "mean over layers of ||mu - mu*|| + ||var - var*|| (Yin et al. 2021)"}
        elif update.buffers:
            aux.info["bn_stats"] = {"layers": 0, "weight": 0.0, "note": "shared by the client, ignored (bn_stats=0)"}
        aux._hook()
        return aux

    @property
    def active(self) -> bool:
        return self.feature_module is not None or bool(self.bn_layers)

    def _hook(self) -> None:
        watched = dict(self.bn_layers)
        if self.feature_module is not None:
            watched["<features>"] = self.feature_module
        for key, module in watched.items():
            def hook(mod: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
                if self._recording and args and isinstance(args[0], torch.Tensor) and not _batched(args[0]):
                    self._captured.setdefault(key, []).append(args[0])
            module.register_forward_pre_hook(hook)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Record the watched layers' inputs while the matcher simulates the client."""
        self._captured = {}
        self._recording = self.active
        try:
            yield
        finally:
            self._recording = False

    def _forward(self, images: torch.Tensor) -> None:
        """Read the activations with a forward pass of their own (the simulation did not show them)."""
        with self.watching():
            self.victim(images)

    def loss(self, images: torch.Tensor, *, features_only: bool = False) -> torch.Tensor | None:
        """The weighted extra terms for the candidates the last :meth:`watching` block simulated.

        ``features_only``: the feature term alone, from a forward pass of its own (the
        ``feature_init`` stage, which runs no simulation).
        """
        if not self.active:
            return None
        if features_only:
            self._forward(images)
        total: torch.Tensor | None = None
        if self.feature_module is not None and (self.feature_weight > 0 or features_only):
            seen = self._captured.get("<features>")
            if not seen:
                self._forward(images)
                seen = self._captured.get("<features>")
                index = torch.arange(images.shape[0], device=images.device)
            else:
                index = self.feature_index  # type: ignore[assignment]
            assert self.feature is not None and seen
            phi = seen[0].flatten(1).float()
            target = self.feature.features[index]
            term = (phi - target).pow(2).sum() / target.pow(2).sum().clamp_min(_EPS)
            total = term * (1.0 if features_only else self.feature_weight)
        if self.bn_layers and not features_only:
            term = self._bn_term(images)
            total = term * self.bn_weight if total is None else total + term * self.bn_weight
        return total

    def _bn_term(self, images: torch.Tensor) -> torch.Tensor:
        if any(len(self._captured.get(name, [])) < self.bn_steps for name in self.bn_layers):
            if self.bn_steps != 1:
                raise UpdateError(f"BatchNorm statistics: the simulation showed fewer than the {self.bn_steps} "
                                  "local steps' activations")
            self._forward(images)
        terms = []
        for name in self.bn_layers:
            mean0, var0, factors = self.bn_before[name]
            d_mean, d_var = batchnorm.predicted_changes(mean0, var0, factors, self._captured[name][: self.bn_steps])
            t_mean, t_var = self.bn_targets[name]
            # in batch-statistic units: the change over a step is the momentum times the statistic's move
            terms.append((torch.linalg.vector_norm(d_mean - t_mean) + torch.linalg.vector_norm(d_var - t_var))
                         / factors[0])
        return torch.stack(terms).mean()


__all__ = ["Auxiliary"]
