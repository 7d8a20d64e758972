"""Compare attacks on one identical update: the paper's Table 4 on the user's own case.

Each attack runs into ``<out>/<attack>/`` (a full run folder), on the same update, with the same
iteration budget (``iterations``) or the same wall-clock budget (``seconds``: each attack first sizes
its iteration count to the budget with a short probe, so that its schedule completes in the time
given, and stops at the end of its first iteration past the budget; with ``iterations`` too, that
count stands). The table (Markdown and CSV) has one row per attack:
mean +- std of SSIM, FSIM, PSNR and LPIPS, label accuracy, seconds and peak memory; ``grid.png``
shows the ground truth over one row per attack.

With ``resume=True`` the comparison continues in ``out``: an attack whose run folder holds its
``metrics.json`` is read back, one with a checkpoint resumes from it (a wall-clock budget gets what
the checkpoint had left), and one that had not started runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gradleak.attacks import ATTACKS
from gradleak.attacks.base import resolve_config
from gradleak.attacks.checkpoint import Checkpointer
from gradleak.errors import ConfigError
from gradleak.reporting.figures import subplots
from gradleak.reporting.runner import RunFolder, RunOptions, RunSummary, run_attack
from gradleak.reporting.tables import cell, write_csv, write_markdown
from gradleak.types import ClientUpdate, ServerState

COLUMNS = [("SSIM", "ssim", 3), ("FSIM", "fsim", 3), ("PSNR", "psnr", 2), ("LPIPS", "lpips", 3)]


def _pm(s: RunSummary, key: str, digits: int) -> str:
    mean, std = s.score(key)
    if mean is None or std is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def compare_attacks(server: ServerState, update: ClientUpdate, *, attacks: list[str], out: str | Path,
                    truth_images: torch.Tensor, truth_labels: torch.Tensor, iterations: int | None = None,
                    seconds: float | None = None, presets: dict[str, str] | None = None,
                    overrides: dict[str, dict[str, Any]] | None = None, give_labels: bool = False,
                    case: dict[str, Any] | None = None, device: str = "cpu", seed: int = 0,
                    progress: bool = True, force: bool = False, resume: bool = False) -> list[RunSummary]:
    """Run every attack in ``attacks`` on ``update`` and write ``table.md``, ``table.csv``, ``grid.png``.

    Returns:
        One :class:`~gradleak.reporting.runner.RunSummary` per attack (its ``metrics.json``'s ``summary``).
    """
    if not attacks:
        raise ConfigError("compare: expected at least one attack, got none")
    for a in attacks:
        ATTACKS.get(a)  # unknown names fail before anything runs
    out = Path(out)
    rows, recons = [], []
    for name in attacks:
        cls = ATTACKS.get(name)
        budget = iterations if iterations is not None and cls.budget(1, cls.Config()) else None  # analytic has none
        cfg = resolve_config(name, iterations=budget, preset=(presets or {}).get(name),
                             overrides=(overrides or {}).get(name))
        run = RunFolder(out / name)
        run_dir = run.path
        if resume and run.finished() and run.reconstruction.is_file():
            metrics = run.read_metrics()
            images = load_file(str(run.reconstruction))["images"]
        else:
            result = run_attack(server, update, attack=name, config=cfg, out=run_dir, truth_images=truth_images,
                                truth_labels=truth_labels, give_labels=give_labels,
                                case={**(case or {}), "compare": attacks,
                                      "budget": {"iterations": iterations, "seconds": seconds}},
                                options=RunOptions(
                                    device=device, seed=seed, progress=progress, time_budget=seconds,
                                    fill_budget=iterations is None,
                                    resume=resume and Checkpointer(run_dir, 0).iteration() is not None,
                                    force=force or resume))  # resume: the comparison's own folder
            metrics, images = result.metrics, result.reconstruction.images
        rows.append(RunSummary.from_dict(metrics["summary"]))
        pairs = torch.tensor([p["reconstruction"] for p in metrics["per_image"]])
        recons.append(images[pairs])
    write_table(out, rows)
    _grid(out / "grid.png", truth_images, recons, attacks)
    return rows


def write_table(out: Path, rows: list[RunSummary]) -> None:
    """``table.md`` (Table 4 layout) and ``table.csv`` from per-attack summaries."""
    head = ["attack"] + [c[0] for c in COLUMNS] + ["label acc.", "labels", "iterations", "seconds", "peak MB"]
    body = [[s.attack] + [_pm(s, key, d) for _, key, d in COLUMNS] + [
        cell(s.label_accuracy, 2), str(s.label_strategy), str(s.iterations),
        cell(s.seconds, 1), cell(s.peak_memory_mb, 0)] for s in rows]
    note = next((s.lpips_note for s in rows if s.lpips_note), None)
    write_markdown(out / "table.md", head, body, notes=[f"LPIPS: {note}"] if note else ())
    keys = ["attack", "ssim_mean", "ssim_std", "fsim_mean", "fsim_std", "psnr_mean", "psnr_std", "lpips_mean",
            "lpips_std", "label_accuracy", "label_strategy", "iterations", "seconds", "peak_memory_mb"]
    write_csv(out / "table.csv", keys, [r.to_dict() for r in rows])


def _grid(path: Path, truth: torch.Tensor, recons: list[torch.Tensor], names: list[str]) -> None:
    n = min(truth.shape[0], 16)
    fig, axes = subplots(1 + len(recons), n, figsize=(n * 0.9 + 1.2, (1 + len(recons)) * 0.95), squeeze=False)
    for r, (label, imgs) in enumerate([("truth", truth)] + list(zip(names, recons))):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(imgs[i].detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
