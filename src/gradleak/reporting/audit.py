"""Privacy audit: one attack across a grid of batch sizes x defenses x client protocols.

For every cell the client update is simulated on the private batch (FedSGD, FedAvg with S local
steps, or an aggregate of K clients), the defense is applied on the client
(:func:`gradleak.defenses.defended_update`), and the attack runs through
:func:`gradleak.reporting.run_attack` into ``<out>/<cell>/`` (a full run folder). Beside privacy,
the cell measures the defense's utility cost on the same data: T rounds of the same protocol and
defense applied to the victim (FedSGD: ``theta -= lr * g``; FedAvg: ``theta += delta``), then
the training loss and accuracy on that batch. A cell whose ``metrics.json`` exists is not re-run.

:func:`write_audit_report` then writes the page an FL engineer reads: ``audit.md`` and
``audit.csv`` (one row per cell), ``ssim_vs_defense.png``, ``psnr_vs_defense.png``,
``ssim_vs_batch.png``, ``examples.png`` and ``report.html`` with a plain-language verdict per cell.

References:
    Zhang et al., "Generative Gradient Inversion via Over-Parameterized Networks in Federated
    Learning", ICCV 2023 (CI-Net; appendix C.3 on aggregates).
    Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019, Section 5 (noise and pruning defenses).
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.attacks import supports_adaptive
from gradleak.data import load_batch
from gradleak.defenses import Defense, defended_update, parse_defense
from gradleak.errors import ConfigError, UnsupportedModelError
from gradleak.models import build_model
from gradleak.reporting.audit_report import load_row, verdict, write_audit_report
from gradleak.reporting.runner import run_attack, write_json
from gradleak.threat import fedavg_update, save_truth, simulate_clients
from gradleak.types import ClientUpdate, ModelSpec, ServerState

log = logging.getLogger(__name__)

EventFn = Callable[[str, str], None]
"""``on_event(cell_name, status)`` with status ``"skipped"``, ``"running"`` or ``"done"``."""


@dataclass(frozen=True)
class ProtocolSetting:
    """How a client computes its update in one audit cell.

    Args:
        protocol: ``"fedsgd"`` or ``"fedavg"``.
        local_steps: S, local SGD steps (FedAvg only; 1 for FedSGD).
        local_lr: local learning rate (FedAvg only).
        local_batch_size: local mini-batch size (FedAvg; ``None``: each client's whole batch).
        clients: K clients, each with its own batch; the server sees their average.
    """

    protocol: str = "fedsgd"
    local_steps: int = 1
    local_lr: float | None = None
    local_batch_size: int | None = None
    clients: int = 1

    def __post_init__(self) -> None:
        if self.protocol not in ("fedsgd", "fedavg"):
            raise ConfigError(f"audit protocol: expected 'fedsgd' or 'fedavg', got {self.protocol!r}")
        for what, v in (("local steps", self.local_steps), ("clients", self.clients)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"audit {what}: expected a positive integer, got {v!r}")
        if self.protocol == "fedavg" and (self.local_lr is None or not self.local_lr > 0):
            raise ConfigError(f"audit protocol fedavg: expected a positive local learning rate, got {self.local_lr!r}")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise ConfigError(f"audit local batch size: expected a positive integer, got {self.local_batch_size!r}")

    def tag(self) -> str:
        """Short, file-name-safe name, e.g. ``fedsgd``, ``fedavg-s5-lr0.1-k4``."""
        text = "fedsgd"
        if self.protocol == "fedavg":
            text = f"fedavg-s{self.local_steps}-lr{self.local_lr:g}"
            text += f"-b{self.local_batch_size}" if self.local_batch_size else ""
        return text + (f"-k{self.clients}" if self.clients > 1 else "")

    def client(self, batch_size: int) -> Callable[..., ClientUpdate] | None:
        """The client protocol for :func:`defended_update` (``None``: FedSGD)."""
        if self.protocol == "fedsgd":
            return None
        return functools.partial(fedavg_update, local_steps=self.local_steps, lr=float(self.local_lr),  # type: ignore[arg-type]
                                 batch_size=self.local_batch_size or batch_size)


@dataclass(frozen=True)
class AuditCell:
    """One cell of the grid: N images per client, one defense setting, one protocol setting."""

    batch_size: int
    defense: str
    protocol: ProtocolSetting

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``fedsgd_n4_noise-1e-3``."""
        slug = re.sub(r"[^A-Za-z0-9.=+_-]", "_", self.defense.replace(" ", "").replace(":", "-"))
        return f"{self.protocol.tag()}_n{self.batch_size}_{slug}"

    def parsed(self) -> Defense:
        return parse_defense(self.defense)


def parse_int_list(text: str, *, what: str, low: int = 1) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``: distinct integers of at least ``low`` (positive by default).

    Raises:
        ConfigError: an empty list, a non-integer, a value below ``low``, or a repeat.
    """
    kind = "positive integers" if low == 1 else f"integers >= {low}"
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what}: expected a comma-separated list of {kind} such as '1,4,8', got {text!r}")
    values = []
    for t in items:
        if not re.fullmatch(r"\d+", t) or int(t) < low:
            raise ConfigError(f"{what}: expected {kind}, got {t!r}")
        if int(t) in values:
            raise ConfigError(f"{what}: expected distinct values, got {t} twice")
        values.append(int(t))
    return values


def audit_grid(*, batch_sizes: Sequence[int], defenses: Sequence[str],
               protocols: Sequence[ProtocolSetting] = (ProtocolSetting(),)) -> list[AuditCell]:
    """Expand the grid, protocol-major, then batch size, then defense in the given order.

    Raises:
        ConfigError: an empty axis, a defense that does not parse (``parse_defense``'s message), a
            defense given twice, or ``dpsgd`` with FedAvg (DP-SGD is one noisy gradient here).

    Example:
        >>> [c.name for c in audit_grid(batch_sizes=[1, 8], defenses=["none", "noise:1e-3"])]
        ['fedsgd_n1_none', 'fedsgd_n1_noise-1e-3', 'fedsgd_n8_none', 'fedsgd_n8_noise-1e-3']
        >>> ProtocolSetting("fedavg", local_steps=5, local_lr=0.1, clients=4).tag()
        'fedavg-s5-lr0.1-k4'
    """
    if not batch_sizes or not defenses or not protocols:
        raise ConfigError(f"audit grid: expected at least one batch size, defense and protocol, got "
                          f"{len(batch_sizes)} batch sizes, {len(defenses)} defenses, {len(protocols)} protocols")
    specs: dict[str, str] = {}
    for text in defenses:
        spec = parse_defense(text).spec()
        if spec in specs:
            raise ConfigError(f"audit defenses: expected each setting once, got {specs[spec]!r} and {text!r} (both {spec})")
        specs[spec] = text
    cells = [AuditCell(n, d.strip(), p) for p in dict.fromkeys(protocols) for n in batch_sizes for d in defenses]
    for c in cells:
        if c.protocol.protocol == "fedavg" and any(part.client_side for part in c.parsed().parts()):
            raise ConfigError(f"audit defense '{c.defense}' with protocol fedavg: expected fedsgd (DP-SGD is one noisy "
                              "gradient; DP-FedAvg is not implemented), got fedavg")
    names = [c.name for c in cells]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"audit grid: expected distinct cell names, got '{dup}' twice")
    return cells


def check_victim(server: ServerState, cells: Sequence[AuditCell]) -> None:
    """Refuse, before anything runs, a client-side defense on a victim whose train-mode BatchNorm couples samples."""
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in server.model.modules())
    dp = [c.defense for c in cells if any(p.client_side for p in c.parsed().parts())]
    if bn and dp and server.bn_mode == "train":
        raise UnsupportedModelError(f"audit defense '{dp[0]}': expected a victim without train-mode BatchNorm "
                                    "(per-sample clipping), got BatchNorm in train mode; use bn_mode='eval' (--bn-mode eval) or a "
                                    "model without BatchNorm such as lenet")


def cell_update(server: ServerState, images: torch.Tensor, labels: torch.Tensor, *, cell: AuditCell,
                generator: torch.Generator) -> ClientUpdate:
    """What the server sees in ``cell``: each of K clients' defended update on its share, averaged.

    Args:
        server: the global model (not modified).
        images: all clients' data, shape (K*N, C, H, W), range [0, 1].
        labels: shape (K*N,).
        cell: the grid cell.
        generator: randomness of the defense.
    """
    one = functools.partial(defended_update, defense=cell.parsed(), generator=generator,
                            client=cell.protocol.client(cell.batch_size))
    if cell.protocol.clients == 1:
        return one(server, images, labels)
    return simulate_clients(server, images, labels, num_clients=cell.protocol.clients, client=one)


def utility(server: ServerState, images: torch.Tensor, labels: torch.Tensor, *, cell: AuditCell, steps: int,
            lr: float, generator: torch.Generator) -> dict[str, Any]:
    """Training loss and accuracy on ``(images, labels)`` after ``steps`` defended rounds of ``cell``.

    Each round the (copied) global model receives the cell's update: a gradient is applied with
    server learning rate ``lr``, a FedAvg delta is added as it is. Loss and accuracy are measured
    on the same batch, in the server's BatchNorm mode, without gradients.

    Returns:
        ``{"steps", "lr", "loss_start", "loss", "accuracy"}``.
    """
    model = copy.deepcopy(server.model)

    def evaluate() -> tuple[float, float]:
        model.train(server.bn_mode == "train")
        with torch.no_grad():
            logits = model(images)
        return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())

    start, _ = evaluate()
    for _ in range(steps):
        state = ServerState(model=model, input_shape=server.input_shape, num_classes=server.num_classes,
                            bn_mode=server.bn_mode, spec=server.spec)
        update = cell_update(state, images, labels, cell=cell, generator=generator)
        scale = -float(lr) if update.kind == "gradient" else 1.0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in update.tensors:
                    p.add_(update.tensors[name].to(p.device, p.dtype), alpha=scale)
    loss, acc = evaluate()
    return {"steps": steps, "lr": lr, "loss_start": start, "loss": loss, "accuracy": acc}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj,
                                 default=str))


def _cell_seed(seed: int, cell: AuditCell) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(cell.name.encode())) % 2**62


def attackers_for(attack: str, attack_config: Any, *, defended: bool) -> tuple[list[str], list[str]]:
    """Which attackers attack an update, and which cannot (stated with its verdict).

    A defended update gets the unaware attacker and the adaptive one (the attack's ``adaptive`` mode
    ``auto``); an undefended one is attacked once (both are the same attack there). An attack
    without an ``adaptive`` switch, or a config with ``adaptive="off"``, runs the unaware attacker
    only, and the verdict says that the adaptive one was not tried.

    Example:
        >>> attackers_for("cinet", {}, defended=True)
        (['unaware', 'adaptive'], [])
        >>> attackers_for("analytic", {}, defended=True)
        (['unaware'], ['adaptive (analytic has no adaptive mode)'])
    """
    mode = attack_config.get("adaptive") if isinstance(attack_config, dict) else getattr(attack_config, "adaptive", None)
    if not supports_adaptive(attack):
        return ["unaware"], ([f"adaptive ({attack} has no adaptive mode)"] if defended else [])
    if not defended:
        return ["adaptive"], []
    if mode == "off":
        return ["unaware"], ["adaptive (turned off)"]
    return ["unaware", "adaptive"], []


def attacker_config(attack: str, attack_config: Any, attacker: str) -> Any:
    """``attack_config`` for one attacker: ``adaptive="off"`` for ``unaware``, ``"auto"`` for ``adaptive``."""
    if not supports_adaptive(attack):
        return attack_config
    mode = "off" if attacker == "unaware" else "auto"
    if isinstance(attack_config, dict):
        return {**attack_config, "adaptive": mode}
    return dataclasses.replace(attack_config, adaptive=mode)


def run_attackers(server: ServerState, update: ClientUpdate, *, attack: str, attack_config: Any, folder: Path,
                  attackers: Sequence[str], seeds: Sequence[int], case: dict[str, Any], **run: Any) -> None:
    """Every attacker x seed into ``folder/<attacker>-s<seed>/`` (:func:`run_attack`); finished runs are kept.

    ``run`` holds :func:`run_attack`'s other keywords (truth, device, pairing, budget, ...); an
    interrupted run resumes from its checkpoint.
    """
    for attacker in attackers:
        for attack_seed in seeds:
            run_dir = folder / f"{attacker}-s{attack_seed}"
            if (run_dir / "metrics.json").is_file():
                continue
            run_attack(server, update, attack=attack, config=attacker_config(attack, attack_config, attacker),
                       out=run_dir, seed=attack_seed, case={**case, "attacker": attacker},
                       resume=(run_dir / "checkpoint.json").is_file(), force=True, **run)  # the audit's own folder


def cell_finished(folder: str | Path) -> bool:
    """Whether a cell folder holds every run its ``cell.json`` asks for (each attacker x seed)."""
    info_path = Path(folder) / "cell.json"
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    seeds = (info.get("settings") or {}).get("seeds") or []
    return bool(seeds) and all((Path(folder) / f"{a}-s{s}" / "metrics.json").is_file()
                               for a in info.get("attacker_names", []) for s in seeds)


@dataclass(frozen=True)
class AuditOptions:
    """How an audit runs, beside its grid and its attack (:func:`run_audit`).

    Args:
        model_seed: victim initialisation seed.
        data: data source of :func:`gradleak.data.load_batch` (default: the built-in images).
        data_root: folder of a local dataset copy, for sources that need one.
        data_seed: which images to draw.
        utility_steps: T rounds of the utility measurement (0: none).
        utility_lr: server learning rate applied to FedSGD gradients in the utility rounds.
        give_labels: hand the ground-truth labels to the attack instead of recovering them.
        device: where the attack runs (clients and utility run on the CPU).
        seed: seed of the defense's noise (per cell), and of the attack when ``seeds`` is not given.
        seeds: the attack seeds every attacker runs with (default ``[seed]``).
        pairing: ``"hungarian"`` or ``"greedy"``.
        time_budget: wall-clock seconds per cell's attack (``None``: its iteration budget only).
        progress: show the attack's progress bar.
        write_images: ``False``: numbers only (no reconstructions, grids, truth files or checkpoints
            left on disk); reconstructions of real client data are themselves sensitive.
    """

    model_seed: int = 42
    data: str = "builtin"
    data_root: str | Path | None = None
    data_seed: int = 0
    utility_steps: int = 20
    utility_lr: float = 0.1
    give_labels: bool = False
    device: str = "cpu"
    seed: int = 0
    seeds: Sequence[int] | None = None
    pairing: str = "hungarian"
    time_budget: float | None = None
    progress: bool = True
    write_images: bool = True

    def __post_init__(self) -> None:
        steps = self.utility_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"audit utility steps: expected a non-negative integer, got {steps!r}")
        if not self.utility_lr > 0:
            raise ConfigError(f"audit utility learning rate: expected a positive number, got {self.utility_lr!r}")

    def attack_seeds(self) -> list[int]:
        seeds = list(dict.fromkeys(int(s) for s in (self.seeds if self.seeds is not None else [self.seed])))
        if not seeds:
            raise ConfigError("audit seeds: expected at least one attack seed, got none")
        return seeds


def run_audit(*, spec: ModelSpec, cells: Sequence[AuditCell], attack: str, attack_config: Any, out: str | Path,
              options: AuditOptions | None = None, on_event: EventFn | None = None) -> list[dict[str, Any]]:
    """Run ``attack`` on every cell into ``<out>/<cell.name>/<attacker>-s<seed>/`` and return one row per cell.

    Each defended cell is attacked by the unaware and the adaptive attacker (:func:`attackers_for`),
    each with every seed of ``seeds``; the row is the worst case over them
    (:func:`gradleak.reporting.verdicts.worst_case`).

    Args:
        spec: the victim architecture; its weights come from ``build_model(spec, seed=model_seed)``.
        cells: the grid (:func:`audit_grid`).
        attack: registered attack name.
        attack_config: its resolved config (dataclass or dict).
        out: the audit folder.
        options: how it runs (:class:`AuditOptions`; default: its defaults).
        on_event: told ``(cell_name, "skipped" | "running" | "done")``.

    Returns:
        One dict per cell: the cell's settings, ``epsilon``, ``utility`` and the attack's summary.

    Raises:
        ConfigError: a finished cell in ``out`` was made with other settings, or a bad value.
        UnsupportedModelError: DP-SGD on a victim with train-mode BatchNorm.
    """
    o = options or AuditOptions()
    if not cells:
        raise ConfigError("audit grid: expected at least one cell, got none")
    seeds, seed, data, data_root, data_seed, model_seed = (o.attack_seeds(), o.seed, o.data, o.data_root, o.data_seed,
                                                           o.model_seed)
    utility_steps, utility_lr, give_labels, pairing, time_budget, write_images = (
        o.utility_steps, o.utility_lr, o.give_labels, o.pairing, o.time_budget, o.write_images)
    out = Path(out)
    server = ServerState.from_spec(build_model(spec, seed=model_seed), spec)
    check_victim(server, cells)
    settings = {"model": spec.to_dict(), "model_seed": model_seed, "data": data, "data_seed": data_seed,
                "data_root": str(data_root) if data_root else None, "attack": attack,
                "attack_config": _plain(attack_config), "labels": "given" if give_labels else "recovered",
                "seed": seed, "seeds": seeds, "pairing": pairing, "time_budget": time_budget, "images": write_images,
                "utility": {"steps": utility_steps, "lr": utility_lr}}
    tell = on_event or (lambda name, status: None)
    batches: dict[int, Any] = {}

    def batch_of(total: int) -> Any:
        if total not in batches:
            batches[total] = load_batch(data, total, size=spec.image_size, num_classes=spec.num_classes,
                                        seed=data_seed, root=data_root)
        return batches[total]

    batch_of(max(c.batch_size * c.protocol.clients for c in cells))  # too few images fails before any cell runs
    rows = []
    for cell in cells:
        folder = out / cell.name
        info_path = folder / "cell.json"
        if info_path.is_file():
            recorded = json.loads(info_path.read_text()).get("settings")
            if recorded != _plain(settings):
                raise ConfigError(f"audit cell '{cell.name}': expected results made with the same settings, got a "
                                  f"folder made with others ({info_path}); use a new output folder (--out)")
        if cell_finished(folder):  # same settings (checked above), so the same attackers and seeds
            tell(cell.name, "skipped")
            log.debug("audit: %s already done, skipped", cell.name)
        else:
            tell(cell.name, "running")
            attackers, not_tried = attackers_for(attack, attack_config, defended=bool(cell.parsed().parts()))
            batch = batch_of(cell.batch_size * cell.protocol.clients)
            cell_seed = _cell_seed(seed, cell)
            update = cell_update(server, batch.images, batch.labels, cell=cell,
                                 generator=torch.Generator().manual_seed(cell_seed))
            privacy = update.metadata.get("privacy")
            info = {"cell": cell.name, "batch_size": cell.batch_size, "defense": cell.defense,
                    "defense_spec": cell.parsed().spec(), "protocol": asdict(cell.protocol),
                    "protocol_tag": cell.protocol.tag(), "privacy": privacy, "attacker_names": attackers,
                    "not_tried": not_tried, "settings": settings}
            if info_path.is_file():  # an interrupted attack: keep the utility already measured
                info["utility"] = json.loads(info_path.read_text()).get("utility")
            else:
                info["utility"] = None if utility_steps == 0 else utility(
                    server, batch.images, batch.labels, cell=cell, steps=utility_steps, lr=utility_lr,
                    generator=torch.Generator().manual_seed(cell_seed + 1))
            folder.mkdir(parents=True, exist_ok=True)
            if write_images:
                save_truth(batch.images, batch.labels, folder / "truth.safetensors", names=batch.names)
            write_json(info_path, info)
            case = {**settings, "audit_cell": {k: v for k, v in info.items() if k != "settings"}, "images": batch.names}
            run_attackers(server, update, attack=attack, attack_config=attack_config, folder=folder,
                          attackers=attackers, seeds=seeds, case=case, truth_images=batch.images,
                          truth_labels=batch.labels, give_labels=give_labels, device=o.device, progress=o.progress,
                          pairing=pairing, time_budget=time_budget, write_images=write_images)
            tell(cell.name, "done")
        rows.append(load_row(folder))
    return rows


__all__ = ["AuditCell", "AuditOptions", "ProtocolSetting", "attacker_config", "attackers_for", "audit_grid", "cell_finished",
           "cell_update", "check_victim", "load_row", "parse_int_list", "run_attackers", "run_audit", "utility",
           "verdict", "write_audit_report"]
