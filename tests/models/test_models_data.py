"""Victim models, the FedSGD update, and the built-in photos."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak.data import builtin_batch, load_batch
from gradleak.errors import ConfigError, DataError, UnknownNameError
from gradleak.models import available, build_model, validate_victim
from gradleak.threat import fedsgd_update
from gradleak.types import ModelSpec, ServerState


@pytest.mark.parametrize("name", ["linear", "mlp", "lenet", "convnet", "resnet18"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_every_victim_runs_at_32px(name, activation):
    model = build_model(ModelSpec(name=name, activation=activation, num_classes=7))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_imagenet_resnet_runs_at_128px():
    model = build_model(ModelSpec(name="resnet18-imagenet", image_size=128, num_classes=5))
    assert model(torch.rand(2, 3, 128, 128)).shape == (2, 5)


def test_sigmoid_victim_has_no_relu_and_is_seeded():
    a = build_model(ModelSpec(name="resnet18", activation="sigmoid"))
    b = build_model(ModelSpec(name="resnet18", activation="sigmoid"))
    assert not any(isinstance(m, nn.ReLU) for m in a.modules())
    assert sum(isinstance(m, nn.Sigmoid) for m in a.modules()) == 17
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bn_mode_is_applied():
    assert build_model(ModelSpec(name="resnet18", bn_mode="train")).training
    assert not build_model(ModelSpec(name="resnet18", bn_mode="eval")).training


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="expected one of: .*lenet.*resnet18"):
        build_model(ModelSpec(name="vgg99"))
    assert {"linear", "lenet", "resnet18"} <= set(available())


def test_bad_activation_and_bn_mode():
    with pytest.raises(ConfigError, match="activation"):
        build_model(ModelSpec(name="lenet", activation="swish"))
    with pytest.raises(ConfigError, match="bn_mode"):
        build_model(ModelSpec(name="lenet", bn_mode="frozen"))


def test_validate_victim_flags_train_bn_and_relu():
    problems = validate_victim(build_model(ModelSpec(name="resnet18", activation="relu")))
    assert any("BatchNorm" in p for p in problems) and any("ReLU" in p for p in problems)
    assert validate_victim(build_model(ModelSpec(name="lenet", activation="sigmoid"))) == []
    assert any("piecewise-linear" in p for p in validate_victim(build_model(ModelSpec("lenet", activation="leaky-relu"))))
    assert validate_victim(build_model(ModelSpec(name="lenet", activation="gelu"))) == []


@pytest.mark.parametrize("activation, module", [("gelu", nn.GELU), ("leaky-relu", nn.LeakyReLU), ("tanh", nn.Tanh)])
def test_every_architecture_uses_the_activation_it_is_given_throughout(activation, module):
    for name in ("lenet", "convnet", "resnet18"):
        model = build_model(ModelSpec(name=name, activation=activation))
        kinds = {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.GELU))}
        assert kinds == {module}, (name, kinds)
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


def test_fedsgd_update_is_the_mean_gradient_and_leaves_model_unchanged():
    spec = ModelSpec(name="convnet", width=8)
    model = build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    server = ServerState.from_spec(model, spec)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 3])
    update = fedsgd_update(server, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # per-sample gradients in eval mode average to the batch gradient (no batch coupling)
    spec_e = ModelSpec(name="lenet")
    m = build_model(spec_e)
    s = ServerState.from_spec(m, spec_e)
    full = fedsgd_update(s, x, y)
    parts = [fedsgd_update(s, x[i:i + 1], y[i:i + 1]) for i in range(4)]
    for name, g in full.tensors.items():
        torch.testing.assert_close(g, sum(p.tensors[name] for p in parts) / 4, rtol=1e-5, atol=1e-7)
    assert update.num_samples == 4


def test_fedsgd_rejects_wrong_image_size_and_labels():
    spec = ModelSpec(name="lenet")
    server = ServerState.from_spec(build_model(spec), spec)
    with pytest.raises(DataError, match=r"expected shape \(N, 3, 32, 32\)"):
        fedsgd_update(server, torch.rand(2, 3, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="class indices"):
        fedsgd_update(server, torch.rand(2, 3, 32, 32), torch.tensor([0, 10]))
    with pytest.raises(DataError, match="labels: expected shape"):
        fedsgd_update(server, torch.rand(2, 3, 32, 32), torch.tensor([0, 1, 2]))


def test_builtin_cifar10_is_real_deterministic_and_labelled():
    a = builtin_batch(8)
    b = builtin_batch(8)
    assert a.images.shape == (8, 3, 32, 32) and torch.equal(a.images, b.images)
    assert a.labels.tolist() == [int(n.split("_")[-1].split(".")[0]) for n in a.names]
    assert 0 <= a.images.min() and a.images.max() <= 1 and a.images.std() > 0.1


def test_builtin_photos_reach_large_batches_at_any_size():
    batch = builtin_batch(48, size=64, source="photos")
    assert batch.images.shape == (48, 3, 64, 64)
    assert len(set(batch.names)) == 48
    # crops are different images
    assert (batch.images[0] - batch.images[30]).abs().mean() > 0.01


def test_builtin_default_serves_64_distinct_real_images_then_crops():
    batch = builtin_batch(64)
    assert batch.images.shape == (64, 3, 32, 32)
    # the first 20 are exactly the CIFAR-10 set, so small batches are unchanged
    assert torch.equal(batch.images[:20], builtin_batch(20, source="cifar10").images)
    # real images from every set the packages ship, no crop among the first 68
    assert [n.split("_")[0].split(":")[0] for n in batch.names[18:62:4]] == \
        ["cifar10"] * 1 + ["cifar100"] * 5 + ["imagenet"] * 5
    assert not any("#crop" in n for n in builtin_batch(68).names)
    big = builtin_batch(256)
    assert len(set(big.names)) == 256 and "#crop" in big.names[-1]
    flat = big.images.flatten(1)
    d = torch.cdist(flat, flat)
    d.fill_diagonal_(float("inf"))
    assert d.min() > 0.5  # no two images identical (or nearly: 3072 pixel values each)
    assert 0 <= int(big.labels.min()) and int(big.labels.max()) < 10


def test_builtin_errors():
    with pytest.raises(DataError, match="at most 824"):
        builtin_batch(825)
    with pytest.raises(DataError, match="at most 20"):
        builtin_batch(21, source="cifar10")
    with pytest.raises(ConfigError, match="unknown built-in source"):
        builtin_batch(2, source="mnist")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_batch("cifar10-dir", 2, root="/nonexistent")
    with pytest.raises(ConfigError, match="--data-root"):
        load_batch("folder", 2)


def test_building_a_model_or_a_generator_leaves_every_random_generator_as_it_was(monkeypatch):
    """The initialisation seed is set on the CPU generator inside a fork: the global CPU stream is unchanged
    and no CUDA generator is reseeded (torch.manual_seed would reseed every CUDA device's)."""
    import gradleak

    def reseeded(*args, **kwargs):
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    before = torch.get_rng_state()
    build_model(ModelSpec("lenet"), seed=3)
    server = ServerState.from_spec(build_model(ModelSpec("lenet", image_size=16), seed=1), ModelSpec("lenet", image_size=16))
    batch = builtin_batch(1, source="cifar10", size=16)
    update = gradleak.threat.fedsgd_update(server, batch.images, batch.labels)
    gradleak.attacks.create("cinet", {"iterations": 1, "channels": 4}, seed=5).reconstruct(server, update)
    assert torch.equal(torch.get_rng_state(), before)
    a, b = build_model(ModelSpec("lenet"), seed=3), build_model(ModelSpec("lenet"), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
