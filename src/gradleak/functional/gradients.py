"""Gradient computation and gradient-matching distances.

References:
    Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019 (L2 distance).
    Geiping et al., "Inverting Gradients", NeurIPS 2020 (cosine distance, total variation).
    Zhang et al., "Generative Gradient Inversion via Over-Parameterized Networks in Federated
    Learning", ICCV 2023, Algorithm 1 line 8 (L2 distance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import ConfigError


def model_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    create_graph: bool = False,
    params: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy of ``model`` on a batch, w.r.t. its trainable parameters.

    Args:
        model: the victim network; its train/eval mode is used as it is.
        images: shape (N, C, H, W), range [0, 1].
        labels: shape (N,) class indices, or (N, C) soft labels (probabilities).
        create_graph: keep the graph so the result can be differentiated again (attacks).
        params: the parameters to differentiate; default: every parameter with ``requires_grad``.

    Returns:
        One gradient per parameter, in ``named_parameters`` order.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def l2_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance summed over all parameters: sum_l ||g_l - t_l||^2 (Alg. 1, line 8)."""
    total = grads[0].new_zeros(())
    for g, t in zip(grads, target):
        total = total + (g - t).pow(2).sum()
    return total


def cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - cos(g, t), with g and t every parameter's gradient concatenated (Geiping et al. 2020).

    Computed as ||g/|g| - t/|t|||^2 / 2, which equals 1 - cos(g, t) but keeps its precision near a
    match: ``1 - dot / (|g| |t|)`` cancels to 0 in float32 once cos is within 6e-8 of 1, and its
    gradient then is the difference of two nearly equal vectors. Gradient inversion spends most of
    its iterations in exactly that regime.
    """
    gn = torch.sqrt(sum(g.pow(2).sum() for g in grads)).clamp_min(1e-30)  # type: ignore[arg-type]
    tn = torch.sqrt(sum(t.pow(2).sum() for t in target)).clamp_min(1e-30)  # type: ignore[arg-type]
    total = grads[0].new_zeros(())
    for g, t in zip(grads, target):
        total = total + (g / gn - t / tn).pow(2).sum()
    return total / 2


def cosine_distance_naive(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - dot / (|g| |t|), as the published CI-Net and Inverting Gradients code computes it.

    Kept for ablations and for reproducing published numbers: in float32 it loses its precision
    near a match (see :func:`cosine_distance`).
    """
    dot = grads[0].new_zeros(())
    gg = grads[0].new_zeros(())
    tt = grads[0].new_zeros(())
    for g, t in zip(grads, target):
        dot = dot + (g * t).sum()
        gg = gg + g.pow(2).sum()
        tt = tt + t.pow(2).sum()
    return 1 - dot / (gg.sqrt() * tt.sqrt()).clamp_min(1e-30)


def layer_cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over parameter tensors of 1 - cos(g_l, t_l): every layer weighs the same.

    The global cosine (:func:`cosine_distance`) weighs a layer by its share of the update's squared
    norm; on the CIFAR ResNet-18-sigmoid demo victim at batch 64 the last linear layer holds 97%
    of it, and that layer's 5,120 entries only constrain each image's pooled features through a
    rank-10 product. Normalizing each layer gives the convolutions, which carry the pixels, their
    say. A layer whose target is zero (a pruned or frozen tensor) is skipped. Each term is computed
    as ||g/|g| - t/|t|||^2 / 2, like :func:`cosine_distance`, without float32 cancellation.
    """
    total = grads[0].new_zeros(())
    layers = grads[0].new_zeros(())
    for g, t in zip(grads, target):
        tn = torch.linalg.vector_norm(t)
        gn = torch.linalg.vector_norm(g).clamp_min(1e-30)
        live = (tn > 0).to(total.dtype)  # no host sync: a zero target contributes 0 and is not counted
        total = total + live * (g / gn - t / tn.clamp_min(1e-30)).pow(2).sum() / 2
        layers = layers + live
    return total / layers.clamp_min(1)


_DISTANCES = {"l2": l2_distance, "cosine": cosine_distance, "cosine-naive": cosine_distance_naive,
              "cosine-layer": layer_cosine_distance}
GRADIENT_DISTANCES = tuple(_DISTANCES)
"""The names :func:`gradient_distance` takes."""


def gradient_distance(
    name: str, grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Gradient-matching distance by name, one of :data:`GRADIENT_DISTANCES`."""
    try:
        fn = _DISTANCES[name]
    except KeyError:
        raise ConfigError(f"unknown matching loss '{name}'; expected one of: {', '.join(_DISTANCES)}") from None
    return fn(grads, target)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels.

    Shape:
        images: (N, C, H, W). Returns a scalar.
    """
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    return dx + dy


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against probability vectors (DLG's soft labels)."""
    return -(soft_labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()
