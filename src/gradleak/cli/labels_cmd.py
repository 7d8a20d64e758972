"""``gradleak labels``: recover the batch's labels from an update file and the model state alone.

Prints the recovered label multiset (samples per class), the strategy used and any warning; with
``--truth`` also the label accuracy (multiset overlap / batch size). The truth is read for scoring
only, after the labels are recovered.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError
from gradleak.labels import LABEL_STRATEGIES, label_accuracy, recover_labels
from gradleak.threat import load_model_state, load_truth, load_update
from gradleak.types import ServerState


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("labels", help="recover the batch's labels from an update file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", type=Path, required=True, help="update file (safetensors) written by the client")
    p.add_argument("--model-state", type=Path, required=True, help="the server model's state file")
    p.add_argument("--truth", type=Path, default=None, help="the private batch, for scoring only")
    p.add_argument("--strategy", default="auto", choices=LABEL_STRATEGIES.available(),
                   help="label-recovery strategy (default: auto, the best whose assumptions hold)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    model, spec = load_model_state(args.model_state)
    update = load_update(args.update, model=model)
    server = ServerState.from_spec(model, spec)
    result = recover_labels(server, update, strategy=args.strategy)
    counts = result.counts(server.num_classes).tolist()
    doc: dict[str, Any] = {
        "strategy": result.strategy,
        "requested": args.strategy,
        "num_samples": int(update.num_samples),
        "counts": {str(c): int(k) for c, k in enumerate(counts) if k},
        "labels": result.labels.tolist(),
        "warnings": list(result.warnings),
        "info": result.info,
    }
    if args.truth is not None:
        truth = load_truth(args.truth, num_classes=server.num_classes).labels
        if truth.numel() != update.num_samples:
            raise ConfigError(f"truth file: expected {update.num_samples} labels (the update's batch size), "
                              f"got {truth.numel()}")
        doc["label_accuracy"] = label_accuracy(result.labels, truth)
        true_counts = truth.bincount(minlength=server.num_classes).tolist()
        doc["true_counts"] = {str(c): int(k) for c, k in enumerate(true_counts) if k}
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
        return 0
    via = f" (requested: {args.strategy})" if args.strategy != result.strategy else ""
    print(f"strategy: {result.strategy}{via}")
    print(f"batch size: {update.num_samples}")
    print("recovered counts (class: samples): "
          + ", ".join(f"{c}: {k}" for c, k in doc["counts"].items()))
    if "label_accuracy" in doc:
        print("true counts      (class: samples): "
              + ", ".join(f"{c}: {k}" for c, k in doc["true_counts"].items()))
        hits = round(doc["label_accuracy"] * update.num_samples)
        print(f"label accuracy: {doc['label_accuracy']:.3f} ({hits}/{update.num_samples})")
    for w in result.warnings:
        print(f"warning: {w}")
    return 0
