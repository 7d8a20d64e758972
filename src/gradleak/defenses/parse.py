"""Defense strings (CLI and audit grids) and the defense an update records.

Grammar, one defense setting:  ``part ("+" part)*``  with  ``part := name (":" arg)*``  and
``arg := value | key "=" value``. Positional values fill the defense's parameters in order
(``noise:1e-3`` is ``GaussianNoiseDefense(sigma=1e-3)``, ``dpsgd:1.0:2.0`` is sigma 1, C 2);
``+`` composes (``clip:1+noise:1e-3`` clips, then adds noise); ``none`` is no defense.
A list of settings is comma-separated: ``none,noise:1e-3,prune:0.9,dpsgd:1.0``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gradleak.defenses.base import DEFENSES, Defense, IdentityDefense, compose
from gradleak.errors import ConfigError, UnknownNameError, UpdateError
from gradleak.types import ClientUpdate


def _convert(text: str, annotation: Any, *, where: str, field: str) -> Any:
    kind = str(annotation).replace(" ", "")
    try:
        if kind in ("int", "int|None"):
            if text.lower() in ("none", "null") and kind.endswith("None"):
                return None
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if kind in ("float", "float|None"):
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
    except ValueError:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind.split("|")[0]]
        raise ConfigError(f"defense '{where}' {field}: expected {expected}, got {text!r}") from None
    return text


def _parse_part(text: str) -> Defense:
    name, *args = [t.strip() for t in text.split(":")]
    if not name:
        raise ConfigError(f"defense '{text}': expected a name such as {', '.join(DEFENSES.available())}, got ''")
    try:
        cls = DEFENSES.get(name)
    except UnknownNameError:
        raise UnknownNameError(f"defense '{text}': unknown defense '{name}'; expected one of: "
                               f"{', '.join(DEFENSES.available())}") from None
    fields: list[dataclasses.Field[Any]] = list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []
    names = [f.name for f in fields]
    values: dict[str, Any] = {}
    for k, arg in enumerate(args):
        if "=" in arg:
            key, raw = (s.strip() for s in arg.split("=", 1))
            if key not in names:
                raise ConfigError(f"defense '{text}': expected parameters among ({', '.join(names) or 'none'}), "
                                  f"got {key!r}")
        else:
            if k >= len(names):
                raise ConfigError(f"defense '{text}': expected at most {len(names)} value(s) "
                                  f"({', '.join(names) or 'none'}), got {len(args)}")
            key, raw = names[k], arg
        if key in values:
            raise ConfigError(f"defense '{text}': expected {key} once, got it twice")
        if raw == "":
            raise ConfigError(f"defense '{text}' {key}: expected a value, got ''")
        values[key] = _convert(raw, next(f.type for f in fields if f.name == key), where=text, field=key)
    missing = [f.name for f in fields
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"defense '{text}': expected a value for {', '.join(missing)} (e.g. '{name}:0.1'), got none")
    return cls(**values)


def parse_defense(text: str) -> Defense:
    """One defense setting from its string, e.g. ``"noise:1e-3"``, ``"clip:1+noise:1e-2"``, ``"none"``.

    Raises:
        ConfigError: the string does not parse, names an unknown defense (:class:`UnknownNameError`),
            or a parameter is out of range (``sparsity`` outside [0, 1), ``sigma < 0``, ...).

    Example:
        >>> parse_defense("prune:0.9")
        TopKPruneDefense(sparsity=0.9)
        >>> parse_defense("clip:max_norm=2+noise:1e-3").spec()
        'clip:max_norm=2.0+noise:sigma=0.001'
    """
    if not isinstance(text, str):
        raise ConfigError(f"defense: expected a string such as 'noise:1e-3', got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ConfigError("defense: expected a string such as 'noise:1e-3', got ''")
    if "," in stripped:
        raise ConfigError(f"defense '{text}': expected one setting, got a comma-separated list (use parse_defenses)")
    # '+' before a name composes; '+' inside a number ('1e+3') does not
    parts = [p.strip() for p in re.split(r"\+(?=\s*[A-Za-z])", stripped)]
    if any(not p or p.endswith("+") for p in parts) or stripped.startswith("+"):
        raise ConfigError(f"defense '{text}': expected defenses on both sides of '+', got an empty part")
    defenses = [_parse_part(p) for p in parts]
    if len(defenses) > 1 and any(isinstance(d, IdentityDefense) for d in defenses):
        raise ConfigError(f"defense '{text}': expected 'none' alone, got it inside a composition")
    return compose(*defenses) if len(defenses) > 1 else defenses[0]


def parse_defenses(text: str) -> list[Defense]:
    """A comma-separated list of defense settings (an audit grid), e.g. ``"none,noise:1e-3,prune:0.9,dpsgd:1.0"``.

    Raises:
        ConfigError: an empty item, or any item :func:`parse_defense` rejects (its message names it).

    Example:
        >>> [d.spec() for d in parse_defenses("none, noise:1e-3, dpsgd:1.0")]
        ['none', 'noise:sigma=0.001', 'dpsgd:noise_multiplier=1.0:max_grad_norm=1.0:delta=1e-05:rounds=1']
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"defenses: expected a comma-separated list such as 'none,noise:1e-3', got {text!r}")
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise ConfigError(f"defenses '{text}': expected a defense between every pair of commas, got an empty item")
    return [parse_defense(t) for t in items]


