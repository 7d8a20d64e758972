"""The client-side check as a Flower mod: a simulated federation whose server sends an imprint model
and a trap-weights model."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from gradleak.data import builtin_batch, public_images
from gradleak.errors import ConfigError
from gradleak.integrations.mods import REFUSED_CODE, inspect_mod
from gradleak.models import build_model
from gradleak.threat.malicious import imprint_model
from gradleak.threat.trap import trap_model
from gradleak.types import ModelSpec, ServerState

pytestmark = pytest.mark.slow  # Flower's simulation engine (Ray)

SPEC = ModelSpec(name="lenet", activation="sigmoid")


def _client_app(marks: str) -> ClientApp:
    # the client checks with 32 of its own images too, so that trap weights show
    app = ClientApp(mods=[inspect_mod(SPEC.input_shape, images=builtin_batch(32).images)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        kind = str(msg.content["config"]["kind"])
        Path(marks, f"trained-{context.node_id}-{kind}").touch()  # the client's data was used
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    return app


def test_the_mod_refuses_a_malicious_model_and_trains_on_an_honest_one(tmp_path: Path):
    replies: dict[str, list[Message]] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        honest = ServerState.from_spec(build_model(SPEC, seed=42), SPEC)
        models = {"honest": honest.model, "malicious": imprint_model(honest, 256).model,
                  "trap": trap_model(honest, 256, public=public_images(32), batch_size=8).model}
        nodes = list(grid.get_node_ids())
        for kind, model in models.items():
            content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"kind": kind})})
            messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
            replies[kind] = list(grid.send_and_receive(messages))

    run_simulation(server_app=server_app, client_app=_client_app(str(tmp_path)), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    assert all(len(replies.get(kind, [])) == 2 for kind in ("honest", "malicious", "trap")), replies
    for kind, finding in (("malicious", "imprint-rows"), ("trap", "trap-units")):
        for reply in replies[kind]:
            assert reply.has_error() and reply.error.code == REFUSED_CODE
            assert finding in str(reply.error.reason)
    assert not any(r.has_error() for r in replies["honest"])
    marks = sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.iterdir())
    assert marks == ["honest", "honest"]  # no client trained on the malicious model


def test_an_unknown_action_is_refused():
    with pytest.raises(ConfigError, match="'refuse' or 'report'"):
        inspect_mod((3, 32, 32), action="warn")
    with pytest.raises(ConfigError):
        inspect_mod((3, 32, 32), action="")
    assert callable(inspect_mod((3, 32, 32), action="report"))
