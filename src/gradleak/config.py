"""Settings from outside (files, ``--set``, sweep grids, run folders) into frozen config dataclasses.

One path for every config: :func:`from_dict` refuses unknown keys and values of the wrong type,
reading the types from the dataclass's annotations (a ``bool`` field takes only ``true``/``false``,
an ``int`` field no ``2.7`` and no ``"abc"``); the dataclass's own ``__post_init__`` then checks
ranges and choices. :func:`split_preset` reads the one preset syntax, ``attack:preset``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from gradleak.errors import ConfigError

C = TypeVar("C")


def from_dict(cls: type[C], data: Any, *, what: str | None = None) -> C:
    """Build config ``cls`` from the mapping ``data``, every value checked against its annotation.

    Args:
        cls: a dataclass.
        data: a mapping of field names to values (JSON-like: lists stand for tuples).
        what: how the error messages name the config (default: the class name).

    Raises:
        ConfigError: ``data`` is not a mapping, holds an unknown key, or a value of the wrong type;
            or the dataclass's own checks refuse a value.
    """
    what = what or cls.__name__
    hints = typing.get_type_hints(cls)
    check_keys(data, [f.name for f in dataclasses.fields(cls) if f.init], what)  # type: ignore[arg-type]
    required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{what}: expected {', '.join(repr(k) for k in missing)} (required), got none")
    values = {k: check_value(f"{what} {k}", hints[k], v) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise  # the dataclass's own check, which names the field
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from None


def check_keys(data: Any, names: list[str] | set[str], what: str) -> None:
    """Refuse a ``data`` that is not a mapping or holds a key outside ``names`` (naming the valid ones)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected a mapping of options, got {type(data).__name__} {short(data)}")
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(names))}")


def check_value(name: str, annotation: Any, value: Any) -> Any:
    """``value`` if it fits ``annotation`` (ints widen to float, lists become tuples), else ConfigError."""
    ok, out = _fits(annotation, value)
    if not ok:
        raise ConfigError(f"{name}: expected {_describe(annotation)}, got {short(value)}")
    return out


def _fits(annotation: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            ok, out = _fits(arm, value)
            if ok:
                return True, out
        return False, value
    if annotation is Any:
        return True, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if origin is typing.Literal:
        return value in typing.get_args(annotation), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        pairs = [_fits(item, v) for v in value]
        return all(ok for ok, _ in pairs), tuple(out for _, out in pairs)
    if origin in (list, dict) or annotation in (list, dict):
        return isinstance(value, origin or annotation), value
    return True, value  # a type this module does not check (left to the dataclass)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "true or false"
    if annotation in (int, float, str):
        return {int: "an integer", float: "a number", str: "a string"}[annotation]
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if origin is tuple:
        args = typing.get_args(annotation)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values') if args else 'values'}"
    return getattr(annotation, "__name__", str(annotation))


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_ranges(what: str, config: Any, **bounds: tuple[Any, ...]) -> None:
    """Refuse the first field of ``config`` outside its bounds, naming it and its value.

    ``bounds``: field name -> ``(low, high)`` inclusive (None: unbounded), or ``(low, high, "open")``
    for a low bound the value must exceed (``lr=(0, None, "open")``: lr > 0).
    """
    for name, bound in bounds.items():
        low, high = bound[0], bound[1]
        open_low = len(bound) > 2 and bound[2] == "open"
        value = getattr(config, name)
        below = low is not None and (value <= low if open_low else value < low)
        if below or (high is not None and value > high):
            want = (f"> {low}" if open_low else f">= {low}") if high is None else (
                f"{low} to {high}" if not open_low else f"> {low} and <= {high}")
            raise ConfigError(f"{what} {name}: expected {want}, got {value}")


def split_preset(text: str) -> tuple[str, str | None]:
    """``"cinet:demo"`` -> ``("cinet", "demo")``; ``"cinet"`` -> ``("cinet", None)``.

    The one preset syntax of the CLI, compare, sweeps and ``gradleak list presets``.
    """
    name, sep, preset = str(text).partition(":")
    if not name or (sep and not preset):
        raise ConfigError(f"preset: expected ATTACK or ATTACK:PRESET (gradleak list presets), got {text!r}")
    return name, preset or None
