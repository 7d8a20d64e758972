"""`gradleak bench landscape`: the gradient's alignment with the update around the private batch."""

from __future__ import annotations

import json

import pytest
import torch

from gradleak.audit.landscape import flat, gradient_landscape
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
