"""A malicious server's trap weights: units that each fire for about one image of a batch.

The server sends ``Sequential(TrapBlock, victim)``. The block's ``k`` ReLU units read the raw
image along random directions whose entries sum to zero (so a change of overall brightness does
not move them), and each unit's bias is set so that it fires for a fraction ``fire_rate`` of the
images the server assumes (public images of the clients' kind, :func:`gradleak.data.public_images`;
default ``1 / batch``). Its output
goes back into the image through a small random decoder, so the victim sees its input almost
unchanged. A unit that fired for one image ``x`` alone has, in the FedSGD gradient of the mean loss,

    grad_W[i] = g_i(x) x / N,    grad_b[i] = g_i(x) / N,

so ``x = grad_W[i] / grad_b[i]``, exactly, whatever the victim. A unit that fired for several
images gives a blend of them; the attack (:mod:`gradleak.attacks.trap`) keeps the ratios that
several units agree on, since one image alone in several units comes back identical from each,
and a blend of the same images rarely does.

Unlike the imprint block (:mod:`gradleak.threat.malicious`), whose rows are identical and whose
decoder columns are equal, trap rows point in random directions and the decoder is random. The
client's check finds them by their zero-sum rows in the arrays alone (``zero-sum-rows``, which a
server can evade by giving the rows a mean), and by which units fire for almost none of the
client's own images (:func:`gradleak.threat.inspect.inspect_arrays` with ``images``; units set for
batches of 4 or fewer fire too often to be caught this way).

References:
    Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot, "When the Curious Abandon
    Honesty: Federated Learning Is Not Private", EuroS&P 2023 (trap weights; here with
    zero-sum rows and biases set from public images instead of scaled negative weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.types import ServerState


class TrapBlock(nn.Module):
    """``x + decoder(relu(encoder(flatten(x))))`` with ``k`` trap units.

    Args:
        input_shape: (C, H, W) of one input image.
        units: k, the number of ReLU units.
        public: images the server holds (P, C, H, W) in [0, 1], of the kind the clients hold; each
            unit's bias is the ``1 - fire_rate`` quantile of its response to them. None builds the
            layer with zero biases (for loading a state whose biases come from a file).
        fire_rate: the fraction of images each unit should fire for (about one image per batch:
            ``1 / batch``).
        seed: the random directions' seed.
        scale: the size of the decoder's output relative to the input (small: the victim's input
            barely changes).
        gain: the encoder's scale, as for the imprint block: small weights keep a FedAvg delta's
            trap rows above float32's resolution (default 1e-3).

    Example:
        >>> block = TrapBlock((3, 8, 8), units=32, public=torch.rand(64, 3, 8, 8), fire_rate=0.05)
        >>> fired = (block.preactivation(torch.rand(200, 3, 8, 8)) > 0).float().mean()
        >>> bool(0.0 < fired < 0.2)
        True
    """

    def __init__(self, input_shape: tuple[int, int, int], units: int, *, public: torch.Tensor | None = None,
                 fire_rate: float = 0.05, seed: int = 0, scale: float = 1e-2, gain: float = 1e-3) -> None:
        super().__init__()
        if isinstance(units, bool) or not isinstance(units, int) or units < 2:
            raise ConfigError(f"trap units: expected an integer of at least 2, got {units!r}")
        if not 0 < fire_rate < 1:
            raise ConfigError(f"trap fire_rate: expected a number in (0, 1), got {fire_rate!r}")
        if not (math.isfinite(gain) and gain > 0):
            raise ConfigError(f"trap gain: expected a positive number, got {gain!r}")
        d = math.prod(input_shape)
        self.input_shape = tuple(input_shape)
        self.encoder = nn.Linear(d, units)
        self.decoder = nn.Linear(units, d, bias=False)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(units, d, generator=g, dtype=torch.float64)
        rows -= rows.mean(1, keepdim=True)  # zero-sum: blind to overall brightness
        rows /= rows.norm(dim=1, keepdim=True)
        if public is None:
            cut = torch.zeros(units, dtype=torch.float64)
        else:
            if public.dim() != 4 or tuple(public.shape[1:]) != self.input_shape or public.shape[0] < 2:
                raise ConfigError(f"trap public images: expected (P >= 2, {', '.join(map(str, self.input_shape))}), "
                                  f"got {tuple(public.shape)}")
            cut = torch.quantile(public.flatten(1).double() @ rows.T, 1 - fire_rate, dim=0)
        with torch.no_grad():
            self.encoder.weight.copy_(gain * rows)
            self.encoder.bias.copy_(-gain * cut)
            dec = torch.randn(d, units, generator=g) * (scale / math.sqrt(units) / gain)
            self.decoder.weight.copy_(dec)

    @property
    def units(self) -> int:
        return int(self.encoder.out_features)

    def preactivation(self, images: torch.Tensor) -> torch.Tensor:
        """Each unit's input before the ReLU, (N, k): a unit fires for an image where it is positive."""
        return images.flatten(1) @ self.encoder.weight.detach().T + self.encoder.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.decoder(torch.relu(self.encoder(x.flatten(1)))).view_as(x)


def trap_model(server: ServerState, units: int, *, public: torch.Tensor, batch_size: int, seed: int = 0,
               gain: float = 1e-3) -> ServerState:
    """The model a malicious server sends instead of ``server.model``: trap units in front of it.

    Each unit fires for about one of ``batch_size`` images (``fire_rate = 1 / batch_size``, set on
    ``public``). The victim's own weights are unchanged; its parameter names gain the prefix
    ``1.``, the block's are ``0.encoder.weight``, ``0.encoder.bias`` and ``0.decoder.weight``.
    """
    if batch_size < 1:
        raise ConfigError(f"trap batch_size: expected at least 1, got {batch_size}")
    block = TrapBlock(server.input_shape, units, public=public, fire_rate=min(0.5, 1.0 / batch_size), seed=seed,
                      gain=gain)
    return ServerState(model=nn.Sequential(block, server.model), input_shape=server.input_shape,
                       num_classes=server.num_classes, bn_mode=server.bn_mode, spec=None)


def find_trap(model: nn.Module) -> TrapBlock | None:
    """The trap block a model starts with (``Sequential(TrapBlock, ...)``), else ``None``."""
    if isinstance(model, nn.Sequential) and len(model) > 0 and isinstance(model[0], TrapBlock):
        return model[0]
    return None


__all__ = ["TrapBlock", "find_trap", "trap_model"]
