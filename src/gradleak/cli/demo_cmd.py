"""``gradleak demo``: CI-Net against the paper's victim on built-in real photos, end to end.

Simulates a client (CIFAR ResNet-18 with Sigmoid, untrained, 8 real CIFAR-10 photos, FedSGD),
writes its update files into the run folder, then attacks them with CI-Net (labels recovered from
the update) and writes the report. 150 CI-Net iterations: about 2.5 minutes where a batch-8 step
takes 0.9 s (the summary prints this machine's step time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradleak.cli.attack_cmd import attack_files, print_summary, resume_hint, resume_run, run_options
from gradleak.cli.common import (
    add_attack,
    add_case,
    add_common,
    add_cuda_policy,
    add_threat,
    attack_config,
    default_out,
)
from gradleak.cli.simulate_cmd import simulate
from gradleak.reporting.runner import check_out


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="CI-Net end to end on built-in photos (minutes on a CPU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case(p)
    add_threat(p)
    add_attack(p, default_preset="demo")
    add_common(p)
    add_cuda_policy(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted demo")
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.resume) if args.resume else (args.out or default_out("demo"))
    with resume_hint("demo", out):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    if args.resume:
        print_summary(resume_run(out, progress=not args.no_progress))
        return 0
    options = run_options(args)  # checks the device first
    config = attack_config(args)
    check_out(out, force=args.force)  # before the client's files are written
    case = simulate(args, out / "client")
    threat = case["protocol"] + (f", {case['local_steps']} local steps" if case["protocol"] == "fedavg" else "") + (
        f", {case['clients']} clients" if case["clients"] > 1 else "") + (
        f", defense {case['defense']}" if case["defense"] != "none" else "")
    print(f"client: {args.model} ({args.activation}), {args.batch_size} images (--data {args.data}) at "
          f"{args.image_size} px, {threat} -> {case['files']['update']}")
    result = attack_files(case["files"], attack=args.attack, config=config, out=out,
                          give_labels=args.labels == "given", case=case, options=options)
    print_summary(result)
    return 0
