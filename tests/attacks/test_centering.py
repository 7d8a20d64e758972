"""Centred matching (``center``): the update's image-independent part taken out of both sides."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import gradleak
from conftest import make_case
from gradleak.attacks.matching import build_matcher, centered, noise_mean
from gradleak.cli.main import main
from gradleak.defenses import defended_update
from gradleak.errors import ConfigError
from gradleak.metrics import score_reconstruction


def _matcher(server, update):
    victim = copy.deepcopy(server.model)
    victim.train(server.bn_mode == "train")
    return victim, build_matcher(update, victim, device=torch.device("cpu"))


def test_the_true_batch_still_matches_exactly_and_the_centre_is_the_noise_batches_mean(lenet_case):
    server, update, x, y = lenet_case
    victim, plain = _matcher(server, update)
    matcher = centered(plain, y, x.shape, 3, seed=5, victim=victim)
    at_truth = [t.detach() for t in matcher.simulate(x, y)]
    for s, t in zip(at_truth, matcher.target):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-9)
    assert float(matcher.distance("cosine", at_truth)) < 1e-6
    # the centre, recomputed by hand: three uniform-noise batches drawn as the matcher draws them
    generator = torch.Generator().manual_seed(5)
    draws = [[t.detach() for t in plain.simulate(torch.rand(tuple(x.shape), generator=generator), y)] for _ in range(3)]
    for centre_target, t, *sims in zip(matcher.target, plain.target, *draws):
        torch.testing.assert_close(centre_target, t - sum(sims) / 3, rtol=1e-5, atol=1e-9)
    assert matcher.centering["draws"] == 3 and 0 < matcher.centering["residual"] < 1
    assert "centred on 3 noise batches" in matcher.mode
    # a candidate off the batch: centring changes the cosine, and it is deterministic in the seed
    other = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    moved = matcher.distance("cosine", matcher.simulate(other, y)).detach()
    assert float(moved) != pytest.approx(float(plain.distance("cosine", plain.simulate(other, y)).detach()), rel=1e-3)
    again = centered(plain, y, x.shape, 3, seed=5, victim=victim)
    assert float(again.distance("cosine", again.simulate(other, y))) == pytest.approx(float(moved), rel=1e-5)


def test_noise_mean_is_the_mean_over_its_seeded_draws_and_needs_one():
    generator = torch.Generator().manual_seed(7)
    draws = [torch.rand(2, 3, generator=generator) for _ in range(4)]
    mean = noise_mean(lambda u: [u, 2 * u.sum(0)], (2, 3), 4, seed=7)
    torch.testing.assert_close(mean[0], sum(draws) / 4)
    torch.testing.assert_close(mean[1], sum(2 * d.sum(0) for d in draws) / 4)
    with pytest.raises(ConfigError, match="at least one noise batch"):
        noise_mean(lambda u: [u], (2, 3), 0, seed=7)


def test_a_likelihood_loss_is_left_as_it_is_and_says_so(lenet_case):
    # the noise defenses' loss is a distance of the two sides' difference, which a common centre leaves
    # unchanged; its floor is in the uncentred target's units, so the matcher is not centred at all
    server, _, x, y = lenet_case
    update = defended_update(server, x, y, defense="noise:1e-3", generator=torch.Generator().manual_seed(0))
    victim, plain = _matcher(server, update)
    matcher = centered(plain, y, x.shape, 2, seed=0, victim=victim)
    other = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    assert matcher.likelihood == "l2" and matcher.floor == plain.floor and matcher.target is plain.target
    assert matcher.centering["draws"] == 0 and "not applied" in matcher.centering["note"]
    assert float(matcher.distance("cosine", matcher.simulate(other, y))) == pytest.approx(
        float(plain.distance("cosine", plain.simulate(other, y))), rel=1e-5)


def test_the_noise_draws_leave_the_victims_batchnorm_statistics_alone():
    server, update, x, y = make_case("resnet18", 2, activation="relu")
    victim, plain = _matcher(server, update)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    centered(plain, y, x.shape, 2, seed=0, victim=victim)
    after = victim.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("draws", "labels", "match"), [
    (0, 2, "expected the number of noise batches to average"),
    (2, 1, "expected 2 labels"),
])
def test_bad_centring_is_refused_naming_what_was_expected(lenet_case, draws, labels, match):
    server, update, x, y = lenet_case
    victim, plain = _matcher(server, update)
    with pytest.raises(ConfigError, match=match):
        centered(plain, y[:labels], x.shape, draws, seed=0, victim=victim)


def test_the_option_is_validated_recorded_and_refused_with_joint_labels(lenet_case, tmp_path, capsys, one_thread):
    server, update, x, y = lenet_case
    with pytest.raises(ConfigError, match="center"):
        gradleak.attacks.create("ig", {"center": -1})
    with pytest.raises(ConfigError, match="optimises its labels jointly"):
        gradleak.attacks.create("dlg", {"center": 2, "iterations": 2}).reconstruct(server, update)
    rec = gradleak.attacks.create("cinet", {"center": 2, "iterations": 3, "channels": 16}).reconstruct(server, update)
    assert rec.info["config"]["center"] == 2 and rec.info["centering"]["draws"] == 2
    assert "centred on 2 noise batches" in rec.matching
    out = tmp_path / "compare"
    assert main(["compare", "--model", "lenet", "--batch-size", "1", "--attacks", "ig", "--iterations", "3",
                 "--set", "ig.center=2", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "ig" / "config.json").read_text())["attack_config"]["center"] == 2
    assert json.loads((out / "ig" / "metrics.json").read_text())["info"]["centering"]["draws"] == 2
    main(["list", "options"])
    assert "center=0" in capsys.readouterr().out


@pytest.mark.slow
def test_centring_breaks_a_flat_victim_the_plain_attack_does_not(one_thread):
    # ResNet-18-sigmoid, BatchNorm in eval mode on the untrained statistics: the update barely depends on the
    # images (mean layer cosine 0.9992 at pure noise). Measured, IG with the per-layer cosine, 100 iterations, one
    # thread: 0.115 plain, 0.379 centred on 16 noise batches (300 iterations, two threads: 0.44; CI-Net 0.54)
    server, update, x, y = make_case("resnet18", 1, bn_mode="eval")
    scores = {}
    for center in (0, 16):
        rec = gradleak.attacks.create("ig", {"iterations": 100, "loss": "cosine-layer", "center": center}).reconstruct(
            server, update)
        scores[center] = score_reconstruction(rec.images, x, with_lpips=False).summary["ssim_mean"]
    assert scores[16] >= 0.28 and scores[16] > scores[0] + 0.15, scores
