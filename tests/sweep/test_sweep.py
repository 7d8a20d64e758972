"""``gradleak sweep``: grid expansion, the local process pool with resume, and a local Ray runtime (2 CPUs)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from gradleak.cli.main import main
from gradleak.errors import ConfigError, UnknownNameError
from gradleak.sweep.runner import SweepGrid, load_grid, run_sweep, trial_folder

pytestmark = pytest.mark.slow  # process pools and a local Ray runtime

GRID_YAML = """
name: test sweep
model: {name: lenet, activation: sigmoid}
attacks:
  - {name: cinet, set: {log_every: 5, checkpoint_every: 0}}
batch_sizes: [1]
defenses: [none, "noise:1e-2"]
seeds: [0]
iterations: 10
"""


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "table.csv") as f:
        return list(csv.DictReader(f))


def test_grid_expands_attacks_protocols_batches_defenses_seeds():
    grid = SweepGrid.from_dict({
        "model": "lenet", "attacks": ["cinet", {"name": "ig", "preset": "paper", "label": "ig-paper"}],
        "batch_sizes": [1, 4], "defenses": ["none", "prune:0.9"], "seeds": [0, 1],
        "protocols": ["fedsgd", {"protocol": "fedavg", "local_steps": 2, "local_lr": 0.1}]})
    trials = grid.trials()
    assert len(trials) == 2 * 2 * 2 * 2 * 2
    assert len({t.id for t in trials}) == len(trials)
    assert trials[0].id == "cinet-s0-d0/fedsgd_n1_none"
    assert "ig-paper-s1-d0/fedavg-s2-lr0.1_n4_prune-0.9" in {t.id for t in trials}


@pytest.mark.parametrize("data, match", [
    ({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1], "typo": 1}, "unknown option"),
    ({"model": "lenet", "attacks": ["cinet"]}, "batch_sizes"),
    ({"model": "lenet", "attacks": ["cinet", "cinet"], "batch_sizes": [1]}, "distinct attacks"),
    ({"model": "lenet", "attacks": [{"name": "cinet", "sets": {}}], "batch_sizes": [1]}, "unknown option"),
    ({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1], "defenses": ["nope:1"]}, "unknown defense"),
    ({"model": "lenet", "attacks": ["cinet"], "batch_sizes": ["two"]}, "expected integers"),
    ({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1], "num_cpus": 0}, "num_cpus"),
])
def test_bad_grids_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        SweepGrid.from_dict(data).trials()


def test_unknown_attack_and_backend(tmp_path: Path):
    with pytest.raises(UnknownNameError, match="unknown attack 'nope'"):
        SweepGrid.from_dict({"model": "lenet", "attacks": ["nope"], "batch_sizes": [1]})
    grid = SweepGrid.from_dict({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1]})
    with pytest.raises(ConfigError, match="backend"):
        run_sweep(grid, out=tmp_path, backend="slurm")
    (tmp_path / "g.yaml").write_text("model: lenet\nattacks: [cinet\n")
    assert main(["sweep", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_local_backend_runs_gathers_and_resumes(tmp_path: Path, capsys):
    grid_file, out = tmp_path / "grid.yaml", tmp_path / "out"
    grid_file.write_text(GRID_YAML)
    assert main(["sweep", str(grid_file), "--backend", "local", "--workers", "2", "--out", str(out)]) == 0
    rows = _table(out)
    assert [(r["trial"], r["status"]) for r in rows] == [("cinet-s0-d0/fedsgd_n1_none", "done"),
                                                          ("cinet-s0-d0/fedsgd_n1_noise-1e-2", "done")]
    for r in rows:
        assert 0.0 <= float(r["psnr_mean"]) and -1.0 <= float(r["ssim_mean"]) <= 1.0
        assert float(r["label_accuracy"]) == 1.0
    assert "Mean over seeds" in (out / "report.md").read_text()
    assert (out / "table.md").read_text().count("| done |") == 2

    # Resume: nothing finished is re-run; a trial with a run missing its metrics.json is.
    grid = load_grid(grid_file)
    first, second = (trial_folder(out, t) for t in grid.trials())
    assert sorted(p.name for p in second.iterdir() if p.is_dir()) == ["cinet_aware_labels-recovered-s0",
                                                                      "cinet_unaware_labels-recovered-s0"]
    first = first / "cinet_labels-recovered-s0"
    stamp = (first / "metrics.json").stat().st_mtime_ns
    (second / "cinet_aware_labels-recovered-s0" / "metrics.json").unlink()
    events: list[tuple[str, str]] = []
    run_sweep(grid, out=out, backend="local", workers=1, on_event=lambda t, s: events.append((t, s)))
    assert ("cinet-s0-d0/fedsgd_n1_none", "skipped") in events
    assert ("cinet-s0-d0/fedsgd_n1_noise-1e-2", "done") in events
    assert (first / "metrics.json").stat().st_mtime_ns == stamp
    assert [r["status"] for r in _table(out)] == ["done", "done"]

    # Other settings in the same folder are refused before anything runs.
    grid_file.write_text(GRID_YAML.replace("iterations: 10", "iterations: 11"))
    capsys.readouterr()
    assert main(["sweep", str(grid_file), "--out", str(out)]) == 2
    assert "same settings" in capsys.readouterr().err


@pytest.fixture
def ray_runtime():
    import ray  # in the 'fl' extra, which 'dev' includes

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_an_interrupted_sweep_says_what_was_kept_and_how_to_continue(tmp_path: Path, capsys, monkeypatch):
    """A Ctrl-C after the first trial (the second never started): exit 130, and stderr counts the
    finished trials and names the command that continues (the same one, with its --out)."""
    import gradleak.sweep.runner as runner

    grid_file, out = tmp_path / "grid.yaml", tmp_path / "out"
    grid_file.write_text(GRID_YAML)
    real = runner.run_sweep

    def first_then_ctrl_c(grid: SweepGrid, **kw):
        real(dataclasses.replace(grid, defenses=grid.defenses[:1]), **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_sweep", first_then_ctrl_c)
    assert main(["sweep", str(grid_file), "--backend", "local", "--workers", "1", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"gradleak sweep: 1 finished trial kept in {out}; continue with the same command and --out {out}" in err


def test_ray_backend_on_a_local_runtime(tmp_path: Path, ray_runtime):
    grid = SweepGrid.from_dict({
        "name": "ray", "model": {"name": "lenet", "activation": "sigmoid"},
        "attacks": [{"name": "cinet", "set": {"log_every": 5, "checkpoint_every": 0}},
                    {"name": "ig", "label": "ig-short", "set": {"log_every": 5, "checkpoint_every": 0}}],
        "batch_sizes": [1], "defenses": ["none", "prune:0.9"], "seeds": [0], "iterations": 10, "num_cpus": 1})
    events: list[tuple[str, str]] = []
    rows = run_sweep(grid, out=tmp_path, backend="ray", on_event=lambda t, s: events.append((t, s)))
    assert ray_runtime.is_initialized()  # a runtime the caller started is left running
    assert sorted(s for _, s in events if s != "submitted") == ["done"] * 4
    table = _table(tmp_path)
    assert [r["trial"] for r in table] == [r["trial"] for r in rows] == [
        "cinet-s0-d0/fedsgd_n1_none", "cinet-s0-d0/fedsgd_n1_prune-0.9",
        "ig-short-s0-d0/fedsgd_n1_none", "ig-short-s0-d0/fedsgd_n1_prune-0.9"]
    assert all(r["status"] == "done" and r["ssim_mean"] != "" for r in table)
    assert {r["attack"] for r in table} == {"cinet", "ig-short"}
    for r in rows:
        metrics = json.loads((Path(r["folder"]) / r["verdict_run"] / "metrics.json").read_text())
        assert metrics["summary"]["attack"] == r["attack_name"]
        assert metrics["summary"]["iterations"] == 10
    report = (tmp_path / "report.md").read_text()
    assert "4 done, 0 failed" in report and "`ray` backend" in report


def test_a_grid_with_weights_attacks_that_victim_and_refuses_another_file(tmp_path: Path):
    """``weights:`` gives every trial the file's victim (recorded with its SHA-256); a file of another
    architecture is refused before anything is written, and another file at the same path on resume."""
    import hashlib

    from gradleak.models import build_model
    from gradleak.threat import save_model_state
    from gradleak.types import ModelSpec

    spec = ModelSpec("lenet", activation="relu")
    weights = tmp_path / "w.safetensors"
    save_model_state(build_model(spec, seed=7), spec, weights)
    base = {"model": {"name": "lenet", "activation": "relu"}, "batch_sizes": [1], "iterations": 2,
            "attacks": [{"name": "cinet", "set": {"channels": 8, "checkpoint_every": 0}}]}
    wrong = SweepGrid.from_dict({**base, "model": "lenet", "weights": str(weights)})  # names LeNet-sigmoid
    with pytest.raises(ConfigError, match=r"activation 'relu' \(expected 'sigmoid'\)"):
        run_sweep(wrong, out=tmp_path / "o2", backend="local", workers=1)
    assert not (tmp_path / "o2").exists()

    grid = SweepGrid.from_dict({**base, "weights": str(weights)})
    out = tmp_path / "out"
    rows = run_sweep(grid, out=out, backend="local", workers=1)  # in this process
    assert [r["status"] for r in rows] == ["done"]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    trial = trial_folder(out, grid.trials()[0])
    assert json.loads((trial / "trial.json").read_text())["weights"] == {"path": str(weights), "sha256": sha}
    case = json.loads((trial / "cinet_labels-recovered-s0" / "config.json").read_text())["case"]
    assert case["weights"] == {"path": str(weights), "sha256": sha}

    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # another file at the same path
    with pytest.raises(ConfigError, match="same settings"):
        run_sweep(grid, out=out, backend="local", workers=1)
