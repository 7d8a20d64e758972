"""The schedules and optimizer settings the attacks share (``lr_decay``, ``beta1``)."""

from __future__ import annotations

import pytest
import torch

import gradleak
from gradleak.attacks.schedules import WARMUP, make_scheduler, soft_sign
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


def test_soft_sign_goes_from_a_soft_sign_to_the_unsigned_gradient():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-5  # the image gradients' scale
    m = g.abs().mean()
    first, last = soft_sign(g, 1, 1000), soft_sign(g, 1000, 1000)
    assert float(first.abs().max()) <= float(m) * 1.0001  # bounded by the mean magnitude: a soft sign
    assert torch.equal(torch.sign(first), torch.sign(g))
    torch.testing.assert_close(last, g, rtol=1e-3, atol=0.0)  # s = 1e-3: unsigned
    middle = soft_sign(g, 500, 1000)
    assert float(first.abs().max()) < float(middle.abs().max()) < float(g.abs().max())
    assert torch.equal(soft_sign(torch.zeros(3), 1, 10), torch.zeros(3))
    with pytest.raises(ValueError, match="iteration"):
        soft_sign(g, 0, 10)


def test_ig_takes_the_soft_sign(lenet_case):
    server, update, _, labels = lenet_case
    runs = {s: gradleak.attacks.create("ig", {"iterations": 3, "signed": s}, seed=0).reconstruct(
        server, update, labels=labels) for s in (True, "soft", False)}
    assert runs["soft"].info["config"]["signed"] == "soft"
    assert not torch.equal(runs["soft"].images, runs[True].images)
    assert not torch.equal(runs["soft"].images, runs[False].images)
    with pytest.raises(ConfigError, match="soft"):
        gradleak.attacks.create("ig", {"signed": "hard"})
    with pytest.raises(ConfigError, match="lbfgs"):
        gradleak.attacks.create("dlg", {"signed": "soft"})
