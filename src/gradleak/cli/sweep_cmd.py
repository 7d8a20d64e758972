"""``gradleak sweep GRID.yaml``: a grid of attacks x protocols x batch sizes x defenses x seeds.

Each trial is one audit cell (a full run folder under ``--out``/trials/), run as a Ray task with the
grid's ``num_cpus``/``num_gpus`` requests (``--backend ray``, on ``--address`` or a new local Ray
runtime) or in a local process pool (``--backend local``). Finished trials are skipped, so the same
command resumes an interrupted sweep. All trials are gathered into ``table.md``, ``table.csv`` and
``report.md``. The grid format is in docs/sweep.md. Exit code 1 when a trial failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradleak.cli.common import default_out


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="run a grid of trials on Ray or a local process pool, gather one table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", type=Path, help="grid file (YAML, or JSON with a .json suffix)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local process pool (default) or one Ray task per trial")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto', 'ray://HOST:10001'); default: a new local Ray runtime")
    p.add_argument("--workers", type=int, default=None,
                   help="local processes, or CPUs of a new local Ray runtime (default: all CPUs / num_cpus)")
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/sweep-<time>)")
    p.add_argument("--dry-run", action="store_true", help="2 iterations per attack: check that every trial fits")
    p.add_argument("--list", action="store_true", help="print the trials and exit")
    return p


def run(args: argparse.Namespace) -> int:
    import os

    from gradleak.audit.engine import cell_finished
    from gradleak.cli.attack_cmd import finished_note, resume_hint
    from gradleak.sweep.runner import load_grid, run_sweep, trial_folder

    # Ray's anonymous usage statistics would go over the network: off unless the user set it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    grid = load_grid(args.grid)
    out = args.out or default_out("sweep")
    if args.list:
        for t in grid.trials():
            done = cell_finished(trial_folder(out, t))
            print(f"{t.id}{'  (done)' if done else ''}")
        return 0

    def on_event(trial_id: str, status: str) -> None:
        if status != "submitted":
            print(f"{status:>8}  {trial_id}", flush=True)

    def kept(folder: Path) -> str:
        return finished_note(folder, [trial_folder(folder, t) for t in grid.trials()], "trial")

    with resume_hint("sweep", out, kept, how=f"the same command and --out {out}"):
        rows = run_sweep(grid, out=out, backend=args.backend, address=args.address, workers=args.workers,
                         dry_run=args.dry_run, on_event=on_event)
    print((out / "table.md").read_text())
    failed = sum(r["status"] != "done" for r in rows)
    print(f"{len(rows)} trials, {failed} not done; table.md, table.csv and report.md in {out}")
    return 1 if failed else 0
