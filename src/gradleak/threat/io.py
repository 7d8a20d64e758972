"""Update, model-state and ground-truth files: safetensors with a JSON header, never pickle.

An update file holds one tensor per parameter and, in the safetensors metadata under the key
``"gradleak"``, the update's fields (:meth:`ClientUpdate.meta_dict`). A model-state file holds the
server model's ``state_dict`` and its :class:`ModelSpec`. The ground-truth file (images and labels)
is written by the client simulation and read only for scoring.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from gradleak.config import check_value, short
from gradleak.errors import ConfigError, DataError, UpdateError
from gradleak.threat import batchnorm
from gradleak.types import Batch, ClientUpdate, ModelSpec

_FORMAT = "gradleak-update/1"


def _read(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise UpdateError(f"{what} file: expected an existing safetensors file, got '{path}' (not found)")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise UpdateError(f"{what} file: expected a safetensors file, got '{path}' ({kind})")
    try:
        with safe_open(str(path), framework="pt") as f:  # one open: tensors and header together
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UpdateError(f"{what} file '{path}': expected a safetensors file, could not read it ({e})") from None
    try:
        header = json.loads(raw.get("gradleak", "{}"))
    except json.JSONDecodeError as e:
        raise UpdateError(f"{what} file '{path}': the JSON header is malformed ({e})") from None
    if not isinstance(header, dict):
        raise UpdateError(f"{what} file '{path}': expected a JSON object as header, got {type(header).__name__}")
    return tensors, header


def save_update(update: ClientUpdate, path: str | Path) -> None:
    """Write ``update`` to ``path`` (safetensors, metadata as JSON in the header)."""
    header = {"format": _FORMAT, **update.meta_dict()}
    tensors = {n: t.detach().contiguous().cpu() for n, t in update.tensors.items()}
    tensors.update({n: t.detach().contiguous().cpu() for n, t in update.buffers.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"gradleak": json.dumps(header)})


def load_update(path: str | Path, *, model: nn.Module | None = None) -> ClientUpdate:
    """Read an update file; with ``model``, check that it fits the model.

    Raises:
        UpdateError: the file is missing, malformed or truncated; its header is not a gradleak
            update; a tensor is NaN/Inf; names or shapes do not fit ``model``.
    """
    tensors, header = _read(path, "update")
    if header.get("format") != _FORMAT:
        raise UpdateError(f"update file '{path}': expected header format '{_FORMAT}', got {header.get('format')!r}")
    fields = _header_fields(header, path)
    order = list(fields.pop("parameters"))
    buffers = list(fields.pop("buffers"))
    overlap = sorted(set(order) & set(buffers))
    if overlap:
        raise UpdateError(f"update file '{path}': expected parameter and BatchNorm statistic names to differ, got "
                          f"'{overlap[0]}' in both")
    if sorted(order + buffers) != sorted(tensors):
        raise UpdateError(f"update file '{path}': the header lists {len(order)} parameters and {len(buffers)} "
                          f"BatchNorm statistics, the file holds {len(tensors)} tensors")
    for name in buffers:
        shape = header["buffers"][name]
        if not isinstance(shape, list) or list(tensors[name].shape) != shape:
            raise UpdateError(f"update file '{path}': BatchNorm statistic '{name}': the header says shape "
                              f"{short(shape)}, the file holds {list(tensors[name].shape)}")
    update = ClientUpdate(tensors={n: tensors[n] for n in order}, buffers={n: tensors[n] for n in buffers}, **fields)
    check_update(update, model=model)
    return update


# The update header's fields: (type, default; REQUIRED: no default, bounds for integers).
REQUIRED = object()
_HEADER: dict[str, tuple[Any, Any, tuple[int, int] | None]] = {
    "kind": (Literal["gradient", "delta"], "gradient", None),
    "num_samples": (int, REQUIRED, (1, 1_000_000)),
    "protocol": (Literal["fedsgd", "fedavg", "aggregate"], "fedsgd", None),
    "local_steps": (int, 1, (1, 1_000_000)),
    "local_lr": (float | None, None, None),
    "local_batch_size": (int | None, None, (1, 1_000_000)),
    "num_clients": (int, 1, (1, 1_000_000)),
    "defenses": (tuple[str, ...], (), None),
    "metadata": (dict, {}, None),
    "parameters": (dict, REQUIRED, None),
    "buffers": (dict[str, list[int]], {}, None),
}


def _header_fields(header: Any, path: str | Path) -> dict[str, Any]:
    """The update header's fields, each of its type and in its bounds (a missing N is never taken as 1)."""
    if not isinstance(header, dict):
        raise UpdateError(f"update file '{path}': expected a JSON object as header, got {type(header).__name__}")
    out: dict[str, Any] = {}
    for key, (kind, default, bounds) in _HEADER.items():
        if key not in header:
            if default is REQUIRED:
                raise UpdateError(f"update file '{path}': expected '{key}' in the header, got none"
                                  + (" (the number of private samples behind the update)" if key == "num_samples" else ""))
            out[key] = default
            continue
        try:
            value = check_value(f"update header {key}", kind, header[key])
        except ConfigError as e:
            raise UpdateError(f"update file '{path}': {e}") from None
        if bounds is not None and value is not None and not bounds[0] <= value <= bounds[1]:
            raise UpdateError(f"update file '{path}': expected header {key} from {bounds[0]} to {bounds[1]}, got {value}")
        out[key] = value
    if out["local_lr"] is not None and not out["local_lr"] > 0:
        raise UpdateError(f"update file '{path}': expected a positive header local_lr, got {out['local_lr']}")
    return out


