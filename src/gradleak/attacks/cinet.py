"""CI-Net gradient inversion (Zhang et al., ICCV 2023, Algorithm 1).

"Generative Gradient Inversion via Over-Parameterized Networks in Federated Learning."
An over-parameterized generator G(z0; theta) with a fixed random latent is trained so that the
victim's gradient on G's images, with the recovered labels y*, matches the uploaded gradient:

    L_grad(theta) = || grad_W L(F(G(z0; theta)), y*) - grad_W* ||^2          (Alg. 1, line 8)
    theta <- theta - eta * sign(grad_theta L_grad)                           (Alg. 1, lines 10-11)

``update="sign-adam"`` feeds the signed gradient to Adam instead, as the published code does;
``loss="cosine"`` is the published code's cosine distance.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradleak.attacks.auxiliary import Auxiliary
from gradleak.attacks.base import ATTACKS, Attack, ProgressCallback
from gradleak.attacks.checkpoint import flatten_optimizer, unflatten_optimizer
from gradleak.attacks.loop import Loop, LoopConfig, Step, check_memory, prepare
from gradleak.attacks.matching import Matcher
from gradleak.attacks.schedules import DECAYS, make_scheduler, scheduler_state, soft_sign
from gradleak.attacks.threat_model import Knowledge
from gradleak.config import check_ranges
from gradleak.errors import CheckpointError, ConfigError
from gradleak.functional import GRADIENT_DISTANCES, total_variation
from gradleak.generators.cinet import CINetGenerator, choose_channels, latent
from gradleak.hardware import precision_warning
from gradleak.types import ClientUpdate, Reconstruction, ServerState

_UPDATES = ("sign-sgd", "sign-adam", "soft-sign-adam", "adam")
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CINetConfig(LoopConfig):
    """Settings of the CI-Net attack.

    Args:
        iterations: T, the number of generator updates.
        lr: eta.
        update: ``"sign-sgd"`` (Alg. 1), ``"sign-adam"`` (published code), ``"soft-sign-adam"`` (the
            soft sign of breaching's attacks, from nearly signed to unsigned over the run,
            :func:`~gradleak.attacks.schedules.soft_sign`) or ``"adam"`` (unsigned, for ablation).
        loss: ``"l2"`` (Alg. 1 line 8), ``"cosine"`` (published code's distance, computed without
            float32 cancellation), ``"cosine-naive"`` (the published code's formula, for ablation) or
            ``"cosine-layer"`` (the mean of each parameter tensor's cosine distance, so the last
            layer's large share of the update's norm does not drown the convolutions; measured no
            faster on the demo case at batch 8 or 64, README, Performance).
        tv: weight of a total-variation prior on the images (0: none).
        lr_decay: ``"none"``, ``"step"`` (x0.1 at 3/8, 5/8 and 7/8 of the run), ``"cosine"`` or
            ``"warmup-cosine"`` (a 5% linear warm-up, then cosine).
        beta1: Adam's first-moment decay for ``update="sign-adam"``/``"adam"``: 0.9 (PyTorch's
            default, what the published code runs) or 0.5 (the value its config file states and its
            code never passes to Adam).
        channels: over-parameterization rule ``"auto"`` (measured default), ``"paper"``,
            ``"reference"`` or an explicit count (:func:`gradleak.generators.choose_channels`).
        nz: latent size.
        latent: ``"fixed"`` (Alg. 1: z0 drawn once, never trained) or ``"learned"`` (z0 is trained
            with the generator, by the same update rule).
        upsample: ``"nearest"`` (paper) or ``"bilinear"`` (Figure 8 ablation).
        grow: progressive growing (0: off): the generator's 8 px stage is trained alone for ``grow``
            iterations, then each higher stage in turn for ``grow`` more, fading in over the first half
            (ProGAN, which the paper's generator starts from); the victim sees each stage's images
            upsampled (nearest) to its input size. From ``grow * (stages - 1) + grow // 2`` on, the
            full generator (:func:`growth`).
        norm: generator normalization: ``"batch"``, ``"instance"`` or ``"none"``.
        spectral: spectral normalization of the generator's 3x3 convolutions.
        label_strategy: how labels are recovered from the update (``gradleak.labels``).
        log_every: iterations between loss readings and progress callbacks (host syncs).
        checkpoint_every: iterations between checkpoints when a run folder is given (0: none).
        activation_checkpointing: recompute the generator's blocks in the backward pass instead of
            keeping their activations (less memory, one more generator forward per step).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the generator and the victim's forward
            and gradient; parameters, the matching loss and the update stay in float32). bf16 is
            faster only where the device computes it natively; elsewhere the run warns and records
            ``info["precision_note"]`` (:func:`gradleak.hardware.native_bf16`).
        fp32_from: with ``precision="bf16"``, the iteration from which the steps run in float32 (0:
            never): bf16's fast steps while the images are far off, float32's precision for the
            match's last digits, where bf16 alone can stall (README, Performance).
        adaptive: ``"auto"`` (simulate the update's recorded defense, :mod:`gradleak.attacks.adaptive`),
            ``"on"`` (the same; refuse an undefended update) or ``"off"`` (the unaware attacker).
    """

    iterations: int = 1000
    lr: float = 1e-3
    update: str = "sign-adam"
    loss: str = "cosine"
    tv: float = 0.0
    lr_decay: str = "none"
    beta1: float = 0.9
    channels: str | int = "auto"
    nz: int = 100
    latent: str = "fixed"
    upsample: str = "nearest"
    grow: int = 0
    norm: str = "batch"
    spectral: bool = True
    activation_checkpointing: bool = False
    precision: str = "fp32"
    fp32_from: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update not in _UPDATES:
            raise ConfigError(f"cinet update: expected one of {', '.join(_UPDATES)}, got {self.update!r}")
        if self.loss not in GRADIENT_DISTANCES:
            raise ConfigError(f"cinet loss: expected one of {', '.join(GRADIENT_DISTANCES)}, got {self.loss!r}")
        if self.upsample not in ("nearest", "bilinear"):
            raise ConfigError(f"cinet upsample: expected 'nearest' or 'bilinear', got {self.upsample!r}")
        if self.norm not in ("batch", "instance", "none"):
            raise ConfigError(f"cinet norm: expected 'batch', 'instance' or 'none', got {self.norm!r}")
        if self.latent not in ("fixed", "learned"):
            raise ConfigError(f"cinet latent: expected 'fixed' or 'learned', got {self.latent!r}")
        if self.precision not in _PRECISIONS:
            raise ConfigError(f"cinet precision: expected one of {', '.join(_PRECISIONS)}, got {self.precision!r}")
        if self.lr_decay not in DECAYS:
            raise ConfigError(f"cinet lr_decay: expected one of {', '.join(DECAYS)}, got {self.lr_decay!r}")
        check_ranges("cinet", self, iterations=(0, None), lr=(0, None, "open"), tv=(0, None), nz=(1, 4096),
                     beta1=(0, 0.999), grow=(0, None), fp32_from=(0, None))
        if self.fp32_from and self.precision == "fp32":
            raise ConfigError(f"cinet fp32_from: expected precision='bf16' (a run already in fp32 has nothing to "
                              f"switch), got fp32_from={self.fp32_from} with precision='fp32'")
        if isinstance(self.channels, int) and not 1 <= self.channels <= 4096:
            raise ConfigError(f"cinet channels: expected 1 to 4096 or a rule (auto, paper, reference), got {self.channels}")


@ATTACKS.register("cinet")
class CINetAttack(Attack):
    """CI-Net: train an over-parameterized generator with signed gradients to match the update.

    Example:
        >>> import gradleak
        >>> attack = gradleak.attacks.create("cinet", {"iterations": 2, "channels": 8})
        >>> attack.config.update
        'sign-adam'

    References:
        Zhang, Guo, Wang, Liu. Generative Gradient Inversion via Over-Parameterized Networks in
        Federated Learning. ICCV 2023. Appendix B, Algorithm 1.
    """

    name = "cinet"
    Config = CINetConfig
    knowledge = Knowledge(sok="B")
    adaptive = True
    matches_bn_stats = True
    centred_variant = True
    presets = {
        # Algorithm 1 as written: L2 matching, plain signed SGD, P(G) > P(F).
        "paper": {"loss": "l2", "update": "sign-sgd", "channels": "paper"},
        # The authors' published code: the defaults (cosine matching, sign then Adam(1e-3)) with its
        # channel doubling rule.
        "reference": {"channels": "reference"},
        # CPU demo: the defaults (reference settings, the "auto" width: 128 channels at batch 8), 150
        # iterations, so that the demo ends within 2.5 min on a machine whose batch-8 step takes 0.9 s.
        # Measured on the demo case (README, demo): seed 0 reaches SSIM 0.91 at 110 and 0.96 at 150;
        # a cosine decay over the run, or lr 2e-3/3e-3, reached less in as many iterations.
        "demo": {"iterations": 150},
    }

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        cfg, dev = self.config, self.device
        c, h, w = server.input_shape
        if h != w:
            raise ConfigError(f"cinet: expected square images, got {h}x{w}")
        setup = prepare(self, server, update, labels, strategy=cfg.label_strategy, adaptive=cfg.adaptive)
        matcher, y = setup.matcher, setup.labels.labels
        loop = Loop(self, total=cfg.iterations, matcher=matcher, callback=callback, run_dir=run_dir)
        precision_note = precision_warning(cfg.precision, dev)
        if precision_note is not None:
            warnings.warn(precision_note, RuntimeWarning, stacklevel=2)

        choice = choose_channels(cfg.channels, victim_parameters=sum(t.numel() for t in matcher.target),
                                 batch_size=update.num_samples, image_size=h, out_channels=c, nz=cfg.nz, norm=cfg.norm)
        rng = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)  # the CPU's alone: CUDA generators stay as they were
            gen = CINetGenerator(channels=choice.channels, image_size=h, out_channels=c, nz=cfg.nz,
                                 upsample=cfg.upsample, norm=cfg.norm, spectral=cfg.spectral,
                                 checkpoint=cfg.activation_checkpointing, progressive=cfg.grow > 0).to(dev)
        z = latent(update.num_samples, cfg.nz, generator=rng, device=dev)
        gparams: list[torch.Tensor] = list(gen.parameters())
        if cfg.latent == "learned":
            z.requires_grad_(True)
            gparams.append(z)
        opt: torch.optim.Optimizer = (torch.optim.SGD(gparams, lr=cfg.lr) if cfg.update == "sign-sgd"
                                      else torch.optim.Adam(gparams, lr=cfg.lr, betas=(cfg.beta1, 0.999)))
        sched = make_scheduler(opt, cfg.lr_decay, cfg.iterations)

        def state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            opt_t, opt_meta = flatten_optimizer(opt.state_dict())
            tensors = {f"gen.{k}": v for k, v in gen.state_dict().items()}
            tensors.update({f"opt.{k}": v for k, v in opt_t.items()})
            tensors.update({"z": z.detach(), "rng": rng.get_state()})
            return tensors, {"optimizer": opt_meta, "scheduler": scheduler_state(sched), "channels": choice.channels}

        amp = None if cfg.fp32_from else _PRECISIONS[cfg.precision]  # the estimate holds for the fp32 steps too
        with contextlib.nullcontext() if amp is None else torch.autocast(dev.type, dtype=amp):
            memory_estimate = check_memory(self, lambda n: gen(z[:n]), matcher, y, update.num_samples, loss=cfg.loss,
                                           modules=(gen, setup.victim), trainable=gparams)
        loop.state = state
        if resume:
            restored = loop.restore()
            with loop.restoring():
                self._restore(*restored, gen, opt, sched, z, rng)
        gen.train()
        step = _Stepper(cfg, gen, z, gparams, opt, sched, matcher, y, setup.auxiliary)
        loop.steps(step, start=loop.done + 1, stop=cfg.iterations)
        if loop.done > loop.resumed_from:
            loop.save()  # before the last forward, which moves the buffers: a longer resume continues exactly
        with torch.no_grad():
            images = gen(z, *growth(loop.done, cfg.grow, len(gen.blocks)))
        return loop.outcome(images, y, setup.labels.strategy, {
            "channel_choice": choice.to_dict(), "label_notes": setup.labels.warnings,
            "label_info": setup.labels.info, "precision_note": precision_note,
            "memory_estimate_bytes": memory_estimate}, setup.auxiliary)

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], gen: torch.nn.Module,
                 opt: torch.optim.Optimizer, sched: Any, z: torch.Tensor, rng: torch.Generator) -> None:
        built = int(gen.head[0].out_channels)  # type: ignore[index,union-attr]
        if int(meta.get("channels", -1)) != built:
            raise CheckpointError(f"resume: the checkpoint's generator has {meta.get('channels')} channels, "
                                  f"this run builds {built}")
        gen.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gen.")})
        opt_t = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
        opt.load_state_dict(unflatten_optimizer(opt_t, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        with torch.no_grad():
            z.copy_(tensors["z"].to(z.device))
        rng.set_state(tensors["rng"])


def growth(iteration: int, grow: int, blocks: int) -> tuple[int | None, float]:
    """The generator stage and fade-in weight of progressive growing at ``iteration`` (from 1).

    Stage ``k`` is the output of the generator's block ``k`` (8 px for ``k = 0``); ``None`` is the
    full generator. Each stage below the last runs ``grow`` iterations; a stage above the first
    fades in (its weight rising linearly from ``1 / (grow // 2)`` to 1) over its first ``grow // 2``.
    ``grow = 0`` or ``iteration = 0`` (before any step): the full generator.

    Example:
        >>> [growth(t, 4, 3) for t in (1, 4, 5, 6, 7, 9, 10, 11)]
        [(0, 1.0), (0, 1.0), (1, 0.5), (1, 1.0), (1, 1.0), (2, 0.5), (None, 1.0), (None, 1.0)]
    """
    if grow <= 0 or iteration <= 0:
        return None, 1.0
    stage = min((iteration - 1) // grow, blocks - 1)
    fade = max(1, grow // 2)
    offset = (iteration - 1) - stage * grow
    alpha = 1.0 if stage == 0 else min(1.0, (offset + 1) / fade)
    if stage == blocks - 1 and alpha >= 1.0:
        return None, 1.0
    return stage, alpha


class _Stepper:
    """One CI-Net step (Alg. 1 lines 6-11): generate, simulate the update, match, signed update.

    The step changes the generator's buffers (spectral-norm power iterates, BatchNorm running
    statistics), its parameters and the optimizer one after another; the loop holds a Ctrl-C until
    the step has ended (:func:`~gradleak.attacks.loop.deferred_stop`), so a checkpoint is always the
    state after a whole step.
    """

    def __init__(self, cfg: CINetConfig, gen: torch.nn.Module, z: torch.Tensor, params: list[torch.Tensor],
                 opt: torch.optim.Optimizer, sched: Any, matcher: Matcher, y: torch.Tensor, aux: Auxiliary) -> None:
        self.cfg, self.gen, self.z, self.params, self.opt, self.sched = cfg, gen, z, params, opt, sched
        self.matcher, self.y, self.aux = matcher, y, aux
        self.amp = _PRECISIONS[cfg.precision]
        self.blocks = len(gen.blocks)  # type: ignore[arg-type]

    def stage(self, it: int) -> tuple[int | None, float]:
        return growth(it, self.cfg.grow, self.blocks)

    def __call__(self, it: int) -> Step:
        cfg = self.cfg
        amp = None if cfg.fp32_from and it >= cfg.fp32_from else self.amp
        autocast = contextlib.nullcontext() if amp is None else torch.autocast(self.z.device.type, dtype=amp)
        match: float | None = None
        if it <= cfg.feature_init:  # the features alone: an initialisation target, no simulation
            with autocast:
                x = self.gen(self.z, *self.stage(it))
                init = self.aux.loss(x, features_only=True)
            assert init is not None
            loss, match = init.float(), float("inf")  # not a matching loss: never at the noise floor
        else:
            with autocast, self.aux.watching():
                x = self.gen(self.z, *self.stage(it))
                grads = self.matcher.simulate(x, self.y)
            if amp is not None:
                grads = [g.float() for g in grads]
            loss = self.matcher.distance(cfg.loss, grads)
            extra = self.aux.loss(x)
            if extra is not None:
                match = float(loss.detach()) if self.matcher.floor is not None else None
                loss = loss + extra.float()
        if cfg.tv > 0:
            loss = loss + cfg.tv * total_variation(x.float())
        for p, g in zip(self.params, torch.autograd.grad(loss, self.params, allow_unused=cfg.grow > 0)):
            if g is None:  # a stage not grown yet, or a To-RGB layer no longer read
                g = torch.zeros_like(p)
            elif cfg.update == "soft-sign-adam":
                g = soft_sign(g, it, cfg.iterations)
            elif cfg.update != "adam":
                g = g.sign()
            p.grad = g
        self.opt.step()
        self.sched.step()
        return Step(loss=loss.detach(), match=match, images=x.detach().float())
