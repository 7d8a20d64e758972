"""Label recovery (gradleak.labels): known answers, assumption checks and fallbacks, properties, CLI.

Every update here is computed from a private batch; the strategies see only the server's model
and the update, and the truth is compared afterwards.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradleak.cli.main import main
from gradleak.errors import ConfigError, UnknownNameError, UnsupportedModelError, UpdateError
from gradleak.labels import LABEL_STRATEGIES, LabelResult, counts_to_labels, label_accuracy, last_layer, recover_labels
from gradleak.labels.ilrg import LOW_CONFIDENCE, ilrg
from gradleak.models import build_model
from gradleak.threat import fedavg_update, fedsgd_update, save_model_state, save_truth, save_update
from gradleak.types import ModelSpec, ServerState

C = 10


def server_for(name: str = "lenet", activation: str = "sigmoid", **kw) -> ServerState:
    spec = ModelSpec(name=name, activation=activation, num_classes=C, **kw)
    return ServerState.from_spec(build_model(spec, seed=42), spec)


def batch(n: int, *, seed: int = 0, labels: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 32-px images and labels drawn with repeats from 10 classes (or the given ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.tensor(labels) if labels is not None else torch.randint(0, C, (n,), generator=g)
    return x, y


def counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=C).tolist()


@pytest.fixture(scope="module")
def lenet() -> ServerState:
    return server_for("lenet", "sigmoid")


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("label", [0, 3, 9])
def test_idlg_recovers_a_single_label_exactly(lenet, label):
    x, y = batch(1, seed=label, labels=[label])
    result = recover_labels(lenet, fedsgd_update(lenet, x, y), strategy="idlg")
    assert result.labels.tolist() == [label]
    assert result.strategy == "idlg" and result.warnings == []


def test_idlg_on_deltas_and_by_auto(lenet):
    x, y = batch(1, labels=[6])
    one_step = fedavg_update(lenet, x, y, local_steps=1, lr=0.1, batch_size=1)
    assert recover_labels(lenet, one_step, strategy="idlg").labels.tolist() == [6]
    no_lr = one_step.replace(local_lr=None, local_steps=4)  # only the sign is known: iDLG needs no more
    assert recover_labels(lenet, no_lr, strategy="idlg").labels.tolist() == [6]
    auto = recover_labels(lenet, fedsgd_update(lenet, x, y))
    assert (auto.strategy, auto.labels.tolist()) == ("idlg", [6])


@pytest.mark.parametrize("name,activation", [("lenet", "sigmoid"), ("lenet", "relu"),
                                             ("resnet18", "sigmoid"), ("resnet18", "relu")])
def test_ilrg_exact_counts_with_repeated_labels(name, activation):
    """Ma et al. 2023: exact per-class counts for 32 samples from 10 classes on untrained victims."""
    server = server_for(name, activation)
    x, y = batch(32, seed=1)
    assert y.unique().numel() < 32 and counts(y).count(0) < C  # repeats, several classes
    result = recover_labels(server, fedsgd_update(server, x, y), strategy="ilrg")
    assert counts(result.labels) == counts(y)
    assert result.labels.tolist() == sorted(result.labels.tolist())
    assert result.info["score"] < LOW_CONFIDENCE and result.warnings == []
    assert label_accuracy(result.labels, y) == 1.0


def test_ilrg_as_published_is_exact_on_lenet_and_auto_uses_ilrg(lenet):
    x, y = batch(24, seed=2)
    update = fedsgd_update(lenet, x, y)
    paper = ilrg(lenet, update, shrinkage="paper")
    assert paper.info["rho"] == 0.0 and counts(paper.labels) == counts(y)
    auto = recover_labels(lenet, update)
    assert auto.strategy == "ilrg" and counts(auto.labels) == counts(y)
    assert auto.info["requested"] == "auto"


def test_ilrg_on_fedavg_deltas(lenet):
    x, y = batch(16, seed=3)
    one = fedavg_update(lenet, x, y, local_steps=1, lr=0.05, batch_size=16)  # -delta/lr is the gradient
    r1 = recover_labels(lenet, one, strategy="ilrg")
    assert counts(r1.labels) == counts(y) and r1.warnings == []
    multi = fedavg_update(lenet, x, y, local_steps=3, lr=0.01, batch_size=16)  # full-batch steps
    r3 = recover_labels(lenet, multi, strategy="ilrg")
    assert counts(r3.labels) == counts(y)
    assert any("multi-step delta" in w for w in r3.warnings)
    with pytest.raises(UpdateError, match="local_lr"):
        recover_labels(lenet, one.replace(local_lr=None), strategy="ilrg")


def test_yin_recovers_unique_labels_and_flags_repeats():
    server = server_for("convnet", "relu")
    truth = [8, 1, 4, 0, 6]
    x, y = batch(5, seed=4, labels=truth)
    result = recover_labels(server, fedsgd_update(server, x, y), strategy="yin")
    assert result.labels.tolist() == sorted(truth) and result.warnings == []
    x, y = batch(5, seed=4, labels=[2, 2, 2, 7, 7])
    repeated = recover_labels(server, fedsgd_update(server, x, y), strategy="yin")
    assert len(set(repeated.labels.tolist())) == 5  # Yin assumes unique labels ...
    assert any("only 2 of 5 classes" in w for w in repeated.warnings)  # ... and says when that looks wrong
    with pytest.raises(UpdateError, match="at most 10 samples"):
        recover_labels(server, fedsgd_update(server, *batch(11, seed=4)), strategy="yin")


def test_llg_unique_labels_and_count_of_repeats(lenet):
    x, y = batch(6, seed=5, labels=[5, 0, 9, 2, 3, 7])
    assert recover_labels(lenet, fedsgd_update(lenet, x, y), strategy="llg").labels.tolist() == sorted(y.tolist())
    x, y = batch(20, seed=6)
    update = fedsgd_update(lenet, x, y)
    result = recover_labels(lenet, update, strategy="llg")
    assert result.labels.numel() == 20 and result.info["impact"] < 0
    row_sums = last_layer(lenet, update).grad_weight.sum(dim=1)
    negative = set(torch.nonzero(row_sums < 0).view(-1).tolist())
    assert negative and negative <= set(y.tolist())  # Property 1: a negative row sum means the class is present
    assert negative <= set(result.labels.tolist())  # and LLG includes every such class


def test_bias_count_on_untrained_lenet(lenet):
    x, y = batch(16, seed=7)
    assert counts(recover_labels(lenet, fedsgd_update(lenet, x, y), strategy="bias-count").labels) == counts(y)


# ---------------------------------------------------------------- assumptions, errors, fallbacks


class NoBiasHead(nn.Module):
    """A small CNN whose last linear layer has no bias (iLRG and bias counting need one)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(8 * 7 * 7, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _server(model: nn.Module) -> ServerState:
    torch.manual_seed(0)
    return ServerState(model=model, input_shape=(3, 32, 32), num_classes=C)


def test_fallback_when_the_last_layer_has_no_bias():
    torch.manual_seed(0)
    server = _server(NoBiasHead())
    x, y = batch(4, seed=8, labels=[1, 5, 6, 9])
    update = fedsgd_update(server, x, y)
    with pytest.raises(UnsupportedModelError, match="bias"):
        recover_labels(server, update, strategy="ilrg")
    result = recover_labels(server, update)
    assert result.strategy == "yin" and result.labels.tolist() == [1, 5, 6, 9]
    assert any("ilrg skipped" in w and "bias" in w for w in result.warnings)
    assert "ilrg" in result.info["skipped"]


def test_fallback_when_the_batch_size_does_not_match(lenet):
    x, y = batch(4, seed=9, labels=[2, 4, 4, 8])
    update = fedsgd_update(lenet, x, y).replace(num_samples=1)  # metadata says one sample, it holds 4
    with pytest.raises(UpdateError, match="exactly one negative"):
        recover_labels(lenet, update, strategy="idlg")
    result = recover_labels(lenet, update)
    assert result.strategy != "idlg" and result.labels.numel() == 1
    assert any("idlg skipped" in w for w in result.warnings)
    assert any("low confidence" in w for w in result.warnings)  # 1/4 of each count is far from an integer
    x, y = batch(6, seed=9, labels=[0, 1, 2, 3, 4, 5])
    half = fedsgd_update(lenet, x, y).replace(num_samples=3)  # six classes show up in a "batch of 3"
    with pytest.raises(UpdateError, match="larger than num_samples"):
        recover_labels(lenet, half, strategy="yin")


def test_auto_replaces_low_confidence_ilrg_by_bias_count(lenet, monkeypatch):
    import gradleak.labels.recover as recover

    x, y = batch(8, seed=17)
    update = fedsgd_update(lenet, x, y)
    assert recover_labels(lenet, update).strategy == "ilrg"
    monkeypatch.setattr(recover, "LOW_CONFIDENCE", -1.0)  # every score counts as low confidence
    result = recover_labels(lenet, update)
    assert result.strategy == "bias-count" and counts(result.labels) == counts(y)
    assert any("instead of low-confidence ilrg" in w for w in result.warnings)
    assert "score" in result.info["ilrg"]
    # after a clip bias-count's scale is wrong too: a low-confidence search falls through to LLG
    from gradleak.defenses import defended_update

    clipped = recover_labels(lenet, defended_update(lenet, x, y, defense="clip:1", generator=torch.Generator()))
    assert clipped.strategy == "llg" and "low confidence with the update's scale searched" in clipped.info["skipped"]["ilrg"]


def test_a_modified_update_is_detected_and_auto_falls_back(lenet):
    x, y = batch(8, seed=10, labels=[0, 1, 2, 3, 4, 5, 6, 7])
    update = fedsgd_update(lenet, x, y)
    g = torch.Generator().manual_seed(0)
    noisy = update.replace(tensors={n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in update.tensors.items()},
                           defenses=("gaussian",))
    with pytest.raises(UpdateError, match="sum to 0"):
        recover_labels(lenet, noisy, strategy="ilrg")
    result = recover_labels(lenet, noisy)
    assert result.strategy in ("yin", "llg")
    assert any("defenses (gaussian)" in w for w in result.warnings)
    assert any("ilrg skipped" in w for w in result.warnings)


def test_model_without_a_final_linear_layer_is_refused():
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    server = _server(model)
    x, y = batch(2, seed=11)
    update = fedsgd_update(server, x, y)
    for strategy in ("auto", "ilrg", "yin", "llg", "bias-count"):
        with pytest.raises(UnsupportedModelError, match="nn.Linear"):
            recover_labels(server, update, strategy=strategy)


def test_output_computed_after_the_last_linear_layer_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, C), nn.Tanh())
    server = _server(model)
    update = fedsgd_update(server, *batch(2, seed=12))
    with pytest.raises(UnsupportedModelError, match="output computed after"):
        recover_labels(server, update)


