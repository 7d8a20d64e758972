"""``gradleak inspect``: the client's check of a received model before it trains on it.

Reads a model-state file (what the server sent) and reports every linear layer that reads or
writes the raw image, with a score and a plain explanation (:mod:`gradleak.threat.inspect`): near-
identical rows with graded biases cut an image statistic into bins (an imprint block, "Robbing the
Fed"), and a decoder with identical columns feeds them the same backward signal. With the
client's own images (``--images N`` from ``--data``), it also finds trap units: a raw-input layer
whose units fire for few of them (trap weights, whose rows look honest). Exit 0 when nothing is
flagged, 1 when something is (a gate a client or CI can use), 2 on bad input.

    gradleak simulate --model resnet18 --batch-size 8 --imprint-bins 1024 --out runs/malicious
    gradleak inspect --model-state runs/malicious/model.safetensors
    gradleak simulate --model resnet18 --batch-size 8 --trap-units 1024 --out runs/trap
    gradleak inspect --model-state runs/trap/model.safetensors --images 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradleak.data import load_batch
from gradleak.errors import ConfigError
from gradleak.threat import load_model_state
from gradleak.threat.inspect import MIN_IMAGES, flagged, inspect_model


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="check a received model for structures that make updates leak by design",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-state", type=Path, required=True, help="the model-state file the server sent")
    p.add_argument("--images", type=int, default=None,
                   help=f"also check which units fire for N of the client's own images (at least {MIN_IMAGES}; finds "
                        "trap weights, which the arrays alone do not show)")
    p.add_argument("--data", default="builtin", help="where the client's images come from (as in simulate)")
    p.add_argument("--data-root", default=None, help="the folder of --data cifar10-dir|cifar100-dir|folder")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    model, spec = load_model_state(args.model_state)
    images = None
    if args.images is not None:
        if args.images < MIN_IMAGES:
            raise ConfigError(f"--images: expected at least {MIN_IMAGES} of the client's images, got {args.images}")
        images = load_batch(args.data, args.images, size=spec.image_size, num_classes=spec.num_classes,
                            root=args.data_root).images
    findings = inspect_model(model, spec.input_shape, images=images)
    bad = flagged(findings)
    if args.json:
        print(json.dumps({"model_state": str(args.model_state), "flagged": bool(bad),
                          "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        for f in findings:
            print(f"{'FLAGGED' if f.flagged else 'ok':7s} {f.kind:15s} {f.module or '(model)'}: score {f.score:.3f}; "
                  f"{f.explanation}")
        print(f"{args.model_state}: {len(bad)} of {len(findings)} findings flagged"
              + ("; do not train on this model" if bad else "; no leak by design found (what is checked: "
                                                            "docs/threat.md)")
              + ("" if images is not None else "; trap units' firing not checked (give --images N)"))
    return 1 if bad else 0
