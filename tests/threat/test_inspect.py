"""The client's check: every malicious model gradleak builds is flagged, no honest zoo model is."""

from __future__ import annotations

import json

import pytest
import torch

from gradleak.cli.main import main
from gradleak.models import available, build_model
from gradleak.threat import load_model_state, save_model_state
from gradleak.threat.inspect import flagged, inspect_model, threshold
from gradleak.threat.malicious import imprint_model
from gradleak.types import ModelSpec, ServerState


def _spec(name: str, activation: str) -> ModelSpec:
    imagenet = name == "resnet18-imagenet"
    return ModelSpec(name=name, activation=activation, num_classes=1000 if imagenet else 10,
                     image_size=64 if imagenet else 32)


@pytest.mark.slow  # about 30 s over the zoo (the ImageNet ResNet-18 most)
@pytest.mark.parametrize("name", available())
def test_no_trained_zoo_model_is_flagged_with_or_without_the_clients_images(name):
    """False positives after training: 30 Adam steps (lr 1e-3) on 32 built-in photos, then every
    check, the trap checks with 32 other photos of the client. Training moves rows off any pattern
    an initialisation has; none of them drifts into one that a malicious block needs."""
    from gradleak.data import builtin_batch

    spec = _spec(name, "relu")
    model = build_model(spec, seed=7)
    data = builtin_batch(32, size=spec.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.images), data.labels).backward()
        opt.step()
    mine = builtin_batch(32, size=spec.image_size, offset=300, source="photos").images
    findings = inspect_model(model, spec.input_shape, images=mine)
    assert not flagged(findings), [(f.kind, f.module, round(f.score, 3)) for f in flagged(findings)]


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_no_honest_zoo_model_is_flagged_and_every_imprint_model_is(name, activation):
    spec = _spec(name, activation)
    honest = ServerState.from_spec(build_model(spec, seed=42), spec)
    assert not flagged(inspect_model(honest.model, spec.input_shape))
    for bins in (8, 64, 1024):
        for sparse in (False, True):  # the sparse block's arrays are the cumulative block's
            malicious = imprint_model(honest, bins, sparse=sparse)
            kinds = {f.kind for f in flagged(inspect_model(malicious.model, spec.input_shape))}
            assert kinds == {"imprint-rows", "imprint-decoder"}, (bins, sparse, kinds)


def test_noise_on_the_rows_as_large_as_the_rows_is_still_flagged():
    spec = _spec("lenet", "relu")
    server = imprint_model(ServerState.from_spec(build_model(spec, seed=0), spec), 256)
    w = server.model[0].encoder.weight
    with torch.no_grad():
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        w.add_(w.norm(dim=1, keepdim=True) * noise / noise.norm(dim=1, keepdim=True))
    rows = next(f for f in inspect_model(server.model, spec.input_shape) if f.kind == "imprint-rows")
    assert rows.flagged and 0.6 < rows.score < 0.8 and threshold(256) == pytest.approx(0.2)


def test_the_cli_exits_1_on_a_malicious_model_0_on_an_honest_one_and_2_on_bad_input(tmp_path, capsys):
    spec = _spec("lenet", "sigmoid")
    honest = ServerState.from_spec(build_model(spec, seed=42), spec)
    save_model_state(honest.model, spec, tmp_path / "honest.safetensors")
    malicious = imprint_model(honest, 128)
    save_model_state(malicious.model, spec, tmp_path / "malicious.safetensors")
    model, loaded = load_model_state(tmp_path / "malicious.safetensors")  # the block survives the file
    assert loaded == spec and torch.equal(model[0].encoder.bias, malicious.model[0].encoder.bias)
    assert main(["inspect", "--model-state", str(tmp_path / "honest.safetensors")]) == 0
    assert main(["inspect", "--model-state", str(tmp_path / "malicious.safetensors"), "--json"]) == 1
    capsys.readouterr()
    assert main(["inspect", "--model-state", str(tmp_path / "malicious.safetensors"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["flagged"] and {f["kind"] for f in doc["findings"] if f["flagged"]} == {"imprint-rows", "imprint-decoder"}
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    other = ModelSpec(name="convnet", activation="sigmoid")
    save_model_state(build_model(other, seed=0), other, tmp_path / "convnet.safetensors")
    tensors_of_convnet = tmp_path / "convnet.safetensors"
    header_lenet = tmp_path / "mismatch.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tensors_of_convnet), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(header_lenet),
                  metadata={"gradleak": json.dumps({"format": "gradleak-model/1", "spec": spec.to_dict()})})
    for path, message in ((tmp_path / "junk.safetensors", "expected a safetensors file"),
                          (header_lenet, "tensors do not fit model 'lenet'")):
        assert main(["inspect", "--model-state", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gradleak inspect: error:") and "\n" not in err and message in err, err
