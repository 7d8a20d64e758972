"""The shared run loop changes no attack's arithmetic: short runs against outputs recorded before it.

``tests/golden/attack_outputs.safetensors`` was written by ``tests/golden/record.py`` with the
per-attack loops the engine replaced. Same seeds, same images, losses, iteration counts and
restart scores. The tolerance covers rounding between CPUs (other SIMD kernels); a change of the
step order, the RNG draws or the restart kept moves the images by far more.
"""

from __future__ import annotations

import json

import pytest
import record  # tests/golden/record.py (pytest's pythonpath)
import torch
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_thread")

with safe_open(str(record.OUT), "pt") as f:
    GOLDEN = {k: f.get_tensor(k) for k in f.keys()}
    FACTS = json.loads(f.metadata()["facts"])


@pytest.mark.parametrize("key", list(record.CASES))
def test_same_seed_same_reconstruction_as_before_the_shared_loop(key: str):
    rec = record.run(key)
    torch.testing.assert_close(rec.images, GOLDEN[f"{key}.images"], atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(rec.history["loss"], dtype=torch.float64), GOLDEN[f"{key}.loss"],
                               rtol=1e-3, atol=1e-9)
    got, want = record.facts(rec), FACTS[key]
    assert got["iterations"] == want["iterations"]
    assert got["history_iterations"] == want["history_iterations"]
    assert got["labels"] == want["labels"]
    if "restart_scores" in want:
        assert got["restart_scores"] == pytest.approx(want["restart_scores"], rel=1e-3)
