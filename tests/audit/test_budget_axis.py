"""Iteration budgets as one more choice of the attacker (``--budgets``): one run folder per budget,
the worst case over them, and the settings that say which were tried."""

from __future__ import annotations

import json

import pytest

from gradleak.attacks import create
from gradleak.audit import AuditOptions
from gradleak.audit.plan import Attacker, with_budgets
from gradleak.audit.verdicts import verdict, worst_case
from gradleak.cli.main import main
from gradleak.errors import ConfigError


def test_a_budget_is_part_of_the_attackers_name_and_sets_its_iterations():
    a = Attacker("cinet", labels="known", defense="aware", budget=300)
    assert a.id == "cinet_aware_labels-known_it-300" and Attacker.parse(a.id) == a
    assert a.describe() == "cinet, defense-aware, labels known, 300 iterations"
    assert Attacker.parse("cinet_aware_labels-known").budget is None  # folders of earlier versions read as before
    config = create("cinet", {"iterations": 1000}).config
    assert a.config(config).iterations == 300 and Attacker("cinet").config(config).iterations == 1000
    assert a.config({"iterations": 1000})["iterations"] == 300
    # an attack without an iteration count (closed form) runs once, whatever the budgets
    assert [x.id for x in with_budgets([Attacker("analytic"), Attacker("ig")], [50, 200])] == [
        "analytic_labels-recovered", "ig_labels-recovered_it-50", "ig_labels-recovered_it-200"]


@pytest.mark.parametrize("budgets, seconds", [([], None), ([0, 10], None), ([10, 10], None), ([10], 30.0)])
def test_bad_budgets_are_refused_with_what_was_expected(budgets, seconds):
    with pytest.raises(ConfigError, match="audit budgets: expected"):
        AuditOptions(budgets=budgets, time_budget=seconds)


def test_an_audit_over_two_budgets_runs_each_and_takes_the_worst_case_over_them(tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["audit", "--model", "lenet", "--batch-sizes", "1", "--defenses", "none", "--attacks", "cinet",
            "--knowledge", "labels-recovered", "--budgets", "2,6", "--set", "channels=8", "--utility-steps", "0",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    cell = out / "fedsgd_n1_none"
    info = json.loads((cell / "cell.json").read_text())
    assert info["attacker_names"] == ["cinet_labels-recovered_it-2", "cinet_labels-recovered_it-6"]
    assert info["settings"]["budgets"] == [2, 6]
    ssim = {}
    for budget in (2, 6):
        metrics = json.loads((cell / f"cinet_labels-recovered_it-{budget}-s0" / "metrics.json").read_text())
        assert metrics["summary"]["iterations"] == budget
        ssim[budget] = metrics["summary"]["ssim_mean"]
    row = json.loads((out / "audit.json").read_text())["cells"][0]
    assert set(row["attackers"]) == {"cinet_labels-recovered_it-2", "cinet_labels-recovered_it-6"}
    best = max(ssim, key=ssim.__getitem__)
    assert row["verdict_attacker"] == f"cinet_labels-recovered_it-{best}"
    assert row["ssim_mean"] == pytest.approx(ssim[best], abs=1e-6)
    assert "budgets 2,6 iterations" in (out / "audit.md").read_text()
    # the same folder with other budgets is refused: its runs answer another question
    capsys.readouterr()
    other = [a if a != "2,6" else "2,8" for a in argv]
    assert main(other) == 2
    assert "new output folder" in capsys.readouterr().err


def test_a_short_budget_still_rising_is_answered_by_the_same_attackers_longer_one():
    def run(ssim, trace):
        return {"summary": {"seed": 0, "label_accuracy": 1.0, "labels": "recovered", "seconds": 1.0,
                            "iterations": max(trace)},
                "per_image": [{"truth": 0, "reconstruction": 0, "ssim": ssim, "psnr": 10.0}],
                "history": {"ssim_iteration": list(trace), "ssim": list(trace.values())}, "run": "r"}

    rising = run(0.37, {25: 0.2, 50: 0.3, 75: 0.34, 100: 0.37})  # still rising at 100
    plateau = run(0.41, {50: 0.3, 100: 0.37, 200: 0.41, 250: 0.41, 300: 0.414})
    row = worst_case({"cinet_aware_labels-recovered_it-100": [rising],
                      "cinet_aware_labels-recovered_it-300": [plateau]}, defended=True)
    assert not row["still_improving"] and not row["inconclusive"]
    assert verdict(row).startswith("partial leak: coarse shapes and colours (cinet, defense-aware, labels recovered, "
                                   "300 iterations)")
    # alone, the rising run still makes its cell inconclusive
    row = worst_case({"cinet_aware_labels-recovered_it-100": [rising]}, defended=True)
    assert row["inconclusive"]
