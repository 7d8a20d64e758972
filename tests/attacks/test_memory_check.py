"""The GPU memory check: a step's footprint estimated from steps on 2 and 4 images, and a refusal
(exit 2) before the run allocates when it exceeds the device's free memory.

There is no GPU here: the device's figures come from a patched ``device_memory``, the fake budget a
CUDA run would read from ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import pytest
import torch

import gradleak
import gradleak.attacks.loop as loop
from conftest import make_case
from gradleak.attacks.matching import build_matcher
from gradleak.cli.main import main
from gradleak.errors import ConfigError
from gradleak.hardware import counting_saved_bytes, device_memory

GiB = 2**30


def _fake_device(monkeypatch, free: int, total: int = 80 * GiB) -> None:
    monkeypatch.setattr(loop, "device_memory", lambda device: (free, total))


def test_a_cpu_has_no_device_budget():
    assert device_memory("cpu") is None


def test_the_count_is_linear_in_the_batch_so_two_small_steps_predict_a_large_one():
    server, update, images, labels = make_case("resnet18", 8)
    victim = server.model
    matcher = build_matcher(update, victim, device=torch.device("cpu"), adaptive="auto")

    def leaf(n: int) -> torch.Tensor:
        return images[:n].clone().requires_grad_(True)

    estimate = loop.estimate_step_bytes(leaf, matcher, labels, 8, loss="cosine")
    target = sum(t.numel() * t.element_size() for t in matcher.target)
    with counting_saved_bytes() as count:
        matcher.distance("cosine", matcher.simulate(leaf(8), labels))
    assert count[0] > 100 * 2**20  # ResNet-18's double backward at batch 8 saves hundreds of MB
    assert (estimate - 2 * target) / count[0] == pytest.approx(1.0, rel=0.05)


def test_cinet_is_refused_before_its_first_step_on_a_small_device(monkeypatch):
    server, update, _, labels = make_case("resnet18", 4)
    _fake_device(monkeypatch, free=64 * 2**20, total=GiB)
    steps = []
    attack = gradleak.attacks.create("cinet", {"iterations": 3, "channels": 16, "checkpoint_every": 0}, seed=0)
    with pytest.raises(ConfigError, match=r"needs about .* GiB .* expected at most the 0\.1 GiB free"):
        attack.reconstruct(server, update, labels=labels, callback=lambda p: steps.append(p) or False)
    assert steps == []


def test_inverting_gradients_is_refused_too(monkeypatch):
    server, update, _, labels = make_case("resnet18", 4)
    _fake_device(monkeypatch, free=2**20)
    with pytest.raises(ConfigError, match="ig on cpu: a step on 4 images needs about"):
        gradleak.attacks.create("ig", {"iterations": 2}, seed=0).reconstruct(server, update, labels=labels)


def test_the_check_leaves_the_run_as_it_would_have_been(monkeypatch):
    """The small steps move the generator's spectral-norm iterates and BatchNorm statistics; they are
    put back, so a checked run is bit-identical to an unchecked one."""
    server, update, _, labels = make_case("resnet18", 2)
    config = {"iterations": 3, "channels": 16, "checkpoint_every": 0, "log_every": 1}
    plain = gradleak.attacks.create("cinet", config, seed=0).reconstruct(server, update, labels=labels)
    assert plain.info["memory_estimate_bytes"] is None  # a CPU: nothing checked
    _fake_device(monkeypatch, free=40 * GiB)
    checked = gradleak.attacks.create("cinet", config, seed=0).reconstruct(server, update, labels=labels)
    assert checked.info["memory_estimate_bytes"] > 2**20
    assert torch.equal(plain.images, checked.images)
    assert plain.history["loss"] == checked.history["loss"]


def test_the_cli_refuses_with_exit_2(monkeypatch, tmp_path, capsys):
    _fake_device(monkeypatch, free=2**20)
    rc = main(["demo", "--batch-size", "2", "--iterations", "2", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "expected at most the 0.0 GiB free" in capsys.readouterr().err
