"""The client's declaration of its defense: a Flower LocalDpMod read as gradleak's clip + noise."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from flwr.app import MessageType, RecordDict
from flwr.clientapp.mod import LocalDpMod

from gradleak.defenses import parse_defense
from gradleak.errors import ConfigError
from gradleak.integrations.mods import DEFENSE_RECORD, defense_mod, localdp_defense


def test_a_localdp_mod_is_clip_then_gaussian_noise():
    spec = localdp_defense(LocalDpMod(clipping_norm=1.0, sensitivity=0.5, epsilon=2.0, delta=1e-5))
    sigma = 0.5 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0
    assert spec == f"clip:1+noise:{sigma:.6g}"
    assert [p.name for p in parse_defense(spec).parts()] == ["clip", "noise"]
    with pytest.raises(ConfigError, match="expected a Flower LocalDpMod"):
        localdp_defense(object())


def test_the_mod_declares_the_defense_in_every_train_reply():
    mod = defense_mod(LocalDpMod(clipping_norm=1.0, sensitivity=0.5, epsilon=2.0, delta=1e-5))
    for kind, declared in ((MessageType.TRAIN, True), (MessageType.EVALUATE, False)):
        msg = SimpleNamespace(metadata=SimpleNamespace(message_type=kind))
        reply = SimpleNamespace(content=RecordDict(), has_error=lambda: False)
        out = mod(msg, None, lambda m, c, reply=reply: reply)
        assert (DEFENSE_RECORD in out.content) == declared
        if declared:
            assert str(out.content[DEFENSE_RECORD]["defense"]).startswith("clip:1+noise:")
    with pytest.raises(ConfigError):
        defense_mod("noise:abc")
