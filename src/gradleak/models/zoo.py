"""Victim architectures used in the gradient-inversion literature.

References:
    Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019 (sigmoid LeNet).
    Geiping et al., "Inverting Gradients", NeurIPS 2020 (ConvNet, ResNet-18).
    Zhang et al., ICCV 2023 (CI-Net): untrained CIFAR ResNet-18 with every ReLU replaced by Sigmoid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.registry import Registry
from gradleak.types import ModelSpec

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky-relu": lambda: nn.LeakyReLU(0.2),
    "gelu": nn.GELU,
}
"""The victims' activations by ``ModelSpec.activation`` name (every architecture uses one throughout)."""


def _act(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation '{name}'; expected one of: {', '.join(ACTIVATIONS)}") from None


@MODELS.register("linear")
def linear(spec: ModelSpec) -> nn.Module:
    """One linear layer with bias on the flattened image; softmax is in the loss (Proposition 1)."""
    c, h, w = spec.input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, spec.num_classes))


@MODELS.register("mlp")
def mlp(spec: ModelSpec) -> nn.Module:
    """Two-layer perceptron with ``width`` hidden units (default 256)."""
    c, h, w = spec.input_shape
    hidden = spec.width or 256
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), _act(spec.activation),
                         nn.Linear(hidden, spec.num_classes))


@MODELS.register("lenet")
def lenet(spec: ModelSpec) -> nn.Module:
    """DLG's LeNet: three 5x5 convolutions (12 channels) with sigmoid, then one linear layer."""
    c, h, w = spec.input_shape
    act = spec.activation
    return nn.Sequential(
        nn.Conv2d(c, 12, 5, padding=2, stride=2), _act(act),
        nn.Conv2d(12, 12, 5, padding=2, stride=2), _act(act),
        nn.Conv2d(12, 12, 5, padding=2, stride=1), _act(act),
        nn.Flatten(),
        nn.Linear(12 * ((h + 3) // 4) * ((w + 3) // 4), spec.num_classes),
    )


class GlobalAvgPool(nn.Module):
    """The spatial mean, (N, C, H, W) -> (N, C, 1, 1): ``AdaptiveAvgPool2d(1)``'s result, with a
    backward that CUDA computes deterministically (``adaptive_avg_pool2d``'s CUDA backward has no
    deterministic kernel, so ``--deterministic`` would refuse every ResNet that used it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


@MODELS.register("convnet")
def convnet(spec: ModelSpec) -> nn.Module:
    """A VGG-style ConvNet of width ``width`` (default 32): conv-BN-act blocks and 3 poolings."""
    c, h, w = spec.input_shape
    k = spec.width or 32

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), _act(spec.activation)]

    layers: list[nn.Module] = [*block(c, k), *block(k, 2 * k), nn.MaxPool2d(2),
                               *block(2 * k, 2 * k), *block(2 * k, 4 * k), nn.MaxPool2d(2),
                               *block(4 * k, 4 * k), nn.MaxPool2d(2),
                               GlobalAvgPool(), nn.Flatten(), nn.Linear(4 * k, spec.num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block with a configurable activation."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _act(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _act(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem (3x3 conv, no max-pool) or an ImageNet stem (7x7, max-pool)."""

    def __init__(self, spec: ModelSpec, *, imagenet_stem: bool) -> None:
        super().__init__()
        c = spec.channels
        width = spec.width or 64
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(c, width, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(width), _act(spec.activation), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False),
                                      nn.BatchNorm2d(width), _act(spec.activation))
        blocks: list[nn.Module] = []
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, spec.activation))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@MODELS.register("resnet18")
def resnet18(spec: ModelSpec) -> nn.Module:
    """CIFAR ResNet-18 (the paper's victim with ``activation="sigmoid"``)."""
    return ResNet18(spec, imagenet_stem=False)


@MODELS.register("resnet18-imagenet")
def resnet18_imagenet(spec: ModelSpec) -> nn.Module:
    """ImageNet-stem ResNet-18 for 128..256 px inputs."""
    return ResNet18(spec, imagenet_stem=True)


def available() -> list[str]:
    """Names of the registered victim architectures."""
    return MODELS.available()


def build_model(spec: ModelSpec, *, seed: int | None = 42, device: torch.device | str = "cpu") -> nn.Module:
    """Build the victim described by ``spec``, initialised from ``seed``, in ``spec.bn_mode``.

    Args:
        spec: architecture, classes, input size, activation and BN mode.
        seed: seed of the initialisation (the published code uses 42); ``None`` leaves the
            global RNG as it is.
        device: where to put the model.

    Raises:
        UnknownNameError: ``spec.name`` is not registered.
        ConfigError: an invalid activation, BN mode or input size.
    """
    if spec.bn_mode not in ("train", "eval"):
        raise ConfigError(f"bn_mode: expected 'train' or 'eval', got {spec.bn_mode!r}")
    if spec.image_size < 8 or spec.num_classes < 2 or spec.channels < 1:
        raise ConfigError(
            f"model spec: expected image_size >= 8, num_classes >= 2, channels >= 1, got {spec}")
    factory = MODELS.get(spec.name)
    if seed is None:
        model = factory(spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU's alone: CUDA generators stay as they were
            model = factory(spec)
    model.train(spec.bn_mode == "train")
    return model.to(device)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameter entries P(module)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