def test_negative_features_refused_by_sign_strategies():
    server = server_for("mlp", "tanh", width=32)
    update = fedsgd_update(server, *batch(3, seed=13, labels=[1, 2, 3]))
    for strategy in ("yin", "llg"):
        with pytest.raises(UnsupportedModelError, match="non-negative"):
            recover_labels(server, update, strategy=strategy)
    assert counts(recover_labels(server, update).labels) == counts(torch.tensor([1, 2, 3]))  # ilrg needs no sign


def test_update_missing_the_last_layer_and_unknown_strategy(lenet):
    update = fedsgd_update(lenet, *batch(2, seed=14))
    layer = last_layer(lenet, update)
    partial = update.replace(tensors={n: t for n, t in update.tensors.items() if n != layer.bias_name})
    with pytest.raises(UpdateError, match=r"expected the update to hold '7\.bias'"):
        recover_labels(lenet, partial)
    with pytest.raises(UnknownNameError, match="expected one of: auto, bias-count, idlg, ilrg, llg, yin"):
        recover_labels(lenet, update, strategy="magic")


def test_recovery_leaves_the_server_model_untouched():
    server = server_for("convnet", "relu")  # train-mode BatchNorm
    update = fedsgd_update(server, *batch(8, seed=15))
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    modes = [m.training for m in server.model.modules()]
    for strategy in ("auto", "bias-count", "llg"):
        recover_labels(server, update, strategy=strategy)
    after = server.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == [m.training for m in server.model.modules()]


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-2, max_value=50, allow_nan=False), min_size=1, max_size=12),
       st.integers(min_value=0, max_value=200))
