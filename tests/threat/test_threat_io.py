"""Update/model/truth files: round trips and every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_case
from gradleak.errors import DataError, UpdateError
from gradleak.threat import load_model_state, load_truth, load_update, save_model_state, save_truth, save_update
from gradleak.types import ClientUpdate, ModelSpec


def test_update_round_trip_keeps_tensors_order_and_metadata(tmp_path, lenet_case):
    server, update, images, labels = lenet_case
    path = tmp_path / "u.safetensors"
    save_update(update, path)
    back = load_update(path, model=server.model)
    assert list(back.tensors) == list(update.tensors)
    for n in update.tensors:
        assert torch.equal(back.tensors[n], update.tensors[n])
    assert back.num_samples == 2 and back.protocol == "fedsgd" and back.kind == "gradient"


def test_model_state_round_trip_rebuilds_identical_model(tmp_path, lenet_case):
    server, *_ = lenet_case
    save_model_state(server.model, server.spec, tmp_path / "m.safetensors")
    model, spec = load_model_state(tmp_path / "m.safetensors")
    assert spec == server.spec
    for (n1, a), (n2, b) in zip(server.model.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_truth_round_trip(tmp_path, lenet_case):
    _, _, images, labels = lenet_case
    save_truth(images, labels, tmp_path / "t.safetensors")
    truth = load_truth(tmp_path / "t.safetensors")
    x, y = truth.images, truth.labels
    assert torch.equal(x, images) and torch.equal(y, labels)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UpdateError, match="not found"):
        load_update(tmp_path / "nope.safetensors")


def test_truncated_file_is_a_clear_error(tmp_path, lenet_case):
    _, update, *_ = lenet_case
    path = tmp_path / "u.safetensors"
    save_update(update, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UpdateError, match="expected a safetensors file"):
        load_update(path)


def test_garbage_and_pickle_files_are_refused(tmp_path):
    path = tmp_path / "u.safetensors"
    torch.save({"a": torch.zeros(2)}, path)  # a pickle: must never be unpickled
    with pytest.raises(UpdateError):
        load_update(path)


def test_foreign_safetensors_without_header_is_refused(tmp_path):
    path = tmp_path / "u.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(UpdateError, match="header format"):
        load_update(path)


def test_nan_in_update_is_refused(tmp_path, lenet_case):
    server, update, *_ = lenet_case
    name = next(iter(update.tensors))
    bad = dict(update.tensors)
    bad[name] = bad[name].clone()
    bad[name].view(-1)[0] = float("nan")
    save_update(update.replace(tensors=bad), tmp_path / "u.safetensors")
    with pytest.raises(UpdateError, match="NaN/Inf"):
        load_update(tmp_path / "u.safetensors", model=server.model)


def test_update_that_does_not_fit_the_model_is_refused(tmp_path, lenet_case):
    _, update, *_ = lenet_case
    other, *_ = make_case("mlp", 2)
    save_update(update, tmp_path / "u.safetensors")
    with pytest.raises(UpdateError, match="does not fit the model"):
        load_update(tmp_path / "u.safetensors", model=other.model)


def test_update_with_wrong_shape_names_the_tensor(tmp_path, lenet_case):
    server, update, *_ = lenet_case
    wide, *_ = make_case("lenet", 2, num_classes=20)
    save_update(update, tmp_path / "u.safetensors")
    with pytest.raises(UpdateError, match="expected shape"):
        load_update(tmp_path / "u.safetensors", model=wide.model)


def test_model_state_of_another_architecture_is_refused(tmp_path, lenet_case):
    server, *_ = lenet_case
    path = tmp_path / "m.safetensors"
    save_model_state(server.model, ModelSpec(name="mlp"), path)
    with pytest.raises(UpdateError, match="do not fit model 'mlp'") as e:
        load_model_state(path)
    assert "expected tensor(s) missing, e.g." in str(e.value) and "unexpected, e.g." in str(e.value)


def test_state_mismatch_names_the_first_wrong_shape():
    from gradleak.models import build_model
    from gradleak.threat.io import state_mismatch

    model = build_model(ModelSpec(name="lenet"), seed=0)
    state = dict(model.state_dict())
    name = next(iter(state))
    state[name] = torch.zeros(3)
    assert state_mismatch(model, state) == f"'{name}' expected shape {tuple(model.state_dict()[name].shape)}, got (3,)"


def test_client_update_rejects_bad_fields():
    with pytest.raises(UpdateError, match="num_samples"):
        ClientUpdate(tensors={"w": torch.zeros(1)}, num_samples=0)
    with pytest.raises(UpdateError, match="kind"):
        ClientUpdate(tensors={"w": torch.zeros(1)}, kind="weights")


def test_truth_file_with_wrong_content_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"images": torch.zeros(2, 3, 4, 4)}, str(path), metadata={"gradleak": json.dumps({"format": "gradleak-truth/1"})})
    with pytest.raises(DataError, match="expected 'images' and 'labels'"):
        load_truth(path)


@pytest.mark.parametrize("images, labels, message", [
    (torch.full((2, 3, 4, 4), float("nan")), torch.tensor([0, 1]), "expected finite images"),
    (torch.full((2, 3, 4, 4), 255.0), torch.tensor([0, 1]), r"expected images in \[0, 1\], got values in \[255, 255\]"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), "expected float images in"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0.0, 1.0]), "expected integer class labels"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0, -1]), "expected labels 0 to 9, got -1"),
    (torch.rand(2, 3, 4, 4), torch.tensor([0, 10]), "expected labels 0 to 9, got 10"),
])
def test_a_truth_file_out_of_range_is_refused_before_any_attack(tmp_path, images, labels, message):
    path = tmp_path / "t.safetensors"
    save_truth(images, labels, path)
    with pytest.raises(DataError, match=message):
        load_truth(path, num_classes=10)


def test_a_truth_file_loads_to_a_batch_with_its_names(tmp_path):
    path = tmp_path / "t.safetensors"
    save_truth(torch.rand(2, 3, 4, 4), torch.tensor([1, 2]), path, names=["a.png", "b.png"])
    batch = load_truth(path, num_classes=10)
    assert len(batch) == 2 and batch.names == ["a.png", "b.png"] and batch.labels.dtype == torch.int64
