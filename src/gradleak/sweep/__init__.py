"""Sweeps: grids of attacks x batch sizes x defenses x seeds as trials, on a process pool or Ray.

* :mod:`gradleak.sweep.runner`: the grid (:class:`~gradleak.sweep.runner.SweepGrid`, read from YAML
  or JSON), its trials and their folders, and :func:`~gradleak.sweep.runner.run_sweep` on a local
  process pool or a Ray cluster, resumable.
* :mod:`gradleak.sweep.report`: one row per trial gathered into ``table.md``/``table.csv`` and a plot.

Ray is imported only when the Ray backend runs.
"""

from gradleak.sweep.runner import SweepGrid, load_grid, run_sweep, trial_folder

__all__ = ["SweepGrid", "load_grid", "run_sweep", "trial_folder"]
