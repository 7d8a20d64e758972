"""Shared setup of the benchmark cases."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from gradleak.data import builtin_batch, load_batch
from gradleak.models import build_model
from gradleak.threat import fedsgd_update
from gradleak.types import ModelSpec, ServerState


def demo_case(batch: int, *, size: int = 32, model: str = "resnet18", activation: str = "sigmoid",
              device: str = "cpu", data_root: str | Path | None = None, share_bn_stats: bool = False):
    """The demo case: untrained CIFAR ResNet-18-sigmoid (seed 42), built-in photos, FedSGD.

    ``data_root``: draw the batch from a local CIFAR-10 copy (torchvision's format) instead.
    ``share_bn_stats``: the client also uploads its BatchNorm running-statistics change (the attacks
    then match it, ``bn_stats``).
    """
    spec = ModelSpec(name=model, image_size=size, activation=activation,
                     num_classes=1000 if model == "resnet18-imagenet" else 10)
    net = build_model(spec, seed=42, device=device)
    if data_root is not None:
        data = load_batch("cifar10-dir", batch, size=size, num_classes=spec.num_classes, root=data_root)
    else:
        data = builtin_batch(batch, size=size, source="builtin" if size == 32 else "photos",
                             num_classes=spec.num_classes)
    server = ServerState.from_spec(net, spec)
    update = fedsgd_update(server, data.images.to(device), data.labels.to(device), share_bn_stats=share_bn_stats)
    return server, update, data.images, data.labels


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    from gradleak.reporting.tables import markdown

    print(markdown(headers, rows, aligned=True))


def write_json(path: str | Path, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


class Timer:
    def __init__(self, device: str) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                sync(timer.device)
                self_inner.t = time.perf_counter()

            def __exit__(self_inner, *exc):
                sync(timer.device)
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self_inner.t

        return _Ctx()
