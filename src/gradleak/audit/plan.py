"""The audit's plan: cells (protocol x batch size x defense) x attacks x attacker knowledge x seeds.

A cell is what the client does (:class:`AuditCell`). An attacker is one attack with one assumption
about what its user knows (:class:`Attacker`): the defense (simulated by the adaptive attacker, or
ignored) and the labels (recovered from the update, or known: the client's true label multiset,
as an attacker who knows which classes a client holds has them). Each attacker runs with every
seed; a cell's verdict is the worst case over all of them (:mod:`gradleak.audit.verdicts`).

``--attacks auto`` selects every registered attack that applies to the victim
(:meth:`gradleak.attacks.Attack.applicability`): ``analytic`` only on a one-layer victim, ``gias``
only with a pretrained generator; an attack that lands in the registry joins the audit.

References:
    Carlini et al., "On Evaluating Adversarial Robustness", 2019 (the worst case over attacks and
    what was not tried).
    Carletti et al., "SoK: Gradient Inversion Attacks in Federated Learning", USENIX Security 2025
    (threat models by what the attacker knows).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradleak.attacks import ATTACKS
from gradleak.attacks.base import resolve_config
from gradleak.data import public_images
from gradleak.defenses import Defense, parse_defense
from gradleak.errors import ConfigError
from gradleak.threat import fedavg_update, fedsgd_update
from gradleak.types import ClientUpdate, ServerState


@dataclass(frozen=True)
class ProtocolSetting:
    """How a client computes its update in one audit cell.

    Args:
        protocol: ``"fedsgd"`` or ``"fedavg"``.
        local_steps: S, local SGD steps (FedAvg only; 1 for FedSGD).
        local_lr: local learning rate (FedAvg only).
        local_batch_size: local mini-batch size (FedAvg; ``None``: each client's whole batch).
        clients: K clients, each with its own batch; the server sees their average.
        share_bn_stats: the client also uploads the change of its BatchNorm running statistics
            (:mod:`gradleak.threat.batchnorm`), as a FedAvg client sending its ``state_dict`` does.
    """

    protocol: str = "fedsgd"
    local_steps: int = 1
    local_lr: float | None = None
    local_batch_size: int | None = None
    clients: int = 1
    share_bn_stats: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in ("fedsgd", "fedavg"):
            raise ConfigError(f"audit protocol: expected 'fedsgd' or 'fedavg', got {self.protocol!r}")
        for what, v in (("local steps", self.local_steps), ("clients", self.clients)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"audit {what}: expected a positive integer, got {v!r}")
        if self.protocol == "fedavg" and (self.local_lr is None or not self.local_lr > 0):
            raise ConfigError(f"audit protocol fedavg: expected a positive local learning rate, got {self.local_lr!r}")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise ConfigError(f"audit local batch size: expected a positive integer, got {self.local_batch_size!r}")

    def tag(self) -> str:
        """Short, file-name-safe name, e.g. ``fedsgd``, ``fedavg-s5-lr0.1-k4``."""
        text = "fedsgd"
        if self.protocol == "fedavg":
            text = f"fedavg-s{self.local_steps}-lr{self.local_lr:g}"
            text += f"-b{self.local_batch_size}" if self.local_batch_size else ""
        text += f"-k{self.clients}" if self.clients > 1 else ""
        return text + ("-bnstats" if self.share_bn_stats else "")

    def client(self, batch_size: int) -> Callable[..., ClientUpdate] | None:
        """The client protocol for :func:`gradleak.defenses.defended_update` (``None``: plain FedSGD)."""
        if self.protocol == "fedsgd":
            return functools.partial(fedsgd_update, share_bn_stats=True) if self.share_bn_stats else None
        return functools.partial(fedavg_update, local_steps=self.local_steps, lr=float(self.local_lr),  # type: ignore[arg-type]
                                 batch_size=self.local_batch_size or batch_size, share_bn_stats=self.share_bn_stats)


@dataclass(frozen=True)
class AuditCell:
    """One cell of the grid: N images per client, one defense setting, one protocol setting."""

    batch_size: int
    defense: str
    protocol: ProtocolSetting

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``fedsgd_n4_noise-1e-3``."""
        slug = re.sub(r"[^A-Za-z0-9.=+_-]", "_", self.defense.replace(" ", "").replace(":", "-"))
        return f"{self.protocol.tag()}_n{self.batch_size}_{slug}"

    def parsed(self) -> Defense:
        return parse_defense(self.defense)

    @property
    def defended(self) -> bool:
        return bool(self.parsed().parts())


def parse_int_list(text: str, *, what: str, low: int = 1) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``: distinct integers of at least ``low`` (positive by default).

    Raises:
        ConfigError: an empty list, a non-integer, a value below ``low``, or a repeat.
    """
    kind = "positive integers" if low == 1 else f"integers >= {low}"
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what}: expected a comma-separated list of {kind} such as '1,4,8', got {text!r}")
    values = []
    for t in items:
        if not re.fullmatch(r"\d+", t) or int(t) < low:
            raise ConfigError(f"{what}: expected {kind}, got {t!r}")
        if int(t) in values:
            raise ConfigError(f"{what}: expected distinct values, got {t} twice")
        values.append(int(t))
    return values


def audit_grid(*, batch_sizes: Sequence[int], defenses: Sequence[str],
               protocols: Sequence[ProtocolSetting] = (ProtocolSetting(),)) -> list[AuditCell]:
    """Expand the grid, protocol-major, then batch size, then defense in the given order.

    Raises:
        ConfigError: an empty axis, a defense that does not parse (``parse_defense``'s message), a
            defense given twice, or ``dpsgd`` with FedAvg (DP-SGD is one noisy gradient here).

    Example:
        >>> [c.name for c in audit_grid(batch_sizes=[1, 8], defenses=["none", "noise:1e-3"])]
        ['fedsgd_n1_none', 'fedsgd_n1_noise-1e-3', 'fedsgd_n8_none', 'fedsgd_n8_noise-1e-3']
        >>> ProtocolSetting("fedavg", local_steps=5, local_lr=0.1, clients=4).tag()
        'fedavg-s5-lr0.1-k4'
    """
    if not batch_sizes or not defenses or not protocols:
        raise ConfigError(f"audit grid: expected at least one batch size, defense and protocol, got "
                          f"{len(batch_sizes)} batch sizes, {len(defenses)} defenses, {len(protocols)} protocols")
    specs: dict[str, str] = {}
    for text in defenses:
        spec = parse_defense(text).spec()
        if spec in specs:
            raise ConfigError(f"audit defenses: expected each setting once, got {specs[spec]!r} and {text!r} (both {spec})")
        specs[spec] = text
    cells = [AuditCell(n, d.strip(), p) for p in dict.fromkeys(protocols) for n in batch_sizes for d in defenses]
    for c in cells:
        if c.protocol.protocol == "fedavg" and any(part.client_side for part in c.parsed().parts()):
            raise ConfigError(f"audit defense '{c.defense}' with protocol fedavg: expected fedsgd (DP-SGD is one noisy "
                              "gradient; DP-FedAvg is not implemented), got fedavg")
    names = [c.name for c in cells]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"audit grid: expected distinct cell names, got '{dup}' twice")
    return cells


# ---------------------------------------------------------------------------------------------------
# What the attacker knows.

LABEL_KNOWLEDGE = ("recovered", "known")
"""``recovered``: labels come from the update (:mod:`gradleak.labels`); ``known``: the client's true
label multiset is handed to the attack (a client that holds a few known classes)."""

DEFENSE_KNOWLEDGE = ("unaware", "aware")
"""``unaware``: the attack matches the raw update; ``aware``: it simulates the recorded defense
(the adaptive attacker, :mod:`gradleak.attacks.adaptive`)."""

BN_KNOWLEDGE = ("used", "ignored")
"""Where the client shares its BatchNorm statistics (:mod:`gradleak.threat.batchnorm`): ``used``: the
attack matches them (``bn_stats`` > 0, the attacks' default); ``ignored``: it does not (``bn_stats=0``).
A term with the wrong weight can hurt, so the worst case takes both."""

FEATURE_KNOWLEDGE = ("used", "ignored")
"""For an attack with a feature variant (``Attack.feature_variant``) on a victim whose last layer is
linear with a bias: ``used``: it matches the last layer's input features recovered from the update
(``features=1, feature_init=50`` unless its config sets its own); ``ignored``: ``features=0``. No
knowledge beyond the update: a stronger attack's option, tried both ways because the term needs the
right labels and can hurt."""

FEATURE_WEIGHT, FEATURE_INIT = 1.0, 50
"""The feature term's weight and its feature-only first iterations when an attacker uses it (the
values measured in docs/attacks.md)."""

CENTER_KNOWLEDGE = ("used", "ignored")
"""For an attack with a centred variant (``Attack.centred_variant``) on a victim with a flat landscape
(:func:`gradleak.audit.landscape.flat`: its update barely depends on the images): ``used``: it matches
with the mean update of :data:`CENTER_DRAWS` noise batches taken out of both sides and the per-layer
cosine (:data:`CENTER_LOSS`); ``ignored``: as configured. No knowledge beyond the update and the
model: a stronger attack's option, measured to break the flat ResNet-18-sigmoid in eval mode (CI-Net
0.54 against 0.17, docs/attacks.md)."""

CENTER_DRAWS, CENTER_LOSS = 16, "cosine-layer"
"""The noise batches a centred attacker averages, and its matching loss (centred with the global
cosine, CI-Net read 0.08 on that victim: the last layer's share of the centred update is rounding)."""

KNOWLEDGE_TOKENS = (tuple(f"labels-{v}" for v in LABEL_KNOWLEDGE) + tuple(f"defense-{v}" for v in DEFENSE_KNOWLEDGE)
                    + tuple(f"bn-{v}" for v in BN_KNOWLEDGE) + tuple(f"features-{v}" for v in FEATURE_KNOWLEDGE)
                    + tuple(f"center-{v}" for v in CENTER_KNOWLEDGE))


@dataclass(frozen=True)
class KnowledgeAxes:
    """The assumptions an audit tries: each axis's values (every combination is one attacker).

    Example:
        >>> KnowledgeAxes.parse("all")  # doctest: +NORMALIZE_WHITESPACE
        KnowledgeAxes(labels=('recovered', 'known'), defense=('unaware', 'aware'), bn=('used', 'ignored'),
                      features=('used', 'ignored'), center=('used', 'ignored'))
        >>> KnowledgeAxes.parse("labels-known,defense-aware").defense
        ('aware',)
        >>> KnowledgeAxes.parse("labels-recovered,bn-used,features-ignored")  # doctest: +NORMALIZE_WHITESPACE
        KnowledgeAxes(labels=('recovered',), defense=('unaware', 'aware'), bn=('used',), features=('ignored',),
                      center=('used', 'ignored'))
    """

    labels: tuple[str, ...] = LABEL_KNOWLEDGE
    defense: tuple[str, ...] = DEFENSE_KNOWLEDGE
    bn: tuple[str, ...] = BN_KNOWLEDGE
    features: tuple[str, ...] = FEATURE_KNOWLEDGE
    center: tuple[str, ...] = CENTER_KNOWLEDGE

    def __post_init__(self) -> None:
        for what, values, allowed in (("labels", self.labels, LABEL_KNOWLEDGE),
                                      ("defense", self.defense, DEFENSE_KNOWLEDGE), ("bn", self.bn, BN_KNOWLEDGE),
                                      ("features", self.features, FEATURE_KNOWLEDGE),
                                      ("center", self.center, CENTER_KNOWLEDGE)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ConfigError(f"knowledge {what}: expected some of {', '.join(allowed)}, got "
                                  f"{', '.join(map(repr, bad)) if bad else 'none'}")

    @classmethod
    def parse(cls, text: str | Sequence[str] | None) -> KnowledgeAxes:
        """``"all"`` (or ``None``) or comma-separated tokens of :data:`KNOWLEDGE_TOKENS`.

        Raises:
            ConfigError: an unknown token, naming the ones expected.
        """
        items = [t.strip() for t in (text.split(",") if isinstance(text, str) else (text or ["all"])) if t.strip()]
        if not items or items == ["all"]:
            return cls()
        chosen: dict[str, list[str]] = {"labels": [], "defense": [], "bn": [], "features": [], "center": []}
        for t in items:
            if t not in KNOWLEDGE_TOKENS:
                raise ConfigError(f"--knowledge: unknown assumption {t!r}; expected 'all' or some of: "
                                  f"{', '.join(KNOWLEDGE_TOKENS)}")
            axis, value = t.split("-", 1)
            chosen[axis].append(value)
        return cls(labels=tuple(dict.fromkeys(chosen["labels"])) or LABEL_KNOWLEDGE,
                   defense=tuple(dict.fromkeys(chosen["defense"])) or DEFENSE_KNOWLEDGE,
                   bn=tuple(dict.fromkeys(chosen["bn"])) or BN_KNOWLEDGE,
                   features=tuple(dict.fromkeys(chosen["features"])) or FEATURE_KNOWLEDGE,
                   center=tuple(dict.fromkeys(chosen["center"])) or CENTER_KNOWLEDGE)

    def tokens(self) -> list[str]:
        return ([f"labels-{v}" for v in self.labels] + [f"defense-{v}" for v in self.defense]
                + [f"bn-{v}" for v in self.bn] + [f"features-{v}" for v in self.features]
                + [f"center-{v}" for v in self.center])


@dataclass(frozen=True, order=True)
class Attacker:
    """One attack under one assumption about what its user knows.

    Args:
        attack: registered attack name.
        labels: ``"recovered"`` or ``"known"``.
        defense: ``"unaware"``, ``"aware"``, or ``"none"`` (an undefended update: the two are one attack).
        bn: ``"used"`` or ``"ignored"``: the client's shared BatchNorm statistics; ``"none"`` where
            the update does not share them (or the attack cannot use them).
        features: ``"used"`` or ``"ignored"``: the last-layer features recovered from the update
            (:data:`FEATURE_KNOWLEDGE`); ``"none"`` where the attack or the victim has no such variant.
        center: ``"used"`` or ``"ignored"``: centred matching (:data:`CENTER_KNOWLEDGE`); ``"none"``
            where the attack has no such variant or the victim's landscape is not flat.

    Example:
        >>> a = Attacker("cinet", labels="known", defense="aware")
        >>> a.id, Attacker.parse(a.id) == a, a.describe()
        ('cinet_aware_labels-known', True, 'cinet, defense-aware, labels known')
        >>> Attacker.parse("ig_labels-recovered").describe()
        'ig, labels recovered'
        >>> Attacker.parse("ig_labels-known_bn-ignored").describe()
        'ig, labels known, BatchNorm statistics ignored'
        >>> Attacker.parse("ig_aware_labels-recovered_features-used").describe()
        'ig, defense-aware, labels recovered, last-layer features used'
        >>> Attacker.parse("cinet_labels-known_center-used_it-300").describe()
        'cinet, labels known, centred matching, 300 iterations'
    """

    attack: str
    labels: str = "recovered"
    defense: str = "none"
    bn: str = "none"
    features: str = "none"
    budget: int | None = None
    center: str = "none"

    @property
    def id(self) -> str:
        """The run folder's prefix:
        ``<attack>[_<defense>]_labels-<labels>[_bn-<bn>][_features-<f>][_center-<c>][_it-<budget>]`` (then ``-s<seed>``)."""
        middle = "" if self.defense == "none" else f"_{self.defense}"
        return (f"{self.attack}{middle}_labels-{self.labels}" + ("" if self.bn == "none" else f"_bn-{self.bn}")
                + ("" if self.features == "none" else f"_features-{self.features}")
                + ("" if self.center == "none" else f"_center-{self.center}")
                + ("" if self.budget is None else f"_it-{self.budget}"))

    @classmethod
    def parse(cls, text: str) -> Attacker:
        m = re.fullmatch(r"(.+?)(?:_(aware|unaware))?_labels-(recovered|known)(?:_bn-(used|ignored))?"
                         r"(?:_features-(used|ignored))?(?:_center-(used|ignored))?(?:_it-(\d+))?", text)
        if not m:
            raise ConfigError(f"audit attacker: expected '<attack>[_aware|_unaware]_labels-<recovered|known>"
                              f"[_bn-<used|ignored>][_features-<used|ignored>][_center-<used|ignored>]"
                              f"[_it-<iterations>]', got {text!r}")
        return cls(m.group(1), labels=m.group(3), defense=m.group(2) or "none", bn=m.group(4) or "none",
                   features=m.group(5) or "none", budget=int(m.group(7)) if m.group(7) else None,
                   center=m.group(6) or "none")

    def describe(self) -> str:
        parts = [self.attack]
        if self.defense != "none":
            parts.append(f"defense-{self.defense}")
        parts.append(f"labels {self.labels}")
        if self.bn != "none":
            parts.append(f"BatchNorm statistics {self.bn}")
        if self.features != "none":
            parts.append(f"last-layer features {self.features}")
        if self.center == "used":
            parts.append("centred matching")
        elif self.center == "ignored":
            parts.append("uncentred matching")
        if self.budget is not None:
            parts.append(f"{self.budget} iterations")
        return ", ".join(parts)

    def config(self, attack_config: Any) -> Any:
        """``attack_config`` for this attacker: ``adaptive="off"`` when unaware, ``"auto"`` otherwise;
        ``bn_stats=0`` when it ignores shared BatchNorm statistics; the feature term on (at
        :data:`FEATURE_WEIGHT`, :data:`FEATURE_INIT`, unless the config has its own) or off; its
        own iteration budget (``Attack.budget``) where it has one; centred matching
        (:data:`CENTER_DRAWS` noise batches, :data:`CENTER_LOSS`) or none (``center=0``)."""
        changes: dict[str, Any] = {}
        if ATTACKS.get(self.attack).adaptive:
            changes["adaptive"] = "off" if self.defense == "unaware" else "auto"
        if self.bn == "ignored":
            changes["bn_stats"] = 0.0
        if self.features != "none":
            own = config_field(attack_config, "features", 0.0)
            if self.features == "ignored":
                changes.update(features=0.0, feature_init=0)
            elif not own:
                changes.update(features=FEATURE_WEIGHT, feature_init=FEATURE_INIT)
        if self.center == "used":
            changes.update(center=CENTER_DRAWS, loss=CENTER_LOSS)
        elif self.center == "ignored":
            changes["center"] = 0
        if self.budget is not None:
            changes.update(ATTACKS.get(self.attack).budget(self.budget, attack_config))
        if isinstance(attack_config, Mapping):
            return {**attack_config, **changes}
        return dataclasses.replace(attack_config, **changes) if changes else attack_config


def config_field(config: Any, name: str, default: Any = None) -> Any:
    """``name`` of an attack config given as a mapping or a dataclass (``default`` where it has none)."""
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def run_name(attacker_id: str, seed: int) -> str:
    """A run's folder in its cell: ``<attacker id>-s<seed>`` (what :func:`gradleak.audit.verdicts.load_runs` reads)."""
    return f"{attacker_id}-s{seed}"


@dataclass(frozen=True)
class AttackPlan:
    """The attacks of an audit with their resolved configs (:func:`plan_attacks`), and those left out."""

    configs: dict[str, Any]
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.configs)


def plan_attacks(names: str | Sequence[str], server: ServerState, *, local_steps: Sequence[int] = (1,),
                 presets: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None,
                 iterations: int | None = None, malicious_bins: int | None = None) -> AttackPlan:
    """Which attacks an audit runs, each with its config.

    Args:
        names: ``"auto"`` (every registered attack that applies to the victim) or attack names.
        server: the victim.
        local_steps: the client's local steps in the grid's protocols (an attack must apply to all).
        presets: a preset per attack name (``{"cinet": "demo"}``).
        overrides: config fields; each applies to every selected attack that has the field, and a
            field that none has is refused.
        iterations: an iteration budget for every iterative attack (``None``: each attack's own).
        malicious_bins: the audit also plays a malicious server that sends the victim behind the
            block each malicious attack reads (``Attack.malicious_model``: an imprint block of this
            many bins, cumulative or sparse, trap weights of this many units); the attacks that need a modified model are
            judged against it (``None``: an honest server only).

    Raises:
        ConfigError: an unknown attack, an attack named explicitly that cannot apply (with the
            reason), a preset for an attack not selected, or an override no attack has.

    Example:
        >>> from gradleak.models import build_model
        >>> from gradleak.types import ModelSpec
        >>> spec = ModelSpec(name="linear", image_size=8)
        >>> plan = plan_attacks("auto", ServerState.from_spec(build_model(spec), spec))
        >>> "analytic" in plan.names and "cinet" in plan.names, sorted(plan.left_out)
        (True, ['gias', 'imprint', 'layerwise', 'sparse-imprint', 'trap'])
    """
    auto = isinstance(names, str) and names.strip() == "auto"
    wanted = ATTACKS.available() if auto else [n.strip() for n in (names.split(",") if isinstance(names, str) else names)
                                              if n.strip()]
    if not wanted:
        raise ConfigError(f"--attacks: expected 'auto' or attack names ({', '.join(ATTACKS.available())}), got none")
    presets, overrides = dict(presets or {}), dict(overrides or {})
    for name in [*wanted, *presets]:
        ATTACKS.get(name)  # unknown names fail with the registry's list
    stray = [n for n in presets if n not in wanted]
    if stray:
        raise ConfigError(f"--preset {stray[0]}:{presets[stray[0]]}: expected a preset of an audited attack "
                          f"({', '.join(wanted)}), got one of {stray[0]}")
    configs: dict[str, Any] = {}
    left_out: dict[str, str] = {}
    used: set[str] = set()  # the overrides some planned attack took
    for name in dict.fromkeys(wanted):
        cls = ATTACKS.get(name)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        mine = {k: v for k, v in overrides.items() if k in fields}
        budget = iterations if iterations is not None and cls.iterative else None
        config = resolve_config(name, preset=presets.get(name), overrides=mine, iterations=budget)
        victim = server
        if cls.knowledge.active_manipulation:
            if malicious_bins is None:
                if not auto:
                    raise ConfigError(f"--attacks {name}: expected --threat malicious (it attacks a model the server "
                                      "modified), got an honest server only")
                left_out[name] = "needs a malicious server (--threat malicious)"
                continue
            # only the block's presence is checked here: a few public images are enough to build it
            victim = cls.malicious_model(server, malicious_bins, batch_size=1,
                                         public=public_images(server.input_shape[-1], n=8))
        reason = next((r for s in local_steps if (r := cls.applicability(victim, config, local_steps=s))), None)
        if reason is None:
            configs[name] = config
            used.update(mine)
        elif auto:
            left_out[name] = reason
        else:
            raise ConfigError(f"--attacks {name}: expected an attack that applies to this victim and protocol; "
                              f"{name} {reason}")
    unused = [k for k in overrides if k not in used]
    if unused:
        raise ConfigError(f"--set {unused[0]}: expected a config field of an audited attack ({', '.join(configs)}), "
                          "got one none of them has")
    if not configs:
        raise ConfigError("--attacks auto: expected at least one attack that applies, got none ("
                          + "; ".join(f"{n}: {r}" for n, r in left_out.items()) + ")")
    return AttackPlan(configs, left_out)


def attackers_for(attack: str, *, defended: bool, knowledge: KnowledgeAxes = KnowledgeAxes(),
                  attack_config: Any = None, shares_bn: bool = False,
                  features: bool = False, flat: bool = False, images: int = 1,
                  max_images: int | None = None) -> tuple[list[Attacker], list[str]]:
    """The attackers of ``attack`` for one cell, and what is not tried (stated with the verdict).

    An attack that reads updates of at most ``max_images`` images on the victim (``Attack.max_images``)
    has no attacker where the update holds more (``images``: the batch size times the clients), and is
    named as not tried.

    A defended update is attacked by the unaware and the defense-aware attacker (as ``knowledge``
    selects); an undefended one once per label assumption. An attack without an adaptive mode, or
    a config with ``adaptive="off"``, has no defense-aware attacker, and the verdict says so. Where
    the client shares its BatchNorm statistics (``shares_bn``), an attack that can match them
    (``Attack.matches_bn_stats``) is tried using and ignoring them, as ``knowledge.bn`` selects.
    Where the victim's last layer gives its input features (``features``), an attack with a feature
    variant (``Attack.feature_variant``) is tried with and without them, as ``knowledge.features`` selects.
    Where the victim's landscape is flat (``flat``), an attack with a centred variant
    (``Attack.centred_variant``) that has labels to centre with is tried centred and plain, as
    ``knowledge.center`` selects.

    Example:
        >>> [a.id for a in attackers_for("cinet", defended=True)[0]]  # doctest: +NORMALIZE_WHITESPACE
        ['cinet_unaware_labels-recovered', 'cinet_aware_labels-recovered', 'cinet_unaware_labels-known',
         'cinet_aware_labels-known']
        >>> attackers_for("analytic", defended=True, knowledge=KnowledgeAxes(labels=("recovered",)))
        ([Attacker(attack='analytic', labels='recovered', defense='unaware', bn='none', features='none', budget=None, center='none')], ['analytic defense-aware (no adaptive mode)'])
        >>> [a.id for a in attackers_for("ig", defended=False, shares_bn=True,
        ...                              knowledge=KnowledgeAxes(labels=("recovered",)))[0]]
        ['ig_labels-recovered_bn-used', 'ig_labels-recovered_bn-ignored']
    """
    not_tried: list[str] = []
    cls = ATTACKS.get(attack)
    if max_images is not None and images > max_images:
        most = "no image" if max_images < 1 else f"at most {max_images} image{'s' * (max_images > 1)}"
        return [], [f"{attack} (it reads updates of {most} on this victim; this one holds {images})"]
    labels = knowledge.labels if cls.uses_labels else tuple(v for v in knowledge.labels if v == "recovered") or ("recovered",)
    if not defended:
        defenses = ["none"]
    else:
        defenses = list(knowledge.defense)
        mode = config_field(attack_config, "adaptive")
        if "aware" in defenses and (not ATTACKS.get(attack).adaptive or mode == "off"):
            defenses.remove("aware")
            why = "no adaptive mode" if not ATTACKS.get(attack).adaptive else "turned off"
            not_tried.append(f"{attack} defense-aware ({why})")
            if not defenses:
                defenses = ["unaware"]
    bns = ["none"]
    if shares_bn and cls.matches_bn_stats:
        bns = list(knowledge.bn)
    elif shares_bn:
        not_tried.append(f"{attack} with the shared BatchNorm statistics (it cannot match them)")
    fs = list(knowledge.features) if features and cls.feature_variant else ["none"]
    cs = ["none"]
    if flat and cls.centred_variant:
        if config_field(attack_config, "soft_labels", False):
            not_tried.append(f"{attack} centred (it optimises its labels jointly: nothing to centre with)")
        else:
            cs = list(knowledge.center)
    return [Attacker(attack, labels=lab, defense=d, bn=b, features=f, center=c)
            for lab in labels for d in defenses for b in bns for f in fs for c in cs], not_tried


def with_budgets(attackers: Sequence[Attacker], budgets: Sequence[int] | None) -> list[Attacker]:
    """Each iterative attacker once per iteration budget (``--budgets``); the others as they are.

    A budget is one more choice of the attacker's: against a many-to-one defense a longer run can
    read lower (:func:`gradleak.audit.verdicts.overshoot`), so the worst case is taken over budgets too.

    Example:
        >>> [a.id for a in with_budgets([Attacker("cinet"), Attacker("analytic")], [100, 300])]
        ['cinet_labels-recovered_it-100', 'cinet_labels-recovered_it-300', 'analytic_labels-recovered']
        >>> with_budgets([Attacker("cinet")], None) == [Attacker("cinet")]
        True
    """
    out: list[Attacker] = []
    for a in attackers:
        if budgets and ATTACKS.get(a.attack).iterative:
            out += [dataclasses.replace(a, budget=int(b)) for b in budgets]
        else:
            out.append(a)
    return out


def untried_knowledge(knowledge: KnowledgeAxes, *, defended: bool, shares_bn: bool = False,
                      features: bool = False, flat: bool = False) -> list[str]:
    """The assumptions the audit's ``knowledge`` leaves out (named beside the verdict)."""
    out = [f"labels {v}" for v in LABEL_KNOWLEDGE if v not in knowledge.labels]
    if defended:
        out += [f"defense-{v}" for v in DEFENSE_KNOWLEDGE if v not in knowledge.defense]
    if shares_bn:
        out += [f"BatchNorm statistics {v}" for v in BN_KNOWLEDGE if v not in knowledge.bn]
    if features:
        out += [f"last-layer features {v}" for v in FEATURE_KNOWLEDGE if v not in knowledge.features]
    if flat:
        out += [{"used": "centred matching", "ignored": "uncentred matching"}[v]
                for v in CENTER_KNOWLEDGE if v not in knowledge.center]
    return out


__all__ = ["AttackPlan", "Attacker", "AuditCell", "CENTER_KNOWLEDGE", "DEFENSE_KNOWLEDGE", "FEATURE_KNOWLEDGE",
           "KNOWLEDGE_TOKENS",
           "KnowledgeAxes",
           "LABEL_KNOWLEDGE", "ProtocolSetting", "attackers_for", "audit_grid", "parse_int_list", "plan_attacks", "with_budgets",
           "run_name", "untried_knowledge"]