def test_counts_to_labels_sums_to_n_and_is_sorted(values, n):
    labels = counts_to_labels(torch.tensor(values, dtype=torch.float64), n)
    assert labels.numel() == n
    assert labels.tolist() == sorted(labels.tolist())
    assert all(0 <= v < len(values) for v in labels.tolist())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=10))
def test_counts_to_labels_keeps_integer_counts(ks):
    labels = counts_to_labels(torch.tensor(ks, dtype=torch.float64), sum(ks))
    assert torch.bincount(labels, minlength=len(ks)).tolist() == ks


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_label_accuracy_is_a_multiset_overlap(truth, rnd):
    t = torch.tensor(truth)
    shuffled = truth[:]
    rnd.shuffle(shuffled)
    assert label_accuracy(torch.tensor(shuffled), t) == 1.0
    wrong = torch.tensor([(v + 1) % 10 for v in truth])
    acc = label_accuracy(wrong, t)
    assert 0.0 <= acc <= 1.0
    assert math.isclose(acc, sum(min(wrong.tolist().count(c), truth.count(c)) for c in range(10)) / len(truth))


def test_label_result_counts_and_registry():
    r = LabelResult(labels=torch.tensor([0, 0, 3]), strategy="x")
    assert r.counts(5).tolist() == [2, 0, 0, 1, 0]
    assert set(LABEL_STRATEGIES.available()) == {"auto", "bias-count", "idlg", "ilrg", "llg", "yin"}


