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

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from gradleak.attacks.threat_model import Knowledge
from gradleak.attacks.base import ATTACKS, Attack, Progress, ProgressCallback
from gradleak.attacks.schedules import make_scheduler, scheduler_state
from gradleak.attacks.checkpoint import Checkpointer, flatten_optimizer, unflatten_optimizer
from gradleak.attacks.adaptive import check_adaptive
from gradleak.attacks.matching import build_matcher
from gradleak.errors import CheckpointError, ConfigError
from gradleak.functional import total_variation
from gradleak.types import ClientUpdate, Reconstruction, ServerState

logger = logging.getLogger(__name__)

_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": ("lbfgs", "adam", "sgd"), "loss": ("l2", "cosine"), "lr_decay": ("none", "step"),
    "init": ("randn", "rand", "zeros"), "line_search": (None, "strong_wolfe")}


@dataclass(frozen=True)
class OptimizationConfig:
    """Settings shared by DLG, iDLG and Inverting Gradients (defaults: iDLG).

    Args:
        iterations: optimiser steps per restart (an L-BFGS step runs up to ``lbfgs_max_iter``
            function evaluations, as in DLG's code).
        optimizer: ``"lbfgs"``, ``"adam"`` or ``"sgd"``.
        lr: step size.
        loss: gradient distance, ``"l2"`` (DLG) or ``"cosine"`` (IG).
        tv: weight of the total-variation prior (0: none).
        signed: feed the sign of the image gradient to the optimiser (IG); not with L-BFGS.
        boxed: clamp the images to [0, 1] after every step (IG).
        lr_decay: ``"none"`` or ``"step"`` (x0.1 at 3/8, 5/8 and 7/8 of the iterations; IG).
        restarts: independent trials; the one with the lowest matching loss is returned.
        init: image initialisation: ``"randn"`` (N(0, 1), the papers'), ``"rand"`` (U(0, 1)) or ``"zeros"``.
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
    signed: bool = False
    boxed: bool = False
    lr_decay: str = "none"
    restarts: int = 1
    init: str = "randn"
    soft_labels: bool = False
    line_search: str | None = "strong_wolfe"
    lbfgs_max_iter: int = 20
    label_strategy: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    adaptive: str = "auto"

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_adaptive(name, self.adaptive)
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{name} {key}: expected one of {', '.join(map(repr, allowed))}, "
                                  f"got {getattr(self, key)!r}")
        if self.signed and self.optimizer == "lbfgs":
            raise ConfigError(f"{name}: signed gradients need a first-order optimizer ('adam' or 'sgd'), got 'lbfgs'")
        if (self.iterations < 0 or self.lr <= 0 or self.tv < 0 or self.restarts < 1 or self.log_every < 1
                or self.checkpoint_every < 0 or self.lbfgs_max_iter < 1):
            raise ConfigError(f"{name}: expected iterations >= 0, lr > 0, tv >= 0, restarts >= 1, log_every >= 1, "
                              f"checkpoint_every >= 0, lbfgs_max_iter >= 1, got {self}")


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
    signed: bool = True
    boxed: bool = True
    lr_decay: str = "step"
    line_search: str | None = None


@dataclass
class _Run:
    """The mutable state of one run: what a checkpoint holds besides tensors."""

    restart: int = 0
    iteration: int = 0  # last completed iteration of the current restart
    history: dict[str, list[float]] = field(default_factory=lambda: {"iteration": [], "loss": []})
    scores: list[float] = field(default_factory=list)
    diverged: list[bool] = field(default_factory=list)
    best_score: float | None = None
    elapsed: float = 0.0

    def meta(self) -> dict[str, Any]:
        return asdict(self)


class OptimizationAttack(Attack):
    """The loop behind ``dlg``, ``idlg`` and ``ig``; the subclasses only set defaults and presets."""

    name = "optimization"
    Config = OptimizationConfig

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        cfg = self.config
        self.check(server, update)
        start_time = time.perf_counter()
        n, c = update.num_samples, server.num_classes
        soft = cfg.soft_labels and labels is None
        notes: list[str] = []
        label_info: dict[str, Any] = {}
        if soft:
            y_hard, label_strategy = torch.empty(0), "dlg-joint"
        else:
            lab = self.resolve_labels(server, update, labels, cfg.label_strategy)
            y_hard, label_strategy, notes, label_info = lab.labels, lab.strategy, lab.warnings, lab.info
        victim = copy.deepcopy(server.model).to(self.device)
        victim.train(server.bn_mode == "train")
        matcher = build_matcher(update, victim, device=self.device, adaptive=cfg.adaptive)
        shape = (n,) + tuple(server.input_shape)

        def objective(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            match = matcher.distance(cfg.loss, matcher.simulate(x, torch.softmax(v, -1) if soft else y_hard))
            return (match + cfg.tv * total_variation(x) if cfg.tv > 0 else match), match

        rng = torch.Generator().manual_seed(self.seed)
        ckpt = Checkpointer(run_dir, cfg.checkpoint_every) if run_dir is not None else None
        run = _Run()
        x, v = self._init(shape, c, soft, rng)
        opt, sched = self._optimizer([x, v] if soft else [x])
        best_x, best_v = x.detach().clone(), v.detach().clone()
        if resume:
            if ckpt is None:
                raise CheckpointError(f"{self.name}: resume needs the run folder that holds the checkpoint")
            run, x, v, opt, sched, best_x, best_v = self._restore(ckpt, shape, soft, rng)

        def save() -> None:
            if ckpt is None:
                return
            opt_t, opt_meta = _flatten(opt)
            tensors = {"x": x, "v": v, "best_x": best_x, "best_v": best_v, "rng": rng.get_state(),
                       "_iteration": torch.tensor(run.iteration)}
            tensors.update({f"opt.{k}": t for k, t in opt_t.items()})
            ckpt.save(tensors, {**run.meta(), "optimizer": opt_meta, "scheduler": scheduler_state(sched),
                                "config": asdict(cfg), "elapsed": run.elapsed + time.perf_counter() - start_time})

        total, stop, at_floor = cfg.restarts * cfg.iterations, False, False
        partial: list[float] = []
        good = x.detach().clone()
        try:
            while run.restart < cfg.restarts and not stop:
                diverged = False
                for it in range(run.iteration + 1, cfg.iterations + 1):
                    value, match = self._step(opt, sched, x, v, soft, objective)
                    if not (math.isfinite(value) and bool(torch.isfinite(x).all())):
                        logger.warning("%s: restart %d diverged at iteration %d; keeping its last finite images",
                                       self.name, run.restart, it)
                        with torch.no_grad():
                            x.copy_(good)
                        diverged = True
                        break
                    good = x.detach().clone()
                    run.iteration = it
                    step = run.restart * cfg.iterations + it
                    if it % cfg.log_every == 0 or it == cfg.iterations:
                        run.history["iteration"].append(step)
                        run.history["loss"].append(value)
                        if callback is not None:
                            stop = bool(callback(Progress(step, total, value, x.detach().clamp(0, 1))))
                    if matcher.at_floor(match):  # below the noise floor the images fit the noise
                        stop = at_floor = True
                    if ckpt is not None and ckpt.due(step):
                        save()
                    if stop:
                        break
                score = self._score(objective, x, v)
                if run.best_score is None or score < run.best_score:
                    run.best_score, best_x, best_v = score, x.detach().clone(), v.detach().clone()
                if stop and run.iteration < cfg.iterations and not diverged:
                    partial = [score]
                    break  # stopped mid-restart: a resumed run continues it
                run.scores.append(score)
                run.diverged.append(diverged)
                run.restart, run.iteration = run.restart + 1, 0
                if run.restart < cfg.restarts:
                    x, v = self._init(shape, c, soft, rng)
                    opt, sched = self._optimizer([x, v] if soft else [x])
                    good = x.detach().clone()
        except KeyboardInterrupt:
            with torch.no_grad():
                x.copy_(good)  # the last completed iteration, not a half-done step
            save()
            raise
        if total > 0:
            save()
        y_out = torch.softmax(best_v, dim=-1).argmax(-1) if soft else y_hard
        scores = run.scores + partial
        return Reconstruction(
            images=best_x.clamp(0, 1).detach().cpu(), labels=y_out.detach().cpu(), label_strategy=label_strategy,
            history=run.history,
            info={"attack": self.name, "config": asdict(cfg), "label_notes": notes, "label_info": label_info,
                  "matching": matcher.mode, "adaptive": matcher.adaptive, "matching_loss": matcher.loss_name(cfg.loss),
                  "restart_scores": scores, "best_restart": int(min(range(len(scores)), key=scores.__getitem__)),
                  "diverged": run.diverged, "stopped_early": "noise floor reached" if at_floor else stop,
                  "iterations": run.restart * cfg.iterations + run.iteration,
                  "seconds": run.elapsed + time.perf_counter() - start_time},
        )

    def _init(self, shape: tuple[int, ...], c: int, soft: bool,
              rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh images (and DLG's soft-label logits, N(0, 1) as in its code) for one restart."""
        if self.config.init == "randn":
            x = torch.randn(shape, generator=rng)
        elif self.config.init == "rand":
            x = torch.rand(shape, generator=rng)
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
            opt = torch.optim.Adam(variables, lr=cfg.lr)
        else:
            opt = torch.optim.SGD(variables, lr=cfg.lr)
        return opt, make_scheduler(opt, cfg.lr_decay, cfg.iterations)

    def _step(self, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, v: torch.Tensor, soft: bool,
              objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """One optimiser step; returns the objective and its matching part before it (L-BFGS: at its
        first evaluation)."""
        cfg = self.config
        variables = [x, v] if soft else [x]

        matches: list[float] = []

        def closure() -> torch.Tensor:
            loss, match = objective(x, v)
            matches.append(float(match.detach()))
            grads = torch.autograd.grad(loss, variables)  # not .backward(): keep the victim's .grad clean
            for var, g in zip(variables, grads):
                var.grad = g.sign() if (cfg.signed and var is x) else g
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

    def _restore(self, ckpt: Checkpointer, shape: tuple[int, ...], soft: bool, rng: torch.Generator) -> tuple[
            _Run, torch.Tensor, torch.Tensor, torch.optim.Optimizer, Any, torch.Tensor, torch.Tensor]:
        tensors, meta = ckpt.load()
        tensors = {k: t.clone() for k, t in tensors.items()}  # aligned copies: see _unflatten
        if tuple(tensors["x"].shape) != shape:
            raise CheckpointError(f"resume: the checkpoint holds images of shape {tuple(tensors['x'].shape)}, "
                                  f"this run reconstructs {shape}")
        written = meta.get("config", {}).get("optimizer")
        if written != self.config.optimizer:
            raise CheckpointError(f"resume: the checkpoint was written with optimizer {written!r}, "
                                  f"this run uses {self.config.optimizer!r}")
        x = tensors["x"].to(self.device).requires_grad_(True)
        v = tensors["v"].to(self.device).requires_grad_(soft)
        opt, sched = self._optimizer([x, v] if soft else [x])
        opt_t = {k[4:]: t for k, t in tensors.items() if k.startswith("opt.")}
        opt.load_state_dict(_unflatten(opt_t, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        rng.set_state(tensors["rng"])
        run = _Run(**{f.name: meta[f.name] for f in fields(_Run) if f.name in meta})
        return run, x, v, opt, sched, tensors["best_x"].to(self.device), tensors["best_v"].to(self.device)


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
    presets = {
        # DLG's code: torch L-BFGS(lr=1) with its defaults, 300 steps, N(0,1) images and label logits.
        "paper": dict(optimizer="lbfgs", lr=1.0, iterations=300, line_search=None, soft_labels=True, init="randn"),
        "default": {},
    }


@ATTACKS.register("idlg")
class IDLGAttack(OptimizationAttack):
    """iDLG: DLG with the labels recovered analytically from the update (not optimised).

    References:
        Zhao, Mopuri, Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv:2001.02610, 2020.
    """

    name = "idlg"
    Config = OptimizationConfig
    knowledge = Knowledge(sok="A")
    presets = {
        # iDLG's code: L-BFGS(lr=1), 300 steps, N(0,1) images, label from the last layer's gradient.
        "paper": dict(optimizer="lbfgs", lr=1.0, iterations=300, line_search=None, init="randn"),
        "default": {},
    }


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
        "paper": dict(iterations=4800, restarts=1, tv=0.1),
        # inversefed's ImageNet ResNet-18 example: 24k steps, 8 trials.
        "imagenet": dict(iterations=24_000, restarts=8, tv=0.1),
        # breaching's invertinggradients.yaml: TV scale 0.2, 24k steps, one trial.
        "breaching": dict(iterations=24_000, restarts=1, tv=0.2),
    }
