"""``report.html``: one self-contained page that answers first, then shows how.

Order: the verdict (how many images are recognisable, whether the labels are exact), the scores,
one row per private image (its reconstruction beside it, with SSIM/PSNR/FSIM/LPIPS), the grid and
curves, then the case and the settings as tables, and the raw JSON folded at the end.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradleak.metrics.recognisable import RECOGNISABLE_SSIM

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;padding:3px 9px;text-align:left}
th{background:#f3f3f3}.verdict{font-size:1.35em;padding:.6em 1em;border-left:6px solid #b00;background:#fbeeee}
.verdict.low{border-color:#080;background:#eef8ee}img.t{width:64px;height:64px;image-rendering:pixelated}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}details{margin:1em 0}"""


def _img(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _thumb(image: torch.Tensor) -> str:
    """One (C, H, W) image in [0, 1] as an inline PNG."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pic = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return f'<img class="t" alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return html.escape(str(v))


def _flat(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted.key, value)`` rows; lists of scalars joined."""
    if isinstance(data, Mapping):
        rows: list[tuple[str, Any]] = []
        for k, v in data.items():
            rows += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(data, (list, tuple)) and all(not isinstance(v, (Mapping, list, tuple)) for v in data):
        return [(prefix, ", ".join(map(str, data)) if len(data) <= 24 else f"{len(data)} values")]
    return [(prefix, data if not isinstance(data, (list, tuple)) else json.dumps(data)[:200])]


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows) + "</table>"


def verdict_line(summary: Mapping[str, Any], per_image: Sequence[Mapping[str, Any]]) -> tuple[str, bool]:
    """The answer in one sentence, and whether it reads as a leak (anything recognisable or labels exact)."""
    if not per_image:
        return "No ground truth was given, so nothing was scored: look at the reconstructions below.", True
    n = len(per_image)
    seen = sum(float(p.get("ssim", 0.0)) >= RECOGNISABLE_SSIM for p in per_image)
    acc = summary.get("label_accuracy")
    labels = ("labels not scored" if acc is None else "labels exact" if acc >= 1.0
              else f"labels {acc:.0%} right")
    ssim, psnr = summary.get("ssim_mean"), summary.get("psnr_mean")
    text = (f"{seen} of {n} private images recognisable (SSIM ≥ {RECOGNISABLE_SSIM}); {labels}; "
            f"mean SSIM {'n/a' if ssim is None else f'{ssim:.3f}'}, PSNR {'n/a' if psnr is None else f'{psnr:.2f}'} dB.")
    return text, bool(seen) or (acc is not None and acc >= 1.0)


def write_report(run_dir: str | Path, *, config: dict[str, Any], metrics: dict[str, Any],
                 truth: torch.Tensor | None = None, recon: torch.Tensor | None = None,
                 truth_labels: Sequence[int] | None = None, recon_labels: Sequence[int] | None = None) -> Path:
    """Write ``report.html`` in ``run_dir`` from its config, metrics and figures.

    Args:
        truth, recon: the private images and their paired reconstructions (same order), for the
            per-image table's thumbnails (omitted: the table has scores only).
        truth_labels, recon_labels: their labels in the same order.
    """
    run_dir = Path(run_dir)
    s = metrics.get("summary", {})
    per_image = metrics.get("per_image") or []
    answer, leaks = verdict_line(s, per_image)
    rows = [("SSIM", "ssim"), ("FSIM", "fsim"), ("PSNR (dB)", "psnr"), ("LPIPS-VGG", "lpips")]
    scores = "".join(f"<tr><td>{name}</td><td>{_fmt(s.get(k + '_mean'))}</td><td>{_fmt(s.get(k + '_std'))}</td></tr>"
                     for name, k in rows)
    note = f"<p><em>LPIPS: {html.escape(s['lpips_note'])}</em></p>" if s.get("lpips_note") else ""
    facts = [("attack", config.get("attack")), ("labels", s.get("label_strategy")),
             ("label accuracy", s.get("label_accuracy")), ("images", s.get("n_images")),
             ("iterations", s.get("iterations")), ("seconds", s.get("seconds")),
             ("defense", s.get("defense")), ("attacker simulated the defense", s.get("adaptive")),
             ("peak memory (MB)", s.get("peak_memory_mb")), ("pairing", s.get("pairing"))]
    image_rows = []
    for j, p in enumerate(per_image):
        k = int(p.get("reconstruction", j))
        pics = (f"<td>{_thumb(truth[j])}</td><td>{_thumb(recon[j])}</td>"
                if truth is not None and recon is not None else "")
        lab = (f"<td>{truth_labels[j]}</td>" if truth_labels is not None else "") + (
            f"<td>{recon_labels[j]}</td>" if recon_labels is not None else "")
        mark = "yes" if float(p.get("ssim", 0.0)) >= RECOGNISABLE_SSIM else "no"
        image_rows.append(f"<tr><td>{j}</td>{pics}<td>{k}</td>{lab}<td>{mark}</td>"
                          + "".join(f"<td>{_fmt(p.get(key))}</td>" for _, key in rows) + "</tr>")
    head = ("<tr><th>private image</th>" + ("<th>truth</th><th>reconstruction</th>" if truth is not None else "")
            + "<th>paired with</th>" + ("<th>label</th>" if truth_labels is not None else "")
            + ("<th>recovered label</th>" if recon_labels is not None else "")
            + f"<th>recognisable (SSIM ≥ {RECOGNISABLE_SSIM})</th>" + "".join(f"<th>{n}</th>" for n, _ in rows) + "</tr>")
    per_image_html = f"<h2>Each private image</h2><table>{head}{''.join(image_rows)}</table>" if per_image else ""
    settings = {k: v for k, v in config.items() if k != "case"}
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gradleak: {html.escape(str(config.get('attack')))} run</title>
<style>{_STYLE}</style></head><body>
<h1>How much did this update leak?</h1>
<p class="verdict{'' if leaks else ' low'}">{html.escape(answer)}</p>
<table><tr><th>metric</th><th>mean</th><th>std</th></tr>{scores}</table>{note}
{_table(facts)}
{per_image_html}
<h2>Ground truth (top) and reconstruction (bottom)</h2>{_img(run_dir / 'grid.png')}
<h2>Curves</h2>{_img(run_dir / 'curves.png')}
<h2>Case</h2>{_table(_flat(config.get('case', {})))}
<h2>Settings</h2>{_table(_flat(settings))}
<details><summary>Raw JSON: config.json and the summary of metrics.json</summary>
<pre>{html.escape(json.dumps(config, indent=2, default=str))}</pre>
<pre>{html.escape(json.dumps(s, indent=2, default=str))}</pre></details>
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
