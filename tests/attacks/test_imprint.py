"""The imprint attack (Robbing the Fed): an image alone in its bin comes back to float precision."""

from __future__ import annotations

import pytest
import torch

import gradleak
from gradleak.data import builtin_batch
from gradleak.errors import ConfigError, UpdateError
from gradleak.metrics import psnr, score_reconstruction
from gradleak.models import build_model
from gradleak.threat import fedsgd_update
from gradleak.threat.malicious import ImprintBlock, find_imprint, imprint_model
from gradleak.types import ModelSpec, ServerState


def _honest(name: str = "lenet", activation: str = "sigmoid") -> ServerState:
    spec = ModelSpec(name=name, activation=activation)
    return ServerState.from_spec(build_model(spec, seed=42), spec)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_an_image_alone_in_its_bin_is_recovered_to_float_precision(activation):
    server = imprint_model(_honest(activation=activation), bins=256)
    batch = builtin_batch(16, source="builtin")
    update = fedsgd_update(server, batch.images, batch.labels)
    rec = gradleak.attacks.create("imprint").reconstruct(server, update)
    block = find_imprint(server.model)
    assert block is not None
    bins = torch.bucketize(block.statistic(batch.images), block.thresholds(), right=False)
    alone = [i for i in range(16) if int((bins == bins[i]).sum()) == 1 and int(bins[i]) > 0]
    assert len(alone) >= 10, bins.tolist()
    for i in alone:  # its reconstruction is among the recovered images, to float32 rounding
        err = (rec.images - batch.images[i]).flatten(1).abs().max(1).values.min()
        assert float(err) < 1e-3, (i, float(err))
    scored = score_reconstruction(rec.images, batch.images, with_lpips=False)
    exact = sum(p["psnr"] >= 40 for p in scored.per_image)
    assert exact >= len(alone) and rec.info["images_found"] >= len(alone)


def test_the_block_leaves_the_victims_output_almost_unchanged_and_its_statistic_is_the_brightness():
    honest = _honest()
    server = imprint_model(honest, bins=64)
    x = builtin_batch(4, source="builtin").images
    honest.model.eval()
    server.model.eval()
    with torch.no_grad():
        assert torch.allclose(server.model(x), honest.model(x), atol=1e-3)
    block = find_imprint(server.model)
    assert block is not None and torch.allclose(block.statistic(x), x.mean((1, 2, 3)), atol=1e-6)
    assert (psnr(block(x).clamp(0, 1), x) > 40).all()


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        ImprintBlock((3, 8, 8), bins=1)
    with pytest.raises(ConfigError, match="increasing"):
        ImprintBlock((3, 8, 8), bins=3, thresholds=torch.tensor([0.5, 0.4, 0.6]))
    honest = _honest()
    update = fedsgd_update(honest, builtin_batch(2, source="builtin").images, torch.tensor([0, 1]))
    with pytest.raises(UpdateError, match="imprint block"):
        gradleak.attacks.create("imprint").reconstruct(honest, update)
    assert "imprint block" in gradleak.attacks.ATTACKS.get("imprint").applicability(honest, None)


def test_a_fedavg_delta_keeps_the_images_at_the_blocks_default_gain():
    """delta = theta_after - theta_before cancels a gain-1 block's tiny gradient in float32; the
    default gain keeps it. One full-batch step: every image alone in its bin, as from a gradient."""
    from gradleak.threat import fedavg_update

    batch = builtin_batch(16, source="builtin")
    scores = {}
    for gain in (1.0, 1e-3):
        server = imprint_model(_honest(activation="relu"), bins=256, gain=gain)
        block = find_imprint(server.model)
        assert block is not None and block.gain == pytest.approx(gain)
        update = fedavg_update(server, batch.images, batch.labels, local_steps=1, lr=0.1, batch_size=16)
        rec = gradleak.attacks.create("imprint").reconstruct(server, update)
        scored = score_reconstruction(rec.images, batch.images, with_lpips=False)
        scores[gain] = sum(p["psnr"] >= 40 for p in scored.per_image)
    bins = torch.bucketize(block.statistic(batch.images), block.thresholds(), right=False)
    alone = sum(int((bins == b).sum()) == 1 and int(b) > 0 for b in bins)
    assert alone >= 10 and scores[1.0] == 0 and scores[1e-3] >= 0.8 * alone, (scores, alone)  # measured: 0 and 15 of 16


