"""Memory options of CI-Net: peak memory and time per iteration with each switch on and off.

    gradleak bench memory --batch 4 --size 128 --iters 3 [--device cuda]

Variants: ``fp32`` (the default), ``checkpointing`` (activation checkpointing of the generator's
blocks), ``bf16`` (autocast of the generator and the victim) and both. Each runs in a fresh
subprocess (``gradleak.bench.scale``), so the peak is its own: CUDA max allocated, or on the CPU the
process's peak RSS, with the RSS before the attack (data, victim, libraries) printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from gradleak.bench.common import print_table, write_json

VARIANTS = {
    "fp32": {},
    "checkpointing": {"activation_checkpointing": True},
    "bf16": {"precision": "bf16"},
    "bf16+checkpointing": {"precision": "bf16", "activation_checkpointing": True},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--channels", default="reference")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-results/memory.json")
    args = p.parse_args(argv)
    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"--variants: expected names from {', '.join(VARIANTS)}, got {name!r}")
        cmd = [sys.executable, "-m", "gradleak.bench.scale", "--one", f"{args.batch}x{args.size}",
               "--iters", str(args.iters), "--device", args.device, "--channels", args.channels,
               "--config", json.dumps(VARIANTS[name])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"variant": name, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]})
        else:
            rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
        write_json(args.json, {"args": vars(args), "results": rows})
    base = next((r for r in rows if r["variant"] == "fp32" and "peak_mb" in r), None)

    def delta(r: dict) -> float:
        return r["peak_mb"] - r["before_mb"]

    print(f"CI-Net, batch {args.batch}, {args.size} px, {args.device}")
    print_table(["variant", "s / iteration", "peak MB", "before attack MB", "attack's share MB", "vs fp32"],
                [[r["variant"], r.get("s_per_it", float("nan")), r.get("peak_mb", r.get("error", "-")),
                  r.get("before_mb", "-"), delta(r) if "peak_mb" in r else "-",
                  f"{delta(r) / delta(base):.2f}x" if base and "peak_mb" in r else "-"] for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
