"""`gradleak bench landscape`: the gradient's alignment with the update around the private batch."""

from __future__ import annotations

import json

import pytest
import torch

from gradleak.audit.landscape import DIRECTIONS, direction_of, flat, gradient_landscape
from gradleak.bench.landscape import parse_victim, victim_server
from gradleak.cli.main import main
from gradleak.data import builtin_batch
from gradleak.errors import ConfigError


def test_the_gradient_at_the_batch_itself_is_the_update():
    server = victim_server("lenet", "relu", "train", None)
    data = builtin_batch(2)
    r = gradient_landscape(server, data.images, data.labels, mixes=(0.0, 1.0))
    assert r["mean_cosine"][0] == pytest.approx(1.0, abs=1e-5)
    assert r["first_cosine"][0] == pytest.approx(1.0, abs=1e-5)
    assert r["mean_cosine"][1] < 0.99  # noise changes the gradient


def test_train_mode_batchnorm_narrows_the_basin_of_a_relu_resnet():
    # the measured explanation of why attacks fail on ResNet-18-ReLU in train mode and break it in eval
    # mode: 5% of pixel noise decorrelates the train-mode gradient (0.33 measured), not the eval-mode one (0.99)
    data = builtin_batch(1)
    train = gradient_landscape(victim_server("resnet18", "relu", "train", None), data.images, data.labels,
                               mixes=(0.05, 0.2))
    evaluated = gradient_landscape(victim_server("resnet18", "relu", "eval", None), data.images, data.labels,
                                   mixes=(0.05, 0.2))
    assert train["mean_cosine"][0] < 0.5 and train["radius"] == 0.05
    assert min(evaluated["mean_cosine"]) > 0.9 and evaluated["radius"] is None


def test_an_unnormalised_sigmoid_resnet_is_flat_and_the_broken_victims_are_not():
    # ResNet-18-sigmoid in eval mode on the untrained statistics: the gradient at pure noise keeps a mean
    # layer cosine of 0.9992 with the update (measured), and no attack breaks it; the broken victims do not
    data = builtin_batch(1)
    results = {(model, mode): gradient_landscape(victim_server(model, "sigmoid", mode, None), data.images, data.labels,
                                        mixes=(0.5, 1.0))
               for model, mode in (("resnet18", "eval"), ("resnet18", "train"), ("lenet", "train"))}
    at_noise = flat(results["resnet18", "eval"])
    assert at_noise is not None and at_noise > 0.995
    assert flat(results["resnet18", "train"]) is None and flat(results["lenet", "train"]) is None
    assert flat(None) is None and flat({"radius": 0.05}) is None  # an older cell without the grid


def test_a_victim_names_its_activation_even_one_with_a_hyphen():
    assert parse_victim("resnet18-leaky-relu:eval") == ("resnet18", "leaky-relu", "eval")
    assert parse_victim("resnet18-imagenet-gelu") == ("resnet18-imagenet", "gelu", "train")
    assert parse_victim("convnet-relu:batch-stats") == ("convnet", "relu", "batch-stats")


@pytest.mark.parametrize("text", ["resnet18", "resnet18-relu:test", "-relu"])
def test_a_malformed_victim_is_refused_naming_the_form(text):
    with pytest.raises(ConfigError, match="MODEL-ACTIVATION"):
        parse_victim(text)


