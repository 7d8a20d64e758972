#!/usr/bin/env bash
# The device check: one command that fits a short GPU loan (about 8 minutes on one GPU; an H200 on
# 2026-12-04 took 3.7 minutes for steps 1-2 at 20 iterations x 3 rounds, hence 10 x 2 now).
#
#   DEVICE=cuda OUT=$OUT bash examples/gpu_check.sh     # on the GPU machine
#   DEVICE=cpu  OUT=/tmp/check bash examples/gpu_check.sh   # tiny sizes: the script itself, checked on a CPU
#
# 1. the GPU tests (skipped without CUDA);
# 2. `gradleak bench step` at batch 8, 64 and 256, TF32 off (what runs compute) and on;
# 3. an ImageNet-size step (batch 32 at 256 px): peak memory and time, fp32 and with activation
#    checkpointing + bf16 (`gradleak bench memory`);
# 4. CI-Net at batch 64 on built-in images, the published settings and the default, until SSIM 0.95
#    or QMIN minutes each (default 3; `gradleak bench quality`: iterations and seconds to 0.80 / 0.90
#    / 0.95). Last, so that a loan cut short loses only its tail: quality.json is rewritten after
#    each variant, and the summary reads whatever files exist.
# It writes each benchmark's JSON and the summary `check.json` + `check.md` into $OUT.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
if [ "$DEVICE" = "cpu" ]; then
  BATCHES="2"; ITERS=2; ROUNDS=1; CH=16; QBATCH=2; QITERS=4; QMIN=0.1; BIG=2; BIGSIZE=64; BIGCH=16
else
  BATCHES="8 64 256"; ITERS=10; ROUNDS=2; CH=128; QBATCH=64; QITERS=100000; QMIN="${QMIN:-3}"; BIG=32; BIGSIZE=256; BIGCH=128
fi
# a failing GPU test is reported (gpu-tests.txt, the summary) and the measurements still run
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu-tests.txt" 2>&1 || true
tail -3 "$OUT/gpu-tests.txt"
for b in $BATCHES; do
  gradleak bench step --device "$DEVICE" --batch "$b" --iters "$ITERS" --rounds "$ROUNDS" --channels "$CH" \
    --json "$OUT/step-b$b-tf32off.json" | tail -3
  gradleak bench step --device "$DEVICE" --batch "$b" --iters "$ITERS" --rounds "$ROUNDS" --channels "$CH" --tf32 \
    --no-attack --json "$OUT/step-b$b-tf32on.json" | tail -3
done
gradleak bench memory --batch "$BIG" --size "$BIGSIZE" --iters 2 --channels "$BIGCH" \
  --variants fp32,bf16+checkpointing --device "$DEVICE" --json "$OUT/memory.json" | tail -6
gradleak bench quality --batches "$QBATCH" --iters "$QITERS" --variant reference --variant default --target 0.95 \
  --minutes "$QMIN" --device "$DEVICE" --json "$OUT/quality.json" | tail -6 || echo "bench quality failed: the summary keeps what it wrote"
"$PYTHON" - "$OUT" "$DEVICE" <<'PY'
import json, pathlib, sys, datetime
import torch
out, device = pathlib.Path(sys.argv[1]), sys.argv[2]
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
read = lambda f: json.loads((out / f).read_text()) if (out / f).is_file() else None  # noqa: E731
steps = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("step-*.json"))}
summary = {"date": datetime.date.today().isoformat(), "device": device, "device_name": name,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu_tests": (out / "gpu-tests.txt").read_text().strip().splitlines()[-1:],
           "step_ms": {k: {"floor": v["floor_ms"], "attack": v["attack_ms"]} for k, v in steps.items()},
           "quality": read("quality.json"), "memory": read("memory.json")}
(out / "check.json").write_text(json.dumps(summary, indent=2))
lines = [f"# Device check, {summary['date']}, {name}, torch {torch.__version__}", "",
         f"GPU tests: {' '.join(summary['gpu_tests'])}", "", "| step | floor ms | attack ms |", "|---|---|---|"]
lines += [f"| {k} | {v['floor']:.1f} | {v['attack']:.1f} |" for k, v in summary["step_ms"].items()]
for r in (summary["memory"] or {}).get("results", []):
    lines.append(f"| memory b{r['batch']} {r['size']} px {r['variant']} | {1000 * r['s_per_it']:.1f} | "
                 f"peak {r['peak_mb']:.0f} MB |")
for r in (summary["quality"] or {}).get("results", []):
    reached = ", ".join(f"{t}: {it} its / {sec:.0f} s" for t, hit in r["reached"].items() if hit for it, sec in [hit])
    lines.append(f"| quality b{r['batch']} {r['variant']} | {1000 * r['s_per_it']:.1f} | SSIM {r['final_ssim']:.3f} "
                 f"after {r['iterations']} its ({reached or 'no target reached'}) |")
(out / "check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
