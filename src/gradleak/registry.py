"""A small generic registry: pluggable components are looked up by kebab-case name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from gradleak.errors import ConfigError, UnknownNameError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Maps names to factories of one kind of component (attacks, models, defenses, ...).

    ``F`` is the factory's type: ``Registry[type[Attack]]`` for classes, ``Registry[Callable[..., X]]``
    for functions.

    Args:
        kind: what the registry holds, used in error messages ("attack", "model", ...).

    Example:
        >>> reg = Registry[Callable[[], int]]("number")
        >>> _ = reg.register("one")(lambda: 1)
        >>> reg.create("one")
        1
        >>> reg.available()
        ['one']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str, *, force: bool = False) -> Callable[[F], F]:
        """Decorator registering a factory (a class or a function) under ``name``."""

        def deco(factory: F) -> F:
            if name in self._entries and not force:
                raise ConfigError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = factory
            return factory

        return deco

    def get(self, name: str) -> F:
        """The factory registered as ``name``; raises :class:`UnknownNameError` otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; expected one of: {', '.join(self.available())}"
            ) from None

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Build the component registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
