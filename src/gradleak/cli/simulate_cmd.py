"""``gradleak simulate``: the client side. Build a victim, take a private batch, write the update.

Writes ``update.safetensors`` (what the client uploads), ``model.safetensors`` (what the server
sent) and ``truth.safetensors`` (the private batch, for scoring only) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from gradleak.audit.cell import cell_update, check_victim
from gradleak.cli.common import add_case, add_threat, case_model, default_out, threat_cell
from gradleak.data import load_batch, public_images
from gradleak.errors import ConfigError
from gradleak.reporting.runner import check_folder
from gradleak.threat import save_model_state, save_truth, save_update
from gradleak.threat.malicious import imprint_model
from gradleak.threat.trap import trap_model
from gradleak.types import ServerState


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="client side: compute and write an update from a private batch",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case(p)
    add_threat(p)
    p.add_argument("--imprint-bins", type=int, default=None,
                   help="a malicious server: send the victim behind an imprint block of this many bins (Robbing the "
                        "Fed; attack it with --attack imprint, check it with gradleak inspect)")
    p.add_argument("--sparse", action="store_true",
                   help="with --imprint-bins: the sparse block (each image feeds only its own bin's unit, so the "
                        "images survive several local steps; attack it with --attack sparse-imprint)")
    p.add_argument("--trap-units", type=int, default=None,
                   help="a malicious server: send the victim behind this many trap units, each set on public images "
                        "(built-in photos the client does not hold) to fire for about one image of the batch "
                        "(attack it with --attack trap, check it with gradleak inspect --data)")
    p.add_argument("--out", type=Path, default=None, help="folder for the three files (default runs/simulate-<time>)")
    return p


def simulate(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Write the three files for the case in ``args`` into ``out``; return the case description.

    The update is what the server sees under the threat flags (:func:`gradleak.cli.common.add_threat`):
    FedSGD or FedAvg local steps, K clients averaged, the client's defense.
    """
    cell = threat_cell(args)
    model, spec = case_model(args)
    server = ServerState.from_spec(model, spec)
    bins, units = getattr(args, "imprint_bins", None), getattr(args, "trap_units", None)
    if bins is not None and units is not None:
        raise ConfigError("--imprint-bins and --trap-units: expected one malicious block, got both")
    sparse = bool(getattr(args, "sparse", False))
    if sparse and bins is None:
        raise ConfigError("--sparse: expected it with --imprint-bins K (it makes the imprint block sparse)")
    if bins is not None:
        server = imprint_model(server, bins, sparse=sparse)
        model = server.model
    if units is not None:
        server = trap_model(server, units, public=public_images(args.image_size), batch_size=args.batch_size)
        model = server.model
    check_victim(server, [cell])
    batch = load_batch(args.data, args.batch_size * cell.protocol.clients, size=args.image_size,
                       num_classes=args.num_classes, seed=args.data_seed, root=args.data_root)
    update = cell_update(server, batch.images, batch.labels, cell=cell,
                         generator=torch.Generator().manual_seed(args.data_seed))
    out.mkdir(parents=True, exist_ok=True)
    files = {"update": str(out / "update.safetensors"), "model_state": str(out / "model.safetensors"),
             "truth": str(out / "truth.safetensors")}
    save_update(update, files["update"])
    save_model_state(model, spec, files["model_state"])
    save_truth(batch.images, batch.labels, files["truth"], names=batch.names)
    weights = getattr(args, "weights", None)
    case = {"model": spec.to_dict(), "model_seed": args.model_seed, "weights": str(weights) if weights else None,
            "protocol": cell.protocol.protocol,
            "local_steps": cell.protocol.local_steps, "local_lr": cell.protocol.local_lr,
            "local_batch_size": cell.protocol.local_batch_size, "clients": cell.protocol.clients,
            "defense": cell.defense, "batch_size": args.batch_size, "data": args.data, "imprint_bins": bins, "imprint_sparse": sparse,
            "data_root": str(args.data_root) if args.data_root else None, "data_seed": args.data_seed,
            "images": batch.names, "files": files}
    (out / "case.json").write_text(json.dumps(case, indent=2))
    return case


def run(args: argparse.Namespace) -> int:
    out = args.out or default_out("simulate")
    check_folder(out)
    case = simulate(args, out)
    print(f"wrote {case['files']['update']}, {case['files']['model_state']}, {case['files']['truth']}")
    return 0