def test_the_sparse_block_feeds_each_image_to_the_one_unit_of_its_bin():
    server = imprint_model(_honest(activation="relu"), bins=64, sparse=True)
    block = find_imprint(server.model)
    assert block is not None and block.sparse
    x = builtin_batch(8, source="builtin").images
    bins = torch.bucketize(block.statistic(x), block.thresholds(), right=False) - 1  # the unit below each image
    for i in range(8):
        server.model.zero_grad()
        server.model(x[i:i + 1]).sum().backward()
        hit = (block.encoder.bias.grad != 0).nonzero().flatten().tolist()
        assert hit == ([int(bins[i])] if int(bins[i]) >= 0 else []), (i, hit, int(bins[i]))


@pytest.mark.parametrize("steps", [1, 4])
def test_an_image_alone_in_its_sparse_bin_comes_back_to_float_precision_over_local_steps(steps):
    """Known answer for the sparse variant: an image alone in its bin is its unit's weight change over
    its bias change, exactly, after one or several local steps (where the cumulative block mixes)."""
    from gradleak.threat import fedavg_update

    server = imprint_model(_honest(activation="relu"), bins=256, sparse=True)
    batch = builtin_batch(16, source="builtin")
    update = fedavg_update(server, batch.images, batch.labels, local_steps=steps, lr=0.1,
                           batch_size=16 // steps)
    block = find_imprint(server.model)
    assert block is not None
    bins = torch.bucketize(block.statistic(batch.images), block.thresholds(), right=False)
    alone = [i for i in range(16) if int((bins == bins[i]).sum()) == 1 and int(bins[i]) > 0]
    assert len(alone) >= 10, bins.tolist()
    rec = gradleak.attacks.create("sparse-imprint").reconstruct(server, update)
    for i in alone:
        err = (rec.images - batch.images[i]).flatten(1).abs().max(1).values.min()
        assert float(err) < 1e-3, (i, steps, float(err))
    if steps > 1:  # the cumulative block, same batch and schedule: its bin differences mix the steps
        plain = imprint_model(_honest(activation="relu"), bins=256)
        cumulative = gradleak.attacks.create("imprint").reconstruct(
            plain, fedavg_update(plain, batch.images, batch.labels, local_steps=steps, lr=0.1, batch_size=16 // steps))
        assert cumulative.info["images_found"] < rec.info["images_found"]


def test_the_sparse_flag_survives_the_model_state_file(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from gradleak.threat.io import load_model_state, save_model_state

    honest = _honest()
    assert honest.spec is not None
    for sparse in (False, True):
        server = imprint_model(honest, bins=32, sparse=sparse)
        path = tmp_path / f"m{sparse}.safetensors"
        save_model_state(server.model, honest.spec, path)
        model, _ = load_model_state(path)
        block = find_imprint(model)
        assert block is not None and block.sparse == sparse
        x = builtin_batch(2, source="builtin").images
        assert torch.equal(model(x), server.model(x))
    with open(path, "rb") as f:  # a header whose flag is not a boolean
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = json.loads(header["__metadata__"]["gradleak"])
    meta["imprint"]["sparse"] = "yes"
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"gradleak": json.dumps(meta)})
    with pytest.raises(UpdateError, match="imprint.sparse true or false"):
        load_model_state(tmp_path / "bad.safetensors")


def test_the_sparse_block_on_the_command_line(tmp_path, capsys):
    from gradleak.cli.main import main
    from gradleak.threat.io import load_model_state

    out = tmp_path / "sparse"
    assert main(["simulate", "--model", "lenet", "--activation", "relu", "--batch-size", "8", "--imprint-bins", "256",
                 "--sparse", "--protocol", "fedavg", "--local-steps", "2", "--local-batch-size", "4",
                 "--out", str(out)]) == 0
    model, _ = load_model_state(out / "model.safetensors")
    block = find_imprint(model)
    assert block is not None and block.sparse
    assert main(["attack", "--attack", "sparse-imprint", "--update", str(out / "update.safetensors"), "--model-state",
                 str(out / "model.safetensors"), "--truth", str(out / "truth.safetensors"), "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["inspect", "--model-state", str(out / "model.safetensors")]) == 1  # flagged
    capsys.readouterr()
    assert main(["simulate", "--model", "lenet", "--batch-size", "8", "--sparse", "--out", str(tmp_path / "x")]) == 2
    assert "--sparse: expected it with --imprint-bins" in capsys.readouterr().err
