"""The run loop every iterative attack shares; each attack's own file holds only its math.

An iterative attack (CI-Net, DLG/iDLG/IG, GIAS) does the same bookkeeping around its steps:

* :func:`prepare`: check the update against the model, recover (or take) the labels, copy the
  victim into the client's BatchNorm mode, and build the gradient matcher (adaptive to a recorded
  defense where asked).
* :class:`Loop`: run steps ``start..stop`` of a stage, log the loss every ``log_every`` steps and
  at the end, call the progress callback (which may stop the run), stop at the matcher's noise
  floor, checkpoint every ``checkpoint_every`` steps, and on Ctrl-C (or SIGTERM) finish the step
  in progress, save the state after it and re-raise (:func:`deferred_stop`). It restores a
  checkpoint (refusing one written with other settings) and keeps the history and the clock across
  resumes.
* :meth:`Loop.outcome`: the :class:`~gradleak.types.Reconstruction` with the fields every attack
  reports (iterations, seconds, why it stopped early, where it resumed from, the matching).

An attack gives the loop a ``step(it) -> Step`` function for each stage and, for checkpoints, a
``state()`` function that returns its tensors and JSON; restarts and stages stay in the attack.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradleak.attacks.adaptive import check_adaptive
from gradleak.attacks.auxiliary import Auxiliary
from gradleak.attacks.base import Progress, ProgressCallback
from gradleak.attacks.checkpoint import Checkpointer
from gradleak.attacks.matching import Matcher, build_matcher, centered
from gradleak.config import check_ranges
from gradleak.errors import CheckpointError, ConfigError, Terminated, UpdateError
from gradleak.hardware import counting_saved_bytes, device_memory, memory_bytes
from gradleak.labels import LabelResult
from gradleak.types import ClientUpdate, Reconstruction, ServerState

if TYPE_CHECKING:
    from gradleak.attacks.base import Attack

RESUMABLE_CHANGES = ("iterations", "log_every", "checkpoint_every")
"""Config fields a resume may change (a longer budget, other logging); any other difference is refused."""

FUTURE_SWITCHES = ("fp32_from",)
"""Config fields naming an iteration from which the run changes (0: never): a resume may move one when both
the recorded and the new value lie beyond the checkpoint, since every step taken so far ran the same under
either (a bf16 run that stalls can go on in float32)."""

FLOOR = "noise floor reached"
STOPPED = "stopped by the callback"


@dataclass(frozen=True)
class LoopConfig:
    """The settings the loop reads, shared by every iterative attack's config (which may change the defaults).

    Args:
        label_strategy: how labels are recovered from the update (``gradleak.labels``), or ``"scored"``:
            every strategy's multiset, scored by a short matching run (:mod:`gradleak.attacks.label_scoring`).
        log_every: iterations between loss readings and progress callbacks (host syncs).
        checkpoint_every: iterations between checkpoints when a run folder is given (0: none).
        adaptive: ``"auto"`` (simulate the update's recorded defense, :mod:`gradleak.attacks.adaptive`),
            ``"on"`` (the same; refuse an undefended update) or ``"off"`` (the unaware attacker).
        features: weight of the last-layer feature-matching term (0: off): the input of the victim's
            last linear layer, recovered from the update (:mod:`gradleak.attacks.features`), matched
            by the candidates' (:mod:`gradleak.attacks.auxiliary`).
        feature_init: iterations at the start that match only those features (an initialisation
            target; they count in the budget).
        bn_stats: weight of the BatchNorm-statistics term, used whenever the update shares the
            client's running statistics (0: ignore them).
        center: subtract the mean simulated update of this many batches of uniform noise from the
            target and from every simulation before matching (0: off;
            :func:`~gradleak.attacks.matching.centered`): for victims whose update barely depends
            on the images.
    """

    label_strategy: str = "auto"
    log_every: int = 25
    checkpoint_every: int = 100
    adaptive: str = "auto"
    features: float = 0.0
    feature_init: int = 0
    bn_stats: float = 0.1
    center: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_adaptive(owner, self.adaptive)
        check_ranges(owner, self, log_every=(1, None), checkpoint_every=(0, None), features=(0, None),
                     feature_init=(0, None), bn_stats=(0, None), center=(0, None))


@dataclass
class Setup:
    """What an iterative attack starts from (:func:`prepare`)."""

    labels: LabelResult
    victim: nn.Module
    matcher: Matcher
    auxiliary: Auxiliary


def prepare(attack: Attack, server: ServerState, update: ClientUpdate, labels: torch.Tensor | None, *,
            strategy: str | None, adaptive: str) -> Setup:
    """Checks, labels, the victim copy in the client's BatchNorm mode, and the matcher.

    ``strategy=None`` recovers no labels (an attack that optimises them, as DLG does).
    """
    attack.check(server, update)
    check_size(update, server)
    if strategy is None:
        lab = LabelResult(torch.empty(0, dtype=torch.long), "dlg-joint")
    else:
        lab = attack.resolve_labels(server, update, labels, strategy)
    victim = copy.deepcopy(server.model).to(attack.device)
    victim.train(server.bn_mode == "train")
    matcher = build_matcher(update, victim, device=attack.device, adaptive=adaptive)
    if attack.config.center > 0:
        matcher = centered(matcher, lab.labels, (update.num_samples, *server.input_shape), attack.config.center,
                           seed=attack.seed, victim=victim)
    aux = Auxiliary.build(attack.config, server, update, victim, lab.labels, seed=attack.seed, device=attack.device)
    return Setup(labels=lab, victim=victim, matcher=matcher, auxiliary=aux)


def check_size(update: ClientUpdate, server: ServerState) -> None:
    """Refuse a batch whose images alone would fill half of this machine's memory (a header's N is the
    client's word, not a size to allocate)."""
    total = memory_bytes()
    need = update.num_samples * math.prod(server.input_shape) * 4
    if total is not None and need > total // 2:
        raise UpdateError(f"update num_samples: {update.num_samples} images of {server.input_shape} would need "
                          f"{need / 2**30:.1f} GiB for the images alone; expected at most half of this machine's "
                          f"{total / 2**30:.0f} GiB")


MEMORY_FACTOR = 1.0
"""A step's peak over what autograd saves for it. The count errs high (a tensor saved by two
operations counts twice), about as much as the backward's own gradients and workspace add, so the
count itself is the estimate. Calibrated on CI-Net (2026-12-04), estimate / measured attack's share:
an H200 at batch 32, 256 px, 128 channels 1.10 in fp32 (6595 / 5993 MB) and 1.06 with bf16 +
activation checkpointing (2379 / 2238 MB); a CPU's resident set at batch 8, 256 px, 256 channels
1.11 (2627 / 2367 MB) and at batch 64, 32 px, 128 channels 0.9-1.1 (1942 against 1700-2100 MB, the
process's libraries not known more closely)."""


def estimate_step_bytes(source: Callable[[int], torch.Tensor], matcher: Matcher, labels: torch.Tensor, num: int, *,
                        loss: str, modules: Sequence[nn.Module] = (), trainable: Sequence[torch.Tensor] = ()) -> int:
    """Bytes one attack step on ``num`` images takes, from steps on 2 and 4 images.

    ``source(n)`` makes ``n`` images as the attack does (a generator's output, or a leaf tensor);
    each small step runs the forward, the victim's gradient with ``create_graph`` and the matching
    loss, counting what autograd saves (:func:`~gradleak.hardware.counting_saved_bytes`). The count
    is linear in the batch (a fixed part and a part per image), extrapolated to ``num``, times
    :data:`MEMORY_FACTOR`, plus the optimized tensors four times over (value, gradient, Adam's two
    moments) and the target twice. ``modules``' states (BatchNorm statistics, spectral-norm
    iterates) are put back afterwards, so the run that follows is the one it would have been.
    Run it under the attack's autocast and checkpointing, as its steps run.
    """
    sizes = sorted({min(2, num), min(4, num)})
    saved: list[int] = []
    states = [copy.deepcopy(m.state_dict()) for m in modules]
    try:
        for n in sizes:
            with counting_saved_bytes() as count:
                matcher.distance(loss, matcher.simulate(source(n), labels[:n]))
            saved.append(count[0])
    finally:
        for m, state in zip(modules, states):
            m.load_state_dict(state)
    if len(sizes) == 2:
        per = max(0.0, (saved[1] - saved[0]) / (sizes[1] - sizes[0]))
        fixed = max(0.0, saved[0] - per * sizes[0])
    else:
        per, fixed = saved[0] / sizes[0], 0.0
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return int(MEMORY_FACTOR * (fixed + per * num) + 4 * nbytes(trainable) + 2 * nbytes(matcher.target))


def check_memory(attack: Attack, source: Callable[[int], torch.Tensor], matcher: Matcher, labels: torch.Tensor,
                 num: int, *, loss: str, modules: Sequence[nn.Module] = (),
                 trainable: Sequence[torch.Tensor] = ()) -> int | None:
    """Refuse, before the run allocates, a step that would not fit the GPU's free memory.

    On a CUDA device the step's footprint is estimated (:func:`estimate_step_bytes`) and compared
    with ``torch.cuda.mem_get_info``'s free bytes; on a CPU nothing is checked here (the host's
    memory is checked by :func:`check_size`). Returns the estimate in bytes, or None where nothing
    was checked (a CPU; labels optimised jointly, whose step has no labels to give).

    Raises:
        ConfigError: the estimate exceeds the free memory (exit 2, nothing allocated for the batch).
    """
    memory = device_memory(attack.device)
    if memory is None or labels.numel() == 0:
        return None
    need = estimate_step_bytes(source, matcher, labels, num, loss=loss, modules=modules, trainable=trainable)
    free, total = memory
    if need > free:
        raise ConfigError(
            f"{attack.name} on {attack.device}: a step on {num} images needs about {need / 2**30:.1f} GiB "
            f"(estimated from steps on 2 and 4), expected at most the {free / 2**30:.1f} GiB free of the "
            f"device's {total / 2**30:.1f} GiB; use a smaller batch, another GPU, or (CI-Net) "
            "precision=bf16 and activation_checkpointing=true")
    return need


@dataclass
class Step:
    """What one step reports to the loop.

    Args:
        loss: the objective at this step (0-dim tensor or float; read only when logged).
        match: its gradient-matching part, for the noise-floor test (default: ``loss``).
        images: the images for a progress callback (default: the stage's ``preview()``).
        diverged: the step went non-finite; the attack has put back its last finite state and
            the stage ends here.
    """

    loss: torch.Tensor | float
    match: torch.Tensor | float | None = None
    images: torch.Tensor | None = None
    diverged: bool = False


@dataclass
class Loop:
    """One run's bookkeeping around the steps of an iterative attack.

    Args:
        attack: the attack (its name, config, and ``log_every``/``checkpoint_every``).
        total: the run's iteration budget over all stages and restarts (for progress bars).
        matcher: the gradient matcher (its noise floor ends a run).
        callback: the progress callback.
        run_dir: the run folder for checkpoints (None: no checkpoints).
    """

    attack: Attack
    total: int
    matcher: Matcher
    callback: ProgressCallback | None = None
    run_dir: str | Path | None = None
    state: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    """The attack's checkpoint content: its tensors and its JSON (set before the first step)."""
    history: dict[str, list[float]] = field(default_factory=lambda: {"iteration": [], "loss": []})
    done: int = 0
    resumed_from: int = 0
    stop_reason: str | None = None
    _elapsed: float = 0.0
    _t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        cfg = self.attack.config
        self.log_every = int(cfg.log_every)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint_every) if self.run_dir is not None else None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def seconds(self) -> float:
        """On-clock seconds of the whole run, resumed runs included."""
        return self._elapsed + time.perf_counter() - self._t0

    def restore(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load the run folder's checkpoint: history, iteration count and clock; the attack's part is returned.

        Raises:
            CheckpointError: no run folder or checkpoint, or a checkpoint written with other settings.
        """
        if self.ckpt is None:
            raise CheckpointError(f"{self.attack.name}: resume needs the run folder that holds the checkpoint")
        tensors, meta = self.ckpt.load()
        written = meta.get("config")
        if isinstance(written, dict):
            now = _jsonable(dataclasses.asdict(self.attack.config))
            # a setting added to the attack after the checkpoint was written, left at its default, is what
            # that run ran: it does not stop the resume
            added = {f.name for f in dataclasses.fields(self.attack.config)
                     if f.name not in written and f.default is not dataclasses.MISSING
                     and now.get(f.name) == _jsonable(f.default)}
            done = int(meta["iteration"])
            ahead = {k for k in FUTURE_SWITCHES
                     if all(isinstance(v, int) and (v == 0 or v > done) for v in (now.get(k), written.get(k, 0)))}
            changed = sorted(k for k in set(now) | set(written) if k not in RESUMABLE_CHANGES
                             and k not in added and k not in ahead and now.get(k) != written.get(k))
            if changed:
                detail = ", ".join(f"{k}: {written.get(k)!r} -> {now.get(k)!r}" for k in changed)
                raise CheckpointError(f"resume: the checkpoint in '{self.ckpt.folder}' was written with other "
                                      f"settings ({detail}); resume with the recorded settings or start a new run")
        history = meta.get("history")
        if (not isinstance(history, dict) or not all(isinstance(v, list) for v in history.values())
                or not isinstance(meta.get("elapsed", 0.0), (int, float))):
            raise CheckpointError(f"resume: the checkpoint in '{self.ckpt.folder}': expected the run's history "
                                  "and clock, got something else")
        threads = meta.get("threads")
        if isinstance(threads, int) and threads != torch.get_num_threads():
            warnings.warn(f"resume: the checkpoint was written with {threads} threads, this run uses "
                          f"{torch.get_num_threads()}; the result will differ from an uninterrupted run in the "
                          "last bits (torch.set_num_threads to match)", RuntimeWarning, stacklevel=3)
        self.history = history
        self.done = self.resumed_from = int(meta["iteration"])
        self._elapsed = float(meta.get("elapsed", 0.0))
        return {k: t.clone() for k, t in tensors.items()}, meta  # aligned copies: see optimization._unflatten

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Around an attack's own restore: a checkpoint that does not fit it is a clear error."""
        try:
            yield
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            folder = self.ckpt.folder if self.ckpt is not None else self.run_dir
            raise CheckpointError(f"resume: the checkpoint in '{folder}' does not fit this {self.attack.name} run "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None

    def save(self) -> None:
        """Checkpoint now (the attack's ``state()`` plus the loop's own)."""
        if self.ckpt is None or self.state is None:
            return
        tensors, meta = self.state()
        tensors = {**tensors, "_iteration": torch.tensor(self.done)}
        self.ckpt.save(tensors, {**meta, "iteration": self.done, "history": self.history, "elapsed": self.seconds,
                                 "config": _jsonable(dataclasses.asdict(self.attack.config)),
                                 "threads": torch.get_num_threads()})

    def steps(self, step: Callable[[int], Step], *, start: int, stop: int, offset: int = 0,
              preview: Callable[[], torch.Tensor] | None = None) -> str:
        """Run ``step(it)`` for ``it = start..stop``; step ``it`` is iteration ``offset + it`` of the run.

        Returns why the stage ended: ``"done"``, ``"diverged"``, or the run's ``stop_reason``
        (the callback asked, or the noise floor was reached).
        """
        in_step = False
        try:
            with deferred_stop() as pending:
                for it in range(start, stop + 1):
                    in_step = True
                    out = step(it)
                    in_step = False
                    if out.diverged:
                        return "diverged"
                    self.done = offset + it
                    floor = self.matcher.floor is not None and self.matcher.at_floor(
                        float(out.loss if out.match is None else out.match))
                    if it % self.log_every == 0 or it == stop or floor:
                        value = float(out.loss)
                        self.history["iteration"].append(self.done)
                        self.history["loss"].append(value)
                        if self.callback is not None:
                            images = out.images if out.images is not None else (preview() if preview else None)
                            if images is None:
                                raise RuntimeError(f"{self.attack.name}: a stage needs images for the progress "
                                                   "callback")
                            if self.callback(Progress(self.done, self.total, value, images)):
                                self.stop_reason = STOPPED
                    if floor:
                        self.stop_reason = FLOOR  # below the noise floor the images fit the noise
                    if self.ckpt is not None and self.ckpt.due(self.done):
                        self.save()
                    stop_now = pending()
                    if stop_now is not None:
                        raise stop_now  # the Ctrl-C or SIGTERM held until this step ended
                    if self.stopped:
                        return str(self.stop_reason)
                return "done"
        except KeyboardInterrupt:
            if in_step:
                # raised inside a step (a second Ctrl-C, or not a signal): the attack's state may be
                # half-updated, so the last periodic checkpoint stands
                if self.ckpt is not None:
                    warnings.warn(f"{self.attack.name}: interrupted inside step {self.done + 1}; the run folder "
                                  f"keeps its last checkpoint", RuntimeWarning, stacklevel=2)
            elif self.done > self.resumed_from:
                self.save()  # Ctrl-C loses nothing: the state after the last completed step
            raise

    def outcome(self, images: torch.Tensor, labels: torch.Tensor, label_strategy: str,
                info: dict[str, Any], auxiliary: Auxiliary | None = None) -> Reconstruction:
        """The run's :class:`Reconstruction`: the common fields, and the attack's own ``info``."""
        cfg = self.attack.config
        return Reconstruction(
            images=images.detach().float().cpu(), labels=labels.detach().cpu(), label_strategy=label_strategy,
            history=self.history, iterations=self.done, seconds=self.seconds, stopped_early=self.stop_reason,
            resumed_from=self.resumed_from, matching=self.matcher.mode,
            info={"attack": self.attack.name, "config": dataclasses.asdict(cfg), "adaptive": self.matcher.adaptive,
                  "matching_loss": self.matcher.loss_name(cfg.loss), "centering": self.matcher.centering,
                  "auxiliary": auxiliary.info if auxiliary is not None else {}, **info})


_STOPS = {signal.SIGINT: (KeyboardInterrupt, b"Ctrl-C", b"Ctrl-C again"),
          signal.SIGTERM: (Terminated, b"SIGTERM", b"a second SIGTERM")}


@contextlib.contextmanager
def deferred_stop() -> Iterator[Callable[[], type[KeyboardInterrupt] | None]]:
    """Hold a Ctrl-C (SIGINT) or a SIGTERM until the step in progress ends; yields ``pending()``:
    the exception to raise once one came (KeyboardInterrupt, or :class:`Terminated`), else None.

    A step updates its optimizer, scheduler and buffers one after another; an exception in between
    would leave a state that is no iteration's. So the first signal is only recorded (and said on
    stderr) and the loop raises at the end of the step, after which the state is whole and is
    checkpointed. A second one raises at once, and one held past the loop's last check is raised on
    leaving. SIGTERM is what a job scheduler sends before it kills a job, so a cluster run that is
    stopped also keeps its last step. Only in the main thread, and only for a signal whose handler
    is Python's default (SIGINT: ``default_int_handler``; SIGTERM: ``SIG_DFL``); a handler someone
    else installed is left alone.
    """
    mine = ([] if threading.current_thread() is not threading.main_thread() else
            [sig for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
             if signal.getsignal(sig) is default])
    held: list[type[KeyboardInterrupt]] = []

    def hold(signum: int, frame: Any) -> None:
        error, name, again = _STOPS[signal.Signals(signum)]
        if held:
            held.clear()  # delivered now
            raise error
        held.append(error)
        with contextlib.suppress(OSError):  # os.write, not print: the handler may interrupt a write to stderr
            os.write(2, b"\n" + name + b": finishing the current step to checkpoint it (" + again
                     + b" to stop at once)\n")

    previous = {sig: signal.signal(sig, hold) for sig in mine}
    try:
        yield lambda: held[0] if held else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:  # came after the last step's check: raise it now rather than lose it
        raise held[0]


def _jsonable(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), for comparing with a checkpoint."""
    return json.loads(json.dumps(value))
