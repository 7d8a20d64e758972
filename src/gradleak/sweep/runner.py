"""Sweeps: a grid of attacks x protocols x batch sizes x defenses x seeds, one trial each, on Ray or a process pool.

The same engine as ``gradleak audit`` (:mod:`gradleak.audit`), without verdicts across attacks: a
grid file (YAML or JSON, :func:`load_grid`) names the victim case and the axes, and each trial is
one attack on one cell, so that attacks are tabulated side by side. :meth:`SweepGrid.trials`
expands it; every trial is one :func:`gradleak.audit.run_audit` cell of one attack, written to
``<out>/trials/<attack>-s<seed>-d<data_seed>/<cell>/`` (``cell.json`` and one full run folder per
attacker: ``adaptive-s<seed>/`` and, for a defended cell, ``unaware-s<seed>/``; the trial's row is
their worst case). :func:`run_sweep` runs the trials not finished yet
(resumable; a trial folder made with other settings is refused), as Ray tasks with the
grid's ``num_cpus``/``num_gpus`` requests (``backend="ray"``) or in a spawn process pool
(``backend="local"``; :func:`gradleak.audit.execute.execute`), then gathers every finished trial into ``table.md``, ``table.csv`` and
``report.md`` (:mod:`gradleak.sweep.report`).

References:
    Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from gradleak.audit.engine import cell_finished, digest
from gradleak.audit.execute import check_backend, execute
from gradleak.audit.plan import AuditCell, ProtocolSetting, audit_grid
from gradleak.config import check_keys, check_value, from_dict
from gradleak.errors import ConfigError
from gradleak.types import ModelSpec

log = logging.getLogger(__name__)

EventFn = Callable[[str, str], None]
"""``on_event(trial_id, status)`` with status ``"skipped"``, ``"submitted"``, ``"done"`` or ``"failed"``."""


@dataclass(frozen=True)
class AttackSetting:
    """One attack of the grid: a registered name, an optional preset and field overrides."""

    name: str
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def tag(self) -> str:
        """Folder-safe, unique within the grid: ``label``, else ``name`` or ``name-preset``."""
        text = self.label or (f"{self.name}-{self.preset}" if self.preset else self.name)
        return re.sub(r"[^A-Za-z0-9.=_-]", "_", text)


@dataclass(frozen=True)
class Trial:
    """One attack on one audit cell with one seed (attack and defense noise) and one data seed."""

    attack: AttackSetting
    cell: AuditCell
    seed: int
    data_seed: int

    @property
    def id(self) -> str:
        return f"{self.attack.tag}-s{self.seed}-d{self.data_seed}/{self.cell.name}"


@dataclass(frozen=True)
class SweepGrid:
    """A sweep: the victim case, the axes, and what each trial may use.

    Args:
        model: the victim architecture.
        attacks: the attacks (axis).
        batch_sizes: images per client (axis).
        defenses: defense strings, e.g. ``"none"``, ``"noise:1e-3"``, ``"clip:1+noise:1e-3"`` (axis).
        protocols: client protocols (axis; default FedSGD).
        seeds: seeds of the attack and of the defense's noise (axis).
        data_seeds: which images to draw (axis; built-in CIFAR/ImageNet batches do not depend on it).
        model_seed: victim initialisation seed.
        weights: a model-state file (``gradleak train``, a simulate folder's ``model.safetensors``)
            whose weights the victim gets instead of ``model_seed``'s; its architecture must be
            ``model``'s, and every worker (every Ray node) must be able to read the path. Its
            SHA-256 is part of each trial's settings, so another file at the same path is refused
            on resume.
        data: data source of :func:`gradleak.data.load_batch`.
        data_root: local dataset copy, for sources that need one.
        iterations: one iteration budget for every attack (``None``: each attack's own).
        labels: ``"recovered"`` or ``"given"``.
        utility_steps: rounds of the utility measurement per trial (0: none).
        utility_lr: server learning rate of the utility rounds.
        time_budget: wall-clock seconds per attack.
        device: where the attacks run (``"cuda"`` with ``num_gpus`` > 0 on Ray).
        num_cpus: CPUs requested per trial (Ray) and torch threads per trial.
        num_gpus: GPUs requested per trial (Ray; fractions share a GPU).
        pairing: ``"hungarian"`` or ``"greedy"``.
        name: a title for the report.
    """

    model: ModelSpec
    attacks: tuple[AttackSetting, ...]
    batch_sizes: tuple[int, ...]
    defenses: tuple[str, ...] = ("none",)
    protocols: tuple[ProtocolSetting, ...] = (ProtocolSetting(),)
    seeds: tuple[int, ...] = (0,)
    data_seeds: tuple[int, ...] = (0,)
    model_seed: int = 42
    weights: str | None = None
    data: str = "builtin"
    data_root: str | None = None
    iterations: int | None = None
    labels: str = "recovered"
    utility_steps: int = 0
    utility_lr: float = 0.1
    time_budget: float | None = None
    device: str = "cpu"
    num_cpus: float = 1
    num_gpus: float = 0
    pairing: str = "hungarian"
    name: str = "sweep"

    def __post_init__(self) -> None:
        if not self.attacks or not self.seeds or not self.data_seeds:
            raise ConfigError(f"sweep grid: expected at least one attack, seed and data seed, got {len(self.attacks)}, "
                              f"{len(self.seeds)}, {len(self.data_seeds)}")
        tags = [a.tag for a in self.attacks]
        dup = next((t for t in tags if tags.count(t) > 1), None)
        if dup:
            raise ConfigError(f"sweep attacks: expected distinct attacks (give each a 'label'), got '{dup}' twice")
        if self.labels not in ("recovered", "given"):
            raise ConfigError(f"sweep labels: expected 'recovered' or 'given', got {self.labels!r}")
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"sweep device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError(f"sweep resources: expected num_cpus > 0 and num_gpus >= 0, got {self.num_cpus}, "
                              f"{self.num_gpus}")
        for what, values in (("seeds", self.seeds), ("data_seeds", self.data_seeds)):
            if len(set(values)) != len(values):
                raise ConfigError(f"sweep {what}: expected distinct values, got {list(values)}")

    def cells(self) -> list[AuditCell]:
        """The audit cells (validated by :func:`gradleak.audit.plan.audit_grid`)."""
        return audit_grid(batch_sizes=self.batch_sizes, defenses=self.defenses, protocols=self.protocols)

    def trials(self) -> list[Trial]:
        """Every trial: attack-major, then data seed, seed, and the audit grid's cell order."""
        cells = self.cells()
        return [Trial(a, c, s, d) for a in self.attacks for d in self.data_seeds for s in self.seeds for c in cells]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepGrid:
        """Build a grid from a parsed YAML/JSON mapping (see ``docs/sweep.md``); unknown keys are refused.

        Raises:
            ConfigError: an unknown key, a missing ``model``/``attacks``/``batch_sizes``, or a bad value.
        """
        check_keys(data, {f.name for f in fields(cls)}, "sweep grid")
        missing = [k for k in ("model", "attacks", "batch_sizes") if k not in data]
        if missing:
            raise ConfigError(f"sweep grid: expected the key(s) {', '.join(missing)}, got none")
        d = dict(data)
        model = d["model"]
        d["model"] = ModelSpec(name=model) if isinstance(model, str) else ModelSpec.from_dict(dict(model))
        d["attacks"] = tuple(_attack(a) for a in _list(d["attacks"], "attacks"))
        d["protocols"] = tuple(_protocol(p) for p in _list(d.get("protocols", ["fedsgd"]), "protocols"))
        for key in ("batch_sizes", "seeds", "data_seeds"):
            if key in d:
                d[key] = tuple(_int(v, key) for v in _list(d[key], key))
        if "defenses" in d:
            d["defenses"] = tuple(str(v) for v in _list(d["defenses"], "defenses"))
        hints = typing.get_type_hints(cls)
        for key in ("model_seed", "weights", "data", "data_root", "iterations", "labels", "utility_steps", "utility_lr",
                    "time_budget", "device", "num_cpus", "num_gpus", "pairing", "name"):
            if key in d:
                d[key] = check_value(f"sweep {key}", hints[key], d[key])
        for key, low in (("batch_sizes", 1), ("iterations", 1), ("utility_steps", 0), ("time_budget", 0)):
            given = d.get(key)
            values: tuple[Any, ...] = given if isinstance(given, tuple) else (given,)
            bad = next((v for v in values if v is not None and not v >= low), None)
            if bad is not None:
                raise ConfigError(f"sweep {key}: expected values of at least {low}, got {bad!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def _list(value: Any, what: str) -> list[Any]:
    if isinstance(value, (str, int, float, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"sweep {what}: expected a non-empty list, got {value!r}")
    return list(value)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"sweep {what}: expected integers, got {value!r}")
    return value


def _attack(value: Any) -> AttackSetting:
    from gradleak.attacks import ATTACKS

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        raise ConfigError(f"sweep attack: expected a name or a mapping with 'name', got {value!r}")
    check_keys(value, {"name", "preset", "set", "label"}, f"sweep attack '{value['name']}'")
    ATTACKS.get(str(value["name"]))
    return AttackSetting(name=str(value["name"]), preset=value.get("preset"), overrides=dict(value.get("set") or {}),
                         label=str(value.get("label") or ""))


def _protocol(value: Any) -> ProtocolSetting:
    if isinstance(value, str):
        value = {"protocol": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"sweep protocol: expected 'fedsgd' or a mapping with 'protocol', got {value!r}")
    return from_dict(ProtocolSetting, value, what="sweep protocol")


def load_grid(path: str | Path) -> SweepGrid:
    """Read a grid file: YAML (needs pyyaml, in the ``fl`` extra) or JSON (``.json``).

    Raises:
        ConfigError: the file is missing or does not parse, or :meth:`SweepGrid.from_dict` refuses it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep grid file: expected an existing file, got '{path}'")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sweep grid file '{path}': expected JSON, got a parse error ({e})") from None
    else:
        try:
            import yaml
        except ImportError as e:
            raise ImportError("reading a YAML grid needs pyyaml: pip install 'gradleak[fl]' (or use a .json grid)") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"sweep grid file '{path}': expected YAML, got a parse error ({e})") from None
    return SweepGrid.from_dict(data or {})


def trial_folder(out: str | Path, trial: Trial) -> Path:
    """``<out>/trials/<attack>-s<seed>-d<data_seed>/<cell>/``: the trial's run folder."""
    return Path(out) / "trials" / trial.id


def _trial_doc(grid: SweepGrid, trial: Trial) -> dict[str, Any]:
    doc = grid.to_dict()
    for key in ("attacks", "batch_sizes", "defenses", "protocols", "seeds", "data_seeds", "name", "num_cpus", "num_gpus"):
        doc.pop(key)
    doc.update(attack=asdict(trial.attack), cell=json.loads(json.dumps(asdict(trial.cell), default=str)),
               seed=trial.seed, data_seed=trial.data_seed, id=trial.id)
    if grid.weights is not None:
        doc["weights"] = {"path": grid.weights, "sha256": digest(grid.weights)}
    return doc


def run_trial(grid: SweepGrid, trial: Trial, out: str, dry_run: bool = False) -> dict[str, Any]:
    """Run one trial into its folder (in whichever process or Ray worker calls it); return its row."""
    import torch

    from gradleak.attacks.base import resolve_config
    from gradleak.audit import AttackPlan, AuditOptions, KnowledgeAxes, run_audit

    torch.set_num_threads(max(1, int(grid.num_cpus)))
    iterations = 2 if dry_run else grid.iterations
    config = resolve_config(trial.attack.name, iterations=iterations, preset=trial.attack.preset,
                           overrides=trial.attack.overrides)
    folder = trial_folder(out, trial)
    knowledge = KnowledgeAxes(labels=("known",) if grid.labels == "given" else ("recovered",))
    options = AuditOptions(model_seed=grid.model_seed, data=grid.data, data_root=grid.data_root,
                           data_seed=trial.data_seed, weights=grid.weights, utility_steps=grid.utility_steps, utility_lr=grid.utility_lr,
                           knowledge=knowledge, device=grid.device, seed=trial.seed,
                           pairing=grid.pairing, time_budget=grid.time_budget,
                           fill_budget=grid.iterations is None, progress=False)
    run_audit(spec=grid.model, cells=[trial.cell], plan=AttackPlan({trial.attack.name: config}),
              out=folder.parent, options=options)
    from gradleak.sweep.report import trial_row

    return trial_row(folder, trial)


def _check(grid: SweepGrid, trials: list[Trial], out: Path, dry_run: bool) -> list[Trial]:
    """Refuse folders made with other settings; return the trials still to run (writing their trial.json)."""
    from gradleak.attacks.base import resolve_config
    from gradleak.audit.cell import check_victim
    from gradleak.audit.engine import victim

    for a in grid.attacks:  # unknown presets or fields fail before anything runs
        resolve_config(a.name, iterations=grid.iterations, preset=a.preset, overrides=a.overrides)
    check_victim(victim(grid.model, grid.model_seed, grid.weights), grid.cells())
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for trial in trials:
        folder = trial_folder(out, trial)
        doc = {**_trial_doc(grid, trial), "dry_run": dry_run}
        path = folder / "trial.json"
        if path.is_file() and json.loads(path.read_text()) != doc:
            raise ConfigError(f"sweep trial '{trial.id}': expected a folder made with the same settings, got one made "
                              f"with others ({path}); use a new --out")
        if cell_finished(folder):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
        todo.append(trial)
    return todo


def run_sweep(grid: SweepGrid, *, out: str | Path, backend: str = "local", address: str | None = None,
              workers: int | None = None, dry_run: bool = False, on_event: EventFn | None = None) -> list[dict[str, Any]]:
    """Run every unfinished trial of ``grid`` and gather all of them into ``out``.

    Args:
        grid: the sweep.
        out: the sweep folder (``trials/``, ``table.md``, ``table.csv``, ``report.md``, ``sweep.json``).
        backend: ``"local"`` (spawn process pool) or ``"ray"`` (one Ray task per trial).
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None``: a Ray runtime
            already initialised in this process, else a new local one.
        workers: local processes (default: CPUs / ``num_cpus``), or CPUs of a new local Ray runtime.
        dry_run: 2 iterations per attack (checks that every trial fits).
        on_event: told ``(trial_id, status)``.

    Returns:
        One row per trial of the grid (finished ones; failed ones with ``status="failed"``).

    Raises:
        ConfigError: an unknown backend, or a trial folder made with other settings.
    """
    check_backend(backend, workers)
    if grid.device.startswith("cuda") and backend == "ray" and grid.num_gpus <= 0:
        raise ConfigError(f"sweep device {grid.device!r} on Ray: expected num_gpus > 0 per trial (Ray hides the GPUs "
                          "from a task that requests none), got 0")
    if grid.device.startswith("cuda") and backend == "local":
        from gradleak.cli.common import check_device

        check_device(grid.device, what="sweep device")
    out = Path(out)
    trials = grid.trials()
    created = not out.exists()
    try:
        todo = _check(grid, trials, out, dry_run)  # validates everything before it writes a trial.json
    except Exception:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    tell = on_event or (lambda trial_id, status: None)
    for t in trials:
        if t not in todo:
            tell(t.id, "skipped")
    log.info("sweep: %d trials, %d to run on %s", len(trials), len(todo), backend)
    started = time.perf_counter()
    errors: dict[str, str] = {}
    if todo:
        errors = execute(_trial_job, [(t.id, (grid, t, str(out), dry_run)) for t in todo], backend=backend,
                         workers=workers, address=address, num_cpus=grid.num_cpus,
                         num_gpus=grid.num_gpus, tell=tell)
    from gradleak.sweep.report import gather, write_sweep_report

    rows = gather(out, trials, errors, trial_folder)
    write_sweep_report(out, rows, grid=grid, backend=backend, ran=len(todo), seconds=time.perf_counter() - started)
    return rows


def _trial_job(arg: tuple[SweepGrid, Trial, str, bool]) -> dict[str, Any]:
    return run_trial(*arg)