def check_update(update: ClientUpdate, *, model: nn.Module | None = None) -> None:
    """Raise :class:`UpdateError` if ``update`` is non-finite, all zero, or does not fit ``model``."""
    for name, t in update.tensors.items():
        if not t.is_floating_point():
            raise UpdateError(f"update tensor '{name}': expected floating-point values, got {t.dtype}")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateError(f"update tensor '{name}': expected finite values, got {bad} NaN/Inf entries")
    if update.tensors and all(not bool(t.any()) for t in update.tensors.values()):
        raise UpdateError(f"update: expected a gradient or delta that carries information, got {len(update.tensors)} "
                          "tensors that are all zero (a client that did not train, or an upload that was blanked)")
    if model is None:
        return
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(t.shape) for n, t in update.tensors.items()}
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    if missing or extra:
        raise UpdateError(
            f"update does not fit the model: expected {len(expected)} parameters "
            f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'})")
    for n, shape in expected.items():
        if got[n] != shape:
            raise UpdateError(f"update tensor '{n}': expected shape {shape}, got {got[n]}")
    if list(got) != list(expected):
        raise UpdateError("update does not fit the model: parameters are in a different order than the model's")
    batchnorm.check_buffers(update, model)


def _malicious_blocks() -> list[tuple[str, str, tuple[str, ...], Callable[[nn.Module], nn.Module | None],
                                   Callable[..., nn.Module]]]:
    """The blocks a malicious server puts in front of a victim, as a model-state header names them:
    (header key, the count recorded, the block's flags recorded beside it, find the block in a model,
    build one of that count and flags)."""
    from gradleak.threat.malicious import ImprintBlock, find_imprint
    from gradleak.threat.trap import TrapBlock, find_trap

    return [("imprint", "bins", ("sparse",), find_imprint, lambda shape, k, **flags: ImprintBlock(shape, k, **flags)),
            ("trap", "units", (), find_trap, lambda shape, k, **flags: TrapBlock(shape, k))]


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, name: str) -> nn.Module:
    """``model`` with ``state`` loaded (strictly), or an UpdateError ``"<what>: tensors do not fit model
    '<name>' (<what does not fit>)"``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UpdateError(f"{what}: tensors do not fit model '{name}' ({state_mismatch(model, state)})") from None
    return model


def state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``model``, in a few words: the names missing and
    unexpected (the first of each) and the first tensor whose shape differs, expected against given."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shape = next(((k, want[k], tuple(state[k].shape)) for k in want if k in state and tuple(state[k].shape) != want[k]),
                 None)
    parts = []
    if missing:
        parts.append(f"{len(missing)} expected tensor(s) missing, e.g. '{missing[0]}'")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. '{extra[0]}'")
    if shape:
        parts.append(f"'{shape[0]}' expected shape {shape[1]}, got {shape[2]}")
    return "; ".join(parts) or "the tensors do not load"


def save_model_state(model: nn.Module, spec: ModelSpec, path: str | Path) -> None:
    """Write the server model's ``state_dict`` and its spec (the architecture is rebuilt by name).

    A malicious model (an imprint block or trap units in front of the victim ``spec`` describes,
    :mod:`gradleak.threat.malicious`, :mod:`gradleak.threat.trap`) records its bin count under
    ``imprint`` or its unit count under ``trap``; the weights are in the tensors.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header: dict[str, Any] = {"format": "gradleak-model/1", "spec": spec.to_dict()}
    for key, count, flags, find, _ in _malicious_blocks():
        block = find(model)
        if block is not None:
            header[key] = {count: getattr(block, count), **{f: getattr(block, f) for f in flags if getattr(block, f)}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"gradleak": json.dumps(header)})


