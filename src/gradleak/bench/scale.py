"""Scale: seconds per CI-Net iteration and peak memory against batch size and resolution.

    gradleak bench scale --batches 4,8,16,32,64,128,256 --sizes 32,64,128,256 --iters 3 [--device cuda]

Each configuration runs in a fresh subprocess, so the peak memory (CUDA: max allocated; CPU: peak
RSS of the process, the victim and generator included) belongs to it alone. Resolutions above
64 px use the ImageNet-stem ResNet-18 (1000 classes) and built-in photos; 32/64 px the CIFAR one.
The generator width follows ``--channels`` (default: the reference rule).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from gradleak.bench.common import print_table, write_json


def one(batch: int, size: int, iters: int, device: str, channels: str, extra: dict | None = None) -> dict:

    import gradleak
    from gradleak.bench.common import demo_case, sync
    from gradleak.reporting.memory import current_memory_mb, peak_memory_mb, reset_peak_memory

    model = "resnet18" if size <= 64 else "resnet18-imagenet"
    server, update, _, labels = demo_case(batch, size=size, model=model, device=device)
    ch: str | int = int(channels) if channels.isdigit() else channels
    cfg = {"iterations": 1, "channels": ch, "log_every": 10**9, "checkpoint_every": 0, **(extra or {})}
    before = current_memory_mb(device)
    gradleak.attacks.create("cinet", cfg, device=device).reconstruct(server, update, labels=labels)  # warm-up
    reset_peak_memory(device)
    attack = gradleak.attacks.create("cinet", {**cfg, "iterations": iters}, device=device)
    sync(device)
    t0 = time.perf_counter()
    rec = attack.reconstruct(server, update, labels=labels)
    sync(device)
    return {"batch": batch, "size": size, "model": model, "s_per_it": (time.perf_counter() - t0) / iters,
            "peak_mb": peak_memory_mb(device), "before_mb": before, "channels": rec.info["channel_choice"]["channels"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="4,8,16,32,64")
    p.add_argument("--sizes", default="32,64,128")
    p.add_argument("--size-batch", type=int, default=4, help="batch size of the resolution sweep")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--channels", default="reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-results/scale.json")
    p.add_argument("--config", default="{}", help="JSON of further CI-Net settings, e.g. '{\"precision\": \"bf16\"}'")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        b, s = map(int, args.one.split("x"))
        print(json.dumps(one(b, s, args.iters, args.device, args.channels, json.loads(args.config))))
        return 0
    configs = [(int(b), 32) for b in args.batches.split(",")]
    configs += [(args.size_batch, int(s)) for s in args.sizes.split(",") if int(s) != 32]
    rows = []
    for b, s in configs:
        cmd = [sys.executable, "-m", "gradleak.bench.scale", "--one", f"{b}x{s}", "--iters", str(args.iters),
               "--device", args.device, "--channels", args.channels, "--config", args.config]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"batch": b, "size": s, "error": out.stderr.strip().splitlines()[-1][:120]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
        write_json(args.json, {"args": vars(args), "results": rows})
    print_table(["batch", "px", "victim", "generator ch", "s / iteration", "peak MB"],
                [[r["batch"], r["size"], r.get("model", "-"), r.get("channels", "-"),
                  r.get("s_per_it", float("nan")), r.get("peak_mb", r.get("error", "-"))] for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
