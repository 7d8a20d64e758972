"""Client protocols: FedAvg local steps, their differentiable replay, and server aggregation."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.errors import ConfigError, UpdateError
from gradleak.functional import model_gradients
from gradleak.models import build_model
from gradleak.threat import (
    aggregate_updates,
    fedavg_update,
    fedsgd_update,
    load_update,
    local_schedule,
    save_update,
    schedule_of,
    simulate_clients,
    simulate_local_delta,
    simulate_update,
)
from gradleak.types import ClientUpdate, ModelSpec, ServerState, UpdateKind


def _server(name: str = "lenet", *, size: int = 16, bn_mode: str = "train", width: int | None = None,
            seed: int = 0) -> ServerState:
    spec = ModelSpec(name, image_size=size, bn_mode=bn_mode, width=width)
    return ServerState.from_spec(build_model(spec, seed=seed), spec)


def _batch(n: int, *, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _sgd_by_hand(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[list[int]],
                 lr: float) -> list[torch.Tensor]:
    """theta_S - theta_0 with explicit p <- p - lr * grad, one mini-batch after another."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    for b in batches:
        grads = model_gradients(model, x[b], y[b])
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return [p.detach() - s for p, s in zip(params, start, strict=True)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], *, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, atol=atol, rtol=rtol)


# --- schedule -----------------------------------------------------------------------------------

def test_schedule_without_shuffle_is_data_order_with_remainder_batches() -> None:
    assert local_schedule(6, batch_size=4, local_steps=3, shuffle_seed=None) == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3]]
    assert local_schedule(3, batch_size=8, epochs=2, shuffle_seed=None) == [[0, 1, 2], [0, 1, 2]]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), b=st.integers(1, 12), epochs=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_schedule_visits_every_sample_once_per_epoch(n: int, b: int, epochs: int, seed: int) -> None:
    schedule = local_schedule(n, batch_size=b, epochs=epochs, shuffle_seed=seed)
    per_epoch = -(-n // b)
    assert len(schedule) == per_epoch * epochs
    for e in range(epochs):
        flat = [i for batch in schedule[e * per_epoch:(e + 1) * per_epoch] for i in batch]
        assert sorted(flat) == list(range(n))
    assert all(1 <= len(batch) <= b for batch in schedule)
    assert local_schedule(n, batch_size=b, epochs=epochs, shuffle_seed=seed) == schedule  # deterministic


@pytest.mark.parametrize("kwargs", [dict(), dict(local_steps=2, epochs=1), dict(local_steps=0),
                                    dict(epochs=-1), dict(local_steps=2.5)])
def test_schedule_rejects_bad_step_counts(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="expected"):
        local_schedule(8, batch_size=2, **kwargs)


# --- FedAvg -------------------------------------------------------------------------------------

def test_fedavg_equals_plain_sgd_by_hand() -> None:
    server = _server("lenet")
    x, y = _batch(6)
    update = fedavg_update(server, x, y, local_steps=3, lr=0.5, batch_size=4, shuffle_seed=None)
    expected = _sgd_by_hand(server.model, x, y, [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3]], 0.5)
    _close(update.gradients(), expected)
    assert update.kind == "delta" and update.protocol == "fedavg"
    assert (update.num_samples, update.local_steps, update.local_lr, update.local_batch_size) == (6, 3, 0.5, 4)
    assert update.metadata["schedule"] == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3]]
    assert update.metadata["num_samples"] == 6 and update.metadata["local_steps"] == 3
    # three steps are not one: the delta is not -lr * (gradient of the first mini-batch)
    one = model_gradients(copy.deepcopy(server.model), x[:4], y[:4])
    assert not torch.allclose(update.gradients()[-1], -0.5 * one[-1], atol=1e-4)


def test_fedavg_shuffled_epochs_follow_the_recorded_schedule() -> None:
    server = _server("lenet")
    x, y = _batch(5)
    update = fedavg_update(server, x, y, epochs=2, lr=0.3, batch_size=2, shuffle_seed=7)
    schedule = update.metadata["schedule"]
    assert update.local_steps == 6 and len(schedule) == 6 and update.metadata["epochs"] == 2
    assert schedule != local_schedule(5, batch_size=2, epochs=2, shuffle_seed=None)
    _close(update.gradients(), _sgd_by_hand(server.model, x, y, schedule, 0.3))


def test_fedavg_leaves_the_server_model_untouched() -> None:
    server = _server("convnet", width=4, bn_mode="train")
    before = copy.deepcopy(server.model.state_dict())
    x, y = _batch(4)
    fedavg_update(server, x, y, local_steps=2, lr=0.1, batch_size=2)
    for k, v in server.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
