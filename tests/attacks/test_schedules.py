"""The schedules and optimizer settings the attacks share (``lr_decay``, ``beta1``)."""

from __future__ import annotations

import pytest
import torch

import gradleak
from gradleak.attacks.schedules import WARMUP, make_scheduler
from gradleak.errors import ConfigError


def _rates(kind: str, iterations: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, kind, iterations)
    out = []
    for _ in range(iterations):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_rises_then_decays_to_zero():
    rates = _rates("warmup-cosine", 200)
    warm = int(200 * WARMUP)
    assert rates[0] == pytest.approx(1 / warm) and rates[warm - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(rates[:warm], rates[1:warm]))
    assert all(a >= b for a, b in zip(rates[warm:], rates[warm + 1:])) and rates[-1] < 1e-3


@pytest.mark.parametrize("attack", ["ig", "cinet"])
def test_the_attacks_take_the_schedule_and_beta1(attack, lenet_case):
    server, update, *_ = lenet_case
    extra = {"channels": 8} if attack == "cinet" else {}
    rec = gradleak.attacks.create(attack, {"iterations": 2, "lr_decay": "warmup-cosine", "beta1": 0.5, **extra}
                                  ).reconstruct(server, update)
    assert rec.info["config"]["beta1"] == 0.5 and rec.info["config"]["lr_decay"] == "warmup-cosine"
    with pytest.raises(ConfigError, match="beta1"):
        gradleak.attacks.create(attack, {"beta1": 1.0})
