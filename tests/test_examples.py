"""The prepared device check (examples/gpu_check.sh), run at tiny sizes on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_device_check_script_runs_on_a_cpu(tmp_path):
    """examples/gpu_check.sh at tiny sizes (DEVICE=cpu): known to work before a GPU is at hand."""
    root = Path(__file__).parents[1]
    done = subprocess.run(["bash", str(root / "examples" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path)}, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "check.json").read_text())
    assert summary["device"] == "cpu" and set(summary["step_ms"]) == {"step-b2-tf32off", "step-b2-tf32on"}
    assert summary["quality"] and summary["memory"]
    assert "| step-b2-tf32off |" in (tmp_path / "check.md").read_text()
