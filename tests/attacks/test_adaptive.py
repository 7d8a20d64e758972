"""The adaptive attacker: each recorded defense simulated on the candidates, checked stage by stage."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import gradleak
from conftest import make_case
from gradleak.attacks.adaptive import DefenseModel, likelihood_distance, noise_floor, stopping_floor
from gradleak.attacks.matching import build_matcher
from gradleak.cli.main import main
from gradleak.defenses import defended_update, dpsgd_update, parse_defense, recorded_defense
from gradleak.errors import ConfigError, UpdateError
from gradleak.metrics import score_reconstruction
from gradleak.threat import fedavg_update, save_model_state, save_update, simulate_clients


def _defended(case, text, seed=0):
    server, _, x, y = case
    return defended_update(server, x, y, defense=text, generator=torch.Generator().manual_seed(seed))


def _victim(server):
    victim = copy.deepcopy(server.model)
    victim.train(server.bn_mode == "train")
    return victim


def _at_truth(case, update, adaptive="auto"):
    """The matcher's simulation of ``update`` at the true images and labels."""
    server, _, x, y = case
    matcher = build_matcher(update, _victim(server), device=torch.device("cpu"), adaptive=adaptive)
    return matcher, [t.detach() for t in matcher.simulate(x, y)]


@pytest.mark.parametrize("text", ["prune:0.9", "quantize:4", "quantize:2", "clip:0.5", "clip:0.5+prune:0.9+quantize:4",
                                  "quantize:8+clip:0.01", "prune:0.5+prune:0.9", "dpsgd:0.0+prune:0.8"])
def test_deterministic_chains_reproduce_the_upload_at_the_true_batch(lenet_case, text):
    # the attacker's forward model of a deterministic defense, fed the client's own batch, is the upload
    update = _defended(lenet_case, text)
    matcher, simulated = _at_truth(lenet_case, update)
    assert matcher.adaptive["active"] and matcher.adaptive["defense"] == parse_defense(text).spec()
    for s, t in zip(simulated, update.gradients()):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-7)


def test_quantizer_surrogate_forward_is_the_defense_and_backward_is_straight_through(lenet_case):
    update = _defended(lenet_case, "quantize:3")
    clean = [t.clone().requires_grad_(True) for t in lenet_case[1].gradients()]
    out = DefenseModel.of(update).apply(clean, update.gradients())
    for o, t in zip(out, update.gradients()):
        assert torch.equal(o.detach(), t)
    grads = torch.autograd.grad(sum(o.sum() for o in out), clean)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_prune_loss_ignores_entries_off_the_transmitted_support(lenet_case):
    update = _defended(lenet_case, "prune:0.9")
    matcher, simulated = _at_truth(lenet_case, update)
    server, _, x, y = lenet_case
    sim = [t.detach() for t in matcher.simulate(torch.rand_like(x), y)]
    base = float(matcher.distance("cosine", sim))
    # entries the client did not send: change them in the raw simulation, the loss does not move
    model = DefenseModel.of(update)
    raw = [t.detach() for t in build_matcher(update, _victim(server), device=torch.device("cpu"),
                                             adaptive="off").simulate(torch.rand_like(x), y)]
    off = [r + 5.0 * (t == 0) for r, t in zip(raw, update.gradients())]
    assert float(matcher.distance("cosine", model.apply(raw, update.gradients()))) == pytest.approx(
        float(matcher.distance("cosine", model.apply(off, update.gradients()))), rel=1e-6)
    assert base > 0
    kept = sum(int((t != 0).sum()) for t in update.gradients())
    assert sum(int((s != 0).sum()) for s in sim) <= kept


