"""Checkpoints of iterative attacks: safetensors for tensors, JSON for the rest; never pickle.

A checkpoint is ``checkpoint.safetensors`` in the run folder: the module, optimizer and RNG
tensors, and in its header the JSON part (iteration, history, clock, settings). One file, written to
a temporary name and renamed, so a kill at any moment leaves either the previous checkpoint or the
new one, whole. ``checkpoint.json`` beside it is a copy of the JSON part for people and scripts
(written after the rename; a kill in between leaves it one checkpoint behind, which ``load`` does not
read). Checkpoints written before the header held the JSON are read from the pair, checked against
the iteration stamp both hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gradleak.errors import CheckpointError

HEADER_KEY = "gradleak.checkpoint"
TENSOR_FILE = "checkpoint.safetensors"
"""The checkpoint: tensors, with its JSON part in the safetensors header (one rename commits it)."""
META_FILE = "checkpoint.json"
"""A readable copy of the JSON part, written after the tensor file."""
FILES = (TENSOR_FILE, META_FILE)
"""The safetensors header entry that holds a checkpoint's JSON part."""


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """Saves and restores an attack's state every ``every`` iterations in ``folder``.

    Args:
        folder: the run folder.
        every: iterations between checkpoints (0: never save).
    """

    def __init__(self, folder: str | Path, every: int) -> None:
        self.folder = Path(folder)
        self.every = int(every)

    @property
    def tensor_path(self) -> Path:
        return self.folder / TENSOR_FILE

    @property
    def meta_path(self) -> Path:
        return self.folder / META_FILE

    def exists(self) -> bool:
        return self.tensor_path.is_file() and self.meta_path.is_file()

    def due(self, iteration: int) -> bool:
        return self.every > 0 and iteration % self.every == 0

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp_t = self.tensor_path.with_suffix(".safetensors.tmp")
        tmp_m = self.meta_path.with_suffix(".json.tmp")
        text = json.dumps(meta)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp_t),
                  metadata={HEADER_KEY: text})
        tmp_m.write_text(text)
        os.replace(tmp_t, self.tensor_path)  # the commit: tensors and JSON in one file
        os.replace(tmp_m, self.meta_path)  # the readable copy

    def meta(self) -> dict[str, Any] | None:
        """The JSON part (iteration, history, clock, ...), without loading the tensors; None: no
        readable checkpoint (``load`` names the problem)."""
        try:
            meta = self._meta()
        except (OSError, ValueError, RuntimeError, SafetensorError):
            return None
        return meta if isinstance(meta, dict) else None

    def iteration(self) -> int | None:
        """The saved iteration (None: no readable checkpoint)."""
        value = (self.meta() or {}).get("iteration")
        return value if isinstance(value, int) else None

    def _meta(self) -> Any:
        """The JSON part: from the tensor file's header, or (a checkpoint written before the header
        held it) from checkpoint.json."""
        with safe_open(str(self.tensor_path), "pt") as f:
            text = (f.metadata() or {}).get(HEADER_KEY)
        return json.loads(self.meta_path.read_text() if text is None else text)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not self.exists():
            raise CheckpointError(f"resume: expected checkpoint.safetensors and checkpoint.json in '{self.folder}', not found")
        try:
            meta = self._meta()
            tensors = load_file(str(self.tensor_path))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"resume: checkpoint in '{self.folder}' is unreadable ({str(e)[:120]})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
            raise CheckpointError(f"resume: the checkpoint in '{self.folder}': expected a JSON object with the "
                                  "iteration, got something else")
        stamp = tensors.get("_iteration")
        if stamp is None or stamp.numel() != 1 or int(stamp.item()) != meta["iteration"]:
            raise CheckpointError(f"resume: checkpoint files in '{self.folder}' are from different iterations")
        return tensors, meta
