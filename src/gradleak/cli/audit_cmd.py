"""``gradleak audit``: what leaks from MY model, batch size, protocol and defense?

Expands the grid batch size x defense (x protocol settings), simulates each client update on the
case's data (built-in photos by default), applies the defense on the client, and attacks it with
every attack that applies to the victim (``--attacks auto``), each under every assumption about
what the attacker knows (``--knowledge``: labels recovered or known, defense ignored or simulated,
shared BatchNorm statistics used or ignored where ``--share-bn-stats`` has the client share them,
the last-layer features recovered from the update used or not by the attacks that have that variant)
and with every ``--seeds`` seed, each a full run folder under ``--out/<cell>/``. The verdict is the
worst case, names the attacker that broke the cell, and reads "inconclusive" where a run was still
improving at the end of its budget. It writes ``audit.md``, ``audit.csv``, ``ssim_vs_defense.png``,
``psnr_vs_defense.png``, ``ssim_vs_batch.png``, ``examples.png`` and ``report.html``. Runs go in
this process, a process pool (``--workers``) or on Ray (``--backend ray``). A finished run is
kept, so an interrupted audit resumes by running the same command again; ``--fail-if`` makes it
exit 1 when a cell leaks beyond a limit or is inconclusive (a CI gate). Example:

    gradleak audit --model lenet --batch-sizes 1,4,8 \\
        --defenses none,noise:1e-3,noise:1e-2,prune:0.9,dpsgd:1.0 --iterations 300 --out runs/audit
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from gradleak.attacks import ATTACKS
from gradleak.audit import AttackPlan, AuditOptions, KnowledgeAxes, audit_grid, parse_int_list, plan_attacks, run_audit
from gradleak.audit.budgets import budget_warnings, trained_warnings
from gradleak.audit.engine import victim
from gradleak.audit.execute import BACKENDS
from gradleak.audit.verdicts import Condition, failing, verdict
from gradleak.cli.attack_cmd import finished_note, resume_hint
from gradleak.cli.common import (
    add_attack,
    add_case,
    add_common,
    add_threat,
    case_spec,
    check_device,
    default_out,
    parse_overrides,
    protocol_settings,
)
from gradleak.config import split_preset
from gradleak.defenses import split_defenses
from gradleak.errors import ConfigError
from gradleak.reporting.audit_report import write_audit_report
from gradleak.types import ModelSpec


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="run an attack across batch sizes x defenses and write a privacy report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case(p)
    p.set_defaults(batch_size=None)  # the audit takes --batch-sizes; a stray --batch-size is refused in run()
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated images per client (default 1,4,8)")
    p.add_argument("--defenses", default="none,noise:1e-3,noise:1e-2,prune:0.9",
                   help="comma-separated defense settings, in plot order (default none,noise:1e-3,noise:1e-2,"
                        "prune:0.9; add dpsgd:1.0 for victims without train-mode BatchNorm)")
    add_threat(p, grid=True)
    p.add_argument("--utility-steps", type=int, default=20,
                   help="T rounds of the victim under each defense to measure its loss/accuracy cost (0: skip; default 20)")
    p.add_argument("--utility-lr", type=float, default=0.1, help="server learning rate of those FedSGD rounds (default 0.1)")
    p.add_argument("--seconds", type=float, default=None,
                   help="wall-clock budget of each attack run: the run sizes its iteration count to fill it (a short "
                        "probe), so its schedule completes in time; with --iterations that count stands instead")
    p.add_argument("--budgets", default=None,
                   help="iteration budgets every iterative attacker runs with instead of --iterations, comma-separated (e.g. 100,300,1000; "
                        "one run folder each): the worst case is taken over them too, since against a many-to-one "
                        "defense a longer run can read lower (default: --iterations or each attack's own)")
    p.add_argument("--seeds", default=None,
                   help="attack seeds every attacker runs with, comma-separated (default: --seed); the verdict is "
                        "the worst case over attackers and seeds, with a bootstrap 95%% interval")
    p.add_argument("--fail-if", action="append", default=[], metavar="CONDITION",
                   help="exit 1 when any cell's worst case meets it, e.g. 'ssim>0.5', 'recognisable>0', "
                        "'label_accuracy>=1' (repeatable; metrics: ssim, ssim_ci_high, ssim_worst_image, "
                        "recognisable, psnr, fsim, label_accuracy)")
    p.add_argument("--no-images", action="store_true",
                   help="write numbers only: no reconstructions, grids, truth copies or checkpoints on disk")
    p.add_argument("--epsilon-rounds", type=int, default=100,
                   help="R of the 'epsilon after R rounds' axis of ssim_vs_epsilon.png (DP-SGD cells; default 100)")
    p.add_argument("--attacks", default=None,
                   help="auto (default): every attack that applies to the victim (gradleak list attacks); or "
                        "comma-separated names. An attack named that cannot apply is refused")
    p.add_argument("--knowledge", default=None,
                   help="the attacker assumptions to try: all (default) or some of labels-recovered, labels-known, "
                        "defense-unaware, defense-aware, bn-used, bn-ignored (with --share-bn-stats), "
                        "features-used, features-ignored (dlg, idlg, ig; a last layer with a bias), center-used, "
                        "center-ignored (cinet, ig, idlg, gias; a victim whose landscape is flat); an axis not "
                        "named keeps all its values")
    p.add_argument("--backend", default="local", choices=list(BACKENDS),
                   help="local: this process (--workers 1, default) or a process pool; ray: one Ray task per run")
    p.add_argument("--workers", type=int, default=1,
                   help="local processes (default 1: in this process), or the CPUs of a new local Ray runtime")
    p.add_argument("--address", default=None, help="a Ray cluster's address (default: a local Ray runtime)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per run: Ray's request, torch threads in a worker")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per run on Ray (fractions share a GPU)")
    p.add_argument("--threat", default="honest",
                   help="honest (default): an honest-but-curious server; honest,malicious: also a server that sends "
                        "the victim behind an imprint block (Robbing the Fed; cumulative or sparse) or trap weights, "
                        "and reads the images off them (attacks imprint, sparse-imprint and trap)")
    p.add_argument("--imprint-bins", type=int, default=1024,
                   help="bins of the malicious server's imprint blocks, and units of its trap weights")
    p.add_argument("--allow-inconclusive", action="store_true",
                   help="--fail-if does not fail a cell that is inconclusive (still improving when its budget ended)")
    add_attack(p)
    p.set_defaults(attack=None, labels=None)  # the audit takes --attacks and --knowledge; these stay for old commands
    add_common(p)
    return p


def command_line(args: argparse.Namespace) -> str:
    """The ``gradleak audit ...`` line that was run (recorded by :func:`gradleak.cli.main.main`)."""
    return shlex.join(["gradleak", *getattr(args, "argv", ["audit"])])


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None:
        raise ConfigError(f"--batch-size: the audit takes a list, expected --batch-sizes, got --batch-size {args.batch_size}")
    device = check_device(args.device)
    cells = audit_grid(batch_sizes=parse_int_list(args.batch_sizes, what="--batch-sizes"),
                       defenses=split_defenses(args.defenses),
                       protocols=protocol_settings(args))
    conditions = [Condition.parse(c) for c in args.fail_if]
    seeds = parse_int_list(args.seeds, what="--seeds", low=0) if args.seeds is not None else [args.seed]
    if args.epsilon_rounds < 1:
        raise ConfigError(f"--epsilon-rounds: expected a positive integer, got {args.epsilon_rounds}")
    knowledge = _knowledge(args)
    spec = case_spec(args)
    threats = _threats(args)
    plan = _plan(args, spec, cells, threats)
    out = args.out or default_out("audit")
    short = budget_warnings(spec, [c.batch_size * c.protocol.clients for c in cells], plan.configs)
    for line in short:
        print(f"gradleak audit: warning: budget of {line}; a 'not broken' there says little (raise --iterations)",
              file=sys.stderr)
    if args.weights is not None:
        for line in trained_warnings(plan.configs):
            print(f"gradleak audit: warning: {line}", file=sys.stderr)
    print(f"audit: {len(cells)} cells into {out}")

    def on_event(name: str, status: str) -> None:
        if status == "skipped":
            print(f"  {name}: metrics.json exists, skipped")
        elif status == "running":
            print(f"  {name}: running", flush=True)

    options = AuditOptions(model_seed=args.model_seed, data=args.data, data_root=args.data_root,
                           data_seed=args.data_seed, utility_steps=args.utility_steps, utility_lr=args.utility_lr,
                           knowledge=knowledge, device=device, seed=args.seed, seeds=seeds,
                           pairing=args.pairing, time_budget=args.seconds, fill_budget=args.iterations is None,
                           progress=not args.no_progress,
                           write_images=not args.no_images, backend=args.backend, workers=args.workers,
                           address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                           imprint_bins=args.imprint_bins if "malicious" in threats else None,
                           weights=args.weights,
                           budgets=parse_int_list(args.budgets, what="--budgets") if args.budgets else None)
    def kept(folder: Path) -> str | None:
        cell_dirs = [folder / c.name for c in cells]
        return finished_note(folder, cell_dirs, "cell") if any(d.is_dir() for d in cell_dirs) else None

    with resume_hint("audit", out, kept, how=f"the same command and --out {out}"):
        rows = run_audit(spec=spec, cells=cells, plan=plan, out=out, options=options, on_event=on_event)
    protos = ", ".join(dict.fromkeys(c.protocol.tag() for c in cells))
    budgets = ", ".join(f"{n} {getattr(c, 'iterations', None) or 'closed-form'}" for n, c in plan.configs.items())
    title = (f"{args.model} ({args.activation}, BatchNorm {args.bn_mode}), {protos}, data {args.data}; attacks "
             f"{budgets}{f' (preset {args.preset})' if args.preset else ''}; knowledge {', '.join(knowledge.tokens())}"
             + (f"; {args.seconds:g} s per run" if args.seconds else "")
             + (f"; budgets {args.budgets} iterations" if args.budgets else ""))
    files = write_audit_report(out, rows, title=title, command=command_line(args), images=not args.no_images,
                               epsilon_rounds=args.epsilon_rounds, warnings=short)
    print((out / "audit.md").read_text())
    print(f"{len(rows)} cells; {', '.join(files)} in {out}")
    failed = failing(rows, conditions, inconclusive_fails=not args.allow_inconclusive)
    for row, condition in failed:
        why = f"leaks beyond --fail-if {condition}" if condition else "is inconclusive (--allow-inconclusive to pass it)"
        print(f"audit: cell {row['cell']} {why} ({verdict(row)})", file=sys.stderr)
    return 1 if failed else 0


def _knowledge(args: argparse.Namespace) -> KnowledgeAxes:
    """--knowledge, with the older --labels given (labels known) and --adaptive off (defense-unaware) folded in."""
    if args.knowledge is not None and (args.labels is not None or args.adaptive is not None):
        raise ConfigError("--knowledge: expected it alone, got it with --labels or --adaptive (name the assumptions "
                          "in --knowledge, e.g. labels-known,defense-aware)")
    knowledge = KnowledgeAxes.parse(args.knowledge)
    if args.labels is not None:
        knowledge = KnowledgeAxes(labels=("known",) if args.labels == "given" else ("recovered",),
                                  defense=knowledge.defense, bn=knowledge.bn)
    if args.adaptive == "off":
        knowledge = KnowledgeAxes(labels=knowledge.labels, defense=("unaware",), bn=knowledge.bn)
    return knowledge


def _threats(args: argparse.Namespace) -> list[str]:
    threats = [t.strip() for t in str(args.threat).split(",") if t.strip()]
    if not threats or any(t not in ("honest", "malicious") for t in threats):
        raise ConfigError(f"--threat: expected honest and/or malicious, got {args.threat!r}")
    if args.imprint_bins < 2:
        raise ConfigError(f"--imprint-bins: expected an integer of at least 2, got {args.imprint_bins}")
    return threats


def _plan(args: argparse.Namespace, spec: ModelSpec, cells: list, threats: list[str]) -> Any:
    """The attacks from --attacks (or --attack), --preset ATTACK:PRESET, --set, --label-strategy, --iterations, --dry-run."""
    if args.attacks is not None and args.attack is not None:
        raise ConfigError(f"--attacks: expected it or --attack, got both ({args.attacks!r} and {args.attack!r})")
    names = args.attacks if args.attacks is not None else (args.attack or "auto")
    presets = {}
    if args.preset:
        name, preset = split_preset(args.preset) if ":" in args.preset else (args.attack, args.preset)
        if name is None or preset is None:
            raise ConfigError(f"--preset {args.preset}: expected ATTACK:PRESET in an audit (gradleak list presets)")
        presets[name] = preset
    overrides = parse_overrides(args.set)
    if args.label_strategy is not None:
        overrides["label_strategy"] = args.label_strategy
    if args.dry_run:
        overrides["log_every"] = 1
    server = victim(spec, args.model_seed, args.weights)  # a bad --weights file fails here, before anything is written
    steps = sorted({c.protocol.local_steps for c in cells})
    plan = plan_attacks(names, server, local_steps=steps, presets=presets, overrides=overrides,
                        iterations=2 if args.dry_run else args.iterations,
                        malicious_bins=args.imprint_bins if "malicious" in threats else None)
    if "honest" not in threats:  # only the malicious server's attacks
        honest = [n for n in plan.configs if not ATTACKS.get(n).knowledge.active_manipulation]
        plan = AttackPlan({n: c for n, c in plan.configs.items() if n not in honest},
                          {**plan.left_out, **{n: "an honest server is not audited (--threat)" for n in honest}})
        if not plan.configs:
            raise ConfigError("--threat malicious: expected an attack of a malicious server among --attacks, got none")
    return plan
