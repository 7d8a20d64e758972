"""A malicious server: the imprint block of "Robbing the Fed", put in front of any victim model.

The server sends ``Sequential(ImprintBlock, victim)``. The block measures one statistic of each
input, ``h(x) = <w, x>`` (by default the mean brightness), and feeds it into ``k`` ReLU units
whose biases are the negated thresholds ``c_0 < c_1 < ... < c_{k-1}``: unit ``i`` fires for every
image with ``h(x) > c_i``. Its output goes back into the image through a decoder whose columns are
all equal and tiny, so the victim sees its input almost unchanged and every unit receives the same
backward signal ``g(x)`` from a given image. Then, for the FedSGD gradient of the mean loss,

    grad_W[i] - grad_W[i+1] = sum over images with c_i < h(x) <= c_{i+1} of g(x) x / N
    grad_b[i] - grad_b[i+1] = sum over the same images of g(x) / N

and an image alone in its bin is their ratio, exactly (up to float rounding), whatever the
victim's activations and however large the batch. The thresholds are quantiles of the
distribution the server assumes for the statistic, so that the bins are equally likely to be hit.

The sparse block (``sparse=True``, the paper's variant for several local steps) clips unit ``i``
to the window ``[0, c_{i+1} - c_i]`` (times the gain): it is flat, without gradient, below ``c_i``
and above ``c_{i+1}``, so an image feeds the one unit of its own bin. Then bin ``i``'s image is
``grad_W[i] / grad_b[i]`` with no difference of bins, and over several local steps the unit's
weight and bias changes are sums of the same image's ``g_s x`` and ``g_s``: their ratio is still
``x``, where the cumulative block's differences mix the steps of images of neighbouring bins.

References:
    Fowl, Geiping, Czaja, Goldblum, Goldstein, "Robbing the Fed: Directly Obtaining Private Data in
    Federated Learning with Modified Models", ICLR 2022 (Section 3, the imprint module).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.types import ServerState

BRIGHTNESS = NormalDist(mu=0.46, sigma=0.12)
"""The mean-brightness distribution the server assumes by default (natural photos in [0, 1])."""


class ImprintBlock(nn.Module):
    """``x + decoder(relu(encoder(flatten(x))))`` with ``k`` bins on the statistic ``<w, x>``.

    Args:
        input_shape: (C, H, W) of one input image.
        bins: k, the number of ReLU units (bins).
        thresholds: the k increasing thresholds ``c_i`` (default: quantiles of :data:`BRIGHTNESS`
            at ``(i + 1) / (k + 1)``).
        scale: the decoder's constant weight at gain 1; small, so the victim's input barely changes.
        sparse: the sparse (windowed) units instead of cumulative ReLUs (see the module's text).
        gain: the encoder's scale: its rows are ``gain / D`` and its biases ``-gain * c_i``, the
            decoder's weight ``scale / gain``, so the block computes the same function at any gain.
            A FedAvg client uploads ``theta_after - theta_before``, and the block's gradient is then
            below float32's resolution of its weights at gain 1 (they cancel); a small gain makes the
            weights small and their gradient large (``gain^-2`` relative), and the delta keeps the images.
            Default 1e-3: measured on LeNet-ReLU, 64 built-in images, 1024 bins, a one-step full-batch
            FedAvg delta (lr 0.1) gives 0 images at PSNR >= 40 dB at gain 1, 5 at 1e-2, 50 at 1e-3;
            a FedSGD gradient gives 60 at each.

    Example:
        >>> block = ImprintBlock((3, 8, 8), bins=16)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> bool((block(x) - x).abs().max() < 1e-2)
        True
    """

    def __init__(self, input_shape: tuple[int, int, int], bins: int, *, thresholds: torch.Tensor | None = None,
                 scale: float | None = None, gain: float = 1e-3, sparse: bool = False) -> None:
        super().__init__()
        self.sparse = bool(sparse)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ConfigError(f"imprint bins: expected an integer of at least 2, got {bins!r}")
        d = math.prod(input_shape)
        self.input_shape = tuple(input_shape)
        self.encoder = nn.Linear(d, bins)
        self.decoder = nn.Linear(bins, d, bias=False)
        if thresholds is None:
            thresholds = torch.tensor([BRIGHTNESS.inv_cdf((i + 1) / (bins + 1)) for i in range(bins)])
        if thresholds.shape != (bins,) or not bool((thresholds[1:] > thresholds[:-1]).all()):
            raise ConfigError(f"imprint thresholds: expected {bins} increasing values, got shape "
                              f"{tuple(thresholds.shape)}")
        if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
            raise ConfigError(f"imprint gain: expected a positive number, got {gain!r}")
        with torch.no_grad():
            self.encoder.weight.fill_(gain / d)  # every row measures the mean brightness (times the gain)
            self.encoder.bias.copy_(-gain * thresholds.float())
            self.decoder.weight.fill_(((1e-2 / bins) if scale is None else scale) / gain)

    @property
    def bins(self) -> int:
        return int(self.encoder.out_features)

    @property
    def gain(self) -> float:
        """The encoder's scale, read off its first row (``gain / D`` per entry)."""
        return float(self.encoder.weight[0].detach().sum())

    def thresholds(self) -> torch.Tensor:
        return -self.encoder.bias.detach() / self.gain

    def statistic(self, images: torch.Tensor) -> torch.Tensor:
        """``h(x)`` per image: the quantity the bins cut (the first encoder row, over the gain)."""
        return images.flatten(1) @ self.encoder.weight[0].detach() / self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.encoder(x.flatten(1)))
        if self.sparse:  # each unit's window ends where the next bin starts: b_i - b_{i+1} = gain (c_{i+1} - c_i)
            b = self.encoder.bias.detach()
            width = torch.cat([b[:-1] - b[1:], torch.full_like(b[:1], float("inf"))])
            z = torch.minimum(z, width)  # flat above the window: no gradient reaches the unit
        return x + self.decoder(z).view_as(x)


def imprint_model(server: ServerState, bins: int, *, thresholds: torch.Tensor | None = None,
                  gain: float = 1e-3, sparse: bool = False) -> ServerState:
    """The model a malicious server sends instead of ``server.model``: an imprint block in front of it.

    The victim's own weights are unchanged; its parameter names gain the prefix ``1.``, the block's
    are ``0.encoder.weight``, ``0.encoder.bias`` and ``0.decoder.weight``.
    """
    block = ImprintBlock(server.input_shape, bins, thresholds=thresholds, gain=gain, sparse=sparse)
    model = nn.Sequential(block, server.model)
    return ServerState(model=model, input_shape=server.input_shape, num_classes=server.num_classes,
                       bn_mode=server.bn_mode, spec=None)


def find_imprint(model: nn.Module) -> ImprintBlock | None:
    """The imprint block a model starts with (``Sequential(ImprintBlock, ...)``), else ``None``."""
    if isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(model[0], ImprintBlock):
        return model[0]
    return None


def find_sparse_imprint(model: nn.Module) -> ImprintBlock | None:
    """The sparse imprint block a model starts with, else ``None``."""
    block = find_imprint(model)
    return block if block is not None and block.sparse else None


__all__ = ["BRIGHTNESS", "ImprintBlock", "find_imprint", "find_sparse_imprint", "imprint_model"]
