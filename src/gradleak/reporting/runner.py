"""Run one attack on one case and write the run folder.

The run folder holds ``config.json`` (fully resolved), ``metrics.json``, ``grid.png``,
``curves.png``, ``report.html``, ``reconstruction.safetensors`` and, while the attack runs, its
checkpoint. Ground truth is used here, for scoring and for the progress bar, never inside the attack.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import gradleak
from gradleak import attacks as attack_api
from gradleak.attacks.base import Progress
from gradleak.attacks.checkpoint import FILES as CHECKPOINT_FILES
from gradleak.attacks.checkpoint import Checkpointer
from gradleak.attacks.threat_model import run_threat_model
from gradleak.errors import ConfigError
from gradleak.hardware import float32_policy
from gradleak.metrics import score_reconstruction
from gradleak.metrics.image import ssim
from gradleak.metrics.pairing import pair_images
from gradleak.reporting.figures import save_curves, save_grid
from gradleak.reporting.html import write_report
from gradleak.reporting.memory import peak_memory_mb, reset_peak_memory
from gradleak.types import ClientUpdate, Reconstruction, ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How :func:`run_attack` runs and writes; the case, the attack and the truth are its other arguments.

    Attributes:
        device: where the attack runs.
        seed: the attack's seed.
        resume: continue from the checkpoint in the run folder.
        progress: show a progress bar.
        pairing: ``"hungarian"`` or ``"greedy"``.
        time_budget: stop the attack at the end of the first iteration past this many seconds
            (attacks that honour a callback's stop request; their ``log_every`` is set to 1).
        fill_budget: with ``time_budget``, size the iteration count to the budget first
            (:func:`fit_budget`), so that the attack's schedule completes in the time given; recorded
            as ``fitted_budget`` in config.json. Without it the config's own count stands, and the
            deadline may stop it part-way.
        write_images: ``False`` writes numbers only: no reconstruction file, no image grid, and the
            checkpoint (which can regenerate the images) is removed once the run is finished.
            Reconstructions of real client data are themselves sensitive.
        force: replace a run already in the folder (otherwise refused, :func:`check_out`).
        tf32: on CUDA, let matrix products and convolutions use TF32 (default off: the run computes
            the float32 it records, :func:`gradleak.hardware.float32_policy`); recorded as
            ``float32.tf32`` in config.json and ``tf32`` in the summary.
        deterministic: on CUDA, deterministic algorithms only, so that the run repeats bit for bit
            on the same GPU and versions (slower; an operation without a deterministic kernel
            raises); recorded as ``float32.deterministic`` and ``deterministic`` in the summary. A
            CPU run is bit-identical without it.
    """

    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    progress: bool = True
    pairing: str = "hungarian"
    time_budget: float | None = None
    fill_budget: bool = False
    write_images: bool = True
    force: bool = False
    tf32: bool = False
    deterministic: bool = False


@dataclass(frozen=True)
class RunSummary:
    """``metrics.json``'s ``summary``: what one run did and how close it got, typed.

    Scores are None where no ground truth was given (``note`` says so) and LPIPS is None where its
    weights are not installed (``lpips_note`` says why). :meth:`from_dict` reads a summary written
    by any version (missing keys are None, unknown ones ignored).
    """

    attack: str | None = None
    n_images: int | None = None
    iterations: int | None = None
    seconds: float | None = None
    wall_seconds: float | None = None
    progress_seconds: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_scope: str | None = None
    tf32: bool | None = None
    deterministic: bool | None = None
    label_strategy: str | None = None
    labels: str | None = None
    adaptive: bool | None = None
    seed: int | None = None
    defense: str | None = None
    threat_model: str | None = None
    pairing: str | None = None
    ssim_mean: float | None = None
    ssim_std: float | None = None
    psnr_mean: float | None = None
    psnr_std: float | None = None
    fsim_mean: float | None = None
    fsim_std: float | None = None
    lpips_mean: float | None = None
    lpips_std: float | None = None
    lpips_note: str | None = None
    label_accuracy: float | None = None
    note: str | None = None

    def score(self, metric: str) -> tuple[float | None, float | None]:
        """``(mean, std)`` of ``metric`` (ssim, psnr, fsim or lpips)."""
        return getattr(self, f"{metric}_mean"), getattr(self, f"{metric}_std")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RunSummary:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass(frozen=True)