def split_defenses(text: str) -> list[str]:
    """The settings of a comma-separated list as written, each checked by :func:`parse_defenses`.

    Example:
        >>> split_defenses(" none, noise:1e-3 ")
        ['none', 'noise:1e-3']
    """
    parse_defenses(text)  # its errors name the bad item (empty list, empty item, unknown name, range)
    return [t.strip() for t in text.split(",")]


def recorded_defense(update: ClientUpdate) -> Defense:
    """The defense an update records (``defenses`` and ``metadata["defense_params"]``), rebuilt.

    An aggregate's own record lists every defense any client applied; each client's record is in
    ``metadata["clients"][k]`` (read it with ``recorded_defense`` on a per-client update).

    Raises:
        UpdateError: a recorded name that is not a registered defense, a ``defense_params`` list that
            does not match ``defenses`` one to one, a record without a required parameter, or a
            parameter out of range.

    Example:
        >>> import torch
        >>> from gradleak.defenses import parse_defense
        >>> u = ClientUpdate(tensors={"w": torch.ones(4)})
        >>> recorded_defense(parse_defense("clip:2+prune:0.5")(u, generator=torch.Generator())).spec()
        'clip:max_norm=2.0+prune:sparsity=0.5'
    """
    names = list(update.defenses)
    params = update.metadata.get("defense_params", [])
    if not isinstance(params, list) or len(params) != len(names) or not all(isinstance(p, dict) for p in params):
        raise UpdateError(f"update defenses {names}: expected one record per defense in metadata['defense_params'] "
                          f"(its name and parameters), got {params!r:.120}")
    parts = []
    for k, (name, record) in enumerate(zip(names, params)):
        if record.get("name") != name:
            raise UpdateError(f"update defense {k} '{name}': expected its record in defense_params[{k}] to name it, "
                              f"got {record.get('name')!r}")
        if name not in DEFENSES.available():
            raise UpdateError(f"update defense '{name}': expected one of {', '.join(DEFENSES.available())} "
                              "(an attacker that knows the defense must know what it is), got an unknown name")
        cls = DEFENSES.get(name)
        fields: dict[str, dataclasses.Field[Any]] = (
            {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {})
        missing = [f for f, spec in fields.items() if f not in record
                   and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING]
        if missing:
            raise UpdateError(f"update defense '{name}': expected its parameter(s) {', '.join(missing)} in "
                              f"defense_params[{k}], got {sorted(k2 for k2 in record if k2 != 'name')}")
        try:
            parts.append(cls(**{f: record[f] for f in fields if f in record}))
        except (ConfigError, TypeError) as e:
            raise UpdateError(f"update defense '{name}' as recorded: {e}") from None
    return compose(*parts)