def test_fedavg_rejects_bad_learning_rates(lr: float) -> None:
    server = _server("linear", size=8)
    x, y = _batch(2, size=8)
    with pytest.raises(ConfigError, match="learning rate: expected a positive"):
        fedavg_update(server, x, y, local_steps=1, lr=lr, batch_size=1)


def test_fedavg_update_survives_a_file_round_trip(tmp_path) -> None:
    server = _server("linear", size=8)
    x, y = _batch(4, size=8)
    update = fedavg_update(server, x, y, local_steps=3, lr=0.1, batch_size=3)
    save_update(update, tmp_path / "u.safetensors")
    back = load_update(tmp_path / "u.safetensors", model=server.model)
    assert back.metadata == update.metadata and back.local_lr == 0.1 and back.local_steps == 3
    assert schedule_of(back) == update.metadata["schedule"]
    _close(back.gradients(), update.gradients(), atol=0, rtol=0)


# --- differentiable replay ----------------------------------------------------------------------

@pytest.mark.parametrize("name,bn_mode", [("lenet", "train"), ("convnet", "train"), ("convnet", "eval")])
def test_simulate_local_delta_equals_fedavg_update(name: str, bn_mode: str) -> None:
    server = _server(name, width=4, bn_mode=bn_mode)
    x, y = _batch(6)
    update = fedavg_update(server, x, y, local_steps=4, lr=0.2, batch_size=4, shuffle_seed=3)
    model = copy.deepcopy(server.model).train(bn_mode == "train")
    state = copy.deepcopy(model.state_dict())
    for create_graph in (True, False):
        sim = simulate_local_delta(model, x, y, local_steps=4, lr=0.2, batch_size=4, shuffle_seed=3,
                                   create_graph=create_graph)
        _close([s.detach() for s in sim], update.gradients())
    for k, v in model.state_dict().items():  # parameters and BN buffers untouched
        assert torch.equal(v, state[k]), k