class RunFolder:
    """A run folder's files (module docstring) and whether the run in it finished."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def reconstruction(self) -> Path:
        return self.path / "reconstruction.safetensors"

    @property
    def progress(self) -> Path:
        return self.path / "progress.json"

    def finished(self) -> bool:
        """The run ended and wrote its metrics (a run stopped part-way has a checkpoint instead)."""
        return self.metrics.is_file()

    def has_checkpoint(self) -> bool:
        return Checkpointer(self.path, 0).exists()

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text())

    def summary(self) -> RunSummary:
        return RunSummary.from_dict(self.read_metrics()["summary"])


@dataclass(frozen=True)
class AttackRun:
    """The outcome of :func:`run_attack`."""

    run_dir: Path
    reconstruction: Reconstruction
    metrics: dict[str, Any]

    @property
    def summary(self) -> RunSummary:
        return RunSummary.from_dict(self.metrics["summary"])


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if torch.is_tensor(obj):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_jsonable))


class _ProgressBar:
    """tqdm bar with the current loss and, when the truth is known, the mean SSIM (Hungarian).

    Scoring a report pairs N x N images; at large N that costs more than the attack's steps, so a
    report is scored only while scoring has taken at most ``score_share`` of the time so far (the
    SSIM curve gets sparser, the attack is not slowed by more than that share).
    """

    score_share = 0.1

    def __init__(self, total: int, start: int, truth: torch.Tensor | None, enabled: bool,
                 time_budget: float | None = None, record: Path | None = None) -> None:
        self.record = record  # progress.json: the SSIM points, kept across resumes
        self.deadline = None if time_budget is None else time.perf_counter() + time_budget
        self.truth = truth
        self.total, self.enabled = total, enabled
        self.bar: Any = None  # opened at the first report, so errors before it print alone
        self.last = start
        self.ssim_iteration: list[int] = []
        self.ssim: list[float] = []
        self.spent = 0.0  # seconds spent here (scoring, drawing): not the attack's time
        self.started = time.perf_counter()

    def __call__(self, p: Progress) -> bool:
        start = time.perf_counter()
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.last, disable=not self.enabled, desc="attack",
                            unit="it", leave=True)
        post: dict[str, str] = {"loss": f"{p.loss:.3e}"}
        elapsed = start - self.started
        affordable = self.spent <= self.score_share * max(elapsed - self.spent, 0.0) or not self.ssim
        if self.truth is not None and p.images.shape == self.truth.shape and affordable:
            imgs = p.images.detach().cpu()
            order = pair_images(imgs, self.truth)
            value = float(ssim(imgs[order], self.truth).mean())
            self.ssim_iteration.append(p.iteration)
            self.ssim.append(value)
            post["ssim"] = f"{value:.3f}"
            if self.record is not None:
                write_json(self.record, {"ssim_iteration": self.ssim_iteration, "ssim": self.ssim})
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(p.iteration - self.last)
        self.last = p.iteration
        self.spent += time.perf_counter() - start
        return self.deadline is not None and time.perf_counter() > self.deadline

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


RUN_FILES = ("config.json", "metrics.json", *CHECKPOINT_FILES,
             "reconstruction.safetensors", "report.html", "grid.png", "curves.png", "progress.json")
"""The files a run folder holds (what :func:`check_out` looks for and ``force`` replaces)."""


def _check_inputs(att: attack_api.Attack, server: ServerState, update: ClientUpdate,
                  truth_images: torch.Tensor | None, truth_labels: torch.Tensor | None) -> None:
    """Everything a run needs checked before it writes anything: the update against the model, the truth's size."""
    att.check(server, update)
    want = (update.num_samples, *server.input_shape)
    if truth_images is not None and tuple(truth_images.shape) != want:
        raise ConfigError(f"truth images: expected shape {want}, got {tuple(truth_images.shape)}")
    if truth_labels is not None and truth_labels.numel() != update.num_samples:
        raise ConfigError(f"truth labels: expected {update.num_samples} (the update's batch size), got "
                          f"{truth_labels.numel()}")


def _write_pictures(run_dir: Path, metrics: dict[str, Any], rec: Reconstruction, truth_images: torch.Tensor | None,
                    truth_labels: torch.Tensor | None, pairs: list[int] | None, *, write_images: bool) -> None:
    """grid.png (with ``write_images``), curves.png and report.html; pairs align truth and reconstruction."""
    order = torch.tensor(pairs) if pairs is not None else None
    paired = rec.images[order] if order is not None else None
    truth = truth_images.cpu() if truth_images is not None and paired is not None else None
    if write_images:
        save_grid(run_dir / "grid.png", truth, paired if paired is not None else rec.images)
    save_curves(run_dir / "curves.png", metrics["history"])
    write_report(run_dir, config=json.loads((run_dir / "config.json").read_text()), metrics=metrics,
                 truth=truth, recon=paired,
                 truth_labels=truth_labels.tolist() if truth_labels is not None and paired is not None else None,
                 recon_labels=rec.labels[order].tolist() if order is not None else None)


