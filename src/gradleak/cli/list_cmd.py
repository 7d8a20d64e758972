"""``gradleak list``: what is registered (attacks, presets, models, activations, label strategies, defenses), and
each attack's options with their defaults (``--set KEY=VALUE``)."""

from __future__ import annotations

import argparse
import importlib


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("list", help="list attacks, presets, models, activations, label strategies, defenses, attack options")
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "attacks", "presets", "models", "activations", "labels", "defenses", "options"])
    return p


def run(args: argparse.Namespace) -> int:
    from gradleak.attacks import ATTACKS, supports_adaptive
    from gradleak.labels import LABEL_STRATEGIES
    from gradleak.models import ACTIVATIONS
    from gradleak.models import available as models

    sections: dict[str, list[str]] = {
        "attacks": ATTACKS.available(),
        "presets": [f"{a}:{p}" for a in ATTACKS.available() for p in sorted(getattr(ATTACKS.get(a), "presets", {}))],
        "models": models(),
        "activations": list(ACTIVATIONS),
        "labels": LABEL_STRATEGIES.available(),
    }
    try:
        defenses = importlib.import_module("gradleak.defenses")
        sections["defenses"] = defenses.available()
    except (ImportError, AttributeError):
        sections["defenses"] = []
    for name, items in sections.items():
        if args.what == "attacks" == name:
            for attack in items:
                print(f"{attack:9s} {ATTACKS.get(attack).knowledge.describe(adaptive=supports_adaptive(attack))}")
        elif args.what in ("all", name):
            print(f"{name}: {', '.join(items) if items else '(none)'}")
    if args.what in ("all", "options"):
        import dataclasses

        for attack in ATTACKS.available():
            cfg = ATTACKS.get(attack).Config()
            fields = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))
            print(f"options {attack}: {fields}")
    if args.what == "attacks":
        print("(SoK: threat models of Carletti et al., USENIX Security 2025; a run that replays local steps or "
              "simulates a defense uses training details: C. Every attack but imprint is passive; imprint needs a "
              "malicious server: F.)")
    return 0
