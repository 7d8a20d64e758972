"""Verdicts that hold up: the worst case over attacks, attacker knowledge and seeds, with its uncertainty.

An audit cell is attacked by several attackers: every attack that applies, each under every
assumption tried (labels recovered or known; the defense ignored or simulated) and with several
seeds. Its verdict is the worst case: the attacker whose mean SSIM (over images and seeds) is
highest, with a bootstrap 95% confidence interval of that mean; per image, the best reconstruction
any run made; and the fraction of images that some run reconstructed recognisably. The verdict
names the attacker that broke the cell and, where an assumption decided it, the number without it.
What was not tried is listed with the verdict. A cell no attacker broke reads "not broken by these
attacks at this budget", never "safe", and "inconclusive" when a run was still improving at the
end of its budget (:func:`improvement`): an attack still improving proves nothing.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradleak.audit.landscape import flat, narrow
from gradleak.errors import ConfigError
from gradleak.metrics.recognisable import PARTIAL_SSIM, RECOGNISABLE_SSIM
from gradleak.reporting.runner import RunSummary

if TYPE_CHECKING:
    from gradleak.audit.plan import Attacker


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
    """One attacker's runs (one per seed; each a run's ``metrics.json``): the worst case over its seeds.

    The image metrics are its best seed's (the highest mean SSIM over the images; ``best_seed``), so
    another seed can raise an attacker's figure and never lower it: on ResNet-18-sigmoid (eval) at
    batch 8, ``prune:0.5`` read 0.320 at seed 0 (a partial leak) and 0.280 / 0.312 at seeds 1 and 2;
    a folder of seeds 1 and 2 pooled to their mean, 0.296, read "not broken" (it now reads 0.312).
    ``ssim_seed_means`` keeps each seed's mean and ``best_run`` its run folder; without SSIM (no
    truth) the runs are pooled.
    """
    sums = [RunSummary.from_dict(r["summary"]) for r in runs]
    out: dict[str, Any] = {"seeds": [s.seed for s in sums], "runs": len(runs)}
    means = [_mean_ssim(r) for r in runs]
    out["ssim_seed_means"] = means
    scored = {i: m for i, m in enumerate(means) if m is not None}
    best = max(scored, key=scored.__getitem__) if scored else None
    out["best_seed"] = sums[best].seed if best is not None else None
    out["best_run"] = runs[best].get("run") if best is not None else None
    chosen = [runs[best]] if best is not None else list(runs)
    for key in ("ssim", "fsim", "psnr", "lpips"):
        values = [float(p[key]) for r in chosen for p in r["per_image"] if p.get(key) is not None]
        out[f"{key}_mean"], out[f"{key}_std"] = _stats(values)
        if key == "ssim":
            out["ssim_ci"] = list(bootstrap_ci(values)) if values else None
    accs = [s.label_accuracy for s in sums if s.label_accuracy is not None and s.labels != "given"]
    out["label_accuracy"] = max(accs) if accs else None
    out["label_strategy"] = sums[0].label_strategy if sums else None
    out["seconds"] = float(sum(s.seconds or 0.0 for s in sums))
    out["iterations"] = sums[0].iterations if sums else None
    out["matching_loss"] = runs[0].get("info", {}).get("matching_loss") if runs else None
    return out


def _mean_ssim(run: dict[str, Any]) -> float | None:
    """A run's mean SSIM over its images (``None`` where none was scored)."""
    values = [float(p["ssim"]) for p in run["per_image"] if p.get("ssim") is not None]
    return float(np.mean(values)) if values else None


STILL_IMPROVING_SSIM = 0.02
"""A run whose best mean SSIM in the last :data:`END_WINDOW` of its iterations exceeds its best
before that window by this much was still improving when its budget ended. Sign-Adam's curves
oscillate (CI-Net's mean SSIM moves by up to about 0.01 between reports on a plateau), so the best
values are compared rather than the last ones, and the margin is twice that wobble. A batch-64
CI-Net run at 500 iterations rose 0.056 over its last 100 (README, large batches), a plateaued
batch-8 run less than 0.005 over its last 60 (docs/audit.md)."""

STILL_IMPROVING_LOSS = 0.25
"""Without an SSIM trace (no truth to score against), a run whose lowest matching loss in the last
:data:`END_WINDOW` is this fraction below its lowest before counts as still improving."""

