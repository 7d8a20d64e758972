"""AuditStrategy's malicious round: the clients are sent the victim behind a malicious block, the replies
are read in closed form, a client whose check refuses is recorded, and the wrapped strategy still gets
the victim's parameters under the names it sent.

Driven without a simulation engine (the messages a Grid would carry), so it is fast: two clients of
four built-in photos, LeNet-ReLU, one local SGD step. Four: trap units set for a batch of four fire
for a quarter of the images and pass the firing-rate check; the check refuses them for their
zero-sum rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from gradleak.data import builtin_batch
from gradleak.errors import ConfigError
from gradleak.integrations.flower import AuditStrategy
from gradleak.integrations.mods import inspect_mod
from gradleak.models import build_model
from gradleak.threat.io import model_from_arrays
from gradleak.types import ModelSpec

SPEC = ModelSpec("lenet", activation="relu")
N = 4
LR = 0.1


class _Grid:
    """The only part of a Grid that FedAvg.configure_train uses: the connected node ids."""

    def get_node_ids(self) -> list[int]:
        return [11, 22]


GRID = cast(Grid, _Grid())


def _train(msg: Message, images: torch.Tensor, labels: torch.Tensor) -> Message:
    model = model_from_arrays(SPEC, msg.content.array_records["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    F.cross_entropy(model(images), labels).backward()
    opt.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": N, "lr": LR})})
    return Message(reply, reply_to=msg)


@pytest.fixture
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process sets
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.mark.parametrize("attack", ["imprint", "trap"])
def test_a_malicious_round_reads_the_batch_records_the_refusal_and_keeps_training(tmp_path: Path, task_identity,
                                                                                attack):
    photos = {11: builtin_batch(N, offset=0), 22: builtin_batch(N, offset=N)}
    wrapped = AuditStrategy(FedAvg(), model=SPEC, out=tmp_path, attack="cinet", executor="inline", threads=1,
                            truth=lambda r, node: (photos[node].images, photos[node].labels),
                            malicious_rounds=[1], malicious_attack=attack, malicious_units=256,
                            malicious_batch_size=N, rounds=[])
    initial = ArrayRecord(build_model(SPEC, seed=42).state_dict())
    honest_names = list(initial.keys())
    messages = list(wrapped.configure_train(1, initial, ConfigRecord({"lr": LR}), GRID))
    for m in messages:  # every client of the round is sent the victim behind the block
        sent = list(m.content.array_records["arrays"].keys())
        assert sent[0] == "0.encoder.weight" and sent[-len(honest_names):] == [f"1.{k}" for k in honest_names]
    check = inspect_mod(SPEC.input_shape, images=builtin_batch(32, offset=300, source="photos").images)
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        if node == 22:  # this client runs gradleak's check and refuses
            replies.append(check(m, None, lambda msg, ctxt: pytest.fail("the check let the model through")))
        else:
            replies.append(_train(m, photos[node].images, photos[node].labels))
    [trained_reply] = [r for r in replies if not r.has_error()]
    sent_back = trained_reply.content["arrays"].to_torch_state_dict()  # what the client sent: block and victim
    assert "0.encoder.weight" in sent_back
    trained = {k.removeprefix("1."): v for k, v in sent_back.items() if k.startswith("1.")}
    arrays, _ = wrapped.aggregate_train(1, replies)
    assert arrays is not None
    # the wrapped strategy got the victim's part of the one reply, under the names it sent
    got = arrays.to_torch_state_dict()
    assert list(got) == honest_names
    for name in honest_names:
        assert torch.equal(got[name], trained[name]), name
    records = {r.node_id: r for r in wrapped.wait()}
    assert records[22].status == "refused" and "gradleak inspect refused" in str(records[22].error)
    [row] = [line for line in (tmp_path / "audits.md").read_text().splitlines() if line.startswith("| 1 | 22 |")]
    assert "| refused |" in row and "gradleak inspect refused to train" in row
    done = records[11]
    assert done.status == "done", done.error
    capture = json.loads((Path(done.folder) / "capture.json").read_text())
    assert capture["server"] == f"malicious: {attack}, 256 units" and capture["attack"] == attack
    # measured: both recover all 4 photos exactly (PSNR 80 dB); trap's bound leaves room for its randomness
    if attack == "imprint":
        assert done.summary["psnr_mean"] >= 40.0 and done.summary["recognisable_fraction"] == 1.0, done.summary
    else:
        assert done.summary["recognisable_fraction"] >= 0.25, done.summary
    assert done.summary["verdict"].startswith(("leaks", "partial")), done.summary["verdict"]
    # round 2 is honest again: the plain model, no audit (rounds=[])
    [m2, _] = wrapped.configure_train(2, arrays, ConfigRecord({"lr": LR}), GRID)
    assert list(m2.content.array_records["arrays"].keys()) == honest_names


def test_malicious_settings_are_checked_before_the_federation(tmp_path: Path):
    with pytest.raises(ConfigError, match="expected an attack on a model the server modified"):
        AuditStrategy(FedAvg(), model=SPEC, out=tmp_path, malicious_rounds=[1], malicious_attack="cinet",
                      malicious_batch_size=4)
    with pytest.raises(ConfigError, match="malicious_batch_size"):
        AuditStrategy(FedAvg(), model=SPEC, out=tmp_path, malicious_rounds=[1])
    with pytest.raises(ConfigError, match="ModelSpec"):
        AuditStrategy(FedAvg(), model=build_model(SPEC, seed=0), out=tmp_path, malicious_rounds=[1],
                      malicious_batch_size=4, input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ConfigError, match="unknown attack"):
        AuditStrategy(FedAvg(), model=SPEC, out=tmp_path, malicious_rounds=[1], malicious_attack="nope",
                      malicious_batch_size=4)


def test_model_from_arrays_rebuilds_what_was_sent_and_refuses_what_does_not_fit():
    from gradleak.errors import UpdateError
    from gradleak.threat.malicious import find_imprint, imprint_model
    from gradleak.types import ServerState

    honest = ServerState.from_spec(build_model(SPEC, seed=42), SPEC)
    x = builtin_batch(2).images
    for sent in (honest, imprint_model(honest, 64), imprint_model(honest, 64, sparse=True)):
        block = find_imprint(sent.model)
        sparse = bool(block is not None and block.sparse)
        model = model_from_arrays(SPEC, dict(sent.model.state_dict()), sparse=sparse)
        assert torch.equal(model(x), sent.model(x))
    with pytest.raises(UpdateError, match=r"do not fit model 'resnet18' \(\d+ expected tensor\(s\) missing, e\.g\. "):
        model_from_arrays(ModelSpec("resnet18"), dict(honest.model.state_dict()))
