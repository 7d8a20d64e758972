"""GIAS: gradient inversion in the range of a pretrained generator, then around it.

Jeon, Kim, Kim, Ok. "Gradient Inversion with Generative Image Prior", NeurIPS 2021. With a
generator G(z; w) pretrained on data like the client's:

1. Latent search (Eq. 3): ``z* = argmin_z D(grad_W L(F(G(z; w)), y), grad_W*) + alpha TV``, Adam
   on (signed) gradients with restarts, the restart with the lowest matching loss kept.
2. Parameter search (Eq. 4): each image i gets its own copy w_i of the generator's weights,
   initialised at w, and ``{w_i}`` are optimised on the same loss with ``z*`` fixed (as the
   published code does, one copy per image).

The generator is the attacker's prior knowledge and the user supplies it: a TorchScript file
(``generator_path``), a constructor plus a state-dict file (``generator_factory`` +
``generator_state``), or an ``nn.Module`` passed as ``GIASAttack(generator=...)``. gradleak ships no
pretrained GAN (nothing is downloaded), so paper-level GIAS needs the user's own pretrained GAN
(the paper uses a DCGAN trained on CIFAR-10 and StyleGAN2 on FFHQ/ImageNet).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gradleak.attacks.base import ATTACKS, Attack, ProgressCallback
from gradleak.attacks.checkpoint import flatten_optimizer, unflatten_optimizer
from gradleak.attacks.loop import Loop, LoopConfig, Step, prepare
from gradleak.attacks.schedules import make_scheduler, scheduler_state, soft_sign
from gradleak.attacks.threat_model import Knowledge
from gradleak.config import check_ranges
from gradleak.errors import ConfigError
from gradleak.functional import total_variation
from gradleak.registry import Registry
from gradleak.types import ClientUpdate, Reconstruction, ServerState

logger = logging.getLogger(__name__)

_LATENT_ATTRIBUTES = ("latent_shape", "nz", "latent_dim", "z_dim")

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""images -> (the loss with its prior, the gradient-matching part)"""


@dataclass(frozen=True)
class GIASConfig(LoopConfig):
    """Settings of GIAS.

    Args:
        generator_path: a TorchScript file holding the pretrained generator.
        generator_factory: the name of a generator constructor registered with
            :func:`register_generator` (or an installed entry point in group ``gradleak.generators``),
            built without arguments and loaded with the weights in ``generator_state``. Never an
            import path.
        generator_state: state-dict file for ``generator_factory`` (``.safetensors``, or a torch
            file read with ``weights_only=True``).
        latent_shape: shape of one image's latent, e.g. ``[100, 1, 1]`` for DCGAN; default: the
            generator's ``latent_shape``/``nz``/``latent_dim``/``z_dim`` attribute.
        output_range: the generator's output range: ``"tanh"`` ([-1, 1], mapped to [0, 1]) or ``"unit"``.
        latent_iterations: steps of the latent search per restart.
        generator_iterations: steps of the parameter search (0: latent search only).
        lr: Adam step size of the latent search.
        generator_lr: Adam step size of the parameter search.
        loss: gradient distance, ``"cosine"`` (GIAS) or ``"l2"``.
        tv: weight of the total-variation prior.
        signed: feed signed gradients to Adam (both stages, as the published code's closure does),
            or ``"soft"``: their soft sign, from nearly signed to unsigned over each stage
            (:func:`~gradleak.attacks.schedules.soft_sign`, as ``ig``'s ``signed="soft"``).
        lr_decay: ``"step"`` (x0.1 at 3/8, 5/8, 7/8 of each stage) or ``"none"``.
        restarts: latent-search trials; the lowest matching loss is kept.
        label_strategy: how labels are recovered from the update (``gradleak.labels``).
        log_every: iterations between loss readings and progress callbacks.
        checkpoint_every: iterations between checkpoints when a run folder is given (0: none).
        adaptive: ``"auto"`` (simulate the update's recorded defense), ``"on"`` (the same; refuse an
            undefended update) or ``"off"`` (the unaware attacker).
    """

    generator_path: str | None = None
    generator_factory: str | None = None
    generator_state: str | None = None
    latent_shape: tuple[int, ...] | None = None
    output_range: str = "tanh"
    latent_iterations: int = 3000
    generator_iterations: int = 3000
    lr: float = 0.1
    generator_lr: float = 1e-4
    loss: str = "cosine"
    tv: float = 1e-6
    signed: bool | Literal["soft"] = True
    lr_decay: str = "step"
    restarts: int = 1
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_shape is not None:
            object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))
        if self.output_range not in ("tanh", "unit"):
            raise ConfigError(f"gias output_range: expected 'tanh' or 'unit', got {self.output_range!r}")
        if self.loss not in ("l2", "cosine"):
            raise ConfigError(f"gias loss: expected 'l2' or 'cosine', got {self.loss!r}")
        if self.lr_decay not in ("none", "step"):
            raise ConfigError(f"gias lr_decay: expected 'none' or 'step', got {self.lr_decay!r}")
        if self.generator_path and self.generator_factory:
            raise ConfigError("gias: expected either generator_path or generator_factory, got both")
        check_ranges("gias", self, latent_iterations=(0, None), generator_iterations=(0, None),
                     lr=(0, None, "open"), generator_lr=(0, None, "open"), tv=(0, None), restarts=(1, 10_000))


