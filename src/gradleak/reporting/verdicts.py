"""Verdicts that hold up: the worst case over attackers and seeds, with its uncertainty.

An audit cell is attacked by several attackers (the unaware one, which matches the raw update,
and the adaptive one, which simulates the recorded defense) and several attack seeds. Its verdict
is the worst case: the attacker whose mean SSIM (over images and seeds) is highest, with a
bootstrap 95% confidence interval of that mean; per image, the best reconstruction any run made;
and the fraction of images that some run reconstructed recognisably. What was not tried (an
attacker the attack does not have, or that was turned off) is listed with the verdict, and a cell
no attacker broke reads "not broken by these attacks at this budget", never "safe".

``--fail-if`` conditions (``ssim>0.5``, ``recognisable>=0.25``, ...) are checked on these values.

References:
    Carlini et al., "On Evaluating Adversarial Robustness", 2019 (report the worst case over
    adaptive attacks, and what was not tried).
    Efron & Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile intervals).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradleak.errors import ConfigError

RECOGNISABLE_SSIM = 0.5
"""Per-image SSIM from which a reconstruction counts as recognisable. Read from 351 measured pairs
(docs/audit.md, ``examples/recognisable_threshold.py``): from 0.5 on the object of the CIFAR-10 photo
(ship, plane, cat) is recognisable in every pair looked at, and every reconstruction from 0.4 on
picks its private image out of 60 built-in photos by SSIM; at 0.3-0.4 only blobs of the layout and
colours remain (re-identified 80%). 0.6 would call the 0.53-0.58 ship reconstructions unrecognisable,
a false "safe"."""

PARTIAL_SSIM = 0.3
"""Mean SSIM from which coarse structure (layout, colours) is visible."""

ATTACKERS = ("unaware", "adaptive")


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (a point when there are fewer than 2).

    Example:
        >>> lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4])
        >>> 0.1 <= lo < 0.25 < hi <= 0.4
        True
    """
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    if data.size < 2 or np.all(data == data[0]):
        return (float(data.mean()), float(data.mean()))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def attacker_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool one attacker's runs (one per seed; each a run's ``metrics.json``) over images and seeds."""
    out: dict[str, Any] = {"seeds": [r["summary"].get("seed") for r in runs], "runs": len(runs)}
    for key in ("ssim", "fsim", "psnr", "lpips"):
        values = [float(p[key]) for r in runs for p in r["per_image"] if p.get(key) is not None]
        out[f"{key}_mean"], out[f"{key}_std"] = _stats(values)
        if key == "ssim":
            out["ssim_ci"] = list(bootstrap_ci(values)) if values else None
    accs = [r["summary"].get("label_accuracy") for r in runs if r["summary"].get("label_accuracy") is not None]
    out["label_accuracy"] = max(accs) if accs else None
    out["label_strategy"] = runs[0]["summary"].get("label_strategy") if runs else None
    out["seconds"] = float(sum(r["summary"].get("seconds") or 0.0 for r in runs))
    out["iterations"] = runs[0]["summary"].get("iterations") if runs else None
    out["matching_loss"] = runs[0].get("info", {}).get("matching_loss") if runs else None
    return out


def worst_case(attackers: dict[str, list[dict[str, Any]]], *, defended: bool,
               not_tried: Sequence[str] = ()) -> dict[str, Any]:
    """The cell's verdict values from every attacker's runs (``{attacker: [metrics.json, ...]}``).

    Returns the worst-case attacker's pooled metrics under the usual keys (``ssim_mean``,
    ``psnr_mean``, ...), plus ``ssim_ci`` (its bootstrap 95% interval), ``ssim_worst_image`` (the
    best reconstruction of any image by any run), ``recognisable_fraction`` (images some run
    reconstructed with SSIM >= :data:`RECOGNISABLE_SSIM`), ``verdict_attacker``, ``attackers``
    (each one's pooled metrics), ``verdict_run`` (the run folder of that attacker's best seed) and
    ``not_tried``.
    """
    summaries = {name: attacker_summary(runs) for name, runs in attackers.items() if runs}
    if not summaries:
        raise ConfigError("audit verdict: expected at least one finished run, got none")
    scored = {n: s for n, s in summaries.items() if s["ssim_mean"] is not None}
    name = max(scored, key=lambda n: scored[n]["ssim_mean"]) if scored else next(iter(summaries))
    best = summaries[name]
    per_image: dict[int, float] = {}
    for runs in attackers.values():
        for r in runs:
            for p in r["per_image"]:
                if p.get("ssim") is not None:
                    per_image[p["truth"]] = max(per_image.get(p["truth"], -1.0), float(p["ssim"]))
    row = {k: v for k, v in best.items() if k not in ("seeds", "runs")}
    run_means = {r.get("run"): float(np.mean([p["ssim"] for p in r["per_image"] if p.get("ssim") is not None]))
                 for r in attackers.get(name, []) if any(p.get("ssim") is not None for p in r["per_image"])}
    row.update({
        "verdict_attacker": name,
        "verdict_run": max(run_means, key=run_means.__getitem__) if run_means else None,
        "ssim_worst_image": max(per_image.values()) if per_image else None,
        "recognisable_fraction": (sum(v >= RECOGNISABLE_SSIM for v in per_image.values()) / len(per_image)
                                  if per_image else None),
        "label_accuracy": max((s["label_accuracy"] for s in summaries.values() if s["label_accuracy"] is not None),
                              default=None),
        "seconds": float(sum(s["seconds"] for s in summaries.values())),
        "attackers": summaries, "defended": defended, "not_tried": list(not_tried),
        "seeds": sorted({seed for s in summaries.values() for seed in s["seeds"] if seed is not None}),
    })
    return row


def verdict(row: dict[str, Any]) -> str:
    """A plain-language reading of one cell from its worst-case values.

    Example:
        >>> verdict({"ssim_mean": 0.8, "recognisable_fraction": 1.0, "label_accuracy": 1.0})
        'leaks: 100% of images recognisable; labels recovered exactly'
        >>> verdict({"ssim_mean": 0.05, "recognisable_fraction": 0.0, "label_accuracy": 0.5,
        ...          "not_tried": ["adaptive"]})
        'not broken by these attacks at this budget; 50% of labels recovered; not tried: adaptive'
    """
    s, acc, frac = row.get("ssim_mean"), row.get("label_accuracy"), row.get("recognisable_fraction")
    if s is None:
        text = "not scored"
    elif frac:
        text = f"leaks: {frac:.0%} of images recognisable"
    elif s >= PARTIAL_SSIM:
        text = "partial leak: coarse shapes and colours"
    else:
        text = "not broken by these attacks at this budget"
    if acc is not None and acc >= 1.0:
        text += "; labels recovered exactly"
    elif acc is not None and acc > 0:
        text += f"; {acc:.0%} of labels recovered"
    if row.get("not_tried"):
        text += "; not tried: " + ", ".join(row["not_tried"])
    return text


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
CONDITION_METRICS = {
    "ssim": "ssim_mean", "ssim_ci_high": "ssim_ci_high", "ssim_worst_image": "ssim_worst_image",
    "recognisable": "recognisable_fraction", "psnr": "psnr_mean", "fsim": "fsim_mean",
    "label_accuracy": "label_accuracy"}


@dataclass(frozen=True)
class Condition:
    """A leak limit such as ``ssim>0.5``: ``metric op value`` on a cell's worst-case values."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Condition:
        """``"ssim>0.5"``, ``"recognisable >= 0.25"``, ``"label_accuracy>=1"``.

        Raises:
            ConfigError: not of the form ``metric op number``, or an unknown metric.

        Example:
            >>> Condition.parse("ssim > 0.5")
            Condition(metric='ssim', op='>', value=0.5)
        """
        m = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", str(text))
        if not m:
            raise ConfigError(f"--fail-if: expected METRIC OP NUMBER such as 'ssim>0.5', got {text!r}")
        metric, op, raw = m.groups()
        if metric not in CONDITION_METRICS:
            raise ConfigError(f"--fail-if: unknown metric '{metric}'; expected one of: {', '.join(CONDITION_METRICS)}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--fail-if: expected a number after '{op}', got {raw!r}") from None
        return cls(metric, op, value)

    def holds(self, row: dict[str, Any]) -> bool:
        """True when the cell's value meets the condition (a missing value never does)."""
        key = CONDITION_METRICS[self.metric]
        value = (row.get("ssim_ci") or [None, None])[1] if key == "ssim_ci_high" else row.get(key)
        return value is not None and _OPS[self.op](float(value), self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def failing(rows: Sequence[dict[str, Any]], conditions: Sequence[Condition]) -> list[tuple[dict[str, Any], Condition]]:
    """The (cell, condition) pairs where a cell leaks beyond a limit."""
    return [(r, c) for r in rows for c in conditions if c.holds(r)]


def load_runs(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """A cell folder's finished runs by attacker: ``<attacker>-s<seed>/metrics.json``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*-s*/metrics.json")):
        attacker = path.parent.name.rsplit("-s", 1)[0]
        runs.setdefault(attacker, []).append({**json.loads(path.read_text()), "run": path.parent.name})
    return runs


__all__ = ["ATTACKERS", "CONDITION_METRICS", "Condition", "PARTIAL_SSIM", "RECOGNISABLE_SSIM", "attacker_summary",
           "bootstrap_ci", "failing", "load_runs", "verdict", "worst_case"]
