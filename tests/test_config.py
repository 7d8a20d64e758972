"""One config path: typed values from outside, unknown keys refused, one preset syntax."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradleak
from gradleak.attacks import ATTACKS, CINetConfig, GIASConfig, IGConfig
from gradleak.attacks.base import resolve_config
from gradleak.config import from_dict, split_preset
from gradleak.errors import ConfigError
from gradleak.types import ModelSpec


@pytest.mark.parametrize("data, message", [
    ({"spectral": "maybe"}, "spectral: expected true or false, got 'maybe'"),
    ({"spectral": 1}, "spectral: expected true or false, got 1"),
    ({"iterations": 2.7}, "iterations: expected an integer, got 2.7"),
    ({"iterations": True}, "iterations: expected an integer, got True"),
    ({"lr": "abc"}, "lr: expected a number, got 'abc'"),
    ({"lr": float("nan")}, "lr: expected a number, got nan"),
    ({"channels": 1.5}, "channels: expected a string or an integer, got 1.5"),
    ({"channels": None}, "channels: expected a string or an integer, got None"),
    ({"typo": 1}, "unknown option(s) typo; expected some of:"),
    (["iterations"], "expected a mapping of options, got list"),
    ("iterations", "expected a mapping of options, got str"),
])
def test_values_of_the_wrong_type_are_refused_by_name(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(CINetConfig, data, what="cinet config")
    assert message in str(e.value)


def test_values_that_fit_are_converted_as_json_reads_them():
    cfg = from_dict(CINetConfig, {"lr": 1, "channels": 64, "spectral": False})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.channels == 64 and cfg.spectral is False
    assert from_dict(CINetConfig, {"channels": "paper"}).channels == "paper"
    assert from_dict(GIASConfig, {"latent_shape": [100, 1, 1]}).latent_shape == (100, 1, 1)
    assert from_dict(IGConfig, {"line_search": None}).line_search is None
    with pytest.raises(ConfigError, match=r"latent_shape: expected a list of integers or null"):
        from_dict(GIASConfig, {"latent_shape": [100, "a"]})


def test_model_spec_from_a_file_is_typed():
    assert ModelSpec.from_dict({"name": "lenet", "image_size": 32}).image_size == 32
    for bad, message in [({"name": "lenet", "image_size": "32"}, "image_size: expected an integer"),
                         ({"name": "lenet", "image_size": 32.5}, "image_size: expected an integer"),
                         ({"image_size": 32}, "model spec"),
                         ("lenet", "expected a mapping of options, got str")]:
        with pytest.raises(ConfigError, match=message):
            ModelSpec.from_dict(bad)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@pytest.mark.parametrize("name", ["cinet", "ig", "dlg", "idlg", "gias", "analytic"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # cold start on a slow day
@given(data=st.dictionaries(st.sampled_from(["iterations", "lr", "loss", "channels", "spectral", "restarts", "tv",
                                             "latent_shape", "log_every", "typo"]), JSON, max_size=3))
def test_any_json_gives_a_config_or_a_config_error(name, data):
    """Never another exception (TypeError, ValueError, AttributeError) from a config read from outside."""
    try:
        cfg = resolve_config(name, overrides=data)
    except ConfigError:
        return
    assert dataclasses.is_dataclass(cfg)


def test_one_preset_syntax_everywhere():
    assert split_preset("cinet:demo") == ("cinet", "demo") and split_preset("ig") == ("ig", None)
    for bad in ("cinet:", ":demo", ""):
        with pytest.raises(ConfigError, match="ATTACK:PRESET"):
            split_preset(bad)
    # what `gradleak list presets` prints resolves as it reads
    for attack in ATTACKS.available():
        for preset in ATTACKS.get(attack).presets:
            name, p = split_preset(f"{attack}:{preset}")
            assert resolve_config(name, preset=p) == ATTACKS.get(attack).preset(preset)


def test_presets_hold_only_what_differs_from_the_defaults():
    for attack in ATTACKS.available():
        cls = ATTACKS.get(attack)
        defaults = cls.Config()
        for preset, values in cls.presets.items():
            same = sorted(k for k, v in values.items() if getattr(defaults, k) == v)
            assert not same, f"{attack}:{preset} restates defaults: {same}"


def test_resolver_applies_preset_then_overrides_then_budget():
    cfg = resolve_config("cinet", preset="paper", overrides={"lr": 2e-3}, iterations=9)
    assert (cfg.loss, cfg.lr, cfg.iterations) == ("l2", 2e-3, 9)
    with pytest.raises(ConfigError, match="unknown cinet preset 'nope'"):
        resolve_config("cinet", preset="nope")
    assert gradleak.attacks.create("cinet", {"lr": 1}).config.lr == 1.0
