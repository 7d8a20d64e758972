#!/usr/bin/env bash
# The paper's large-batch results on a GPU: Table 4 (CIFAR-10, batch 64), Table 5 (CIFAR-10, batch
# 256) and ImageNet batch 24 and 32 at 256 px (appendix D), each as a resumable gradleak run.
#
#   bash examples/paper_scale.sh [OUT_DIR] [CIFAR_ROOT]
#
# OUT_DIR (default runs/paper) gets one run folder per case: report.html, metrics.json (SSIM,
# FSIM, PSNR, LPIPS, label accuracy), grid.png, and a checkpoint every 500 iterations. Running the
# script again resumes every unfinished case where it stopped and skips finished ones.
# CIFAR_ROOT: a local torchvision CIFAR-10 copy (the folder holding cifar-10-batches-py), for the
# paper's own data; without it the cases use gradleak's built-in images (68 real images, then
# crops of the photos: batch 256 is 68 real images and 188 crops). Nothing is downloaded.
#
# The victim is the paper's: untrained ResNet-18 with Sigmoid (seed 42), FedSGD, labels recovered
# from the update. The attack is gradleak's default CI-Net (the published code's cosine matching
# and sign-Adam, the `auto` width), with the paper's iteration counts where it gives them (150k for
# batch 256) and otherwise 20k.
#
# Expected cost, from the device check on one NVIDIA H200 (2026-12-04, torch 2.11, float32 with TF32
# off, 128 generator channels; docs/measured/gpu-h200-2026-12-04): a batch-64 step took 92 ms (20k
# steps: ~31 min; the default reached SSIM 0.95 at batch 64 after 1875 steps, 130 s) and a batch-256
# step 268 ms (150k steps: ~11 h; with TF32 on, `gradleak bench step --tf32`, the bare step took
# 105 ms: ~4.4 h, a speed attack runs do not take yet: they compute in float32). The
# ImageNet cases at
# 256 px use 512 generator channels; their CPU peak was 15 GB resident at batch 32 in fp32
# (README, Memory; the paper needed 39.6 GB on an A100 with its wider generator). Add
# `--set precision=bf16 --set activation_checkpointing=true` to halve the memory.
set -euo pipefail
OUT=${1:-runs/paper}
DATA=()
if [[ $# -ge 2 ]]; then DATA=(--data cifar10-dir --data-root "$2"); fi
DEVICE=${DEVICE:-cuda}

run() {  # run NAME ITERATIONS [case flags...]
  local name=$1 iters=$2
  shift 2
  local dir="$OUT/$name"
  if [[ -f "$dir/metrics.json" ]]; then
    echo "$name: finished ($dir/metrics.json)"
  elif [[ -f "$dir/checkpoint.json" ]]; then
    gradleak demo --resume "$dir" --no-progress
  else
    gradleak demo --device "$DEVICE" --iterations "$iters" --set checkpoint_every=500 --set log_every=500 \
      --no-progress --out "$dir" "$@"
  fi
}

run table4-cifar10-b64 20000 --batch-size 64 "${DATA[@]}"
run table5-cifar10-b256 150000 --batch-size 256 "${DATA[@]}"
run imagenet-b24 20000 --model resnet18-imagenet --num-classes 1000 --image-size 256 --batch-size 24 --data photos
run imagenet-b32 20000 --model resnet18-imagenet --num-classes 1000 --image-size 256 --batch-size 32 --data photos
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    s = json.loads(f.read_text())["summary"]
    print(f"{f.parent.name:24} SSIM {s['ssim_mean']:.3f}  FSIM {s.get('fsim_mean')}  PSNR {s['psnr_mean']:.2f}  "
          f"LPIPS {s.get('lpips_mean')}  labels {s.get('label_accuracy')}")
EOF
