"""The audit engine's own overhead: planning, executing and reading back, against the attacks' time.

Runs one LeNet audit grid per backend (in this process, and on Ray) into a fresh folder and splits
its wall time into the attack runs themselves (each run's own wall clock, from its metrics.json)
and everything else: planning (building the victim, drawing the data, simulating each cell's
update, writing cell.json), dispatch (process or Ray start, workers simulating their cell's
update, queueing), the verdicts and the report. Utility rounds are off: they are measurement work,
not engine overhead. On Ray the runs overlap, so the overhead there is the wall time not covered
by the busiest worker's runs (the sum of run times divided by the workers, a lower bound on it).

Usage:
    gradleak bench audit                        # both backends, batch sizes 1,4, 4 defenses, 100 iterations
    gradleak bench audit --backends local --iterations 50 --json audit-overhead.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from gradleak.bench.common import print_table, write_json


def _one(backend: str, *, batch_sizes: list[int], defenses: list[str], attacks: str, iterations: int,
         workers: int) -> dict[str, Any]:
    from gradleak.audit import AuditOptions, audit_grid, plan_attacks, plan_runs
    from gradleak.audit.engine import run_job
    from gradleak.audit.execute import execute
    from gradleak.audit.verdicts import load_row
    from gradleak.models import build_model
    from gradleak.reporting.audit_report import write_audit_report
    from gradleak.reporting.runner import RunFolder
    from gradleak.types import ModelSpec, ServerState

    out = Path(tempfile.mkdtemp(prefix=f"gradleak-bench-audit-{backend}-"))
    try:
        spec = ModelSpec(name="lenet", activation="sigmoid")
        t0 = time.perf_counter()
        cells = audit_grid(batch_sizes=batch_sizes, defenses=defenses)
        plan = plan_attacks(attacks, ServerState.from_spec(build_model(spec, seed=42), spec), iterations=iterations)
        options = AuditOptions(utility_steps=0, progress=False, backend=backend,
                               workers=1 if backend == "local" else workers, write_images=False)
        jobs = plan_runs(spec, cells, plan, out, options)
        t1 = time.perf_counter()
        errors = execute(run_job, [(j.id, j) for j in jobs], backend=backend, workers=options.workers)
        t2 = time.perf_counter()
        rows = [load_row(out / c.name) for c in cells]
        write_audit_report(out, rows, images=False)
        t3 = time.perf_counter()
        runs = [RunFolder(p.parent).summary().wall_seconds or 0.0 for p in out.glob("*/*/metrics.json")]
        parallel = 1 if backend == "local" else workers
        busy = sum(runs) / parallel
        total = t3 - t0
        overhead = total - busy
        return {"backend": backend, "runs": len(runs), "failed": len(errors), "wall_s": total, "plan_s": t1 - t0,
                "execute_s": t2 - t1, "report_s": t3 - t2, "runs_s": sum(runs), "workers": parallel,
                "overhead_s": overhead, "overhead_share": overhead / total}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradleak bench audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="local,ray")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--defenses", default="none,noise:1e-3,prune:0.9,quantize:4")
    p.add_argument("--attacks", default="auto")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs (one run per CPU)")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args(argv)
    results = [_one(b.strip(), batch_sizes=[int(n) for n in args.batch_sizes.split(",")],
                    defenses=args.defenses.split(","), attacks=args.attacks, iterations=args.iterations,
                    workers=args.workers) for b in args.backends.split(",") if b.strip()]
    print_table(["backend", "runs", "workers", "wall s", "plan s", "execute s", "report s", "attack runs s",
                 "overhead s", "overhead share"],
                [[r["backend"], r["runs"], r["workers"], f"{r['wall_s']:.1f}", f"{r['plan_s']:.1f}",
                  f"{r['execute_s']:.1f}", f"{r['report_s']:.1f}", f"{r['runs_s']:.1f}", f"{r['overhead_s']:.1f}",
                  f"{r['overhead_share']:.1%}"] for r in results])
    if args.json:
        write_json(args.json, results)
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
