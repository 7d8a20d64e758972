"""Pieces shared by subcommands: case flags, attack config from flags, device checks."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from gradleak.attacks import ATTACKS, supports_adaptive
from gradleak.attacks.adaptive import ADAPTIVE_MODES
from gradleak.attacks.base import resolve_config
from gradleak.audit.plan import AuditCell, ProtocolSetting, parse_int_list
from gradleak.config import split_preset
from gradleak.defenses import parse_defense
from gradleak.errors import ConfigError
from gradleak.models import ACTIVATIONS


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's random draws (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<command>-<time>)")
    p.add_argument("--dry-run", action="store_true", help="2 iterations: check that everything fits")
    p.add_argument("--force", action="store_true", help="replace a run already in --out (otherwise refused)")


def add_cuda_policy(p: argparse.ArgumentParser) -> None:
    """``--tf32`` and ``--deterministic``: how a CUDA run computes (no effect on a CPU, recorded either way)."""
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: let matrix products and convolutions use TF32 (faster at large batches; default "
                        "off: the run computes in float32)")
    p.add_argument("--deterministic", action="store_true",
                   help="CUDA: deterministic algorithms only, so that the run repeats bit for bit on the same GPU "
                        "and versions (slower; a CPU run is bit-identical without it)")


def add_case(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="victim architecture (gradleak list models)")
    p.add_argument("--activation", default="sigmoid",
                   help=f"{', '.join(ACTIVATIONS)} (default sigmoid, as in the paper; gradleak list activations)")
    p.add_argument("--bn-mode", default="train", choices=["train", "eval"], help="BatchNorm mode of the client")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=None, help="architecture width, where it has one")
    p.add_argument("--model-seed", type=int, default=42, help="initialisation seed of the victim (42 as published)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default="builtin",
                   help="builtin (default: 68 real images, then crops)|cifar10|cifar100|imagenet|photos (built-in, offline), cifar10-dir|cifar100-dir|folder (with --data-root)")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--data-seed", type=int, default=0, help="which images to draw from a dataset")
    p.add_argument("--weights", type=Path, default=None,
                   help="the victim's weights: a model-state file (gradleak train, or a simulate folder's "
                        "model.safetensors) instead of a fresh initialisation; the architecture flags must match it")


def case_spec(args: argparse.Namespace) -> Any:
    """The :class:`~gradleak.types.ModelSpec` the case flags name."""
    from gradleak.types import ModelSpec

    return ModelSpec(name=args.model, num_classes=args.num_classes, image_size=args.image_size,
                     activation=args.activation, bn_mode=args.bn_mode, width=args.width)


def case_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The victim of the case flags: ``(model, spec)``, freshly initialised or loaded from ``--weights``.

    Raises:
        ConfigError: ``--weights`` holds another architecture than the flags name.
        UpdateError: the file is not a model state that fits its own spec.
    """
    from gradleak.models import build_model
    from gradleak.threat import load_victim

    spec = case_spec(args)
    weights = getattr(args, "weights", None)
    if weights is None:
        return build_model(spec, seed=args.model_seed), spec
    model = load_victim(weights, spec)
    return model, spec  # the client's BatchNorm mode is the flags'


def add_threat(p: argparse.ArgumentParser, *, grid: bool = False) -> None:
    """The threat flags of every command that makes an update (simulate, demo, compare, audit).

    ``grid=True`` (audit): --protocol, --local-steps and --clients take comma-separated lists, and
    the defenses come from --defenses; otherwise each takes one value and --defense one setting.
    """
    many = " (comma-separated for several)" if grid else ""
    p.add_argument("--protocol", default="fedsgd", help=f"fedsgd or fedavg{many} (default fedsgd)")
    p.add_argument("--local-steps", default="1", help=f"FedAvg local steps S{many} (default 1)")
    p.add_argument("--local-lr", type=float, default=0.1, help="FedAvg local learning rate (default 0.1)")
    p.add_argument("--local-batch-size", type=int, default=None,
                   help="FedAvg local mini-batch (default: the whole batch)")
    p.add_argument("--clients", default="1", help=f"K clients averaged by the server{many} (default 1)")
    p.add_argument("--share-bn-stats", action="store_true",
                   help="the client also uploads the change of its BatchNorm running statistics (as a FedAvg client "
                        "sending its state_dict does); the attacks then match them (bn_stats)")
    if not grid:
        p.add_argument("--defense", default="none",
                       help="the client's defense, e.g. noise:1e-3, clip:1+noise:1e-3, prune:0.9, dpsgd:1.0 "
                            "(default none; gradleak list defenses)")


