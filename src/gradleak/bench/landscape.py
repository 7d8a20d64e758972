"""How wide is the basin? The update's gradient map around the private batch, per victim.

    gradleak bench landscape                                   # the default victims, batch 1 and 4
    gradleak bench landscape --victims resnet18-relu:train,resnet18-relu:eval --batches 1
    gradleak bench landscape --victims resnet18-relu:train --weights runs/trained/resnet18-relu.safetensors
    gradleak bench landscape --victims resnet18-relu:train --batches 1 --directions noise,noise-4,image,blur,grey
    gradleak bench landscape --victims resnet18-sigmoid:eval --batches 1,4 --center 16

An attack that matches gradients can only find the private batch if the gradient, taken at a
candidate near the batch, still points the way the update does. This measures that directly: the
client's FedSGD gradient at ``(1 - t) x + t u`` (``x`` the private batch, ``u`` uniform noise in
[0, 1], seed ``--seed``), compared with the update at ``x``, for t from 1% to 100%. Two numbers per
t: the mean over the weight tensors (dimension >= 2) of each tensor's cosine similarity (every
layer weighs the same: the whole-vector cosine is dominated by the last layer, which barely
depends on the images), and the first convolution's cosine alone. ``radius`` is the smallest t in
the grid at which the mean cosine falls below 0.5: the width of the basin, in the fraction of
pixel noise. It uses the private batch, so it is a measurement of a victim, never an attack.

Read: a victim whose radius is a few percent gives an attacker starting from noise nothing to
follow; a victim whose gradients stay aligned at t = 1 gives it a smooth path (the paper's
ResNet-18-sigmoid, and ResNet-18-ReLU with BatchNorm in eval mode, both broken by CI-Net in a few
hundred iterations). A small radius says the attacks here fail at optimisation, not for lack of
information: the update still determines the batch (the cosine is exactly 1 at t = 0).

``--center K`` compares both sides minus the mean gradient of K noise batches: the landscape a centred
attack sees (``center=K``), for victims whose update barely depends on the images.

``--directions`` mixes in other things than pixel noise (:data:`gradleak.audit.landscape.DIRECTIONS`):
low-frequency noise, other built-in photos (the next images after the batch), the batch's own blur,
grey or mean colour: whether the basin is wider along directions an image prior keeps to.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradleak.audit.landscape import DIRECTIONS, MIXES, gradient_landscape
from gradleak.bench.common import print_table, write_json
from gradleak.data import builtin_batch
from gradleak.errors import ConfigError
from gradleak.models import ACTIVATIONS, build_model
from gradleak.threat.batchnorm import tracked_layers
from gradleak.threat.io import load_victim
from gradleak.types import ModelSpec, ServerState

DEFAULT_VICTIMS = ("resnet18-relu:train", "resnet18-relu:eval", "resnet18-sigmoid:train",
                   "convnet-relu:train", "convnet-relu:eval", "lenet-relu:train")

MODES = ("train", "eval", "batch-stats")
"""The client's BatchNorm: train mode (each batch's own statistics, the default client), eval mode
(the running statistics: 0 and 1 in an untrained victim), ``batch-stats``: eval mode with the running
statistics set to the private batch's own (one train-mode forward with momentum 1; the forward
values of train mode at the batch, without its coupling of the samples)."""


def parse_victim(text: str) -> tuple[str, str, str]:
    """``"resnet18-relu:train"`` -> ``("resnet18", "relu", "train")``; the mode defaults to train."""
    body, _, mode = text.partition(":")
    # the longest known activation the body ends with ("leaky-relu" before "relu"); model names hold "-" too
    known = [a for a in sorted(ACTIVATIONS, key=len, reverse=True) if body.endswith(f"-{a}")]
    name, _, activation = (body[:-len(known[0]) - 1], "-", known[0]) if known else body.rpartition("-")
    mode = mode or "train"
    if not name or not activation or mode not in MODES:
        raise ConfigError(f"--victims: expected MODEL-ACTIVATION[:{'|'.join(MODES)}] such as "
                          f"'resnet18-relu:train', got {text!r}")
    return name, activation, mode


def victim_server(name: str, activation: str, mode: str, weights: str | None,
                  images: torch.Tensor | None = None) -> ServerState:
    """The victim (seed 42, or ``weights``) in the client's BatchNorm ``mode`` (:data:`MODES`);
    ``batch-stats`` needs the private ``images``."""
    spec = ModelSpec(name=name, activation=activation, bn_mode="train" if mode == "train" else "eval")
    model = build_model(spec, seed=42) if weights is None else load_victim(weights, spec)
    if mode == "batch-stats":
        if images is None:
            raise ConfigError("BatchNorm mode 'batch-stats': expected the private images")
        norms = list(tracked_layers(model).values())
        momenta = [m.momentum for m in norms]
        counts: dict[nn.Module, int] = {}
        hooks = [m.register_forward_hook(lambda m, inp, out: counts.__setitem__(m, inp[0].numel() // inp[0].shape[1]))
                 for m in norms]
        model.train()
        with torch.no_grad():
            for m in norms:
                m.momentum = 1.0
            model(images)
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
                m.running_var.mul_((counts[m] - 1) / counts[m])  # type: ignore[union-attr]  # unbiased -> biased
        for h in hooks:
            h.remove()
        model.eval()
    return ServerState.from_spec(model, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victims", default=",".join(DEFAULT_VICTIMS),
                   help="comma-separated MODEL-ACTIVATION[:train|eval|batch-stats] (the client's BatchNorm mode)")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--weights", default=None, help="a trained victim's weights (safetensors), for every victim")
    p.add_argument("--directions", default="noise",
                   help=f"comma-separated, what is mixed in: {', '.join(DIRECTIONS)} (default noise)")
    p.add_argument("--center", type=int, default=0,
                   help="compare both sides minus the mean gradient of this many noise batches (0: off): the "
                        "landscape a centred attack (center=K) sees")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise mixed in")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default="bench-results/landscape.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    victims = [parse_victim(v) for v in args.victims.split(",") if v]
    batches = [int(b) for b in args.batches.split(",") if b]
    directions = [d for d in args.directions.split(",") if d]
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ConfigError(f"--directions: expected a comma-separated subset of {', '.join(DIRECTIONS)}, "
                          f"got {args.directions!r}")
    results, rows = [], []
    for name, activation, mode in victims:
        for n in batches:
            data = builtin_batch(n)  # every victim here has 10 classes
            others = builtin_batch(n, offset=n).images if "image" in directions else None
            server = victim_server(name, activation, mode, args.weights, data.images)
            for direction in directions:
                r = gradient_landscape(server, data.images, data.labels, seed=args.seed, direction=direction,
                                       others=others, center=args.center)
                r.update(victim=f"{name}-{activation}", bn_mode=mode, batch=n, direction=direction,
                         center=args.center, weights=args.weights)
                results.append(r)
                rows.append([f"{name}-{activation}", mode, n, direction,
                             *(f"{m:.2f} / {f:.2f}" for m, f in zip(r["mean_cosine"], r["first_cosine"])),
                             "> 1" if r["radius"] is None else f"{r['radius']:g}"])
    headers = ["victim", "BatchNorm", "batch", "towards", *(f"t={t:g}" for t in MIXES), "radius"]
    print("cosine with the update: mean over weight tensors / first convolution, at the batch mixed with t of "
          "what the 'towards' column names")
    print_table(headers, rows)
    write_json(args.json, {"mixes": list(MIXES), "seed": args.seed, "results": results})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
