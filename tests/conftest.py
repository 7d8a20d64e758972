"""Shared fixtures: small deterministic cases on the CPU, no downloads; the environment, set once.

``GRADLEAK_TEST_THREADS`` sets torch's thread count for the whole run (default 2): 1 leaves a core
to a benchmark running beside the tests, and CI runs the slow tests on 1 (in two pytest-xdist
workers) and the quick ones on 2, so a tolerance that holds on one thread count only fails in CI.
"""

from __future__ import annotations

import os
import signal

# Before anything imports Flower or Ray: no telemetry, no network calls.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from gradleak.data import builtin_batch  # noqa: E402
from gradleak.models import build_model  # noqa: E402
from gradleak.threat import fedsgd_update  # noqa: E402
from gradleak.types import ModelSpec, ServerState  # noqa: E402

torch.set_num_threads(int(os.environ.get("GRADLEAK_TEST_THREADS", "2")))

# A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and gradleak rightly leaves an ignored SIGINT alone (gradleak.attacks.loop.deferred_stop):
# the tests of its Ctrl-C handling need SIGINT as at a terminal, here and in the subprocesses they
# start (a handled signal is back to its default across exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Shared, noisy 2-core machines: no per-example deadline, and slow input generation on a cold start
# is not a failure. CI runs the same examples every time (a failure found elsewhere is kept as a
# regression test).
settings.register_profile("gradleak", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("gradleak"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "gradleak")


def make_case(name: str = "lenet", n: int = 2, *, activation: str = "sigmoid", size: int = 32,
              num_classes: int = 10, bn_mode: str = "train", width: int | None = None):
    """(server, update, images, labels) for ``n`` built-in CIFAR-10 photos on a fresh victim."""
    spec = ModelSpec(name=name, num_classes=num_classes, image_size=size, activation=activation,
                     bn_mode=bn_mode, width=width)
    model = build_model(spec, seed=42)
    batch = builtin_batch(n, size=size, source="cifar10" if n <= 20 else "photos", num_classes=num_classes)
    server = ServerState.from_spec(model, spec)
    update = fedsgd_update(server, batch.images, batch.labels)
    return server, update, batch.images, batch.labels


@pytest.fixture(name="make_case")
def make_case_fixture():
    """The case factory, as a fixture: ``make_case("resnet18", 4, bn_mode="eval")``."""
    return make_case


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core machine: more threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def lenet_case():
    return make_case("lenet", 2)


def signal_in_cinet_step(monkeypatch: pytest.MonkeyPatch, when, sig: int = signal.SIGINT) -> list[int]:
    """Send ``sig`` to this process as a CI-Net step begins, where ``when(iteration, runs)`` is true
    (``runs``: how many runs have started a first step so far). Returns the iterations stepped."""
    from gradleak.attacks.cinet import _Stepper

    step, seen, runs = _Stepper.__call__, [], [0]

    def signalled(self, it):
        runs[0] += it == 1
        seen.append(it)
        if when(it, runs[0]):
            os.kill(os.getpid(), sig)
        return step(self, it)

    monkeypatch.setattr(_Stepper, "__call__", signalled)
    return seen