def _progress_before(path: Path, iteration: int) -> tuple[list[int], list[float]]:
    """The SSIM points recorded up to the checkpoint's ``iteration`` (a resumed run keeps its curve)."""
    try:
        doc = json.loads(path.read_text())
        pairs = [(int(i), float(v)) for i, v in zip(doc["ssim_iteration"], doc["ssim"], strict=True) if i <= iteration]
    except (OSError, ValueError, KeyError, TypeError):
        return [], []
    return [i for i, _ in pairs], [v for _, v in pairs]


def _remove_written(run_dir: Path, created: bool) -> None:
    """After a failure before any checkpoint: remove the folder if this call made it, else only run files."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def check_out(out: str | Path, *, resume: bool = False, force: bool = False) -> None:
    """Refuse an output folder that is a file, is not writable, or holds a run, unless asked.

    Args:
        out: the run folder to write.
        resume: the call continues the run in ``out``.
        force: the call may replace the run in ``out``.

    Raises:
        ConfigError: naming the folder and what to do.
    """
    out = Path(out)
    check_folder(out)
    held = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if held and not (resume or force):
        raise ConfigError(f"output folder '{out}' holds a run ({', '.join(held[:3])}); expected a new folder, "
                          "or resume it (--resume) or replace it (--force)")


def check_folder(out: str | Path) -> None:
    """Refuse an output folder that is a file or cannot be created or written (a read-only place, ``/proc``).

    The nearest existing folder above ``out`` is probed by making and removing an empty folder in
    it, so pseudo file systems that refuse new entries even to root are caught before anything runs.

    Raises:
        ConfigError: naming the folder and what is wrong.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder '{out}': expected a folder, got an existing file")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder '{out}': expected a writable place, got '{parent}' (not writable)")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".gradleak-probe-", dir=parent))
    except OSError as e:
        raise ConfigError(f"output folder '{out}': expected a place where folders can be made, got '{parent}' "
                          f"({e.strerror or e})") from None
    probe.rmdir()


PROBE_ITERATIONS = 8
"""Iterations of the probe that sizes a wall-clock budget (:func:`fit_budget`)."""

PROBE_WARMUP = 3
"""The probe's first iterations, left out of the time per iteration: they pay the setup (label
recovery, the generator, and on a GPU the kernels' first launches and cuDNN's algorithm search),
which on a GPU took 3x the time of the steps themselves (an H200, 2026-12-04: a 75 s budget at
batch 64 was sized to 264 iterations that ran in 24 s)."""


def fit_budget(att: attack_api.Attack, server: ServerState, update: ClientUpdate, labels: torch.Tensor | None,
               seconds: float) -> tuple[Any, dict[str, Any]]:
    """The attack's config with the iteration count that fills ``seconds``, and how it was found.

    A probe of :data:`PROBE_ITERATIONS` iterations reports every iteration; the time per iteration
    is read after its first :data:`PROBE_WARMUP` (a loss reading each iteration syncs the device, so
    the estimate errs short), and the setup (the rest of the probe's time) is paid again by the run.
    The budget left after the probe and the setup buys the iteration count. The attack then runs a
    whole schedule (learning-rate decays at fractions of the run, restarts, stages) in the time
    given, instead of stopping a long schedule part-way or a short one early. The deadline still
    stops the run at the budget's end.
    """
    cls = type(att)
    probe_fields = cls.budget(PROBE_ITERATIONS, att.config)
    if not probe_fields or not cls.iterative:
        return att.config, {}
    if "log_every" in {f.name for f in fields(att.config)}:
        probe_fields = {**probe_fields, "log_every": 1}
    probe = attack_api.create(cls.name, replace(att.config, **probe_fields), device=att.device, seed=att.seed)
    stamps: list[tuple[int, float]] = []

    def stamp(p: attack_api.Progress) -> None:
        stamps.append((p.iteration, time.perf_counter()))

    t0 = time.perf_counter()
    probe.reconstruct(server, update, labels=labels, callback=stamp)
    spent = time.perf_counter() - t0
    timed = [s for s in stamps if s[0] >= PROBE_WARMUP]
    if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
        per_iteration = (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0])
    else:  # an attack that reports no progress: the whole probe, setup included (errs short)
        per_iteration = spent / PROBE_ITERATIONS
    setup = max(0.0, spent - per_iteration * PROBE_ITERATIONS)
    iterations = max(PROBE_ITERATIONS, int(max(seconds - spent - setup, 0.0) / max(per_iteration, 1e-9)))
    info = {"seconds": seconds, "probe_iterations": PROBE_ITERATIONS, "probe_seconds": spent,
            "setup_seconds": setup, "seconds_per_iteration": per_iteration, "iterations": iterations}
    return replace(att.config, **cls.budget(iterations, att.config)), info


