"""CI-Net: the over-parameterized convolutional generator of Zhang et al. (ICCV 2023).

Appendix B.1-B.2 of the paper: a fixed random latent z0 goes through a "Linear to Conv" layer to a
4x4 map, then through convolutional blocks, each a x2 upsampling (nearest; bilinear only for the
Figure 8 ablation) followed by two [spectral-norm 3x3 conv, normalization, LeakyReLU], and one
direct output layer. No pixel norm, no ResNet blocks, no two To-RGB layers.

Where the paper is silent, the published code's choices are the defaults: the "Linear to Conv"
layer is a 4x4 transposed convolution of the (nz, 1, 1) latent, followed by BatchNorm and
LeakyReLU(0.1); normalization is BatchNorm (train mode: couples the batch); channels halve at the
64 and 128 px stages; the output layer is a 1x1 convolution and tanh, mapped to [0, 1].

Over-parameterization (Algorithm 1, lines 1-2) picks the channel count:

* ``paper``: the smallest channel count c with P(G_c) > P(F), P(F) = entries of the update.
* ``reference``: c = 32, 64, 128, ... until P(G_c) > 4*N*H*W, counting P on the 32-px generator
  (what the published code does).
* ``auto`` (the default of :class:`~gradleak.attacks.CINetConfig`): the ``reference`` rule with a
  floor of :data:`AUTO_MIN_CHANNELS` channels. Measured on the time-to-quality benchmark (README,
  Performance): the reference rule's 32 channels are too narrow at small batches; 128 channels
  reach SSIM 0.95 in the fewest iterations at batch 8, at nearly the same time per iteration.
* an explicit integer.

Memory: ``checkpoint=True`` keeps only each block's input during the forward pass and recomputes
the block in the backward pass (activation checkpointing). The spectral-norm weights are computed
once per forward, outside the recomputed region, so the recomputation is exact; BatchNorm running
statistics are then not tracked (CI-Net never reads them: the generator runs in train mode, on
batch statistics, from the first step to the final images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint as _checkpoint

from gradleak.errors import ConfigError

AUTO_MIN_CHANNELS = 128
"""The ``auto`` rule's floor (see the module docstring)."""
_UPSAMPLE = ("nearest", "bilinear")
_NORMS = ("batch", "instance", "none")


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "instance":
        return nn.InstanceNorm2d(c, affine=True)
    return nn.Identity()


