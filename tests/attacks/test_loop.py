"""The run loop's Ctrl-C and SIGTERM handling (held until the step in progress ends) and its checkpoints."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch
from test_baselines import _lenet_case

import gradleak
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
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 5
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
    assert calls[-1].endswith("checkpoint.json")
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 2  # one behind
    assert checkpoint.Checkpointer(tmp_path, 0).iteration() == 4
    resumed = gradleak.attacks.create("cinet", cfg, seed=2).reconstruct(server, update, run_dir=tmp_path, resume=True)
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.images, whole.images)
    assert resumed.history == whole.history
