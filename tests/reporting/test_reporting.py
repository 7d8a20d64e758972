"""Reporting as a library: figures without pyplot, so a notebook's backend is left as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow  # a fresh interpreter
def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        import torch
        import gradleak.reporting, gradleak.reporting.compare, gradleak.reporting.audit_report
        import gradleak.sweep.report, gradleak.bench.quality
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


def test_report_answers_first_then_each_image_then_the_settings(tmp_path):
    import torch

    from gradleak.reporting.html import write_report

    truth, recon = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    per_image = [{"truth": j, "reconstruction": j, "ssim": s, "psnr": 20.0, "fsim": 0.8} for j, s in
                 enumerate([0.9, 0.6, 0.1])]
    metrics = {"summary": {"ssim_mean": 0.53, "psnr_mean": 20.0, "label_accuracy": 1.0, "n_images": 3},
               "per_image": per_image}
    config = {"attack": "cinet", "case": {"model": "resnet18", "batch_size": 3}, "attack_config": {"lr": 0.001}}
    page = write_report(tmp_path, config=config, metrics=metrics, truth=truth, recon=recon,
                        truth_labels=[1, 2, 3], recon_labels=[1, 2, 3]).read_text()
    verdict = page.index("2 of 3 private images recognisable (SSIM ≥ 0.5); labels exact")
    each = page.index("<h2>Each private image</h2>")
    case, settings, raw = page.index("<h2>Case</h2>"), page.index("<h2>Settings</h2>"), page.index("<details>")
    assert verdict < each < case < settings < raw
    assert page[each:case].count('<img class="t"') == 6  # truth and reconstruction, per image
    assert "<th>case.batch_size</th>" not in page and "<th>batch_size</th><td>3</td>" in page
    assert "<th>attack_config.lr</th><td>0.001</td>" in page


def test_report_without_ground_truth_says_nothing_was_scored(tmp_path):
    from gradleak.reporting.html import write_report

    page = write_report(tmp_path, config={"attack": "cinet"}, metrics={"summary": {"n_images": 2}}).read_text()
    assert "No ground truth was given, so nothing was scored" in page