def test_prune_before_noise_uses_the_candidates_own_top_k(lenet_case):
    update = _defended(lenet_case, "prune:0.9+noise:1e-3")
    model = DefenseModel.of(update)
    assert model.likelihood == "l2"
    sim = model.apply([t.clone() for t in lenet_case[1].gradients()], update.gradients())
    for s, t in zip(sim, lenet_case[1].gradients()):
        assert int((s != 0).sum()) == max(1, -(-t.numel() // 10))


def test_sign_surrogate_agrees_with_the_uploaded_signs_and_has_a_gradient(lenet_case):
    update = _defended(lenet_case, "sign")
    clean = [t.clone().requires_grad_(True) for t in lenet_case[1].gradients()]
    out = DefenseModel.of(update).apply(clean, update.gradients())
    for o, t in zip(out, update.gradients()):
        big = o.detach().abs() > 0.5
        assert big.float().mean() > 0.5 and torch.equal(torch.sign(o.detach())[big], t[big])
        assert o.detach().abs().max() <= 1.0
    grads = torch.autograd.grad(sum((o * t).sum() for o, t in zip(out, update.gradients())), clean)
    assert all(torch.isfinite(g).all() for g in grads) and sum(bool(g.abs().sum() > 0) for g in grads) >= len(grads) // 2


def test_noise_defenses_match_with_their_likelihood(lenet_case):
    for text, kind in (("noise:1e-3", "l2"), ("laplace:1e-3", "l1"), ("clip:1+noise:1e-3", "l2"), ("noise:0", None)):
        update = _defended(lenet_case, text)
        matcher, simulated = _at_truth(lenet_case, update)
        assert matcher.likelihood == kind, text
        assert matcher.loss_name("cosine") == (f"likelihood-{kind}" if kind else "cosine")
    update = _defended(lenet_case, "noise:1e-3")
    matcher, simulated = _at_truth(lenet_case, update)
    noise = [t - s for t, s in zip(update.gradients(), simulated)]
    expected = sum(n.pow(2).sum() for n in noise) / sum(t.pow(2).sum() for t in update.gradients())
    assert float(matcher.distance("cosine", simulated)) == pytest.approx(float(expected), rel=1e-5)
    assert float(likelihood_distance("l1", update.gradients(), update.gradients())) == 0.0


def test_noise_floor_is_the_likelihood_of_the_true_batch(lenet_case):
    # the loss the true images would have: E||n||^2 / ||t||^2 concentrates for 62k entries
    server, _, x, y = lenet_case
    for text in ("noise:1e-3", "laplace:1e-3", "clip:1+noise:1e-3"):
        update = _defended(lenet_case, text)
        matcher, simulated = _at_truth(lenet_case, update)
        assert matcher.floor is not None and matcher.adaptive["noise_floor"] == matcher.floor
        assert float(matcher.distance("cosine", simulated)) == pytest.approx(matcher.floor, rel=0.03), text
        assert matcher.at_floor(matcher.floor) and not matcher.at_floor(1.01 * matcher.floor)
    # DP-SGD: the floor is still the true batch's loss, but it sits within the noise's own spread of the
    # loss of an all-zero update (1), so it is no stopping point
    update = _defended(lenet_case, "dpsgd:2.0")
    matcher, simulated = _at_truth(lenet_case, update)
    floor = noise_floor("l2", 2.0 / x.shape[0], update.gradients())
    assert float(matcher.distance("cosine", simulated)) == pytest.approx(floor, rel=0.03)
    assert 1.0 - floor < 3.0 * floor * (2.0 / sum(t.numel() for t in update.gradients())) ** 0.5
    assert matcher.floor is None and matcher.adaptive["noise_floor"] is None
    assert _at_truth(lenet_case, _defended(lenet_case, "prune:0.9"))[0].floor is None
    update = simulate_clients(server, x, y, num_clients=2, defense=parse_defense("noise:1e-3"),
                              generator=torch.Generator().manual_seed(0))
    matcher, simulated = _at_truth(lenet_case, update)
    assert float(matcher.distance("cosine", simulated)) == pytest.approx(matcher.floor, rel=0.03)


def test_adaptive_attacks_stop_at_the_noise_floor(lenet_case, one_thread):
    server, _, x, y = make_case("lenet", 1)
    update = _defended((server, None, x, y), "noise:1e-4")
    cfg = {"iterations": 300, "channels": 32}
    rec = gradleak.attacks.create("cinet", cfg).reconstruct(server, update)
    assert rec.stopped_early == "noise floor reached" and rec.iterations < 300, rec.outcome()
    assert rec.history["loss"][-1] <= rec.info["adaptive"]["noise_floor"]
    for name in ("cinet", "ig"):  # the unaware attacker knows no floor
        unaware = gradleak.attacks.create(name, {**cfg, "iterations": 20, "adaptive": "off"}
                                          if name == "cinet" else {"iterations": 20, "adaptive": "off"}).reconstruct(
            server, update)
        assert unaware.iterations == 20 and unaware.stopped_early is None


def test_a_floor_inside_the_noise_spread_is_no_stopping_point():
    # the signal's share of the loss (1 - floor) against the floor's own relative spread sqrt(2 / n)
    big = [torch.full((1000,), 1.0)]  # ||t||^2 = 1000, n = 1000
    assert stopping_floor("l2", 0.5, big) == pytest.approx(0.25)  # sigma 0.5: a quarter of the update is noise
    assert stopping_floor("l2", 0.999, big) is None  # 1 - floor = 0.002 < 3 * 0.998 * sqrt(2 / 1000) = 0.13
    assert stopping_floor("l1", 0.5, big) == pytest.approx(0.5)


def test_an_adaptive_attack_on_dp_sgd_runs_its_budget(one_thread):
    # before, a noise floor drawn above the loss of the first candidate stopped CI-Net after one
    # iteration (ResNet-18, DP-SGD, batch 4 and 8: the audit then read "not broken" off one step)
    server, _, x, y = make_case("lenet", 4)
    for seed in range(3):  # three noise draws: a floor above 1 came with about half of them
        update = dpsgd_update(server, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                              generator=torch.Generator().manual_seed(seed))
        rec = gradleak.attacks.create("cinet", {"iterations": 6, "channels": 8}).reconstruct(server, update)
        assert rec.info["adaptive"]["active"] and rec.info["adaptive"]["noise_floor"] is None
        assert rec.iterations == 6 and rec.stopped_early is None, rec.outcome()


def test_per_sample_clipping_matches_opacus_and_is_differentiable(lenet_case, one_thread):
    server, _, x, y = lenet_case
    update = dpsgd_update(server, x, y, max_grad_norm=0.05, noise_multiplier=0.0, generator=torch.Generator())
    model = DefenseModel.of(update)
    assert model.per_sample_clip == 0.05
    victim = _victim(server)
    xs = x.clone().requires_grad_(True)
    sim = model.simulate(victim, xs, y, plain=lambda: pytest.fail("DP-SGD must not use the plain gradient"))
    for s, t in zip(sim, update.gradients()):  # the update came from Opacus' GradSampleModule
        torch.testing.assert_close(s.detach(), t, rtol=1e-4, atol=1e-7)
    (gx,) = torch.autograd.grad(sum(s.pow(2).sum() for s in sim), xs)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0


def test_aggregate_clients_each_get_their_own_defense(lenet_case):
    server, _, x, y = make_case("lenet", 4)
    case = (server, None, x, y)
    update = simulate_clients(server, x, y, num_clients=2, defense=parse_defense("prune:0.8"),
                              generator=torch.Generator().manual_seed(0))
    matcher, simulated = _at_truth(case, update)
    assert matcher.adaptive["per_client"] and "prune" in matcher.mode
    for s, t in zip(simulated, update.gradients()):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-7)
    _, unaware = _at_truth(case, update, adaptive="off")
    assert any(not torch.allclose(s, t) for s, t in zip(unaware, update.gradients()))


def test_fedavg_delta_replay_includes_the_defense(lenet_case):
    server, _, x, y = lenet_case
    client = functools.partial(fedavg_update, local_steps=2, lr=0.1, batch_size=1)
    update = defended_update(server, x, y, defense="prune:0.9", generator=torch.Generator(), client=client)
    matcher, simulated = _at_truth(lenet_case, update)
    for s, t in zip(simulated, update.gradients()):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-7)


