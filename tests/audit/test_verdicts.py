"""Verdicts over attacks and knowledge, and budgets that say when they ran out (recorded traces)."""

from __future__ import annotations

import pytest

from gradleak.audit.verdicts import (
    END_WINDOW,
    ONE_SEED,
    OVERSHOT_SSIM,
    STILL_IMPROVING_SSIM,
    Condition,
    attacker_summary,
    failing,
    improvement,
    overshoot,
    verdict,
    with_undefended,
    worst_case,
)


def _run(ssims, seed=0, *, trace=None, labels="recovered", accuracy=1.0, loss=None):
    """A run's metrics.json: per-image SSIM, an SSIM trace over iterations (``{iteration: mean SSIM}``)
    and optionally a matching-loss trace (``{iteration: loss}``)."""
    trace, loss = trace or {}, loss or {}
    return {"summary": {"seed": seed, "label_accuracy": accuracy, "labels": "given" if labels == "known" else labels,
                        "seconds": 1.0, "iterations": max(trace, default=5)},
            "per_image": [{"truth": j, "reconstruction": j, "ssim": v, "psnr": 10.0} for j, v in enumerate(ssims)],
            "history": {"ssim_iteration": list(trace), "ssim": list(trace.values()), "iteration": list(loss),
                        "loss": list(loss.values())}, "run": f"x-s{seed}"}


# Mean SSIM every 25 iterations of a CI-Net run at batch 64 (README, large batches: 0.188 at 50,
# 0.228 at 100, ..., 0.391 at 450, 0.418 at 500): climbing at its budget's end.
CLIMBING = {25: 0.156, 50: 0.188, 100: 0.228, 150: 0.255, 300: 0.324, 400: 0.365, 450: 0.391, 500: 0.418}
# A run on a plateau: it rose early, then wobbled within 0.01 (sign-Adam's oscillation).
PLATEAU = {25: 0.05, 50: 0.15, 75: 0.21, 100: 0.24, 150: 0.25, 200: 0.245, 250: 0.252, 300: 0.249}


def test_a_run_still_climbing_at_its_end_reads_inconclusive_not_unbroken():
    trend = improvement(_run([0.4], trace=CLIMBING))
    assert trend is not None and trend["still_improving"] and trend["measure"] == "ssim"
    assert trend["window"] == [pytest.approx(500 * (1 - END_WINDOW)), 500]
    assert trend["rise"] == pytest.approx(0.418 - 0.365) and trend["per_100"] == pytest.approx(0.053)
    row = worst_case({"cinet_labels-recovered": [_run([0.40, 0.43], trace=CLIMBING)]}, defended=False)
    assert row["inconclusive"] and row["still_improving"][0]["attacker"] == "cinet_labels-recovered"
    text = verdict(row)
    assert text.startswith("inconclusive: still improving (+0.053 SSIM per 100 iterations at the end, cinet, labels "
                           "recovered)"), text
    assert "not broken" not in text


def test_a_plateaued_run_reads_not_broken():
    trend = improvement(_run([0.25], trace=PLATEAU))
    assert trend is not None and not trend["still_improving"] and trend["rise"] < STILL_IMPROVING_SSIM
    row = worst_case({"cinet_labels-recovered": [_run([0.24, 0.26], trace=PLATEAU)]}, defended=False)
    assert not row["inconclusive"] and verdict(row).startswith("not broken by these attacks at this budget")


def test_a_broken_cell_is_broken_even_while_a_run_still_climbs():
    row = worst_case({"cinet_labels-recovered": [_run([0.9, 0.2], trace=CLIMBING)]}, defended=False)
    assert not row["inconclusive"] and verdict(row).startswith("leaks: 50% of images recognisable")


def _cell(defense, ssims, batch=4, protocol="fedsgd"):
    row = worst_case({"cinet_labels-recovered": [_run(ssims, trace=PLATEAU)]}, defended=defense != "none")
    return {**row, "defense_spec": defense, "batch_size": batch, "protocol_tag": protocol}


def test_a_defense_is_credited_only_where_the_attacks_break_the_undefended_update():
    # ResNet-18-sigmoid in eval mode (docs/audit.md): undefended 0.21, DP-SGD 0.07: the DP-SGD cell says
    # nothing about DP-SGD; where the undefended update leaks, the same "not broken" carries no such note
    rows = with_undefended([_cell("none", [0.2, 0.22]), _cell("dpsgd:1.0", [0.07, 0.08]),
                            _cell("none", [0.9, 0.95], batch=1), _cell("noise:1e-3", [0.2, 0.3], batch=1),
                            _cell("prune:0.9", [0.1], batch=8)])  # batch 8 has no undefended cell
    unbroken_base, dp, leaky_base, noise, alone = (verdict(r) for r in rows)
    assert "undefended" not in unbroken_base and "undefended" not in leaky_base
    assert dp.startswith("not broken by these attacks at this budget; the undefended update is not broken either "
                         "(SSIM 0.210): this cell says nothing about the defense"), dp
    assert noise == ("not broken by these attacks at this budget; labels recovered exactly; not tried: more attack "
                     "seeds (one ran)")
    assert "undefended" not in alone
    climbing = with_undefended([{**_cell("none", [0.2]), "inconclusive": True}, _cell("sign", [0.1])])[1]
    assert "not broken either (SSIM 0.200, still improving at its budget's end)" in verdict(climbing)


