"""Bias counting: per-class counts from the bias gradient and a data prior for the softmax mean.

The bias gradient of the mean cross-entropy is exactly ``grad_b = p_bar - counts / N`` with
``p_bar`` the batch's mean softmax output. Every count-recovery method is a way of estimating
``p_bar``. This strategy estimates it as the model's mean softmax output on random uniform images,
in the server's BatchNorm mode, in the spirit of LLG+/LLG* (Wainakh et al. 2022), which estimate the
same quantity from auxiliary or dummy data. It is accurate when the model's output depends little
on its input (untrained models) and poor on trained ones.

References:
    Wainakh et al., "User-Level Label Leakage from Gradients in Federated Learning", PETS 2022.
"""

from __future__ import annotations

import copy

import torch

from gradleak.labels.last_layer import (
    LABEL_STRATEGIES,
    LabelResult,
    LastLayer,
    counting_layer,
    counts_to_labels,
    last_layer,
    make_result,
    require_batch,
)
from gradleak.types import ClientUpdate, ServerState


def mean_probabilities(server: ServerState, *, num_images: int = 32, seed: int = 0) -> torch.Tensor:
    """Mean softmax output of a copy of the server's model on random uniform images, float64 (C,)."""
    model = copy.deepcopy(server.model)
    model.train(server.bn_mode == "train")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((max(num_images, 2), *server.input_shape), generator=g).to(device)
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=-1).mean(0).cpu()


@LABEL_STRATEGIES.register("bias-count")
def bias_count(server: ServerState, update: ClientUpdate, *, layer: LastLayer | None = None,
               num_images: int = 32) -> LabelResult:
    """Counts with repeats: ``counts = N * (p_bar - grad_b)``, ``p_bar`` from random images.

    Assumptions: the last layer has a bias; softmax cross-entropy with hard labels; a gradient or a
    delta with its ``local_lr``; the model's mean output on the private batch is close to its mean
    output on uniform noise (untrained models).

    Args:
        server: the model the update was computed on.
        update: the client's update; ``num_samples`` is N.
        layer: the result of :func:`~gradleak.labels.last_layer.last_layer`, when already computed.
        num_images: random images used to estimate ``p_bar``.

    Returns:
        A :class:`~gradleak.labels.LabelResult` with N labels; ``info["counts"]`` the real counts.

    Raises:
        UnsupportedModelError: no final ``nn.Linear`` with bias.
        UpdateError: a delta without ``local_lr``, or a bias gradient that does not sum to zero.
    """
    layer = layer or last_layer(server, update)
    n = require_batch("bias-count", update)
    layer, grad_b = counting_layer("bias-count", layer)
    counts = n * (mean_probabilities(server, num_images=num_images) - grad_b)
    return make_result(counts_to_labels(counts, n), "bias-count", layer,
                       info={"counts": [round(float(c), 4) for c in counts]})