def test_without_a_defense_adaptive_and_unaware_are_the_same_attack(lenet_case, one_thread):
    server, update, _, _ = lenet_case
    runs = {}
    for name, cfg in (("cinet", {"iterations": 4, "channels": 8}), ("ig", {"iterations": 4}),
                      ("dlg", {"iterations": 2})):
        for mode in ("auto", "off"):
            rec = gradleak.attacks.create(name, {**cfg, "adaptive": mode}, seed=3).reconstruct(server, update)
            runs[name, mode] = rec
            assert rec.info["adaptive"]["active"] is False
        assert torch.equal(runs[name, "auto"].images, runs[name, "off"].images), name
    with pytest.raises(ConfigError, match="adaptive 'on'"):
        gradleak.attacks.create("cinet", {"iterations": 1, "channels": 8, "adaptive": "on"}).reconstruct(server, update)


def test_a_bad_defense_record_is_refused_never_attacked_unaware(lenet_case):
    server, update, _, _ = lenet_case
    bad = {
        "unknown": update.replace(defenses=("soteria",), metadata={"defense_params": [{"name": "soteria"}]}),
        "no record": update.replace(defenses=("prune",)),
        "no parameter": update.replace(defenses=("prune",), metadata={"defense_params": [{"name": "prune"}]}),
        "out of range": update.replace(defenses=("prune",),
                                       metadata={"defense_params": [{"name": "prune", "sparsity": 2.0}]}),
    }
    for _what, u in bad.items():
        with pytest.raises(UpdateError, match="expected"):
            build_matcher(u, _victim(server), device=torch.device("cpu"))
        with pytest.raises(UpdateError):
            recorded_defense(u)
    # the unaware attacker was asked for: it runs
    build_matcher(bad["unknown"], _victim(server), device=torch.device("cpu"), adaptive="off")


