"""Flower client mods: the check of every model a client receives, and the declaration of its defense.

``inspect_mod(input_shape)`` is a Flower ``Mod`` (as ``LocalDpMod`` and ``secaggplus_mod`` are):
on each train message it runs :func:`gradleak.threat.inspect.inspect_arrays` on the received
arrays and, when something is flagged (an imprint block: a malicious server), refuses to train
(``action="refuse"``: the reply is an error naming the findings, and the client's data is never
touched) or trains and reports (``action="report"``: a warning in the log, and the findings in the
reply's ``gradleak-inspect`` config record).

``defense_mod(defense)`` declares the defense a client applies (a gradleak setting, or a Flower
``LocalDpMod``, read by :func:`localdp_defense`) in its train replies, so that an audit of the live
federation attacks the defense that actually ran.

Example::

    from flwr.clientapp import ClientApp
    from gradleak.integrations.mods import inspect_mod

    app = ClientApp(mods=[inspect_mod((3, 32, 32))])

References:
    Fowl et al., "Robbing the Fed", ICLR 2022 (the imprint block this detects).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from gradleak.errors import ConfigError
from gradleak.threat.inspect import Finding, flagged, inspect_arrays

log = logging.getLogger(__name__)

REFUSED_CODE = 4401
"""The error code of a refused train message (Flower's codes below 4000 are its own)."""


def received_arrays(content: Any) -> dict[str, torch.Tensor]:
    """Every array of every ``ArrayRecord`` in a message's content, by ``<record>.<name>``."""
    out: dict[str, torch.Tensor] = {}
    for key, record in content.array_records.items():
        for name, array in record.items():
            out[f"{key}.{name}"] = torch.from_numpy(array.numpy().copy())
    return out


def inspect_mod(input_shape: tuple[int, int, int], *, action: str = "refuse",
                on_flag: Callable[[list[Finding]], None] | None = None,
                images: torch.Tensor | None = None) -> Callable[..., Any]:
    """A Flower client mod that runs the client-side check on every received model.

    Args:
        input_shape: (C, H, W) of the client's images.
        images: some of the client's own images (at least 16), to find trap units as well
            (:func:`gradleak.threat.inspect.inspect_arrays`); they never leave the client.
        action: ``"refuse"`` (reply with an error, do not train) or ``"report"`` (train, log, and
            add the findings to the reply).
        on_flag: called with the flagged findings (a client's own alerting).

    Raises:
        ConfigError: an unknown action.
    """
    if action not in ("refuse", "report"):
        raise ConfigError(f"inspect_mod action: expected 'refuse' or 'report', got {action!r}")
    if images is not None:
        inspect_arrays({}, input_shape, images=images)  # the images' shape and count, checked now, not per round

    def mod(msg: Any, ctxt: Any, call_next: Callable[..., Any]) -> Any:
        from flwr.common import ConfigRecord, Error, Message, MessageType

        if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
            return call_next(msg, ctxt)
        bad = flagged(inspect_arrays(received_arrays(msg.content), input_shape, images=images))
        if not bad:
            return call_next(msg, ctxt)
        text = "; ".join(f"{f.kind} in {f.module} (score {f.score:.3f})" for f in bad)
        log.warning("gradleak inspect: the received model is built to leak the client's data: %s", text)
        if on_flag is not None:
            on_flag(bad)
        if action == "refuse":
            return Message(Error(code=REFUSED_CODE, reason=f"gradleak inspect refused to train: {text}"),
                           reply_to=msg)
        reply = call_next(msg, ctxt)
        if not reply.has_error():
            reply.content["gradleak-inspect"] = ConfigRecord({"flagged": len(bad), "findings": text})
        return reply

    return mod


DEFENSE_RECORD = "gradleak-defense"
"""The reply's ConfigRecord in which :func:`defense_mod` declares the client's defense (what
:class:`gradleak.integrations.flower.AuditStrategy` reads, under the key ``defense``)."""


def localdp_defense(mod: Any) -> str:
    """The gradleak defense setting of a Flower ``LocalDpMod``: ``clip:C+noise:SIGMA``.

    ``LocalDpMod`` clips the client's update (``theta_after - theta_sent``, every array together) to
    norm ``clipping_norm``, then adds Gaussian noise of standard deviation
    ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` to every entry (the Gaussian mechanism,
    Dwork & Roth 2014, Theorem A.1), which are gradleak's ``clip`` and ``noise`` on a FedAvg delta.
    gradleak clips the trainable parameters' delta only; a client that also sends BatchNorm
    statistics has them in Flower's norm too (a slightly stronger clip than the one simulated).

    Raises:
        ConfigError: ``mod`` lacks ``clipping_norm``, ``sensitivity``, ``epsilon`` or ``delta``, or
            ``epsilon``/``delta`` is not positive.
    """
    try:
        clip, sensitivity = float(mod.clipping_norm), float(mod.sensitivity)
        epsilon, delta = float(mod.epsilon), float(mod.delta)
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"localdp_defense: expected a Flower LocalDpMod (clipping_norm, sensitivity, epsilon, "
                          f"delta), got {type(mod).__name__}") from None
    if not (epsilon > 0 and 0 < delta < 1):
        raise ConfigError(f"localdp_defense: expected epsilon > 0 and 0 < delta < 1, got {epsilon} and {delta}")
    sigma = sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    return f"clip:{clip:g}+noise:{sigma:.6g}"


def defense_mod(defense: Any) -> Callable[..., Any]:
    """A Flower client mod that declares the client's defense in every train reply.

    Put it before the defense's own mod (``mods=[defense_mod(dp), dp]``, so it sees the reply the
    defense produced); ``defense`` is a gradleak setting (``"clip:1+noise:0.01"``) or a Flower
    ``LocalDpMod`` (:func:`localdp_defense`). The server's :class:`~gradleak.integrations.flower.
    AuditStrategy` then records it on the captured update, and the audit's adaptive attacker
    simulates the defense that actually ran, not none.

    Raises:
        ConfigError: a setting gradleak cannot parse, or a mod it cannot read.
    """
    from gradleak.defenses import parse_defense

    spec = defense if isinstance(defense, str) else localdp_defense(defense)
    parse_defense(spec)  # a bad setting fails when the app is built, not in the federation

    def mod(msg: Any, ctxt: Any, call_next: Callable[..., Any]) -> Any:
        from flwr.common import ConfigRecord, MessageType

        reply = call_next(msg, ctxt)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            reply.content[DEFENSE_RECORD] = ConfigRecord({"defense": spec})
        return reply

    return mod


__all__ = ["DEFENSE_RECORD", "REFUSED_CODE", "defense_mod", "inspect_mod", "localdp_defense", "received_arrays"]
