"""``gradleak compare``: several attacks on one identical update, as a table like the paper's Table 4.

Simulates the client once (same case flags as ``simulate``/``demo``), then runs each attack with
the same iteration budget (``--iterations``) or wall-clock budget (``--seconds``) and writes
``table.md``, ``table.csv``, ``grid.png`` and one run folder per attack into ``--out``.
"""

from __future__ import annotations

import argparse

from gradleak.attacks.base import resolve_config
from gradleak.cli.common import add_case, add_common, add_threat, check_device, default_out, parse_overrides
from gradleak.cli.simulate_cmd import simulate
from gradleak.config import split_preset
from gradleak.errors import ConfigError
from gradleak.reporting.compare import compare_attacks
from gradleak.reporting.runner import check_out
from gradleak.threat import load_model_state, load_truth, load_update
from gradleak.types import ServerState


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="run several attacks on one update and tabulate them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case(p)
    add_threat(p)
    add_common(p)
    p.add_argument("--attacks", default="cinet,ig,idlg", help="comma-separated attack names")
    p.add_argument("--iterations", type=int, default=None, help="same iteration budget for every attack")
    p.add_argument("--seconds", type=float, default=None, help="same wall-clock budget for every attack")
    p.add_argument("--preset", action="append", default=[], metavar="ATTACK:PRESET",
                   help="preset per attack, as gradleak list presets prints it, e.g. --preset cinet:reference "
                        "(repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override one field of one attack, e.g. --set cinet.upsample=bilinear (repeatable)")
    p.add_argument("--labels", default="recovered", choices=["recovered", "given"])
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    presets: dict[str, str] = {}
    for item in args.preset:
        a, p = split_preset(item)
        if p is None:
            raise ConfigError(f"--preset: expected ATTACK:PRESET (gradleak list presets), got {item!r}")
        presets[a] = p
    overrides: dict[str, dict] = {}
    for key, value in parse_overrides(args.set).items():
        if "." not in key:
            raise ConfigError(f"--set: expected ATTACK.KEY=VALUE, got {key!r}")
        a, k = key.split(".", 1)
        overrides.setdefault(a, {})[k] = value
    iterations = 2 if args.dry_run else args.iterations
    out = args.out or default_out("compare")
    for name in attacks:  # unknown attacks, presets or fields, and occupied folders, fail before the client runs
        resolve_config(name, preset=presets.get(name), overrides=overrides.get(name))
        check_out(out / name, force=args.force)
    case = simulate(args, out / "client")
    model, spec = load_model_state(case["files"]["model_state"])
    update = load_update(case["files"]["update"], model=model)
    truth = load_truth(case["files"]["truth"])
    images, labels = truth.images, truth.labels
    rows = compare_attacks(ServerState.from_spec(model, spec), update, attacks=attacks, out=out,
                           truth_images=images, truth_labels=labels, iterations=iterations, seconds=args.seconds,
                           presets=presets, overrides=overrides, give_labels=args.labels == "given", case=case,
                           device=device, seed=args.seed, progress=not args.no_progress, force=args.force)
    print((out / "table.md").read_text())
    print(f"{len(rows)} attacks compared; run folders, table.md, table.csv and grid.png in {out}")
    return 0
