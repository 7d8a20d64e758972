"""``gradleak compare``: several attacks on one identical update, as a table like the paper's Table 4.

Simulates the client once (same case flags as ``simulate``/``demo``), then runs each attack with
the same iteration budget (``--iterations``) or wall-clock budget (``--seconds``) and writes
``table.md``, ``table.csv``, ``grid.png`` and one run folder per attack into ``--out``.
``--resume OUT`` continues an interrupted comparison with the settings ``OUT/compare.json``
recorded: finished attacks are read back, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from gradleak.attacks import ATTACKS
from gradleak.attacks.base import resolve_config
from gradleak.cli.attack_cmd import checkpoint_note, read_record, resume_hint
from gradleak.cli.common import add_case, add_common, add_threat, check_device, default_out, parse_overrides
from gradleak.cli.simulate_cmd import simulate
from gradleak.config import split_preset
from gradleak.errors import CheckpointError, ConfigError
from gradleak.reporting.compare import compare_attacks
from gradleak.reporting.runner import check_out, write_json
from gradleak.threat import load_model_state, load_truth, load_update
from gradleak.types import ServerState

RECORD = "compare.json"
"""The comparison's settings, recorded in its folder for ``--resume``."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="run several attacks on one update and tabulate them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case(p)
    add_threat(p)
    add_common(p)
    p.add_argument("--attacks", default="cinet,ig,idlg", help="comma-separated attack names")
    p.add_argument("--iterations", type=int, default=None, help="same iteration budget for every attack")
    p.add_argument("--seconds", type=float, default=None,
                   help="same wall-clock budget for every attack: each sizes its iteration count to fill it (a short "
                        "probe), so its schedule completes in time; with --iterations that count stands instead")
    p.add_argument("--preset", action="append", default=[], metavar="ATTACK:PRESET",
                   help="preset per attack, as gradleak list presets prints it, e.g. --preset cinet:reference "
                        "(repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override one field of one attack, e.g. --set cinet.upsample=bilinear (repeatable)")
    p.add_argument("--labels", default="recovered", choices=["recovered", "given"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", type=Path, default=None, metavar="OUT", help="continue an interrupted comparison")
    return p


def run(args: argparse.Namespace) -> int:
    out = args.resume if args.resume is not None else (args.out or default_out("compare"))
    with resume_hint("compare", out, _kept):
        settings = _recorded(out) if args.resume is not None else _start(args, out)
        files = settings["case"]["files"]
        model, spec = load_model_state(files["model_state"])
        update = load_update(files["update"], model=model)
        truth = load_truth(files["truth"], num_classes=spec.num_classes)
        rows = compare_attacks(ServerState.from_spec(model, spec), update, attacks=settings["attacks"], out=out,
                               truth_images=truth.images, truth_labels=truth.labels,
                               iterations=settings["iterations"], seconds=settings["seconds"],
                               presets=settings["presets"], overrides=settings["overrides"],
                               give_labels=settings["labels"] == "given", case=settings["case"],
                               device=settings["device"], seed=settings["seed"], progress=not args.no_progress,
                               force=args.force, resume=args.resume is not None)
    print((out / "table.md").read_text())
    print(f"{len(rows)} attacks compared; run folders, table.md, table.csv and grid.png in {out}")
    return 0


def _kept(out: Path) -> str | None:
    """What an interrupted comparison keeps: its finished attacks and the checkpoint of the one it was in."""
    try:
        attacks = _recorded(out)["attacks"]
    except (CheckpointError, ConfigError):
        return None  # stopped before the client was simulated: nothing to continue
    done = [a for a in attacks if (out / a / "metrics.json").is_file()]
    notes = [f"{', '.join(done) if done else 'no attack'} finished"]
    notes += [f"{a}: {n}" for a in attacks if a not in done for n in [checkpoint_note(out / a)] if n is not None]
    return "; ".join(notes)


def _start(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Validate the flags, simulate the client into ``out/client`` and record the settings."""
    device = check_device(args.device)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not attacks:
        raise ConfigError(f"--attacks: expected comma-separated attack names (gradleak list attacks), got {args.attacks!r}")
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
    for name in attacks:  # unknown attacks, presets or fields, and occupied folders, fail before the client runs
        resolve_config(name, preset=presets.get(name), overrides=overrides.get(name))
        check_out(out / name, force=args.force)
    if (out / RECORD).is_file() and not args.force:
        raise ConfigError(f"output folder '{out}' holds a comparison ({RECORD}); expected a new folder, or "
                          f"continue it (--resume {out}) or replace it (--force)")
    client = out / "client"
    created = not client.exists()
    case = simulate(args, client)
    try:  # an attack that cannot apply to the simulated victim fails now, and takes the client's files with it
        _check_applicable(attacks, presets, overrides, case["files"])
    except ConfigError:
        if created:
            shutil.rmtree(client, ignore_errors=True)
        raise
    settings = {"attacks": attacks, "iterations": 2 if args.dry_run else args.iterations, "seconds": args.seconds,
                "presets": presets, "overrides": overrides, "labels": args.labels, "device": device,
                "seed": args.seed, "case": case}
    write_json(out / RECORD, settings)
    return settings


def _check_applicable(attacks: list[str], presets: dict[str, str], overrides: dict[str, dict],
                      files: dict[str, str]) -> None:
    """Every attack applies to the simulated victim and its protocol, or a ConfigError naming why not."""
    model, spec = load_model_state(files["model_state"])
    update = load_update(files["update"], model=model)
    server = ServerState.from_spec(model, spec)
    for name in attacks:
        config = resolve_config(name, preset=presets.get(name), overrides=overrides.get(name))
        reason = ATTACKS.get(name).applicability(server, config, local_steps=update.local_steps)
        if reason is not None:
            raise ConfigError(f"--attacks {name}: expected an attack that applies to this victim and protocol; "
                              f"{name} {reason}")


def _recorded(out: Path) -> dict[str, Any]:
    """The settings a comparison recorded in ``out/compare.json``, checked."""
    path = out / RECORD
    settings = read_record(path, "a comparison folder")
    expected: dict[str, type | tuple[type, ...]] = {
        "attacks": list, "iterations": (int, type(None)), "seconds": (int, float, type(None)), "presets": dict,
        "overrides": dict, "labels": str, "device": str, "seed": int, "case": dict}
    wrong = [k for k, t in expected.items() if not isinstance(settings, dict) or not isinstance(settings.get(k), t)]
    if wrong or not isinstance(settings["case"].get("files"), dict):
        raise CheckpointError(f"resume: '{path}': expected a comparison's settings ({', '.join(expected)}, "
                              f"with case.files), got something else{f' (in {wrong[0]})' if wrong else ''}")
    check_device(settings["device"])  # recorded on another machine, perhaps
    return settings
