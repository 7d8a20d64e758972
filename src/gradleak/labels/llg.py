"""LLG: label counts with repeats from the row sums of the last layer's weight gradient.

Wainakh et al. (2022) observe that, with non-negative features, the row sum
``g_c = sum_m dL/dW[c, m]`` is negative for every class in the batch (Property 1) and that each
occurrence of a class lowers ``g_c`` by roughly the same "impact" (Property 2). LLG (their
Algorithm 1, the variant without auxiliary data) therefore

1. adds every class with ``g_c < 0`` once,
2. estimates the impact ``m = (sum_{g_c < 0} g_c / N) * (1 + 1/C)``,
3. subtracts ``m`` from the ``g_c`` of each class added, and
4. fills the remaining places one at a time with the class of the smallest ``g_c``, subtracting
   ``m`` from it after each pick.

It is a heuristic: exact only when the impact of every sample is the same. It is invariant to the
gradient's scale, so it works on deltas without ``local_lr``.

References:
    Wainakh, Ventola, Müßig, Keim, Cordero, Zimmer, Grube, Kersting and Mühlhäuser, "User-Level
    Label Leakage from Gradients in Federated Learning", PETS 2022.
"""

from __future__ import annotations

import torch

from gradleak.errors import UpdateError
from gradleak.labels.last_layer import LABEL_STRATEGIES, LabelResult, LastLayer, last_layer, make_result, require_batch
from gradleak.types import ClientUpdate, ServerState


@LABEL_STRATEGIES.register("llg")
def llg(server: ServerState, update: ClientUpdate, *, layer: LastLayer | None = None) -> LabelResult:
    """Recover N labels with repeats by the LLG heuristic (Wainakh et al. 2022, Algorithm 1).

    Assumptions: the last layer's inputs are non-negative (Property 1); every sample changes its
    class's row sum by about the same amount (Property 2, best on untrained models); a gradient
    or a delta (the scale is not needed). At least one row sum must be negative; more negative
    rows than samples are tolerated (noise) by keeping the N most negative, with a warning.

    Args:
        server: the model the update was computed on.
        update: the client's update; ``num_samples`` is N.
        layer: the result of :func:`~gradleak.labels.last_layer.last_layer`, when already computed.

    Returns:
        A :class:`~gradleak.labels.LabelResult` with N labels.

    Raises:
        UpdateError: no row sum is negative (the impact is undefined).
        UnsupportedModelError: no final ``nn.Linear``, or possibly negative features.
    """
    layer = layer or last_layer(server, update)
    n = require_batch("llg", update)
    layer.require_nonnegative_features("llg")
    notes: list[str] = []
    g = layer.grad_weight.sum(dim=1).clone()
    negative = (g < 0).nonzero().view(-1)
    if negative.numel() == 0:
        raise UpdateError("label strategy 'llg': expected at least one class with a negative weight-gradient "
                          "row sum, got none (the impact is undefined)")
    impact = float(g[negative].sum()) / n * (1.0 + 1.0 / layer.num_classes)
    if negative.numel() > n:
        notes.append(f"llg: {negative.numel()} classes have a negative row sum but the batch has {n} samples; "
                     f"kept the {n} most negative")
        negative = negative[g[negative].argsort()[:n]]
    picks: list[int] = negative.tolist()
    g[negative] -= impact
    while len(picks) < n:
        c = int(g.argmin())
        picks.append(c)
        g[c] -= impact
    return make_result(torch.tensor(picks), "llg", layer, warnings=notes,
                       info={"impact": impact, "negative_rows": int((layer.grad_weight.sum(dim=1) < 0).sum())})
