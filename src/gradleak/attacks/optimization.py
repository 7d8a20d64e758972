"""Optimisation-based gradient inversion: DLG, iDLG and Inverting Gradients as one loop.

All three search images x (and, for DLG, soft labels) so that the victim's gradient on them matches
the uploaded one:

    min_x  D(grad_W L(F(x), y), grad_W*) + alpha * TV(x)

* ``dlg`` (Zhu et al., NeurIPS 2019, Alg. 1): L-BFGS on images and soft labels
  ``y = softmax(v)``, D = squared L2 distance.
* ``idlg`` (Zhao et al., 2020): DLG with the labels recovered from the update
  (:mod:`gradleak.labels`; for one image, the only negative entry of the last bias gradient).
* ``ig`` (Geiping et al., NeurIPS 2020, Sec. 4 and the published ``inversefed`` defaults): Adam on
  signed gradients, D = 1 - cosine similarity, total variation, box constraint [0, 1], step decay
  x0.1 at 3/8, 5/8 and 7/8 of the run, restarts scored by the matching loss.

The restart kept is the one with the lowest gradient-matching distance (the attacker's own
objective), never a comparison with the private batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from gradleak.attacks.base import ATTACKS, Attack, ProgressCallback
from gradleak.attacks.checkpoint import flatten_optimizer, unflatten_optimizer
from gradleak.attacks.loop import Loop, LoopConfig, Step, check_memory, prepare
from gradleak.attacks.schedules import DECAYS, make_scheduler, scheduler_state, soft_sign
from gradleak.attacks.threat_model import Knowledge
from gradleak.config import check_ranges
from gradleak.errors import CheckpointError, ConfigError
from gradleak.functional import total_variation
from gradleak.types import ClientUpdate, Reconstruction, ServerState

logger = logging.getLogger(__name__)

_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": ("lbfgs", "adam", "sgd"), "loss": ("l2", "cosine", "cosine-layer"), "lr_decay": DECAYS,
    "init": ("randn", "rand", "zeros", "patterned"), "line_search": (None, "strong_wolfe"),
    "signed": (False, True, "soft")}

PATTERN = 4
"""The side of the random tile of ``init="patterned"`` (breaching's ``patterned-4-randn``)."""


@dataclass(frozen=True)
class OptimizationConfig(LoopConfig):
    """Settings shared by DLG, iDLG and Inverting Gradients (defaults: iDLG).

    Args:
        iterations: optimiser steps per restart (an L-BFGS step runs up to ``lbfgs_max_iter``
            function evaluations, as in DLG's code).
        optimizer: ``"lbfgs"``, ``"adam"`` or ``"sgd"``.
        lr: step size.
        loss: gradient distance, ``"l2"`` (DLG), ``"cosine"`` (IG) or ``"cosine-layer"`` (each
            parameter tensor's cosine distance, averaged: every layer weighs the same).
        tv: weight of the total-variation prior (0: none).
        signed: feed the sign of the image gradient to the optimiser (IG; ``True``), or ``"soft"``: its
            soft sign, from nearly signed to unsigned over each restart (breaching's ``signed="soft"``,
            :func:`~gradleak.attacks.schedules.soft_sign`); not with L-BFGS.
        boxed: clamp the images to [0, 1] after every step (IG).
        lr_decay: ``"none"``, ``"step"`` (x0.1 at 3/8, 5/8 and 7/8 of the iterations; IG),
            ``"cosine"`` or ``"warmup-cosine"`` (:func:`gradleak.attacks.schedules.make_scheduler`).
        beta1: Adam's first-moment decay (0.9, PyTorch's default; 0.5 is common in generative
            inversion).
        restarts: independent trials; the one with the lowest matching loss is returned.
        init: image initialisation: ``"randn"`` (N(0, 1), the papers'), ``"rand"`` (U(0, 1)), ``"zeros"``
            or ``"patterned"`` (an N(0, 1) tile of :data:`PATTERN` x :data:`PATTERN` pixels repeated
            over each image and channel: a start with structure at every scale of the victim's
            strides, as in breaching).
        coarse: the first ``coarse`` iterations at half resolution (multi-resolution: after each
            step the images are projected onto 2 x 2 blocks, so the run first fits what a coarse
            image can explain; 0: off).
        soft_labels: optimise soft labels jointly with the images (DLG) instead of recovering them.
        line_search: L-BFGS line search: ``"strong_wolfe"`` or ``None`` (DLG's code).
        lbfgs_max_iter: function evaluations per L-BFGS step (torch's ``max_iter``).
        label_strategy: how labels are recovered when ``soft_labels`` is off (``gradleak.labels``).
        log_every: iterations between loss readings and progress callbacks.
        checkpoint_every: iterations between checkpoints when a run folder is given (0: none).
        adaptive: ``"auto"`` (simulate the update's recorded defense), ``"on"`` (the same; refuse an
            undefended update) or ``"off"`` (the unaware attacker).
    """

    iterations: int = 300
    optimizer: str = "lbfgs"
    lr: float = 1.0
    loss: str = "l2"
    tv: float = 0.0
    signed: bool | Literal["soft"] = False
    boxed: bool = False
    lr_decay: str = "none"
    restarts: int = 1
    init: str = "randn"
    soft_labels: bool = False
    line_search: str | None = "strong_wolfe"
    lbfgs_max_iter: int = 20
    beta1: float = 0.9
    log_every: int = 10
    coarse: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{name} {key}: expected one of {', '.join(map(repr, allowed))}, "
                                  f"got {getattr(self, key)!r}")
        if self.signed and self.optimizer == "lbfgs":
            raise ConfigError(f"{name}: signed gradients need a first-order optimizer ('adam' or 'sgd'), got 'lbfgs'")
        check_ranges(name, self, iterations=(0, None), lr=(0, None, "open"), tv=(0, None), restarts=(1, 10_000),
                     lbfgs_max_iter=(1, None), beta1=(0, 0.999), coarse=(0, None))


