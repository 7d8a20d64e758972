"""The privacy audit: grid expansion, one row per cell, plots and report, resume, defense effect, bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import signal_in_cinet_step
from gradleak.audit import AuditCell, ProtocolSetting, audit_grid, cell_update, parse_int_list, utility, verdict
from gradleak.audit.verdicts import Condition, bootstrap_ci, worst_case
from gradleak.cli.main import main
from gradleak.data import builtin_batch
from gradleak.errors import ConfigError
from gradleak.models import build_model
from gradleak.types import ModelSpec, ServerState

pytestmark = pytest.mark.slow  # end-to-end audits: several attacks per test

TINY = ["audit", "--model", "lenet", "--batch-sizes", "1,2", "--defenses", "none,noise:1e-1", "--attack", "cinet",
        "--iterations", "3", "--set", "channels=8", "--utility-steps", "3", "--no-progress"]
DEFENDED = ["cinet_unaware_labels-recovered", "cinet_aware_labels-recovered", "cinet_unaware_labels-known",
            "cinet_aware_labels-known"]
UNDEFENDED = ["cinet_labels-recovered", "cinet_labels-known"]
CELLS = ["fedsgd_n1_none", "fedsgd_n1_noise-1e-1", "fedsgd_n2_none", "fedsgd_n2_noise-1e-1"]
OUTPUTS = ["audit.md", "audit.csv", "ssim_vs_defense.png", "psnr_vs_defense.png", "ssim_vs_batch.png",
           "examples.png", "report.html"]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "tiny"
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def test_tiny_audit_writes_one_row_per_cell_plots_and_report(tiny_audit):
    for name in OUTPUTS:
        assert (tiny_audit / name).is_file() and (tiny_audit / name).stat().st_size > 0, name
    rows = _csv(tiny_audit / "audit.csv")
    assert [r["cell"] for r in rows] == CELLS
    assert [(r["batch_size"], r["defense"]) for r in rows] == [("1", "none"), ("1", "noise:1e-1"), ("2", "none"),
                                                               ("2", "noise:1e-1")]
    for r in rows:
        assert -1.0 <= float(r["ssim_mean"]) <= 1.0 and float(r["psnr_mean"]) > 0
        assert r["epsilon"] == "" and r["utility_steps"] == "3" and r["verdict"]
        assert 0.0 <= float(r["utility_accuracy"]) <= 1.0 and float(r["label_accuracy"]) == 1.0
    md = (tiny_audit / "audit.md").read_text().splitlines()
    assert sum(1 for line in md if line.startswith("| 1 |") or line.startswith("| 2 |")) == 4
    assert "loss after 3" in md[2] and "baseline" in md[4]
    page = (tiny_audit / "report.html").read_text()
    assert page.count('href="fedsgd_n') == 4 and "data:image/png;base64" in page and "gradleak audit" in page
    for cell in CELLS:  # a cell folder, then a full run folder per attacker: undefended cells once per label assumption
        assert (tiny_audit / cell / "cell.json").is_file() and (tiny_audit / cell / "truth.safetensors").is_file()
        attackers = DEFENDED if "noise" in cell else UNDEFENDED
        assert sorted(p.name for p in (tiny_audit / cell).iterdir() if p.is_dir()) == sorted(f"{a}-s0" for a in attackers)
        for a in attackers:
            for name in ("config.json", "metrics.json", "grid.png", "report.html", "reconstruction.safetensors"):
                assert (tiny_audit / cell / f"{a}-s0" / name).is_file(), (cell, a, name)
    info = json.loads((tiny_audit / "fedsgd_n2_noise-1e-1" / "cell.json").read_text())
    assert info["defense_spec"] == "noise:sigma=0.1" and info["utility"]["steps"] == 3
    for attacker, mode in (("cinet_unaware_labels-recovered", "off"), ("cinet_aware_labels-known", "auto")):
        config = json.loads((tiny_audit / "fedsgd_n2_noise-1e-1" / f"{attacker}-s0" / "config.json").read_text())
        assert config["update"]["defenses"] == ["noise"] and config["attack_config"]["channels"] == 8
        assert config["attack_config"]["adaptive"] == mode
        assert config["labels"] == ("given" if attacker.endswith("known") else "recovered")
        assert config["case"]["attacker_id"] == attacker
        metrics = json.loads((tiny_audit / "fedsgd_n2_noise-1e-1" / f"{attacker}-s0" / "metrics.json").read_text())
        assert metrics["info"]["matching_loss"] == ("cosine" if mode == "off" else "likelihood-l2")
    doc = json.loads((tiny_audit / "audit.json").read_text())
    assert [c["cell"] for c in doc["cells"]] == CELLS and doc["recognisable_ssim"] == 0.5
    noisy = doc["cells"][3]
    assert set(noisy["attackers"]) == set(DEFENDED) and noisy["verdict"]
    worst = max(noisy["attackers"].values(), key=lambda a: a["ssim_mean"])
    assert noisy["ssim_mean"] == worst["ssim_mean"] and noisy["ssim_ci"][0] <= noisy["ssim_mean"] <= noisy["ssim_ci"][1]
    assert noisy["ssim_worst_image"] >= noisy["ssim_mean"] - 1e-9


def test_rerun_skips_finished_cells_and_resumes_the_rest(tiny_audit, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_audit, out)
    (out / "fedsgd_n2_none" / "cinet_labels-known-s0" / "metrics.json").unlink()
    before = {c: (out / c / "cell.json").stat().st_mtime_ns for c in CELLS if c != "fedsgd_n2_none"}
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 3 and "fedsgd_n2_none: running" in printed
    assert {c: (out / c / "cell.json").stat().st_mtime_ns for c in before} == before
    assert len(_csv(out / "audit.csv")) == 4


def test_ctrl_c_in_an_audit_says_what_was_kept_and_the_rerun_continues(tmp_path, capsys, monkeypatch):
    """A Ctrl-C inside the third attack run: exit 130, stderr names the finished cells kept and the
    command that continues (the same one, with its --out); that rerun finishes every cell."""
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        signal_in_cinet_step(m, lambda it, runs: it == 2 and runs == 3)
        assert main([*TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert re.search(rf"gradleak audit: [12] finished cells? kept in {re.escape(str(out))}; continue with the "
                     rf"same command and --out {re.escape(str(out))}", err), err
    assert main([*TINY, "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert len(_csv(out / "audit.csv")) == 4


def test_fail_if_gates_on_the_worst_case_and_no_images_writes_numbers_only(tmp_path, capsys):
    out = tmp_path / "gate"
    argv = ["audit", "--model", "lenet", "--batch-sizes", "1", "--defenses", "none,prune:0.9", "--attack", "cinet",
            "--iterations", "2", "--set", "channels=8", "--utility-steps", "0", "--no-progress", "--seeds", "0,1",
            "--no-images", "--out", str(out)]
    assert main([*argv, "--fail-if", "ssim>-1"]) == 1  # every cell leaks beyond an impossible limit
    err = capsys.readouterr().err
    assert err.count("leaks beyond --fail-if ssim>-1") == 2
    assert main([*argv, "--fail-if", "ssim>0.99", "--fail-if", "recognisable>0.5"]) == 0
    assert main([*argv, "--fail-if", "ssim~0.5"]) == 2
    assert "METRIC OP NUMBER" in capsys.readouterr().err
    runs = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/metrics.json"))
    assert runs == sorted([f"fedsgd_n1_none/{a}-s{s}/metrics.json" for a in UNDEFENDED for s in (0, 1)]
                          + [f"fedsgd_n1_prune-0.9/{a}-s{s}/metrics.json" for a in DEFENDED for s in (0, 1)])
    for pattern in ("**/*.png", "**/reconstruction.safetensors", "**/truth.safetensors", "**/checkpoint.*"):
        # plots of numbers (curves, metric against defense) stay; pictures of the data do not
        assert not [p for p in out.glob(pattern) if p.name != "curves.png" and "_vs_" not in p.name], pattern
    assert "data:image/png" in (out / "report.html").read_text()  # the plots of numbers only
    cell = json.loads((out / "audit.json").read_text())["cells"][1]
    assert cell["seeds"] == [0, 1] and cell["attackers"]["cinet_aware_labels-recovered"]["runs"] == 2


def test_rerun_with_other_settings_is_refused(tiny_audit, capsys):
    argv = [a if a != "3" else "4" for a in TINY]  # other iterations
    assert main([*argv, "--out", str(tiny_audit)]) == 2
    assert "same settings" in capsys.readouterr().err


def test_strong_noise_leaks_less_than_none(tmp_path):
    # analytic inversion of a 1-layer model, batch 1: exact without noise (SSIM 1.000, measured), 0.08 at sigma 1
    out = tmp_path / "noise"
    assert main(["audit", "--model", "linear", "--batch-sizes", "1", "--defenses", "none,noise:1.0,dpsgd:1.0",
                 "--attack", "analytic", "--set", "restarts=1", "--set", "refine_steps=3",
                 "--set", "alternations=3", "--utility-steps", "0", "--no-progress", "--out", str(out)]) == 0
    rows = {r["defense"]: r for r in _csv(out / "audit.csv")}
    assert float(rows["none"]["ssim_mean"]) > 0.95
    assert float(rows["noise:1.0"]["ssim_mean"]) < 0.3
    assert rows["none"]["verdict"].startswith("leaks: 100% of images recognisable")
    # analytic has no adaptive mode: the defended cells say so instead of reading as protected
    assert "not tried: analytic defense-aware (no adaptive mode)" in rows["noise:1.0"]["verdict"]
    assert rows["none"]["not_tried"] == ""
    assert float(rows["dpsgd:1.0"]["epsilon"]) > 0 and rows["none"]["epsilon"] == ""
    assert "loss after" not in (out / "audit.md").read_text()


@pytest.mark.parametrize("defenses, message", [
    ("none,noise:abc", "expected a number"),
    ("none,prune:1.0", "[0.0, 1.0)"),
    ("noise:-1", "[0.0, inf)"),
    ("none,bogus:1", "unknown defense"),
    ("", "expected a comma-separated list"),
    ("none,,noise:1", "empty item"),
    ("noise:1e-1,noise:0.1", "each setting once"),
])
def test_bad_defense_strings_exit_2_with_one_line(defenses, message, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["audit", "--model", "lenet", "--defenses", defenses, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradleak audit: error:") and "\n" not in err and message in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", ""], "--batch-sizes"),
    (["--batch-sizes", "1,0"], "positive integers"),
    (["--batch-sizes", "2,2"], "distinct"),
    (["--batch-size", "4"], "--batch-sizes"),
    (["--defenses", "none,dpsgd:1.0", "--model", "resnet18"], "--bn-mode eval"),
    (["--defenses", "none,dpsgd:1.0", "--protocol", "fedavg"], "DP-FedAvg"),
    (["--protocol", "fedprox"], "'fedsgd' or 'fedavg'"),
    (["--batch-sizes", "1,900"], "at most 824 images"),  # checked before the first cell runs
])
def test_bad_grid_exits_2(argv, message, tmp_path, capsys):
    assert main(["audit", "--model", "lenet", *argv, "--out", str(tmp_path / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_grid_order_names_and_protocol_tags():
    fedavg = ProtocolSetting("fedavg", local_steps=5, local_lr=0.1, clients=4)
    cells = audit_grid(batch_sizes=[4, 1], defenses=["none", "clip:1+noise:1e-3"], protocols=[ProtocolSetting(), fedavg])
    assert [c.name for c in cells] == [
        "fedsgd_n4_none", "fedsgd_n4_clip-1+noise-1e-3", "fedsgd_n1_none", "fedsgd_n1_clip-1+noise-1e-3",
        "fedavg-s5-lr0.1-k4_n4_none", "fedavg-s5-lr0.1-k4_n4_clip-1+noise-1e-3", "fedavg-s5-lr0.1-k4_n1_none",
        "fedavg-s5-lr0.1-k4_n1_clip-1+noise-1e-3"]
    assert parse_int_list(" 1, 4 ,8", what="x") == [1, 4, 8]
    with pytest.raises(ConfigError, match="positive local learning rate"):
        ProtocolSetting("fedavg", local_steps=2)
    with pytest.raises(ConfigError, match="at least one"):
        audit_grid(batch_sizes=[], defenses=["none"])


def test_cell_update_follows_protocol_clients_and_defense():
    spec = ModelSpec("lenet")
    server = ServerState.from_spec(build_model(spec, seed=42), spec)
    batch = builtin_batch(4, source="cifar10")
    cell = AuditCell(2, "prune:0.5", ProtocolSetting("fedavg", local_steps=3, local_lr=0.1, clients=2))
    update = cell_update(server, batch.images, batch.labels, cell=cell, generator=torch.Generator().manual_seed(0))
    assert (update.protocol, update.kind, update.num_samples, update.num_clients) == ("aggregate", "delta", 4, 2)
    assert update.defenses == ("prune",) and update.local_steps == 3
    plain = AuditCell(4, "none", ProtocolSetting())
    before = utility(server, batch.images, batch.labels, cell=plain, steps=0, lr=0.1, generator=torch.Generator())
    after = utility(server, batch.images, batch.labels, cell=plain, steps=10, lr=0.5, generator=torch.Generator())
    assert before["loss"] == pytest.approx(after["loss_start"]) and after["loss"] < after["loss_start"]


def test_verdict_thresholds():
    assert verdict({"ssim_mean": 0.5, "recognisable_fraction": 0.25, "label_accuracy": 1.0}) == (
        "leaks: 25% of images recognisable; labels recovered exactly")
    assert verdict({"ssim_mean": 0.45, "recognisable_fraction": 0.0, "label_accuracy": 0.5}).startswith("partial leak")
    text = verdict({"ssim_mean": 0.1, "recognisable_fraction": 0.0, "label_accuracy": 0.0,
                    "not_tried": ["adaptive (idlg has no adaptive mode)"]})
    assert text.startswith("not broken by these attacks at this budget") and "not tried: adaptive" in text
    assert "safe" not in text


def _run(ssims, seed):
    return {"summary": {"seed": seed, "label_accuracy": 1.0, "seconds": 1.0, "iterations": 5},
            "per_image": [{"truth": j, "reconstruction": j, "ssim": v, "psnr": 10.0, "fsim": 0.5} for j, v in
                          enumerate(ssims)], "run": f"x-s{seed}"}


def test_worst_case_is_over_attackers_seeds_and_images():
    row = worst_case({"unaware": [_run([0.1, 0.2], 0), _run([0.1, 0.3], 1)],
                      "adaptive": [_run([0.9, 0.1], 0), _run([0.5, 0.1], 1)]}, defended=True)
    assert row["verdict_attacker"] == "adaptive" and row["verdict_run"] == "x-s0"
    # over seeds the attacker's best seed counts (seed 0: 0.5), not the seeds' mean (0.4)
    assert row["ssim_mean"] == pytest.approx(0.5) and row["ssim_worst_image"] == 0.9
    assert row["recognisable_fraction"] == 0.5  # image 0 by adaptive seed 0; image 1 by nobody
    lo, hi = row["ssim_ci"]
    assert 0.1 <= lo < 0.5 < hi <= 0.9
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert Condition.parse("ssim>0.49").holds(row) and not Condition.parse("ssim>=0.51").holds(row)
    assert Condition.parse("recognisable>=0.5").holds(row) and Condition.parse("ssim_worst_image>0.8").holds(row)
