#!/usr/bin/env bash
# The device check: one command that fits a short GPU loan (about 8 minutes on one GPU).
#
#   DEVICE=cuda OUT=$OUT bash examples/gpu_check.sh     # on the GPU machine
#   DEVICE=cpu  OUT=/tmp/check bash examples/gpu_check.sh   # tiny sizes: the script itself, checked on a CPU
#
# 1. the GPU tests (skipped without CUDA);
# 2. `gradleak bench step` at batch 8, 64 and 256, TF32 off (what runs compute) and on;
# 3. CI-Net at batch 64 on built-in images, the default and the published settings, until SSIM 0.95
#    or 3 minutes each (`gradleak bench quality`: iterations and seconds to 0.80 / 0.90 / 0.95);
# 4. an ImageNet-size step (batch 32 at 256 px): peak memory and time, fp32 and with activation
#    checkpointing + bf16 (`gradleak bench memory`).
# It writes each benchmark's JSON and the summary `check.json` + `check.md` into $OUT.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
if [ "$DEVICE" = "cpu" ]; then
  BATCHES="2"; ITERS=2; ROUNDS=1; CH=16; QBATCH=2; QITERS=4; QMIN=0.1; BIG=2; BIGSIZE=64; BIGCH=16
else
  BATCHES="8 64 256"; ITERS=20; ROUNDS=3; CH=128; QBATCH=64; QITERS=100000; QMIN=3; BIG=32; BIGSIZE=256; BIGCH=128
fi
python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 | tee "$OUT/gpu-tests.txt"
for b in $BATCHES; do
  gradleak bench step --device "$DEVICE" --batch "$b" --iters "$ITERS" --rounds "$ROUNDS" --channels "$CH" \
    --json "$OUT/step-b$b-tf32off.json" | tail -3
  gradleak bench step --device "$DEVICE" --batch "$b" --iters "$ITERS" --rounds "$ROUNDS" --channels "$CH" --tf32 \
    --no-attack --json "$OUT/step-b$b-tf32on.json" | tail -3
done
gradleak bench quality --batches "$QBATCH" --iters "$QITERS" --variant default --variant reference --target 0.95 \
  --minutes "$QMIN" --device "$DEVICE" --json "$OUT/quality.json" | tail -6
gradleak bench memory --batch "$BIG" --size "$BIGSIZE" --iters 2 --channels "$BIGCH" \
  --variants fp32,bf16+checkpointing --device "$DEVICE" --json "$OUT/memory.json" | tail -6
python - "$OUT" "$DEVICE" <<'PY'
import json, pathlib, sys, datetime
out, device = pathlib.Path(sys.argv[1]), sys.argv[2]
steps = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("step-*.json"))}
summary = {"date": datetime.date.today().isoformat(), "device": device,
           "gpu_tests": (out / "gpu-tests.txt").read_text().strip().splitlines()[-1:],
           "step_ms": {k: {"floor": v["floor_ms"], "attack": v["attack_ms"]} for k, v in steps.items()},
           "quality": json.loads((out / "quality.json").read_text()),
           "memory": json.loads((out / "memory.json").read_text())}
(out / "check.json").write_text(json.dumps(summary, indent=2))
lines = [f"# Device check, {summary['date']}, {device}", "", "| step | floor ms | attack ms |", "|---|---|---|"]
lines += [f"| {k} | {v['floor']:.1f} | {v['attack']:.1f} |" for k, v in summary["step_ms"].items()]
(out / "check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