def test_cli_bad_defense_record_exits_2_with_one_line(lenet_case, tmp_path, capsys):
    server, update, _, _ = lenet_case
    save_update(update.replace(defenses=("soteria",), metadata={"defense_params": [{"name": "soteria"}]}),
                tmp_path / "u.safetensors")
    save_model_state(server.model, server.spec, tmp_path / "m.safetensors")
    rc = main(["attack", "--update", str(tmp_path / "u.safetensors"), "--model-state", str(tmp_path / "m.safetensors"),
               "--iterations", "1", "--set", "channels=8", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "soteria" in err and "expected one of" in err


def test_cli_adaptive_flag_is_recorded(lenet_case, tmp_path):
    server, _, x, y = lenet_case
    update = _defended(lenet_case, "prune:0.9")
    save_update(update, tmp_path / "u.safetensors")
    save_model_state(server.model, server.spec, tmp_path / "m.safetensors")
    for mode in ("off", "auto"):
        out = tmp_path / mode
        assert main(["attack", "--update", str(tmp_path / "u.safetensors"), "--model-state", str(tmp_path / "m.safetensors"),
                     "--iterations", "2", "--set", "channels=8", "--adaptive", mode, "--no-progress",
                     "--out", str(out)]) == 0
        import json

        assert json.loads((out / "config.json").read_text())["attack_config"]["adaptive"] == mode
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["info"]["adaptive"]["active"] is (mode == "auto")
        assert metrics["summary"]["adaptive"] is (mode == "auto")
        # the run states what its attacker knew: the defense moves CI-Net from SoK B to C
        threat = metrics["threat_model"]
        assert threat["defense_known"] is (mode == "auto") and threat["weights"] and not threat["active_manipulation"]
        assert threat["sok"] == ("C" if mode == "auto" else "B") == metrics["summary"]["threat_model"]


def test_every_attack_states_its_threat_model(capsys):
    assert main(["list", "attacks"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and line[0] != "("}
    assert set(lines) == set(gradleak.attacks.available())
    expected = {"dlg": "SoK A", "idlg": "SoK A", "ig": "SoK B", "cinet": "SoK B", "analytic": "SoK B", "gias": "SoK D"}
    for name, sok in expected.items():
        assert sok in lines[name], lines[name]
    assert "ignores defenses" in lines["analytic"] and "surrogate data" in lines["gias"]
    assert "labels joint" in lines["dlg"]


@pytest.mark.slow
def test_adaptive_cinet_breaks_pruning_that_stops_the_unaware_attacker(one_thread):
    # LeNet-sigmoid, one built-in photo, FedSGD, prune:0.9, CI-Net 300 iterations at 128 channels
    server, _, x, y = make_case("lenet", 1)
    update = _defended((server, None, x, y), "prune:0.9")
    ssim = {}
    for mode in ("off", "auto"):
        rec = gradleak.attacks.create("cinet", {"iterations": 300, "channels": 128, "adaptive": mode}).reconstruct(
            server, update)
        ssim[mode] = score_reconstruction(rec.images, x).summary["ssim_mean"]
    assert ssim["auto"] >= 0.8 and ssim["off"] <= 0.1, ssim
