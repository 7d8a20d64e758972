"""Gradient distances and the gradient helper."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.errors import ConfigError
from gradleak.functional import (
    cosine_distance,
    gradient_distance,
    l2_distance,
    layer_cosine_distance,
    total_variation,
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-6, 1e3))
def test_cosine_distance_is_one_minus_cosine(seed, scale):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    b = [scale * torch.randn(5, 3, generator=g, dtype=torch.float64), scale * torch.randn(7, generator=g, dtype=torch.float64)]
    fa, fb = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    expected = 1 - torch.dot(fa, fb) / (fa.norm() * fb.norm())
    torch.testing.assert_close(cosine_distance(a, b), expected)
    # scale invariance
    torch.testing.assert_close(cosine_distance([3 * x for x in a], b), expected)


def test_cosine_distance_keeps_precision_near_a_match_in_float32():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(1000, generator=g)]
    close = [t[0] + 1e-5 * torch.randn(1000, generator=g)]
    exact = cosine_distance([x.double() for x in close], [x.double() for x in t])
    got = cosine_distance(close, t)
    assert exact > 0 and abs(float(got) - float(exact)) < 0.05 * float(exact)
    naive = 1 - (close[0] * t[0]).sum() / (close[0].norm() * t[0].norm())
    assert abs(float(naive) - float(exact)) > 0.05 * float(exact)  # why the stable form exists


def test_l2_and_lookup():
    a, b = [torch.ones(3)], [torch.zeros(3)]
    assert float(l2_distance(a, b)) == 3.0
    assert float(gradient_distance("l2", a, b)) == 3.0
    with pytest.raises(ConfigError, match="expected one of: l2, cosine"):
        gradient_distance("l1", a, b)


def test_total_variation_zero_on_constant_positive_on_noise():
    assert float(total_variation(torch.full((1, 3, 8, 8), 0.3))) == 0.0
    assert float(total_variation(torch.rand(1, 3, 8, 8))) > 0.1


def test_naive_cosine_agrees_away_from_a_match():
    from gradleak.functional.gradients import cosine_distance_naive

    g = torch.Generator().manual_seed(1)
    a, b = [torch.randn(50, generator=g)], [torch.randn(50, generator=g)]
    torch.testing.assert_close(cosine_distance_naive(a, b), cosine_distance(a, b), rtol=1e-5, atol=1e-6)
    assert float(gradient_distance("cosine-naive", a, b)) == pytest.approx(float(cosine_distance(a, b)), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-6, 1e3))
def test_layer_cosine_is_the_mean_of_each_layers_cosine_distance(seed, scale):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    b = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    expected = sum(1 - torch.dot(x.flatten(), y.flatten()) / (x.norm() * y.norm()) for x, y in zip(a, b)) / 2
    torch.testing.assert_close(layer_cosine_distance(a, b), expected)
    # each layer's scale is its own: rescaling one layer of either side changes nothing
    torch.testing.assert_close(layer_cosine_distance([scale * a[0], a[1]], [b[0], 7 * b[1]]), expected)
    torch.testing.assert_close(gradient_distance("cosine-layer", a, b), expected)


def test_layer_cosine_skips_layers_whose_target_is_zero_and_weighs_layers_equally():
    big, small = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1e-3])
    # the global cosine barely sees a mismatch in the small layer; the per-layer one gives it half
    target, guess = [1000 * big, small], [1000 * big, -small]
    assert float(cosine_distance(guess, target)) < 1e-9
    assert float(layer_cosine_distance(guess, target)) == pytest.approx(1.0)  # (0 + 2) / 2
    # a pruned (all-zero) target layer is neither matched nor counted
    pruned = [1000 * big, torch.zeros(2)]
    assert float(layer_cosine_distance([1000 * big, torch.ones(2)], pruned)) == pytest.approx(0.0)
    # and its gradient is finite (no 0/0 through the skipped term)
    leaves = [x.clone().requires_grad_() for x in (1000 * big, torch.ones(2))]
    grads = torch.autograd.grad(layer_cosine_distance(leaves, pruned), leaves)
    assert all(bool(torch.isfinite(g).all()) for g in grads) and float(grads[1].abs().sum()) == 0.0
