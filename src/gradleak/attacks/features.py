"""The last layer's input features, recovered from the update.

A classifier ends in a linear layer ``logits = W f + b`` on features ``f`` (a ResNet's pooled
activations, LeNet's flattened maps). Its part of the mean cross-entropy gradient is the same as a
1-layer model's (CI-Net appendix A, Proposition 1, Eq. 5) with the images replaced by the features:

    N grad_W = P_hat^T F,        N grad_b = P_hat^T 1,

``P_hat`` the (N, C) softmax probabilities minus one-hot labels. So:

* one image: ``f = grad_W[c] / grad_b[c]`` exactly (Phong et al. 2017; Geiping et al. 2020, Prop. D.1);
* N <= C - 1 images in general position: the features are the unique solution of the equations,
  found by :func:`~gradleak.attacks.analytic.solve_softmax_layer` (the analytic attack's solver on
  the last layer);
* otherwise the equations have a family of solutions, and what the update fixes are the per-class
  weighted sums: row c of ``N grad_W`` is ``sum_i P_hat[i, c] f_i``, so ``grad_W[c] / grad_b[c]`` is
  the mean of the batch's features weighted by their ``P_hat[:, c]`` (dominated by the samples of
  class c, whose weight is ``p - 1``). Each image of class c is given that ratio (``"class-ratio"``).

Under a recorded ``prune`` the zeroed entries of the last layer's gradient are filled back first
(:mod:`gradleak.labels.support`, as label recovery does): solving on the zeros is far off (relative
error 0.21-0.29 at batch 4, ``prune:0.5``, LeNet and ResNet-18-ReLU), on the filled gradient
0.08-0.11 (``tests/attacks/test_features.py``).

The features are then a target for the attacks' feature-matching term (``features`` in every
iterative attack's config, :mod:`gradleak.attacks.auxiliary`): breaching's "modern" attack, FGLA and
the Cocktail Party Attack's feature stage use them the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.attacks.analytic import AnalyticConfig, solve_softmax_layer
from gradleak.attacks.base import target_gradients
from gradleak.errors import UnsupportedModelError, UpdateError
from gradleak.labels.support import complete_support
from gradleak.types import ClientUpdate, ServerState


@dataclass(frozen=True)
class LastLayer:
    """The linear layer that computes the logits, by module name and parameter positions."""

    name: str
    weight_index: int
    bias_index: int


def last_linear(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> LastLayer:
    """Find the ``nn.Linear`` whose output is the model's logits.

    Raises:
        UnsupportedModelError: the logits are not an ``nn.Linear``'s output, or that layer has no
            bias (the bias gradient gives each feature row its scale), or its weight and bias are
            not trainable.
    """
    probe_model = copy.deepcopy(model).eval()
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: outputs.append((name, out)))
             for name, m in probe_model.named_modules() if isinstance(m, nn.Linear)]
    param = next(probe_model.parameters(), None)
    probe = torch.rand((2,) + tuple(input_shape), generator=torch.Generator().manual_seed(0))
    if param is not None:
        probe = probe.to(param.device, param.dtype)
    try:
        with torch.no_grad():
            logits = probe_model(probe)
    finally:
        for h in hooks:
            h.remove()
    found = [name for name, out in outputs if out.shape == logits.shape and torch.equal(out, logits)]
    if not found:
        raise UnsupportedModelError(f"feature term: expected the model's logits (N, {num_classes}) to be the output of "
                                    f"an nn.Linear layer, got a model whose last operation is something else")
    name = found[-1]
    layer = dict(model.named_modules())[name]
    assert isinstance(layer, nn.Linear)
    if layer.bias is None:
        raise UnsupportedModelError(f"feature term: expected the last linear layer '{name}' to have a bias (its gradient "
                                    f"gives each feature row its scale), got bias=None; set features=0")
    params = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(params)}
    if id(layer.weight) not in index or id(layer.bias) not in index:
        raise UnsupportedModelError(f"feature term: expected the last linear layer '{name}' to be trainable (its "
                                    f"gradient is in the update), got a frozen layer; set features=0")
    return LastLayer(name, index[id(layer.weight)], index[id(layer.bias)])


@dataclass
class FeatureRecovery:
    """The last layer's input features behind an update (:func:`recover_features`).

    Args:
        features: (N, D), row i the features of the image with label ``labels[i]``.
        labels: the labels the recovery assumed.
        layer: the last linear layer's module name.
        method: ``"ratio"`` (one image), ``"solve"`` (Proposition 1 on the last layer) or
            ``"class-ratio"`` (each image of class c gets ``grad_W[c] / grad_b[c]``).
        exact: the equations determine each image's features and the solve converged (unique
            labels; same-label images are determined in sum, each only approximately).
        residual: the relative residual of ``N [grad_W | grad_b] = P_hat^T [F | 1]``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    layer: str
    method: str
    exact: bool
    residual: float
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What a run records of the recovery (its config.json/metrics.json ``features`` entry)."""
        return {"layer": self.layer, "method": self.method, "exact": self.exact, "residual": self.residual,
                "dimension": int(self.features.shape[1]), "notes": list(self.notes)}


def class_ratios(grad_w: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """``grad_W[c] / grad_b[c]`` for every class c: the batch's features weighted by ``P_hat[:, c]``.

    Shape: ``grad_w`` (C, D), ``grad_b`` (C,); returns (C, D). A class whose bias gradient is exactly
    zero (a pruned entry the fill could not restore) gives a zero row.
    """
    safe = torch.where(grad_b == 0, torch.ones_like(grad_b), grad_b)
    return torch.where((grad_b == 0)[:, None], torch.zeros_like(grad_w), grad_w / safe[:, None])


def recover_features(server: ServerState, update: ClientUpdate, labels: torch.Tensor, *,
                     config: AnalyticConfig | None = None, seed: int = 0) -> FeatureRecovery:
    """The input features of ``server``'s last linear layer for each image behind ``update``.

    Args:
        server: the victim (its last layer's weights enter the solve).
        update: a FedSGD gradient, or a one-step full-batch FedAvg delta.
        labels: (N,) the labels, recovered or known; the features come back in their order.
        config: the solver's settings (default: the analytic attack's).
        seed: seeds the solver's starts.

    Raises:
        UnsupportedModelError: the model's last layer does not fit (:func:`last_linear`).
        UpdateError: an aggregate, a multi-step delta or a mini-batch step (the last layer's
            gradient is then not one batch's), or labels that do not fit.
    """
    layer = last_linear(server.model, server.input_shape, server.num_classes)
    n, c = update.num_samples, server.num_classes
    if update.protocol == "aggregate":
        raise UpdateError("feature term: expected one client's update (a gradient or a one-step delta), got an "
                          "aggregate of several clients")
    if update.kind == "delta" and (update.local_steps != 1 or (update.local_batch_size or n) < n):
        raise UpdateError(f"feature term: expected a gradient or a one-step full-batch delta, got a delta of "
                          f"{update.local_steps} local steps at batch size {update.local_batch_size} for {n} samples")
    labels = torch.as_tensor(labels).long().view(-1).cpu()
    if labels.numel() != n or (n and (int(labels.min()) < 0 or int(labels.max()) >= c)):
        raise UpdateError(f"feature term: expected {n} labels in [0, {c}), got {labels.numel()}")
    grads = target_gradients(update)
    dt = torch.float64
    gw, gb = grads[layer.weight_index].detach().cpu().to(dt), grads[layer.bias_index].detach().cpu().to(dt)
    module = dict(server.model.named_modules())[layer.name]
    assert isinstance(module, nn.Linear) and module.bias is not None
    notes: list[str] = []
    if "prune" in update.defenses:  # top-k zeros: fill them back as label recovery does
        gw, filled_b, filled = complete_support(gw, gb)
        assert filled_b is not None
        gb = filled_b
        if filled:
            notes.append(f"the update records pruning: {filled} zeroed entries of the last layer's gradient were "
                         f"filled back (gradleak.labels.support) before the features were solved for")
    g = n * torch.cat([gw, gb[:, None]], 1)
    onehot = F.one_hot(labels, c).to(dt)
    ratios = class_ratios(gw, gb)
    if n == 1:
        feats, method = ratios[labels], "ratio"
    elif n <= c - 1:
        sol = solve_softmax_layer(g, module.weight.detach().cpu(), module.bias.detach().cpu(), onehot,
                                  config or AnalyticConfig(), rng=torch.Generator().manual_seed(seed))
        notes.extend(sol.notes)
        feats, method = sol.x_aug[:, :-1] / sol.x_aug[:, -1:].clamp_min(1e-12), "solve"
    else:
        feats, method = ratios[labels], "class-ratio"
        notes.append(f"N = {n} > C - 1 = {c - 1}: the update fixes only the per-class weighted sums; each image "
                     f"gets its class's grad_W[c] / grad_b[c]")
    f_aug = torch.cat([feats, torch.ones(n, 1, dtype=dt)], 1)
    logits = f_aug @ torch.cat([module.weight.detach().cpu().to(dt), module.bias.detach().cpu().to(dt)[:, None]], 1).T
    p_hat = torch.softmax(logits, -1) - onehot
    implied = p_hat.T @ f_aug
    residual = float(torch.linalg.norm(implied - g) / torch.linalg.norm(g).clamp_min(1e-300))
    converged = residual < 1e-4
    exact = method != "class-ratio" and converged and len(set(labels.tolist())) == n
    if method != "class-ratio" and not converged:
        notes.append(f"the solve left a relative residual of {residual:.1e} (a defended or float-noisy update); "
                     f"the features are approximate")
    elif method == "solve" and not exact:
        notes.append("images that share a label are told apart only to second order (their rows of P_hat differ "
                     "by softmax differences): their sum is exact, each one approximate")
    return FeatureRecovery(features=feats.float(), labels=labels, layer=layer.name, method=method, exact=exact,
                           residual=residual, notes=notes)


__all__ = ["FeatureRecovery", "LastLayer", "class_ratios", "last_linear", "recover_features"]
