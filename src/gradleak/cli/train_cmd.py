"""``gradleak train``: a trained victim, for attacks on trained models (``--weights`` in every command).

Trains a registered architecture (the case flags) on ``--images`` images of ``--data`` (the built-in
photos by default) with Adam for ``--epochs``, and writes a model-state file (and its training record,
``.json``, beside it). The built-in images are drawn from ``--data-seed``, 100 by default: the other
commands draw their batches from seed 0 (images 0 to N-1), so a trained victim has not seen the
batch attacked (for N <= 100; 512 images from 100 end at 611 of the 824).

Example::

    gradleak train --model lenet --activation relu --out runs/lenet-relu-trained.safetensors
    gradleak compare --model lenet --activation relu --weights runs/lenet-relu-trained.safetensors \\
        --batch-size 4 --attacks ig,cinet --iterations 300
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradleak.cli.common import add_case, case_model
from gradleak.data import load_batch
from gradleak.errors import ConfigError
from gradleak.models.train import TrainConfig, train_victim
from gradleak.threat import save_model_state


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a victim for a few epochs (for attacks on trained models: --weights)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case(p)
    p.set_defaults(data_seed=100)
    p.add_argument("--images", type=int, default=512, help="training images (default 512)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30: LeNet-ReLU to 0.77 training accuracy)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="the model-state file to write (.safetensors)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.out.exists():
        raise ConfigError(f"--out: expected a new file, got '{args.out}' (it exists)")
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.train_batch_size, seed=args.model_seed)
    model, spec = case_model(args)  # --weights: go on training those
    batch = load_batch(args.data, args.images, size=args.image_size, num_classes=args.num_classes,
                       seed=args.data_seed, root=args.data_root)
    history = train_victim(model, batch.images, batch.labels, config)
    save_model_state(model, spec, args.out)
    record = {"spec": spec.to_dict(), "model_seed": args.model_seed, "data": args.data, "data_seed": args.data_seed,
              "images": args.images, "train": config.__dict__, "history": history}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    last = history[-1]
    print(f"trained {spec.name} ({spec.activation}) for {config.epochs} epochs on {args.images} images: loss "
          f"{last['loss']:.3f}, training accuracy {last['accuracy']:.2f}; wrote {args.out}")
    return 0
