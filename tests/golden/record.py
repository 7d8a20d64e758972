"""Record the reference outputs of short cinet, ig, dlg, idlg and gias runs (``test_loop_parity``).

Run once, before a change to the run loop, and commit the file it writes:

    python tests/golden/record.py

Each case runs on one thread on a 16 px LeNet-sigmoid victim; the file holds the reconstructed
images, the logged losses and the facts the run reports (iterations, restart scores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import gradleak
from gradleak.data import builtin_batch
from gradleak.models import build_model
from gradleak.threat import fedsgd_update
from gradleak.types import ModelSpec, ServerState

SIZE = 16
HERE = Path(__file__).parent
OUT = HERE / "attack_outputs.safetensors"

CASES: dict[str, dict] = {
    "cinet": {"iterations": 6, "channels": 8, "log_every": 2},
    "cinet-sgd-decay-learned": {"iterations": 6, "channels": 8, "log_every": 3, "update": "sign-sgd",
                                "loss": "l2", "lr_decay": "step", "latent": "learned", "tv": 0.01},
    "ig": {"iterations": 6, "log_every": 2, "restarts": 2},
    "dlg": {"iterations": 3, "lbfgs_max_iter": 4, "log_every": 1},
    "idlg": {"iterations": 3, "lbfgs_max_iter": 4, "log_every": 1},
    "gias": {"latent_iterations": 4, "generator_iterations": 4, "restarts": 2, "log_every": 2},
}


def tiny_generator(latent: int = 8, size: int = SIZE) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        gen = nn.Sequential(nn.Linear(latent, 32), nn.LeakyReLU(0.2), nn.Linear(32, 3 * size * size), nn.Tanh(),
                            nn.Unflatten(1, (3, size, size)))
    gen.latent_dim = latent  # type: ignore[assignment]
    return gen


def case():
    spec = ModelSpec(name="lenet", activation="sigmoid", bn_mode="eval", image_size=SIZE)
    server = ServerState.from_spec(build_model(spec, seed=42), spec)
    batch = builtin_batch(2, source="cifar10", size=SIZE)
    return server, fedsgd_update(server, batch.images, batch.labels)


def run(key: str):
    """The reconstruction of case ``key`` (one thread, seed 1)."""
    server, update = case()
    name = key.split("-")[0]
    attack: gradleak.attacks.Attack
    if name == "gias":
        attack = gradleak.attacks.GIASAttack(CASES[key], generator=tiny_generator(), seed=1)
    else:
        attack = gradleak.attacks.create(name, CASES[key], seed=1)
    return attack.reconstruct(server, update)


def facts(rec) -> dict:
    out = {"iterations": rec.iterations,
           "history_iterations": list(rec.history["iteration"]), "labels": rec.labels.tolist()}
    if "restart_scores" in rec.info:
        out["restart_scores"] = rec.info["restart_scores"]
    return out


def main() -> None:
    torch.set_num_threads(1)
    tensors, meta = {}, {}
    for key in CASES:
        rec = run(key)
        tensors[f"{key}.images"] = rec.images.contiguous()
        tensors[f"{key}.loss"] = torch.tensor(rec.history["loss"], dtype=torch.float64)
        meta[key] = facts(rec)
        print(key, meta[key])
    save_file(tensors, str(OUT), metadata={"facts": json.dumps(meta), "torch": torch.__version__})
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
