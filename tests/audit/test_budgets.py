"""The measured plateau table: which entry bounds an audit's budget, by victim, batch size and BatchNorm mode."""

from __future__ import annotations

from gradleak.attacks.cinet import CINetConfig
from gradleak.attacks.layerwise import LayerwiseConfig
from gradleak.audit.budgets import MEASURED, budget_warnings, needed
from gradleak.types import ModelSpec


def test_an_entry_holds_only_for_the_batchnorm_mode_it_was_measured_in():
    configs = {"cinet": CINetConfig(iterations=200)}
    train = ModelSpec("resnet18", activation="relu")
    evalm = ModelSpec("resnet18", activation="relu", bn_mode="eval")
    assert budget_warnings(train, [4], configs) == []
    (line,) = budget_warnings(evalm, [4], configs)
    assert "200 iterations" in line and "eval mode" in line and "batch 4" in line
    assert budget_warnings(evalm, [1], configs) == []  # batch 1 in eval mode was not measured: no bound


def test_a_victim_without_batchnorm_is_bounded_in_either_mode():
    for mode in ("train", "eval"):
        p = needed(ModelSpec("lenet", activation="sigmoid", bn_mode=mode), 4, "cinet")
        assert p is not None and p.batch_size == 4


def test_a_budget_at_or_above_every_entry_warns_of_nothing_but_unplateaued_entries():
    enough = {"cinet": CINetConfig(iterations=max(p.iterations or 0 for p in MEASURED))}
    lines = budget_warnings(ModelSpec("resnet18", activation="sigmoid"), [1, 4, 8, 16, 32, 64], enough)
    assert len(lines) == 1 and "batch 64" in lines[0] and "still improving" in lines[0]


def test_the_layerwise_attack_at_an_audits_usual_budget_is_named():
    # An audit's --iterations stands for every attack; layerwise's steps are cheap and it needed 5000 on the
    # train-mode ResNet-18-ReLU at batch 1, a lower bound for batch 4.
    relu = ModelSpec("resnet18", activation="relu")
    (line,) = budget_warnings(relu, [4], {"layerwise": LayerwiseConfig(iterations=300)})
    assert line.startswith("layerwise at batch 4: 300 iterations, below the 5000") and "batch 1" in line
    assert budget_warnings(relu, [1, 4], {"layerwise": LayerwiseConfig()}) == []
