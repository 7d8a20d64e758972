"""Audit a live Flower federation: a server-side Strategy wrapper that attacks what clients send.

:class:`AuditStrategy` wraps any strategy of Flower's Message API (``flwr.serverapp.strategy``:
``FedAvg``, ``FedProx``, ``FedAdam``, ...). Every method delegates to the wrapped strategy, which
receives exactly the messages it would have received without the wrapper and returns exactly what
it returns, so training is unchanged. On the side, for the selected rounds and clients, the wrapper
keeps the parameters each client was sent (``configure_train``) and what it sent back
(``aggregate_train``): the parameters after local training, its number of examples and the local
hyperparameters (the client's reply metrics, else the fit config it was sent). It turns them into
a gradleak :class:`~gradleak.types.ClientUpdate` (a FedAvg delta, or a FedSGD gradient when the
client replies with an ArrayRecord of gradients), writes the audit folder
``<out>/round-RRR/node-ID/`` and runs label recovery and the attack there, in a process pool (the
default: later rounds are not blocked) or inline after the round's aggregation.

Ground truth is for evaluating the audit only: a client that *chooses* to expose its private
batch (:func:`save_client_truth`, as the example does) gets its reconstruction scored (SSIM,
PSNR, label accuracy); the attack itself never reads it.

Example:
    >>> from flwr.serverapp.strategy import FedAvg                      # doctest: +SKIP
    >>> strategy = AuditStrategy(FedAvg(), model=ModelSpec("lenet"), out="audit",  # doctest: +SKIP
    ...                          attack="cinet", attack_config={"iterations": 300})
    >>> result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)  # doctest: +SKIP

References:
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017. Zhang et al., "Generative Gradient Inversion via Over-Parameterized Networks in
    Federated Learning", ICCV 2023. Beutel et al., "Flower: A Friendly Federated Learning
    Research Framework", arXiv:2007.14390.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradleak.audit.verdicts import Condition
from gradleak.config import from_dict, split_preset
from gradleak.defenses import declare_defense, parse_defense
from gradleak.errors import ConfigError
from gradleak.integrations.capture import (
    AuditJob,
    AuditRecord,
    LocalTraining,
    name_arrays,
    run_audit_job,
    server_state,
    update_from_gradients,
    update_from_parameters,
    write_capture,
    write_index,
)
from gradleak.threat import load_truth, save_truth
from gradleak.types import Batch, ModelSpec

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gradleak.integrations.flower needs Flower: pip install 'gradleak[fl]' "
                      "(flwr[simulation]); see docs/flower.md") from e

log = logging.getLogger(__name__)

TruthFn = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``truth(server_round, node_id)`` -> the client's private batch ``(images, labels)`` or ``None``."""


@dataclass(frozen=True)
class AuditKeys:
    """Where the local hyperparameters are found: names tried in the client's reply metrics, then
    in the train config it was sent (the first name present wins)."""

    lr: tuple[str, ...] = ("lr", "local-lr", "learning-rate")
    local_steps: tuple[str, ...] = ("local-steps",)
    epochs: tuple[str, ...] = ("local-epochs", "epochs")
    batch_size: tuple[str, ...] = ("batch-size", "local-batch-size")
    shuffle_seed: tuple[str, ...] = ("shuffle-seed",)
    num_examples: tuple[str, ...] = ("num-examples",)
    defense: tuple[str, ...] = ("defense", "gradleak-defense")
    """A defense setting (``"clip:1+noise:1e-3"``) the client applied to what it sent: recorded on the
    update, so the adaptive attacker simulates it (the defense is public, as the server mandates it)."""


def truth_path(truth_dir: str | Path, *, server_round: int, node_id: int) -> Path:
    """Where :func:`save_client_truth` writes a client's batch, and where the wrapper looks for it."""
    return Path(truth_dir) / f"round-{int(server_round):03d}" / f"node-{int(node_id)}.safetensors"


def save_client_truth(truth_dir: str | Path, *, server_round: int, node_id: int, images: torch.Tensor,
                      labels: torch.Tensor) -> Path:
    """Client side, for evaluating an audit only: write the batch this client trained on this round.

    A real client never does this; an audit of one's own federation may, so that the server-side
    reconstruction can be scored. The attack never reads this file.

    Args:
        truth_dir: a folder the server can read (the wrapper's ``truth``).
        server_round: the round (the train config's ``"server-round"``).
        node_id: ``context.node_id`` of the ClientApp.
        images: shape (N, C, H, W), range [0, 1].
        labels: shape (N,).
    """
    path = truth_path(truth_dir, server_round=server_round, node_id=node_id)
    save_truth(images, labels, path)
    return path


