"""Would my clients notice a malicious server? A small Flower federation, checked and unchecked.

    python examples/flower_inspect/run_inspect.py --out runs/flower-inspect
    python examples/flower_inspect/run_inspect.py --no-check --out runs/flower-inspect-unchecked

The server of this exercise is malicious on purpose: round 1 sends the honest global LeNet (ReLU),
round 2 the same model behind an imprint block (Robbing the Fed), round 3 behind trap weights
(Boenisch et al.). Each of ``--clients`` virtual clients holds ``--images`` built-in photos and
trains one full-batch SGD step on whatever it receives (like apps that build the model from what
the server sends; the malicious blocks keep the victim's input almost unchanged).

With the check (the default), every client runs gradleak's ``inspect_mod`` with 32 of its own
images: it trains on round 1 and refuses rounds 2 and 3, naming the findings. With ``--no-check``
the clients train on all three, and the server reads their photos off the updates of rounds 2 and
3 in closed form (the ``imprint`` and ``trap`` attacks); the script prints how many came back at
PSNR >= 40 dB (it compares with the clients' photos, which only this exercise can see).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's telemetry would go over the network
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import gradleak  # noqa: E402
from gradleak.data import builtin_batch, public_images  # noqa: E402
from gradleak.integrations.capture import LocalTraining, update_from_parameters  # noqa: E402
from gradleak.integrations.mods import inspect_mod  # noqa: E402
from gradleak.metrics.image import psnr  # noqa: E402
from gradleak.metrics.pairing import pair_images  # noqa: E402
from gradleak.models import build_model  # noqa: E402
from gradleak.threat.io import model_from_arrays  # noqa: E402
from gradleak.threat.malicious import imprint_model  # noqa: E402
from gradleak.threat.trap import trap_model  # noqa: E402
from gradleak.types import ModelSpec, ServerState  # noqa: E402

SPEC = ModelSpec("lenet", activation="relu")
LR = 0.1


def make_client_app(*, images: int, check: bool) -> ClientApp:
    mine = builtin_batch(32, offset=300, source="photos").images  # some of the client's own photos, for the check
    app = ClientApp(mods=[inspect_mod(SPEC.input_shape, images=mine)] if check else [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        data = builtin_batch(images, offset=partition * images)  # this client's private photos
        model = model_from_arrays(SPEC, msg.content["arrays"].to_torch_state_dict())
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        opt.zero_grad()
        F.cross_entropy(model(data.images), data.labels).backward()
        opt.step()
        # the partition id tells this exercise's server which photos to score against; a real client sends no such thing
        metrics = MetricRecord({"num-examples": images, "partition-id": partition})
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(reply, reply_to=msg)

    return app


def make_server_app(args: argparse.Namespace, results: dict[str, dict[str, str]]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        honest = ServerState.from_spec(build_model(SPEC, seed=42), SPEC)
        servers = {"1 honest": (honest, None),
                   "2 imprint": (imprint_model(honest, args.units), "imprint"),
                   "3 trap": (trap_model(honest, args.units, public=public_images(32), batch_size=args.images), "trap")}
        nodes = sorted(grid.get_node_ids())
        for name, (server, attack) in servers.items():
            content = RecordDict({"arrays": ArrayRecord(server.model.state_dict()), "config": ConfigRecord({})})
            replies = grid.send_and_receive([Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
                                             for n in nodes])
            for i, reply in enumerate(sorted(replies, key=lambda r: r.metadata.src_node_id)):
                key = f"round {name}, client {i}"
                if reply.has_error():
                    results[key] = {"outcome": "refused", "why": str(reply.error.reason)}
                    continue
                results[key] = {"outcome": "trained"}
                if attack is None:
                    continue
                update = update_from_parameters(server, reply.content["arrays"].to_torch_state_dict(),
                                                num_examples=args.images,
                                                training=LocalTraining(lr=LR, local_steps=1, batch_size=args.images))
                rec = gradleak.attacks.create(attack).reconstruct(server, update)
                partition = int(reply.content["metrics"]["partition-id"])
                truth = builtin_batch(args.images, offset=partition * args.images).images  # this exercise only
                exact = int((psnr(rec.images[pair_images(rec.images, truth)], truth) >= 40).sum())
                results[key]["leaked"] = f"{exact} of {args.images} photos at PSNR >= 40 dB ({attack} attack)"

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=2, help="virtual clients (2-4)")
    p.add_argument("--images", type=int, default=8, help="private photos per client")
    p.add_argument("--units", type=int, default=256, help="the malicious blocks' bins / units")
    p.add_argument("--no-check", action="store_true", help="clients without gradleak's inspect_mod")
    p.add_argument("--out", default="runs/flower-inspect")
    args = p.parse_args()
    if not 2 <= args.clients <= 4 or not 1 <= args.images <= 64:
        p.error("expected 2-4 clients of 1-64 photos each")
    results: dict[str, dict[str, str]] = {}
    run_simulation(server_app=make_server_app(args, results), client_app=make_client_app(images=args.images,
                                                                                         check=not args.no_check),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for key, r in results.items():
        print(f"{key}: {r['outcome']}" + (f"; {r['leaked']}" if "leaked" in r else "")
              + (f" ({r['why']})" if "why" in r else ""))
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
