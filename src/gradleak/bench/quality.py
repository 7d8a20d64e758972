"""Time to quality: wall time and iterations until mean SSIM (Hungarian) reaches 0.80 / 0.90 / 0.95.

    gradleak bench quality --batches 4,8,16 --iters 800 [--variant NAME ...] [--seeds 0,1]

SSIM is measured every ``--every`` iterations in the progress callback, off the clock (the
callback's own time is subtracted). Labels are recovered from the update, as in the demo.
Variants are CI-Net configs to compare (``--variant`` repeatable, default: all listed below);
``--seeds`` repeats each with other attack seeds (generator initialisation and latent), since one
seed's iteration count can be off by a factor of two.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import gradleak
from gradleak.bench.common import demo_case, print_table, write_json
from gradleak.attacks import CINetAttack
from gradleak.metrics import pair_images, ssim

VARIANTS: dict[str, dict[str, Any]] = {
    "reference": CINetAttack.presets["reference"],
    "reference-naive-cosine": dict(loss="cosine-naive", update="sign-adam", channels="reference", lr=1e-3),
    "paper-l2-signsgd": dict(loss="l2", update="sign-sgd", channels="reference", lr=1e-3),
    "l2-signadam": dict(loss="l2", update="sign-adam", channels="reference", lr=1e-3),
    "cosine-signsgd": dict(loss="cosine", update="sign-sgd", channels="reference", lr=1e-3),
    "reference-lr3e-3-cos": dict(loss="cosine", update="sign-adam", channels="reference", lr=3e-3, lr_decay="cosine"),
    "reference-64ch": dict(loss="cosine", update="sign-adam", channels=64, lr=1e-3),
    "reference-16ch": dict(loss="cosine", update="sign-adam", channels=16, lr=1e-3),
    "reference-256ch": dict(loss="cosine", update="sign-adam", channels=256, lr=1e-3),
    "paper-channels": dict(loss="cosine", update="sign-adam", channels="paper", lr=1e-3),
    "default": {},
    "default-learned-latent": dict(latent="learned"),
    "default-bf16": dict(precision="bf16"),
    "reference-96ch": dict(loss="cosine", update="sign-adam", channels=96, lr=1e-3),
    "reference-128ch": dict(loss="cosine", update="sign-adam", channels=128, lr=1e-3),
    "64ch-lr2e-3": dict(loss="cosine", update="sign-adam", channels=64, lr=2e-3),
    "64ch-lr3e-3-cos": dict(loss="cosine", update="sign-adam", channels=64, lr=3e-3, lr_decay="cosine"),
    "64ch-lr5e-4": dict(loss="cosine", update="sign-adam", channels=64, lr=5e-4),
    "64ch-l2": dict(loss="l2", update="sign-adam", channels=64, lr=1e-3),
}
THRESHOLDS = (0.80, 0.90, 0.95)


def run(batch: int, variant: str, iters: int, every: int, device: str, verbose: bool = False,
        seed: int = 0) -> dict[str, Any]:
    server, update, images, _ = demo_case(batch, device=device)
    cfg = {**VARIANTS[variant], "iterations": iters, "log_every": every, "checkpoint_every": 0}
    attack = gradleak.attacks.create("cinet", cfg, device=device, seed=seed)
    off_clock = 0.0
    t0 = time.perf_counter()
    reached: dict[float, tuple[int, float]] = {}
    curve: list[tuple[int, float]] = []

    def callback(p: gradleak.attacks.Progress) -> None:
        nonlocal off_clock
        s = time.perf_counter()
        x = p.images.cpu()
        value = float(ssim(x[pair_images(x, images)], images).mean())
        curve.append((p.iteration, value))
        if verbose:
            print(f"  {variant} batch {batch} it {p.iteration}: SSIM {value:.3f} loss {p.loss:.3e} "
                  f"{s - t0 - off_clock:.1f} s", flush=True)
        for t in THRESHOLDS:
            if value >= t and t not in reached:
                reached[t] = (p.iteration, s - t0 - off_clock)
        off_clock += time.perf_counter() - s

    rec = attack.reconstruct(server, update, callback=callback)
    total = time.perf_counter() - t0 - off_clock
    return {"batch": batch, "variant": variant, "seed": seed, "channels": rec.info["channel_choice"]["channels"],
            "seconds": total, "s_per_it": total / iters,
            "final_ssim": curve[-1][1] if curve else None, "label_strategy": rec.label_strategy,
            "reached": {str(t): reached.get(t) for t in THRESHOLDS}, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8")
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--variant", action="append", default=None, choices=sorted(VARIANTS))
    p.add_argument("--seeds", default="0", help="comma-separated attack seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-results/quality.json")
    p.add_argument("--verbose", action="store_true", help="print every SSIM reading")
    args = p.parse_args(argv)
    results = []
    for b in (int(x) for x in args.batches.split(",")):
        for v, seed in ((v, int(s)) for v in args.variant or list(VARIANTS) for s in args.seeds.split(",")):
            r = run(b, v, args.iters, args.every, args.device, args.verbose, seed)
            results.append(r)
            print(f"batch {b} {v} seed {seed}: final SSIM {r['final_ssim']:.3f}, {r['s_per_it']:.3f} s/it, reached {r['reached']}",
                  flush=True)
            write_json(args.json, {"args": vars(args), "results": results})

    def cell(r: dict[str, Any], t: float) -> str:
        hit = r["reached"][str(t)]
        return "-" if hit is None else f"{hit[0]} it / {hit[1]:.0f} s"

    print_table(["batch", "variant", "channels", "seed", "s/it", "final SSIM"] + [f"SSIM {t}" for t in THRESHOLDS],
                [[r["batch"], r["variant"], r["channels"], r["seed"], r["s_per_it"], r["final_ssim"]]
                 + [cell(r, t) for t in THRESHOLDS] for r in results])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
