"""Step anatomy of CI-Net: where one iteration's time goes, and the floor.

    gradleak bench step --batch 8 --iters 20 [--device cuda]

Phases: generator forward, victim forward, gradient with create_graph, matching loss, backward to
the generator, optimizer step. The floor is the same tensor work in a bare loop (no phase timers,
no framework); the attack row is ``CINetAttack.reconstruct`` itself. step/floor is the overhead.
The two alternate over ``--rounds`` rounds and the fastest round of each counts, so that a shared,
noisy machine slows both alike.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import gradleak
from gradleak.bench.common import Timer, demo_case, print_table, sync, write_json
from gradleak.functional import cosine_distance
from gradleak.generators import CINetGenerator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=128, help="generator channels (128: the auto rule at batch 8)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating floor/attack rounds (the fastest counts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-results/step.json")
    args = p.parse_args(argv)
    dev = args.device
    server, update, _, labels = demo_case(args.batch, size=args.size, device=dev)
    victim = copy.deepcopy(server.model).to(dev).train()
    params = [q for q in victim.parameters() if q.requires_grad]
    target = [t.to(dev) for t in update.gradients()]
    y = labels.to(dev)
    torch.manual_seed(0)
    gen = CINetGenerator(channels=args.channels, image_size=args.size).to(dev)
    z = torch.randn(args.batch, 100, device=dev)
    gp = list(gen.parameters())
    opt = torch.optim.Adam(gp, lr=1e-3)

    def step(timer: Timer | None) -> None:
        t = timer or (lambda _n: _Null())
        with t("generator forward"):
            x = gen(z)
        with t("victim forward"):
            loss = F.cross_entropy(victim(x), y)
        with t("gradient (create_graph)"):
            grads = torch.autograd.grad(loss, params, create_graph=True)
        with t("matching loss"):
            dist = cosine_distance(grads, target)
        with t("backward to generator"):
            gg = torch.autograd.grad(dist, gp)
        with t("optimizer step"):
            for q, g in zip(gp, gg):
                q.grad = g.sign()
            opt.step()

    for _ in range(3):
        step(None)
    timer = Timer(dev)
    for _ in range(args.iters):
        step(timer)

    attack = gradleak.attacks.create("cinet", {"iterations": args.iters, "channels": args.channels,
                                               "log_every": 25, "checkpoint_every": 0}, device=dev)
    attack.reconstruct(server, update, labels=labels)  # warm-up (and label-free path checked elsewhere)

    # floor and attack alternate, so that a noisy machine slows both alike; the fastest round counts
    floors, fulls = [], []
    for _ in range(args.rounds):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(None)
        sync(dev)
        floors.append((time.perf_counter() - t0) / args.iters)
        t0 = time.perf_counter()
        attack.reconstruct(server, update, labels=labels)
        sync(dev)
        fulls.append((time.perf_counter() - t0) / args.iters)
    floor, full = min(floors), min(fulls)

    rows = [[k, v / args.iters * 1000, 100 * v / sum(timer.totals.values())] for k, v in timer.totals.items()]
    rows.append(["floor (bare loop)", floor * 1000, 100.0])
    rows.append(["CINetAttack.reconstruct", full * 1000, 100 * full / floor])
    print(f"CI-Net step, ResNet-18-sigmoid, batch {args.batch}, {args.size} px, {args.channels} channels, {dev}")
    print_table(["phase", "ms / iteration", "% of phases (floor rows: % of floor)"], rows)
    print(f"step/floor = {full / floor:.3f}")
    write_json(args.json, {"args": vars(args), "phases_ms": {k: v / args.iters * 1000 for k, v in timer.totals.items()},
                           "floor_ms": floor * 1000, "attack_ms": full * 1000, "ratio": full / floor,
                           "floor_rounds_ms": [f * 1000 for f in floors], "attack_rounds_ms": [f * 1000 for f in fulls]})
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
