"""Trap weights: a malicious server's units that fire for one image, the closed-form attack on them,
and the client's check that needs its own images to see them."""

from __future__ import annotations

import pytest
import torch

import gradleak
from conftest import make_case
from gradleak.cli.main import main
from gradleak.data import builtin_batch, public_images
from gradleak.metrics.image import psnr
from gradleak.metrics.pairing import pair_images
from gradleak.models import build_model
from gradleak.threat import fedavg_update, fedsgd_update, load_model_state, save_model_state
from gradleak.threat.inspect import flagged, inspect_model
from gradleak.threat.trap import TrapBlock, find_trap, trap_model
from gradleak.types import ModelSpec, ServerState


def _trap_case(n: int, units: int, *, name: str = "lenet", activation: str = "relu"):
    server, _, images, labels = make_case(name, n, activation=activation)
    malicious = trap_model(server, units, public=public_images(32), batch_size=n)
    return malicious, images, labels


def test_an_image_alone_in_a_unit_is_its_weight_gradient_over_its_bias_gradient():
    """The known answer: grad_W[i] = g x / N and grad_b[i] = g / N for the one image x that fired unit i."""
    malicious, images, labels = _trap_case(8, 128)
    block = find_trap(malicious.model)
    assert block is not None
    fires = block.preactivation(images) > 0
    alone = (fires.sum(0) == 1).nonzero().flatten()
    assert len(alone) > 0
    update = fedsgd_update(malicious, images, labels)
    gw, gb = update.gradients()[0], update.gradients()[1]
    for i in alone.tolist():
        owner = int(fires[:, i].nonzero())
        ratio = (gw[i].double() / gb[i].double()).view_as(images[owner])
        assert (ratio - images[owner]).abs().max() < 1e-4


def test_units_fire_for_about_one_image_in_a_batch():
    block = TrapBlock((3, 32, 32), 512, public=public_images(32), fire_rate=1 / 16)
    rate = float((block.preactivation(builtin_batch(64).images) > 0).float().mean())
    assert 0.02 < rate < 0.15  # set on public photo crops, measured on the client's own images


def test_the_attack_reads_most_of_a_batch_exactly_from_one_fedsgd_gradient():
    malicious, images, labels = _trap_case(16, 256)
    rec = gradleak.attacks.create("trap").reconstruct(malicious, fedsgd_update(malicious, images, labels))
    p = psnr(rec.images[pair_images(rec.images, images)], images)
    assert int((p >= 40).sum()) >= 11  # 13 of 16 measured
    assert rec.info["confirmed"] >= 11 and rec.iterations == 1


def test_a_fedavg_delta_keeps_the_images():
    malicious, images, labels = _trap_case(16, 256)
    update = fedavg_update(malicious, images, labels, local_steps=1, lr=0.1, batch_size=16)
    rec = gradleak.attacks.create("trap").reconstruct(malicious, update)
    p = psnr(rec.images[pair_images(rec.images, images)], images)
    assert int((p >= 40).sum()) >= 8


def test_the_trap_attack_applies_only_to_a_model_with_trap_units():
    server, update, _, _ = make_case("lenet", 2)
    assert "trap units" in gradleak.attacks.ATTACKS.get("trap").applicability(server, None)
    with pytest.raises(gradleak.errors.UpdateError, match="trap units"):
        gradleak.attacks.create("trap").reconstruct(server, update)


@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet18"])
def test_the_check_flags_every_trap_model_from_its_arrays_and_small_batches_evade_the_firing_check(name):
    """Trap rows sum to zero by construction: the arrays alone are flagged (``zero-sum-rows``) at every
    batch size. With 32 of the client's images the units that fire for few of them are flagged too,
    from batch 8 up; trap units set for batches of 2 or 4 fire for a quarter of the images or more and
    pass that check (the gap the zero-sum check closes for gradleak's own traps). Honest models are not
    flagged."""
    spec = ModelSpec(name=name, activation="relu", num_classes=10, image_size=32)
    honest = ServerState.from_spec(build_model(spec, seed=42), spec)
    mine = builtin_batch(32).images
    assert not flagged(inspect_model(honest.model, spec.input_shape, images=mine))
    for units, batch in ((64, 8), (1024, 64), (256, 2), (1024, 4)):
        malicious = trap_model(honest, units, public=public_images(32), batch_size=batch)
        alone = {f.kind for f in flagged(inspect_model(malicious.model, spec.input_shape))}
        assert alone == {"zero-sum-rows"}, (units, batch, alone)
        kinds = {f.kind for f in flagged(inspect_model(malicious.model, spec.input_shape, images=mine))}
        assert kinds == ({"zero-sum-rows", "trap-units"} if batch >= 8 else {"zero-sum-rows"}), (units, batch, kinds)


def test_simulate_attack_and_inspect_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "trap"
    assert main(["simulate", "--model", "lenet", "--activation", "relu", "--batch-size", "8", "--trap-units", "128",
                 "--out", str(out)]) == 0
    model, spec = load_model_state(out / "model.safetensors")
    assert find_trap(model) is not None and find_trap(model).units == 128
    assert main(["attack", "--attack", "trap", "--update", str(out / "update.safetensors"), "--model-state",
                 str(out / "model.safetensors"), "--truth", str(out / "truth.safetensors"), "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["inspect", "--model-state", str(out / "model.safetensors")]) == 1  # zero-sum rows, from the arrays
    assert "trap units' firing not checked" in capsys.readouterr().out
    assert main(["inspect", "--model-state", str(out / "model.safetensors"), "--images", "32"]) == 1
    assert main(["inspect", "--model-state", str(out / "model.safetensors"), "--images", "4"]) == 2
    assert "--images: expected at least 16" in capsys.readouterr().err
    assert main(["simulate", "--model", "lenet", "--batch-size", "8", "--trap-units", "16", "--imprint-bins", "16",
                 "--out", str(tmp_path / "both")]) == 2


def test_a_model_state_with_trap_units_round_trips(tmp_path):
    malicious, _, _ = _trap_case(4, 32)
    spec = ModelSpec(name="lenet", activation="relu", num_classes=10, image_size=32)
    save_model_state(malicious.model, spec, tmp_path / "m.safetensors")
    model, _ = load_model_state(tmp_path / "m.safetensors")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), malicious.model(x))
