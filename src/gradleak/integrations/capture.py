"""From what an FL server received to a gradleak audit folder, independent of the FL framework.

A server that runs FedAvg receives, per client and round, the parameters after local training,
the number of examples and (in its own fit config or the client's reply) the local
hyperparameters. :func:`update_from_parameters` turns that into the :class:`ClientUpdate` a
gradleak attack reads: the FedAvg delta ``theta_client - theta_sent`` with ``local_steps``,
``local_lr`` and ``local_batch_size`` (McMahan et al. 2017, Algorithm 1). A client that uploads a
gradient instead (FedSGD) is read by :func:`update_from_gradients`.

:func:`write_capture` writes what the server saw into an audit folder (``update.safetensors``,
``model.safetensors``, ``capture.json`` and, for evaluation only, ``truth.safetensors``), and
:func:`run_audit_job` (a plain function, so a process pool can run it) recovers the labels and runs
the attack there through :func:`gradleak.reporting.run_attack`, the same run folder as
``gradleak attack``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gradleak.errors import ConfigError, GradleakError, UpdateError
from gradleak.labels import recover_labels
from gradleak.reporting.tables import cell, write_csv, write_markdown
from gradleak.threat import load_model_state, load_truth, load_update, local_schedule, save_model_state, save_truth
from gradleak.threat.io import save_update, state_mismatch
from gradleak.types import Batch, ClientUpdate, ModelSpec, ServerState

log = logging.getLogger(__name__)


def server_state(model: ModelSpec | nn.Module, state: Mapping[str, torch.Tensor], *,
                 input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None,
                 bn_mode: str = "train") -> ServerState:
    """The server's model as it was sent: ``model``'s architecture loaded with ``state``.

    Args:
        model: a registered architecture (``ModelSpec``) or a template module (deep-copied).
        state: the ``state_dict`` the server sent (names as the model's ``state_dict``).
        input_shape: (C, H, W), needed for a template module.
        num_classes: C, needed for a template module.
        bn_mode: BatchNorm mode of the clients, for a template module (a spec carries its own).

    Raises:
        ConfigError: a template module without ``input_shape``/``num_classes``.
        UpdateError: ``state`` does not fit the architecture.
    """
    from gradleak.models import build_model

    if isinstance(model, ModelSpec):
        net = build_model(model, seed=0)  # seeded: the caller's global RNG is left as it was
    else:
        if input_shape is None or num_classes is None:
            raise ConfigError("audit model: expected input_shape and num_classes with a template module, got "
                              f"input_shape={input_shape}, num_classes={num_classes}")
        net = copy.deepcopy(model).cpu()
    try:
        net.load_state_dict({k: v.detach().clone().float() if v.is_floating_point() else v.clone()
                             for k, v in state.items()}, strict=True)
    except RuntimeError:
        raise UpdateError(f"server parameters do not fit the audit model ({state_mismatch(net, state)})") from None
    if isinstance(model, ModelSpec):
        return ServerState.from_spec(net, model)
    net.train(bn_mode == "train")
    return ServerState(model=net, input_shape=tuple(input_shape), num_classes=int(num_classes),  # type: ignore[arg-type]
                       bn_mode=bn_mode)


def name_arrays(arrays: Mapping[str, torch.Tensor], model: nn.Module, *, what: str) -> dict[str, torch.Tensor]:
    """Key ``arrays`` by the model's ``state_dict`` names.

    Arrays keyed by those names are returned as they are; arrays keyed otherwise (e.g. a list of
    NumPy arrays, keyed ``"0"``, ``"1"``, ...) are matched by position when their count and
    shapes fit ``state_dict`` order, else by position against the trainable parameters only.

    Raises:
        UpdateError: neither way fits.
    """
    state = model.state_dict()
    if set(arrays) == set(state):
        return {k: arrays[k] for k in state}
    values = list(arrays.values())
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    for names in (list(state), params):
        if len(values) == len(names) and all(tuple(v.shape) == tuple(state[n].shape) for v, n in zip(values, names)):
            return dict(zip(names, values))
    raise UpdateError(f"{what}: expected the model's {len(state)} state_dict arrays (or its {len(params)} "
                      f"parameters) by name or in order, got {len(values)} arrays named "
                      f"{', '.join(list(arrays)[:4])}{', ...' if len(arrays) > 4 else ''}")


@dataclass(frozen=True)
class LocalTraining:
    """A client's local hyperparameters, as reported by the client or sent in its fit config.

    Args:
        lr: local learning rate (needed to attack a FedAvg delta).
        local_steps: local SGD steps S (takes precedence over ``epochs``).
        epochs: local epochs E (``ceil(N / B)`` steps each).
        batch_size: local mini-batch size B (``None``: the client's whole data, one batch).
        shuffle_seed: seed of the mini-batch order (:func:`gradleak.threat.local_schedule`), when known.
    """

    lr: float | None = None
    local_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    shuffle_seed: int | None = None


def update_from_parameters(server: ServerState, received: Mapping[str, torch.Tensor], *, num_examples: int,
                           training: LocalTraining, metadata: Mapping[str, Any] | None = None) -> ClientUpdate:
    """The FedAvg update of a client: ``theta_client - theta_sent`` with its local hyperparameters.

    Args:
        server: the model the server sent this client (its parameters are ``theta_sent``).
        received: the client's parameters after local training, keyed like ``server.model.state_dict()``.
            When it holds the BatchNorm running statistics too (a client that sends its whole
            ``state_dict``), their change is recorded in the update's ``buffers``, and the attacks
            match them (:mod:`gradleak.threat.batchnorm`).
        num_examples: the number of examples the client reported (N).
        training: the local hyperparameters; S is ``local_steps``, else ``epochs * ceil(N / B)``, else
            one epoch.
        metadata: extra facts to record (round, node, config), JSON-serialisable.

    Returns:
        A ``ClientUpdate`` with ``kind="delta"``, ``protocol="fedavg"``; ``metadata`` holds
        ``local_steps``, ``local_lr``, ``local_batch_size``, ``epochs``, ``shuffle_seed`` and, when the
        seed is known, ``schedule``.

    Raises:
        UpdateError: a parameter is missing, misshapen or not finite, or N < 1.
        ConfigError: invalid local hyperparameters.
    """
    n = int(num_examples)
    if n < 1:
        raise UpdateError(f"client update: expected num_examples >= 1, got {num_examples}")
    batch = int(training.batch_size) if training.batch_size else n
    assumptions = []
    if not training.batch_size:
        assumptions.append(f"local batch size not reported: assumed the client's whole data ({n})")
    if training.local_steps is not None:
        steps = int(training.local_steps)
    else:
        steps = int(training.epochs or 1) * math.ceil(n / min(batch, n))
        if training.epochs is None:
            assumptions.append(f"local steps and epochs not reported: assumed one epoch ({steps} steps)")
    for text in assumptions:
        warnings.warn(f"client update: {text}", UserWarning, stacklevel=2)
    sent = dict(server.model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for name, p in sent.items():
        if not p.requires_grad:
            continue
        if name not in received:
            raise UpdateError(f"client parameters: expected '{name}', got none")
        value = torch.as_tensor(received[name]).detach().float().cpu()
        if tuple(value.shape) != tuple(p.shape):
            raise UpdateError(f"client parameter '{name}': expected shape {tuple(p.shape)}, got {tuple(value.shape)}")
        tensors[name] = value - p.detach().float().cpu()
        if not torch.isfinite(tensors[name]).all():
            raise UpdateError(f"client parameter '{name}': expected finite values, got NaN/Inf")
    buffers = _shared_statistics(server, received)
    meta: dict[str, Any] = {"num_samples": n, "local_steps": steps, "local_lr": training.lr,
                            "local_batch_size": batch, "epochs": training.epochs, **dict(metadata or {})}
    if assumptions:
        meta["assumptions"] = assumptions
    if training.shuffle_seed is not None:
        meta["shuffle_seed"] = int(training.shuffle_seed)
        meta["schedule"] = local_schedule(n, batch_size=batch, local_steps=steps, shuffle_seed=int(training.shuffle_seed))
    return ClientUpdate(tensors=tensors, kind="delta", num_samples=n, protocol="fedavg", local_steps=steps,
                        local_lr=None if training.lr is None else float(training.lr), local_batch_size=batch,
                        metadata=meta, buffers=buffers)


def _shared_statistics(server: ServerState, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The change of the BatchNorm running statistics, when the client sent them with its weights.

    A client that sends its whole ``state_dict`` (Flower's examples do) shares them; the server
    holds the ones it sent, so their change is known (:mod:`gradleak.threat.batchnorm`). All or
    none: a client that sent some of them is refused.
    """
    from gradleak.threat import batchnorm

    if server.bn_mode != "train":
        return {}
    names = batchnorm.buffer_names(server.model)
    present = [k for k in names if k in received]
    if not present:
        return {}
    if len(present) != len(names):
        missing = [k for k in names if k not in received]
        raise UpdateError(f"client BatchNorm statistics: expected all {len(names)} running statistics or none, "
                          f"missing {', '.join(missing[:3])}")
    before = batchnorm.snapshot(server.model)
    out = {}
    for k in names:
        value = torch.as_tensor(received[k]).detach().float().cpu()
        if tuple(value.shape) != tuple(before[k].shape) or not torch.isfinite(value).all():
            raise UpdateError(f"client BatchNorm statistic '{k}': expected {tuple(before[k].shape)} finite values, "
                              f"got {tuple(value.shape)}")
        out[k] = value - before[k].float().cpu()
    return out


def update_from_gradients(server: ServerState, gradients: Mapping[str, torch.Tensor], *, num_examples: int,
                          metadata: Mapping[str, Any] | None = None) -> ClientUpdate:
    """The FedSGD update of a client that uploads the gradient of its mean loss over N examples.

    Args:
        server: the model the gradient was computed on.
        gradients: one tensor per trainable parameter, by name or in parameter order.
        num_examples: N.
        metadata: extra facts to record.

    Raises:
        UpdateError: a gradient is missing, misshapen or not finite, or N < 1.
    """
    if int(num_examples) < 1:
        raise UpdateError(f"client gradient: expected num_examples >= 1, got {num_examples}")
    params = [(n, p) for n, p in server.model.named_parameters() if p.requires_grad]
    named = gradients if all(n in gradients for n, _ in params) else name_arrays(gradients, server.model, what="client gradient")
    tensors = {}
    for name, p in params:
        g = torch.as_tensor(named[name]).detach().float().cpu()
        if tuple(g.shape) != tuple(p.shape) or not torch.isfinite(g).all():
            raise UpdateError(f"client gradient '{name}': expected finite values of shape {tuple(p.shape)}, "
                              f"got shape {tuple(g.shape)}")
        tensors[name] = g
    return ClientUpdate(tensors=tensors, kind="gradient", num_samples=int(num_examples), protocol="fedsgd",
                        metadata={"num_samples": int(num_examples), **dict(metadata or {})})


@dataclass(frozen=True)
class AuditJob:
    """One client's audit, runnable in another process (everything it reads is in ``folder``).

    Args:
        folder: the audit folder written by :func:`write_capture`.
        attack: registered attack name.
        attack_config: its config (dataclass or dict).
        label_strategy: label recovery strategy recorded in ``labels.json``.
        model: the architecture: a ``ModelSpec`` (rebuilt by name) or a template module.
        seeds: the attack seeds every attacker runs with.
        device: where the attack runs.
        threads: torch CPU threads of the job (``None``: torch's default).
        time_budget: wall-clock seconds for the attack (``None``: its iteration budget only).
    """

    folder: str
    attack: str
    attack_config: Any
    label_strategy: str = "auto"
    model: Any = None
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    threads: int | None = None
    time_budget: float | None = None


def write_capture(folder: str | Path, *, server: ServerState, update: ClientUpdate, capture: Mapping[str, Any],
                  truth: Batch | None = None) -> Path:
    """Write what the server saw from one client (and, for evaluation only, the client's truth).

    Returns:
        ``folder``, holding ``update.safetensors``, ``model.safetensors``, ``capture.json`` and
        ``truth.safetensors`` when ``truth`` is given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_update(update, folder / "update.safetensors")
    if server.spec is not None:
        save_model_state(server.model, server.spec, folder / "model.safetensors")
    else:
        save_file({k: v.detach().contiguous().cpu() for k, v in server.model.state_dict().items()},
                  str(folder / "model.safetensors"))
    if truth is not None:
        save_truth(truth.images, truth.labels, folder / "truth.safetensors", names=truth.names)
    (folder / "capture.json").write_text(json.dumps(dict(capture), indent=2, default=str))
    return folder


def _load_server(job: AuditJob) -> ServerState:
    folder = Path(job.folder)
    if isinstance(job.model, nn.Module):
        info = json.loads((folder / "capture.json").read_text())
        return server_state(job.model, load_file(str(folder / "model.safetensors")),
                            input_shape=tuple(info["input_shape"]), num_classes=int(info["num_classes"]),
                            bn_mode=info.get("bn_mode", "train"))
    model, spec = load_model_state(folder / "model.safetensors")
    return ServerState.from_spec(model, spec)


def run_audit_job(job: AuditJob) -> dict[str, Any]:
    """Recover the labels and run the attackers in ``job.folder``; return the client's verdict.

    Writes ``labels.json`` (the recovered labels, the strategy, its warnings and, with a truth file,
    the label accuracy) and one run folder of :func:`gradleak.reporting.run_attack` per attacker and
    seed (``<attacker id>-s<seed>/``): the unaware and the defense-aware attacker when the update records a
    defense, as in ``gradleak audit``. A truth file in the folder is used for scoring only; it
    never reaches the attack.

    Returns:
        The worst case over attackers and seeds (:func:`gradleak.audit.verdicts.worst_case`),
        its ``verdict`` text, and the update's protocol facts.
    """
    from gradleak.attacks import ATTACKS
    from gradleak.audit.engine import run_attackers
    from gradleak.audit.plan import KnowledgeAxes, attackers_for
    from gradleak.audit.verdicts import load_runs, verdict, worst_case
    from gradleak.labels import label_accuracy
    from gradleak.reporting.runner import RunOptions

    if job.threads:
        torch.set_num_threads(int(job.threads))
    folder = Path(job.folder)
    server = _load_server(job)
    update = load_update(folder / "update.safetensors", model=server.model)
    truth = (load_truth(folder / "truth.safetensors", num_classes=server.num_classes)
             if (folder / "truth.safetensors").is_file() else None)
    labels_doc: dict[str, Any] = {"strategy_requested": job.label_strategy}
    try:
        result = recover_labels(server, update, strategy=job.label_strategy)
        labels_doc.update(strategy=result.strategy, labels=result.labels.tolist(), warnings=result.warnings)
        if truth is not None:
            labels_doc["accuracy"] = float(label_accuracy(result.labels, truth.labels))
    except GradleakError as e:
        labels_doc["error"] = str(e)
    (folder / "labels.json").write_text(json.dumps(labels_doc, indent=2))
    capture = json.loads((folder / "capture.json").read_text())
    defended = bool(update.defenses)
    attackers, not_tried = attackers_for(job.attack, defended=defended, attack_config=job.attack_config,
                                         knowledge=KnowledgeAxes(labels=("recovered",)), images=update.num_samples,
                                         max_images=ATTACKS.get(job.attack).max_images(server, job.attack_config))
    if not attackers:
        raise ConfigError(f"flower audit: expected an attack that reads this update, got none ({'; '.join(not_tried)})")
    not_tried.append("labels known (a live client's labels are not the auditor's to hand over)")
    run_attackers(server, update, attack_config=job.attack_config, folder=folder, attackers=attackers, seeds=job.seeds,
                  case={"source": "flower", **{k: v for k, v in capture.items() if k != "truth"}},
                  truth_images=None if truth is None else truth.images, truth_labels=None if truth is None else truth.labels,
                  options=RunOptions(device=job.device, progress=False, time_budget=job.time_budget))
    log.info("audit of round %s node %s written to %s", capture.get("round"), capture.get("node_id"), folder)
    row = worst_case(load_runs(folder), defended=defended, not_tried=not_tried)
    return {**row, "verdict": verdict(row), "defense": "+".join(update.defenses) or "none",
            "protocol": update.protocol, "kind": update.kind, "num_samples": update.num_samples,
            "local_steps": update.local_steps}


@dataclass(frozen=True)
class AuditRecord:
    """The outcome of one client's audit: where it is and what it measured."""

    round: int
    node_id: int
    folder: str
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_index(out: str | Path, records: list[AuditRecord]) -> None:
    """``audits.md`` and ``audits.csv`` in ``out``: one row per audited client and round."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["round", "node_id", "status", "n", "protocol", "local_steps", "defense", "label_strategy",
            "label_accuracy", "ssim_mean", "ssim_worst_image", "recognisable_fraction", "verdict_attacker", "psnr_mean",
            "lpips_mean", "seconds", "verdict", "folder", "error"]
    rows = []
    for r in sorted(records, key=lambda r: (r.round, r.node_id)):
        s = r.summary
        rows.append({"round": r.round, "node_id": r.node_id, "status": r.status, "n": s.get("num_samples"),
                     "protocol": s.get("protocol"), "local_steps": s.get("local_steps"), "defense": s.get("defense"),
                     "ssim_worst_image": s.get("ssim_worst_image"),
                     "recognisable_fraction": s.get("recognisable_fraction"),
                     "verdict_attacker": s.get("verdict_attacker"), "verdict": s.get("verdict"),
                     "label_strategy": s.get("label_strategy"), "label_accuracy": s.get("label_accuracy"),
                     "ssim_mean": s.get("ssim_mean"), "psnr_mean": s.get("psnr_mean"), "lpips_mean": s.get("lpips_mean"),
                     "seconds": s.get("seconds"), "folder": r.folder, "error": r.error})
    write_csv(out / "audits.csv", cols, rows)
    head = ["round", "node", "status", "N", "protocol", "steps", "defense", "labels", "label acc.",
            "worst-case SSIM", "PSNR", "verdict", "folder"]
    body = []
    for row in rows:
        path = Path(str(row["folder"]))
        folder = (path.relative_to(out) if path.is_relative_to(out) else path) if row["folder"] else "-"
        body.append([cell(row[k]) for k in ("round", "node_id", "status", "n", "protocol", "local_steps", "defense",
                                            "label_strategy", "label_accuracy", "ssim_mean", "psnr_mean")]
                    + [cell(row["verdict"] or row["error"]), str(folder)])  # a failure or refusal: why
    write_markdown(out / "audits.md", head, body)
