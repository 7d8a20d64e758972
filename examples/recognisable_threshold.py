"""Where does a reconstruction become recognisable? The measurement behind ``RECOGNISABLE_SSIM``.

Reads every paired (private image, reconstruction) of finished audit runs, then per SSIM bin:

* re-identification: is the private image the nearest (by SSIM) to its reconstruction among the
  private image and the other built-in 32-px photos (20 CIFAR-10, 20 CIFAR-100, 20 ImageNet
  samples)? An attacker holding candidate photos of the client could then single it out;
* a picture: a few pairs per bin (``--figure``), to look at.

Usage (after an audit, e.g. the one in docs/audit.md):
    python examples/recognisable_threshold.py runs/audit-lenet-adaptive --figure docs/img/ssim-bins.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gradleak.data import builtin_batch
from gradleak.metrics.image import ssim

BINS = [(-1.0, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 1.01)]


def pairs(audit: Path) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    out = []
    for metrics_path in sorted(audit.glob("*/*/metrics.json")):
        run, cell = metrics_path.parent, metrics_path.parent.parent
        if not (run / "reconstruction.safetensors").is_file() or not (cell / "truth.safetensors").is_file():
            continue
        rec = load_file(str(run / "reconstruction.safetensors"))["images"]
        truth = load_file(str(cell / "truth.safetensors"))["images"]
        for p in json.loads(metrics_path.read_text())["per_image"]:
            out.append((float(p["ssim"]), truth[p["truth"]], rec[p["reconstruction"]]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit", type=Path)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--per-bin", type=int, default=6)
    args = parser.parse_args()
    found = pairs(args.audit)
    pool = torch.cat([builtin_batch(20, source=src).images for src in ("cifar10", "cifar100", "imagenet")])
    print(f"{len(found)} pairs from {args.audit}; {pool.shape[0]} built-in photos as candidates")
    print("| SSIM bin | pairs | re-identified (rank 1) |")
    print("|---|---|---|")
    shown = []
    for lo, hi in BINS:
        group = [(s, t, r) for s, t, r in found if lo <= s < hi]
        if not group:
            continue
        hits = 0
        for _, t, r in group:
            own = float(ssim(r[None], t[None]))
            rest = pool[(pool - t).flatten(1).abs().amax(1) > 0]  # every candidate but the private image
            others = ssim(r[None].expand(rest.shape[0], -1, -1, -1), rest)
            hits += int(own > float(others.max()))
        print(f"| [{max(lo, 0):.1f}, {min(hi, 1):.1f}) | {len(group)} | {hits / len(group):.2f} |")
        step = max(1, len(group) // args.per_bin)
        shown.append((f"SSIM {max(lo, 0):.1f}-{min(hi, 1):.1f}", group[::step][:args.per_bin]))
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = args.per_bin * 2
        fig, axes = plt.subplots(len(shown), cols, figsize=(cols * 0.8, len(shown) * 0.9), squeeze=False)
        for row, (label, group) in zip(axes, shown):
            for ax in row:
                ax.axis("off")
            for k, (s, t, r) in enumerate(group):
                for j, img in enumerate((t, r)):
                    row[2 * k + j].imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
                row[2 * k + 1].set_title(f"{s:.2f}", fontsize=6)
            row[0].text(-0.6, 0.5, label, fontsize=7, ha="right", va="center", transform=row[0].transAxes)
        fig.tight_layout(pad=0.2)
        fig.subplots_adjust(left=0.12)
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=120)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