def protocol_settings(args: argparse.Namespace) -> list[ProtocolSetting]:
    """The protocol settings from --protocol, --local-steps, --local-lr, --local-batch-size, --clients."""
    protocols = [t.strip() for t in args.protocol.split(",") if t.strip()]
    if not protocols:
        raise ConfigError(f"--protocol: expected fedsgd and/or fedavg, got {args.protocol!r}")
    steps = parse_int_list(args.local_steps, what="--local-steps")
    clients = parse_int_list(args.clients, what="--clients")
    settings = []
    for proto in protocols:
        for s in steps if proto == "fedavg" else [1]:
            for k in clients:
                settings.append(ProtocolSetting(proto, local_steps=s, clients=k,
                                                local_lr=args.local_lr if proto == "fedavg" else None,
                                                local_batch_size=args.local_batch_size if proto == "fedavg" else None,
                                                share_bn_stats=bool(getattr(args, "share_bn_stats", False))))
    return list(dict.fromkeys(settings))


def threat_cell(args: argparse.Namespace) -> AuditCell:
    """The one (batch size, defense, protocol) setting of a command that makes one update."""
    settings = protocol_settings(args)
    if len(settings) != 1:
        raise ConfigError(f"--protocol/--local-steps/--clients: expected one setting (gradleak audit takes "
                          f"lists), got {len(settings)}")
    parse_defense(args.defense)  # a bad setting fails before any file is written
    return AuditCell(batch_size=args.batch_size, defense=args.defense, protocol=settings[0])


def add_attack(p: argparse.ArgumentParser, *, default_preset: str | None = None) -> None:
    p.add_argument("--attack", default="cinet", help="attack name (gradleak list attacks)")
    p.add_argument("--preset", default=default_preset, help="named preset of the attack (gradleak list presets)")
    p.add_argument("--iterations", type=int, default=None, help="override the preset's iteration count")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set loss=l2 --set channels=64 (repeatable)")
    p.add_argument("--labels", default="recovered", choices=["recovered", "given"],
                   help="recover labels from the update (default) or use the ground truth (needs --truth)")
    p.add_argument("--label-strategy", default=None, help="label recovery strategy (default: the attack's, 'auto')")
    p.add_argument("--adaptive", default=None, choices=list(ADAPTIVE_MODES),
                   help="auto (default): the attacker simulates the defense the update records; on: the same, "
                        "and refuse an undefended update; off: the unaware attacker")
    p.add_argument("--pairing", default="hungarian", choices=["hungarian", "greedy"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["loss=l2", "channels=64"]`` -> ``{"loss": "l2", "channels": 64}`` (values parsed as JSON when they are)."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip().replace("-", "_")] = _value(v.strip())
    return overrides


def attack_config(args: argparse.Namespace) -> Any:
    """The attack's resolved config from --attack/--preset, --set, --iterations, --label-strategy, --adaptive
    and --dry-run (``--preset cinet:demo`` also names the attack, as ``gradleak list presets`` prints it)."""
    preset = args.preset
    if preset and ":" in preset:
        name, preset = split_preset(preset)
        if args.attack not in (name, "cinet"):  # cinet is --attack's default
            raise ConfigError(f"--preset {args.preset}: expected a preset of --attack {args.attack}, got one of {name}")
        args.attack = name
    cls = ATTACKS.get(args.attack)
    overrides = parse_overrides(args.set)
    names = {f.name for f in fields(cls.Config)}
    if getattr(args, "dry_run", False) and "log_every" in names:
        overrides["log_every"] = 1
    if args.label_strategy is not None:
        overrides["label_strategy"] = args.label_strategy
    if getattr(args, "adaptive", None) is not None:
        if not supports_adaptive(args.attack):
            raise ConfigError(f"--adaptive: {args.attack} does not simulate defenses (it is not iterative), "
                              f"expected an attack among {', '.join(filter(supports_adaptive, ATTACKS.available()))}")
        overrides["adaptive"] = args.adaptive
    budget = 2 if getattr(args, "dry_run", False) else args.iterations
    try:
        return resolve_config(args.attack, preset=preset, overrides=overrides, iterations=budget)
    except ConfigError as e:
        if budget is not None and str(e).startswith("iterations:"):
            raise ConfigError(f"--{e}") from None
        raise


def check_device(device: str, *, what: str = "--device") -> str:
    """``device`` if this machine has it: ``cpu``, ``cuda``, or ``cuda:N`` with N below the device count.

    Raises:
        ConfigError: a malformed device, no CUDA, or an index past the last GPU.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{what}: expected cpu, cuda or cuda:N, got '{device}'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}: expected cpu, cuda or cuda:N, got '{device}'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}: expected a device this machine has, got '{device}' (no CUDA device found)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{what}: expected cuda:0 to cuda:{count - 1} (this machine has {count} GPU"
                              f"{'s' if count > 1 else ''}), got '{device}'")
    return device


def default_out(command: str) -> Path:
    import time

    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
