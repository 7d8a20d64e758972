"""No silent guesses: every fallback that changes a result warns, and a run records the warning in metrics.json."""

from __future__ import annotations

import json

import pytest
import torch

import gradleak.data.sources as sources
import gradleak.labels.ilrg as ilrg_module
from gradleak.data import builtin_batch
from gradleak.errors import DataError
from gradleak.integrations.capture import LocalTraining, update_from_parameters
from gradleak.models import build_model
from gradleak.reporting import RunOptions, run_attack
from gradleak.threat import fedavg_update
from gradleak.threat.fedavg import schedule_of
from gradleak.types import ModelSpec, ServerState


def _server(size: int = 16) -> ServerState:
    spec = ModelSpec(name="lenet", image_size=size)
    return ServerState.from_spec(build_model(spec, seed=0), spec)


def test_ilrg_says_when_its_nonnegative_solver_did_not_converge(monkeypatch):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Maximum number of iterations reached.")

    monkeypatch.setattr(ilrg_module, "nnls", no_convergence)
    probs = torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1)
    with pytest.warns(RuntimeWarning, match="did not converge.*clamped least squares"):
        counts, _ = ilrg_module.solve_counts(probs, torch.randn(4, dtype=torch.float64), 2)
    assert (counts >= 0).all()


def _delta_without_order(server: ServerState):
    batch = builtin_batch(4, source="cifar10", size=16)
    update = fedavg_update(server, batch.images, batch.labels, local_steps=2, lr=0.1, batch_size=2)
    meta = {k: v for k, v in update.metadata.items() if k not in ("schedule", "shuffle_seed")}
    return update.replace(metadata=meta), batch


def test_a_fedavg_delta_without_its_order_is_replayed_with_a_warning():
    server = _server()
    update, _ = _delta_without_order(server)
    with pytest.warns(UserWarning, match="neither its mini-batch schedule nor its shuffle seed"):
        schedule = schedule_of(update)
    assert sorted(i for b in schedule for i in b) == [0, 1, 2, 3]


def test_a_run_records_the_warnings_of_its_attack_in_metrics_json(tmp_path):
    server = _server()
    update, batch = _delta_without_order(server)
    with pytest.warns(UserWarning, match="shuffle seed 0"):
        run = run_attack(server, update, attack="cinet", config={"iterations": 2, "channels": 8}, out=tmp_path / "r",
                         truth_images=batch.images, truth_labels=batch.labels, options=RunOptions(progress=False))
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert any("shuffle seed 0" in w for w in doc["warnings"]) and doc["warnings"] == run.metrics["warnings"]


def test_the_flower_capture_records_what_it_assumed():
    server = _server()
    received = {n: p.detach() + 0.01 for n, p in server.model.named_parameters()}
    with pytest.warns(UserWarning, match="local batch size not reported"):
        update = update_from_parameters(server, received, num_examples=6, training=LocalTraining(lr=0.1))
    assumed = update.metadata["assumptions"]
    assert len(assumed) == 2 and "whole data (6)" in assumed[0] and "one epoch (1 steps)" in assumed[1]
    told = update_from_parameters(server, received, num_examples=6,
                                  training=LocalTraining(lr=0.1, batch_size=2, local_steps=3))
    assert "assumptions" not in told.metadata


def test_a_missing_builtin_photo_is_refused_not_skipped(monkeypatch):
    monkeypatch.setattr(sources, "_SKIMAGE_PHOTOS", (*sources._SKIMAGE_PHOTOS[:2], "no_such_photo"))
    with pytest.raises(DataError, match="expected scikit-image's photo 'no_such_photo'"):
        sources._photos()