# ---------------------------------------------------------------- command line


def test_cli_labels_prints_counts_and_accuracy(tmp_path, capsys, lenet):
    x, y = batch(12, seed=16)
    save_update(fedsgd_update(lenet, x, y), tmp_path / "u.safetensors")
    save_model_state(lenet.model, lenet.spec, tmp_path / "m.safetensors")
    save_truth(x, y, tmp_path / "t.safetensors")
    argv = ["labels", "--update", str(tmp_path / "u.safetensors"), "--model-state", str(tmp_path / "m.safetensors")]
    assert main([*argv, "--truth", str(tmp_path / "t.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "strategy: ilrg (requested: auto)" in out
    assert "label accuracy: 1.000 (12/12)" in out
    expected = ", ".join(f"{c}: {k}" for c, k in enumerate(counts(y)) if k)
    assert f"recovered counts (class: samples): {expected}" in out
    assert main([*argv, "--strategy", "llg", "--json"]) == 0
    assert '"strategy": "llg"' in capsys.readouterr().out
    assert main([*argv, "--strategy", "idlg"]) == 2  # a batch of 12: iDLG's assumption fails, exit code 2
    assert "expected a batch of 1" in capsys.readouterr().err


def test_auto_under_a_recorded_defense_prefers_what_survives_it():
    # measured in docs/labels.md: after clipping the counts' scale is unknown, and under noise LLG beats Yin
    from conftest import make_case
    from gradleak.defenses import defended_update

    server, _, x, y = make_case("lenet", 8)
    plain = recover_labels(server, defended_update(server, x, y, defense="none", generator=torch.Generator()))
    assert plain.strategy == "ilrg"
    clipped = recover_labels(server, defended_update(server, x, y, defense="clip:1", generator=torch.Generator()))
    assert clipped.strategy == "ilrg" and "scale" in clipped.info  # the clip's factor searched, not assumed
    assert "rescales it" in clipped.info["skipped"]["bias-count"]
    private = recover_labels(server, defended_update(server, x, y, defense="dpsgd:1.0", generator=torch.Generator()))
    assert "rescales it" in private.info["skipped"]["ilrg"]  # DP-SGD's noise: no integer counts to search for
    noisy_update = defended_update(server, x, y, defense="noise:1e-3", generator=torch.Generator().manual_seed(0))
    noisy = recover_labels(server, noisy_update)
    assert noisy.strategy == "llg" and "yin" not in noisy.info["skipped"]
    yin = recover_labels(server, noisy_update, strategy="yin")
    assert label_accuracy(noisy.labels, y) > label_accuracy(yin.labels, y)


@pytest.mark.parametrize("seed", [1, 2])
def test_ilrg_finds_the_unknown_scale_of_a_clipped_update(lenet, seed):
    # known answer: clip:1 multiplies the gradient by 1/||g||; the searched factor is ||g|| and the
    # counts are exact, repeats included, where LLG (the old choice after a clip) misses some
    from gradleak.defenses import defended_update

    x, y = batch(8, seed=seed, labels=[3, 3, 3, 1, 7, 7, 0, 5])
    plain = fedsgd_update(lenet, x, y)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in plain.tensors.values()))
    assert norm > 1.5  # the clip does shrink it
    clipped = defended_update(lenet, x, y, defense="clip:1", generator=torch.Generator())
    searched = ilrg(lenet, clipped, scale="search")
    assert searched.labels.tolist() == sorted(y.tolist())
    assert searched.info["scale"] == pytest.approx(norm, rel=0.03)  # the grid's step is 1.5%
    assert searched.info["score"] < LOW_CONFIDENCE
    assert recover_labels(lenet, clipped).labels.tolist() == sorted(y.tolist())
    assert label_accuracy(recover_labels(lenet, clipped, strategy="llg").labels, y) < 1.0


def test_ilrg_scale_search_on_an_unclipped_update_keeps_it(lenet):
    # an update at its own scale: the search returns 1 and iLRG's usual counts
    x, y = batch(6, seed=3)
    update = fedsgd_update(lenet, x, y)
    result = ilrg(lenet, update, scale="search")
    assert result.info["scale"] == pytest.approx(1.0, rel=0.03)
    assert result.labels.tolist() == ilrg(lenet, update).labels.tolist() == sorted(y.tolist())
    with pytest.raises(ConfigError, match="expected 'known' or 'search'"):
        ilrg(lenet, update, scale="guess")


def test_quantized_bias_sum_is_checked_against_the_rounding_bound(lenet):
    # quantize:b moves each bias entry by at most half a step, so the sum by at most C * step / 2:
    # iLRG accepts such an update (it refused it when the bound was the float rounding's) and its
    # counts stay exact; noise, which no bound covers, is still refused
    from gradleak.defenses import defended_update
    from gradleak.labels.last_layer import check_softmax_bias

    x, y = batch(32, seed=1)  # its quantized bias sums to 0.5% of its mass: 5x the float bound
    update = defended_update(lenet, x, y, defense="quantize:8", generator=torch.Generator())
    layer = last_layer(lenet, update)
    step = float(layer.grad_bias.abs().max()) / 127
    assert layer.bias_sum_slack == pytest.approx(C * step / 2)
    assert abs(float(layer.grad_bias.sum())) <= layer.bias_sum_slack
    with pytest.raises(UpdateError, match="sum to 0"):
        check_softmax_bias("ilrg", layer.grad_bias)  # without the bound: refused
    result = recover_labels(lenet, update)
    assert result.strategy == "ilrg" and counts(result.labels) == counts(y)
    noisy = defended_update(lenet, x, y, defense="noise:1e-3", generator=torch.Generator().manual_seed(0))
    assert last_layer(lenet, noisy).bias_sum_slack == 0.0
    with pytest.raises(UpdateError, match="sum to 0"):
        ilrg(lenet, noisy)
    # a malformed record (an update file is untrusted) gives no bound, not a crash
    odd = update.replace(metadata={"defense_params": [{"name": "quantize", "bits": "8"}, 3]})
    assert last_layer(lenet, odd).bias_sum_slack == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.5, 0.9]))
