"""Time to quality: wall time and iterations until mean SSIM (Hungarian) reaches 0.80 / 0.90 / 0.95.

    gradleak bench quality --batches 4,8,16 --iters 800 [--variant NAME ...] [--seeds 0,1]
    gradleak bench quality --batches 32,64 --iters 3000 --variant default --variant reference \
        --target 0.9 --minutes 60 --out bench-results/large --plot docs/img/large-batch.png
    gradleak bench quality --from bench-results/large/b16-default.json --from ... --plot docs/img/large-batch.png

SSIM and PSNR are measured every ``--every`` iterations in the progress callback, off the clock (the
callback's own time is subtracted). Labels are recovered from the update, as in the demo.
Variants are CI-Net configs to compare (``--variant`` repeatable, default: all listed below);
``--seeds`` repeats each with other attack seeds (generator initialisation and latent), since one
seed's iteration count can be off by a factor of two.

Long runs: ``--out DIR`` gives each run its own folder with a checkpoint at every reading; the same
command again resumes every unfinished run where it stopped (its curve and on-clock seconds kept),
and skips finished ones; a larger ``--minutes`` or ``--iters`` continues them. ``--target`` stops a
run once its SSIM reaches it, ``--minutes`` once its on-clock time passes the budget (both checked
at each reading). ``--plot`` draws SSIM against iterations and against wall time; ``--from`` redraws
the table and the plot from ``--json`` files of earlier runs (runs with different budgets in one figure).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import gradleak
from gradleak.attacks import CINetAttack
from gradleak.attacks.checkpoint import Checkpointer
from gradleak.bench.common import demo_case, print_table, write_json
from gradleak.generators import choose_channels
from gradleak.metrics import pair_images, psnr, ssim

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
    # short budgets (the demo): the rate decayed to 0 over the run, from 1e-3 or higher
    "lr1e-3-cos": dict(lr=1e-3, lr_decay="cosine"),
    "lr2e-3-cos": dict(lr=2e-3, lr_decay="cosine"),
    "lr3e-3-cos": dict(lr=3e-3, lr_decay="cosine"),
    "lr3e-3-step": dict(lr=3e-3, lr_decay="step"),
    # large batches: the width
    "256ch": dict(channels=256),
    "192ch": dict(channels=192),
    "layer-cosine": dict(loss="cosine-layer"),
    "reference-layer-cosine": dict(loss="cosine-layer", channels="reference"),
    "lr3e-3": dict(lr=3e-3),
    "lr5e-4": dict(lr=5e-4),
    "lr2.5e-4": dict(lr=2.5e-4),
    "instance-norm": dict(norm="instance"),
    # progressive growing and the soft sign (docs/attacks.md: measured at batch 8, untried at 32 and 64)
    "grow50": dict(grow=50),
    "grow100": dict(grow=100),
    "soft-sign-adam": dict(update="soft-sign-adam"),
    # with --share-bn-stats: the statistics term's weight (default 0.1)
    "bn1": dict(bn_stats=1.0),
    "bn10": dict(bn_stats=10.0),
}
THRESHOLDS = (0.80, 0.90, 0.95)


def _more_to_do(previous: dict[str, Any], iters: int, target: float | None, minutes: float | None) -> bool:
    """Whether a finished run continues under a larger budget (more iterations or minutes, or a
    target it has not reached)."""
    if target is not None and (previous["final_ssim"] or 0.0) >= target:
        return False
    return previous["iterations"] < iters and (minutes is None or previous["seconds"] < 60 * minutes)


def run(batch: int, variant: str, iters: int, every: int, device: str, verbose: bool = False,
        seed: int = 0, out: Path | None = None, target: float | None = None,
        minutes: float | None = None, size: int = 32, data_root: str | None = None,
        share_bn_stats: bool = False) -> dict[str, Any]:
    """One CI-Net run on the demo case at ``batch``, read every ``every`` iterations.

    ``share_bn_stats``: the client also shares its BatchNorm statistics, which the attack matches.
    With ``out`` the run checkpoints at every reading into ``out/b<batch>-<size>px-<variant>-s<seed>/``
    (``...-s<seed>-bn/`` with shared statistics)
    and a second call resumes it, or returns the recorded result of a finished one (unless the call
    gives it more iterations or minutes, or a target it has not reached: then it continues).
    """
    folder = None if out is None else Path(out) / (f"b{batch}-{size}px-{variant}-s{seed}" + ("-bn" if share_bn_stats else ""))
    record = folder / "run.json" if folder is not None else None
    previous = json.loads(record.read_text()) if record is not None and record.is_file() else None
    if previous is not None and previous.get("finished") and not _more_to_do(previous, iters, target, minutes):
        return previous
    server, update, images, _ = demo_case(batch, size=size, model="resnet18" if size <= 64 else "resnet18-imagenet",
                                          device=device, data_root=data_root, share_bn_stats=share_bn_stats)
    cfg = {**VARIANTS[variant], "iterations": iters, "log_every": every,
           "checkpoint_every": every if folder is not None else 0}
    attack = gradleak.attacks.create("cinet", cfg, device=device, seed=seed)
    resume = folder is not None and Checkpointer(folder, 0).exists()
    curve: list[list[float]] = []  # [iteration, SSIM, PSNR, on-clock seconds]
    if folder is not None and resume and previous is not None:
        # the readings up to the checkpoint (a kill may have left one more)
        done = Checkpointer(folder, 0).iteration() or 0
        curve = [c for c in previous["curve"] if c[0] <= done]
    before = curve[-1][3] if curve else 0.0
    off_clock = 0.0
    t0 = time.perf_counter()
    c, h, _ = server.input_shape
    channels = choose_channels(attack.config.channels, victim_parameters=sum(t.numel() for t in update.gradients()),
                               batch_size=batch, image_size=h, out_channels=c, nz=attack.config.nz,
                               norm=attack.config.norm).channels

    def result(finished: str | None) -> dict[str, Any]:
        total = curve[-1][3] if curve else 0.0
        last = int(curve[-1][0]) if curve else 0
        # each threshold at the first reading above it: [iteration, on-clock seconds], or None
        reached = {str(t): next(([int(c[0]), c[3]] for c in curve if c[1] >= t), None) for t in THRESHOLDS}
        return {"batch": batch, "size": size, "variant": variant, "share_bn_stats": share_bn_stats, "seed": seed, "channels": channels, "device": device,
                "seconds": total, "s_per_it": total / max(last, 1), "iterations": last,
                "final_ssim": curve[-1][1] if curve else None, "final_psnr": curve[-1][2] if curve else None,
                "reached": reached, "curve": curve,
                "config": cfg, "threads": torch.get_num_threads(), "finished": finished}

    def callback(p: gradleak.attacks.Progress) -> bool:
        nonlocal off_clock
        s = time.perf_counter()
        on_clock = before + s - t0 - off_clock
        x = p.images.cpu()
        paired = x[pair_images(x, images)]
        value = float(ssim(paired, images).mean())
        curve.append([p.iteration, value, float(psnr(paired, images).mean()), on_clock])
        if verbose:
            print(f"  {variant} batch {batch} it {p.iteration}: SSIM {value:.3f} loss {p.loss:.3e} "
                  f"{on_clock:.1f} s", flush=True)
        if record is not None:
            write_json(record, result(None))
        off_clock += time.perf_counter() - s
        return (target is not None and value >= target) or (minutes is not None and on_clock >= 60 * minutes)

    rec = attack.reconstruct(server, update, callback=callback, run_dir=folder, resume=resume)
    final = result("target" if target is not None and curve and curve[-1][1] >= target
                   else "budget" if rec.iterations < iters else "iterations")
    final["label_strategy"] = rec.label_strategy
    if record is not None:
        write_json(record, final)
    return final


_RESULT_KEYS = ("batch", "variant", "channels", "seed", "s_per_it", "iterations", "final_ssim", "final_psnr",
                "reached", "curve")


def _recorded(path: Path) -> list[dict[str, Any]]:
    """The results a ``--json`` file holds, checked for the fields the table and the plot read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--from {path}: expected a JSON file written by 'bench quality --json', got: {e}") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) and all(k in r for k in _RESULT_KEYS)
                                                for r in results):
        raise SystemExit(f"--from {path}: expected {{'results': [...]}} with {', '.join(_RESULT_KEYS)} in each "
                         "result, as 'bench quality --json' writes")
    return results


