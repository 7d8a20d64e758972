"""The command line: simulate -> attack through files, errors as one line with exit code 2, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import signal_in_cinet_step
from gradleak.attacks.checkpoint import Checkpointer
from gradleak.cli.main import main

SMALL = ["--model", "lenet", "--batch-size", "2"]


@pytest.fixture(scope="module")
def client_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("client")
    assert main(["simulate", *SMALL, "--out", str(out)]) == 0
    return out


def test_simulate_writes_the_three_files(client_files):
    for name in ("update.safetensors", "model.safetensors", "truth.safetensors", "case.json"):
        assert (client_files / name).is_file()


def test_attack_from_files_writes_a_complete_run_folder(client_files, tmp_path):
    out = tmp_path / "run"
    rc = main(["attack", "--update", str(client_files / "update.safetensors"),
               "--model-state", str(client_files / "model.safetensors"), "--truth", str(client_files / "truth.safetensors"),
               "--iterations", "3", "--set", "channels=8", "--set", "log_every=1", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("config.json", "metrics.json", "grid.png", "curves.png", "report.html", "reconstruction.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["summary"]
    for key in ("ssim_mean", "ssim_std", "fsim_mean", "psnr_mean", "lpips_mean", "label_accuracy", "n_images",
                "iterations", "seconds", "peak_memory_mb", "label_strategy"):
        assert key in s, key
    assert s["labels"] == "recovered" and s["iterations"] == 3 and len(metrics["per_image"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["attack_config"]["channels"] == 8 and config["attack"] == "cinet"
    assert "<table>" in (out / "report.html").read_text()
    # the label strategy's diagnostics travel with the run (e.g. iLRG's counts and consistency score)
    assert metrics["info"]["label_info"], metrics["info"]


def test_given_labels_are_recorded(client_files, tmp_path):
    out = tmp_path / "run"
    assert main(["attack", "--update", str(client_files / "update.safetensors"), "--model-state",
                 str(client_files / "model.safetensors"), "--truth", str(client_files / "truth.safetensors"),
                 "--labels", "given", "--dry-run", "--set", "channels=8", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert s["labels"] == "given" and s["label_strategy"] == "given"


def test_demo_dry_run(tmp_path):
    assert main(["demo", "--dry-run", *SMALL, "--set", "channels=8", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert (tmp_path / "d" / "report.html").is_file()
    assert (tmp_path / "d" / "client" / "update.safetensors").is_file()


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cinet" in out and "resnet18" in out and "cinet:paper" in out
    for attack in ("cinet", "ig", "dlg", "idlg", "gias"):  # the feature and BatchNorm-statistics terms' options
        line = next(t for t in out.splitlines() if t.startswith(f"options {attack}:"))
        assert "features=0.0" in line and "feature_init=0" in line and "bn_stats=0.1" in line, line


def test_list_activations_names_every_one_the_case_flags_accept(capsys):
    from gradleak.models import ACTIVATIONS

    assert main(["list", "activations"]) == 0
    assert capsys.readouterr().out.strip() == "activations: relu, sigmoid, tanh, leaky-relu, gelu"
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    flag = help_text[help_text.rindex("--activation ACTIVATION"):help_text.rindex("--bn-mode")]  # not the usage line
    assert all(name in flag for name in ACTIVATIONS), flag


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_exit_2_with_one_line(client_files, tmp_path, capsys):
    u, m = str(client_files / "update.safetensors"), str(client_files / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    cases = [
        (["attack", "--update", str(tmp_path / "junk.safetensors"), "--model-state", m], "expected a safetensors file"),
        (["attack", "--update", str(tmp_path / "missing"), "--model-state", m], "not found"),
        (["attack", "--update", u, "--model-state", m, "--attack", "nope"], "unknown attack 'nope'; expected one of"),
        (["attack", "--update", u, "--model-state", m, "--set", "upsample=cubic"], "upsample"),
        (["attack", "--update", u, "--model-state", m, "--labels", "given"], "--truth"),
        (["simulate", "--model", "vgg", "--out", str(tmp_path / "s")], "unknown model 'vgg'"),
        (["simulate", *SMALL, "--image-size", "48", "--data", "cifar10-dir", "--out", str(tmp_path / "s")], "--data-root"),
        (["simulate", *SMALL, "--data", "cifar10-dir", "--data-root", str(tmp_path), "--out", str(tmp_path / "s")],
         "cifar-10-batches-py"),
        (["attack", "--resume", str(tmp_path)], "config.json"),
        (["attack", "--update", u, "--model-state", m, "--attack", "analytic", "--iterations", "5"],
         "analytic has no iteration count"),
        (["attack", "--update", u, "--model-state", m, "--set", "spectral=maybe"],
         "cinet config spectral: expected true or false, got 'maybe'"),
        (["attack", "--update", u, "--model-state", m, "--set", "iterations=abc"],
         "cinet config iterations: expected an integer, got 'abc'"),
        (["attack", "--update", u, "--model-state", m, "--set", "lr=abc"], "cinet config lr: expected a number"),
        (["attack", "--update", u, "--model-state", m, "--set", "nz=0"], "nz"),
        (["attack", "--update", u, "--model-state", m, "--attack", "idlg", "--preset", "ig:paper"],
         "expected a preset of --attack"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _err(capsys), argv


def test_update_for_another_model_exits_2(client_files, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["simulate", "--model", "mlp", "--batch-size", "2", "--out", str(other)]) == 0
    capsys.readouterr()
    rc = main(["attack", "--update", str(client_files / "update.safetensors"),
               "--model-state", str(other / "model.safetensors")])
    assert rc == 2 and "does not fit the model" in _err(capsys)


@pytest.mark.slow  # a subprocess killed with SIGKILL
def test_killed_run_resumes_from_its_last_checkpoint(client_files, tmp_path, capsys):
    """A run killed with SIGKILL loses at most one checkpoint interval and then completes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradleak", "attack", "--update", str(client_files / "update.safetensors"),
           "--model-state", str(client_files / "model.safetensors"), "--truth", str(client_files / "truth.safetensors"),
           "--iterations", "100000", "--set", "channels=8", "--set", "checkpoint_every=10", "--set", "log_every=5", "--out", str(out),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = Checkpointer(out, 0).meta_path
            if ckpt.is_file() and json.loads(ckpt.read_text())["iteration"] >= 20:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint written within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reached = Checkpointer(out, 0).iteration()
    assert reached % 10 == 0
    # resume with a smaller total so the test ends: the recorded config says 100000, so edit it as a user would
    cfg = json.loads((out / "config.json").read_text())
    edited = {**cfg, "attack_config": {**cfg["attack_config"], "lr": 0.5}}
    (out / "config.json").write_text(json.dumps(edited))
    assert main(["attack", "--resume", str(out), "--no-progress"]) == 2  # other settings: refused, named
    assert "lr: 0.001 -> 0.5" in capsys.readouterr().err
    cfg["attack_config"]["iterations"] = reached + 5
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["attack", "--resume", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["resumed_from"] == reached
    assert metrics["summary"]["iterations"] == reached + 5
    its = metrics["history"]["iteration"]
    assert its[0] == 5 and its[-1] == reached + 5  # history from before the kill survived
    assert metrics["history"]["ssim_iteration"][0] == 5  # and the SSIM points too


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_continue(client_files, tmp_path, capsys, monkeypatch):
    """A Ctrl-C during step 12: exit 130, the step is finished and checkpointed, and stderr names
    the checkpoint's iteration and the command that continues it."""
    calls = signal_in_cinet_step(monkeypatch, lambda it, _: it == 12)
    out = tmp_path / "run"
    rc = main(["attack", "--update", str(client_files / "update.safetensors"), "--model-state",
               str(client_files / "model.safetensors"), "--iterations", "50", "--set", "channels=8",
               "--set", "checkpoint_every=5", "--out", str(out), "--no-progress"])
    assert rc == 130 and calls[-1] == 12
    err = capsys.readouterr().err
    assert f"checkpoint of iteration 12 in {out}; continue with gradleak attack --resume {out}" in err
    assert Checkpointer(out, 0).iteration() == 12


def test_compare_tabulates_and_an_interrupted_comparison_resumes(tmp_path, capsys, monkeypatch, one_thread):
    """compare writes the table, the grid and a run folder per attack; interrupted in CI-Net (after
    IG finished) it resumes with --resume: IG is read back untouched, CI-Net continues from its
    checkpoint to the uninterrupted comparison's reconstruction, bit for bit."""
    from safetensors.torch import load_file

    argv = ["compare", *SMALL, "--attacks", "ig,cinet", "--iterations", "6", "--set", "cinet.channels=8",
            "--set", "cinet.checkpoint_every=2", "--no-progress"]
    straight = tmp_path / "straight"
    assert main([*argv, "--out", str(straight)]) == 0
    table = (straight / "table.md").read_text()
    assert "| ig " in table and "| cinet " in table and "SSIM" in table
    assert (straight / "grid.png").is_file() and (straight / "table.csv").read_text().count("\n") == 3
    assert main([*argv, "--out", str(straight)]) == 2  # a finished comparison is not run over
    assert "holds a run" in _err(capsys)

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        signal_in_cinet_step(m, lambda it, _: it == 3)
        assert main([*argv, "--out", str(out)]) == 130
    kept = f"ig finished; cinet: checkpoint of iteration 3 in {out / 'cinet'}"
    assert f"gradleak compare: {kept}; continue with gradleak compare --resume {out}" in capsys.readouterr().err
    assert not (out / "table.md").exists() and Checkpointer(out / "cinet", 0).iteration() == 3
    ig_files = {p.name: p.read_bytes() for p in (out / "ig").iterdir()}
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "ig").iterdir()} == ig_files  # read back, not rerun
    assert json.loads((out / "cinet" / "metrics.json").read_text())["info"]["resumed_from"] == 3
    for name in ("ig", "cinet"):
        assert torch.equal(load_file(str(out / name / "reconstruction.safetensors"))["images"],
                           load_file(str(straight / name / "reconstruction.safetensors"))["images"]), name
    assert "| cinet " in (out / "table.md").read_text()
    assert main(["compare", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "expected a comparison folder with compare.json" in _err(capsys)


def _gradleak(*argv: str, wait: bool = True):
    cmd = [sys.executable, "-m", "gradleak", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every process: bit-identical
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@pytest.mark.slow  # subprocesses stopped with SIGINT and SIGKILL
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_run_resumes_to_the_bit_identical_reconstruction(client_files, tmp_path, sig):
    """Stopped at a random moment (mid-step for SIGINT and SIGTERM, between checkpoints for SIGKILL),
    resumed on the same thread count: the reconstruction equals the uninterrupted run's, bit for bit."""
    from safetensors.torch import load_file

    files = ["--update", str(client_files / "update.safetensors"), "--model-state", str(client_files / "model.safetensors")]
    common = ["--set", "channels=8", "--set", "checkpoint_every=7", "--set", "log_every=5", "--no-progress"]
    out = tmp_path / "run"
    proc = _gradleak("attack", *files, "--iterations", "100000", *common, "--out", str(out), wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = Checkpointer(out, 0).meta_path
            if ckpt.is_file() and json.loads(ckpt.read_text())["iteration"] >= 14:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint written within 120 s")
        time.sleep(0.3)  # somewhere in a later step
    finally:
        proc.send_signal(sig)
        proc.wait(timeout=60)
    reached = Checkpointer(out, 0).iteration()
    if sig != signal.SIGKILL:  # Ctrl-C, or a scheduler's stop: the step in progress was finished and saved
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attack_config"]["iterations"] = reached + 6
    (out / "config.json").write_text(json.dumps(cfg))
    done = _gradleak("attack", "--resume", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    straight = tmp_path / "straight"
    done = _gradleak("attack", *files, "--iterations", str(reached + 6), *common, "--out", str(straight))
    assert done.returncode == 0, done.stderr
    resumed = load_file(str(out / "reconstruction.safetensors"))["images"]
    assert torch.equal(resumed, load_file(str(straight / "reconstruction.safetensors"))["images"])


def test_simulate_a_batch_of_64_from_the_default_built_in_data(tmp_path, one_thread):
    from gradleak.threat.io import load_truth

    out = tmp_path / "sim64"
    assert main(["simulate", "--model", "lenet", "--batch-size", "64", "--out", str(out)]) == 0
    truth = load_truth(out / "truth.safetensors")
    images, labels = truth.images, truth.labels
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
    names = json.loads((out / "case.json").read_text())["images"]
    assert len(set(names)) == 64 and not any("#crop" in n for n in names)  # 64 real images, no crops


def test_every_command_that_makes_an_update_takes_the_threat_flags(tmp_path, capsys):
    """simulate (and so demo and compare) build the update from the same flags as the audit."""
    out = tmp_path / "fedavg"
    argv = ["simulate", *SMALL, "--protocol", "fedavg", "--local-steps", "2", "--local-lr", "0.05",
            "--defense", "noise:1e-4", "--out", str(out)]
    assert main(argv) == 0
    from gradleak.threat import load_update

    update = load_update(out / "update.safetensors")
    assert (update.kind, update.protocol, update.local_steps, update.local_lr) == ("delta", "fedavg", 2, 0.05)
    assert update.defenses == ("noise",)
    case = json.loads((out / "case.json").read_text())
    assert (case["protocol"], case["defense"], case["clients"]) == ("fedavg", "noise:1e-4", 1)
    two = tmp_path / "two"
    assert main(["simulate", *SMALL, "--clients", "2", "--out", str(two)]) == 0
    assert load_update(two / "update.safetensors").num_samples == 4  # K x N images behind the aggregate
    capsys.readouterr()
    for bad, message in [(["--local-steps", "1,2", "--protocol", "fedavg"], "expected one setting"),
                         (["--defense", "nope:1"], "unknown defense 'nope'")]:
        assert main(["simulate", *SMALL, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert message in _err(capsys)
    from gradleak.cli.main import build_parser

    parser = build_parser()
    for command in ("simulate", "demo", "compare", "audit"):
        sub = parser._subparsers._group_actions[0].choices[command]
        flags = {f for a in sub._actions for f in a.option_strings}
        assert {"--protocol", "--local-steps", "--local-lr", "--local-batch-size", "--clients"} <= flags, command
        assert ("--defenses" if command == "audit" else "--defense") in flags, command


def test_a_finished_run_is_never_overwritten_unless_asked(client_files, tmp_path, capsys):
    u, m = str(client_files / "update.safetensors"), str(client_files / "model.safetensors")
    run = tmp_path / "run"
    base = ["attack", "--update", u, "--model-state", m, "--iterations", "2", "--set", "channels=8", "--no-progress"]
    assert main([*base, "--out", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    # another attack into the finished run: refused before anything is written
    assert main([*base, "--set", "lr=0.01", "--out", str(run)]) == 2
    message = _err(capsys)
    assert "holds a run" in message and "--force" in message
    # a failing call (bad config) into it: refused, the run intact
    assert main([*base, "--set", "upsample=cubic", "--out", str(run)]) == 2
    assert "upsample" in _err(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # a clean error into a new folder leaves no folder behind
    fresh = tmp_path / "fresh"
    assert main([*base, "--set", "nz=0", "--out", str(fresh)]) == 2
    assert "nz" in _err(capsys) and not fresh.exists()
    # --out is a file; --force replaces the run
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    assert "expected a folder, got an existing file" in _err(capsys)
    assert main([*base, "--set", "lr=0.01", "--out", str(run), "--force"]) == 0
    assert json.loads((run / "config.json").read_text())["attack_config"]["lr"] == 0.01


def test_resume_of_a_folder_without_a_checkpoint_is_a_clear_error(client_files, tmp_path, capsys):
    u, m = str(client_files / "update.safetensors"), str(client_files / "model.safetensors")
    run = tmp_path / "run"
    assert main(["attack", "--update", u, "--model-state", m, "--iterations", "2", "--set", "channels=8",
                 "--set", "checkpoint_every=0", "--no-progress", "--out", str(run)]) == 0
    Checkpointer(run, 0).meta_path.unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["attack", "--resume", str(run)]) == 2
    assert "no checkpoint" in _err(capsys)


def test_device_strings_are_checked_against_this_machine(monkeypatch):
    from gradleak.cli.common import check_device
    from gradleak.errors import ConfigError

    assert check_device("cpu") == "cpu"
    for bad, message in (("tpu", "expected cpu, cuda or cuda:N"), ("cuda:x", "expected cpu, cuda or cuda:N")):
        with pytest.raises(ConfigError, match=message):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1" and check_device("cuda") == "cuda"
    with pytest.raises(ConfigError, match=r"expected cuda:0 to cuda:1 \(this machine has 2 GPUs\), got 'cuda:2'"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device found"):
        check_device("cuda")


def test_a_sweep_grid_names_a_device_ray_can_give_it(tmp_path):
    from gradleak.errors import ConfigError
    from gradleak.sweep.runner import SweepGrid, run_sweep

    with pytest.raises(ConfigError, match="sweep device: expected cpu, cuda or cuda:N, got 'gpu'"):
        SweepGrid.from_dict({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1], "device": "gpu"})
    grid = SweepGrid.from_dict({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1], "device": "cuda"})
    with pytest.raises(ConfigError, match="expected num_gpus > 0"):
        run_sweep(grid, out=tmp_path / "sw", backend="ray")
    assert not (tmp_path / "sw").exists()


def test_train_writes_a_victim_that_weights_loads(tmp_path, capsys):
    """gradleak train, then --weights: the client's model is the trained one; another architecture is refused."""
    from gradleak.threat import load_model_state

    weights = tmp_path / "lenet.safetensors"
    assert main(["train", "--model", "lenet", "--activation", "relu", "--images", "32", "--epochs", "3",
                 "--out", str(weights)]) == 0
    record = json.loads(weights.with_suffix(".json").read_text())
    assert len(record["history"]) == 3 and record["history"][-1]["loss"] < record["history"][0]["loss"]
    assert main(["simulate", "--model", "lenet", "--activation", "relu", "--weights", str(weights), "--batch-size", "2",
                 "--out", str(tmp_path / "s")]) == 0
    trained, _ = load_model_state(weights)
    sent, _ = load_model_state(tmp_path / "s" / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), sent.state_dict().values()))
    assert json.loads((tmp_path / "s" / "case.json").read_text())["weights"] == str(weights)
    capsys.readouterr()
    assert main(["simulate", "--model", "lenet", "--weights", str(weights), "--out", str(tmp_path / "s2")]) == 2
    assert "activation 'relu' (expected 'sigmoid')" in _err(capsys)
    assert main(["audit", "--model", "lenet", "--weights", str(weights), "--batch-sizes", "1",
                 "--out", str(tmp_path / "a")]) == 2  # the flags name LeNet-sigmoid
    assert "activation 'relu' (expected 'sigmoid')" in _err(capsys) and not (tmp_path / "a").exists()
    a = tmp_path / "a2"
    assert main(["audit", "--model", "lenet", "--activation", "relu", "--weights", str(weights), "--batch-sizes", "1",
                 "--defenses", "none", "--attacks", "cinet", "--iterations", "2", "--set", "channels=8",
                 "--utility-steps", "0", "--no-progress", "--out", str(a)]) == 0
    assert "trained victim" in _err(capsys)  # the default distance was measured weak on trained victims
    cell = json.loads((a / "fedsgd_n1_none" / "cell.json").read_text())
    assert cell["settings"]["weights"]["path"] == str(weights) and len(cell["settings"]["weights"]["sha256"]) == 64
    config = json.loads((a / "fedsgd_n1_none" / "cinet_labels-recovered-s0" / "config.json").read_text())
    assert config["case"]["weights"]["path"] == str(weights)
    from gradleak.audit.engine import victim
    from gradleak.types import ModelSpec

    audited = victim(ModelSpec("lenet", activation="relu"), 42, weights).model
    assert all(torch.equal(a_, b_) for a_, b_ in zip(audited.state_dict().values(), trained.state_dict().values()))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # another file at the same path: refused on resume
    rc = main(["audit", "--model", "lenet", "--activation", "relu", "--weights", str(weights), "--batch-sizes", "1",
               "--defenses", "none", "--attacks", "cinet", "--iterations", "2", "--set", "channels=8",
               "--utility-steps", "0", "--no-progress", "--out", str(a)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "made with others" in err[-1] and "trained victim" in err[0]
    assert main(["train", "--model", "lenet", "--out", str(weights)]) == 2
    assert "it exists" in _err(capsys)


def test_compare_refuses_an_attack_that_cannot_apply_and_leaves_nothing(tmp_path, capsys):
    """imprint needs a malicious server: refused with exit 2 after the client is simulated, whose files go too."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", "lenet", "--batch-size", "2", "--attacks", "cinet,imprint", "--iterations", "2",
               "--no-progress", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "--attacks imprint: expected an attack that applies" in err and "\n" not in err
    assert not (out / "client").exists() and not (out / "compare.json").exists()
