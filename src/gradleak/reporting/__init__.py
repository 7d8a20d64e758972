"""Run folders: run an attack on a case, score it against the truth, and write what a person reads."""

from gradleak.reporting.figures import save_curves, save_grid
from gradleak.reporting.html import write_report
from gradleak.reporting.runner import AttackRun, RunFolder, RunOptions, RunSummary, run_attack

__all__ = ["AttackRun", "RunFolder", "RunOptions", "RunSummary", "run_attack", "save_curves", "save_grid", "write_report"]