def test_one_seed_is_named_as_not_enough_unless_an_image_came_back():
    # the flat ResNet-18-sigmoid at batch 4 (docs/audit.md): seed 0 read 0.388, seeds 1 and 2 0.448, 0.471
    one = worst_case({"cinet_labels-recovered": [_run([0.38, 0.40], trace=PLATEAU)]}, defended=False,
                     not_tried=["labels known"])
    assert one["seeds"] == [0] and one["not_tried"] == ["labels known", ONE_SEED]
    assert verdict(one).endswith("not tried: labels known, more attack seeds (one ran)"), verdict(one)
    three = worst_case({"cinet_labels-recovered": [_run([0.38, 0.40], seed=s, trace=PLATEAU) for s in (0, 1, 2)]},
                       defended=False)
    assert three["seeds"] == [0, 1, 2] and ONE_SEED not in three["not_tried"] and "not tried" not in verdict(three)
    leaked = worst_case({"cinet_labels-recovered": [_run([0.6, 0.2], trace=PLATEAU)]}, defended=False)
    assert ONE_SEED not in leaked["not_tried"]  # an image came back: another seed cannot make it safer


def test_the_worst_case_over_seeds_is_the_best_seed_not_their_mean():
    # ResNet-18-sigmoid (eval), batch 8, prune:0.5 (docs/audit.md): seed 0 read 0.320 (a partial leak),
    # seeds 1 and 2 0.280 and 0.312; pooled to their mean the cell had read "not broken"
    runs = [_run([0.30, 0.34], seed=0, trace=PLATEAU), _run([0.27, 0.29], seed=1, trace=PLATEAU),
            _run([0.30, 0.324], seed=2, trace=PLATEAU)]
    row = worst_case({"cinet_labels-recovered": runs}, defended=True)
    assert row["ssim_mean"] == pytest.approx(0.32) and row["verdict_run"] == runs[0].get("run")
    assert verdict(row).startswith("partial leak"), verdict(row)
    alone = worst_case({"cinet_labels-recovered": runs[:1]}, defended=True)
    assert alone["ssim_mean"] == row["ssim_mean"]  # more seeds never make a cell read safer
    assert attacker_summary(runs)["ssim_seed_means"] == pytest.approx([0.32, 0.28, 0.312])
    assert attacker_summary(runs)["best_seed"] == 0


def test_without_an_ssim_trace_the_matching_loss_decides():
    falling = {"history": {"iteration": [10, 20, 30, 40, 50], "loss": [1.0, 0.5, 0.3, 0.2, 0.1]}}
    flat = {"history": {"iteration": [10, 20, 30, 40, 50], "loss": [1.0, 0.5, 0.31, 0.305, 0.30]}}
    assert improvement(falling)["still_improving"] and improvement(falling)["measure"] == "loss"
    assert not improvement(flat)["still_improving"]
    assert improvement({"history": {}}) is None and improvement({"history": {"ssim_iteration": [1], "ssim": [0.1]}}) is None


def test_the_verdict_names_the_assumption_that_broke_the_cell():
    """The prune:0.9 case's shape: recovered labels wrong, known labels break it."""
    row = worst_case({"cinet_unaware_labels-recovered": [_run([0.01, 0.02], accuracy=0.5)],
                      "cinet_unaware_labels-known": [_run([0.73, 0.38], labels="known")]}, defended=True)
    assert row["verdict_attacker"] == "cinet_unaware_labels-known"
    assert row["by_knowledge"]["labels-known"] == pytest.approx(0.555)
    assert row["by_knowledge"]["labels-recovered"] == pytest.approx(0.015)
    assert row["label_accuracy"] == 0.5 and row["label_attacker"] == "cinet_unaware_labels-recovered"  # not the given
    text = verdict(row)
    assert text.startswith("leaks: 50% of images recognisable (cinet, defense-unaware, labels known)"), text
    assert "broken if the attacker knows the labels: SSIM 0.555; with labels recovered: 0.015" in text
    assert "labels recovered exactly" not in text and "50% of labels recovered (by cinet)" in text


def test_the_verdict_says_when_the_shared_batchnorm_statistics_decided():
    row = worst_case({"ig_labels-recovered_bn-used": [_run([0.62, 0.58])],
                      "ig_labels-recovered_bn-ignored": [_run([0.05, 0.07])]}, defended=False)
    assert row["verdict_attacker"] == "ig_labels-recovered_bn-used"
    text = verdict(row)
    assert "(ig, labels recovered, BatchNorm statistics used)" in text, text
    assert "if the attacker matches the shared BatchNorm statistics: SSIM 0.600; ignoring them: 0.060" in text


def test_a_tie_is_credited_to_the_attacker_who_knows_less():
    same = [_run([0.6, 0.6])]
    row = worst_case({"ig_aware_labels-known": same, "ig_unaware_labels-recovered": same,
                      "ig_aware_labels-recovered": same}, defended=True)
    assert row["verdict_attacker"] == "ig_unaware_labels-recovered"


