"""The run loop's Ctrl-C and SIGTERM handling (held until the step in progress ends) and its checkpoints."""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings

import pytest
import torch
from test_baselines import _lenet_case

import gradleak
from gradleak.attacks.checkpoint import META_FILE, Checkpointer
from gradleak.attacks.loop import deferred_stop
from gradleak.attacks.optimization import OptimizationAttack
from gradleak.errors import Terminated


@pytest.mark.parametrize("sig,error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_first_stop_signal_is_held_and_a_second_raises_at_once(sig, error):
    with deferred_stop() as pending:
        assert pending() is None
        os.kill(os.getpid(), sig)
        assert pending() is error  # held: nothing raised yet
        with pytest.raises(error):
            os.kill(os.getpid(), sig)
        assert pending() is None  # that one was delivered
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sigint_held_past_the_last_check_is_raised_on_leaving():
    with pytest.raises(KeyboardInterrupt):
        with deferred_stop():
            os.kill(os.getpid(), signal.SIGINT)  # after the loop's last pending() check
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_held():
    seen: list[object] = []

    def body() -> None:
        with deferred_stop() as pending:
            seen.append(pending())
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [None, signal.default_int_handler]


def test_a_handler_someone_else_installed_is_left_alone():
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda s, f: calls.append(s))
    try:
        with deferred_stop() as pending:
            os.kill(os.getpid(), signal.SIGINT)
            assert pending() is None and calls == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ig_ctrl_c_inside_a_step_checkpoints_that_step_and_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """A SIGINT as IG step 5 begins (before its objective, its gradient and Adam's update):
    step 5 completes, is checkpointed, and the resumed run equals the straight one."""
    server, _, update = _lenet_case(1)
    cfg = {"iterations": 8, "log_every": 1, "checkpoint_every": 0}
    whole = gradleak.attacks.create("ig", cfg, seed=5).reconstruct(server, update)
    step, calls = OptimizationAttack._step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(OptimizationAttack, "_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            gradleak.attacks.create("ig", cfg, seed=5).reconstruct(server, update, run_dir=tmp_path)
    assert Checkpointer(tmp_path, 0).iteration() == 5
    resumed = gradleak.attacks.create("ig", cfg, seed=5).reconstruct(server, update, run_dir=tmp_path, resume=True)
    assert resumed.resumed_from == 5
    assert torch.equal(resumed.images, whole.images)
    assert resumed.history == whole.history


def test_a_kill_between_the_checkpoint_files_resumes_from_the_new_checkpoint(tmp_path, monkeypatch, one_thread):
    """Killed after the tensor file of iteration 4 was renamed into place and before its JSON copy
    was: checkpoint.json still says 2, the resume reads the tensor file's header and continues from 4
    to the straight run's images."""
    import gradleak.attacks.checkpoint as checkpoint

    server, _, update = _lenet_case(1)
    cfg = {"iterations": 6, "channels": 8, "log_every": 1, "checkpoint_every": 2}
    whole = gradleak.attacks.create("cinet", cfg, seed=2).reconstruct(server, update)
    replace, calls = os.replace, []

    def killed_between(src, dst):
        calls.append(str(dst))
        if len(calls) == 4:  # iteration 4's second rename (its JSON copy)
            raise SystemExit("killed")
        return replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "replace", killed_between)
        with pytest.raises(SystemExit):
            gradleak.attacks.create("cinet", cfg, seed=2).reconstruct(server, update, run_dir=tmp_path)
    assert calls[-1].endswith(META_FILE)
    assert json.loads(Checkpointer(tmp_path, 0).meta_path.read_text())["iteration"] == 2  # the JSON copy: one behind
    assert checkpoint.Checkpointer(tmp_path, 0).iteration() == 4
    resumed = gradleak.attacks.create("cinet", cfg, seed=2).reconstruct(server, update, run_dir=tmp_path, resume=True)
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.images, whole.images)
    assert resumed.history == whole.history


def test_a_batch_too_large_for_this_machine_is_refused_before_any_step(monkeypatch):
    """The memory guard: a header's N is the client's word; 2 images of 3x16x16 need 6 KiB, so a machine of
    8 KiB (half: 4 KiB) refuses them, naming the batch and the memory, and one of 1 GiB runs."""
    import gradleak.attacks.loop as loop

    server, _, update = _lenet_case(2)
    monkeypatch.setattr(loop, "memory_bytes", lambda: 8 * 1024)
    with pytest.raises(gradleak.errors.UpdateError, match=r"2 images of \(3, 16, 16\) would need .* half of"):
        gradleak.attacks.create("cinet", {"iterations": 2, "channels": 8}).reconstruct(server, update)
    monkeypatch.setattr(loop, "memory_bytes", lambda: 2**30)
    assert gradleak.attacks.create("cinet", {"iterations": 1, "channels": 8}).reconstruct(server, update).iterations == 1


def test_a_resume_on_another_thread_count_warns(tmp_path):
    server, _, update = _lenet_case(1)
    cfg = {"iterations": 4, "channels": 8, "log_every": 1, "checkpoint_every": 2}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        gradleak.attacks.create("cinet", {**cfg, "iterations": 2}).reconstruct(server, update, run_dir=tmp_path)
        torch.set_num_threads(2)
        with pytest.warns(RuntimeWarning, match="written with 1 threads, this run uses 2"):
            gradleak.attacks.create("cinet", cfg).reconstruct(server, update, run_dir=tmp_path, resume=True)
        with warnings.catch_warnings():  # the checkpoint of 4 was written on 2 threads, as this resume runs
            warnings.simplefilter("error", RuntimeWarning)
            gradleak.attacks.create("cinet", {**cfg, "iterations": 6}).reconstruct(server, update, run_dir=tmp_path,
                                                                                  resume=True)
    finally:
        torch.set_num_threads(before)
