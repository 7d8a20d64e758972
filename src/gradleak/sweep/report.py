"""Gather a sweep's trials into one table and a short report.

``table.md`` / ``table.csv``: one row per trial (attack, protocol, batch size, defense, seeds, SSIM,
PSNR, LPIPS, label accuracy, epsilon, seconds, status). ``report.md``: what ran where, the mean over
seeds of every (attack, protocol, batch size, defense) group with its verdict, the most and least
leaking trials, and ``ssim_vs_batch.png`` (mean SSIM against batch size, one line per attack,
protocol and defense). ``sweep.json`` holds the resolved grid and the rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradleak.audit.engine import cell_finished
from gradleak.audit.verdicts import load_row, verdict
from gradleak.reporting.runner import write_json
from gradleak.reporting.tables import cell, write_csv, write_markdown

if TYPE_CHECKING:
    from gradleak.sweep.runner import SweepGrid, Trial

TABLE_KEYS = ["trial", "status", "attack", "protocol", "batch_size", "defense", "seed", "data_seed", "ssim_mean",
              "ssim_std", "psnr_mean", "psnr_std", "lpips_mean", "fsim_mean", "label_accuracy", "label_strategy",
              "epsilon", "utility_accuracy", "iterations", "seconds", "error"]


def trial_row(folder: Path, trial: Trial) -> dict[str, Any]:
    """The table row of a finished trial folder."""
    row = load_row(folder)
    utility = row.get("utility") or {}
    return {**row, "trial": trial.id, "status": "done", "attack": trial.attack.tag, "attack_name": trial.attack.name,
            "protocol": trial.cell.protocol.tag(), "seed": trial.seed, "data_seed": trial.data_seed,
            "utility_accuracy": utility.get("accuracy"), "folder": str(folder)}


def gather(out: Path, trials: Sequence[Trial], errors: dict[str, str],
           folder_of: Callable[[Path, Trial], Path]) -> list[dict[str, Any]]:
    """One row per trial in grid order: finished, failed (with its error), or not run yet."""
    rows = []
    for t in trials:
        folder = folder_of(out, t)
        if cell_finished(folder):
            rows.append(trial_row(folder, t))
        else:
            rows.append({"trial": t.id, "status": "failed" if t.id in errors else "missing", "attack": t.attack.tag,
                         "attack_name": t.attack.name, "protocol": t.cell.protocol.tag(),
                         "batch_size": t.cell.batch_size, "defense": t.cell.defense, "seed": t.seed,
                         "data_seed": t.data_seed, "error": errors.get(t.id), "folder": str(folder)})
    return rows




def write_table(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``table.md`` and ``table.csv``: one row per trial."""
    write_csv(out / "table.csv", TABLE_KEYS, rows)
    head = ["trial", "status", "attack", "protocol", "N", "defense", "seed", "data seed", "SSIM", "PSNR", "LPIPS",
            "label acc.", "ε", "seconds"]
    body = [[r["trial"], r["status"], r["attack"], r["protocol"], str(r["batch_size"]), r["defense"], str(r["seed"]),
             str(r["data_seed"]), cell(r.get("ssim_mean")), cell(r.get("psnr_mean"), 2), cell(r.get("lpips_mean")),
             cell(r.get("label_accuracy"), 2), cell(r.get("epsilon"), 3), cell(r.get("seconds"), 1)] for r in rows]
    write_markdown(out / "table.md", head, body)


def group_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and range) over seeds and data seeds of each (attack, protocol, batch size, defense)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault((r["attack"], r["protocol"], r["batch_size"], r["defense"]), []).append(r)
    out = []
    for (attack, protocol, n, defense), members in groups.items():
        ssim = [m["ssim_mean"] for m in members if m.get("ssim_mean") is not None]
        psnr = [m["psnr_mean"] for m in members if m.get("psnr_mean") is not None]
        acc = [m["label_accuracy"] for m in members if m.get("label_accuracy") is not None]
        g = {"attack": attack, "protocol": protocol, "batch_size": n, "defense": defense, "trials": len(members),
             "ssim_mean": statistics.fmean(ssim) if ssim else None, "ssim_min": min(ssim, default=None),
             "ssim_max": max(ssim, default=None), "psnr_mean": statistics.fmean(psnr) if psnr else None,
             "label_accuracy": statistics.fmean(acc) if acc else None}
        g["verdict"] = verdict(g)
        out.append(g)
    return out


def _plot(path: Path, groups: Sequence[dict[str, Any]]) -> bool:
    from gradleak.reporting.figures import subplots

    lines: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        if g["ssim_mean"] is not None:
            lines.setdefault(f"{g['attack']} {g['protocol']} {g['defense']}", []).append((g["batch_size"], g["ssim_mean"]))
    if not lines:
        return False
    fig, ax = subplots(figsize=(5.5, 3.6))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per client (N)")
    ax.set_ylabel("mean SSIM over seeds")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_sweep_report(out: Path, rows: Sequence[dict[str, Any]], *, grid: SweepGrid, backend: str, ran: int,
                       seconds: float) -> None:
    """``table.md``, ``table.csv``, ``report.md``, ``ssim_vs_batch.png`` and ``sweep.json`` in ``out``."""
    write_table(out, rows)
    groups = group_rows(rows)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    lines = [f"# Sweep: {grid.name}", "",
             f"Victim `{grid.model.name}` ({grid.model.activation}, BN {grid.model.bn_mode}, {grid.model.image_size} px, "
             f"{grid.model.num_classes} classes, seed {grid.model_seed}); data `{grid.data}`; labels {grid.labels}.",
             f"{len(rows)} trials: {len(done)} done, {len(failed)} failed, {len(rows) - len(done) - len(failed)} missing. "
             f"This run: {ran} trials on the `{backend}` backend in {seconds:.1f} s "
             f"({grid.num_cpus:g} CPU, {grid.num_gpus:g} GPU per trial).", ""]
    if groups:
        lines += ["## Mean over seeds", "",
                  "| attack | protocol | N | defense | trials | SSIM mean (min–max) | PSNR | label acc. | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g in groups:
            rng = "" if g["ssim_min"] is None else f" ({g['ssim_min']:.3f}–{g['ssim_max']:.3f})"
            lines.append(f"| {g['attack']} | {g['protocol']} | {g['batch_size']} | {g['defense']} | {g['trials']} | "
                         f"{cell(g['ssim_mean'])}{rng} | {cell(g['psnr_mean'], 2)} | {cell(g['label_accuracy'], 2)} | "
                         f"{g['verdict']} |")
        lines.append("")
    scored = [r for r in done if r.get("ssim_mean") is not None]
    if scored:
        best = max(scored, key=lambda r: r["ssim_mean"])
        worst = min(scored, key=lambda r: r["ssim_mean"])
        lines += [f"Most leaking trial: `{best['trial']}` (SSIM {best['ssim_mean']:.3f}; "
                  f"`trials/{best['trial']}/grid.png`).",
                  f"Least leaking trial: `{worst['trial']}` (SSIM {worst['ssim_mean']:.3f}).", ""]
    if _plot(out / "ssim_vs_batch.png", groups):
        lines += ["![mean SSIM against batch size](ssim_vs_batch.png)", ""]
    if failed:
        lines += ["## Failed trials", ""] + [f"- `{r['trial']}`: {r['error']}" for r in failed] + [""]
    lines += ["Every trial's folder under `trials/` is a full run folder (`metrics.json`, `grid.png`, `report.html`);",
              "`table.md` / `table.csv` list all trials. Re-running the same command skips finished trials."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "sweep.json", {"grid": grid.to_dict(), "backend": backend, "rows": list(rows)})
