"""Reporting as a library: figures without pyplot, so a notebook's backend is left as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        import torch
        import gradleak.reporting, gradleak.reporting.compare, gradleak.reporting.audit_report
        import gradleak.integrations.sweep_report, gradleak.bench.quality
        from gradleak.reporting.figures import save_curves, save_grid
        save_grid(r"{tmp_path}/grid.png", torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8))
        save_curves(r"{tmp_path}/curves.png", {{"iteration": [1, 2], "loss": [1.0, 0.5]}})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "curves.png").stat().st_size > 1000