def test_support_fill_keeps_kept_entries_and_meets_the_bound_and_column_sums(seed, sparsity):
    # a top-k-pruned gradient of softmax cross-entropy: the fill may change only the zeroed entries,
    # each within the smallest kept magnitude, and restores the columns' zero sums where the bound allows
    from gradleak.defenses import TopKPruneDefense
    from gradleak.labels.support import complete_support

    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, C, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.one_hot(torch.randint(0, C, (6,), generator=g), C).double()
    feats = torch.rand(6, 20, generator=g, dtype=torch.float64)
    gb, gw = (p - y).mean(0), (p - y).T @ feats / 6
    pruned = TopKPruneDefense(sparsity).transform({"b": gb, "w": gw}, generator=g)
    w, b, filled = complete_support(pruned["w"], pruned["b"])
    assert filled == int((pruned["w"] == 0).sum() + (pruned["b"] == 0).sum())
    for full, kept in ((b, pruned["b"]), (w, pruned["w"])):
        nz = kept != 0
        assert torch.equal(full[nz], kept[nz])
        tau = float(kept[nz].abs().min())
        assert bool((full[~nz].abs() <= tau * (1 + 1e-9)).all())
    # where a column's zeroed entries can make up its kept sum within the bound, the sum is zero
    for full, kept in ((b[:, None], pruned["b"][:, None]), (w, pruned["w"])):
        tau = float(kept[kept != 0].abs().min())
        reachable = kept.sum(0).abs() <= (kept == 0).sum(0) * tau * (1 - 1e-6)
        assert torch.allclose(full.sum(0)[reachable], torch.zeros(int(reachable.sum()), dtype=full.dtype),
                              atol=1e-9 * float(gb.abs().max()))


