"""``gradleak audit``: what leaks from MY model, batch size, protocol and defense?

Expands the grid batch size x defense (x protocol settings), simulates each client update on the
case's data (built-in photos by default), applies the defense on the client, runs the attack into
``--out/<cell>/`` (a full run folder each) and writes ``audit.md``, ``audit.csv``,
``ssim_vs_defense.png``, ``psnr_vs_defense.png``, ``ssim_vs_batch.png``, ``examples.png`` and
``report.html``. Every defended cell is attacked by the unaware and the adaptive attacker (which
simulates the defense), with every ``--seeds`` seed; the verdict is the worst case. A finished cell
is skipped, so an interrupted audit resumes by running the same command again; ``--fail-if``
makes it exit 1 when a cell leaks beyond a limit (a CI gate). Example:

    gradleak audit --model lenet --batch-sizes 1,4,8 \\
        --defenses none,noise:1e-3,noise:1e-2,prune:0.9,dpsgd:1.0 --iterations 300 --out runs/audit
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from gradleak.cli.attack_cmd import finished_note, resume_hint
from gradleak.cli.common import (
    add_attack,
    add_case,
    add_common,
    add_threat,
    attack_config,
    check_device,
    default_out,
    protocol_settings,
)
from gradleak.defenses import split_defenses
from gradleak.errors import ConfigError
from gradleak.reporting.audit import (
    AuditOptions,
    audit_grid,
    parse_int_list,
    run_audit,
    write_audit_report,
)
from gradleak.reporting.verdicts import Condition, failing, verdict
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
    p.add_argument("--seconds", type=float, default=None, help="wall-clock budget of each cell's attack")
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
    add_attack(p)
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
    config = attack_config(args)
    spec = ModelSpec(name=args.model, num_classes=args.num_classes, image_size=args.image_size,
                     activation=args.activation, bn_mode=args.bn_mode, width=args.width)
    out = args.out or default_out("audit")
    print(f"audit: {len(cells)} cells into {out}")

    def on_event(name: str, status: str) -> None:
        if status == "skipped":
            print(f"  {name}: metrics.json exists, skipped")
        elif status == "running":
            print(f"  {name}: running", flush=True)

    options = AuditOptions(model_seed=args.model_seed, data=args.data, data_root=args.data_root,
                           data_seed=args.data_seed, utility_steps=args.utility_steps, utility_lr=args.utility_lr,
                           give_labels=args.labels == "given", device=device, seed=args.seed, seeds=seeds,
                           pairing=args.pairing, time_budget=args.seconds, progress=not args.no_progress,
                           write_images=not args.no_images)
    def kept(folder: Path) -> str | None:
        cell_dirs = [folder / c.name for c in cells]
        return finished_note(folder, cell_dirs, "cell") if any(d.is_dir() for d in cell_dirs) else None

    with resume_hint("audit", out, kept, how=f"the same command and --out {out}"):
        rows = run_audit(spec=spec, cells=cells, attack=args.attack, attack_config=config, out=out, options=options,
                         on_event=on_event)
    protos = ", ".join(dict.fromkeys(c.protocol.tag() for c in cells))
    title = (f"{args.model} ({args.activation}, BatchNorm {args.bn_mode}), {protos}, data {args.data}; attack "
             f"{args.attack}{f' preset {args.preset}' if args.preset else ''}, "
             f"{getattr(config, 'iterations', 'n/a')} iterations, labels {args.labels}")
    files = write_audit_report(out, rows, title=title, command=command_line(args), images=not args.no_images,
                               epsilon_rounds=args.epsilon_rounds)
    print((out / "audit.md").read_text())
    print(f"{len(rows)} cells; {', '.join(files)} in {out}")
    failed = failing(rows, conditions)
    for row, condition in failed:
        print(f"audit: cell {row['cell']} leaks beyond --fail-if {condition} ({verdict(row)})", file=sys.stderr)
    return 1 if failed else 0