@dataclass(frozen=True)
class DLGConfig(OptimizationConfig):
    """DLG: as :class:`OptimizationConfig`, with soft labels optimised jointly."""

    soft_labels: bool = True


@dataclass(frozen=True)
class IGConfig(OptimizationConfig):
    """Inverting Gradients: the published ``inversefed`` defaults (Geiping et al. 2020)."""

    iterations: int = 4800
    optimizer: str = "adam"
    lr: float = 0.1
    loss: str = "cosine"
    tv: float = 0.1
    signed: bool | Literal["soft"] = True
    boxed: bool = True
    lr_decay: str = "step"
    line_search: str | None = None


@dataclass
class _Run:
    """The restarts' mutable state: the current trial's variables and optimiser, the best so far."""

    x: torch.Tensor
    v: torch.Tensor
    opt: torch.optim.Optimizer
    sched: Any
    best_x: torch.Tensor
    best_v: torch.Tensor
    good: torch.Tensor  # the current trial's last finite images
    restart: int = 0
    iteration: int = 0  # last completed iteration of the current restart
    scores: list[float] = field(default_factory=list)
    diverged: list[bool] = field(default_factory=list)
    best_score: float | None = None

    _META = ("restart", "iteration", "scores", "diverged", "best_score")

    def meta(self) -> dict[str, Any]:
        return {k if k != "iteration" else "restart_iteration": getattr(self, k) for k in self._META}

    def begin(self, trial: _Run) -> None:
        """Start restart ``trial`` (its variables and optimiser); the bookkeeping stays."""
        self.x, self.v, self.opt, self.sched, self.good = trial.x, trial.v, trial.opt, trial.sched, trial.good


def _coarse(x: torch.Tensor) -> torch.Tensor:
    """``x`` projected onto 2 x 2 blocks (each block its mean; an odd last row or column kept as is)."""
    h, w = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    out = x.clone()
    block = torch.nn.functional.avg_pool2d(x[..., :h, :w], 2)
    out[..., :h, :w] = block.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return out


