"""Step anatomy of CI-Net: where one iteration's time goes, and the floor.

    gradleak bench step --batch 8 --iters 20 [--device cuda]

Phases: generator forward, victim forward, gradient with create_graph, matching loss, backward to
the generator, optimizer step. The floor is the same tensor work in a bare loop (no phase timers,
no framework); the attack row is ``CINetAttack.reconstruct`` itself. step/floor is the overhead.
The two alternate over ``--rounds`` rounds and the fastest round of each counts, so that a shared,
noisy machine slows both alike.

Against the machine: the step's floating-point work is counted once with
``torch.utils.flop_counter`` (the step run with ``backward()``, which the counter supports, instead
of ``autograd.grad`` on leaves, which it refuses), and the achieved GFLOP/s of the floor is set
against the float32 matrix-product peak measured in the same run on the same threads
(:func:`gradleak.hardware.matmul_gflops`, the best of 1024 and 2048 square products).

    gradleak bench step --batch 32 --iters 5 --rounds 2 [--threads N] [--channels-last] [--compile-generator]

``--channels-last`` stores the generator, the victim and their activations in NHWC;
``--compile-generator`` runs the generator through ``torch.compile`` (the victim's double backward
is not supported by compile's autograd, so only the generator can be); ``--no-mkldnn`` computes the
CPU convolutions without oneDNN.
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
from gradleak.hardware import float32_policy, matmul_gflops, native_bf16


def step_flops(gen: torch.nn.Module, victim: torch.nn.Module, z: torch.Tensor, y: torch.Tensor,
               target: list[torch.Tensor]) -> int:
    """Floating-point operations of one CI-Net step (generator and victim forward, the victim's
    gradient with create_graph, the cosine, the backward to the generator), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [q for q in victim.parameters() if q.requires_grad]
    counter = FlopCounterMode(display=False)
    with counter:
        loss = F.cross_entropy(victim(gen(z)), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        cosine_distance(grads, target).backward()
    gen.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def gemm_peak(device: str) -> float:
    """The float32 matrix-product peak on the current threads or GPU, GFLOP/s (best of two sizes).

    On CUDA it is TF32's peak where TF32 is on (``--tf32``).
    """
    return max(matmul_gflops(torch.float32, size=n, device=device) for n in (1024, 2048))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=128, help="generator channels (128: the auto rule at batch 8)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating floor/attack rounds (the fastest counts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for both networks")
    p.add_argument("--compile-generator", action="store_true", help="torch.compile the generator (floor only)")
    p.add_argument("--no-mkldnn", action="store_true", help="CPU convolutions without oneDNN (im2col + GEMM)")
    p.add_argument("--no-attack", action="store_true", help="time the floor only (no CINetAttack rounds)")
    p.add_argument("--tf32", action="store_true",
                   help="on CUDA, let matrix products and convolutions use TF32 (default off, as runs compute)")
    p.add_argument("--json", default="bench-results/step.json")
    args = p.parse_args(argv)
    with float32_policy(args.device, tf32=args.tf32):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # torch's module-level flag
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
    flops = step_flops(gen, victim, z, y, target)
    if args.channels_last:
        gen = gen.to(memory_format=torch.channels_last)
        victim = victim.to(memory_format=torch.channels_last)
    forward = torch.compile(gen) if args.compile_generator else gen

    def step(timer: Timer | None) -> None:
        t = timer or (lambda _n: _Null())
        with t("generator forward"):
            x = forward(z)
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
    if not args.no_attack:
        attack.reconstruct(server, update, labels=labels)  # warm-up (and label-free path checked elsewhere)

    # floor and attack alternate, so that a noisy machine slows both alike; the fastest round counts
    peak = gemm_peak(dev)
    floors, fulls = [], []
    for _ in range(args.rounds):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(None)
        sync(dev)
        floors.append((time.perf_counter() - t0) / args.iters)
        if not args.no_attack:
            t0 = time.perf_counter()
            attack.reconstruct(server, update, labels=labels)
            sync(dev)
            fulls.append((time.perf_counter() - t0) / args.iters)
    peak = max(peak, gemm_peak(dev))
    floor = min(floors)
    full = min(fulls) if fulls else float("nan")
    achieved = flops / floor / 1e9

    rows = [[k, v / args.iters * 1000, 100 * v / sum(timer.totals.values())] for k, v in timer.totals.items()]
    rows.append(["floor (bare loop)", floor * 1000, 100.0])
    rows.append(["CINetAttack.reconstruct", full * 1000, 100 * full / floor])
    threads = torch.get_num_threads()
    cuda = dev.startswith("cuda")
    where = torch.cuda.get_device_name(torch.device(dev)) if cuda else f"{threads} threads"
    kind = "TF32" if args.tf32 and cuda else "fp32"
    print(f"CI-Net step, ResNet-18-sigmoid, batch {args.batch}, {args.size} px, {args.channels} channels, {dev}"
          f"{', TF32' if args.tf32 and dev.startswith('cuda') else ''}, "
          f"{threads} threads{', channels_last' if args.channels_last else ''}"
          f"{', compiled generator' if args.compile_generator else ''}{', no oneDNN' if args.no_mkldnn else ''}")
    print_table(["phase", "ms / iteration", "% of phases (floor rows: % of floor)"], rows)
    print(f"step/floor = {full / floor:.3f}")
    print(f"work: {flops / 1e9:.1f} GFLOP per step (torch.utils.flop_counter); floor achieves {achieved:.1f} GFLOP/s "
          f"= {100 * achieved / peak:.0f}% of the {kind} GEMM peak {peak:.1f} GFLOP/s measured now on {where} "
          f"(native bf16: {native_bf16(dev)})")
    write_json(args.json, {"args": vars(args), "threads": threads, "phases_ms": {k: v / args.iters * 1000 for k, v in timer.totals.items()},
                           "floor_ms": floor * 1000, "attack_ms": full * 1000, "ratio": full / floor,
                           "gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "gemm_peak_gflops": peak,
                           "fraction_of_peak": achieved / peak, "native_bf16": native_bf16(dev),
                           "floor_rounds_ms": [f * 1000 for f in floors], "attack_rounds_ms": [f * 1000 for f in fulls]})
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