END_WINDOW = 0.2
"""The share of a run's iterations, at its end, that decides whether it was still improving."""


ONE_SEED = "more attack seeds (one ran)"
"""Listed as not tried where a cell that no run broke recognisably was attacked with one seed: on the
flat ResNet-18-sigmoid at batch 4 attack seeds 0, 1 and 2 of the same attacker read 0.388, 0.448
and 0.471 (a quarter, then half of the images recognisable), and on ResNet-18-ReLU (eval) a second
seed turned a partial leak into a leak under `quantize:4`, a third under `noise:1e-4` at batch 8
(best image 0.476 at seed 0; two of eight recognisable at seed 2; docs/audit.md)."""


def _trace(history: dict[str, Any], its_key: str, key: str) -> list[tuple[int, float]]:
    """``(iteration, value)`` pairs of one recorded trace, its missing and non-finite values left out."""
    return [(int(i), float(v)) for i, v in zip(history.get(its_key) or [], history.get(key) or [])
            if v is not None and math.isfinite(float(v))]


def improvement(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """How much one run improved over the last :data:`END_WINDOW` of its iterations (``None``: no trace to judge).

    Returns ``{"measure": "ssim" | "loss", "rise", "per_100", "window", "still_improving"}``:
    the gain of the best value in the window over the best before it (SSIM up, or the loss's
    relative fall), per 100 iterations, and whether it passes :data:`STILL_IMPROVING_SSIM`
    (or :data:`STILL_IMPROVING_LOSS`).

    Example:
        >>> rising = {"history": {"ssim_iteration": [25, 50, 75, 100], "ssim": [0.1, 0.2, 0.3, 0.4]}}
        >>> improvement(rising)["still_improving"], round(improvement(rising)["per_100"], 3)
        (True, 0.5)
        >>> flat = {"history": {"ssim_iteration": [25, 50, 75, 100], "ssim": [0.1, 0.3, 0.31, 0.305]}}
        >>> improvement(flat)["still_improving"]
        False
    """
    history = metrics.get("history") or {}
    for measure, its_key, key in (("ssim", "ssim_iteration", "ssim"), ("loss", "iteration", "loss")):
        points = _trace(history, its_key, key)
        if len(points) < 3:
            continue
        last = points[-1][0]
        start = last - END_WINDOW * last
        before = [v for i, v in points if i <= start]
        inside = [v for i, v in points if i > start]
        if not before or not inside:
            continue
        if measure == "ssim":
            rise = max(inside) - max(before)
            limit = STILL_IMPROVING_SSIM
        else:
            low = min(before)
            rise = (low - min(inside)) / abs(low) if low != 0 else 0.0
            limit = STILL_IMPROVING_LOSS
        span = max(last - start, 1e-9)
        return {"measure": measure, "rise": float(rise), "per_100": float(rise / span * 100), "window": [start, last],
                "still_improving": bool(rise >= limit)}
    return None


OVERSHOT_BAND_SSIM = 0.05
"""A smaller fall that still counts as overshooting where it crosses a verdict band (five times the
plateau's wobble). Measured: centred CI-Net on ResNet-18-sigmoid in eval mode, batch 1, 1000
iterations, peaked at 0.554 (iteration 425, recognisable) and ended at 0.480 (partial) while its
loss reached its lowest at the end: a 300-iteration run reads 0.537 (docs/attacks.md)."""

OVERSHOT_SSIM = 0.1
"""A run whose mean-SSIM trace peaked this much above its final value, while its matching loss kept
falling past the peak, overshot its budget: an attacker who stopped earlier, with nothing but the
update to go by, would have read higher. Ten times sign-Adam's wobble on a plateau (about 0.01).
Measured: under ``sign`` (LeNet-sigmoid, batch 1, CI-Net defense-aware, 1000 iterations) the mean
SSIM rose to 0.427 at iteration 275 and fell to 0.269 at the end while the loss fell from 4.6e-3 to
1.5e-3: matching the signs alone is many-to-one, and the attack fits the part the images do not
determine (docs/audit.md)."""


def overshoot(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Whether one run's SSIM peaked well before its end while its matching loss kept falling (``None``: it did not).

    Returns ``{"peak", "peak_iteration", "final", "fall"}`` when the best mean SSIM of its trace
    exceeds the last by :data:`OVERSHOT_SSIM` or more, or by :data:`OVERSHOT_BAND_SSIM` or more from
    a higher verdict band (partial from 0.3, recognisable from 0.5) than the last, and the lowest
    matching loss after the peak is below the loss at the peak (the attacker had no signal to stop on).

    Example:
        >>> run = {"history": {"ssim_iteration": [100, 200, 300, 400], "ssim": [0.3, 0.43, 0.35, 0.27],
        ...                    "iteration": [100, 200, 300, 400], "loss": [4e-3, 3e-3, 2.5e-3, 2e-3]}}
        >>> overshoot(run)["peak"], overshoot(run)["peak_iteration"], round(overshoot(run)["fall"], 2)
        (0.43, 200, 0.16)
        >>> run["history"]["loss"] = [4e-3, 3e-3, 3.5e-3, 3.2e-3]  # the loss said stop at the peak
        >>> overshoot(run) is None
        True
        >>> crossing = {"history": {"ssim_iteration": [100, 400, 1000], "ssim": [0.46, 0.554, 0.480],
        ...                         "iteration": [100, 400, 1000], "loss": [0.04, 0.053, 0.028]}}
        >>> round(overshoot(crossing)["fall"], 3)  # under 0.1, but from recognisable to partial
        0.074
        >>> crossing["history"]["ssim"] = [0.36, 0.454, 0.380]  # the same fall inside one band
        >>> overshoot(crossing) is None
        True
    """
    history = metrics.get("history") or {}
    points, losses = _trace(history, "ssim_iteration", "ssim"), _trace(history, "iteration", "loss")
    if len(points) < 3 or not losses:
        return None
    peak_it, peak = max(points, key=lambda p: p[1])
    final = points[-1][1]
    fall = peak - final
    if fall < OVERSHOT_SSIM and (fall < OVERSHOT_BAND_SSIM or _band(peak) <= _band(final)):
        return None
    at_peak = [v for i, v in losses if i <= peak_it]
    after = [v for i, v in losses if i > peak_it]
    if not at_peak or not after or min(after) >= at_peak[-1]:
        return None
    return {"peak": peak, "peak_iteration": peak_it, "final": final, "fall": peak - final}


def _knowledge(attacker: str) -> Attacker:
    """The attacker an id names; old ids (``adaptive``, ``unaware``) read as CI-Net's."""
    from gradleak.audit.plan import Attacker

    try:
        return Attacker.parse(attacker)
    except ConfigError:
        return Attacker(attacker, defense={"adaptive": "aware", "unaware": "unaware"}.get(attacker, "none"))


def describe_attacker(attacker: str) -> str:
    """``cinet_aware_labels-known`` -> ``cinet, defense-aware, labels known``."""
    return _knowledge(attacker).describe()


def _malicious(attack: str) -> bool:
    """Whether ``attack`` needs a server that modified the model (a registered attack's knowledge)."""
    from gradleak.attacks import ATTACKS
    from gradleak.errors import UnknownNameError

    try:
        return bool(ATTACKS.get(attack).knowledge.active_manipulation)
    except UnknownNameError:
        return False


def by_knowledge(summaries: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The best mean SSIM under each assumption tried: ``labels-recovered``, ``labels-known``,
    ``defense-unaware``, ``defense-aware``, ``bn-used``, ``bn-ignored``, ``features-used``,
    ``features-ignored``, ``server-honest``,
    ``server-malicious``, and per attack (``attack:cinet``)."""
    out: dict[str, float | None] = {}
    for name, s in summaries.items():
        if s.get("ssim_mean") is None:
            continue
        a = _knowledge(name)
        keys = [f"labels-{a.labels}", f"attack:{a.attack}", f"server-{'malicious' if _malicious(a.attack) else 'honest'}"]
        keys += [f"{axis}-{v}" for axis, v in (("defense", a.defense), ("bn", a.bn), ("features", a.features),
                                                ("center", a.center)) if v != "none"]
        for k in keys:
            out[k] = max(out.get(k) or -1.0, float(s["ssim_mean"]))
    return out


def _band(ssim: float | None) -> int:
    """The verdict band a mean SSIM falls in: 0 not broken, 1 partial leak, 2 recognisable on average."""
    v = float(ssim or 0.0)
    return 2 if v >= RECOGNISABLE_SSIM else 1 if v >= PARTIAL_SSIM else 0


def worst_case(attackers: dict[str, list[dict[str, Any]]], *, defended: bool,
               not_tried: Sequence[str] = ()) -> dict[str, Any]:
    """The cell's verdict values from every attacker's runs (``{attacker id: [metrics.json, ...]}``).

    Returns the worst-case attacker's metrics (its best seed's, :func:`attacker_summary`) under the usual keys (``ssim_mean``,
    ``psnr_mean``, ...), plus ``ssim_ci`` (its bootstrap 95% interval), ``ssim_worst_image`` (the
    best reconstruction of any image by any run), ``recognisable_fraction`` (images some run
    reconstructed with SSIM >= :data:`RECOGNISABLE_SSIM`), ``verdict_attacker``, ``attackers``
    (each one's metrics), ``by_knowledge`` (the best under each assumption),
    ``verdict_run`` (the run folder of that attacker's best seed), ``still_improving`` (the runs
    still improving at their budget's end, :func:`improvement`, except where the same attacker also
    ran a longer budget, ``--budgets``), ``overshot`` (the runs whose SSIM
    peaked above the cell's worst case and fell while their loss kept falling, :func:`overshoot`),
    ``inconclusive`` (no image recognisable, and some run still improving or one whose peak lies in a
    higher verdict band than the worst case: partial from 0.3, recognisable from 0.5) and ``not_tried``
    (the argument's, then :data:`ONE_SEED` where a single seed ran and no image was recognisable).
    ``label_accuracy`` is over the runs that recovered their labels (``None`` when every run was given
    them).
    """
    summaries = {name: attacker_summary(runs) for name, runs in attackers.items() if runs}
    if not summaries:
        raise ConfigError("audit verdict: expected at least one finished run, got none")
    scored = {n: s for n, s in summaries.items() if s["ssim_mean"] is not None}
    def strength(n: str) -> tuple[float, bool, bool, bool, bool, bool]:  # a tie goes to the attacker who needs to know less
        a = _knowledge(n)
        return (round(float(scored[n]["ssim_mean"]), 6), a.labels == "recovered", a.defense != "aware", a.bn != "used",
                a.features != "used", a.center != "used")

    name = max(scored, key=strength) if scored else next(iter(summaries))
    best = summaries[name]
    per_image: dict[int, float] = {}
    improving: list[dict[str, Any]] = []
    overshot: list[dict[str, Any]] = []
    parsed = {n: _knowledge(n) for n in attackers}
    # with --budgets, a run still rising at its end is answered by the same attacker's longer budget
    longest: dict[Attacker, int] = {}
    for a in parsed.values():
        if a.budget is not None:
            longest[replace(a, budget=None)] = max(longest.get(replace(a, budget=None), 0), a.budget)
    for attacker, runs in attackers.items():
        a = parsed[attacker]
        superseded = a.budget is not None and longest[replace(a, budget=None)] > a.budget
        for r in runs:
            for p in r["per_image"]:
                if p.get("ssim") is not None:
                    per_image[p["truth"]] = max(per_image.get(p["truth"], -1.0), float(p["ssim"]))
            trend = improvement(r)
            if trend and trend["still_improving"] and not superseded:
                improving.append({"attacker": attacker, "run": r.get("run"), **trend})
            over = overshoot(r)
            if over:
                overshot.append({"attacker": attacker, "run": r.get("run"), **over})
    row = {k: v for k, v in best.items() if k not in ("seeds", "runs", "ssim_seed_means", "best_seed", "best_run")}
    recognisable = (sum(v >= RECOGNISABLE_SSIM for v in per_image.values()) / len(per_image)) if per_image else None
    seeds = sorted({seed for s in summaries.values() for seed in s["seeds"] if seed is not None})
    if not recognisable and len(seeds) == 1:
        # one attack seed can read a band lower than the next (docs/audit.md, "What was left at batch 4 and 8")
        not_tried = [*not_tried, ONE_SEED]
    improving.sort(key=lambda t: -t["per_100"])
    # only a peak above what the cell reports could change its verdict
    overshot = sorted((o for o in overshot if o["peak"] > float(best["ssim_mean"] or 0.0) + STILL_IMPROVING_SSIM),
                      key=lambda o: (-round(o["peak"], 6), parsed[o["attacker"]].labels != "recovered",
                                     parsed[o["attacker"]].defense == "aware"))
    row.update({
        "verdict_attacker": name,
        "verdict_run": best["best_run"],
        "ssim_worst_image": max(per_image.values()) if per_image else None,
        "recognisable_fraction": recognisable,
        "label_accuracy": max((s["label_accuracy"] for s in summaries.values() if s["label_accuracy"] is not None),
                              default=None),
        "label_attacker": max((n for n, s in summaries.items() if s["label_accuracy"] is not None),
                              key=lambda n: (summaries[n]["label_accuracy"], n == name), default=None),
        "seconds": float(sum(s["seconds"] for s in summaries.values())),
        "attackers": summaries, "by_knowledge": by_knowledge(summaries), "defended": defended,
        "not_tried": list(not_tried), "still_improving": improving, "overshot": overshot,
        "inconclusive": bool(improving or [o for o in overshot if _band(o["peak"]) > _band(best["ssim_mean"])])
                        and not recognisable,
        "seeds": seeds,
        "warnings": list(dict.fromkeys(w for runs in attackers.values() for r in runs for w in r.get("warnings") or [])),
    })
    return row


def _contrast(row: dict[str, Any]) -> str:
    """``broken if the attacker knows the labels: SSIM 0.53; with labels recovered: 0.01`` where an assumption decides."""
    known = row.get("by_knowledge") or {}
    a = _knowledge(str(row.get("verdict_attacker", "")))
    mine = {f"labels-{a.labels}", f"defense-{a.defense}", f"bn-{a.bn}", f"features-{a.features}", f"center-{a.center}",
            f"server-{'malicious' if _malicious(a.attack) else 'honest'}"}
    parts = []
    for strong, weak, words in (("labels-known", "labels-recovered", ("knows the labels", "with labels recovered")),
                                ("defense-aware", "defense-unaware", ("simulates the defense", "defense-unaware")),
                                ("bn-used", "bn-ignored", ("matches the shared BatchNorm statistics",
                                                           "ignoring them")),
                                ("features-used", "features-ignored",
                                 ("uses the last-layer features recovered from the update", "without them")),
                                ("center-used", "center-ignored",
                                 ("matches centred (the noise batches' mean update taken out)", "uncentred")),
                                ("server-malicious", "server-honest", ("is the server and sends a modified model", "with an honest server"))):
        if strong in mine and weak in known and strong in known:
            hi, lo = known[strong], known[weak]
            if hi is not None and lo is not None and hi - lo >= 0.1:
                parts.append(f"{'broken' if row.get('recognisable_fraction') else 'strongest'} if the attacker "
                             f"{words[0]}: SSIM {hi:.3f}; {words[1]}: {lo:.3f}")
    return "; ".join(parts)


def _overshot(o: dict[str, Any]) -> str:
    return (f"{describe_attacker(o['attacker'])}: mean SSIM {o['peak']:.3f} at iteration {o['peak_iteration']}, "
            f"{o['final']:.3f} at its end, while its matching loss kept falling")


def verdict(row: dict[str, Any]) -> str:
    """A plain-language reading of one cell from its worst-case values.

    Example:
        >>> verdict({"ssim_mean": 0.8, "recognisable_fraction": 1.0, "label_accuracy": 1.0})
        'leaks: 100% of images recognisable; labels recovered exactly'
        >>> verdict({"ssim_mean": 0.05, "recognisable_fraction": 0.0, "label_accuracy": 0.5,
        ...          "not_tried": ["adaptive"]})
        'not broken by these attacks at this budget; 50% of labels recovered; not tried: adaptive'
        >>> verdict({"ssim_mean": 0.2, "recognisable_fraction": 0.0, "inconclusive": True,
        ...          "still_improving": [{"attacker": "cinet_labels-known", "per_100": 0.05, "measure": "ssim"}]})
        'inconclusive: still improving (+0.050 SSIM per 100 iterations at the end, cinet, labels known)'
        >>> verdict({"ssim_mean": 0.27, "recognisable_fraction": 0.0, "inconclusive": True, "still_improving": [],
        ...          "overshot": [{"attacker": "cinet_aware_labels-recovered", "peak": 0.427, "peak_iteration": 275, "final": 0.265}]})
        'inconclusive: a shorter budget reads higher (cinet, defense-aware, labels recovered: mean SSIM 0.427 at iteration 275, 0.265 at its end, while its matching loss kept falling)'
        >>> verdict({"ssim_mean": 0.33, "recognisable_fraction": 0.0, "inconclusive": False, "still_improving": [],
        ...          "overshot": [{"attacker": "cinet_aware_labels-recovered", "peak": 0.427, "peak_iteration": 275, "final": 0.265}]})
        'partial leak: coarse shapes and colours; a shorter budget read higher (cinet, defense-aware, labels recovered: mean SSIM 0.427 at iteration 275, 0.265 at its end, while its matching loss kept falling)'
        >>> verdict({"ssim_mean": 0.03, "recognisable_fraction": 0.0, "basin": {"radius": 0.05}})
        "not broken by these attacks at this budget; the victim's gradient decorrelates within 5% pixel noise of the batch (basin radius): these attacks fail at optimisation here, which is not safety"
        >>> verdict({"ssim_mean": 0.17, "recognisable_fraction": 0.0,
        ...          "basin": {"radius": None, "mixes": [0.5, 1.0], "mean_cosine": [1.0, 0.9992]}})
        "not broken by these attacks at this budget; the victim's gradient barely depends on the images (mean layer cosine 0.9992 between the update and the gradient at pure noise): these attacks fail at optimisation here (centred matching not tried), which is not safety"
        >>> verdict({"ssim_mean": 0.17, "recognisable_fraction": 0.0, "attackers": {"cinet_labels-recovered_center-used": {}},
        ...          "basin": {"radius": None, "mixes": [1.0], "mean_cosine": [0.9992]}}).split(": ")[-1]
        'these attacks fail at optimisation here (centred matching included), which is not safety'
        >>> verdict({"ssim_mean": 0.32, "recognisable_fraction": 0.0, "attackers": {"cinet_labels-recovered_center-used": {}},
        ...          "basin": {"radius": None, "mixes": [1.0], "mean_cosine": [0.9976]}}).split(": ")[-1]
        'a better optimiser may recover more (centred matching included)'
    """
    s, acc, frac = row.get("ssim_mean"), row.get("label_accuracy"), row.get("recognisable_fraction")
    by = f" ({describe_attacker(row['verdict_attacker'])})" if row.get("verdict_attacker") else ""
    overshot_said = False
    if s is None:
        text = "not scored"
    elif frac:
        text = f"leaks: {frac:.0%} of images recognisable{by}"
    elif row.get("inconclusive") and row.get("still_improving"):
        t = row["still_improving"][0]
        unit = "SSIM" if t.get("measure") == "ssim" else "of the matching loss"
        text = (f"inconclusive: still improving (+{t['per_100']:.3f} {unit} per 100 iterations at the end, "
                f"{describe_attacker(t['attacker'])})")
    elif row.get("inconclusive") and row.get("overshot"):
        text = f"inconclusive: a shorter budget reads higher ({_overshot(row['overshot'][0])})"
        overshot_said = True
    elif s >= PARTIAL_SSIM:
        text = f"partial leak: coarse shapes and colours{by}"
    else:
        text = "not broken by these attacks at this budget"
    quiet = s is not None and not frac and not row.get("inconclusive")
    # a partial leak on such a landscape is a floor on what leaks, not a failure of the attacks
    partial = s is not None and s >= PARTIAL_SSIM

    def barrier(tried: str = "") -> str:
        return (f"a better optimiser may recover more{tried}" if partial
                else f"these attacks fail at optimisation here{tried}, which is not safety")

    at_noise = flat(row.get("basin"))
    if quiet and narrow(row.get("basin")):
        text += (f"; the victim's gradient decorrelates within {row['basin']['radius']:.0%} pixel noise of the batch "
                 f"(basin radius): {barrier()}")
    elif quiet and at_noise is not None:
        centred = any(_knowledge(n).center == "used" for n in row.get("attackers") or {})
        text += (f"; the victim's gradient barely depends on the images (mean layer cosine {min(at_noise, 0.9999):.4f} "
                 "between the update and the gradient at pure noise): "
                 + barrier(" (centred matching included)" if centred else " (centred matching not tried)"))
    base = row.get("undefended")
    if quiet and base and base.get("ssim_mean") is not None and not base.get("recognisable_fraction"):
        still = ", still improving at its budget's end" if base.get("inconclusive") else ""
        text += (f"; the undefended update is not broken either (SSIM {base['ssim_mean']:.3f}{still}): this cell says "
                 "nothing about the defense")
    if row.get("overshot") and not overshot_said:
        text += f"; a shorter budget read higher ({_overshot(row['overshot'][0])})"
    contrast = _contrast(row) if s is not None else ""
    if contrast:
        text += "; " + contrast
    who = row.get("label_attacker")
    label_by = f" (by {_knowledge(who).attack})" if who and who != row.get("verdict_attacker") else ""
    if acc is not None and acc >= 1.0:
        text += f"; labels recovered exactly{label_by}"
    elif acc is not None and acc > 0:
        text += f"; {acc:.0%} of labels recovered{label_by}"
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


def failing(rows: Sequence[dict[str, Any]], conditions: Sequence[Condition], *,
            inconclusive_fails: bool = True) -> list[tuple[dict[str, Any], Condition | None]]:
    """The (cell, condition) pairs where a cell leaks beyond a limit; with ``inconclusive_fails``, an
    inconclusive cell (still improving at its budget's end) fails too, paired with ``None``."""
    out: list[tuple[dict[str, Any], Condition | None]] = [(r, c) for r in rows for c in conditions if c.holds(r)]
    if conditions and inconclusive_fails:
        out += [(r, None) for r in rows if r.get("inconclusive") and not any(c.holds(r) for c in conditions)]
    return out


def load_runs(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """A cell folder's finished runs by attacker: ``<attacker id>-s<seed>/metrics.json``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*-s*/metrics.json")):
        attacker = path.parent.name.rsplit("-s", 1)[0]
        runs.setdefault(attacker, []).append({**json.loads(path.read_text()), "run": path.parent.name})
    return runs


def with_undefended(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each defended row with ``undefended``: the worst case of the undefended cell of its protocol and batch size.

    A defense can only be credited where the attacks break the update without it; :func:`verdict` says when
    they do not (the cell then measures the attacks, not the defense).

    Example:
        >>> rows = [{"protocol_tag": "fedsgd", "batch_size": 4, "defense_spec": "none", "ssim_mean": 0.2,
        ...          "recognisable_fraction": 0.0},
        ...         {"protocol_tag": "fedsgd", "batch_size": 4, "defense_spec": "dpsgd:1.0", "ssim_mean": 0.07,
        ...          "recognisable_fraction": 0.0}]
        >>> verdict(with_undefended(rows)[1])
        'not broken by these attacks at this budget; the undefended update is not broken either (SSIM 0.200): this cell says nothing about the defense'
    """
    base = {(r.get("protocol_tag"), r.get("batch_size")): r for r in rows if r.get("defense_spec", "none") == "none"}
    out = []
    for r in rows:
        b = base.get((r.get("protocol_tag"), r.get("batch_size")))
        defended = r.get("defense_spec", "none") != "none"
        out.append({**r, "undefended": {k: b.get(k) for k in ("ssim_mean", "recognisable_fraction", "inconclusive")}}
                   if defended and b is not None else r)
    return out


def load_row(folder: Path) -> dict[str, Any]:
    """One audit row from a finished cell folder: ``cell.json`` and every attacker's runs, worst case first.

    The row holds the cell's settings, ``epsilon``/``delta``/``dp``, and the worst case over
    attacks, attacker knowledge and seeds (:func:`worst_case`): ``ssim_mean`` etc. are the
    worst-case attacker's, ``attackers`` holds each one's.
    """
    info = json.loads((folder / "cell.json").read_text())
    privacy = info.get("privacy") or {}
    row = worst_case(load_runs(folder), defended=info.get("defense_spec", "none") != "none",
                     not_tried=info.get("not_tried", []))
    return {**row, **{k: v for k, v in info.items() if k not in ("settings", "not_tried")},
            "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"), "dp": bool(privacy)}


__all__ = ["CONDITION_METRICS", "Condition", "END_WINDOW", "OVERSHOT_SSIM", "PARTIAL_SSIM", "RECOGNISABLE_SSIM", "STILL_IMPROVING_LOSS",
           "STILL_IMPROVING_SSIM", "attacker_summary", "bootstrap_ci", "by_knowledge", "describe_attacker", "failing",
           "improvement", "load_row", "load_runs", "overshoot", "verdict", "with_undefended", "worst_case"]
