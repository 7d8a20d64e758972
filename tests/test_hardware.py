"""The machine checks: native bfloat16 from the CPU's flags, the warning a run records, GEMM peak."""

from __future__ import annotations

import json
import os
import platform

import pytest
import torch

import gradleak
from conftest import make_case
from gradleak import hardware


@pytest.fixture
def flags(monkeypatch):
    def set_flags(values: set[str], machine: str = "x86_64") -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(values))
        monkeypatch.setattr(platform, "machine", lambda: machine)
    return set_flags


def test_native_bf16_reads_the_cpu_flags(flags):
    flags({"avx2", "avx512f", "avx512bw"})
    assert hardware.native_bf16("cpu") is False
    flags({"avx512f", "avx512_bf16"})
    assert hardware.native_bf16("cpu") is True
    flags({"amx_bf16", "amx_tile"})
    assert hardware.native_bf16() is True
    flags({"fp", "asimd", "bf16"}, machine="aarch64")
    assert hardware.native_bf16() is True
    flags({"fp", "asimd"}, machine="aarch64")
    assert hardware.native_bf16() is False
    flags(set())  # no /proc/cpuinfo: cannot tell, no warning
    assert hardware.native_bf16() is None
    assert hardware.precision_warning("bf16", "cpu") is None


def test_this_machines_flags_are_read():
    found = hardware.cpu_flags()
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "sse2" in found  # every x86-64 CPU has it: the parser read the real file
        text = open("/proc/cpuinfo").read()  # read here independently of the parser
        own = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
        assert hardware.native_bf16() is bool(own & {"avx512_bf16", "amx_bf16"})


def test_bf16_without_native_support_warns_and_is_recorded(flags, one_thread):
    flags({"avx512f"})
    assert "emulated" in hardware.precision_warning("bf16", "cpu")
    assert hardware.precision_warning("fp32", "cpu") is None
    server, update, _, labels = make_case("lenet", 1)
    attack = gradleak.attacks.create("cinet", {"iterations": 1, "channels": 8, "precision": "bf16",
                                               "checkpoint_every": 0})
    with pytest.warns(RuntimeWarning, match="without native bfloat16"):
        rec = attack.reconstruct(server, update, labels=labels)
    assert "emulated" in rec.info["precision_note"]
    flags({"avx512_bf16"})
    rec = attack.reconstruct(server, update, labels=labels)
    assert rec.info["precision_note"] is None


def test_matmul_gflops_is_a_positive_measurement(one_thread):
    fp32 = hardware.matmul_gflops(torch.float32, size=128, seconds=0.05)
    assert 0.1 < fp32 < 1e6


def test_float32_on_cuda_means_tf32_off_and_the_switches_are_restored(tmp_path):
    """Checked without a GPU: the policy only sets torch's two TF32 switches, which exist on every build."""
    from gradleak.reporting import RunOptions, run_attack

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a user may have set
        with hardware.float32_policy("cuda") as policy:
            assert policy == {"tf32": False, "deterministic": False}
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with hardware.float32_policy("cuda:0", tf32=True) as policy:
            assert policy == {"tf32": True, "deterministic": False} and torch.backends.cudnn.allow_tf32
        with hardware.float32_policy("cpu") as policy:
            assert policy == {"tf32": None, "deterministic": None}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    server, update, images, labels = make_case("lenet", 1, size=16)
    run = run_attack(server, update, attack="cinet", config={"iterations": 1, "channels": 4}, out=tmp_path / "r",
                     truth_images=images, truth_labels=labels, options=RunOptions(progress=False))
    assert run.metrics["summary"]["tf32"] is None  # a CPU run records that the switch does not apply
    assert '"tf32": null' in (tmp_path / "r" / "config.json").read_text()


def test_deterministic_cuda_sets_every_switch_and_puts_them_back(monkeypatch):
    """Checked without a GPU: torch's deterministic switches and cuBLAS's variable exist on every build."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with hardware.float32_policy("cuda", deterministic=True) as policy:
        assert policy == {"tf32": False, "deterministic": True}
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
    with hardware.float32_policy("cuda", deterministic=True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    with hardware.float32_policy("cpu", deterministic=True) as policy:
        assert policy["deterministic"] is None and not torch.are_deterministic_algorithms_enabled()


def test_a_resume_computes_as_the_run_did(tmp_path, monkeypatch):
    """--resume takes TF32 and determinism from config.json, not from its own (absent) flags."""
    from gradleak.cli import attack_cmd

    (tmp_path / "config.json").write_text(json.dumps({
        "attack": "cinet", "attack_config": {}, "device": "cuda", "case": {"files": {"update": "u", "model_state": "m"}},
        "float32": {"tf32": True, "deterministic": True}}))
    monkeypatch.setattr(attack_cmd.Checkpointer, "exists", lambda self: True)
    seen = {}
    monkeypatch.setattr(attack_cmd, "attack_files", lambda files, **kw: seen.update(kw))
    attack_cmd.resume_run(tmp_path, progress=False)
    options = seen["options"]
    assert options.tf32 is True and options.deterministic is True and options.resume is True
