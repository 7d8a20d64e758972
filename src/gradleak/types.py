"""The threat contract: frozen dataclasses that cross the client/server boundary.

What the client uploads is a :class:`ClientUpdate`; what the server (the attacker) knows besides
it is a :class:`ServerState`. An attack's ``reconstruct`` receives only these two and returns a
:class:`Reconstruction`; the private batch never enters it.

Tensor conventions: images are float NCHW in [0, 1] at every public boundary; labels are int64
class indices of shape (N,).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gradleak.config import from_dict
from gradleak.errors import ConfigError, UpdateError

UpdateKind = Literal["gradient", "delta"]
ProtocolName = Literal["fedsgd", "fedavg", "aggregate"]
"""How the update was computed (not :class:`typing.Protocol`)."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a registered victim architecture (weights travel apart).

    Args:
        name: registry name of the architecture (``gradleak.models.available()``).
        num_classes: number of output classes C.
        image_size: input height = width in pixels.
        channels: input channels (3 for colour).
        activation: ``"relu"``, ``"sigmoid"`` (the paper's victim replaces every ReLU by Sigmoid),
            ``"tanh"``, ``"leaky-relu"`` or ``"gelu"`` (``gradleak.models.ACTIVATIONS``).
        bn_mode: ``"train"`` (batch statistics, couples the batch) or ``"eval"`` (running statistics).
        width: architecture width where it has one (hidden units of the MLP, channels of the ConvNet).
    """

    name: str
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    activation: str = "sigmoid"
    bn_mode: str = "train"
    width: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model spec name: expected a registered architecture name, got {self.name!r}")
        for key, low, high in (("num_classes", 1, 100_000), ("image_size", 1, 4096), ("channels", 1, 64)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"model spec {key}: expected an integer from {low} to {high}, got {value!r}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or not 1 <= self.width <= 65_536):
            raise ConfigError(f"model spec width: expected null or an integer from 1 to 65536, got {self.width!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return from_dict(cls, data, what="model spec")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class ServerState:
    """What the server knows when it receives an update: the model it sent, and public metadata.

    Args:
        model: the global model as sent to the client (architecture and weights). Attacks work
            on a copy of it and never change it.
        input_shape: (C, H, W) of one input image.
        num_classes: number of classes C.
        bn_mode: ``"train"`` or ``"eval"``: the mode the client computes its update in.
        spec: the registered architecture, when the model came from ``gradleak.models``.
    """

    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    bn_mode: str = "train"
    spec: ModelSpec | None = None

    @classmethod
    def from_spec(cls, model: nn.Module, spec: ModelSpec) -> ServerState:
        return cls(model=model, input_shape=spec.input_shape, num_classes=spec.num_classes,
                   bn_mode=spec.bn_mode, spec=spec)

    def parameter_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class ClientUpdate:
    """What leaves a client: one tensor per trainable parameter, plus metadata.

    Args:
        tensors: parameter name -> tensor, in the model's ``named_parameters`` order. For
            ``kind="gradient"`` the gradient of the mean loss; for ``kind="delta"`` the weight
            difference ``theta_after - theta_before``.
        kind: ``"gradient"`` or ``"delta"``.
        num_samples: number of private samples N behind the update (public in FedAvg: clients
            report it for weighting).
        protocol: ``"fedsgd"``, ``"fedavg"`` or ``"aggregate"``.
        local_steps: local optimisation steps (FedAvg), 1 for FedSGD.
        local_lr: local learning rate (FedAvg).
        local_batch_size: local mini-batch size (FedAvg).
        num_clients: how many client updates were averaged (aggregate).
        defenses: names of the defenses applied, in order.
        metadata: anything else, JSON-serialisable.
        buffers: BatchNorm running statistics the client shared, as the change its local training
            made to them (``buffer name -> after - before``; ``running_mean`` and ``running_var``
            of each train-mode BatchNorm layer). A FedAvg client that uploads its whole
            ``state_dict`` (Flower's examples do) shares them; a FedSGD client that shares them
            sends the change its one forward pass made. Over one step the change of ``running_mean``
            is ``momentum * (batch mean - running_mean)``: the batch means of every BatchNorm layer's
            input (:func:`gradleak.threat.batchnorm.batch_statistics`). Empty: not shared.
    """

    tensors: dict[str, torch.Tensor]
    kind: UpdateKind = "gradient"
    num_samples: int = 1
    protocol: ProtocolName = "fedsgd"
    local_steps: int = 1
    local_lr: float | None = None
    local_batch_size: int | None = None
    num_clients: int = 1
    defenses: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("gradient", "delta"):
            raise UpdateError(f"update kind: expected 'gradient' or 'delta', got {self.kind!r}")
        if self.protocol not in ("fedsgd", "fedavg", "aggregate"):
            raise UpdateError(
                f"update protocol: expected 'fedsgd', 'fedavg' or 'aggregate', got {self.protocol!r}")
        if int(self.num_samples) < 1:
            raise UpdateError(f"update num_samples: expected a positive integer, got {self.num_samples}")
        if not self.tensors:
            raise UpdateError("update: expected at least one tensor, got none")

    def gradients(self) -> list[torch.Tensor]:
        """The tensors as a list, in parameter order."""
        return list(self.tensors.values())

    def meta_dict(self) -> dict[str, Any]:
        """All fields but the tensors, JSON-serialisable (what the update file's header holds)."""
        return {
            "kind": self.kind,
            "num_samples": int(self.num_samples),
            "protocol": self.protocol,
            "local_steps": int(self.local_steps),
            "local_lr": self.local_lr,
            "local_batch_size": self.local_batch_size,
            "num_clients": int(self.num_clients),
            "defenses": list(self.defenses),
            "metadata": self.metadata,
            "parameters": {n: list(t.shape) for n, t in self.tensors.items()},
            "buffers": {n: list(t.shape) for n, t in self.buffers.items()},
        }

    def replace(self, **changes: Any) -> ClientUpdate:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> ClientUpdate:
        return self.replace(tensors={n: t.to(device) for n, t in self.tensors.items()},
                            buffers={n: t.to(device) for n, t in self.buffers.items()})


@dataclass(frozen=True)
class Batch:
    """A private batch: images (N, C, H, W) in [0, 1], labels (N,), and where each image came from.

    What a client trains on; only the client side and scoring ever hold one.
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class Reconstruction:
    """An attack's output.

    Args:
        images: reconstructed images, shape (N, C, H, W), range [0, 1].
        labels: labels the attack used, shape (N,), int64.
        label_strategy: how the labels were obtained (``"given"`` or a recovery strategy).
        history: per logged iteration: ``{"iteration": [...], "loss": [...]}``.
        iterations: steps the attack ran in all (over stages and restarts, resumed runs included).
        seconds: the attack's on-clock time, resumed runs included.
        stopped_early: why the run ended before its budget (``"stopped by the callback"``,
            ``"noise floor reached"``), or None when it ran its budget.
        resumed_from: the iteration a resumed run continued from (0: not resumed).
        matching: what the attack matched (``"gradient"``, ``"fedavg replay of 3 local steps"``, ...).
        info: attack-specific facts to record (channel rule, restart scores, label notes, ...).
    """

    images: torch.Tensor
    labels: torch.Tensor
    label_strategy: str
    history: dict[str, list[float]] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    stopped_early: str | None = None
    resumed_from: int = 0
    matching: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def outcome(self) -> dict[str, Any]:
        """The common fields as JSON (what a run's metrics.json records beside ``info``)."""
        return {"iterations": int(self.iterations), "seconds": float(self.seconds),
                "stopped_early": self.stopped_early, "resumed_from": int(self.resumed_from),
                "matching": self.matching}
