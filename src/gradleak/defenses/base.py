"""The defense contract: a pure transform ``Defense(update, *, generator) -> ClientUpdate``.

A defense never modifies its input, never touches a model, and draws every random number from
the ``torch.Generator`` it is handed, so the same generator state gives the same defended update.
Each defense appends its registry name to ``update.defenses`` and a record
``{"name": ..., <its parameters>}`` to ``update.metadata["defense_params"]``; that record is public
metadata, so it never holds a statistic of the private data (e.g. the norm before clipping).

Defenses that need the client's private data (DP-SGD clips each sample's gradient) cannot act on
a finished update; they set ``client_side = True`` and are applied through
:func:`gradleak.defenses.defended_update`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gradleak.errors import ConfigError
from gradleak.registry import Registry
from gradleak.types import ClientUpdate

DEFENSES: Registry[Callable[..., Defense]] = Registry("defense")


class Defense(ABC):
    """Base class of every defense: a frozen dataclass of parameters plus a tensor transform.

    Subclasses are frozen dataclasses, set ``name`` (their kebab-case registry name), validate
    their parameters in ``__post_init__`` and implement :meth:`transform`.
    """

    name: ClassVar[str] = "defense"
    client_side: ClassVar[bool] = False

    @abstractmethod
    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The defended tensors (new tensors; the inputs are not modified)."""

    def __call__(self, update: ClientUpdate, *, generator: torch.Generator) -> ClientUpdate:
        """Apply the defense to ``update`` and record it.

        Args:
            update: the update as the client computed it.
            generator: source of every random draw.

        Returns:
            A new ``ClientUpdate`` with the transformed tensors, the defense's name appended to
            ``defenses`` and its parameters appended to ``metadata["defense_params"]``.

        Raises:
            ConfigError: ``generator`` is not a ``torch.Generator``.
        """
        check_generator(generator)
        tensors = self.transform(dict(update.tensors), generator=generator)
        return record(update, self, tensors)

    def params(self) -> dict[str, Any]:
        """The defense's parameters, JSON-serialisable."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def parts(self) -> list[Defense]:
        """The single defenses this one applies, in order (one, none for ``none``, several for a composition)."""
        return [self]

    def spec(self) -> str:
        """The string :func:`gradleak.defenses.parse_defense` reads back into an equal defense."""
        values = [f"{k}={_format(v)}" for k, v in self.params().items() if v is not None]
        return ":".join([self.name, *values])

    def __str__(self) -> str:
        return self.spec()


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def check_generator(generator: Any) -> None:
    """Raise :class:`ConfigError` unless ``generator`` is a ``torch.Generator``."""
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"defense generator: expected a torch.Generator, got {type(generator).__name__}")


def record(update: ClientUpdate, defense: Defense, tensors: dict[str, torch.Tensor],
           **extra: Any) -> ClientUpdate:
    """``update`` with new tensors and ``defense`` recorded in ``defenses`` and ``metadata``."""
    entry = {"name": defense.name, **defense.params(), **extra}
    metadata = {**update.metadata, "defense_params": [*update.metadata.get("defense_params", []), entry]}
    return update.replace(tensors=tensors, defenses=(*update.defenses, defense.name), metadata=metadata)


def declare_defense(update: ClientUpdate, defense: Defense) -> ClientUpdate:
    """``update`` with ``defense`` recorded as applied, its tensors unchanged.

    For updates defended outside gradleak (a Flower client with its own DP or compression): the
    record is what lets an auditor attack them with the adaptive attacker.

    Example:
        >>> from gradleak.defenses import parse_defense
        >>> u = declare_defense(ClientUpdate(tensors={"w": torch.ones(2)}), parse_defense("clip:1+noise:0.1"))
        >>> u.defenses, u.metadata["defense_params"][1]
        (('clip', 'noise'), {'name': 'noise', 'sigma': 0.1})
    """
    for part in defense.parts():
        update = record(update, part, dict(update.tensors))
    return update


def check_number(owner: str, what: str, value: Any, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True, integer: bool = False) -> None:
    """Raise :class:`ConfigError` ("expected X, got Y") unless ``value`` lies in the interval."""
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok:
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        top = "inf" if math.isinf(high) else _format(high)
        raise ConfigError(f"defense '{owner}' {what}: expected {kind} in {lo}{_format(low)}, {top}{hi}, got {value!r}")


@DEFENSES.register("none")
@dataclass(frozen=True)
class IdentityDefense(Defense):
    """No defense: returns the update unchanged and records nothing (the audit's baseline)."""

    name: ClassVar[str] = "none"

    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return tensors

    def __call__(self, update: ClientUpdate, *, generator: torch.Generator) -> ClientUpdate:
        check_generator(generator)
        return update

    def parts(self) -> list[Defense]:
        return []


@dataclass(frozen=True)
class ComposeDefense(Defense):
    """Several defenses applied in order, sharing one generator (e.g. clipping, then noise).

    Args:
        defenses: the defenses, first applied first.
    """

    defenses: tuple[Defense, ...] = ()
    name: ClassVar[str] = "compose"

    def __post_init__(self) -> None:
        for d in self.defenses:
            if not isinstance(d, Defense):
                raise ConfigError(f"compose: expected Defense objects, got {type(d).__name__}")

    def parts(self) -> list[Defense]:
        return [p for d in self.defenses for p in d.parts()]

    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError("ComposeDefense applies its parts through __call__")

    def __call__(self, update: ClientUpdate, *, generator: torch.Generator) -> ClientUpdate:
        check_generator(generator)
        parts = self.parts()
        for k, part in enumerate(parts):
            if part.client_side:
                raise ConfigError(f"defense '{self.spec()}': expected transforms of a finished update, got the "
                                  f"client-side defense '{part.name}' at position {k}; apply it with "
                                  "gradleak.defenses.defended_update(server, images, labels, defense=...)")
        for part in parts:
            update = part(update, generator=generator)
        return update

    def params(self) -> dict[str, Any]:
        return {"defenses": [{"name": p.name, **p.params()} for p in self.parts()]}

    def spec(self) -> str:
        parts = self.parts()
        return "+".join(p.spec() for p in parts) if parts else "none"


def compose(*defenses: Defense) -> Defense:
    """One defense applying ``defenses`` in order; ``compose()`` is the identity.

    Example:
        >>> from gradleak.defenses import NormClipDefense, GaussianNoiseDefense
        >>> d = compose(NormClipDefense(max_norm=1.0), GaussianNoiseDefense(sigma=0.01))
        >>> d.spec()
        'clip:max_norm=1.0+noise:sigma=0.01'
    """
    parts = [p for d in defenses for p in (d.parts() if isinstance(d, Defense) else [d])]
    if not parts:
        return IdentityDefense()
    if len(parts) == 1:
        return parts[0]
    return ComposeDefense(tuple(parts))