def test_fail_if_counts_an_inconclusive_cell_unless_allowed():
    climbing = {**worst_case({"cinet_labels-recovered": [_run([0.3], trace=CLIMBING)]}, defended=False), "cell": "c"}
    limit = [Condition.parse("ssim>0.5")]
    assert failing([climbing], limit) == [(climbing, None)]
    assert failing([climbing], limit, inconclusive_fails=False) == []
    assert failing([climbing], []) == []  # no gate asked for


# CI-Net, defense-aware, against `sign` (LeNet-sigmoid, batch 1, 1000 iterations; runs/audit-lenet-sign-1000,
# docs/audit.md): the mean SSIM peaked at 0.427 at iteration 275 and ended at 0.269 while the matching
# loss kept falling, every 250 iterations here.
SIGN_SSIM = {25: 0.22, 125: 0.37, 275: 0.427, 425: 0.398, 575: 0.338, 725: 0.322, 875: 0.266, 1000: 0.269}
SIGN_LOSS = {25: 2.07e-2, 275: 4.63e-3, 525: 2.56e-3, 775: 2.02e-3, 1000: 1.52e-3}


def test_a_run_that_fell_from_its_peak_while_its_loss_kept_falling_overshot_its_budget():
    run = _run([0.269], trace=SIGN_SSIM, loss=SIGN_LOSS)
    over = overshoot(run)
    assert over == {"peak": 0.427, "peak_iteration": 275, "final": 0.269, "fall": pytest.approx(0.158)}
    assert over["fall"] >= OVERSHOT_SSIM
    # the loss rose after the peak: the attacker had a signal to stop on, not an overshoot
    assert overshoot(_run([0.269], trace=SIGN_SSIM, loss={**SIGN_LOSS, 525: 5e-3, 775: 6e-3, 1000: 7e-3})) is None
    # a plateau's wobble is no overshoot
    assert overshoot(_run([0.25], trace=PLATEAU, loss={25: 1.0, 300: 0.5})) is None

    # alone in its cell, the run's peak lies in a higher band (partial leak) than its end: inconclusive
    row = worst_case({"cinet_aware_labels-recovered": [run]}, defended=True)
    assert row["inconclusive"] and not row["still_improving"]
    assert verdict(row).startswith("inconclusive: a shorter budget reads higher (cinet, defense-aware, labels "
                                   "recovered: mean SSIM 0.427 at iteration 275, 0.269 at its end")
    # beside a plateaued run in the same band (IG at 0.328 there) the verdict stands and says it
    ig = _run([0.328], trace={10: 0.02, 410: 0.398, 700: 0.33, 1000: 0.328}, loss={10: 0.1, 500: 8e-3, 1000: 6.8e-3})
    row = worst_case({"cinet_aware_labels-recovered": [run], "ig_aware_labels-recovered": [ig]}, defended=True)
    assert not row["inconclusive"] and [o["attacker"] for o in row["overshot"]] == ["cinet_aware_labels-recovered"]
    text = verdict(row)
    assert text.startswith("partial leak") and "a shorter budget read higher (cinet, defense-aware" in text
    # a peak at or below what the cell reports changes nothing
    row = worst_case({"cinet_aware_labels-recovered": [run], "ig_aware_labels-recovered": [_run([0.5], trace=PLATEAU)]},
                     defended=True)
    assert row["overshot"] == [] and "shorter budget" not in verdict(row)


# Centred CI-Net on ResNet-18-sigmoid in eval mode, batch 1, 1000 iterations (docs/attacks.md): mean SSIM every
# 100 iterations from 25, and its matching loss (per-layer cosine; noisy, lowest at the end).
CENTRED_SSIM = {25: 0.181, 125: 0.459, 225: 0.525, 325: 0.542, 425: 0.554, 525: 0.543, 625: 0.531, 725: 0.511,
                825: 0.493, 925: 0.485, 1000: 0.480}
CENTRED_LOSS = {100: 0.0381, 200: 0.0456, 300: 0.0535, 400: 0.0526, 500: 0.0519, 600: 0.0528, 700: 0.0519,
                800: 0.0343, 900: 0.0518, 1000: 0.0283}


def test_a_smaller_fall_that_crosses_a_band_overshot_and_one_inside_a_band_did_not():
    run = _run([0.480], trace=CENTRED_SSIM, loss=CENTRED_LOSS)
    over = overshoot(run)
    assert over is not None and over["peak"] == 0.554 and over["fall"] < OVERSHOT_SSIM
    row = worst_case({"cinet_labels-recovered_center-used": [run]}, defended=False)
    assert row["inconclusive"] and verdict(row).startswith("inconclusive: a shorter budget reads higher (cinet, "
                                                           "labels recovered, centred matching: mean SSIM 0.554")
    inside = {i: v - 0.1 for i, v in CENTRED_SSIM.items()}  # 0.454 -> 0.380: the same fall inside one band
    assert overshoot(_run([0.380], trace=inside, loss=CENTRED_LOSS)) is None