def _fitted_before(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A resumed run's fitted budget and config (from its config.json), so the resume continues the same schedule."""
    try:
        doc = json.loads((run_dir / "config.json").read_text())
        fitted, config = doc["fitted_budget"], doc["attack_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (fitted, config) if isinstance(fitted, dict) and fitted and isinstance(config, dict) else None


def run_attack(server: ServerState, update: ClientUpdate, *, attack: str, config: Any, out: str | Path,
               truth_images: torch.Tensor | None = None, truth_labels: torch.Tensor | None = None,
               give_labels: bool = False, case: dict[str, Any] | None = None,
               options: RunOptions = RunOptions()) -> AttackRun:
    """Run ``attack`` on ``update`` and write the run folder ``out``.

    Args:
        server: the model the update was computed on.
        update: the client's update.
        attack: registered attack name.
        config: the attack's config (dataclass or dict).
        out: the run folder.
        truth_images: the private images, for scoring only (never passed to the attack).
        truth_labels: the private labels, for scoring label recovery; handed to the attack only
            with ``give_labels=True``.
        give_labels: use the ground-truth labels instead of recovering them.
        case: a description of the case, recorded in ``config.json``.
        options: how the run runs and writes (:class:`RunOptions`: device, seed, resume, budget,
            precision, ...).

    Everything is validated (the folder, the config, the update against the model, the truth)
    before anything is written. If the attack then fails before its first checkpoint, what this
    call wrote is removed, and only that; a run with a checkpoint is kept, to be resumed.

    Returns:
        The run folder, the reconstruction and the metrics (``.summary``: a :class:`RunSummary`).
    """
    o = options
    if give_labels and truth_labels is None:
        raise ConfigError("labels 'given': expected the ground-truth labels (a truth file), got none")
    folder = RunFolder(Path(out))
    run_dir = folder.path
    check_out(run_dir, resume=o.resume, force=o.force)
    dev = torch.device(o.device)
    att = attack_api.create(attack, config, device=dev, seed=o.seed)
    _check_inputs(att, server, update, truth_images, truth_labels)
    created = not run_dir.exists()
    if o.force and not o.resume:
        _remove_written(run_dir, created=False)  # the run being replaced: its run files only
    run_dir.mkdir(parents=True, exist_ok=True)
    memory_scope = reset_peak_memory(dev)
    given = truth_labels if give_labels else None
    try:
        fitted, time_budget = _fitted(att, folder, server, update, given, o)
    except Exception:
        _remove_written(run_dir, created)
        raise
    if time_budget is not None and hasattr(att.config, "log_every"):
        # the deadline is checked at progress reports: report every step, so that no attack overruns
        # the budget by more than one iteration (scoring stays capped by _ProgressBar.score_share)
        att.config = replace(att.config, log_every=1)
    cuda = dev.type == "cuda"
    config_doc = {
        "attack": attack, "attack_config": att.config, "seed": o.seed, "device": str(dev),
        "labels": "given" if give_labels else "recovered", "pairing": o.pairing, "case": case or {},
        "fitted_budget": fitted,
        "float32": {"tf32": o.tf32 if cuda else None, "deterministic": o.deterministic if cuda else None},
        "update": update.meta_dict(),
        "versions": {"gradleak": gradleak.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    write_json(folder.config, config_doc)

    saved = Checkpointer(run_dir, 0).meta() if o.resume else None  # None: unreadable, the attack's restore says why
    if saved is not None and time_budget is not None:
        # a wall-clock budget is the whole run's: the resumed part gets what the checkpoint had left
        before = saved.get("elapsed", 0.0)
        if isinstance(before, (int, float)):
            time_budget = max(0.0, time_budget - float(before))
    bar = _ProgressBar(int(getattr(att.config, "iterations", 0)), 0,
                       truth_images.cpu() if truth_images is not None else None, o.progress, time_budget,
                       record=folder.progress)
    if saved is not None:
        start = saved.get("iteration")
        bar.last = start if isinstance(start, int) else 0
        bar.ssim_iteration, bar.ssim = _progress_before(folder.progress, bar.last)
    t0 = time.perf_counter()
    caught: list[warnings.WarningMessage] = []
    try:
        policy = float32_policy(dev, tf32=o.tf32, deterministic=o.deterministic)
        with warnings.catch_warnings(record=True) as caught, policy:
            warnings.simplefilter("always")  # the warnings are recorded in metrics.json, and shown below
            rec = att.reconstruct(server, update, labels=given, callback=bar, run_dir=run_dir, resume=o.resume)
    except Exception:
        if not o.resume and not folder.has_checkpoint():
            _remove_written(run_dir, created)
        raise
    finally:
        bar.close()
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    wall = time.perf_counter() - t0
    if o.write_images:
        save_file({"images": rec.images.contiguous(), "labels": rec.labels.contiguous()}, str(folder.reconstruction))
    else:
        for name in CHECKPOINT_FILES:
            (run_dir / name).unlink(missing_ok=True)

    history: dict[str, list[Any]] = dict(rec.history)
    if bar.ssim:
        history["ssim_iteration"], history["ssim"] = bar.ssim_iteration, bar.ssim
    scores: dict[str, Any] = {"n_images": int(rec.images.shape[0]), "note": "no ground truth given: nothing scored"}
    per_image: list[dict[str, Any]] = []
    pairs: list[int] | None = None
    if truth_images is not None:
        scored = score_reconstruction(rec.images, truth_images.cpu(), recon_labels=rec.labels,
                                      truth_labels=truth_labels, pairing=o.pairing)
        scores, per_image, pairs = scored.summary, scored.per_image, scored.pairing
    threat = run_threat_model(att.knowledge, update, rec.info, bn_mode=server.bn_mode, labels=config_doc["labels"])
    summary = RunSummary.from_dict({
        **scores, "attack": attack, "label_strategy": rec.label_strategy, "labels": config_doc["labels"],
        "adaptive": bool((rec.info.get("adaptive") or {}).get("active")), "seed": o.seed,
        "defense": (rec.info.get("adaptive") or {}).get("defense") or ("+".join(update.defenses) or "none"),
        "iterations": rec.iterations, "seconds": (rec.seconds or wall) - bar.spent,
        "wall_seconds": wall, "progress_seconds": bar.spent, "peak_memory_mb": peak_memory_mb(dev),
        "peak_memory_scope": memory_scope, **config_doc["float32"],
        "threat_model": threat["sok"]})
    noted = [*(str(a) for a in update.metadata.get("assumptions") or []), *(str(w.message) for w in caught)]
    metrics = {"summary": summary.to_dict(), "threat_model": threat, "warnings": list(dict.fromkeys(noted)),
               "per_image": per_image, "history": history,
               "info": {**rec.outcome(), **{k: v for k, v in rec.info.items() if k != "config"}}}
    write_json(folder.metrics, metrics)
    _write_pictures(run_dir, metrics, rec, truth_images, truth_labels, pairs, write_images=o.write_images)
    log.info("run folder: %s", run_dir)
    return AttackRun(run_dir=run_dir, reconstruction=rec, metrics=metrics)


def _fitted(att: attack_api.Attack, folder: RunFolder, server: ServerState, update: ClientUpdate,
            labels: torch.Tensor | None, o: RunOptions) -> tuple[dict[str, Any], float | None]:
    """With ``fill_budget``: the iteration count that fills the time budget (set on ``att.config``;
    a resume keeps the count its run recorded), how it was found, and the budget the probe left."""
    if not (o.fill_budget and o.time_budget is not None):
        return {}, o.time_budget
    before = _fitted_before(folder.path) if o.resume else None
    if before is not None:
        att.config = replace(att.config, **type(att).budget(int(before[0]["iterations"]), att.config))
        return before[0], o.time_budget
    with float32_policy(att.device, tf32=o.tf32, deterministic=o.deterministic):  # the probe computes as the run
        att.config, fitted = fit_budget(att, server, update, labels, o.time_budget)
    return fitted, max(0.0, o.time_budget - float(fitted.get("probe_seconds", 0.0)))
