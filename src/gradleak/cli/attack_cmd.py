"""``gradleak attack``: the server side. Reconstruct from an update file and the model state alone.

With ``--truth`` the run is scored (SSIM, FSIM, PSNR, LPIPS, label accuracy); the attack itself
never reads the truth (except the labels, with ``--labels given``). ``--resume RUN_DIR`` continues
an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from gradleak.attacks.checkpoint import Checkpointer
from gradleak.cli.common import add_attack, add_common, add_cuda_policy, attack_config, check_device, default_out
from gradleak.errors import CheckpointError, ConfigError
from gradleak.reporting import AttackRun, RunOptions, run_attack
from gradleak.threat import load_model_state, load_truth, load_update
from gradleak.types import ServerState


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("attack", help="server side: reconstruct the private batch from an update file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", type=Path, help="update file (safetensors) written by the client")
    p.add_argument("--model-state", type=Path, help="the server model's state file")
    p.add_argument("--truth", type=Path, default=None, help="the private batch, for scoring only")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue an interrupted run")
    add_attack(p)
    add_common(p)
    add_cuda_policy(p)
    return p


def attack_files(files: dict[str, Any], *, attack: str, config: Any, out: Path, give_labels: bool,
                 case: dict[str, Any], options: RunOptions) -> AttackRun:
    """Load the update, model state and (optional) truth files and run the attack."""
    model, spec = load_model_state(files["model_state"])
    update = load_update(files["update"], model=model)
    server = ServerState.from_spec(model, spec)
    truth_images = truth_labels = None
    if files.get("truth"):
        truth = load_truth(files["truth"], num_classes=server.num_classes)
        truth_images, truth_labels = truth.images, truth.labels
        if truth_images.shape[0] != update.num_samples:
            raise ConfigError(f"truth file: expected {update.num_samples} images (the update's batch size), "
                              f"got {truth_images.shape[0]}")
        if tuple(truth_images.shape[1:]) != tuple(server.input_shape):
            raise ConfigError(f"truth file: expected images of shape {tuple(server.input_shape)}, "
                              f"got {tuple(truth_images.shape[1:])}")
    case = {**case, "files": files}
    return run_attack(server, update, attack=attack, config=config, out=out, truth_images=truth_images,
                      truth_labels=truth_labels, give_labels=give_labels, case=case, options=options)


def read_record(path: Path, folder: str) -> Any:
    """The JSON a run recorded for ``--resume`` (``folder``: what the folder should be, for the error)."""
    if not path.is_file():
        raise CheckpointError(f"resume: expected {folder} with {path.name}, got '{path.parent}'")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume: '{path}' is not readable JSON ({str(e)[:80]})") from None


def resume_run(run_dir: Path, *, progress: bool) -> AttackRun:
    """Continue the run in ``run_dir`` with the settings its ``config.json`` recorded."""
    cfg_path = run_dir / "config.json"
    cfg = read_record(cfg_path, "a run folder")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("attack"), str) or "attack_config" not in cfg:
        raise CheckpointError(f"resume: '{cfg_path}': expected a run's config (attack, attack_config, case), "
                              "got something else")
    files = cfg.get("case", {}).get("files")
    if not files:
        raise CheckpointError(f"resume: '{cfg_path}' does not name the update and model-state files")
    if not Checkpointer(run_dir, 0).exists():
        raise CheckpointError(f"resume: '{run_dir}' holds config.json but no checkpoint (the run stopped before "
                              "its first checkpoint, or wrote numbers only); start it again with --force")
    policy = cfg["float32"] if isinstance(cfg.get("float32"), dict) else {}  # as the run computed
    options = RunOptions(device=cfg.get("device", "cpu"), seed=int(cfg.get("seed", 0)), resume=True, progress=progress,
                         pairing=cfg.get("pairing", "hungarian"), tf32=bool(policy.get("tf32")),
                         deterministic=bool(policy.get("deterministic")))
    return attack_files(files, attack=cfg["attack"], config=cfg["attack_config"], out=run_dir,
                        give_labels=cfg.get("labels") == "given", case=cfg.get("case", {}), options=options)


def run_options(args: argparse.Namespace) -> RunOptions:
    """A new run's :class:`RunOptions` from the flags ``attack`` and ``demo`` share."""
    return RunOptions(device=check_device(args.device), seed=args.seed, progress=not args.no_progress,
                      pairing=args.pairing, force=args.force, tf32=args.tf32, deterministic=args.deterministic)


def print_summary(result: AttackRun) -> None:
    s = result.summary

    def f(v: float | None, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    seconds = s.seconds or 0.0
    per = f" ({seconds / s.iterations:.2f} s per iteration on this machine)" if s.iterations else ""
    print(f"{s.attack}: {s.n_images} images, {s.iterations} iterations, {seconds:.1f} s{per}, "
          f"peak {f(s.peak_memory_mb, '.0f')} MB")
    if s.ssim_mean is not None:
        print(f"  SSIM {f(s.ssim_mean)} +- {f(s.ssim_std)}   FSIM {f(s.fsim_mean)}   PSNR {f(s.psnr_mean, '.2f')} dB   "
              f"LPIPS {f(s.lpips_mean)}   labels: {s.label_strategy} (accuracy {f(s.label_accuracy, '.2f')})")
    print(f"  run folder: {result.run_dir}  (report.html, grid.png, curves.png, metrics.json)")


def checkpoint_note(out: Path) -> str | None:
    """``checkpoint of iteration N in OUT``, or None where ``out`` holds no readable checkpoint."""
    iteration = Checkpointer(out, 0).iteration()
    return None if iteration is None else f"checkpoint of iteration {iteration} in {out}"


def finished_note(out: Path, folders: Iterable[Path], noun: str) -> str:
    """``N finished NOUNs kept in OUT``: how many of a grid's cell folders (audit cells, sweep trials)
    hold every run they ask for."""
    from gradleak.audit.engine import cell_finished

    done = sum(cell_finished(f) for f in folders)
    return f"{done} finished {noun}{'s' if done != 1 else ''} kept in {out}"


@contextlib.contextmanager
def resume_hint(command: str, out: Path, note: Callable[[Path], str | None] = checkpoint_note,
                how: str | None = None) -> Iterator[None]:
    """On Ctrl-C or SIGTERM, say what was kept (``note(out)``; None: no hint) and how to continue
    (default: ``gradleak COMMAND --resume OUT``)."""
    try:
        yield
    except KeyboardInterrupt:
        kept = note(out)
        if kept is not None:
            print(f"gradleak {command}: {kept}; continue with {how or f'gradleak {command} --resume {out}'}",
                  file=sys.stderr)
        raise


def run(args: argparse.Namespace) -> int:
    out = args.resume if args.resume is not None else (args.out or default_out("attack"))
    with resume_hint("attack", out):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    if args.resume is not None:
        result = resume_run(args.resume, progress=not args.no_progress)
        print_summary(result)
        return 0
    if args.update is None or args.model_state is None:
        raise ConfigError("attack: expected --update and --model-state (or --resume RUN_DIR)")
    if args.labels == "given" and args.truth is None:
        raise ConfigError("--labels given: expected --truth with the ground-truth labels")
    files = {"update": str(args.update), "model_state": str(args.model_state),
             "truth": str(args.truth) if args.truth else None}
    config = attack_config(args)  # first: --preset ATTACK:PRESET may name the attack
    result = attack_files(files, attack=args.attack, config=config, out=out,
                          give_labels=args.labels == "given", case={}, options=run_options(args))
    print_summary(result)
    return 0
