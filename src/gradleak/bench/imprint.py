"""The imprint attack at scale: images recovered exactly from one FedSGD update of a malicious model.

A ResNet-18 (ReLU and sigmoid) behind an imprint block of k bins (:mod:`gradleak.threat.malicious`),
one FedSGD update of the built-in images, the imprint attack: how many of the batch come back at
PSNR >= 40 dB (exact to the eye and to 8-bit pixels), and how long the attack took. Collisions
(two images in one bin) are what limits it: with N images in k equally likely bins about
N^2 / (2k) pairs collide.

Usage:
    gradleak bench imprint                                  # batch 64 and 256, 1024 bins, both activations
    gradleak bench imprint --batches 64 --bins 64,256,1024 --activations relu --evasion 0,1,2,4   # the check vs noise
    gradleak bench imprint --batches 64 --bins 256,1024 --activations relu
    gradleak bench imprint --batches 64 --activations relu --protocols fedsgd,fedavg:1x64,fedavg:4x16,fedavg:5x64
    gradleak bench imprint --block trap --batches 64,256 --bins 1024,4096   # trap weights: --bins is the unit count
    gradleak bench imprint --block sparse-imprint --batches 64 --activations relu --protocols fedsgd,fedavg:4x16,fedavg:8x8

A FedAvg setting ``fedavg:SxB`` is S local SGD steps (lr 0.1) at mini-batch B; the attack reads the
delta as it reads a gradient (the block's default gain keeps the delta's images, see
:class:`gradleak.threat.malicious.ImprintBlock`).

``--block sparse-imprint`` is the sparse imprint block (each image feeds only its own bin's unit),
made for FedAvg's several local steps. ``--block trap`` puts trap units (:mod:`gradleak.threat.trap`, set on public photo crops to fire
for one image of the batch) in front instead, attacked by the ``trap`` attack; its check is the
``trap-units`` finding with the client's own batch as the images (the arrays alone are flagged by
their zero-sum rows, a separate finding).
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from gradleak.bench.common import print_table, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradleak bench imprint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--bins", default="1024")
    p.add_argument("--activations", default="relu,sigmoid")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--evasion", default="0",
                   help="noise on the imprint rows, as a multiple of a row's norm (the check's evasion test)")
    p.add_argument("--protocols", default="fedsgd",
                   help="fedsgd and/or fedavg:SxB (S local steps at mini-batch B, lr 0.1), comma-separated")
    p.add_argument("--block", default="imprint", choices=["imprint", "sparse-imprint", "trap"],
                   help="the malicious block and its attack: imprint bins (cumulative or sparse), or trap units "
                        "(then --bins is the unit count)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.block == "trap" and args.evasion != "0":
        p.error("--evasion: the row-noise evasion applies to --block imprint only")
    protocols = [t.strip() for t in args.protocols.split(",") if t.strip()]
    for t in protocols:
        if t != "fedsgd" and not re.fullmatch(r"fedavg:\d+x\d+", t):
            p.error(f"--protocols: expected fedsgd or fedavg:SxB (e.g. fedavg:4x16), got {t!r}")

    import gradleak
    from gradleak.attacks import ATTACKS
    from gradleak.data import builtin_batch, public_images
    from gradleak.metrics import score_reconstruction
    from gradleak.models import build_model
    from gradleak.threat import fedavg_update, fedsgd_update
    from gradleak.threat.inspect import MIN_IMAGES, inspect_model
    from gradleak.threat.malicious import find_imprint
    from gradleak.types import ModelSpec, ServerState

    results = []
    for activation in args.activations.split(","):
        spec = ModelSpec(name=args.model, activation=activation)
        honest = ServerState.from_spec(build_model(spec, seed=42), spec)
        public = public_images(spec.image_size)  # the server's photos, loaded once (trap units are set on them)
        for n in (int(b) for b in args.batches.split(",")):
            batch = builtin_batch(n, source="builtin" if n <= 68 else "photos")
            for k in (int(b) for b in args.bins.split(",")):
                for protocol in protocols:
                    for noise in (float(v) for v in args.evasion.split(",")):
                        # a fresh block for each setting, as the malicious server of the attack builds it
                        server = ATTACKS.get(args.block).malicious_model(honest, k, batch_size=n, public=public)
                        block = find_imprint(server.model)
                        if noise and block is not None:
                            with torch.no_grad():
                                g = torch.Generator().manual_seed(0)
                                w = block.encoder.weight
                                n_ = torch.randn(w.shape, generator=g)
                                w.add_(noise * w.norm(dim=1, keepdim=True) * n_ / n_.norm(dim=1, keepdim=True))
                        if protocol == "fedsgd":
                            update = fedsgd_update(server, batch.images, batch.labels)
                        else:
                            steps, size = (int(v) for v in protocol.split(":")[1].split("x"))
                            update = fedavg_update(server, batch.images, batch.labels, local_steps=steps, lr=0.1,
                                                   batch_size=size)
                        t0 = time.perf_counter()
                        rec = gradleak.attacks.create(args.block).reconstruct(server, update)
                        seconds = time.perf_counter() - t0
                        scored = score_reconstruction(rec.images, batch.images, with_lpips=False)
                        exact = sum(p["psnr"] >= 40 for p in scored.per_image)
                        mine = batch.images[:64] if args.block == "trap" and n >= MIN_IMAGES else None
                        kind = "trap-units" if args.block == "trap" else "imprint-rows"
                        rows = next((f for f in inspect_model(server.model, server.input_shape, images=mine)
                                     if f.kind == kind), None)
                        results.append({"model": args.model, "activation": activation, "batch": n, "bins": k,
                                        "protocol": protocol, "noise": noise, "exact": exact, "fraction": exact / n,
                                        "block": args.block, "found": rec.info["images_found"],
                                        # bins holding a blend; for trap units, ratios dropped as blends
                                        "mixed_bins": rec.info["bins_mixed"] if "bins_mixed" in rec.info
                                        else rec.info["units_fired"] - rec.info["ratios_plausible"],
                                        "ssim_mean": scored.summary["ssim_mean"], "seconds": seconds,
                                        "check_score": rows.score if rows else None,
                                        "flagged": bool(rows and rows.flagged), "threads": torch.get_num_threads()})
                        check = f"{rows.score:.3f}" if rows else "not run"
                        print(f"  {args.block} {activation} N={n} k={k} {protocol} noise {noise:g}: {exact}/{n} at "
                              f"PSNR >= 40 dB in {seconds:.2f} s; check {check}", flush=True)
    print_table(["block", "model", "activation", "batch", "bins/units", "protocol", "row noise", "PSNR >= 40 dB",
                 "fraction", "mixed", "mean SSIM", "attack s", "check score", "flagged"],
                [[r["block"], r["model"], r["activation"], r["batch"], r["bins"], r["protocol"], f"{r['noise']:g}",
                  f"{r['exact']}/{r['batch']}", f"{r['fraction']:.2f}", r["mixed_bins"], f"{r['ssim_mean']:.3f}",
                  f"{r['seconds']:.2f}", "-" if r["check_score"] is None else f"{r['check_score']:.3f}",
                  "yes" if r["flagged"] else "no"] for r in results])
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
