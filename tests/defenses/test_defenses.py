"""Defenses: each transform's defining property, composition, strings, and DP-SGD against Opacus."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from gradleak.defenses import (
    DPSGDDefense,
    GaussianNoiseDefense,
    IdentityDefense,
    LaplaceNoiseDefense,
    NormClipDefense,
    QuantizeDefense,
    SignDefense,
    TopKPruneDefense,
    available,
    compose,
    defended_update,
    dpsgd_update,
    global_norm,
    kept_entries,
    parse_defense,
    parse_defenses,
    per_sample_gradients,
    quantization_scale,
    rdp_epsilon,
)
from gradleak.errors import ConfigError, UnknownNameError, UnsupportedModelError
from gradleak.functional import model_gradients
from gradleak.models import build_model
from gradleak.threat import aggregate_updates, fedavg_update, fedsgd_update, load_update, save_update, simulate_clients
from gradleak.types import ClientUpdate, ModelSpec, ServerState


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _update(shapes: list[tuple[int, ...]], seed: int = 0, scale: float = 1.0) -> ClientUpdate:
    g = _gen(seed)
    return ClientUpdate(tensors={f"p{k}": scale * torch.randn(s, generator=g) for k, s in enumerate(shapes)},
                        num_samples=4)


def _server(name: str = "linear", *, size: int = 8, bn_mode: str = "train", width: int | None = None) -> ServerState:
    spec = ModelSpec(name, image_size=size, bn_mode=bn_mode, width=width)
    return ServerState.from_spec(build_model(spec, seed=0), spec)


def _batch(n: int, *, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


shapes_st = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)).map(tuple), min_size=1, max_size=4)


def test_registry_lists_every_defense() -> None:
    assert available() == ["clip", "dpsgd", "laplace", "noise", "none", "prune", "quantize", "sign"]


# --- clipping -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), max_norm=st.floats(1e-3, 1e2))
def test_clip_bounds_the_norm_and_keeps_the_direction(shapes, seed, scale, max_norm) -> None:
    update = _update(shapes, seed, scale)
    before = float(global_norm(update.tensors))
    out = NormClipDefense(max_norm=max_norm)(update, generator=_gen())
    after = float(global_norm(out.tensors))
    assert after <= max_norm * (1 + 1e-5)
    assert after == pytest.approx(min(before, max_norm), rel=1e-5)
    flat_in = torch.cat([t.reshape(-1) for t in update.gradients()])
    flat_out = torch.cat([t.reshape(-1) for t in out.gradients()])
    assert F.cosine_similarity(flat_in, flat_out, dim=0) == pytest.approx(1.0, abs=1e-5)


# --- noise --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1e-3, 0.1, 3.0])
def test_gaussian_noise_has_the_configured_std(sigma: float) -> None:
    zero = ClientUpdate(tensors={"w": torch.zeros(300, 500), "b": torch.zeros(500)})
    out = GaussianNoiseDefense(sigma=sigma)(zero, generator=_gen(1))
    noise = torch.cat([t.reshape(-1) for t in out.gradients()]).double()
    n = noise.numel()  # 150,500 draws: the sample std's relative error is ~1/sqrt(2n) = 0.18%
    assert noise.std().item() == pytest.approx(sigma, rel=0.015)
    assert abs(noise.mean().item()) < 5 * sigma / math.sqrt(n)
    assert all(t.abs().sum() == 0 for t in zero.gradients())  # the input is not modified


def test_laplace_noise_has_std_sqrt2_times_scale() -> None:
    zero = ClientUpdate(tensors={"w": torch.zeros(400, 500)})
    noise = LaplaceNoiseDefense(scale=0.2)(zero, generator=_gen(2)).tensors["w"].double()
    assert noise.std().item() == pytest.approx(math.sqrt(2) * 0.2, rel=0.02)
    assert noise.abs().mean().item() == pytest.approx(0.2, rel=0.02)  # E|X| = b for Laplace(0, b)


def test_noise_is_reproducible_from_the_generator_and_zero_sigma_is_identity() -> None:
    update = _update([(4, 5)])
    a = GaussianNoiseDefense(sigma=0.5)(update, generator=_gen(7))
    b = GaussianNoiseDefense(sigma=0.5)(update, generator=_gen(7))
    c = GaussianNoiseDefense(sigma=0.5)(update, generator=_gen(8))
    assert torch.equal(a.tensors["p0"], b.tensors["p0"]) and not torch.equal(a.tensors["p0"], c.tensors["p0"])
    assert torch.equal(GaussianNoiseDefense(sigma=0.0)(update, generator=_gen()).tensors["p0"], update.tensors["p0"])
    with pytest.raises(ConfigError, match="expected a torch.Generator, got NoneType"):
        GaussianNoiseDefense(sigma=0.5)(update, generator=None)  # type: ignore[arg-type]


# --- pruning, quantization, sign -----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 10_000), sparsity=st.floats(0.0, 0.999))
def test_prune_keeps_exactly_the_k_largest_entries(shapes, seed, sparsity) -> None:
    update = _update(shapes, seed)
    out = TopKPruneDefense(sparsity=sparsity)(update, generator=_gen())
    for name, t in update.tensors.items():
        q = out.tensors[name]
        k = kept_entries(t.numel(), sparsity)
        assert k == max(1, math.ceil(round((1 - sparsity) * t.numel(), 9)))
        kept = q != 0
        assert int(kept.sum()) == k  # randn entries are non-zero almost surely
        assert torch.equal(q[kept], t[kept])
        if k < t.numel():
            assert t[kept].abs().min() >= t[~kept].abs().max()


def test_prune_zero_sparsity_keeps_everything_and_ninety_percent_keeps_a_tenth() -> None:
    t = torch.randn(10, 10, generator=_gen())
    update = ClientUpdate(tensors={"w": t})
    assert torch.equal(TopKPruneDefense(sparsity=0.0)(update, generator=_gen()).tensors["w"], t)
    assert int((TopKPruneDefense(sparsity=0.9)(update, generator=_gen()).tensors["w"] != 0).sum()) == 10
    assert int((TopKPruneDefense(sparsity=0.7)(update, generator=_gen()).tensors["w"] != 0).sum()) == 30


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 10_000), bits=st.integers(2, 16), scale=st.floats(1e-4, 1e4))
def test_quantize_maps_onto_the_signed_grid_within_half_a_step(shapes, seed, bits, scale) -> None:
    update = _update(shapes, seed, scale)
    out = QuantizeDefense(bits=bits)(update, generator=_gen())
    top = 2 ** (bits - 1) - 1
    for name, t in update.tensors.items():
        q = out.tensors[name]
        step = quantization_scale(t, bits)
        levels = q / step
        # float32 keeps ~7 digits: a level near 2**15 carries an absolute error of ~top * 1.2e-7
        assert torch.allclose(levels, levels.round(), atol=1e-3 + top * 2.4e-7)
        assert levels.round().abs().max() <= top
        assert q.unique().numel() <= 2 ** bits - 1
        # half a step, plus float32 rounding of values as large as max|t|
        assert (q - t).abs().max() <= step / 2 * (1 + 1e-4) + 4 * torch.finfo(t.dtype).eps * t.abs().max() + 1e-12
        i = t.abs().argmax()
        assert q.reshape(-1)[i] == pytest.approx(t.reshape(-1)[i].item(), rel=1e-5)


def test_two_bit_quantization_has_three_levels_and_sign_has_signs() -> None:
    t = torch.tensor([-1.0, -0.6, -0.4, 0.0, 0.2, 0.51, 1.0])
    update = ClientUpdate(tensors={"w": t})
    q = QuantizeDefense(bits=2)(update, generator=_gen()).tensors["w"]
    assert q.tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    s = SignDefense()(update, generator=_gen()).tensors["w"]
    assert s.tolist() == [-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]


# --- records and composition ---------------------------------------------------------------------

def test_defenses_are_recorded_in_order_and_compose_applies_them_in_order() -> None:
    update = _update([(20, 30)], scale=5.0)
    clip_then_noise = compose(NormClipDefense(max_norm=1.0), GaussianNoiseDefense(sigma=0.01))
    out = clip_then_noise(update, generator=_gen(3))
    by_hand = GaussianNoiseDefense(sigma=0.01)(NormClipDefense(max_norm=1.0)(update, generator=_gen(3)),
                                               generator=_gen(3))
    assert torch.equal(out.tensors["p0"], by_hand.tensors["p0"])
    assert out.defenses == ("clip", "noise")
    assert out.metadata["defense_params"] == [{"name": "clip", "max_norm": 1.0}, {"name": "noise", "sigma": 0.01}]
    assert update.defenses == () and "defense_params" not in update.metadata
    noise_then_clip = compose(GaussianNoiseDefense(sigma=0.01), NormClipDefense(max_norm=1.0))
    assert float(global_norm(noise_then_clip(update, generator=_gen(3)).tensors)) <= 1.0 + 1e-5
    assert compose().spec() == "none" and compose(IdentityDefense(), SignDefense()) == SignDefense()
    assert IdentityDefense()(update, generator=_gen()) is update
    with pytest.raises(ConfigError, match="expected Defense objects"):
        compose(SignDefense(), "noise:1")  # type: ignore[arg-type]


# --- strings -------------------------------------------------------------------------------------

def test_parse_defenses_builds_the_audit_grid() -> None:
    grid = parse_defenses("none, noise:1e-3,prune:0.9,dpsgd:1.0,clip:2+noise:sigma=0.1,quantize:8,sign,laplace:0.5")
    assert grid[:4] == [IdentityDefense(), GaussianNoiseDefense(sigma=1e-3), TopKPruneDefense(sparsity=0.9),
                        DPSGDDefense(noise_multiplier=1.0)]
    assert grid[4].parts() == [NormClipDefense(max_norm=2.0), GaussianNoiseDefense(sigma=0.1)]
    assert grid[5:] == [QuantizeDefense(bits=8), SignDefense(), LaplaceNoiseDefense(scale=0.5)]
    assert parse_defense("noise:1e+1+prune:0.5").parts() == [GaussianNoiseDefense(sigma=10.0),
                                                            TopKPruneDefense(sparsity=0.5)]
    assert parse_defense("dpsgd:0.5:2:delta=1e-6:dataset_size=100") == DPSGDDefense(
        noise_multiplier=0.5, max_grad_norm=2.0, delta=1e-6, dataset_size=100)


@settings(max_examples=40, deadline=None)
@given(sigma=st.floats(0, 10), sparsity=st.floats(0, 0.99), bits=st.integers(2, 16), norm=st.floats(1e-3, 1e3))
def test_spec_strings_parse_back_to_equal_defenses(sigma, sparsity, bits, norm) -> None:
    for d in (GaussianNoiseDefense(sigma=sigma), TopKPruneDefense(sparsity=sparsity), QuantizeDefense(bits=bits),
              compose(NormClipDefense(max_norm=norm), GaussianNoiseDefense(sigma=sigma)),
              DPSGDDefense(noise_multiplier=sigma, max_grad_norm=norm, dataset_size=50)):
        assert parse_defense(d.spec()) == d


@pytest.mark.parametrize("text,match", [
    ("", "expected a string"),
    ("noise", "expected a value for sigma"),
    ("noise:abc", "sigma: expected a number, got 'abc'"),
    ("noise:-1e-3", r"sigma: expected a number in \[0.0, inf\), got -0.001"),
    ("noise:nan", "sigma: expected a number"),
    ("prune:1.0", r"sparsity: expected a number in \[0.0, 1.0\), got 1.0"),
    ("prune:-0.1", r"sparsity: expected a number in \[0.0, 1.0\), got -0.1"),
    ("clip:0", r"max_norm: expected a number in \(0.0, inf\)"),
    ("quantize:1", r"bits: expected an integer in \[2, 16\], got 1"),
    ("quantize:3.5", "bits: expected an integer, got '3.5'"),
    ("dpsgd:1:1:delta=2", r"delta: expected a number in \(0.0, 1.0\)"),
    ("noise:1:2", r"expected at most 1 value\(s\) \(sigma\), got 2"),
    ("noise:bogus=1", r"expected parameters among \(sigma\), got 'bogus'"),
    ("noise:sigma=", "sigma: expected a value"),
    ("noise:1:sigma=2", "expected sigma once"),
    ("sign:1", "expected at most 0 value"),
    ("fog:1", "unknown defense 'fog'; expected one of: clip, dpsgd"),
    ("clip:1+", r"expected defenses on both sides of '\+'"),
    ("none+noise:1", "expected 'none' alone"),
    ("+sign", r"expected defenses on both sides of '\+'"),
    ("sign++sign", r"expected defenses on both sides of '\+'"),
    (":1", "expected a name"),
    ("noise:1,prune:0.5", "use parse_defenses"),
])
def test_bad_defense_strings_raise_config_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_defense(text)


def test_bad_defense_lists_raise_config_errors() -> None:
    for text in ("", "noise:1,,prune:0.5", "noise:1,", "none,prune:1.5"):
        with pytest.raises(ConfigError, match="expected"):
            parse_defenses(text)
    with pytest.raises(UnknownNameError):
        parse_defenses("none,gauss:1")


# --- DP-SGD --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,dataset_size,rounds,delta", [(1.0, None, 1, 1e-5), (0.7, 64, 10, 1e-5),
                                                            (2.0, 1000, 100, 1e-6)])
def test_dpsgd_epsilon_matches_opacus_rdp_accountant(sigma, dataset_size, rounds, delta) -> None:
    server = _server()
    x, y = _batch(8)
    update = dpsgd_update(server, x, y, max_grad_norm=1.0, noise_multiplier=sigma, generator=_gen(),
                          delta=delta, dataset_size=dataset_size, rounds=rounds)
    accountant = RDPAccountant()
    q = 8 / dataset_size if dataset_size else 1.0
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    expected = accountant.get_epsilon(delta=delta)
    assert update.metadata["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert update.metadata["privacy"] == {"epsilon": update.metadata["privacy"]["epsilon"], "delta": delta,
                                          "accountant": "rdp", "sample_rate": q, "steps": rounds}
    assert update.defenses == ("dpsgd",) and update.kind == "gradient" and update.num_samples == 8
    assert math.isfinite(expected) and expected > 0


def test_dpsgd_without_noise_is_the_mean_of_per_sample_clipped_gradients() -> None:
    server = _server("lenet", size=16)
    x, y = _batch(5, size=16)
    clip = 0.05  # small enough that most samples are clipped
    update = dpsgd_update(server, x, y, max_grad_norm=clip, noise_multiplier=0.0, generator=_gen())
    assert update.metadata["privacy"]["epsilon"] is None
    total = None
    clipped = 0
    for i in range(5):
        g = model_gradients(copy.deepcopy(server.model), x[i:i + 1], y[i:i + 1])
        norm = torch.sqrt(torch.stack([t.pow(2).sum() for t in g]).sum())
        clipped += int(norm > clip)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [factor * t for t in g] if total is None else [a + factor * t for a, t in zip(total, g)]
    assert clipped >= 3
    assert total is not None
    for got, want in zip(update.gradients(), total):
        torch.testing.assert_close(got, want / 5, atol=1e-7, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dpsgd_equals_opacus_dpoptimizer_draw_for_draw() -> None:
    server = _server("lenet", size=16)
    x, y = _batch(6, size=16)
    ours = dpsgd_update(server, x, y, max_grad_norm=0.5, noise_multiplier=1.3, generator=_gen(5))
    model = copy.deepcopy(server.model)
    gsm = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=1.3, max_grad_norm=0.5,
                            expected_batch_size=6, generator=_gen(5))
    F.cross_entropy(gsm(x), y).backward()
    optimizer.pre_step()
    for got, p in zip(ours.gradients(), model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-5)


def test_dpsgd_noise_has_std_sigma_times_clip_over_batch_size() -> None:
    server = _server("linear", size=16)  # 7,690 parameters
    x, y = _batch(4, size=16)
    quiet = dpsgd_update(server, x, y, max_grad_norm=2.0, noise_multiplier=0.0, generator=_gen())
    noisy = dpsgd_update(server, x, y, max_grad_norm=2.0, noise_multiplier=0.8, generator=_gen(9))
    noise = torch.cat([(a - b).reshape(-1) for a, b in zip(noisy.gradients(), quiet.gradients())])
    assert noise.std().item() == pytest.approx(0.8 * 2.0 / 4, rel=0.05)


def test_per_sample_gradients_agree_across_methods_and_handle_eval_batchnorm() -> None:
    lenet = _server("lenet", size=16).model
    x, y = _batch(3, size=16)
    for a, b in zip(per_sample_gradients(lenet, x, y, method="opacus"),
                    per_sample_gradients(lenet, x, y, method="functorch")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    server = _server("convnet", size=16, width=4, bn_mode="eval")
    samples = per_sample_gradients(server.model, x, y)
    for i in range(3):
        for a, b in zip(samples, model_gradients(server.model, x[i:i + 1], y[i:i + 1])):
            torch.testing.assert_close(a[i], b, atol=1e-6, rtol=1e-5)
    update = dpsgd_update(server, x, y, max_grad_norm=1.0, noise_multiplier=1.0, generator=_gen())
    assert update.defenses == ("dpsgd",)
    with pytest.raises(ConfigError, match="expected a model without buffers"):
        per_sample_gradients(server.model, x, y, method="opacus")


def test_dpsgd_refuses_train_mode_batchnorm_and_bad_parameters() -> None:
    server = _server("convnet", size=16, width=4, bn_mode="train")
    x, y = _batch(3, size=16)
    with pytest.raises(UnsupportedModelError, match="expected no BatchNorm in train mode"):
        dpsgd_update(server, x, y, max_grad_norm=1.0, noise_multiplier=1.0, generator=_gen())
    lin = _server()
    xs, ys = _batch(3)
    with pytest.raises(ConfigError, match="noise_multiplier: expected a number"):
        dpsgd_update(lin, xs, ys, max_grad_norm=1.0, noise_multiplier=-1.0, generator=_gen())
    with pytest.raises(ConfigError, match="dataset_size: expected at least the batch size 3, got 2"):
        dpsgd_update(lin, xs, ys, max_grad_norm=1.0, noise_multiplier=1.0, generator=_gen(), dataset_size=2)


def test_dpsgd_is_client_side_and_defended_update_applies_it_first() -> None:
    server = _server()
    x, y = _batch(4)
    finished = ClientUpdate(tensors={"w": torch.zeros(3)})
    with pytest.raises(ConfigError, match="expected the client's private batch"):
        DPSGDDefense(noise_multiplier=1.0)(finished, generator=_gen())
    with pytest.raises(ConfigError, match="client-side defense 'dpsgd' at position 1"):
        parse_defense("clip:1+dpsgd:1")(finished, generator=_gen())
    with pytest.raises(ConfigError, match="expected the client-side defense 'dpsgd' first"):
        defended_update(server, x, y, defense="clip:1+dpsgd:1", generator=_gen())
    with pytest.raises(ConfigError, match="expected client=None"):
        defended_update(server, x, y, defense="dpsgd:1", generator=_gen(),
                        client=lambda s, im, lab: fedavg_update(s, im, lab, lr=0.1, batch_size=2))
    out = defended_update(server, x, y, defense="dpsgd:1.0+quantize:4", generator=_gen())
    assert out.defenses == ("dpsgd", "quantize")
    assert [p["name"] for p in out.metadata["defense_params"]] == ["dpsgd", "quantize"]
    assert out.metadata["privacy"]["epsilon"] > 0


def test_defended_fedavg_update_round_trips_through_a_file(tmp_path) -> None:
    server = _server()
    x, y = _batch(4)
    client = functools.partial(fedavg_update, local_steps=2, lr=0.1, batch_size=2)
    out = defended_update(server, x, y, defense="clip:0.01+noise:1e-4", generator=_gen(), client=client)
    assert out.protocol == "fedavg" and out.defenses == ("clip", "noise")
    assert float(global_norm(out.tensors)) == pytest.approx(0.01, rel=0.2)
    save_update(out, tmp_path / "u.safetensors")
    back = load_update(tmp_path / "u.safetensors", model=server.model)
    assert back.defenses == out.defenses and back.metadata == out.metadata
    quiet = dpsgd_update(server, x, y, max_grad_norm=1.0, noise_multiplier=0.0, generator=_gen())
    save_update(quiet, tmp_path / "q.safetensors")
    assert load_update(tmp_path / "q.safetensors").metadata["privacy"]["epsilon"] is None



def test_an_aggregate_of_dpsgd_clients_reports_the_weakest_clients_guarantee() -> None:
    server = _server()
    x, y = _batch(6)
    g = _gen(4)
    strong = dpsgd_update(server, x[:3], y[:3], max_grad_norm=1.0, noise_multiplier=2.0, generator=g)
    weak = dpsgd_update(server, x[3:], y[3:], max_grad_norm=1.0, noise_multiplier=0.6, generator=g)
    agg = aggregate_updates([strong, weak])
    assert weak.metadata["privacy"]["epsilon"] > strong.metadata["privacy"]["epsilon"]
    assert agg.metadata["privacy"]["epsilon"] == weak.metadata["privacy"]["epsilon"]
    assert agg.defenses == ("dpsgd",) and agg.num_clients == 2
    assert "privacy" not in aggregate_updates([strong, fedsgd_update(server, x[:3], y[:3])]).metadata
    client = functools.partial(dpsgd_update, max_grad_norm=1.0, noise_multiplier=1.0, generator=g)
    simulated = simulate_clients(server, x, y, num_clients=3, client=client)
    assert simulated.metadata["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(
        noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5))


def test_dpsgd_per_sample_gradients_on_an_eval_mode_model_without_batchnorm() -> None:
    """Opacus ignores eval-mode modules; the torch.func path must take over and agree with a loop."""
    from gradleak.defenses.dpsgd import per_sample_gradients
    from gradleak.models import build_model
    from gradleak.types import ModelSpec

    model = build_model(ModelSpec(name="lenet", bn_mode="eval"))
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 4, 4])
    got = per_sample_gradients(model, x, y)
    for i in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-6)