def stage_channels(channels: int, resolution: int) -> int:
    """Channels of the stage producing ``resolution`` px: halved at 64 px and again at 128 px and above."""
    if resolution <= 32:
        return channels
    if resolution == 64:
        return max(1, channels // 2)
    return max(1, channels // 4)


class CINetGenerator(nn.Module):
    """The CI-Net generator G(z0; theta).

    Args:
        channels: base channel count (the over-parameterization knob).
        image_size: output height = width, a power of two in 8..256.
        out_channels: image channels.
        nz: latent size (100 in the published code).
        upsample: ``"nearest"`` (paper) or ``"bilinear"`` (ProGAN; Figure 8 ablation).
        norm: ``"batch"`` (published code), ``"instance"`` or ``"none"``.
        spectral: spectral normalization on the 3x3 convolutions (paper B.1, item 1).
        negative_slope: LeakyReLU slope (0.1 in the published code).
        checkpoint: activation checkpointing of the upsampling blocks (less memory, one more
            generator forward per step); an attribute, so it can be switched on a built generator.
        progressive: add a To-RGB layer (1x1 convolution) after every block but the last, so that
            ``forward(z, stage, alpha)`` can stop at a lower resolution (progressive growing).

    Shape:
        forward(z): z of shape (N, nz) -> images (N, out_channels, image_size, image_size) in [0, 1].
        forward(z, stage, alpha): the output of block ``stage`` (``4 * 2**(stage + 1)`` px), blended
        with the previous stage's by ``alpha`` (``alpha * this + (1 - alpha) * previous`` before the
        tanh), upsampled (nearest) to ``image_size``; ``stage=None`` is the full generator.
    """

    def __init__(self, *, channels: int, image_size: int = 32, out_channels: int = 3, nz: int = 100,
                 upsample: str = "nearest", norm: str = "batch", spectral: bool = True,
                 negative_slope: float = 0.1, checkpoint: bool = False, progressive: bool = False) -> None:
        super().__init__()
        if image_size < 8 or image_size > 256 or image_size & (image_size - 1):
            raise ConfigError(f"CI-Net image size: expected a power of two in 8..256, got {image_size}")
        if upsample not in _UPSAMPLE:
            raise ConfigError(f"CI-Net upsample: expected one of {', '.join(_UPSAMPLE)}, got {upsample!r}")
        if norm not in _NORMS:
            raise ConfigError(f"CI-Net norm: expected one of {', '.join(_NORMS)}, got {norm!r}")
        if channels < 1:
            raise ConfigError(f"CI-Net channels: expected a positive integer, got {channels}")
        self.nz = nz
        self.image_size = image_size
        self.checkpoint = checkpoint
        self.negative_slope = negative_slope
        c0 = stage_channels(channels, 4)
        self.head = nn.Sequential(nn.ConvTranspose2d(nz, c0, 4, 1, 0, bias=False), _norm(norm, c0),
                                  nn.LeakyReLU(negative_slope))
        blocks: list[nn.Module] = []
        cin, res = c0, 4
        while res < image_size:
            res *= 2
            cout = stage_channels(channels, res)
            up = nn.Upsample(scale_factor=2, mode=upsample, **({} if upsample == "nearest" else {"align_corners": False}))
            layers: list[nn.Module] = [up]
            for a, b in ((cin, cout), (cout, cout)):
                conv = nn.Conv2d(a, b, 3, 1, 1, bias=False)
                layers += [spectral_norm(conv) if spectral else conv, _norm(norm, b), nn.LeakyReLU(negative_slope)]
            blocks.append(nn.Sequential(*layers))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(cin, out_channels, 1)
        self.to_rgb = nn.ModuleList([nn.Conv2d(stage_channels(channels, 8 * 2**k), out_channels, 1)
                                     for k in range(len(blocks) - 1)]) if progressive else None

    def forward(self, z: torch.Tensor, stage: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        last = len(self.blocks) - 1
        if stage is not None and not (0 <= stage <= last and 0.0 <= alpha <= 1.0):
            raise ConfigError(f"CI-Net stage: expected 0..{last} and alpha in [0, 1], got {stage}, {alpha}")
        if stage is not None and self.to_rgb is None and (stage < last or alpha < 1.0):
            raise ConfigError("CI-Net stage: this generator was built without To-RGB layers (progressive=False)")
        end = last if stage is None else stage
        x = self.head(z.view(z.shape[0], self.nz, 1, 1))
        previous = x
        for k in range(end + 1):
            previous = x
            block = self.blocks[k]
            x = (self._checkpointed(block, x) if self.checkpoint and torch.is_grad_enabled()  # type: ignore[arg-type]
                 else block(x))
        rgb = self._rgb(end, x)
        if stage is not None and alpha < 1.0 and end > 0:
            lower = F.interpolate(self._rgb(end - 1, previous), scale_factor=2, mode="nearest")
            rgb = alpha * rgb + (1.0 - alpha) * lower
        images = (torch.tanh(rgb) + 1) / 2
        if end < last:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="nearest")
        return images

    def _rgb(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``k``'s output as pre-tanh images: the output layer for the last block, else its To-RGB."""
        if k == len(self.blocks) - 1:
            return self.out(x)
        assert self.to_rgb is not None
        return self.to_rgb[k](x)

    def _checkpointed(self, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """One block under activation checkpointing; the (spectral-normed) weights are inputs."""
        up, conv1, norm1, _, conv2, norm2, _ = block
        tensors = [conv1.weight, conv2.weight]  # evaluated here, once: no second power iteration
        for norm in (norm1, norm2):
            if not isinstance(norm, nn.Identity):
                tensors += [norm.weight, norm.bias]
        kinds = (type(norm1), type(norm2))
        mode: str = str(up.mode)
        eps, slope = (getattr(norm1, "eps", 0.0), getattr(norm2, "eps", 0.0)), self.negative_slope

        def run(inp: torch.Tensor, *ts: torch.Tensor) -> torch.Tensor:
            h = F.interpolate(inp, scale_factor=2, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
            affine = list(ts[2:])
            for w, kind, e in zip(ts[:2], kinds, eps):
                h = F.conv2d(h, w, padding=1)
                if kind is nn.BatchNorm2d:
                    h = F.batch_norm(h, None, None, affine.pop(0), affine.pop(0), training=True, eps=e)
                elif kind is nn.InstanceNorm2d:
                    h = F.instance_norm(h, weight=affine.pop(0), bias=affine.pop(0), eps=e)
                h = F.leaky_relu(h, slope)
            return h

        return _checkpoint(run, x, *tensors, use_reentrant=False)


def generator_parameters(channels: int, image_size: int, *, out_channels: int = 3, nz: int = 100,
                         norm: str = "batch") -> int:
    """P(G): trainable parameters of a CI-Net generator, counted without building it."""
    na = 2 if norm in ("batch", "instance") else 0
    c0 = stage_channels(channels, 4)
    total = nz * c0 * 16 + na * c0
    cin, res = c0, 4
    while res < image_size:
        res *= 2
        cout = stage_channels(channels, res)
        total += 9 * cin * cout + na * cout + 9 * cout * cout + na * cout
        cin = cout
    return total + cin * out_channels + out_channels


@dataclass(frozen=True)
class ChannelChoice:
    """The outcome of the over-parameterization rule, recorded in every run."""

    rule: str
    channels: int
    generator_parameters: int
    target: int
    victim_parameters: int

    def to_dict(self) -> dict[str, int | str]:
        return dict(rule=self.rule, channels=self.channels, generator_parameters=self.generator_parameters,
                    target=self.target, victim_parameters=self.victim_parameters)


def choose_channels(rule: str | int, *, victim_parameters: int, batch_size: int, image_size: int,
                    out_channels: int = 3, nz: int = 100, norm: str = "batch") -> ChannelChoice:
    """Pick the generator's channel count by an over-parameterization rule.

    Args:
        rule: ``"paper"`` (smallest c with P(G) > P(F)), ``"reference"`` (doubling from 32 until
            P(G_32px) > 4*N*H*W), ``"auto"`` (the same doubling from :data:`AUTO_MIN_CHANNELS`) or
            an explicit positive integer.
        victim_parameters: P(F), the number of entries of the uploaded update.
        batch_size: N.
        image_size: H = W.

    Raises:
        ConfigError: an unknown rule.
    """
    def p(c: int, size: int = image_size) -> int:
        return generator_parameters(c, size, out_channels=out_channels, nz=nz, norm=norm)

    if isinstance(rule, int) or (isinstance(rule, str) and rule.isdigit()):
        c = int(rule)
        if c < 1:
            raise ConfigError(f"CI-Net channels: expected a positive integer, got {c}")
        return ChannelChoice("explicit", c, p(c), 0, victim_parameters)
    if rule == "paper":
        lo, hi = 1, 1
        while p(hi) <= victim_parameters:
            hi *= 2
        while lo < hi:  # P is increasing in c: binary search for the smallest c with P > P(F)
            mid = (lo + hi) // 2
            if p(mid) > victim_parameters:
                hi = mid
            else:
                lo = mid + 1
        return ChannelChoice("paper", lo, p(lo), victim_parameters, victim_parameters)
    if rule in ("reference", "auto"):
        target = 4 * batch_size * image_size * image_size
        c = 32 if rule == "reference" else AUTO_MIN_CHANNELS
        while p(c, 32) <= target:
            c *= 2
        return ChannelChoice(rule, c, p(c), target, victim_parameters)
    raise ConfigError(f"CI-Net channel rule: expected 'paper', 'reference', 'auto' or a positive integer, "
                      f"got {rule!r}")


def latent(batch_size: int, nz: int, *, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed latent z0 ~ N(0, I), one row per image, drawn once."""
    return torch.randn(batch_size, nz, generator=generator).to(device)


__all__ = ["CINetGenerator", "ChannelChoice", "choose_channels", "generator_parameters", "latent",
           "stage_channels"]