def test_pruned_updates_labels_are_counted_on_the_filled_gradient(lenet):
    # before the fill, iLRG and bias-count refused every pruned update (its bias no longer sums to zero)
    # and auto fell to LLG (docs/labels.md, "Labels under pruning"); on the bench's own batches of
    # built-in photos, untrained LeNet, N = 8, prune:0.5, the filled gradient gives exact counts
    from gradleak.bench.labels import draw
    from gradleak.data import builtin_batch
    from gradleak.defenses import defended_update

    pool = builtin_batch(512, source="photos")
    llg_exact = []
    for trial in range(3):
        idx = draw(pool.labels, 8, seed=1000 * trial + 8, unique=False)
        x, y = pool.images[idx], pool.labels[idx]
        update = defended_update(lenet, x, y, defense="prune:0.5", generator=torch.Generator().manual_seed(trial))
        layer = last_layer(lenet, update)
        assert layer.pruned and layer.for_counts() is layer.for_counts()  # filled once per layer
        filled = layer.for_counts()
        assert abs(float(filled.grad_bias.sum())) <= 1e-9 and int((filled.grad_bias == 0).sum()) == 0
        result = recover_labels(lenet, update)
        assert result.strategy in ("ilrg", "bias-count") and counts(result.labels) == counts(y), trial
        assert any("filled back" in w for w in result.warnings)
        llg_exact.append(counts(recover_labels(lenet, update, strategy="llg").labels) == counts(y))
    assert not all(llg_exact)  # what auto returned before
    plain = last_layer(lenet, defended_update(lenet, x, y, defense="none", generator=torch.Generator()))
    assert not plain.pruned and plain.for_counts() is plain
