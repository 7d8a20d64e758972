"""The audit engine: plan, simulate each cell's client, run every attacker x seed, read back the verdicts.

:func:`run_audit` takes the grid (:func:`gradleak.audit.plan.audit_grid`), the attacks
(:func:`gradleak.audit.plan.plan_attacks`) and the attacker knowledge to try. For every cell it
writes ``cell.json`` (settings, privacy accounting, utility) and the truth, then runs one
:func:`gradleak.reporting.run_attack` per attacker and seed into
``<out>/<cell>/<attacker id>-s<seed>/`` (a full run folder), on the backend asked for
(:func:`gradleak.audit.execute.execute`: in this process, a process pool, or Ray tasks). Every
worker simulates the cell's update itself from the same seeds, so no update travels. A run whose
``metrics.json`` exists is not run again, and an interrupted one resumes from its checkpoint: an
interrupted audit continues when the same call is made again.

The rows it returns are the worst case per cell (:func:`gradleak.audit.verdicts.load_row`);
:func:`gradleak.reporting.audit_report.write_audit_report` turns them into the page a person reads.

References:
    Zhang et al., "Generative Gradient Inversion via Over-Parameterized Networks in Federated
    Learning", ICCV 2023 (CI-Net; appendix C.3 on aggregates).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gradleak.attacks import ATTACKS
from gradleak.audit.cell import cell_seed, cell_update, check_victim, utility
from gradleak.audit.execute import check_backend, execute
from gradleak.audit.landscape import flat, gradient_landscape
from gradleak.audit.plan import (
    Attacker,
    AttackPlan,
    AuditCell,
    KnowledgeAxes,
    attackers_for,
    run_name,
    untried_knowledge,
    with_budgets,
)
from gradleak.audit.verdicts import load_row, with_undefended
from gradleak.data import load_batch, public_images
from gradleak.errors import ConfigError, GradleakError
from gradleak.models import build_model
from gradleak.reporting.runner import RunFolder, RunOptions, run_attack, write_json
from gradleak.threat import load_victim, save_truth
from gradleak.types import Batch, ClientUpdate, ModelSpec, ServerState

log = logging.getLogger(__name__)

EventFn = Callable[[str, str], None]
"""``on_event(name, status)``: a cell (``"skipped"``, ``"running"``, ``"done"``) or a run
(``"<cell>/<run>"``: ``"submitted"``, ``"done"``, ``"failed"``)."""


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj,
                                 default=str))


@dataclass(frozen=True)
class AuditOptions:
    """How an audit runs, beside its grid and its attacks (:func:`run_audit`).

    Args:
        model_seed: victim initialisation seed.
        data: data source of :func:`gradleak.data.load_batch` (default: the built-in images).
        data_root: folder of a local dataset copy, for sources that need one.
        data_seed: which images to draw.
        utility_steps: T rounds of the utility measurement (0: none).
        utility_lr: server learning rate applied to FedSGD gradients in the utility rounds.
        knowledge: the attacker assumptions tried (:class:`gradleak.audit.plan.KnowledgeAxes`; default all).
        device: where the attacks run (clients and utility run on the CPU).
        seed: seed of the defense's noise (per cell), and of the attack when ``seeds`` is not given.
        seeds: the attack seeds every attacker runs with (default ``[seed]``).
        pairing: ``"hungarian"`` or ``"greedy"``.
        time_budget: wall-clock seconds per attack run (``None``: its iteration budget only).
        fill_budget: with ``time_budget``, each run first sizes its iteration count to the budget
            (:func:`gradleak.reporting.runner.fit_budget`), so its schedule completes in the time
            given; ``False`` keeps the configs' counts (an explicit ``--iterations``).
        progress: show the attack's progress bar (in-process runs).
        write_images: ``False``: numbers only (no reconstructions, grids, truth files or checkpoints
            left on disk); reconstructions of real client data are themselves sensitive.
        backend: ``"local"`` or ``"ray"`` (:func:`gradleak.audit.execute.execute`).
        workers: local processes (1: in this process), or CPUs of a new local Ray runtime.
        address: a Ray cluster's address.
        num_cpus: CPUs per run (Ray's request, and torch threads in a worker).
        num_gpus: GPUs per run (Ray).
        imprint_bins: also play a malicious server that sends the victim behind an imprint block of
            this many bins (``--threat malicious``); its attacks (``imprint``) attack that model's
            update (``None``: an honest server only).
        budgets: iteration budgets every iterative attacker runs with instead of its config's, one run folder each
            (``--budgets``; ``None``: the attack configs' own). The worst case is taken over them:
            a longer run can read lower against a many-to-one defense.
        weights: a model-state file (``gradleak train``, a simulate folder's ``model.safetensors``)
            whose weights the victim gets instead of ``model_seed``'s initialisation; every worker
            reads it (on a Ray cluster, a path every node can read). Recorded with its SHA-256.
    """

    model_seed: int = 42
    data: str = "builtin"
    data_root: str | Path | None = None
    data_seed: int = 0
    utility_steps: int = 20
    utility_lr: float = 0.1
    knowledge: KnowledgeAxes = field(default_factory=KnowledgeAxes)
    device: str = "cpu"
    seed: int = 0
    seeds: Sequence[int] | None = None
    pairing: str = "hungarian"
    time_budget: float | None = None
    fill_budget: bool = True
    progress: bool = True
    write_images: bool = True
    backend: str = "local"
    workers: int | None = 1
    address: str | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    imprint_bins: int | None = None
    weights: str | Path | None = None
    budgets: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.budgets is not None:
            if not self.budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.budgets) \
                    or len(set(self.budgets)) != len(self.budgets):
                raise ConfigError(f"audit budgets: expected distinct positive iteration counts, got {self.budgets!r}")
            if self.time_budget is not None:
                raise ConfigError("audit budgets: expected iteration budgets or a wall-clock budget (--seconds), "
                                  "got both")
        steps = self.utility_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"audit utility steps: expected a non-negative integer, got {steps!r}")
        if not self.utility_lr > 0:
            raise ConfigError(f"audit utility learning rate: expected a positive number, got {self.utility_lr!r}")
        check_backend(self.backend, self.workers)
        if not self.num_cpus > 0 or self.num_gpus < 0:
            raise ConfigError(f"audit resources: expected num_cpus > 0 and num_gpus >= 0, got {self.num_cpus}, "
                              f"{self.num_gpus}")
        if self.device.startswith("cuda") and self.backend == "ray" and self.num_gpus <= 0:
            raise ConfigError("audit device cuda on Ray: expected num_gpus > 0 per run (--num-gpus), got 0")

    def attack_seeds(self) -> list[int]:
        seeds = list(dict.fromkeys(int(s) for s in (self.seeds if self.seeds is not None else [self.seed])))
        if not seeds:
            raise ConfigError("audit seeds: expected at least one attack seed, got none")
        return seeds


@dataclass(frozen=True)
class RunJob:
    """One attacker x seed on one cell: everything a worker needs, picklable (no tensors)."""

    spec: ModelSpec
    cell: AuditCell
    attacker: Attacker
    attack_config: Any
    seed: int
    folder: str
    case: dict[str, Any]
    model_seed: int
    data: str
    data_root: str | None
    data_seed: int
    defense_seed: int
    device: str
    pairing: str
    time_budget: float | None
    write_images: bool
    progress: bool
    fill_budget: bool = False
    imprint_bins: int | None = None
    weights: str | None = None

    @property
    def id(self) -> str:
        return f"{self.cell.name}/{Path(self.folder).name}"


_CASES: dict[tuple[Any, ...], tuple[ServerState, Batch, ClientUpdate]] = {}


def _case(job: RunJob) -> tuple[ServerState, Batch, ClientUpdate]:
    """The victim, the cell's private batch and its defended update (cached per process: a cell's runs share them)."""
    cls = ATTACKS.get(job.attacker.attack)
    malicious = cls.knowledge.active_manipulation
    key = (json.dumps(job.spec.to_dict(), sort_keys=True), job.model_seed, job.weights, job.data, job.data_root,
           job.data_seed, job.cell, job.defense_seed, (job.attacker.attack, job.imprint_bins) if malicious else None)
    if key not in _CASES:
        _CASES.clear()  # one cell at a time: the cache holds no more than one batch and update
        server = victim(job.spec, job.model_seed, job.weights)
        if malicious:  # the malicious server sent a modified model, and the client trained on it
            if job.imprint_bins is None:
                raise ConfigError(f"audit attacker {job.attacker.id}: expected a malicious server (imprint_bins), "
                                  "got none")
            server = cls.malicious_model(server, job.imprint_bins, batch_size=job.cell.batch_size,
                                         public=public_images(job.spec.image_size))
        n = job.cell.batch_size * job.cell.protocol.clients
        batch = load_batch(job.data, n, size=job.spec.image_size, num_classes=job.spec.num_classes,
                           seed=job.data_seed, root=job.data_root)
        update = cell_update(server, batch.images, batch.labels, cell=job.cell,
                             generator=torch.Generator().manual_seed(job.defense_seed))
        _CASES[key] = (server, batch, update)
    return _CASES[key]


def victim(spec: ModelSpec, model_seed: int, weights: str | Path | None) -> ServerState:
    """The audit's victim: ``spec`` initialised from ``model_seed``, or with the weights of the file ``weights``."""
    model = build_model(spec, seed=model_seed) if weights is None else load_victim(weights, spec)
    return ServerState.from_spec(model, spec)


def digest(path: str | Path | None) -> str | None:
    """The SHA-256 of the file at ``path`` (``None`` for none): what a run's settings record of a weights file."""
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_job(job: RunJob) -> str:
    """Run one attacker x seed into its folder (in whichever process or Ray worker calls it); return the folder."""
    folder = Path(job.folder)
    if (folder / "metrics.json").is_file():
        return str(folder)
    server, batch, update = _case(job)
    run_attackers(server, update, attackers=[job.attacker], attack_config=job.attack_config, folder=folder.parent,
                  seeds=[job.seed], case=job.case, truth_images=batch.images, truth_labels=batch.labels,
                  options=RunOptions(device=job.device, progress=job.progress, pairing=job.pairing,
                                     time_budget=job.time_budget, fill_budget=job.fill_budget,
                                     write_images=job.write_images))
    return str(folder)


def run_attackers(server: ServerState, update: ClientUpdate, *, attackers: Sequence[Attacker], attack_config: Any,
                  folder: Path, seeds: Sequence[int], case: dict[str, Any], truth_images: torch.Tensor | None,
                  truth_labels: torch.Tensor | None, options: RunOptions) -> None:
    """Every attacker x seed on an update already at hand, into ``folder/<attacker id>-s<seed>/``, in this process.

    ``options`` applies to every run (the seed, resume and force are set per run). Finished runs
    are kept; an interrupted one resumes.
    """
    for attacker in attackers:
        for seed in seeds:
            run = RunFolder(folder / run_name(attacker.id, seed))
            if run.finished():
                continue
            run_attack(server, update, attack=attacker.attack, config=attacker.config(attack_config), out=run.path,
                       case={**case, "attacker": asdict(attacker), "attacker_id": attacker.id},
                       give_labels=attacker.labels == "known", truth_images=truth_images, truth_labels=truth_labels,
                       options=replace(options, seed=seed, resume=run.has_checkpoint(), force=True))


def cell_finished(folder: str | Path) -> bool:
    """Whether a cell folder holds every run its ``cell.json`` asks for (each attacker x seed)."""
    info_path = Path(folder) / "cell.json"
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    seeds = (info.get("settings") or {}).get("seeds") or []
    return bool(seeds) and all((Path(folder) / run_name(a, s) / "metrics.json").is_file()
                               for a in info.get("attacker_names", []) for s in seeds)


def _settings(spec: ModelSpec, plan: AttackPlan, o: AuditOptions) -> dict[str, Any]:
    """What a cell's results depend on (recorded in every ``cell.json``; a rerun with others is refused)."""
    return _plain({"model": spec.to_dict(), "model_seed": o.model_seed,
                   "weights": None if o.weights is None else {"path": str(o.weights), "sha256": digest(o.weights)},
                   "data": o.data, "data_seed": o.data_seed,
                   "data_root": str(o.data_root) if o.data_root else None, "attacks": plan.names,
                   "attack_configs": {n: _plain(c) for n, c in plan.configs.items()},
                   "knowledge": [t for t in o.knowledge.tokens() if not t.startswith(("bn-", "features-"))],
                   "bn_knowledge": list(o.knowledge.bn), "features_knowledge": list(o.knowledge.features),
                   "center_knowledge": list(o.knowledge.center), "seed": o.seed, "seeds": o.attack_seeds(),
                   "pairing": o.pairing, "time_budget": o.time_budget, "fill_budget": o.fill_budget,
                   "threat": ["honest", "malicious"] if o.imprint_bins else ["honest"], "imprint_bins": o.imprint_bins,
                   "images": o.write_images, "budgets": list(o.budgets) if o.budgets else None,
                   "utility": {"steps": o.utility_steps, "lr": o.utility_lr}})


LATER_SETTINGS = {"threat": ["honest"], "imprint_bins": None, "weights": None, "bn_knowledge": ["used", "ignored"],
                  "features_knowledge": ["used", "ignored"], "budgets": None, "center_knowledge": ["used", "ignored"]}
"""Settings recorded since an earlier version, with the value a folder without them was made with."""


def _same_settings(recorded: Any, settings: dict[str, Any]) -> bool:
    """Whether a cell folder was made with ``settings`` (a key it predates counts as its earlier value)."""
    if not isinstance(recorded, dict):
        return False
    filled = {**{k: v for k, v in LATER_SETTINGS.items() if k not in recorded}, **recorded}
    return filled == settings


def gives_features(server: ServerState) -> bool:
    """Whether the victim's last layer gives its input features in closed form (linear, with a bias:
    :func:`gradleak.attacks.features.last_linear`), so that attacks with a feature variant try it."""
    from gradleak.attacks.features import last_linear

    try:
        last_linear(server.model, server.input_shape, server.num_classes)
    except ConfigError:
        return False
    return True


def _prepare_cell(server: ServerState, cell: AuditCell, batch: Batch, folder: Path, plan: AttackPlan,
                  settings: dict[str, Any], o: AuditOptions, basin: dict[str, Any]) -> dict[str, Any]:
    """Write ``cell.json`` (and the truth): the cell's attackers, what is not tried, privacy and utility."""
    info_path = folder / "cell.json"
    attackers: list[Attacker] = []
    not_tried = [f"{n} ({why})" for n, why in plan.left_out.items()]
    features = gives_features(server)
    is_flat = flat(basin) is not None  # the update barely depends on the images: try centred matching too
    for name, config in plan.configs.items():
        mine, missing = attackers_for(name, defended=cell.defended, knowledge=o.knowledge, attack_config=config,
                                      shares_bn=cell.protocol.share_bn_stats, features=features, flat=is_flat,
                                      images=cell.batch_size * cell.protocol.clients,
                                      max_images=ATTACKS.get(name).max_images(server, config))
        attackers += mine
        not_tried += missing
    attackers = with_budgets(attackers, o.budgets)
    not_tried += untried_knowledge(o.knowledge, defended=cell.defended, shares_bn=cell.protocol.share_bn_stats,
                                   features=features, flat=is_flat)
    seed = cell_seed(o.seed, cell)
    update = cell_update(server, batch.images, batch.labels, cell=cell, generator=torch.Generator().manual_seed(seed))
    info: dict[str, Any] = {
        "cell": cell.name, "batch_size": cell.batch_size, "defense": cell.defense,
        "defense_spec": cell.parsed().spec(), "protocol": asdict(cell.protocol), "protocol_tag": cell.protocol.tag(),
        "privacy": update.metadata.get("privacy"), "attacker_names": [a.id for a in attackers],
        "not_tried": not_tried, "defense_seed": seed, "settings": settings,
        # the victim's basin at this batch: a "not broken" on a narrow one is an optimisation barrier of the
        # attacks, and the verdict says so
        "basin": basin}
    if info_path.is_file():  # an interrupted cell: keep the utility already measured
        info["utility"] = json.loads(info_path.read_text()).get("utility")
    else:
        info["utility"] = None if o.utility_steps == 0 else utility(
            server, batch.images, batch.labels, cell=cell, steps=o.utility_steps, lr=o.utility_lr,
            generator=torch.Generator().manual_seed(seed + 1))
    folder.mkdir(parents=True, exist_ok=True)
    if o.write_images:
        save_truth(batch.images, batch.labels, folder / "truth.safetensors", names=batch.names)
    write_json(info_path, info)
    return info


def plan_runs(spec: ModelSpec, cells: Sequence[AuditCell], plan: AttackPlan, out: str | Path,
              options: AuditOptions | None = None, on_event: EventFn | None = None) -> list[RunJob]:
    """Prepare every unfinished cell (``cell.json``, truth, utility) and return the runs still to do.

    Raises:
        ConfigError: a cell folder in ``out`` made with other settings, or a bad value.
        UnsupportedModelError: DP-SGD on a victim with train-mode BatchNorm.
    """
    o = options or AuditOptions()
    if not cells:
        raise ConfigError("audit grid: expected at least one cell, got none")
    out = Path(out)
    server = victim(spec, o.model_seed, o.weights)
    check_victim(server, cells)
    settings = _settings(spec, plan, o)
    batches: dict[int, Batch] = {}
    basins: dict[int, dict[str, Any]] = {}

    def batch_of(total: int) -> Batch:
        if total not in batches:
            batches[total] = load_batch(o.data, total, size=spec.image_size, num_classes=spec.num_classes,
                                        seed=o.data_seed, root=o.data_root)
        return batches[total]

    def basin_of(total: int) -> dict[str, Any]:  # it depends on the victim and the batch, not on the defense
        if total not in basins:
            basins[total] = gradient_landscape(server, batch_of(total).images, batch_of(total).labels)
        return basins[total]

    batch_of(max(c.batch_size * c.protocol.clients for c in cells))  # too few images fails before any cell runs
    for cell in cells:  # every folder is checked before anything is written
        info_path = out / cell.name / "cell.json"
        if info_path.is_file() and not _same_settings(json.loads(info_path.read_text()).get("settings"), settings):
            raise ConfigError(f"audit cell '{cell.name}': expected results made with the same settings, got a "
                              f"folder made with others ({info_path}); use a new output folder (--out)")
    tell = on_event or (lambda name, status: None)
    jobs: list[RunJob] = []
    for cell in cells:
        folder = out / cell.name
        if cell_finished(folder):
            tell(cell.name, "skipped")
            continue
        total = cell.batch_size * cell.protocol.clients
        batch = batch_of(total)
        info = _prepare_cell(server, cell, batch, folder, plan, settings, o, basin_of(total))
        case = {**{k: v for k, v in settings.items() if k != "attack_configs"},
                "audit_cell": {k: v for k, v in info.items() if k != "settings"}, "images": batch.names}
        for attacker_id in info["attacker_names"]:
            attacker = Attacker.parse(attacker_id)
            for s in settings["seeds"]:
                run_dir = folder / run_name(attacker_id, s)
                if (run_dir / "metrics.json").is_file():
                    continue
                jobs.append(RunJob(
                    spec=spec, cell=cell, attacker=attacker, attack_config=plan.configs[attacker.attack], seed=s,
                    folder=str(run_dir), case=case, model_seed=o.model_seed, data=o.data,
                    data_root=str(o.data_root) if o.data_root else None, data_seed=o.data_seed,
                    defense_seed=info["defense_seed"], device=o.device, pairing=o.pairing,
                    time_budget=o.time_budget, fill_budget=o.fill_budget and o.time_budget is not None,
                    imprint_bins=o.imprint_bins, weights=None if o.weights is None else str(o.weights),
                    write_images=o.write_images,
                    progress=o.progress and o.backend == "local" and o.workers == 1))
        tell(cell.name, "running")
    return jobs


def run_audit(*, spec: ModelSpec, cells: Sequence[AuditCell], plan: AttackPlan, out: str | Path,
              options: AuditOptions | None = None, on_event: EventFn | None = None) -> list[dict[str, Any]]:
    """Run every attacker x seed of every cell into ``<out>/<cell.name>/<attacker id>-s<seed>/``; one row per cell.

    Each cell is attacked by every attack of ``plan`` under every assumption of
    ``options.knowledge`` (:func:`gradleak.audit.plan.attackers_for`), each with every seed; the
    row is the worst case over them (:func:`gradleak.audit.verdicts.worst_case`), and it reads
    "inconclusive" when a run was still improving at the end of its budget.

    Args:
        spec: the victim architecture; its weights come from ``build_model(spec, seed=model_seed)``, or
            from ``options.weights``.
        cells: the grid (:func:`gradleak.audit.plan.audit_grid`).
        plan: the attacks and their configs (:func:`gradleak.audit.plan.plan_attacks`).
        out: the audit folder.
        options: how it runs (:class:`AuditOptions`; default: its defaults).
        on_event: told ``(cell_name, "skipped" | "running" | "done")`` and each run's progress.

    Returns:
        One dict per cell: the cell's settings, ``epsilon``, ``utility`` and the worst case.

    Raises:
        ConfigError: a finished cell in ``out`` was made with other settings, or a bad value.
        UnsupportedModelError: DP-SGD on a victim with train-mode BatchNorm.
        GradleakError: runs failed in workers (each named).
    """
    o = options or AuditOptions()
    jobs = plan_runs(spec, cells, plan, out, o, on_event)
    errors = execute(run_job, [(j.id, j) for j in jobs], backend=o.backend, workers=o.workers, address=o.address,
                     num_cpus=o.num_cpus, num_gpus=o.num_gpus, tell=on_event, fail_fast=True)
    if errors:
        first = next(iter(errors))
        raise GradleakError(f"audit: {len(errors)} of {len(jobs)} runs failed, {first}: {errors[first]} "
                            "(finished runs are kept; the same call continues)")
    tell = on_event or (lambda name, status: None)
    for cell in {j.cell.name: j.cell for j in jobs}:
        tell(cell, "done")
    return with_undefended([load_row(Path(out) / cell.name) for cell in cells])


__all__ = ["AuditOptions", "RunJob", "cell_finished", "plan_runs", "run_attackers", "run_audit", "run_job", "victim"]