def _records(content: RecordDict, kind: str) -> dict[str, Any]:
    return dict(getattr(content, f"{kind}_records").items())


def _plain(record: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v if isinstance(v, (int, float, str, bool)) else repr(v))
            for k, v in dict(record).items()}


def _arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


@dataclass(frozen=True)
class FlowerAuditOptions:
    """What :class:`AuditStrategy` audits, and how.

    Args:
        rounds: rounds to audit (default: all).
        node_ids: clients to audit (default: all).
        max_clients_per_round: audit at most this many clients per round (smallest node ids first).
        label_strategy: label recovery strategy recorded in each ``labels.json``.
        executor: ``"process"`` (a spawn process pool; training goes on) or ``"inline"`` (after
            each round's aggregation, blocking the next round).
        max_workers: processes of the pool.
        threads: torch CPU threads per audit job (``None``: torch's default).
        wait_at_end: :meth:`start` waits for the pending audits and writes the index.
        keys: names of the local hyperparameters in replies and configs.
        gradient_key: a reply holding an ArrayRecord under this key is a FedSGD gradient.
        input_shape: (C, H, W) for a template module.
        num_classes: C for a template module.
        bn_mode: the clients' BatchNorm mode for a template module.
        seed: seed of the attacks (when ``seeds`` is not given).
        seeds: attack seeds every attacker runs with; a client's verdict is the worst case over the
            unaware and the adaptive attacker (when its update records a defense) and these seeds.
        defense: the defense setting every client applies (e.g. mandated by the server), when a
            client does not report its own under ``keys.defense``.
        fail_if: leak limits such as ``"ssim>0.5"`` (:class:`gradleak.reporting.verdicts.Condition`);
            :meth:`leaks` lists the audits that exceed one.
        device: where the attacks run.
        time_budget: wall-clock seconds per attack.
        malicious_rounds: rounds in which the wrapper plays a malicious server (SoK threat model F):
            every client selected that round is sent the global model behind ``malicious_attack``'s
            block (an imprint block of ``malicious_units`` bins, or trap units), and the audited
            replies are read by that attack in closed form. The wrapped strategy is handed the
            victim's part of each reply, under the names it sent, so training goes on; the clients
            did train behind the block that round. A client that refuses the model (gradleak's
            ``inspect_mod``) gives an audit record ``refused``. Clients must build their model from
            the arrays they receive (see examples/flower_inspect); one that loads them into a fixed
            architecture fails instead, which is also recorded.
        malicious_attack: the malicious server's attack: ``imprint``, ``sparse-imprint`` or ``trap``
            (the attacks of ``gradleak list attacks`` on a model the server modified).
        malicious_units: the block's bins (imprint) or units (trap).
        malicious_batch_size: the clients' batch size, which the server sets; trap units are set to
            fire for about one image of a batch this size.
    """

    rounds: tuple[int, ...] | None = None
    node_ids: tuple[int, ...] | None = None
    max_clients_per_round: int | None = None
    label_strategy: str = "auto"
    executor: str = "process"
    max_workers: int = 1
    threads: int | None = None
    wait_at_end: bool = True
    keys: AuditKeys = AuditKeys()
    gradient_key: str = "gradients"
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    bn_mode: str = "train"
    seed: int = 0
    device: str = "cpu"
    time_budget: float | None = None
    seeds: tuple[int, ...] | None = None
    defense: str | None = None
    fail_if: tuple[str, ...] = ()
    malicious_rounds: tuple[int, ...] = ()
    malicious_attack: str = "imprint"
    malicious_units: int = 256
    malicious_batch_size: int | None = None


