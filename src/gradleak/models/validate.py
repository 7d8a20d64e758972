"""Checks of a victim model against what attacks and label strategies assume."""

from __future__ import annotations

from torch import nn

from gradleak.errors import UnsupportedModelError


def validate_victim(model: nn.Module, *, strict: bool = False, twice_differentiable: bool = True) -> list[str]:
    """List the properties of ``model`` that weaken or break gradient inversion.

    Args:
        model: the victim.
        strict: raise on the first problem instead of returning the list.
        twice_differentiable: flag activations whose second derivative is zero almost
            everywhere (ReLU, LeakyReLU): gradient matching differentiates the gradient once more.

    Returns:
        Human-readable problems; empty when none was found.

    Raises:
        UnsupportedModelError: with ``strict=True``, when a problem is found.
    """
    problems: list[str] = []
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("the model has no trainable parameters: there is no update to invert")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        problems.append("BatchNorm in train mode: the update depends on batch statistics, which couple the batch")
    if twice_differentiable and any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)) for m in model.modules()):
        problems.append("piecewise-linear activations (ReLU, LeakyReLU): the matching loss's curvature comes only from "
                        "other layers; sigmoid victims are easier to invert")
    if not isinstance(_last_module(model), nn.Linear):
        problems.append("the last layer is not nn.Linear: analytic label recovery does not apply")
    if strict and problems:
        raise UnsupportedModelError(problems[0])
    return problems


def _last_module(model: nn.Module) -> nn.Module | None:
    last = None
    for m in model.modules():
        if not list(m.children()):
            last = m
    return last
