"""The audit's report: table rows, verdicts, plots, example grids and ``report.html``.

:func:`write_audit_report` turns the rows of :func:`gradleak.audit.run_audit` (one per
cell, read back with :func:`gradleak.audit.verdicts.load_row`) into ``audit.md``, ``audit.csv``, ``ssim_vs_defense.png``,
``psnr_vs_defense.png``, ``ssim_vs_batch.png``, ``examples.png`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradleak.audit.verdicts import PARTIAL_SSIM, RECOGNISABLE_SSIM, describe_attacker, verdict
from gradleak.errors import ConfigError
from gradleak.reporting.tables import write_csv, write_markdown

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# The report: table, plots, examples and the page an FL engineer reads.

def _loss_cost(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> float | None:
    base = next((r for r in rows if r["defense_spec"] == "none" and r["batch_size"] == row["batch_size"]
                 and r["protocol_tag"] == row["protocol_tag"]), None)
    if base is None or not row.get("utility") or not base.get("utility"):
        return None
    return float(row["utility"]["loss"] - base["utility"]["loss"])


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _eps(row: dict[str, Any]) -> str:
    if not row.get("dp"):
        return "—"
    return "inf" if row.get("epsilon") is None else f"{row['epsilon']:.3g}"


KNOWLEDGE_COLUMNS = (("labels-recovered", "SSIM labels recovered"), ("labels-known", "SSIM labels known"),
                     ("defense-unaware", "SSIM defense-unaware"), ("defense-aware", "SSIM defense-aware"))
"""The best mean SSIM under each assumption (``row["by_knowledge"]``), one column each."""


MALICIOUS_COLUMN = ("server-malicious", "SSIM malicious server")
"""Shown when the audit also played a malicious server (``--threat malicious``)."""

FEATURES_COLUMN = ("features-used", "SSIM with last-layer features")
"""Shown when some attacker used the last-layer features recovered from the update."""

CENTER_COLUMN = ("center-used", "SSIM centred")
"""Shown when some attacker matched centred (a victim with a flat landscape)."""


def _columns(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    malicious = any("server-malicious" in (r.get("by_knowledge") or {}) for r in rows)
    features = any("features-used" in (r.get("by_knowledge") or {}) for r in rows)
    centred = any("center-used" in (r.get("by_knowledge") or {}) for r in rows)
    return (KNOWLEDGE_COLUMNS + ((FEATURES_COLUMN,) if features else ()) + ((CENTER_COLUMN,) if centred else ())
            + ((MALICIOUS_COLUMN,) if malicious else ()))


def _knowledge_ssim(row: dict[str, Any], key: str) -> str:
    value = (row.get("by_knowledge") or {}).get(key)
    if value is not None:
        return f"{value:.3f}"
    if key.startswith("defense") and not row.get("defended"):
        return "no defense"
    return "not tried"


def _ci(row: dict[str, Any]) -> str:
    mean, ci = row.get("ssim_mean"), row.get("ssim_ci")
    if mean is None:
        return "n/a"
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{mean:.3f}"


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The audit table as a header and one list of cell texts per row (Markdown and HTML share it)."""
    steps = next((r["utility"]["steps"] for r in rows if r.get("utility")), None)
    many = len({r["protocol_tag"] for r in rows}) > 1
    head = (["protocol"] if many else []) + [
        "batch", "defense", "ε", *(title for _, title in _columns(rows)), "worst case by",
        "worst-case SSIM [95% CI]", "best image",
        f"recognisable (≥{RECOGNISABLE_SSIM})", "PSNR", "label acc."]
    if steps is not None:
        head += [f"loss after {steps}", f"acc. after {steps}", "loss cost"]
    head += ["seconds", "verdict"]
    body = []
    for r in rows:
        acc, frac, best = r.get("label_accuracy"), r.get("recognisable_fraction"), r.get("ssim_worst_image")
        cells = ([r["protocol_tag"]] if many else []) + [
            str(r["batch_size"]), r["defense"], _eps(r), *(_knowledge_ssim(r, key) for key, _ in _columns(rows)),
            describe_attacker(r["verdict_attacker"]) if r.get("verdict_attacker") else "n/a", _ci(r), "n/a" if best is None else f"{best:.3f}", "n/a" if frac is None else f"{frac:.2f}",
            _pm(r, "psnr", 2), "n/a" if acc is None else f"{acc:.2f}"]
        if steps is not None:
            u, cost = r.get("utility"), _loss_cost(r, rows)
            cells += ["n/a", "n/a"] if not u else [f"{u['loss']:.3f}", f"{u['accuracy']:.2f}"]
            cells.append("baseline" if r["defense_spec"] == "none" and u else "n/a" if cost is None else f"{round(cost, 3) + 0.0:+.3f}")
        cells += [f"{r['seconds']:.1f}", verdict(r)]
        body.append(cells)
    return head, body