def test_the_benchmark_prints_a_row_per_victim_and_batch_and_writes_json(tmp_path, capsys):
    out = tmp_path / "landscape.json"
    assert main(["bench", "landscape", "--victims", "lenet-sigmoid,lenet-relu:eval", "--batches", "1,2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["victim"], r["bn_mode"], r["batch"]) for r in rows] == [
        ("lenet-sigmoid", "train", 1), ("lenet-sigmoid", "train", 2), ("lenet-relu", "eval", 1),
        ("lenet-relu", "eval", 2)]
    assert all(len(r["mean_cosine"]) == len(r["mixes"]) == 7 for r in rows)
    assert "| lenet-sigmoid" in capsys.readouterr().out


def test_batch_stats_mode_computes_train_mode_values_at_the_batch():
    data = builtin_batch(2)
    frozen = victim_server("resnet18", "relu", "batch-stats", None, data.images)
    train = victim_server("resnet18", "relu", "train", None)
    assert not frozen.model.training
    with torch.no_grad():
        expected = train.model(data.images)
        got = frozen.model(data.images)
        alone, alone_train = frozen.model(data.images[:1]), train.model(data.images[:1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # fixed statistics: each image's output no longer depends on the rest of the batch, unlike train mode's
    torch.testing.assert_close(alone, got[:1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone_train, expected[:1], atol=1e-2)
    with pytest.raises(ConfigError, match="private images"):
        victim_server("resnet18", "relu", "batch-stats", None)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_direction_is_an_image_batch_and_leaves_the_update_at_t_0(direction):
    data, others = builtin_batch(2), builtin_batch(2, offset=2)
    towards = direction_of(data.images, direction, others=others.images)
    assert towards.shape == data.images.shape and 0.0 <= float(towards.min()) <= float(towards.max()) <= 1.0
    assert not torch.allclose(towards, data.images, atol=1e-3)
    r = gradient_landscape(victim_server("lenet", "relu", "train", None), data.images, data.labels,
                           mixes=(0.0, 0.5), direction=direction, others=others.images)
    assert r["mean_cosine"][0] == pytest.approx(1.0, abs=1e-5) and r["mean_cosine"][1] < 1.0 - 1e-4


def test_low_frequency_noise_is_constant_on_blocks_up_to_interpolation_and_seeded():
    images = builtin_batch(1).images
    coarse = direction_of(images, "noise-4", seed=3)
    torch.testing.assert_close(coarse, direction_of(images, "noise-4", seed=3))
    assert not torch.allclose(coarse, direction_of(images, "noise-4", seed=4))
    # bilinear upsampling of a 4 x 4 grid: neighbouring pixels differ far less than in pixel noise
    step = lambda u: float((u[..., 1:] - u[..., :-1]).abs().mean())  # noqa: E731
    assert step(coarse) < 0.1 * step(direction_of(images, "noise", seed=3))


@pytest.mark.parametrize(("direction", "others", "match"), [
    ("sideways", None, "expected one of noise, noise-4"),
    ("noise-5", None, "expected one of"),
    ("image", None, "expected other images of shape"),
])
def test_an_unknown_direction_or_a_missing_image_is_refused_naming_what_was_expected(direction, others, match):
    with pytest.raises(ConfigError, match=match):
        direction_of(builtin_batch(1).images, direction, others=others)


def test_the_train_mode_relu_resnet_is_narrow_along_natural_directions_too():
    # measured: at 5% the mean cosine is 0.33 towards noise, 0.44-0.54 towards low-frequency noise and another
    # photo, 0.74-0.83 towards the image's own blur, grey or mean colour; in eval mode 0.99-1.00 every way
    data, other = builtin_batch(1), builtin_batch(1, offset=1)
    server = victim_server("resnet18", "relu", "train", None)
    at = {d: gradient_landscape(server, data.images, data.labels, mixes=(0.05,), direction=d,
                                others=other.images)["mean_cosine"][0]
          for d in ("noise-4", "image", "grey")}
    assert at["noise-4"] < 0.65 and at["image"] < 0.65
    assert at["noise-4"] < at["grey"] < 0.95


def test_the_benchmark_takes_directions_and_refuses_unknown_ones(tmp_path, capsys):
    out = tmp_path / "landscape.json"
    assert main(["bench", "landscape", "--victims", "lenet-relu", "--batches", "1", "--directions", "noise,image,blur",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["direction"] for r in rows] == ["noise", "image", "blur"]
    assert "| image" in capsys.readouterr().out
    assert main(["bench", "landscape", "--victims", "lenet-relu", "--directions", "noise,sideways",
                 "--json", str(out)]) == 2
    assert "--directions: expected a comma-separated subset of noise" in capsys.readouterr().err


def test_centring_turns_the_flat_sigmoid_resnet_into_a_landscape_with_contrast():
    # measured: plain 0.9992 at pure noise; centred on 16 noise batches about 0.95 at 20% noise and 0.1 at pure noise
    data = builtin_batch(1)
    server = victim_server("resnet18", "sigmoid", "eval", None)
    plain = gradient_landscape(server, data.images, data.labels, mixes=(0.0, 0.2, 1.0))
    centred = gradient_landscape(server, data.images, data.labels, mixes=(0.0, 0.2, 1.0), center=16)
    assert flat(plain) is not None and flat(centred) is None
    assert centred["mean_cosine"][0] == pytest.approx(1.0, abs=1e-4)
    assert centred["mean_cosine"][1] > 0.8 and centred["mean_cosine"][2] < 0.5
