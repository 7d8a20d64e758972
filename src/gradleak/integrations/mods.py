"""A Flower client mod that checks every model a client receives before it trains on it.

``inspect_mod(input_shape)`` is a Flower ``Mod`` (as ``LocalDpMod`` and ``secaggplus_mod`` are):
on each train message it runs :func:`gradleak.threat.inspect.inspect_arrays` on the received
arrays and, when something is flagged (an imprint block: a malicious server), refuses to train
(``action="refuse"``: the reply is an error naming the findings, and the client's data is never
touched) or trains and reports (``action="report"``: a warning in the log, and the findings in the
reply's ``gradleak-inspect`` config record).

Example::

    from flwr.clientapp import ClientApp
    from gradleak.integrations.mods import inspect_mod

    app = ClientApp(mods=[inspect_mod((3, 32, 32))])

References:
    Fowl et al., "Robbing the Fed", ICLR 2022 (the imprint block this detects).
"""

from __future__ import annotations

import logging
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
                on_flag: Callable[[list[Finding]], None] | None = None) -> Callable[..., Any]:
    """A Flower client mod that runs the client-side check on every received model.

    Args:
        input_shape: (C, H, W) of the client's images.
        action: ``"refuse"`` (reply with an error, do not train) or ``"report"`` (train, log, and
            add the findings to the reply).
        on_flag: called with the flagged findings (a client's own alerting).

    Raises:
        ConfigError: an unknown action.
    """
    if action not in ("refuse", "report"):
        raise ConfigError(f"inspect_mod action: expected 'refuse' or 'report', got {action!r}")

    def mod(msg: Any, ctxt: Any, call_next: Callable[..., Any]) -> Any:
        from flwr.common import ConfigRecord, Error, Message, MessageType

        if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
            return call_next(msg, ctxt)
        bad = flagged(inspect_arrays(received_arrays(msg.content), input_shape))
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


__all__ = ["REFUSED_CODE", "inspect_mod", "received_arrays"]