class AuditStrategy(Strategy):
    """Wrap a Flower strategy; audit what the selected clients send in the selected rounds.

    Args:
        strategy: the strategy to wrap; every call is delegated to it unchanged.
        model: the global model's architecture: a registered ``ModelSpec`` or a template module
            (with ``input_shape`` and ``num_classes``). Its ``state_dict`` names (or order) must match
            the ArrayRecord the server sends.
        out: the audit folder; one sub-folder per round and client.
        attack: registered attack name, or ``ATTACK:PRESET`` as ``gradleak list presets`` prints it.
        attack_config: the attack's config (a dataclass), or overrides of its preset or defaults (a dict),
            resolved by :func:`gradleak.attacks.base.resolve_config`.
        truth: for evaluation only: a folder written by :func:`save_client_truth`, or a
            :data:`TruthFn`; ``None``: nothing is scored.
        options: what is audited and how (:class:`FlowerAuditOptions`); ``settings`` are its fields
            given as keywords (``executor="inline", threads=1``), applied on top.

    Raises:
        ConfigError: an unknown executor, attack or attack config field, or a non-positive worker count.
    """

    def __init__(self, strategy: Strategy, *, model: ModelSpec | nn.Module, out: str | Path, attack: str = "cinet",
                 attack_config: Any = None, truth: str | Path | TruthFn | None = None,
                 options: FlowerAuditOptions | None = None, **settings: Any) -> None:
        from gradleak.attacks.base import resolve_config

        base = options or FlowerAuditOptions()
        given = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        for key, value in settings.items():  # iterables (a range, a set) of the tuple fields, as lists
            iterable = isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))
            given[key] = list(value) if iterable else value
        o = from_dict(FlowerAuditOptions, given, what="audit options")
        if o.input_shape is not None:
            o = dataclasses.replace(o, input_shape=tuple(int(v) for v in o.input_shape))
        self.options = o  # the one copy: what is audited and how
        name, preset = split_preset(attack)  # "cinet" or "cinet:reference", as gradleak list presets prints it
        if attack_config is None or isinstance(attack_config, Mapping):  # the one resolver; fails before the federation
            attack_config = resolve_config(name, preset=preset, overrides=attack_config)
        if o.defense:
            parse_defense(o.defense)
        self.conditions = [Condition.parse(c) for c in o.fail_if]
        self.seeds = tuple(int(v) for v in (o.seeds if o.seeds is not None else [o.seed]))
        if o.executor not in ("process", "inline"):
            raise ConfigError(f"audit executor: expected 'process' or 'inline', got {o.executor!r}")
        if o.max_workers < 1:
            raise ConfigError(f"audit max_workers: expected a positive integer, got {o.max_workers}")
        self.strategy = strategy
        self.model, self.out, self.attack, self.attack_config, self.truth = model, Path(out), name, attack_config, truth
        self.rounds = None if o.rounds is None else {int(r) for r in o.rounds}
        self.malicious_rounds = {int(r) for r in o.malicious_rounds}
        if self.malicious_rounds:
            _check_malicious(o, model)
        self._malicious: dict[int, tuple[Any, list[str]]] = {}
        self.node_ids = None if o.node_ids is None else {int(n) for n in o.node_ids}
        self._sent: dict[tuple[int, int], tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._pending: list[tuple[int, int, str, Future[dict[str, Any]]]] = []
        self._records: list[AuditRecord] = []
        self.server_state(dict(self._template_model().state_dict()))  # a model that does not build fails now

    # -- delegation --------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet: avoid recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        """Log the wrapped strategy's summary, then what is audited."""
        self.strategy.summary()
        log.info("gradleak audit: attack %s into %s, rounds %s, clients %s, executor %s", self.attack, self.out,
                 "all" if self.rounds is None else sorted(self.rounds),
                 "all" if self.node_ids is None else sorted(self.node_ids), self.options.executor)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, unchanged (but in a malicious round: their model is the
        malicious one); keeps what the audited clients are sent."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if int(server_round) in self.malicious_rounds:
            self._send_malicious(int(server_round), arrays, messages)
        if self._audited_round(server_round):
            converted: dict[int, dict[str, torch.Tensor]] = {}
            for msg in messages:
                node = int(msg.metadata.dst_node_id)
                if self.node_ids is not None and node not in self.node_ids:
                    continue
                sent = self._array_record(msg.content)
                if sent is None:
                    log.warning("audit round %d node %d: the train message holds no ArrayRecord; not audited",
                                server_round, node)
                    continue
                if id(sent) not in converted:
                    converted[id(sent)] = _arrays(sent)
                config_doc: dict[str, Any] = {}
                for record in _records(msg.content, "config").values():
                    config_doc.update(_plain(record))
                self._sent[(server_round, node)] = (converted[id(sent)], config_doc)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate of ``replies``; then the audits of this round start."""
        replies = list(replies)
        captured: list[tuple[int, AuditJob | None, str | None]] = []
        malicious = self._malicious.pop(int(server_round), None)
        if malicious is not None:
            for msg in replies:  # a refusal (inspect_mod) or a client that could not load the model
                node = int(msg.metadata.src_node_id)
                if msg.has_error() and (server_round, node) in self._sent:
                    self._records.append(AuditRecord(server_round, node, "", "refused",
                                                     error=str(msg.error.reason)))
        if self._audited_round(server_round):
            captured = self._capture(server_round, replies, malicious)
        if malicious is not None:
            replies = [self._victims_part(msg, malicious[1]) for msg in replies]
        result = self.strategy.aggregate_train(server_round, replies)
        for node, job, error in captured:
            self._dispatch(server_round, node, job, error)
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """The wrapped strategy's own ``start`` loop, run with this wrapper's hooks.

        Takes the arguments of ``Strategy.start`` (``grid``, ``initial_arrays``, ``num_rounds``,
        ...). With ``wait_at_end`` it then waits for the pending audits and writes the index.
        """
        try:
            return type(self.strategy).start(self, *args, **kwargs)
        finally:
            if self.options.wait_at_end:
                self.wait()

    # -- auditing ----------------------------------------------------------------------------
    def _audited_round(self, server_round: int) -> bool:
        return self.rounds is None or int(server_round) in self.rounds or int(server_round) in self.malicious_rounds

    def _send_malicious(self, server_round: int, arrays: ArrayRecord, messages: list[Message]) -> None:
        """Put the malicious model in every train message of this round (the honest names are kept
        to give the wrapped strategy the victim's part of the replies)."""
        from gradleak.attacks.base import ATTACKS
        from gradleak.data import public_images

        o = self.options
        honest = _arrays(arrays)
        server = self.server_state(name_arrays(honest, self._template_model(), what="sent parameters"))
        public = public_images(server.input_shape[-1])  # the server's own photos, none a client's
        batch_size = o.malicious_batch_size
        assert batch_size is not None  # _check_malicious
        sent = ATTACKS.get(o.malicious_attack).malicious_model(server, o.malicious_units, batch_size=batch_size,
                                                                public=public)
        sent = dataclasses.replace(sent, spec=server.spec)  # the victim's spec: the block is found in the model
        record = ArrayRecord(sent.model.state_dict())
        for msg in messages:
            msg.content[self._array_key(msg.content) or "arrays"] = record
        self._malicious[server_round] = (sent, list(honest))
        log.warning("gradleak audit: round %d is malicious: %d clients sent the model behind %s (%d units)",
                    server_round, len(messages), o.malicious_attack, o.malicious_units)

    def _victims_part(self, msg: Message, honest_names: list[str]) -> Message:
        """The reply with its parameters cut to the victim's, under the names the server first sent."""
        if msg.has_error():
            return msg
        key = self._array_key(msg.content, skip=self.options.gradient_key)
        if key is None:
            return msg
        items = list(msg.content[key].items())
        if len(items) <= len(honest_names):  # not the model this round sent: the strategy gets it as it came
            log.warning("gradleak audit: a reply of %d arrays to a malicious round whose victim has %d; passed on "
                        "unchanged", len(items), len(honest_names))
            return msg
        victim = items[len(items) - len(honest_names):]  # Sequential(block, victim): the block's arrays come first
        msg.content[key] = ArrayRecord(dict(zip(honest_names, (v for _, v in victim), strict=True)))
        return msg

    def server_state(self, state: dict[str, torch.Tensor]) -> Any:
        """The model the server sent, as a gradleak ``ServerState``."""
        return server_state(self.model, state, input_shape=self.options.input_shape,  # type: ignore[arg-type]
                            num_classes=self.options.num_classes, bn_mode=self.options.bn_mode)

    def _array_key(self, content: RecordDict, *, skip: str | None = None) -> str | None:
        """The key of the parameters' ArrayRecord: the wrapped strategy's ``arrayrecord_key``, else the first."""
        keys = [k for k in _records(content, "array") if k != skip]
        key = getattr(self.strategy, "arrayrecord_key", "arrays")
        return key if key in keys else next(iter(keys), None)

    def _array_record(self, content: RecordDict, *, skip: str | None = None) -> ArrayRecord | None:
        key = self._array_key(content, skip=skip)
        return None if key is None else _records(content, "array")[key]

    def _value(self, names: tuple[str, ...], *sources: dict[str, Any]) -> Any:
        for source in sources:
            for name in names:
                if name in source:
                    return source[name]
        return None

    def _capture(self, server_round: int, replies: list[Message],
                 malicious: tuple[Any, list[str]] | None = None) -> list[tuple[int, AuditJob | None, str | None]]:
        """Write the audit folder of every audited reply; never raises (training must go on)."""
        picked = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if (server_round, node) in self._sent and not msg.has_error():
                picked.append((node, msg))
        picked.sort(key=lambda item: item[0])
        if self.options.max_clients_per_round is not None:
            picked = picked[: self.options.max_clients_per_round]
        out: list[tuple[int, AuditJob | None, str | None]] = []
        for node, msg in picked:
            sent_state, config = self._sent.pop((server_round, node))
            folder = self.out / f"round-{server_round:03d}" / f"node-{node}"
            try:
                out.append((node, self._write(server_round, node, msg.content, sent_state, config, folder,
                                              None if malicious is None else malicious[0]), None))
            except Exception as e:  # noqa: BLE001 - an audit failure must not stop the federation
                log.exception("audit round %d node %d: capture failed", server_round, node)
                out.append((node, None, f"{type(e).__name__}: {e}"))
        self._sent = {k: v for k, v in self._sent.items() if k[0] > server_round}
        return out

    def _write(self, server_round: int, node: int, content: RecordDict, sent_state: dict[str, torch.Tensor],
               config: dict[str, Any], folder: Path, malicious: Any = None) -> AuditJob:
        if malicious is not None:  # the model this round sent: the victim behind the block
            server = malicious
        else:
            server = self.server_state(name_arrays(sent_state, self._template_model(), what="sent parameters"))
        metrics: dict[str, Any] = {}
        for record in _records(content, "metric").values():
            metrics.update(_plain(record))
        for record in _records(content, "config").values():  # a client's declarations (gradleak's defense_mod)
            metrics.update({k: v for k, v in _plain(record).items() if k not in metrics})
        num_key = (getattr(self.strategy, "weighted_by_key", None),) + self.options.keys.num_examples
        num_examples = self._value(tuple(k for k in num_key if k), metrics, config)
        if num_examples is None:
            raise ConfigError(f"client reply: expected its number of examples under {', '.join(self.options.keys.num_examples)}, "
                              f"got metrics {sorted(metrics)}")
        meta = {"round": server_round, "node_id": node, "source": "flower"}
        gradients = _records(content, "array").get(self.options.gradient_key)
        if gradients is not None:
            update = update_from_gradients(server, _arrays(gradients), num_examples=int(num_examples), metadata=meta)
        else:
            received = self._array_record(content, skip=self.options.gradient_key)
            if received is None:
                raise ConfigError("client reply: expected an ArrayRecord of parameters, got none")
            training = LocalTraining(
                lr=self._value(self.options.keys.lr, metrics, config),
                local_steps=self._value(self.options.keys.local_steps, metrics, config),
                epochs=self._value(self.options.keys.epochs, metrics, config),
                batch_size=self._value(self.options.keys.batch_size, metrics, config),
                shuffle_seed=self._value(self.options.keys.shuffle_seed, metrics, config))
            named = name_arrays(_arrays(received), server.model, what="client parameters")
            update = update_from_parameters(server, named, num_examples=int(num_examples), training=training,
                                            metadata=meta)
        defense = self._value(self.options.keys.defense, metrics, config) or self.options.defense
        if defense:
            update = declare_defense(update, parse_defense(str(defense)))
        attack, attack_config, served = self.attack, self.attack_config, "honest"
        if malicious is not None:
            from gradleak.attacks.base import resolve_config

            attack, attack_config = self.options.malicious_attack, resolve_config(self.options.malicious_attack)
            served = f"malicious: {attack}, {self.options.malicious_units} units"
        capture = {**meta, "server": served, "num_examples": int(num_examples), "config": config, "metrics": metrics,
                   "strategy": type(self.strategy).__name__, "attack": attack,
                   "input_shape": list(server.input_shape), "num_classes": server.num_classes,
                   "bn_mode": server.bn_mode, "update": update.meta_dict()}
        write_capture(folder, server=server, update=update, capture=capture, truth=self._truth(server_round, node))
        return AuditJob(folder=str(folder), attack=attack, attack_config=attack_config,
                        label_strategy=self.options.label_strategy, model=self.model, seeds=self.seeds, device=self.options.device,
                        threads=self.options.threads, time_budget=self.options.time_budget)

    def _template_model(self) -> nn.Module:
        if isinstance(self.model, ModelSpec):
            from gradleak.models import build_model

            return build_model(self.model, seed=0)
        return self.model

    def _truth(self, server_round: int, node: int) -> Batch | None:
        if self.truth is None:
            return None
        if callable(self.truth):
            given = self.truth(server_round, node)  # a Batch or (images, labels)
            return given if given is None or isinstance(given, Batch) else Batch(images=given[0], labels=given[1])
        path = truth_path(self.truth, server_round=server_round, node_id=node)
        if not path.is_file():
            log.warning("audit round %d node %d: no truth file %s; not scored", server_round, node, path)
            return None
        return load_truth(path)

    def _dispatch(self, server_round: int, node: int, job: AuditJob | None, error: str | None) -> None:
        if job is None:
            self._records.append(AuditRecord(server_round, node, "", "failed", error=error))
        elif self.options.executor == "inline":
            self._records.append(_finish(server_round, node, job.folder, lambda: _inline(job)))
        else:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.options.max_workers,
                                                 mp_context=multiprocessing.get_context("spawn"))
            self._pending.append((server_round, node, job.folder, self._pool.submit(run_audit_job, job)))
            log.info("audit round %d node %d submitted (%s)", server_round, node, job.folder)

    def wait(self) -> list[AuditRecord]:
        """Wait for the pending audits, write ``audits.md``/``audits.csv`` in ``out``, return every record."""
        pending, self._pending = self._pending, []
        for server_round, node, folder, future in pending:
            self._records.append(_finish(server_round, node, folder, future.result))
        if self._records:
            write_index(self.out, self._records)
        return list(self._records)

    def close(self) -> None:
        """Wait for the audits and shut the process pool down."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def records(self) -> list[AuditRecord]:
        """The audits finished so far."""
        return list(self._records)

    def leaks(self) -> list[tuple[AuditRecord, str]]:
        """The finished audits whose worst case exceeds a ``fail_if`` limit, with the limit."""
        return [(r, str(c)) for r in self._records for c in self.conditions if r.status == "done" and c.holds(r.summary)]


def _check_malicious(o: FlowerAuditOptions, model: Any) -> None:
    """A malicious round's settings, checked before the federation starts."""
    from gradleak.attacks.base import ATTACKS

    cls = ATTACKS.get(o.malicious_attack)  # an unknown name: ConfigError naming the registered ones
    if not cls.knowledge.active_manipulation:
        raise ConfigError(f"malicious_attack: expected an attack on a model the server modified (imprint, trap), "
                          f"got {o.malicious_attack!r}")
    if not isinstance(model, ModelSpec):
        raise ConfigError("malicious_rounds: expected the model as a ModelSpec (the malicious model is recorded "
                          "with the victim's spec), got a template module")
    if o.malicious_units < 2:
        raise ConfigError(f"malicious_units: expected an integer >= 2, got {o.malicious_units}")
    if o.malicious_batch_size is None or o.malicious_batch_size < 1:
        raise ConfigError(f"malicious_batch_size: expected the clients' batch size (a positive integer, which the "
                          f"server sets), got {o.malicious_batch_size}")


def _inline(job: AuditJob) -> dict[str, Any]:
    """Run ``job`` in the server's process, leaving its torch threads and global RNG as they were."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            return run_audit_job(job)
    finally:
        torch.set_num_threads(threads)


def _finish(server_round: int, node: int, folder: str, get: Callable[[], dict[str, Any]]) -> AuditRecord:
    try:
        return AuditRecord(server_round, node, folder, "done", summary=get())
    except Exception as e:  # noqa: BLE001 - one failed audit must not lose the others
        log.exception("audit round %d node %d failed", server_round, node)
        return AuditRecord(server_round, node, folder, "failed", error=f"{type(e).__name__}: {e}")
