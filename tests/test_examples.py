"""The prepared device checks (examples/gpu_check.sh, gpu_realistic.sh) and examples, run at tiny sizes on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _script_env(out: Path) -> dict[str, str]:
    """This interpreter as `python` and its `gradleak` first on PATH, whether or not a venv is active;
    one torch thread, so that the scripts' steps do not oversubscribe the cores beside another test worker."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@pytest.mark.slow
def test_the_device_check_script_runs_on_a_cpu(tmp_path):
    """examples/gpu_check.sh at tiny sizes (DEVICE=cpu): known to work before a GPU is at hand."""
    root = Path(__file__).parents[1]
    done = subprocess.run(["bash", str(root / "examples" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                          env=_script_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "check.json").read_text())
    assert summary["device"] == "cpu" and set(summary["step_ms"]) == {"step-b2-tf32off", "step-b2-tf32on"}
    assert summary["quality"] and summary["memory"]
    assert "| step-b2-tf32off |" in (tmp_path / "check.md").read_text()


@pytest.mark.slow
def test_the_second_device_check_runs_on_a_cpu(tmp_path):
    """examples/gpu_realistic.sh at tiny budgets: every step writes its records, no images come back."""
    root = Path(__file__).parents[1]
    done = subprocess.run(["bash", str(root / "examples" / "gpu_realistic.sh")], cwd=root, capture_output=True,
                          text=True, env=_script_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for run in ("b64-plain/cinet", "b64-bn/cinet", "relu-b1/ig", "relu-b1/cinet"):
        assert (tmp_path / run / "metrics.json").is_file(), (run, done.stdout[-2000:], done.stderr[-2000:])
        summary = json.loads((tmp_path / run / "metrics.json").read_text())["summary"]
        assert summary["iterations"] >= 1 and summary["ssim_mean"] is not None
    threat = json.loads((tmp_path / "b64-bn" / "cinet" / "metrics.json").read_text())["threat_model"]
    assert threat["batchnorm_statistics"].startswith("shared by the client, matched")
    assert json.loads((tmp_path / "quality-reference.json").read_text())["results"]
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_the_flower_inspect_example_refuses_or_leaks(tmp_path, check):
    """examples/flower_inspect: clients with the mod refuse both malicious rounds; without it, both leak."""
    root = Path(__file__).parents[1]
    argv = [sys.executable, str(root / "examples" / "flower_inspect" / "run_inspect.py"), "--out", str(tmp_path)]
    done = subprocess.run(argv + ([] if check else ["--no-check"]), cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 6
    for key, r in results.items():
        if key.startswith("round 1"):
            assert r["outcome"] == "trained"
        elif check:
            assert r["outcome"] == "refused" and ("imprint-rows" if "imprint" in key else "trap-units") in r["why"]
        else:
            assert r["outcome"] == "trained" and int(r["leaked"].split(" of ")[0]) >= 6, r