GENERATORS: Registry[Callable[[], nn.Module]] = Registry("gias generator")
"""Constructors of pretrained generators that ``generator_factory`` may name (registered in code)."""

ENTRY_POINTS = "gradleak.generators"
"""The entry-point group an installed package may use to offer a generator constructor."""


def register_generator(name: str, *, force: bool = False) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: let ``generator_factory=name`` build a generator with this constructor (no arguments).

    Example:
        >>> @register_generator("my-dcgan", force=True)
        ... def my_dcgan():
        ...     return torch.nn.Sequential(torch.nn.Linear(100, 3 * 32 * 32), torch.nn.Tanh(),
        ...                                torch.nn.Unflatten(1, (3, 32, 32)))
        >>> "my-dcgan" in GENERATORS
        True
    """
    return GENERATORS.register(name, force=force)


def generator_factory(name: str) -> Callable[[], nn.Module]:
    """The constructor registered as ``name`` in code, or offered by an installed package's entry point.

    Never an import path: a config (from ``--set``, a sweep file or a run folder) cannot make the
    reader import a module and call a function.

    Raises:
        ConfigError: ``name`` is neither registered nor an installed entry point.
    """
    if name in GENERATORS:
        return GENERATORS.get(name)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        if ep.name == name:
            loaded: Callable[[], nn.Module] = ep.load()
            return loaded
    offered = GENERATORS.available() + sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS))
    hint = ("; an import path such as 'module:callable' is not accepted: register the constructor with "
            "gradleak.attacks.gias.register_generator, or install it as an entry point in group "
            f"'{ENTRY_POINTS}'") if ":" in name else ""
    raise ConfigError(f"gias generator_factory: expected a registered generator ({', '.join(offered) or 'none registered'})"
                      f", got {name!r}{hint}")


def load_generator(cfg: GIASConfig, *, device: torch.device) -> nn.Module:
    """The pretrained generator named by ``cfg`` (TorchScript file, or constructor + state dict).

    Raises:
        ConfigError: no generator is named, or it cannot be loaded.
    """
    if cfg.generator_path:
        path = Path(cfg.generator_path)
        if not path.is_file():
            raise ConfigError(f"gias generator_path: expected a TorchScript file, got '{path}' (not found)")
        try:
            return torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"gias generator_path '{path}': expected a TorchScript file ({e})") from None
    if cfg.generator_factory:
        factory = generator_factory(cfg.generator_factory)
        gen = factory()
        if cfg.generator_state:
            gen.load_state_dict(_read_state(Path(cfg.generator_state)))
        return gen.to(device)
    raise ConfigError("gias: expected a pretrained generator (generator_path, generator_factory + generator_state, "
                      "or GIASAttack(generator=module)); gradleak ships none and never downloads one")


def _copy(module: nn.Module) -> nn.Module:
    # Under autograd, deep copies of ScriptModules get non-leaf parameters that cannot be trained.
    with torch.no_grad():
        return copy.deepcopy(module)


def _trainable(module: nn.Module, flag: bool) -> None:
    # ScriptModules do not implement requires_grad_(); their parameters do.
    for p in module.parameters():
        p.requires_grad_(flag)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"gias generator_state: expected a state-dict file, got '{path}' (not found)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


@ATTACKS.register("gias")
class GIASAttack(Attack):
    """GIAS: latent search, then per-image generator fine-tuning, to match the update.

    Args:
        config: a :class:`GIASConfig` or a dict of its fields.
        device: where to run.
        seed: seed of the latent draws.
        generator: the pretrained generator as a module (instead of a file in the config); it
            maps latents of shape (N, *latent_shape) to images (N, C, H, W). It is not modified.

    References:
        Jeon, Kim, Kim, Ok. Gradient Inversion with Generative Image Prior. NeurIPS 2021.
        Eqs. 3-4 and the published scripts (DCGAN on CIFAR-10: latent lr 0.1, generator lr 1e-4,
        3000 + 3000 steps, TV 1e-6, cosine distance).
    """

    name = "gias"
    Config = GIASConfig
    knowledge = Knowledge(surrogate_data=True, sok="D")
    adaptive = True
    needs_generator = True
    matches_bn_stats = True
    centred_variant = True
    presets = {
        # The published CIFAR-10 DCGAN script.
        "cifar10-dcgan": {},  # the defaults
        # The published ImageNet 32 px StyleGAN2 script: unsigned, 3 restarts.
        "imagenet32-stylegan2": {"lr": 3e-2, "generator_lr": 1e-3, "latent_iterations": 500,
                                 "generator_iterations": 5000, "signed": False, "restarts": 3},
    }

    @classmethod
    def applicability(cls, server: ServerState, config: Any, *, local_steps: int = 1) -> str | None:
        if getattr(config, "generator_path", None) or getattr(config, "generator_factory", None):
            return None
        return "needs a pretrained generator (--set generator_path=FILE or generator_factory=NAME)"

    def __init__(self, config: Any = None, *, device: str | torch.device = "cpu", seed: int = 0,
                 generator: nn.Module | None = None) -> None:
        super().__init__(config, device=device, seed=seed)
        self.generator = generator

    @classmethod
    def budget(cls, iterations: int, config: Any) -> dict[str, int]:
        """``restarts x latent_iterations + generator_iterations = iterations``: half to each stage
        (all to the latent search when the config has no generator stage)."""
        if iterations < 1:
            raise ConfigError(f"gias budget: expected at least 1 iteration, got {iterations}")
        share = iterations // 2 if config.generator_iterations > 0 else iterations
        latent = max(1, share // config.restarts)
        return {"latent_iterations": latent,
                "generator_iterations": max(0, iterations - config.restarts * latent) if config.generator_iterations else 0}

    def _latent_shape(self, gen: nn.Module) -> tuple[int, ...]:
        if self.config.latent_shape is not None:
            return self.config.latent_shape
        for attr in _LATENT_ATTRIBUTES:
            value = getattr(gen, attr, None)
            if isinstance(value, int):
                return (value,)
            if isinstance(value, (tuple, list)):
                return tuple(int(v) for v in value)
        raise ConfigError(f"gias: expected latent_shape in the config or a generator attribute "
                          f"({', '.join(_LATENT_ATTRIBUTES)}), found neither")

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        cfg = self.config
        if cfg.feature_init:
            raise ConfigError("gias feature_init: expected 0 (the latent search starts from the generator's prior, "
                              "not from features), got " + str(cfg.feature_init) + "; use features for the term")
        setup = prepare(self, server, update, labels, strategy=cfg.label_strategy, adaptive=cfg.adaptive)
        base = _copy(self.generator if self.generator is not None else load_generator(cfg, device=self.device))
        base = base.to(self.device).eval()
        _trainable(base, False)
        matcher, y, n = setup.matcher, setup.labels.labels, update.num_samples
        loop = Loop(self, total=cfg.restarts * cfg.latent_iterations + cfg.generator_iterations, matcher=matcher,
                    callback=callback, run_dir=run_dir)
        zshape = (n,) + self._latent_shape(base)
        expected = (n,) + tuple(server.input_shape)

        def images(gens: list[nn.Module], z: torch.Tensor) -> torch.Tensor:
            x = gens[0](z) if len(gens) == 1 else torch.cat([g(z[i:i + 1]) for i, g in enumerate(gens)])
            if tuple(x.shape) != expected:
                raise ConfigError(f"gias: expected the generator to output {expected}, got {tuple(x.shape)}")
            return (x + 1) / 2 if cfg.output_range == "tanh" else x

        aux = setup.auxiliary

        def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with aux.watching():
                match = matcher.distance(cfg.loss, matcher.simulate(x, y))
            extra = aux.loss(x)
            total = match if extra is None else match + extra
            return (total + cfg.tv * total_variation(x) if cfg.tv > 0 else total), match

        rng = torch.Generator().manual_seed(self.seed)
        run = _Run(z=torch.randn(zshape, generator=rng).to(self.device))
        run.best_z = run.z.clone()
        loop.state = lambda: run.state(rng)
        if resume:
            restored = loop.restore()
            with loop.restoring():
                run.restore(*restored, self.device, rng)

        self._latent_search(loop, run, rng, objective, functools.partial(images, [base]), zshape)
        gens = self._parameter_search(loop, run, objective, images, base, n) if run.stage == "generator" else [base]
        with torch.no_grad():
            out = images(gens, run.best_z if len(gens) == 1 else run.z).clamp(0, 1)
        if loop.done > loop.resumed_from:
            loop.save()
        return loop.outcome(out, y, setup.labels.strategy, {
            "label_notes": setup.labels.warnings, "label_info": setup.labels.info, "restart_scores": run.scores,
            "latent_shape": list(zshape[1:]), "generator_parameters": sum(p.numel() for p in base.parameters())},
            aux)

    def _latent_search(self, loop: Loop, run: _Run, rng: torch.Generator, objective: Objective,
                       images: Callable[[torch.Tensor], torch.Tensor], zshape: tuple[int, ...]) -> None:
        """Stage 1 (Eq. 3): the latent search with restarts, the generator frozen; keeps the best latent."""
        cfg = self.config
        while run.stage == "latent" and run.restart < cfg.restarts and not loop.stopped:
            z = run.z.requires_grad_(True)
            self._stage(loop, run, objective, [z], cfg.lr, cfg.latent_iterations, run.restart * cfg.latent_iterations,
                        functools.partial(images, z), {})
            z.requires_grad_(False)
            with torch.enable_grad():
                score = float(objective(images(z))[1].detach())
            score = score if math.isfinite(score) else math.inf
            if run.best_score is None or score < run.best_score:
                run.best_score, run.best_z = score, z.detach().clone()
            if loop.stopped and run.iteration < cfg.latent_iterations:
                return  # stopped mid-restart: a resumed run continues it
            run.scores.append(score)
            run.restart, run.iteration = run.restart + 1, 0
            run.z = torch.randn(zshape, generator=rng).to(self.device)
        if run.stage == "latent" and not loop.stopped:
            run.stage, run.iteration = "generator", 0

    def _parameter_search(self, loop: Loop, run: _Run, objective: Objective,
                          images: Callable[[list[nn.Module], torch.Tensor], torch.Tensor], base: nn.Module,
                          n: int) -> list[nn.Module]:
        """Stage 2 (Eq. 4): one copy of the generator's weights per image, z* fixed; returns the copies."""
        cfg = self.config
        gens = [_copy(base) for _ in range(n)]
        for i, g in enumerate(gens):
            _trainable(g, True)
            if run.saved:
                prefix = f"gen.{i}."
                g.load_state_dict({k[len(prefix):]: t for k, t in run.saved.items() if k.startswith(prefix)})
        run.z = run.best_z.clone()
        weights: list[torch.Tensor] = [p for g in gens for p in g.parameters()]
        extra = {f"gen.{i}.{k}": t for i, g in enumerate(gens) for k, t in g.state_dict().items()}
        if cfg.generator_iterations > 0 and not loop.stopped:
            self._stage(loop, run, objective, weights, cfg.generator_lr, cfg.generator_iterations,
                        cfg.restarts * cfg.latent_iterations, functools.partial(images, gens, run.z), extra)
        return gens

    def _stage(self, loop: Loop, run: _Run, objective: Objective,
               variables: list[torch.Tensor], lr: float, iterations: int, offset: int,
               forward: Callable[[], torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
        """Adam on ``variables`` (signed if configured) with step decay, through the shared loop."""
        cfg = self.config
        opt = torch.optim.Adam(variables, lr=lr)
        sched = make_scheduler(opt, cfg.lr_decay, iterations)
        if run.saved and run.iteration > 0:
            opt_t = {k[4:]: t for k, t in run.saved.items() if k.startswith("opt.")}
            opt.load_state_dict(unflatten_optimizer(opt_t, run.saved_meta["optimizer"]))
            sched.load_state_dict(run.saved_meta["scheduler"])
        run.saved = {} if run.stage == "latent" else run.saved  # stage 2 reads the generators later
        run.opt, run.sched, run.extra = opt, sched, extra

        def step(it: int) -> Step:
            loss, match = objective(forward())
            for var, g in zip(variables, torch.autograd.grad(loss, variables)):
                if cfg.signed == "soft":
                    g = soft_sign(g, it, iterations)
                elif cfg.signed:
                    g = g.sign()
                var.grad = g
            opt.step()
            sched.step()
            run.iteration = it
            return Step(loss=loss.detach(), match=match.detach())

        def preview() -> torch.Tensor:
            with torch.no_grad():
                return forward().clamp(0, 1)

        loop.steps(step, start=run.iteration + 1, stop=iterations, offset=offset, preview=preview)
        if loop.stopped:
            loop.save()


@dataclass
class _Run:
    """A GIAS run's mutable state: the stage, restart and latents; what its checkpoint holds."""

    z: torch.Tensor
    best_z: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    stage: str = "latent"
    restart: int = 0
    iteration: int = 0  # last completed step of the current stage (or restart)
    scores: list[float] = field(default_factory=list)
    best_score: float | None = None
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # stage 2: the per-image generators
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_meta: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("stage", "restart", "scores", "best_score")

    def state(self, rng: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.opt is not None, "a GIAS checkpoint is written after a step"
        opt_t, opt_meta = flatten_optimizer(self.opt.state_dict())
        tensors = {"z": self.z, "best_z": self.best_z, "rng": rng.get_state(), **self.extra}
        tensors.update({f"opt.{k}": t for k, t in opt_t.items()})
        meta = {k: getattr(self, k) for k in self._KEYS}
        return tensors, {**meta, "stage_iteration": self.iteration, "optimizer": opt_meta,
                         "scheduler": scheduler_state(self.sched)}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device,
                rng: torch.Generator) -> None:
        self.saved, self.saved_meta = tensors, meta
        for key in self._KEYS:
            setattr(self, key, meta[key])
        self.iteration = int(meta["stage_iteration"])
        self.z, self.best_z = tensors["z"].to(device), tensors["best_z"].to(device)
        rng.set_state(tensors["rng"])
