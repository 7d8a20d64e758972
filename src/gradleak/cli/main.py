"""``gradleak`` entry point: dispatches to subcommand modules.

Each subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and
``run(args) -> int``. A :class:`~gradleak.errors.GradleakError` becomes a one-line message on
stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gradleak.errors import GradleakError, Terminated

SUBCOMMANDS = ("demo", "simulate", "attack", "compare", "audit", "labels", "inspect", "sweep", "bench", "train", "list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradleak", description="How much does a federated-learning update leak?")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"gradleak.cli.{name.replace('-', '_')}_cmd")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given, for reports that print the command behind them
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        return int(args._run(args))
    except GradleakError as e:
        if args.debug:
            raise
        print(f"gradleak {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"gradleak {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"gradleak {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
