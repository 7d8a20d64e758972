"""Applying a defense on the client: what a client holding a private batch uploads under it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradleak.defenses.base import Defense
from gradleak.defenses.parse import parse_defense
from gradleak.errors import ConfigError
from gradleak.threat.fedsgd import fedsgd_update
from gradleak.types import ClientUpdate, ServerState

ClientFn = Callable[[ServerState, torch.Tensor, torch.Tensor], ClientUpdate]


def defended_update(
    server: ServerState,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    defense: Defense | str,
    generator: torch.Generator,
    client: ClientFn | None = None,
) -> ClientUpdate:
    """What a client holding ``(images, labels)`` uploads under ``defense``.

    A client-side defense (``dpsgd``) must come first and replaces the client protocol (one DP-SGD
    gradient); every other defense transforms the update ``client`` computed, in order.

    Args:
        server: the global model (not modified).
        images: the private batch, shape (N, C, H, W), range [0, 1].
        labels: shape (N,).
        defense: a :class:`Defense` or a string for :func:`parse_defense`.
        generator: source of every random draw.
        client: the client protocol (default :func:`gradleak.threat.fedsgd_update`; e.g. a
            ``functools.partial`` of :func:`gradleak.threat.fedavg_update`).

    Raises:
        ConfigError: a client-side defense that is not first, or combined with ``client``.

    Example:
        >>> from gradleak.models import build_model
        >>> from gradleak.types import ModelSpec
        >>> spec = ModelSpec("linear", image_size=8)
        >>> server = ServerState.from_spec(build_model(spec), spec)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> u = defended_update(server, x, y, defense="dpsgd:1.0+prune:0.5", generator=torch.Generator())
        >>> u.defenses, round(u.metadata["privacy"]["epsilon"], 2)
        (('dpsgd', 'prune'), 4.73)
    """
    if isinstance(defense, str):
        defense = parse_defense(defense)
    parts = defense.parts()
    for k, part in enumerate(parts[1:], start=1):
        if part.client_side:
            raise ConfigError(f"defense '{defense.spec()}': expected the client-side defense '{part.name}' first "
                              f"(it computes the update), got it at position {k}")
    if parts and parts[0].client_side:
        if client is not None:
            raise ConfigError(f"defense '{parts[0].name}': expected client=None (it replaces the client protocol "
                              f"with one DP-SGD gradient), got {getattr(client, '__name__', type(client).__name__)}")
        update = parts[0].client_update(server, images, labels, generator=generator)  # type: ignore[attr-defined]
        parts = parts[1:]
    else:
        update = (client or fedsgd_update)(server, images, labels)
    for part in parts:
        update = part(update, generator=generator)
    return update
