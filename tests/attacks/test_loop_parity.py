"""The shared run loop changes no attack's arithmetic: short runs against outputs recorded before it.

``tests/golden/attack_outputs.safetensors`` was written by ``tests/golden/record.py`` with the
per-attack loops the engine replaced. Same seeds, same images, losses, iteration counts and
restart scores.

The tolerances come from a measured spread, not from one machine's rounding. The recorder's cases
were rerun against the file on 1 and 2 threads, with oneDNN on and off (``torch.backends.mkldnn``);
the largest image difference per case was: cinet 4.5e-4, cinet-sgd-decay-learned 7.5e-7, ig 0,
dlg 1.2e-7, idlg 5.8e-3 (its L-BFGS steps amplify rounding), gias 6e-8; the largest relative loss
difference (losses and restart scores) 2.0e-3 (idlg), else below 7e-6. Each tolerance is about 5-10x its case's spread, and
far below what a real change moves: the same cases with seed 2 moved the images by 0.84-1.0, and
a learning rate 10% higher by 0.04 (idlg) to 0.22 (cinet).
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


IMAGE_ATOL = {"cinet": 5e-3, "cinet-sgd-decay-learned": 1e-4, "ig": 1e-4, "dlg": 1e-4, "idlg": 2.5e-2, "gias": 1e-4}
LOSS_RTOL = {"idlg": 1e-2}


@pytest.mark.parametrize("key", list(record.CASES))
def test_same_seed_same_reconstruction_as_before_the_shared_loop(key: str):
    rec = record.run(key)
    torch.testing.assert_close(rec.images, GOLDEN[f"{key}.images"], atol=IMAGE_ATOL[key], rtol=0)
    torch.testing.assert_close(torch.tensor(rec.history["loss"], dtype=torch.float64), GOLDEN[f"{key}.loss"],
                               rtol=LOSS_RTOL.get(key, 1e-4), atol=1e-9)
    got, want = record.facts(rec), FACTS[key]
    assert got["iterations"] == want["iterations"]
    assert got["history_iterations"] == want["history_iterations"]
    assert got["labels"] == want["labels"]
    if "restart_scores" in want:
        assert got["restart_scores"] == pytest.approx(want["restart_scores"], rel=LOSS_RTOL.get(key, 1e-4))