CSV_KEYS = ["cell", "protocol", "local_steps", "local_lr", "clients", "batch_size", "defense", "defense_spec",
            "epsilon", "delta", "ssim_mean", "ssim_std", "ssim_ci_low", "ssim_ci_high", "ssim_worst_image",
            "recognisable_fraction", "verdict_attacker", "ssim_labels_recovered", "ssim_labels_known",
            "ssim_defense_unaware", "ssim_defense_aware", "ssim_features_used", "ssim_center_used", "ssim_server_malicious", "inconclusive", "still_improving_per_100", "fsim_mean", "fsim_std",
            "psnr_mean", "psnr_std", "lpips_mean", "lpips_std", "label_accuracy", "label_strategy", "seeds",
            "utility_steps", "utility_loss", "utility_accuracy", "utility_loss_cost", "iterations", "seconds",
            "not_tried", "verdict"]


def _series(rows: Sequence[dict[str, Any]], by: str) -> dict[str, list[dict[str, Any]]]:
    many = len({r["protocol_tag"] for r in rows}) > 1
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = f"N={r['batch_size']}" if by == "batch" else r["defense"]
        groups.setdefault(f"{r['protocol_tag']} {label}" if many else label, []).append(r)
    return groups


def _line_plot(path: Path, rows: Sequence[dict[str, Any]], *, metric: str, x: str, ylabel: str) -> None:
    from gradleak.reporting.figures import subplots

    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    fig, ax = subplots(figsize=(6.4, 4.0))
    for label, group in _series(rows, "batch" if x == "defense" else "defense").items():
        group = [g for g in group if g.get(f"{metric}_mean") is not None]
        xs = [defenses.index(g["defense"]) if x == "defense" else g["batch_size"] for g in group]
        ax.errorbar(xs, [g[f"{metric}_mean"] for g in group], yerr=[g[f"{metric}_std"] for g in group],
                    marker="o", capsize=3, label=label)
    if x == "defense":
        ax.set_xticks(range(len(defenses)), defenses, rotation=20, ha="right")
        ax.set_xlabel("defense (as given)")
    else:
        sizes = sorted({r["batch_size"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("batch size per client")
    if metric == "ssim":
        ax.axhline(RECOGNISABLE_SSIM, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _examples(path: Path, out: Path, rows: Sequence[dict[str, Any]], *, max_images: int = 8) -> None:
    """One block per (protocol, batch size): the truth, then one row of paired reconstructions per defense."""
    from safetensors.torch import load_file

    from gradleak.reporting.figures import subplots

    blocks: list[tuple[str, torch.Tensor]] = []
    for key in dict.fromkeys((r["protocol_tag"], r["batch_size"]) for r in rows):
        group = [r for r in rows if (r["protocol_tag"], r["batch_size"]) == key]
        truth = load_file(str(out / group[0]["cell"] / "truth.safetensors"))["images"]
        many = len({r["protocol_tag"] for r in rows}) > 1
        blocks.append((f"truth {key[0]} N={key[1]}" if many else f"truth N={key[1]}", truth))
        for r in group:  # each cell's worst case: the best run of its worst-case attacker
            run = out / r["cell"] / str(r.get("verdict_run"))
            rec = load_file(str(run / "reconstruction.safetensors"))["images"]
            pairs = json.loads((run / "metrics.json").read_text())["per_image"]
            order = torch.tensor([p["reconstruction"] for p in pairs]) if pairs else torch.arange(rec.shape[0])
            blocks.append((f"{r['defense']} ({r.get('verdict_attacker')})", rec[order]))
    n = min(max_images, max(t.shape[0] for _, t in blocks))
    width = n * 0.85 + 1.4
    fig, axes = subplots(len(blocks), n, figsize=(width, len(blocks) * 0.85), squeeze=False)
    for row_axes, (label, imgs) in zip(axes, blocks):
        for i, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if i < imgs.shape[0]:
                ax.imshow(imgs[i].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    fig.subplots_adjust(left=1.3 / width)  # room for the row labels, which tight_layout does not reserve
    fig.savefig(path, dpi=110)


def write_audit_report(out: str | Path, rows: Sequence[dict[str, Any]], *, title: str = "",
                       command: str | None = None, images: bool = True,
                       epsilon_rounds: int = 100, warnings: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``audit.md``, ``audit.csv``, ``audit.json``, the plots, ``examples.png`` and ``report.html``.

    Args:
        out: the audit folder holding the cells' run folders.
        rows: :func:`run_audit`'s rows, in grid order.
        title: one line describing the setup (model, protocol, attack), shown above the table.
        command: the command line that made the audit, recorded in the report.
        images: ``False``: no ``examples.png`` and no pictures of reconstructions in the page.
        epsilon_rounds: R of the "after R rounds" epsilon in ``ssim_vs_epsilon.png`` (DP-SGD cells).
        warnings: notes on the audit as a whole (budgets below what was measured to plateau,
            :func:`gradleak.audit.budgets.budget_warnings`), under the table and in audit.json.

    Returns:
        The written files by name.
    """
    out = Path(out)
    if not rows:
        raise ConfigError("audit report: expected at least one finished cell, got none")
    head, body = table_rows(rows)
    notes = [f"Warning: {w}" for w in warnings]
    files = {"audit.md": write_markdown(out / "audit.md", head, body, title=title, notes=notes)}
    flat = []
    for r in rows:
        u = r.get("utility") or {}
        ci = r.get("ssim_ci") or [None, None]
        flat.append({**r, **{k: r["protocol"][k] for k in ("protocol", "local_steps", "local_lr", "clients")},
                     "ssim_ci_low": ci[0], "ssim_ci_high": ci[1],
                     **{f"ssim_{k.replace('-', '_')}": (r.get("by_knowledge") or {}).get(k)
                        for k, _ in (*KNOWLEDGE_COLUMNS, FEATURES_COLUMN, CENTER_COLUMN, MALICIOUS_COLUMN)},
                     "still_improving_per_100": max((t["per_100"] for t in r.get("still_improving") or []), default=None),
                     "seeds": " ".join(map(str, r.get("seeds", []))), "not_tried": "; ".join(r.get("not_tried", [])),
                     "utility_steps": u.get("steps"), "utility_loss": u.get("loss"),
                     "utility_accuracy": u.get("accuracy"), "utility_loss_cost": _loss_cost(r, rows),
                     "verdict": verdict(r)})
    files["audit.csv"] = write_csv(out / "audit.csv", CSV_KEYS, flat)
    for name, metric, x, ylabel in (("ssim_vs_defense.png", "ssim", "defense", "worst-case SSIM (mean ± std)"),
                                    ("psnr_vs_defense.png", "psnr", "defense", "PSNR dB (mean ± std)"),
                                    ("ssim_vs_batch.png", "ssim", "batch", "worst-case SSIM (mean ± std)")):
        files[name] = out / name
        _line_plot(files[name], rows, metric=metric, x=x, ylabel=ylabel)
    if any(r.get("dp") and r.get("ssim_mean") is not None for r in rows):
        files["ssim_vs_epsilon.png"] = out / "ssim_vs_epsilon.png"
        epsilon_plot(files["ssim_vs_epsilon.png"], rows, rounds=epsilon_rounds)
    if images:
        files["examples.png"] = out / "examples.png"
        _examples(files["examples.png"], out, rows)
    files["audit.json"] = out / "audit.json"
    files["audit.json"].write_text(json.dumps({**audit_document(rows, title=title, command=command),
                                               "warnings": list(warnings)}, indent=2, default=str))
    files["report.html"] = out / "report.html"
    files["report.html"].write_text(_html(out, head, body, rows, title=title, command=command, warnings=warnings))
    return files


def audit_document(rows: Sequence[dict[str, Any]], *, title: str = "", command: str | None = None) -> dict[str, Any]:
    """``audit.json``: the verdict per cell, with the numbers behind it and what was not tried."""
    keep = ("cell", "protocol_tag", "batch_size", "defense", "defense_spec", "epsilon", "delta", "ssim_mean",
            "ssim_std", "ssim_ci", "ssim_worst_image", "recognisable_fraction", "psnr_mean", "fsim_mean", "lpips_mean",
            "label_accuracy", "label_strategy", "verdict_attacker", "verdict_run", "by_knowledge", "inconclusive",
            "still_improving", "overshot", "seeds", "not_tried", "warnings", "utility", "seconds")
    cells = []
    for r in rows:
        cell = {k: r.get(k) for k in keep}
        cell["attackers"] = {name: {k: v for k, v in a.items() if k != "seeds"}
                             for name, a in (r.get("attackers") or {}).items()}
        cell["verdict"] = verdict(r)
        cells.append(cell)
    return {"title": title, "command": command, "recognisable_ssim": RECOGNISABLE_SSIM,
            "confidence": "bootstrap 95% percentile interval of the worst-case attacker's mean SSIM over images "
                          "and seeds", "cells": cells}


def epsilon_plot(path: Path, rows: Sequence[dict[str, Any]], *, rounds: int) -> None:
    """Worst-case SSIM of the DP-SGD cells against their epsilon: for one round, and after ``rounds`` rounds."""
    from gradleak.defenses import parse_defense, rdp_epsilon
    from gradleak.reporting.figures import subplots

    dp = [r for r in rows if r.get("dp") and r.get("ssim_mean") is not None and r.get("epsilon") is not None]
    fig, axes = subplots(1, 2, figsize=(9.0, 3.8), sharey=True)
    delta = next((r["delta"] for r in dp), None)
    for ax, steps in zip(axes, (1, rounds)):
        for n in sorted({r["batch_size"] for r in dp}):
            group = [r for r in dp if r["batch_size"] == n]
            xs: list[Any] = []  # epsilon per run (None where it is not defined)
            for r in group:
                part = parse_defense(r["defense"]).parts()[0]
                sample_rate = (r.get("privacy") or {}).get("sample_rate", 1.0)
                xs.append(float(r["epsilon"]) if steps == 1 else rdp_epsilon(
                    noise_multiplier=part.noise_multiplier, sample_rate=sample_rate,  # type: ignore[attr-defined]
                    steps=steps * part.rounds, delta=part.delta))  # type: ignore[attr-defined]
            lo = [r["ssim_mean"] - r["ssim_ci"][0] if r.get("ssim_ci") else 0.0 for r in group]
            hi = [r["ssim_ci"][1] - r["ssim_mean"] if r.get("ssim_ci") else 0.0 for r in group]
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.errorbar([xs[i] for i in order], [group[i]["ssim_mean"] for i in order],
                        yerr=[[lo[i] for i in order], [hi[i] for i in order]], marker="o", capsize=3, label=f"N={n}")
        ax.set_xscale("log")
        ax.axhline(RECOGNISABLE_SSIM, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("ε per round (as uploaded)" if steps == 1 else f"ε after {rounds} rounds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("worst-case SSIM [95% CI]")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"DP-SGD: leakage against the privacy budget (RDP accountant, δ = {delta:g})" if delta else
                 "DP-SGD: leakage against the privacy budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _html(out: Path, head: list[str], body: list[list[str]], rows: Sequence[dict[str, Any]], *, title: str,
          command: str | None, warnings: Sequence[str] = ()) -> str:
    import base64
    import html

    def img(name: str) -> str:
        if not (out / name).is_file():
            return ""
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}" style="max-width:100%">'

    def colour(r: dict[str, Any]) -> str:
        s = r.get("ssim_mean")
        return ("#f8d0d0" if r.get("recognisable_fraction") else "#e0e0f8" if r.get("inconclusive") else
                "#fbe7c6" if s is not None and s >= PARTIAL_SSIM else "#d8f0d8")

    esc = html.escape
    th = "".join(f"<th>{esc(h)}</th>" for h in head) + "<th>run</th>"
    trs = "".join(f'<tr style="background:{colour(r)}">' + "".join(f"<td>{esc(c)}</td>" for c in cells)
                  + f'<td><a href="{esc(r["cell"])}/{esc(str(r.get("verdict_run")))}/report.html">'
                  f'{esc(r["cell"])}</a></td></tr>'
                  for r, cells in zip(rows, body))
    worst: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("ssim_mean") is not None and r["ssim_mean"] > worst.get(r["defense"], {}).get("ssim_mean", -2.0):
            worst[r["defense"]] = r
    summary = "".join(f"<li><b>{esc(d)}</b>: worst case batch {r['batch_size']} ({esc(r['protocol_tag'])}), "
                      f"SSIM {r['ssim_mean']:.2f}: {esc(verdict(r))}</li>" for d, r in worst.items())
    cmd = f"<h2>Command</h2><pre>{esc(command)}</pre>" if command else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gradleak privacy audit</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}</style></head><body>
<h1>Privacy audit: what can be reconstructed from these client updates?</h1>
<p>{esc(title)}</p>
<h2>Bottom line, per defense (its worst cell)</h2><ul>{summary}</ul>
<h2>Every cell</h2><table><tr>{th}</tr>{trs}</table>
{"<h2>Budget warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>" if warnings else ""}
<p>How to read it. Every cell is attacked by every attack that applies to the victim, each under every
assumption tried about what the attacker knows: the labels <em>recovered</em> from the update or <em>known</em>
(an attacker who knows which classes the client holds), and, for a defended cell, the defense ignored
(<em>defense-unaware</em>) or simulated (<em>defense-aware</em>: its name and parameters are public metadata of the
update). The cell's verdict is the worst of them over every attack seed, and names the attacker; the SSIM columns
give the best under each assumption. A cell where some run was still improving when its budget ended reads
<em>inconclusive</em> (blue): a longer run may break it; so does a cell where a run's SSIM peaked in a higher band
than the cell's verdict and fell while its matching loss kept falling (a shorter budget reads higher). SSIM
compares each reconstruction with its private image (1 = identical); an image counts as recognisable from SSIM
{RECOGNISABLE_SSIM} on (red), from a mean of {PARTIAL_SSIM} coarse shapes and colours show (orange); the bracket is a
bootstrap 95% interval of the mean over images and seeds, "best image" the best reconstruction of any one image.
Green means <em>not broken by these attacks at this budget</em>: a stronger attack or budget may still break
it; it is not a guarantee. &epsilon; is the DP-SGD guarantee (RDP accountant, per round, at the recorded
&delta;); "&mdash;" means the defense gives none. The loss and accuracy columns are the victim's training loss
and accuracy on the same batch after the stated number of rounds under the defense; "loss cost" is the
difference to no defense.</p>
<h2>SSIM and PSNR against defense (worst case)</h2>{img("ssim_vs_defense.png")}{img("psnr_vs_defense.png")}
<h2>SSIM against batch size</h2>{img("ssim_vs_batch.png")}
{"<h2>Leakage against the privacy budget</h2>" + img("ssim_vs_epsilon.png") if (out / "ssim_vs_epsilon.png").is_file() else ""}
{"<h2>Examples (private images, then each defense's worst-case reconstructions)</h2>" + img("examples.png") if (out / "examples.png").is_file() else ""}
{cmd}</body></html>
"""
