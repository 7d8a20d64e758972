"""CI-Net on every client protocol: FedAvg deltas (local steps replayed) and server aggregates."""

from __future__ import annotations

import gradleak
from conftest import make_case
from gradleak.metrics import score_reconstruction
from gradleak.threat.aggregate import simulate_clients
from gradleak.threat.fedavg import fedavg_update


def _attack(server, update, iterations=60):
    cfg = {**gradleak.attacks.CINetAttack.presets["reference"], "iterations": iterations, "log_every": 10}
    return gradleak.attacks.create("cinet", cfg).reconstruct(server, update)


def test_cinet_on_a_multistep_fedavg_delta_matches_by_replay(lenet_case):
    server, _, images, labels = lenet_case
    update = fedavg_update(server, images, labels, local_steps=3, lr=0.1, batch_size=1)
    rec = _attack(server, update)
    assert rec.matching.startswith("fedavg replay of 3")
    assert rec.history["loss"][-1] < rec.history["loss"][0]
    assert rec.labels.shape == labels.shape and rec.label_strategy != "given"


def test_cinet_on_an_aggregate_of_clients(lenet_case):
    server, _, images, labels = make_case("lenet", 4)
    update = simulate_clients(server, images, labels, num_clients=2)
    rec = _attack(server, update)
    assert rec.images.shape == images.shape
    assert rec.matching.startswith("aggregate of 2")
    assert rec.history["loss"][-1] < rec.history["loss"][0]


def test_cinet_on_one_step_fedavg_with_full_batch_reconstructs():
    server, _, images, labels = make_case("lenet", 1)
    update = fedavg_update(server, images, labels, local_steps=1, lr=0.05, batch_size=1)
    rec = _attack(server, update, iterations=150)
    s = score_reconstruction(rec.images, images, with_lpips=False).summary
    assert s["ssim_mean"] > 0.5
