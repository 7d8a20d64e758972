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
import copy
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gradleak.attacks.threat_model import Knowledge
from gradleak.attacks.base import ATTACKS, Attack, Progress, ProgressCallback
from gradleak.attacks.checkpoint import Checkpointer, flatten_optimizer, unflatten_optimizer
from gradleak.attacks.adaptive import check_adaptive
from gradleak.attacks.matching import build_matcher
from gradleak.attacks.schedules import DECAYS, make_scheduler, scheduler_state
from gradleak.errors import CheckpointError, ConfigError
from gradleak.functional import total_variation
from gradleak.hardware import precision_warning
from gradleak.generators.cinet import CINetGenerator, choose_channels, latent
from gradleak.types import ClientUpdate, Reconstruction, ServerState

_UPDATES = ("sign-sgd", "sign-adam", "adam")
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CINetConfig:
    """Settings of the CI-Net attack.

    Args:
        iterations: T, the number of generator updates.
        lr: eta.
        update: ``"sign-sgd"`` (Alg. 1), ``"sign-adam"`` (published code) or ``"adam"`` (unsigned, for ablation).
        loss: ``"l2"`` (Alg. 1 line 8), ``"cosine"`` (published code's distance, computed without
            float32 cancellation) or ``"cosine-naive"`` (the published code's formula, for ablation).
        tv: weight of a total-variation prior on the images (0: none).
        lr_decay: ``"none"``, ``"step"`` (x0.1 at 3/8, 5/8 and 7/8 of the run) or ``"cosine"``.
        channels: over-parameterization rule ``"auto"`` (measured default), ``"paper"``,
            ``"reference"`` or an explicit count (:func:`gradleak.generators.choose_channels`).
        nz: latent size.
        latent: ``"fixed"`` (Alg. 1: z0 drawn once, never trained) or ``"learned"`` (z0 is trained
            with the generator, by the same update rule).
        upsample: ``"nearest"`` (paper) or ``"bilinear"`` (Figure 8 ablation).
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
        adaptive: ``"auto"`` (simulate the update's recorded defense, :mod:`gradleak.attacks.adaptive`),
            ``"on"`` (the same; refuse an undefended update) or ``"off"`` (the unaware attacker).
    """

    iterations: int = 1000
    lr: float = 1e-3
    update: str = "sign-adam"
    loss: str = "cosine"
    tv: float = 0.0
    lr_decay: str = "none"
    channels: str | int = "auto"
    nz: int = 100
    latent: str = "fixed"
    upsample: str = "nearest"
    norm: str = "batch"
    spectral: bool = True
    label_strategy: str = "auto"
    log_every: int = 25
    checkpoint_every: int = 100
    activation_checkpointing: bool = False
    precision: str = "fp32"
    adaptive: str = "auto"

    def __post_init__(self) -> None:
        check_adaptive("cinet", self.adaptive)
        if self.update not in _UPDATES:
            raise ConfigError(f"cinet update: expected one of {', '.join(_UPDATES)}, got {self.update!r}")
        if self.loss not in ("l2", "cosine", "cosine-naive"):
            raise ConfigError(f"cinet loss: expected 'l2', 'cosine' or 'cosine-naive', got {self.loss!r}")
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
        if self.iterations < 0 or self.lr <= 0 or self.log_every < 1 or self.checkpoint_every < 0 or self.tv < 0:
            raise ConfigError("cinet: expected iterations >= 0, lr > 0, log_every >= 1, checkpoint_every >= 0, tv >= 0")


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
    presets = {
        # Algorithm 1 as written: L2 matching, plain signed SGD, P(G) > P(F).
        "paper": dict(loss="l2", update="sign-sgd", channels="paper", lr=1e-3),
        # The authors' published code: cosine matching, sign then Adam(1e-3), channel doubling rule.
        "reference": dict(loss="cosine", update="sign-adam", channels="reference", lr=1e-3),
        # CPU demo: the defaults (reference settings, the "auto" width: 128 channels at batch 8), 150
        # iterations, so that the demo ends within 2.5 min on a machine whose batch-8 step takes 0.9 s.
        # Measured on the demo case (README, demo): seed 0 reaches SSIM 0.91 at 110 and 0.96 at 150;
        # a cosine decay over the run, or lr 2e-3/3e-3, reached less in as many iterations.
        "demo": dict(iterations=150),
    }

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        cfg = self.config
        self.check(server, update)
        start_time = time.perf_counter()
        dev = self.device
        n = update.num_samples
        c, h, w = server.input_shape
        if h != w:
            raise ConfigError(f"cinet: expected square images, got {h}x{w}")
        lab = self.resolve_labels(server, update, labels, cfg.label_strategy)
        y, label_strategy, notes = lab.labels, lab.strategy, lab.warnings
        precision_note = precision_warning(cfg.precision, dev)
        if precision_note is not None:
            warnings.warn(precision_note, RuntimeWarning, stacklevel=2)

        victim = copy.deepcopy(server.model).to(dev)
        victim.train(server.bn_mode == "train")
        matcher = build_matcher(update, victim, device=dev, adaptive=cfg.adaptive)
        target = matcher.target
        p_f = sum(t.numel() for t in target)

        choice = choose_channels(cfg.channels, victim_parameters=p_f, batch_size=n, image_size=h,
                                 out_channels=c, nz=cfg.nz, norm=cfg.norm)
        rng = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            gen = CINetGenerator(channels=choice.channels, image_size=h, out_channels=c, nz=cfg.nz,
                                 upsample=cfg.upsample, norm=cfg.norm, spectral=cfg.spectral,
                                 checkpoint=cfg.activation_checkpointing).to(dev)
        z = latent(n, cfg.nz, generator=rng, device=dev)
        gparams = list(gen.parameters())
        if cfg.latent == "learned":
            z.requires_grad_(True)
            gparams.append(z)
        amp_dtype = _PRECISIONS[cfg.precision]

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return contextlib.nullcontext() if amp_dtype is None else torch.autocast(dev.type, dtype=amp_dtype)

        if cfg.update == "sign-sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(gparams, lr=cfg.lr)
        else:
            opt = torch.optim.Adam(gparams, lr=cfg.lr)
        sched = make_scheduler(opt, cfg.lr_decay, cfg.iterations)

        ckpt = Checkpointer(run_dir, cfg.checkpoint_every) if run_dir is not None else None
        history: dict[str, list[float]] = {"iteration": [], "loss": []}
        start, elapsed_before = 0, 0.0
        if resume:
            if ckpt is None:
                raise CheckpointError("cinet: resume needs the run folder that holds the checkpoint")
            start, history, elapsed_before = self._restore(ckpt, gen, opt, sched, z, rng)
        gen.train()

        def save(it: int) -> None:
            if ckpt is None:
                return
            opt_t, opt_meta = flatten_optimizer(opt.state_dict())
            tensors = {f"gen.{k}": v for k, v in gen.state_dict().items()}
            tensors.update({f"opt.{k}": v for k, v in opt_t.items()})
            tensors.update({"z": z.detach(), "rng": rng.get_state(), "_iteration": torch.tensor(it)})
            ckpt.save(tensors, {"iteration": it, "optimizer": opt_meta, "scheduler": scheduler_state(sched),
                                "history": history, "elapsed": elapsed_before + time.perf_counter() - start_time,
                                "channels": choice.channels, "config": asdict(cfg)})

        it = done = start
        stopped_at_floor = False
        try:
            for it in range(start + 1, cfg.iterations + 1):
                with autocast():
                    x = gen(z)
                    grads = matcher.simulate(x, y)
                if amp_dtype is not None:
                    grads = [g.float() for g in grads]
                loss = matcher.distance(cfg.loss, grads)
                if cfg.tv > 0:
                    loss = loss + cfg.tv * total_variation(x.float())
                ggrads = torch.autograd.grad(loss, gparams)
                for p, g in zip(gparams, ggrads):
                    p.grad = g.sign() if cfg.update != "adam" else g
                opt.step()
                sched.step()
                done = it
                floor = matcher.at_floor(float(loss.detach())) if matcher.floor is not None else False
                if it % cfg.log_every == 0 or it == cfg.iterations or floor:
                    value = float(loss.detach())
                    history["iteration"].append(it)
                    history["loss"].append(value)
                    stop = callback is not None and callback(Progress(it, cfg.iterations, value, x.detach().float()))
                else:
                    stop = False
                stopped_at_floor = floor
                if ckpt is not None and ckpt.due(it):
                    save(it)
                if stop or floor:
                    break
        except KeyboardInterrupt:
            if ckpt is not None and done > start:
                save(done)  # Ctrl-C loses nothing: the state after the last completed step
            raise
        with torch.no_grad():
            images = gen(z).detach().float()
        if ckpt is not None and done > start:
            save(done)
        return Reconstruction(
            images=images.cpu(), labels=y.cpu(), label_strategy=label_strategy, history=history,
            info={"attack": self.name, "config": asdict(cfg), "channel_choice": choice.to_dict(),
                  "label_notes": notes, "label_info": lab.info, "matching": matcher.mode, "adaptive": matcher.adaptive,
                  "matching_loss": matcher.loss_name(cfg.loss), "iterations": done, "precision_note": precision_note,
                  "stopped_early": "noise floor reached" if stopped_at_floor else done < cfg.iterations,
                  "resumed_from": start,
                  "seconds": elapsed_before + time.perf_counter() - start_time},
        )

    def _restore(self, ckpt: Checkpointer, gen: torch.nn.Module, opt: torch.optim.Optimizer,
                 sched: Any, z: torch.Tensor, rng: torch.Generator) -> tuple[int, dict[str, list[float]], float]:
        tensors, meta = ckpt.load()
        built = int(gen.head[0].out_channels)  # type: ignore[index]
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
        return int(meta["iteration"]), meta["history"], float(meta.get("elapsed", 0.0))
