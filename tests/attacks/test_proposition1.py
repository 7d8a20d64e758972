"""Proposition 1 (CI-Net, appendix A, Eq. 5) and the analytic attack built on it.

For a 1-layer softmax network and a batch of N samples, ``N * grad_W = P_hat^T x`` and
``N * grad_b = P_hat^T 1`` with ``P_hat = softmax(W x + b) - onehot(y)``. The identity is a
known-answer test of the gradient code; the attack inverts it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from torch import nn

import gradleak
from gradleak.data import builtin_batch
from gradleak.errors import UnsupportedModelError
from gradleak.functional import model_gradients
from gradleak.models import build_model
from gradleak.threat import fedsgd_update
from gradleak.types import ModelSpec, ServerState

pytestmark = pytest.mark.usefixtures("one_thread")


def _p_hat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), dim=-1) - F.one_hot(y, c).to(x.dtype)


def test_identity_on_the_linear_victim_float64():
    spec = ModelSpec(name="linear", num_classes=10, image_size=8, bn_mode="eval")
    model = build_model(spec, seed=0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 7, 9, 1])
    grad_w, grad_b = model_gradients(model, x, y)
    p = _p_hat(model, x, y, 10)
    torch.testing.assert_close(6 * grad_w, p.T @ x.flatten(1), rtol=0, atol=1e-14)
    torch.testing.assert_close(6 * grad_b, p.sum(0), rtol=0, atol=1e-14)


def test_identity_holds_for_the_fedsgd_update_in_float32():
    spec = ModelSpec(name="linear", num_classes=10, bn_mode="eval")
    model = build_model(spec, seed=42)
    batch = builtin_batch(4, source="cifar10")
    update = fedsgd_update(ServerState.from_spec(model, spec), batch.images, batch.labels)
    p = _p_hat(model, batch.images, batch.labels, 10)
    lhs = 4 * update.tensors["1.weight"]
    torch.testing.assert_close(lhs, p.T @ batch.images.flatten(1), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(2, 12), d=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_identity_property(n: int, c: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, c).double()
    model = nn.Sequential(nn.Flatten(), linear)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        linear.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    grad_w, grad_b = model_gradients(model, x, y)
    p = _p_hat(model, x, y, c)
    torch.testing.assert_close(n * grad_w, p.T @ x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(n * grad_b, p.T @ torch.ones(n, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.sum(1), torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-12)  # rank <= C-1


def _case(n: int, c: int, source: str = "photos"):
    spec = ModelSpec(name="linear", num_classes=c, bn_mode="eval")
    model = build_model(spec, seed=42)
    server = ServerState.from_spec(model, spec)
    batch = builtin_batch(n, source=source, num_classes=c)
    return server, batch, fedsgd_update(server, batch.images, batch.labels)


def _max_error_after_pairing(recon: torch.Tensor, truth: torch.Tensor) -> float:
    dist = torch.cdist(recon.flatten(1).double(), truth.flatten(1).double(), p=float("inf"))
    rows, cols = linear_sum_assignment(dist.numpy())
    return float(dist[rows, cols].max())


@pytest.mark.parametrize("n,c,source", [(1, 10, "cifar10"), (5, 10, "photos"), (12, 100, "photos")])
def test_analytic_attack_is_exact_when_unique(n: int, c: int, source: str):
    server, batch, update = _case(n, c, source)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="analytic attack")  # unique and converged: no warning
        rec = gradleak.attacks.create("analytic").reconstruct(server, update)
    assert rec.info["unique"] and rec.info["converged"]
    assert rec.label_strategy != "given"  # labels came from the update
    assert sorted(rec.labels.tolist()) == sorted(batch.labels.tolist())
    assert rec.images.shape == batch.images.shape
    assert _max_error_after_pairing(rec.images, batch.images) < 1e-4


def test_analytic_attack_separates_images_that_share_a_label():
    server, batch, update = _case(5, 10, "photos")
    assert len(set(batch.labels.tolist())) < 5  # the case this test is about
    plain = gradleak.attacks.AnalyticAttack.preset("paper")  # alternation only
    rec_plain = gradleak.attacks.create("analytic", plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = rec_plain.reconstruct(server, update)
    refined = gradleak.attacks.create("analytic").reconstruct(server, update)
    assert _max_error_after_pairing(refined.images, batch.images) < 1e-4
    assert refined.info["relative_residual"] <= rec.info["relative_residual"]


def test_analytic_attack_reports_non_uniqueness_when_n_exceeds_c_minus_1():
    server, batch, update = _case(12, 10, "photos")
    with pytest.warns(UserWarning, match="not unique"):
        rec = gradleak.attacks.create("analytic").reconstruct(server, update)
    assert rec.info["unique"] is False
    assert "N = 12 > C - 1 = 9" in rec.info["uniqueness"][0]
    assert rec.info["rank_p_hat"] <= 9
    # one member of the family of solutions: it explains the update, it is not the batch
    assert rec.info["relative_residual"] < 1e-4
    assert _max_error_after_pairing(rec.images, batch.images) > 1e-2


def test_analytic_attack_flags_a_duplicated_image_with_one_label():
    # x_i + t and x_j - t with W t = 0 leave the logits, P_hat and the update unchanged.
    spec = ModelSpec(name="linear", num_classes=10, image_size=16, bn_mode="eval")
    server = ServerState.from_spec(build_model(spec, seed=42), spec)
    batch = builtin_batch(2, source="cifar10", size=16)
    images = torch.stack([batch.images[0], batch.images[0], batch.images[1]])
    labels = torch.stack([batch.labels[0], batch.labels[0], batch.labels[1]])
    update = fedsgd_update(server, images, labels)
    with pytest.warns(UserWarning, match="not unique"):
        rec = gradleak.attacks.create("analytic").reconstruct(server, update, labels=labels)
    assert rec.info["unique"] is False and rec.info["rank_p_hat"] == 2
    assert rec.label_strategy == "given"


def test_analytic_attack_rejects_deeper_models():
    spec = ModelSpec(name="mlp", num_classes=10, image_size=8, width=16, bn_mode="eval")
    model = build_model(spec, seed=0)
    server = ServerState.from_spec(model, spec)
    batch = builtin_batch(1, source="cifar10", size=8)
    update = fedsgd_update(server, batch.images, batch.labels)
    with pytest.raises(UnsupportedModelError, match="1-layer softmax model"):
        gradleak.attacks.create("analytic").reconstruct(server, update)


def test_analytic_attack_rejects_a_linear_layer_with_a_hidden_nonlinearity():
    class Squashed(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(super().forward(x))

    model = Squashed(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    server = ServerState(model=model, input_shape=(3, 8, 8), num_classes=10, bn_mode="eval")
    batch = builtin_batch(1, source="cifar10", size=8)
    update = fedsgd_update(server, batch.images, batch.labels)
    with pytest.raises(UnsupportedModelError, match="forward does something else"):
        gradleak.attacks.create("analytic").reconstruct(server, update)