def _name(r: dict[str, Any]) -> str:
    """The variant, with ``+bn`` where the client shared its BatchNorm statistics."""
    return r["variant"] + ("+bn" if r.get("share_bn_stats") else "")


def plot(results: list[dict[str, Any]], path: str | Path) -> None:
    """SSIM against iterations and against on-clock wall time, one line per run."""
    from gradleak.reporting.figures import subplots

    fig, axes = subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        if not r["curve"]:
            continue
        it, ssim_, _, sec = zip(*r["curve"])
        label = (f"batch {r['batch']} {_name(r)} ({r['channels']} ch)" + (f" s{r['seed']}" if r["seed"] else ""))
        axes[0].plot(it, ssim_, label=label)
        axes[1].plot([t / 60 for t in sec], ssim_, label=label)
    for ax, xlabel in zip(axes, ("iteration", "wall time (min, on the clock)")):
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean SSIM (Hungarian)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (batch, variant, seed) run the arguments name; the JSON (and the plot) rewritten after each."""
    results: list[dict[str, Any]] = []
    for b in (int(x) for x in args.batches.split(",")):
        for v, seed in ((v, int(s)) for v in args.variant or list(VARIANTS) for s in args.seeds.split(",")):
            r = run(b, v, args.iters, args.every, args.device, args.verbose, seed, args.out, args.target, args.minutes,
                  args.size, args.data_root, args.share_bn_stats)
            results.append(r)
            print(f"batch {b} {_name(r)} seed {seed}: final SSIM {r['final_ssim']:.3f}, PSNR {r['final_psnr']:.2f} dB, "
                  f"{r['s_per_it']:.3f} s/it, reached {r['reached']}", flush=True)
            write_json(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "results": results})
            if args.plot:
                plot(results, args.plot)
    return results


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
    p.add_argument("--out", type=Path, default=None, help="resumable run folders (checkpoint at every reading)")
    p.add_argument("--target", type=float, default=None, help="stop a run once its mean SSIM reaches this")
    p.add_argument("--minutes", type=float, default=None, help="stop a run after this much on-clock time")
    p.add_argument("--size", type=int, default=32, help="image size (above 64 px: the ImageNet-stem ResNet-18)")
    p.add_argument("--data-root", default=None, help="a local CIFAR-10 copy to draw the batch from (default: built-in)")
    p.add_argument("--share-bn-stats", action="store_true",
                   help="the client also uploads its BatchNorm statistics (the attack matches them: bn_stats)")
    p.add_argument("--plot", default=None, help="write SSIM against iterations and wall time (PNG)")
    p.add_argument("--from", dest="recorded", action="append", default=None, type=Path, metavar="JSON",
                   help="run nothing: table (and --plot) from the results that earlier runs wrote with --json (repeatable)")
    args = p.parse_args(argv)
    if args.recorded:
        results = [r for path in args.recorded for r in _recorded(path)]
        if args.plot:
            plot(results, args.plot)
    else:
        results = _run_all(args)

    def cell(r: dict[str, Any], t: float) -> str:
        hit = r["reached"][str(t)]
        return "-" if hit is None else f"{hit[0]} it / {hit[1]:.0f} s"

    print_table(["batch", "variant", "channels", "seed", "s/it", "iterations", "final SSIM", "final PSNR"]
                + [f"SSIM {t}" for t in THRESHOLDS],
                [[r["batch"], _name(r), r["channels"], r["seed"], r["s_per_it"], r["iterations"], r["final_ssim"],
                  r["final_psnr"]] + [cell(r, t) for t in THRESHOLDS] for r in results])
    print(f"threads {torch.get_num_threads()}; seconds are on the clock (SSIM readings excluded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
