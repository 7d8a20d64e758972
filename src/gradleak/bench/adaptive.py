"""The adaptive attacker's cost: one CI-Net iteration unaware and adaptive, per defense, in one run.

The adaptive attacker simulates the recorded defense on every step (:mod:`gradleak.attacks.adaptive`);
this measures what that costs: seconds per iteration of ``CINetAttack.reconstruct`` with
``adaptive="off"`` and ``"auto"`` on the same defended update, alternating over rounds (the fastest
round of each counts), and their ratio. DP-SGD's adaptive step computes per-sample gradients of
the candidates (``torch.func``), so it is reported apart.

Usage:
    gradleak bench adaptive --model lenet --batch 8 --iters 10
    gradleak bench adaptive --model resnet18 --batch 8 --iters 5 --defenses prune:0.9,sign,noise:1e-3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gradleak.attacks import CINetAttack
from gradleak.bench.common import demo_case, print_table, sync, write_json
from gradleak.defenses import defended_update, split_defenses
from gradleak.types import ServerState

DEFENSES = "prune:0.9,quantize:4,sign,clip:1,noise:1e-3,laplace:1e-3,clip:1+noise:1e-3,dpsgd:1.0"


def _seconds(server: ServerState, update, *, adaptive: str, iters: int, channels: int, device: str) -> float:
    cfg = CINetAttack.preset("demo", iterations=iters, channels=channels, adaptive=adaptive, log_every=iters,
                             checkpoint_every=0)
    attack = CINetAttack(cfg, device=device, seed=0)
    sync(device)
    t0 = time.perf_counter()
    attack.reconstruct(server, update, labels=None)
    sync(device)
    return (time.perf_counter() - t0) / max(iters, 1)  # set-up and label recovery included, for both modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", help="victim (default lenet; resnet18 is the demo victim)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10, help="CI-Net iterations per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest of each counts")
    parser.add_argument("--channels", type=int, default=128, help="generator channels (the default width at batch 8)")
    parser.add_argument("--defenses", default=DEFENSES, help=f"comma-separated (default {DEFENSES})")
    parser.add_argument("--bn-mode", default="train", choices=["train", "eval"],
                        help="victim BatchNorm mode (dpsgd needs eval on resnet18)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-results/adaptive.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    server, _, images, labels = demo_case(args.batch, model=args.model, device=args.device)
    if args.bn_mode == "eval":
        server = ServerState(model=server.model, input_shape=server.input_shape, num_classes=server.num_classes,
                             bn_mode="eval", spec=server.spec)
    rows, records = [], []
    for text in split_defenses(args.defenses):
        try:
            update = defended_update(server, images.to(args.device), labels.to(args.device), defense=text,
                                     generator=torch.Generator().manual_seed(0))
        except Exception as e:  # noqa: BLE001 - e.g. DP-SGD on train-mode BatchNorm: say so, measure the rest
            print(f"{text}: skipped ({e})", file=sys.stderr)
            continue
        best = {"off": float("inf"), "auto": float("inf")}
        for _ in range(args.rounds):
            for mode in ("off", "auto"):
                best[mode] = min(best[mode], _seconds(server, update, adaptive=mode, iters=args.iters,
                                                      channels=args.channels, device=args.device))
        ratio = best["auto"] / best["off"]
        rows.append([text, best["off"], best["auto"], f"{ratio:.2f}x"])
        records.append({"defense": text, "unaware_s": best["off"], "adaptive_s": best["auto"], "ratio": ratio})
        print(f"  {text}: {ratio:.2f}x", file=sys.stderr, flush=True)
    print(f"CI-Net on {args.model} (BatchNorm {args.bn_mode}), batch {args.batch}, {args.channels} channels, "
          f"{args.iters} iterations x {args.rounds} rounds, {args.threads} threads, {args.device}")
    print_table(["defense", "unaware s/it", "adaptive s/it", "adaptive / unaware"], rows)
    write_json(args.out, {"command": " ".join(sys.argv), "model": args.model, "batch": args.batch,
                          "channels": args.channels, "iters": args.iters, "rows": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
