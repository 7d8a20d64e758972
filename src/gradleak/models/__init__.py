"""Victim models, built by name from a :class:`~gradleak.types.ModelSpec`.

Registered: ``linear`` (1-layer softmax, Proposition 1), ``mlp``, ``lenet`` (DLG's sigmoid
LeNet), ``convnet``, ``resnet18`` (CIFAR stem, 32/64 px) and ``resnet18-imagenet`` (ImageNet stem,
128..256 px). Activations (``ModelSpec.activation``, :data:`ACTIVATIONS`): ``relu``, ``sigmoid``, ``tanh``,
``leaky-relu`` (slope 0.2) and ``gelu``. Any user ``nn.Module`` works through the Python API.
"""

from gradleak.models.validate import validate_victim
from gradleak.models.zoo import ACTIVATIONS, MODELS, available, build_model, count_parameters

__all__ = ["ACTIVATIONS", "MODELS", "available", "build_model", "count_parameters", "validate_victim"]