def load_model_state(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the server model from a model-state file.

    Raises:
        UpdateError: the file is missing or malformed, or its tensors do not fit the named architecture.
    """
    from gradleak.models import build_model

    state, header = _read(path, "model-state")
    if header.get("format") != "gradleak-model/1":
        raise UpdateError(f"model-state file '{path}': expected header format 'gradleak-model/1', got {header.get('format')!r}")
    if not isinstance(header.get("spec"), dict):
        raise UpdateError(f"model-state file '{path}': expected the model spec as a JSON object in the header, "
                          f"got {short(header.get('spec'))}")
    try:
        spec = ModelSpec.from_dict(header["spec"])
    except ConfigError as e:
        raise UpdateError(f"model-state file '{path}': {e}") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateError(f"model-state file '{path}': expected finite weights, got NaN/Inf in '{name}'")
    model = build_model(spec, seed=None)
    blocks = []
    for key, count, flags, _, build in _malicious_blocks():
        if header.get(key) is None:
            continue
        k = header[key].get(count) if isinstance(header[key], dict) else None
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 1_000_000:
            raise UpdateError(f"model-state file '{path}': expected {key}.{count} an integer from 2 to 10^6, "
                              f"got {short(k)}")
        given = {f: header[key][f] for f in flags if f in header[key]}
        for f, v in given.items():
            if not isinstance(v, bool):
                raise UpdateError(f"model-state file '{path}': expected {key}.{f} true or false, got {short(v)}")
        blocks.append(build(spec.input_shape, k, **given))
    if len(blocks) > 1:
        raise UpdateError(f"model-state file '{path}': expected an imprint block or trap units, got both")
    if blocks:
        model = nn.Sequential(blocks[0], model)
    return load_into(model, state, what=f"model-state file '{path}'", name=spec.name).to(device), spec


def load_victim(path: str | Path, spec: ModelSpec, *, what: str = "--weights") -> nn.Module:
    """The victim ``spec`` names with its weights from a model-state file (``gradleak train``, ``simulate``).

    The file's architecture must be the one ``spec`` names (its BatchNorm mode aside: that is the
    client's, taken from ``spec``).

    Raises:
        ConfigError: the file holds another architecture, naming each field that differs.
        UpdateError: the file is missing or malformed, or its tensors do not fit its own spec.
    """
    model, stored = load_model_state(path)
    differ = [f"{k} {stored.to_dict()[k]!r} (expected {v!r})" for k, v in spec.to_dict().items()
              if k != "bn_mode" and stored.to_dict().get(k) != v]
    if differ:
        raise ConfigError(f"{what} '{path}': expected the architecture named ({spec.name}), got a file with "
                          + ", ".join(differ))
    return model


def model_from_arrays(spec: ModelSpec, arrays: dict[str, torch.Tensor], *, sparse: bool = False) -> nn.Module:
    """The model a simulated client builds from the arrays it was sent: the victim ``spec`` names, behind
    a malicious block when the arrays hold one (``0.encoder.weight``), as a client that runs whatever
    model it receives would (examples/flower_inspect, AuditStrategy's malicious rounds).

    Arrays carry weights, not code: trap units and the cumulative imprint block compute the same
    function from the same arrays (``x + decoder(relu(encoder(x)))``); the sparse imprint block's
    window is code (``sparse=True``).

    Raises:
        UpdateError: arrays that do not fit the victim (behind the block).
    """
    from gradleak.models import build_model
    from gradleak.threat.malicious import ImprintBlock

    model = build_model(spec, seed=None)
    if "0.encoder.weight" in arrays:
        model = nn.Sequential(ImprintBlock(spec.input_shape, int(arrays["0.encoder.weight"].shape[0]), sparse=sparse),
                              model)
    return load_into(model, arrays, what="received arrays", name=spec.name)


def save_truth(images: torch.Tensor, labels: torch.Tensor, path: str | Path, *, names: list[str] | None = None) -> None:
    """Write the private batch (for scoring only)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "gradleak-truth/1", "names": names or []}
    save_file({"images": images.detach().contiguous().cpu(), "labels": labels.detach().contiguous().cpu()},
              str(path), metadata={"gradleak": json.dumps(meta)})


def load_truth(path: str | Path, *, num_classes: int | None = None) -> Batch:
    """Read a ground-truth file into a :class:`~gradleak.types.Batch`.

    Raises:
        DataError: not a truth file; images not float (N, C, H, W) in [0, 1] (NaN, 0..255 or
            uint8 included); labels not integer class indices (N,) in ``[0, num_classes)``.
    """
    tensors, header = _read(path, "truth")
    if header.get("format") != "gradleak-truth/1" or set(tensors) != {"images", "labels"}:
        raise DataError(f"truth file '{path}': expected 'images' and 'labels' with header 'gradleak-truth/1'")
    images, labels = tensors["images"], tensors["labels"]
    if images.ndim != 4 or labels.shape != (images.shape[0],) or math.prod(images.shape) == 0:
        raise DataError(f"truth file '{path}': expected images (N, C, H, W) and labels (N,), "
                        f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    if not images.is_floating_point():
        raise DataError(f"truth file '{path}': expected float images in [0, 1], got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise DataError(f"truth file '{path}': expected finite images, got NaN or Inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"truth file '{path}': expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"truth file '{path}': expected integer class labels, got {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)] if num_classes is not None else labels[labels < 0]
    if bad.numel():
        want = f"0 to {num_classes - 1}" if num_classes is not None else ">= 0"
        raise DataError(f"truth file '{path}': expected labels {want}, got {int(bad[0])}")
    names = header.get("names")
    return Batch(images=images.float(), labels=labels.long(),
                 names=[str(n) for n in names] if isinstance(names, list) else [])