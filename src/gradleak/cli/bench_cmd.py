"""``gradleak bench NAME [options]``: the benchmark scripts, each printing a table and writing JSON.

    gradleak bench step      # where one CI-Net iteration's time goes, and the floor
    gradleak bench quality   # wall time and iterations to mean SSIM 0.80 / 0.90 / 0.95
    gradleak bench scale     # seconds per iteration and peak memory against batch size and resolution
    gradleak bench memory    # the memory switches (activation checkpointing, bf16) on and off
    gradleak bench labels    # label-recovery accuracy: strategy x victim x batch size (x defense)
    gradleak bench adaptive  # the adaptive attacker's step cost against the unaware one, per defense
    gradleak bench audit     # the audit engine's own overhead against its attack runs, local and Ray
    gradleak bench imprint   # the imprint attack (malicious server): images recovered exactly at batch 64 and 256
    gradleak bench landscape # how far from the private batch the gradient still points the update's way

``gradleak bench NAME --help`` lists each one's options; the same runs as
``python -m gradleak.bench.NAME``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "step": "where one CI-Net iteration's time goes, and the floor",
    "quality": "wall time and iterations to mean SSIM 0.80 / 0.90 / 0.95",
    "scale": "seconds per iteration and peak memory against batch size and resolution",
    "memory": "activation checkpointing and bf16 on and off: peak memory and time",
    "labels": "label-recovery accuracy and time: strategy x victim x batch size (x defense)",
    "adaptive": "seconds per CI-Net iteration, unaware and adaptive, per defense",
    "audit": "the audit engine's overhead (planning, dispatch, verdicts, report) against its attack runs",
    "imprint": "the imprint attack (malicious server): images recovered exactly from one update",
    "landscape": "the gradient's cosine with the update at the batch mixed with noise: the basin's width",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)",
                       description="\n".join(f"  {k:<8} {v}" for k, v in BENCHMARKS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")
    return p


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"gradleak.bench.{args.name}")
    return int(module.main(list(args.options)))