class OptimizationAttack(Attack):
    """The loop behind ``dlg``, ``idlg`` and ``ig``; the subclasses only set defaults and presets."""

    name = "optimization"
    adaptive = True
    matches_bn_stats = True
    feature_variant = True
    centred_variant = True
    Config = OptimizationConfig

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        cfg = self.config
        soft = cfg.soft_labels and labels is None
        setup = prepare(self, server, update, labels, strategy=None if soft else cfg.label_strategy,
                        adaptive=cfg.adaptive)
        matcher, y_hard = setup.matcher, setup.labels.labels
        loop = Loop(self, total=cfg.restarts * cfg.iterations, matcher=matcher, callback=callback, run_dir=run_dir)
        shape = (update.num_samples,) + tuple(server.input_shape)

        aux = setup.auxiliary
        stage = {"features_only": False}

        def objective(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if stage["features_only"]:  # feature_init: the features alone, no simulation
                match = aux.loss(x, features_only=True)
                assert match is not None
                total = match
                match = torch.full_like(match, float("inf"))  # not a matching loss: never at the noise floor
            else:
                with aux.watching():
                    match = matcher.distance(cfg.loss, matcher.simulate(x, torch.softmax(v, -1) if soft else y_hard))
                extra = aux.loss(x)
                total = match if extra is None else match + extra
            return (total + cfg.tv * total_variation(x) if cfg.tv > 0 else total), match

        rng = torch.Generator().manual_seed(self.seed)
        run = self._trial(shape, server.num_classes, soft, rng)
        memory_estimate = check_memory(
            self, lambda n: torch.full((n, *shape[1:]), 0.5, device=self.device, requires_grad=True), matcher,
            y_hard, update.num_samples, loss=cfg.loss, modules=(setup.victim,), trainable=[run.x])

        def state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            opt_t, opt_meta = _flatten(run.opt)
            tensors = {"x": run.x, "v": run.v, "best_x": run.best_x, "best_v": run.best_v, "rng": rng.get_state()}
            tensors.update({f"opt.{k}": t for k, t in opt_t.items()})
            return tensors, {**run.meta(), "optimizer": opt_meta, "scheduler": scheduler_state(run.sched)}

        def step(it: int) -> Step:
            stage["features_only"] = it <= cfg.feature_init
            value, match = self._step(run.opt, run.sched, run.x, run.v, soft, objective, it)
            if it <= cfg.coarse:  # multi-resolution: the images stay on 2 x 2 blocks
                with torch.no_grad():
                    run.x.copy_(_coarse(run.x))
            if not (math.isfinite(value) and bool(torch.isfinite(run.x).all())):
                logger.warning("%s: restart %d diverged at iteration %d; keeping its last finite images",
                               self.name, run.restart, it)
                with torch.no_grad():
                    run.x.copy_(run.good)
                return Step(loss=value, diverged=True)
            run.good, run.iteration = run.x.detach().clone(), it
            return Step(loss=value, match=match)

        loop.state = state
        if resume:
            restored = loop.restore()
            with loop.restoring():
                run = self._restore(*restored, shape, soft, rng)
        partial = self._restarts(loop, run, step, objective, lambda: self._trial(shape, server.num_classes, soft, rng))
        if loop.total > 0:
            loop.save()
        y_out = torch.softmax(run.best_v, dim=-1).argmax(-1) if soft else y_hard
        scores = run.scores + partial
        return loop.outcome(run.best_x.clamp(0, 1), y_out, setup.labels.strategy, {
            "label_notes": setup.labels.warnings, "label_info": setup.labels.info, "restart_scores": scores,
            "best_restart": int(min(range(len(scores)), key=scores.__getitem__)), "diverged": run.diverged,
            "memory_estimate_bytes": memory_estimate}, aux)

    def _restarts(self, loop: Loop, run: _Run, step: Callable[[int], Step],
                  objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  trial: Callable[[], _Run]) -> list[float]:
        """Run the remaining restarts, keeping the best by matching loss; returns the score of a restart
        stopped part-way (a resumed run continues it), else nothing."""
        cfg = self.config

        def preview() -> torch.Tensor:
            return run.x.detach().clamp(0, 1)  # the current restart's images

        while run.restart < cfg.restarts and not loop.stopped:
            ended = loop.steps(step, start=run.iteration + 1, stop=cfg.iterations, offset=run.restart * cfg.iterations,
                               preview=preview)
            score = self._score(objective, run.x, run.v)
            if run.best_score is None or score < run.best_score:
                run.best_score, run.best_x, run.best_v = score, run.x.detach().clone(), run.v.detach().clone()
            if loop.stopped and run.iteration < cfg.iterations and ended != "diverged":
                return [score]
            run.scores.append(score)
            run.diverged.append(ended == "diverged")
            if run.restart + 1 < cfg.restarts:
                run.begin(trial())
            run.restart, run.iteration = run.restart + 1, 0
        return []

    def _trial(self, shape: tuple[int, ...], c: int, soft: bool, rng: torch.Generator) -> _Run:
        """A fresh restart: new images (and soft labels) and a new optimiser."""
        x, v = self._init(shape, c, soft, rng)
        opt, sched = self._optimizer([x, v] if soft else [x])
        return _Run(x=x, v=v, opt=opt, sched=sched, best_x=x.detach().clone(), best_v=v.detach().clone(),
                    good=x.detach().clone())

    def _init(self, shape: tuple[int, ...], c: int, soft: bool,
              rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh images (and DLG's soft-label logits, N(0, 1) as in its code) for one restart."""
        if self.config.init == "randn":
            x = torch.randn(shape, generator=rng)
        elif self.config.init == "rand":
            x = torch.rand(shape, generator=rng)
        elif self.config.init == "patterned":
            tile = torch.randn((*shape[:2], PATTERN, PATTERN), generator=rng)
            h, w = shape[2], shape[3]
            x = tile.repeat(1, 1, -(-h // PATTERN), -(-w // PATTERN))[..., :h, :w].contiguous()
        else:
            x = torch.zeros(shape)
        v = torch.randn((shape[0], c), generator=rng) if soft else torch.zeros(0)
        return x.to(self.device).requires_grad_(True), v.to(self.device).requires_grad_(soft)

    def _optimizer(self, variables: list[torch.Tensor]) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.config
        opt: torch.optim.Optimizer
        if cfg.optimizer == "lbfgs":
            # Tolerances at 0: default-initialised victims give gradients below torch's 1e-7
            # tolerance, which would end every L-BFGS step after one evaluation.
            opt = torch.optim.LBFGS(variables, lr=cfg.lr, max_iter=cfg.lbfgs_max_iter, tolerance_grad=0.0,
                                    tolerance_change=0.0, line_search_fn=cfg.line_search)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(variables, lr=cfg.lr, betas=(cfg.beta1, 0.999))
        else:
            opt = torch.optim.SGD(variables, lr=cfg.lr)
        return opt, make_scheduler(opt, cfg.lr_decay, cfg.iterations)

    def _step(self, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, v: torch.Tensor, soft: bool,
              objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              iteration: int) -> tuple[float, float]:
        """One optimiser step (``iteration`` of the restart, from 1); returns the objective and its matching
        part before it (L-BFGS: at its first evaluation)."""
        cfg = self.config
        variables = [x, v] if soft else [x]

        matches: list[float] = []

        def closure() -> torch.Tensor:
            loss, match = objective(x, v)
            matches.append(float(match.detach()))
            grads = torch.autograd.grad(loss, variables)  # not .backward(): keep the victim's .grad clean
            for var, g in zip(variables, grads):
                if var is x and cfg.signed == "soft":
                    g = soft_sign(g, iteration, cfg.iterations)
                elif var is x and cfg.signed:
                    g = g.sign()
                var.grad = g
            return loss.detach()

        if cfg.optimizer == "lbfgs":
            value = float(opt.step(closure))  # type: ignore[arg-type]
        else:
            value = float(closure())
            opt.step()
        sched.step()
        if cfg.boxed:
            with torch.no_grad():
                x.clamp_(0, 1)
        return value, matches[0]

    @staticmethod
    def _score(objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               x: torch.Tensor, v: torch.Tensor) -> float:
        """The restart's matching distance (no prior): the only criterion used to pick a restart."""
        with torch.enable_grad():
            value = float(objective(x.detach(), v.detach())[1].detach())
        return value if math.isfinite(value) else math.inf

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...], soft: bool,
                 rng: torch.Generator) -> _Run:
        if tuple(tensors["x"].shape) != shape:
            raise CheckpointError(f"resume: the checkpoint holds images of shape {tuple(tensors['x'].shape)}, "
                                  f"this run reconstructs {shape}")
        x = tensors["x"].to(self.device).requires_grad_(True)
        v = tensors["v"].to(self.device).requires_grad_(soft)
        opt, sched = self._optimizer([x, v] if soft else [x])
        opt_t = {k[4:]: t for k, t in tensors.items() if k.startswith("opt.")}
        opt.load_state_dict(_unflatten(opt_t, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        rng.set_state(tensors["rng"])
        return _Run(x=x, v=v, opt=opt, sched=sched, best_x=tensors["best_x"].to(self.device),
                    best_v=tensors["best_v"].to(self.device), good=x.detach().clone(), restart=int(meta["restart"]),
                    iteration=int(meta["restart_iteration"]), scores=list(meta["scores"]),
                    diverged=list(meta["diverged"]), best_score=meta["best_score"])


def _flatten(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as tensors + JSON; L-BFGS's lists of tensors are stacked."""
    state = opt.state_dict()
    packed: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    lists: dict[str, int] = {}
    for idx, entry in state["state"].items():
        out = {}
        for key, value in entry.items():
            if key == "al":  # L-BFGS scratch buffer, rebuilt on the next step
                continue
            if isinstance(value, list):
                lists[f"{idx}.{key}"] = len(value)
                if value:
                    out[key] = torch.stack([torch.as_tensor(t) for t in value])
            else:
                out[key] = value
        packed["state"][idx] = out
    tensors, meta = flatten_optimizer(packed)
    meta["lists"] = lists
    return tensors, meta


def _unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = unflatten_optimizer(tensors, meta)
    for name, length in meta.get("lists", {}).items():
        idx, key = name.split(".", 1)
        entry = state["state"].setdefault(int(idx), {})
        # Clones, not views: dot products over views at an offset round differently (SIMD
        # alignment), and a resumed run would drift from the uninterrupted one.
        entry[key] = [t.clone() for t in entry.pop(key).unbind(0)] if length else []
    return state


_PUBLISHED_CODE: dict[str, dict[str, Any]] = {
    # DLG's and iDLG's code: the defaults (L-BFGS lr 1, 300 steps, N(0, 1) images, and DLG's label
    # logits or iDLG's label from the last layer's gradient) without the line search.
    "paper": {"line_search": None},
    "default": {},
}


@ATTACKS.register("dlg")
class DLGAttack(OptimizationAttack):
    """Deep Leakage from Gradients: L-BFGS on images and soft labels, squared L2 gradient distance.

    The default adds a strong-Wolfe line search to DLG's plain L-BFGS (lr=1): on default-
    initialised victims the plain step barely moves (measured on LeNet-sigmoid, one CIFAR-10
    image, 30 steps: MSE 0.198 without, 0.002 with). ``preset("paper")`` is DLG's code as published.

    References:
        Zhu, Liu, Han. Deep Leakage from Gradients. NeurIPS 2019. Algorithm 1.
    """

    name = "dlg"
    Config = DLGConfig
    knowledge = Knowledge(labels="joint", sok="A")
    presets = _PUBLISHED_CODE


@ATTACKS.register("idlg")
class IDLGAttack(OptimizationAttack):
    """iDLG: DLG with the labels recovered analytically from the update (not optimised).

    References:
        Zhao, Mopuri, Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv:2001.02610, 2020.
    """

    name = "idlg"
    Config = OptimizationConfig
    knowledge = Knowledge(sok="A")
    presets = _PUBLISHED_CODE


@ATTACKS.register("ig")
class InvertingGradientsAttack(OptimizationAttack):
    """Inverting Gradients: signed Adam on the cosine distance, TV prior, box constraint, restarts.

    References:
        Geiping, Bauermeister, Droege, Moeller. Inverting Gradients - How easy is it to break
        privacy in federated learning? NeurIPS 2020. Sec. 4 (Eq. 4) and the published code.
    """

    name = "ig"
    Config = IGConfig
    knowledge = Knowledge(sok="B")
    presets = {
        # inversefed's DEFAULT_CONFIG (CIFAR): 4800 steps, Adam 0.1, TV 1e-1, one trial.
        "paper": {},  # the defaults
        # inversefed's ImageNet ResNet-18 example: 24k steps, 8 trials.
        "imagenet": {"iterations": 24_000, "restarts": 8},
        # breaching's invertinggradients.yaml: TV scale 0.2, 24k steps, one trial.
        "breaching": {"iterations": 24_000, "tv": 0.2},
    }