def test_simulate_local_delta_is_differentiable_wrt_images() -> None:
    spec = ModelSpec("mlp", image_size=8, width=6, activation="sigmoid")
    model = build_model(spec, seed=0).double()
    x0, y = _batch(3, size=8)
    x = x0.double().requires_grad_(True)

    def delta_of(images: torch.Tensor) -> torch.Tensor:
        out = simulate_local_delta(model, images, y, local_steps=3, lr=0.5, batch_size=2)
        return torch.cat([t.reshape(-1) for t in out])

    # fast mode compares u^T J v with finite differences along random directions (Jacobian of 3 steps)
    assert torch.autograd.gradcheck(delta_of, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    grad, = torch.autograd.grad(delta_of(x).pow(2).sum(), x)
    assert grad.abs().sum() > 0
    # without the graph, the result does not depend on the images
    assert not simulate_local_delta(model, x, y, local_steps=2, lr=0.5, batch_size=2,
                                    create_graph=False)[0].requires_grad


def test_simulate_local_delta_rejects_a_schedule_of_the_wrong_length() -> None:
    model = _server("linear", size=8).model
    x, y = _batch(4, size=8)
    with pytest.raises(ConfigError, match="expected 3 mini-batches"):
        simulate_local_delta(model, x, y, local_steps=3, lr=0.1, batch_size=2, schedule=[[0, 1]])
    with pytest.raises(ConfigError, match="indices in"):
        simulate_local_delta(model, x, y, local_steps=1, lr=0.1, batch_size=2, schedule=[[0, 9]])


def test_simulate_update_replays_an_epoch_based_update() -> None:
    server = _server("lenet")
    x, y = _batch(5)
    update = fedavg_update(server, x, y, epochs=2, lr=0.3, batch_size=2, shuffle_seed=11)
    model = copy.deepcopy(server.model)
    _close([t.detach() for t in simulate_update(update, model=model, images=x, labels=y)], update.gradients())
    with pytest.raises(UpdateError, match="expected 5 candidate images"):
        simulate_update(update, model=model, images=x[:4], labels=y[:4])


# --- aggregation --------------------------------------------------------------------------------

def _random_update(n: int, seed: int, kind: UpdateKind = "gradient") -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    return ClientUpdate(tensors={"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
                        kind=kind, num_samples=n, protocol="fedsgd" if kind == "gradient" else "fedavg",
                        local_lr=None if kind == "gradient" else 0.1)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_aggregate_is_the_sample_weighted_and_the_plain_mean(sizes: list[int], seed: int) -> None:
    updates = [_random_update(n, seed + k) for k, n in enumerate(sizes)]
    agg = aggregate_updates(updates)
    total = sum(sizes)
    for name in ("w", "b"):
        expected = sum(n * u.tensors[name] for n, u in zip(sizes, updates)) / total
        torch.testing.assert_close(agg.tensors[name], expected)
        plain = torch.stack([u.tensors[name] for u in updates]).mean(0)
        torch.testing.assert_close(aggregate_updates(updates, weighting="uniform").tensors[name], plain)
    assert agg.protocol == "aggregate" and agg.num_samples == total and agg.num_clients == len(sizes)
    assert [c["num_samples"] for c in agg.metadata["clients"]] == sizes
    assert sum(c["weight"] for c in agg.metadata["clients"]) == pytest.approx(1.0)


def test_aggregate_of_fedsgd_clients_is_the_gradient_of_the_whole_batch() -> None:
    server = _server("lenet")
    x, y = _batch(7)
    agg = simulate_clients(server, x, y, num_clients=3)  # shares of 3, 2, 2
    whole = fedsgd_update(server, x, y)
    _close(agg.gradients(), whole.gradients())
    assert [c["num_samples"] for c in agg.metadata["clients"]] == [3, 2, 2] and agg.num_clients == 3


def test_aggregate_of_fedavg_clients_is_replayed_by_simulate_update() -> None:
    server = _server("lenet")
    x, y = _batch(8)
    client = functools.partial(fedavg_update, local_steps=2, lr=0.2, batch_size=3)
    agg = simulate_clients(server, x, y, num_clients=2, client=client)
    assert agg.kind == "delta" and agg.local_steps == 2 and agg.local_lr == 0.2 and agg.local_batch_size == 3
    by_hand = aggregate_updates([client(server, x[:4], y[:4]), client(server, x[4:], y[4:])])
    _close(agg.gradients(), by_hand.gradients())
    sim = simulate_update(agg, model=copy.deepcopy(server.model), images=x, labels=y, create_graph=False)
    _close(sim, agg.gradients())


def test_simulate_clients_applies_the_defense_of_each_client() -> None:
    server = _server("linear", size=8)
    x, y = _batch(4, size=8)

    def zero(update: ClientUpdate, *, generator: torch.Generator) -> ClientUpdate:
        return update.replace(tensors={n: torch.zeros_like(t) for n, t in update.tensors.items()},
                              defenses=update.defenses + ("zero",))

    agg = simulate_clients(server, x, y, num_clients=2, defense=zero, generator=torch.Generator())
    assert agg.defenses == ("zero",) and all(t.abs().sum() == 0 for t in agg.gradients())
    with pytest.raises(ConfigError, match="expected a torch.Generator"):
        simulate_clients(server, x, y, num_clients=2, defense=zero)
    with pytest.raises(ConfigError, match=r"num_clients: expected an integer in \[1, 4\]"):
        simulate_clients(server, x, y, num_clients=5)


def test_aggregate_rejects_mixed_or_malformed_inputs() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        aggregate_updates([])
    with pytest.raises(ConfigError, match="weighting"):
        aggregate_updates([_random_update(2, 0)], weighting="median")  # type: ignore[arg-type]
    with pytest.raises(UpdateError, match="position 1"):
        aggregate_updates([_random_update(2, 0), _random_update(2, 1, kind="delta")])
    odd = ClientUpdate(tensors={"w": torch.zeros(4, 3), "b": torch.zeros(4)}, num_samples=2)
    with pytest.raises(UpdateError, match="names or shapes"):
        aggregate_updates([_random_update(2, 0), odd])
    with pytest.raises(UpdateError, match="got an aggregate"):
        aggregate_updates([aggregate_updates([_random_update(2, 0)])])


def test_one_full_batch_step_is_minus_lr_times_the_fedsgd_gradient() -> None:
    """Guard: a one-step, full-batch FedAvg delta is -lr times the FedSGD gradient."""
    server = _server("lenet")
    x, y = _batch(4)
    delta = fedavg_update(server, x, y, local_steps=1, lr=0.1, batch_size=4)
    grad = fedsgd_update(server, x, y)
    _close(delta.gradients(), [-0.1 * g for g in grad.gradients()])


def test_an_unused_parameter_gets_a_zero_delta_in_both_paths() -> None:
    server = _server("linear", size=8)
    server.model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    x, y = _batch(4, size=8)
    update = fedavg_update(server, x, y, local_steps=2, lr=0.1, batch_size=2)
    sim = simulate_local_delta(server.model, x, y, local_steps=2, lr=0.1, batch_size=2)
    assert torch.equal(update.tensors["unused"], torch.zeros(3))
    _close([t.detach() for t in sim], update.gradients())
