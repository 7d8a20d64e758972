"""Shared BatchNorm statistics: what the update carries, what it gives away, and the attacks' term."""

from __future__ import annotations

import pytest
import torch

from gradleak.attacks.auxiliary import Auxiliary
from gradleak.attacks.loop import LoopConfig
from gradleak.attacks.matching import build_matcher
from gradleak.errors import ConfigError, UpdateError
from gradleak.models import build_model
from gradleak.threat import batchnorm, fedavg_update, fedsgd_update
from gradleak.threat.io import load_update, save_update
from gradleak.types import ModelSpec, ServerState


def _server(name: str = "resnet18") -> ServerState:
    spec = ModelSpec(name, activation="relu")
    return ServerState.from_spec(build_model(spec), spec)


def _inputs(server: ServerState, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every BatchNorm layer's input on one train-mode forward (the model's statistics restored)."""
    seen: dict[str, torch.Tensor] = {}
    before = batchnorm.snapshot(server.model)
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, a[0].detach()))
             for name, m in batchnorm.tracked_layers(server.model).items()]
    server.model.train()
    with torch.no_grad():
        server.model(images)
    for h in hooks:
        h.remove()
    state = server.model.state_dict()
    with torch.no_grad():
        for k, v in before.items():
            state[k].copy_(v)
    return seen


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_one_step_gives_every_layers_true_batch_statistics(protocol):
    server = _server()
    x, y = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    truth = _inputs(server, x)
    update = (fedsgd_update(server, x, y, share_bn_stats=True) if protocol == "fedsgd"
              else fedavg_update(server, x, y, local_steps=1, lr=0.1, batch_size=4, share_bn_stats=True))
    stats = batchnorm.batch_statistics(update, server.model)
    assert set(stats) == set(truth) and len(stats) == 20
    for name, (mean, var) in stats.items():
        true_mean, true_var = batchnorm.input_statistics(truth[name])
        scale = float(true_mean.abs().max()) + float(true_var.abs().max())
        assert float((mean - true_mean).abs().max()) < 1e-4 * scale, name
        assert float((var - true_var).abs().max()) < 1e-4 * scale, name


def test_the_statistics_travel_in_the_update_file(tmp_path):
    server = _server("convnet")
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    update = fedsgd_update(server, x, y, share_bn_stats=True)
    save_update(update, tmp_path / "u.safetensors")
    back = load_update(tmp_path / "u.safetensors", model=server.model)
    assert list(back.buffers) == batchnorm.buffer_names(server.model)
    assert all(torch.equal(back.buffers[k], update.buffers[k]) for k in update.buffers)
    assert not fedsgd_update(server, x, y).buffers  # not shared unless asked


def test_statistics_that_do_not_fit_the_model_are_refused():
    server = _server("convnet")
    update = fedsgd_update(server, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), share_bn_stats=True)
    name = next(iter(update.buffers))
    renamed = update.replace(buffers={("x" + k if k == name else k): v for k, v in update.buffers.items()})
    with pytest.raises(UpdateError, match="expected names of the model's running statistics"):
        batchnorm.check_buffers(renamed, server.model)
    reshaped = update.replace(buffers={**update.buffers, name: update.buffers[name][:-1]})
    with pytest.raises(UpdateError, match=f"'{name}': expected shape"):
        batchnorm.check_buffers(reshaped, server.model)
    missing = update.replace(buffers={k: v for k, v in update.buffers.items() if k != name})
    with pytest.raises(UpdateError, match="missing"):
        batchnorm.check_buffers(missing, server.model)
    with pytest.raises(UpdateError, match="names of the model's running statistics|has no BatchNorm"):
        batchnorm.check_buffers(update, _server("lenet").model)


def test_sharing_needs_train_mode_batchnorm():
    lenet = _server("lenet")
    with pytest.raises(ConfigError, match="BatchNorm layers in train mode"):
        fedsgd_update(lenet, torch.rand(1, 3, 32, 32), torch.tensor([0]), share_bn_stats=True)


def test_a_multi_step_delta_mixes_the_steps_and_the_replay_matches_it():
    """Three local steps: the change is no one step's statistics, but the replayed running average is exact."""
    server = _server("convnet")
    x, y = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    update = fedavg_update(server, x, y, local_steps=3, lr=0.1, batch_size=2, share_bn_stats=True)
    with pytest.raises(UpdateError, match="expected one local step, got 3"):
        batchnorm.batch_statistics(update, server.model)
    victim = build_model(server.spec)
    victim.train()
    aux = Auxiliary.build(LoopConfig(), server, update, victim, torch.empty(0, dtype=torch.long), seed=0,
                          device=torch.device("cpu"))
    assert aux.info["bn_stats"]["steps"] == 3 and aux.bn_weight == LoopConfig().bn_stats
    matcher = build_matcher(update, victim, device=torch.device("cpu"))
    values = []
    for candidate in (x, torch.rand_like(x)):
        with aux.watching():
            matcher.simulate(candidate, y)
        values.append(float(aux._bn_term(candidate)))
    assert values[0] < 1e-4 < values[1]


def test_a_captured_state_dict_carries_the_statistics_change():
    """What a Flower client that sends its state_dict uploads: the capture records the same change."""
    import copy

    from gradleak.integrations.capture import LocalTraining, update_from_parameters

    server = _server("convnet")
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    client = copy.deepcopy(server.model).train()
    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(client(x), y).backward()
    opt.step()
    received = client.state_dict()
    update = update_from_parameters(server, received, num_examples=2,
                                    training=LocalTraining(lr=0.1, local_steps=1, batch_size=2))
    expected = fedavg_update(server, x, y, local_steps=1, lr=0.1, batch_size=2, shuffle_seed=None,
                             share_bn_stats=True)
    assert set(update.buffers) == set(expected.buffers)
    assert all(torch.allclose(update.buffers[k], expected.buffers[k], atol=1e-6) for k in update.buffers)
    partial = {k: v for k, v in received.items() if not k.endswith("running_var")}
    with pytest.raises(UpdateError, match="expected all .* running statistics or none"):
        update_from_parameters(server, partial, num_examples=2, training=LocalTraining(lr=0.1, local_steps=1))
    weights_only = {k: v for k, v in received.items() if "running" not in k and "num_batches" not in k}
    assert not update_from_parameters(server, weights_only, num_examples=2,
                                      training=LocalTraining(lr=0.1, local_steps=1, batch_size=2)).buffers
