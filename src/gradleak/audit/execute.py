"""Where an audit's or a sweep's units of work run: in this process, a spawn process pool, or Ray tasks.

One function for both (:func:`execute`): each job is ``(id, argument)`` for a picklable ``fn``;
the jobs run in this process one after another (``backend="local"`` with one worker: a Ctrl-C is
held to the step's end and checkpointed as in ``gradleak attack``), in a spawn process pool
(``"local"`` with more workers), or as Ray tasks with CPU/GPU requests (``"ray"``, a local runtime
or a cluster's ``address``). A failed job is reported by id and does not lose the others.

References:
    Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from gradleak.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")

EventFn = Callable[[str, str], None]
"""``on_event(job_id, status)`` with status ``"submitted"``, ``"done"`` or ``"failed"``."""


def check_backend(backend: str, workers: int | None) -> None:
    """Raises ConfigError: an unknown backend or a worker count below 1."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers: expected a positive integer, got {workers!r}")


def _with_threads(fn: Callable[[Any], Any], threads: int, arg: Any) -> Any:
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(arg)


def execute(fn: Callable[[Any], Any], jobs: Sequence[tuple[str, Any]], *, backend: str = "local",
            workers: int | None = 1, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
            tell: EventFn | None = None, fail_fast: bool = False) -> dict[str, str]:
    """Run ``fn(arg)`` for every ``(job_id, arg)`` of ``jobs``; return the failures as ``{job_id: message}``.

    Args:
        fn: a module-level function (pickled to the workers).
        jobs: the work, in submission order.
        backend: ``"local"`` or ``"ray"``.
        workers: local processes (1: in this process, one job after another; ``None``: CPUs /
            ``num_cpus``), or the CPUs of a new local Ray runtime.
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None``: a runtime
            already initialised in this process, else a new local one.
        num_cpus: CPUs per job (Ray's request; torch threads in a worker).
        num_gpus: GPUs per job (Ray's request; fractions share a GPU).
        tell: told ``(job_id, status)``.
        fail_fast: in this process, raise a job's exception instead of recording it.
    """
    check_backend(backend, workers)
    say = tell or (lambda job_id, status: None)
    if not jobs:
        return {}
    if backend == "ray":
        return _ray(fn, jobs, workers=workers, address=address, num_cpus=num_cpus, num_gpus=num_gpus, tell=say)
    n = workers or max(1, int((os.cpu_count() or 1) // max(1, num_cpus)))
    if n == 1:
        return _inline(fn, jobs, tell=say, fail_fast=fail_fast)
    return _pool(fn, jobs, workers=n, threads=max(1, int(num_cpus)), tell=say)


def _inline(fn: Callable[[Any], Any], jobs: Sequence[tuple[str, Any]], *, tell: EventFn,
            fail_fast: bool) -> dict[str, str]:
    errors: dict[str, str] = {}
    for job_id, arg in jobs:
        tell(job_id, "submitted")
        try:
            fn(arg)
        except Exception as e:
            if fail_fast:
                raise
            errors[job_id] = f"{type(e).__name__}: {e}"
            log.error("job %s failed: %s", job_id, errors[job_id])
            tell(job_id, "failed")
            continue
        tell(job_id, "done")
    return errors


def _pool(fn: Callable[[Any], Any], jobs: Sequence[tuple[str, Any]], *, workers: int, threads: int,
          tell: EventFn) -> dict[str, str]:
    errors: dict[str, str] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_with_threads, fn, threads, arg): job_id for job_id, arg in jobs}
        for job_id, _ in jobs:
            tell(job_id, "submitted")
        for future in as_completed(futures):
            job_id = futures[future]
            try:
                future.result()
                tell(job_id, "done")
            except Exception as e:  # noqa: BLE001 - one failed job must not lose the others
                errors[job_id] = f"{type(e).__name__}: {e}"
                log.error("job %s failed: %s", job_id, errors[job_id])
                tell(job_id, "failed")
    return errors


def _ray(fn: Callable[[Any], Any], jobs: Sequence[tuple[str, Any]], *, workers: int | None, address: str | None,
         num_cpus: float, num_gpus: float, tell: EventFn) -> dict[str, str]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("the ray backend needs Ray: pip install 'gradleak[fl]'") from e
    own = not ray.is_initialized()
    if own:
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=workers, include_dashboard=False)
    errors: dict[str, str] = {}
    try:
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_with_threads)
        refs = {task.remote(fn, max(1, int(num_cpus)), arg): job_id for job_id, arg in jobs}
        for job_id, _ in jobs:
            tell(job_id, "submitted")
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            job_id = refs[done[0]]
            try:
                ray.get(done[0])
                tell(job_id, "done")
            except Exception as e:  # noqa: BLE001 - RayTaskError wraps the job's own error
                errors[job_id] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                log.error("job %s failed: %s", job_id, errors[job_id])
                tell(job_id, "failed")
    finally:
        if own:
            ray.shutdown()
    return errors


__all__ = ["BACKENDS", "check_backend", "execute"]
