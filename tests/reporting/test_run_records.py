"""The run's typed records: RunOptions in, RunSummary and RunFolder out, read back from any version."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import make_case
from gradleak.reporting import RunFolder, RunOptions, RunSummary, run_attack


def test_a_run_writes_a_summary_that_reads_back_typed(tmp_path):
    server, update, images, labels = make_case("lenet", 1)
    run = run_attack(server, update, attack="idlg", config={"iterations": 2}, out=tmp_path / "r",
                     truth_images=images, truth_labels=labels, options=RunOptions(progress=False, seed=3))
    folder = RunFolder(tmp_path / "r")
    assert folder.finished() and folder.has_checkpoint()  # kept: a finished run can be extended
    on_disk = folder.summary()
    assert on_disk == run.summary  # the same record in memory and in metrics.json
    assert on_disk.attack == "idlg" and on_disk.seed == 3 and on_disk.n_images == 1 and on_disk.iterations == 2
    assert on_disk.labels == "recovered" and on_disk.label_accuracy == 1.0  # iDLG's known answer at batch 1
    mean, std = on_disk.score("ssim")
    assert mean is not None and std is not None and -1.0 <= mean <= 1.0
    # every key a run writes is a field: nothing written is invisible to the typed record
    assert set(json.loads(folder.metrics.read_text())["summary"]) == {f.name for f in dataclasses.fields(RunSummary)}


def test_a_summary_from_another_version_reads_with_gaps_and_extras():
    old = RunSummary.from_dict({"attack": "cinet", "ssim_mean": 0.5, "a_key_from_the_future": 1})
    assert old.attack == "cinet" and old.ssim_mean == 0.5 and old.label_accuracy is None


def test_options_are_frozen_and_checked_by_name():
    options = RunOptions(device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1
    with pytest.raises(TypeError):
        RunOptions(devise="cpu")
