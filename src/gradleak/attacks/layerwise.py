"""Layer-wise inversion: a deep block's input read off its weight gradient, then block by block down.

The attacks that match the whole network's gradient fail on a ResNet whose client runs BatchNorm in
train mode (docs/attacks.md: the untrained ResNet-18-ReLU at batch 1, mean layer cosine 0.33 at 5%
pixel noise): through 17 normalised layers the gradient decorrelates from the update within a few
percent of the image. One block's gradient, with what is above it held fixed, does not: the same
victim's per-block matching loss grows smoothly and linearly with noise in the block's input. This
attack therefore never differentiates through more than a few blocks at once.

1. **The anchor, in closed form.** A convolution's weight gradient at batch 1 is
   ``grad_W = sum_p delta(p) patch(p)^T`` over its P output positions: a (C_out, C_in k k) matrix of
   rank at most P, whose row space holds every input patch. Where P < C_out (ResNet-18's third and
   fourth stages at 32 px: 64 and 16 positions, 256 and 512 channels) the rank is visible, and the
   input ``h`` is the solution of the linear system "every patch of ``h`` lies in that row space";
   a train-mode BatchNorm after the convolution centres ``delta`` over the positions, so it is the
   patches less their mean that lie there (rank P - 1). :func:`conv_input_from_gradient` finds it as
   the null vector of that system (LOBPCG), exact to float precision up to its scale (tests). Of the
   blocks whose first convolution qualifies (stride 1: a stride-2 convolution's patches overlap too
   little to fix the input), the lowest is the anchor.
2. **Its scale**, from the last layer: the features the update gives exactly at batch 1
   (:func:`gradleak.attacks.features.recover_features`) are matched by the anchor's forward pass at
   one scale, found by a search over its logarithm.
3. **Down, a few blocks at a time.** With a block range's output known (the anchor, then each step's
   result), the gradient at that output follows by one backward pass from the top; the range's
   input is found by matching its parameters' gradient (each tensor's cosine) and its output
   (cosine): ``hop`` blocks an intermediate step, ``image_depth`` blocks for the last one, whose input
   is the image.

Measured (docs/attacks.md): the untrained CIFAR ResNet-18-ReLU, BatchNorm in train mode, batch 1,
where CI-Net and IG read 0.03-0.13 whatever their levers. Batch 1 only: at batch N the patches of N
images share the row space, and separating them is not built. The update must be one client's
FedSGD gradient or one-step delta, undefended enough to keep the rank gap (a defense's noise fills
it: then the anchor is a least-squares fit, marked ``exact: false``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, lobpcg
from torch import nn

from gradleak.attacks.base import ATTACKS, Attack, Progress, ProgressCallback, target_gradients
from gradleak.attacks.features import recover_features
from gradleak.attacks.threat_model import Knowledge
from gradleak.config import check_ranges
from gradleak.errors import ConfigError, UnsupportedModelError, UpdateError
from gradleak.functional.gradients import total_variation
from gradleak.types import ClientUpdate, Reconstruction, ServerState

SCALE_GRID = (-8.0, 8.0, 321)
"""The anchor's scale search: ``log(scale)`` on this grid (start, stop, points), then refined."""


@dataclass(frozen=True)
class LayerwiseConfig:
    """Settings of the layer-wise attack.

    Args:
        label_strategy: how labels are recovered from the update (``gradleak.labels``).
        iterations: optimisation steps in all (the closed-form anchor costs none): 60% to the
            intermediate steps, 40% to the image step.
        lr: Adam's step size for every step (cosine decay to 0 within each step).
        hop: blocks an intermediate step inverts at once.
        image_depth: blocks (the stem counted) the image step inverts; intermediate steps stop there.
        rank_tol: singular values of a weight gradient below this times its largest count as zero.
        tv: weight of a total-variation prior on the image step (0: none); 0.2 lifted four photos of the
            train-mode ResNet-18-ReLU from 0.36-0.70 to 0.80-0.89 SSIM (docs/attacks.md).
        log_every: report progress every this many steps.
    """

    label_strategy: str = "auto"
    iterations: int = 5000
    lr: float = 0.05
    hop: int = 2
    image_depth: int = 4
    rank_tol: float = 1e-4
    tv: float = 0.2
    log_every: int = 25

    def __post_init__(self) -> None:
        check_ranges("LayerwiseConfig", self, iterations=(1, None), lr=(0, None, "open"), hop=(1, None),
                     image_depth=(1, None), rank_tol=(0, 1, "open"), tv=(0, None), log_every=(1, None))


@dataclass
class AnchorRecovery:
    """A convolution's input, recovered from its weight gradient (:func:`conv_input_from_gradient`).

    Args:
        input: (C, H, W), unit root-mean-square, sign and scale undetermined.
        rank: the gradient's numerical rank.
        positions: the convolution's output positions.
        eigenvalues: the two smallest of the system's normal operator, relative to its largest: the
            first is 0 (to rounding) when the input is determined, the second measures how well.
        exact: the gradient's rank is below its positions' count plus one and the system's null
            space is one-dimensional (second eigenvalue over 1e6 times the first).
    """

    input: torch.Tensor
    rank: int
    positions: int
    eigenvalues: tuple[float, float]
    exact: bool

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "positions": self.positions, "eigenvalues": list(self.eigenvalues),
                "exact": self.exact}


def conv_input_from_gradient(conv: nn.Conv2d, grad: torch.Tensor, input_shape: tuple[int, int, int], *,
                             rank_tol: float = 1e-4, seed: int = 0) -> AnchorRecovery:
    """The input of ``conv`` at batch 1, from its weight gradient alone, up to scale and sign.

    Args:
        conv: the convolution (its kernel, stride, padding and dilation).
        grad: its weight's gradient (C_out, C_in, k, k), one image's.
        input_shape: (C_in, H, W).
        rank_tol: relative threshold of the gradient's singular values.
        seed: the solver's start.

    Raises:
        UnsupportedModelError: a grouped convolution, or one whose output positions are not fewer than
            its output channels and its patch size (the gradient's row space then says nothing).
    """
    c, h, w = input_shape
    if conv.groups != 1:
        raise UnsupportedModelError(f"layerwise anchor: expected an ungrouped convolution, got groups={conv.groups}")
    if isinstance(conv.padding, str):
        raise UnsupportedModelError(f"layerwise anchor: expected numeric padding, got padding={conv.padding!r}")
    kernel, dilation, padding, stride = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    g = grad.detach().reshape(grad.shape[0], -1).double().cpu()
    with torch.no_grad():
        out_hw = conv(torch.zeros(1, c, h, w, dtype=conv.weight.dtype, device=conv.weight.device)).shape[-2:]
    positions = int(out_hw[0] * out_hw[1])
    if positions >= min(g.shape):
        raise UnsupportedModelError(f"layerwise anchor: expected fewer output positions than output channels and "
                                    f"than the patch size (C_in k k), got {positions} positions, {g.shape[0]} "
                                    f"channels and patches of {g.shape[1]}")
    s = torch.linalg.svdvals(g)
    rank = int((s > rank_tol * s[0]).sum()) if float(s[0]) > 0 else 0
    gap = rank <= positions
    r = rank if gap else positions - 1
    v = torch.linalg.svd(g, full_matrices=False)[2][:r].T if r > 0 else torch.zeros(g.shape[1], 0, dtype=torch.float64)

    def residual(x: torch.Tensor) -> torch.Tensor:  # the patches, centred over positions, outside the row space
        patches = F.unfold(x.view(-1, c, h, w), kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        patches = patches - patches.mean(1, keepdim=True)
        return patches - (patches @ v) @ v.T

    n = c * h * w

    def normal(block: np.ndarray) -> np.ndarray:  # R^T R applied to each column
        x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float64).reshape(n, -1).T.copy()).requires_grad_(True)
        out = residual(x)
        (back,) = torch.autograd.grad(out, x, grad_outputs=out)
        return back.detach().numpy().T.reshape(block.shape)

    op = LinearOperator((n, n), matvec=lambda x: normal(x.reshape(n, 1)).ravel(), matmat=normal, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal((n, 3))
    vals, vecs = lobpcg(op, start, largest=False, tol=1e-10, maxiter=500)
    order = np.argsort(vals)
    vals, vecs = vals[order], vecs[:, order]
    top = float(np.abs(normal(np.random.default_rng(seed + 1).standard_normal((n, 1)))).max()) or 1.0
    scale = max(float(vals[-1]), top, 1e-300)
    eig = (max(float(vals[0]), 0.0) / scale, max(float(vals[1]), 0.0) / scale)
    x = torch.from_numpy(vecs[:, 0].copy()).view(c, h, w)
    x = x / x.pow(2).mean().sqrt().clamp_min(1e-300)
    return AnchorRecovery(x.float(), rank, positions, eig, bool(gap and eig[1] > 1e6 * eig[0]))


@dataclass
class Stages:
    """A ResNet as stages (the stem, then each block), the pooled features of the last block's output,
    and the linear head on them."""

    stages: list[nn.Module]
    pool: Callable[[torch.Tensor], torch.Tensor]
    fc: nn.Linear

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def resnet_stages(model: nn.Module) -> Stages:
    """The model as :class:`Stages`.

    Raises:
        UnsupportedModelError: not a model with ``stem``, ``layers`` (a Sequential of blocks), ``pool``
            and ``fc`` (gradleak's ResNet-18, either stem).
    """
    parts = [getattr(model, a, None) for a in ("stem", "layers", "pool", "fc")]
    if any(p is None for p in parts) or not isinstance(parts[1], nn.Sequential) or not isinstance(parts[3], nn.Linear):
        raise UnsupportedModelError(f"layerwise: expected a ResNet (a model with stem, layers, pool and fc, as "
                                    f"gradleak's resnet18), got {type(model).__name__}")
    stem, layers, pool, fc = parts
    assert isinstance(stem, nn.Module) and isinstance(layers, nn.Sequential) and isinstance(pool, nn.Module)
    assert isinstance(fc, nn.Linear)
    return Stages([stem, *layers], lambda x: torch.flatten(pool(x), 1), fc)


def _first_conv(stage: nn.Module) -> nn.Conv2d | None:
    conv = getattr(stage, "conv1", None)
    if isinstance(conv, nn.Conv2d):
        return conv
    return next((m for m in stage.modules() if isinstance(m, nn.Conv2d)), None)


def stage_input_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Each stage's input shape (one image's), from one eval-mode forward pass of zeros."""
    stages = resnet_stages(model).stages
    param = next(model.parameters())
    x = torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device)
    shapes = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for stage in stages:
                c, h, w = x.shape[1:]
                shapes.append((int(c), int(h), int(w)))
                x = stage(x)
    finally:
        model.train(was)
    return shapes


def anchor_candidates(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[int, tuple[int, int, int]]]:
    """(stage index, its input shape) of every block whose first convolution's input the rank argument
    determines: stride 1, a kernel larger than 1, fewer output positions than output channels and than
    its patch size."""
    stages = resnet_stages(model).stages
    found = []
    for k, (stage, shape) in enumerate(zip(stages, stage_input_shapes(model, input_shape))):
        conv = _first_conv(stage)
        if k > 0 and conv is not None and conv.stride in (1, (1, 1)) and conv.kernel_size != (1, 1):
            with torch.no_grad():
                out = conv(torch.zeros((1, *shape), dtype=conv.weight.dtype, device=conv.weight.device))
            if out.shape[-1] * out.shape[-2] < min(out.shape[1], conv.weight[0].numel()):
                found.append((k, shape))
    return found


def _cosine_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-30)


@ATTACKS.register("layerwise")
class LayerwiseAttack(Attack):
    """Layer-wise inversion of a ResNet's update at batch 1: a deep block's input in closed form from
    the rank of its weight gradient, then a few blocks at a time down to the image.

    Example:
        >>> import gradleak
        >>> gradleak.attacks.create("layerwise").config.hop
        2
    """

    name = "layerwise"
    Config = LayerwiseConfig
    knowledge = Knowledge(labels="recovered", sok="B")
    resumable = False
    single_image = True

    @classmethod
    def applicability(cls, server: ServerState, config: Any, *, local_steps: int = 1) -> str | None:
        if local_steps != 1:
            return "needs one client's gradient or one-step delta (it reads one step's weight gradients)"
        try:
            found = anchor_candidates(server.model, server.input_shape)
        except UnsupportedModelError:
            return "needs a ResNet (stem, blocks, pool, linear head: gradleak's resnet18)"
        if not found:
            return "needs a block whose convolution has fewer output positions than channels (its input's anchor)"
        return None

    @classmethod
    def budget(cls, iterations: int, config: Any) -> dict[str, int]:
        if iterations < 1:
            raise ConfigError(f"layerwise budget: expected at least 1 iteration, got {iterations}")
        return {"iterations": iterations}

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        start = time.perf_counter()
        cfg = self.config
        self.check(server, update)
        if update.num_samples != 1:
            raise UpdateError(f"layerwise: expected an update of a batch of 1 image (the rank argument reads one "
                              f"image's patches), got {update.num_samples}")
        if update.protocol == "aggregate":
            raise UpdateError("layerwise: expected one client's update, got an aggregate of several clients")
        if (update.local_steps or 1) != 1:
            raise UpdateError(f"layerwise: expected one client's gradient or one-step delta (it reads one step's "
                              f"weight gradients), got a delta of {update.local_steps} local steps")
        found = anchor_candidates(server.model, server.input_shape)
        if not found:
            raise UnsupportedModelError(f"layerwise: expected a block whose first convolution has fewer output positions "
                                        f"than channels (the anchor), got none at input {tuple(server.input_shape)}")
        victim = copy.deepcopy(server.model).to(self.device)
        victim.train(server.bn_mode == "train")
        parts = resnet_stages(victim)
        stages, head = parts.stages, parts.head
        params = [p for p in victim.parameters() if p.requires_grad]
        targets = {id(p): t.to(self.device, p.dtype) for p, t in zip(params, target_gradients(update))}
        lab = self.resolve_labels(server, update, labels, cfg.label_strategy)
        y = lab.labels.to(self.device)
        features = recover_features(server, update, y.cpu(), seed=self.seed).features.to(self.device)

        anchor, shape = found[0]
        shapes = stage_input_shapes(victim, server.input_shape)
        conv = _first_conv(stages[anchor])
        assert conv is not None
        rec = conv_input_from_gradient(conv, targets[id(conv.weight)], shape, rank_tol=cfg.rank_tol, seed=self.seed)
        h, scale, feature_error = self._fit_scale(rec.input.to(self.device).unsqueeze(0), stages[anchor:], parts.pool, features)

        images = torch.full((1, *server.input_shape), 0.5, device=self.device)
        history: dict[str, list[float]] = {"iteration": [], "loss": []}
        steps_info: list[dict[str, Any]] = []
        plan = self._plan(anchor)
        budgets = self._split(cfg.iterations, len(plan))
        done, stopped = 0, None
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        for (hi, lo), its in zip(plan, budgets):
            delta = self._output_gradient(stages[hi:], head, h, y)
            block_params = [p for s in stages[lo:hi] for p in s.parameters() if p.requires_grad]
            is_image = lo == 0
            init = 0.5 * torch.randn((1, *shapes[lo]), generator=generator)
            z = init.to(self.device).requires_grad_(True)
            view: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid if is_image else (
                lambda t: F.softplus(t, beta=5))
            opt = torch.optim.Adam([z], lr=cfg.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(its, 1))
            loss_value = math.nan
            for it in range(its):
                x = view(z)
                out = x
                for s in stages[lo:hi]:
                    out = s(out)
                grads = torch.autograd.grad(out, block_params, grad_outputs=delta, create_graph=True)
                match = torch.stack([_cosine_gap(g, targets[id(p)]) for g, p in zip(grads, block_params)]).mean()
                loss = match + _cosine_gap(out, h)
                if is_image and cfg.tv > 0:
                    loss = loss + cfg.tv * total_variation(x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loss_value = float(loss.detach())
                done += 1
                if is_image:
                    images = view(z).detach()
                if done % cfg.log_every == 0 or it == its - 1:
                    history["iteration"].append(done)
                    history["loss"].append(loss_value)
                    if callback is not None and callback(Progress(iteration=done, total=cfg.iterations, loss=loss_value,
                                                                  images=images.clone())):
                        stopped = "stopped by the callback"
                        break
            h = view(z).detach()
            steps_info.append({"from": self._stage_name(hi, len(stages)), "to": self._stage_name(lo, len(stages)),
                               "iterations": its, "loss": loss_value if math.isfinite(loss_value) else None})
            if stopped:
                break
        info = {"anchor": {"stage": self._stage_name(anchor, len(stages)), "input_shape": list(shape),
                           **rec.describe(), "scale": scale, "feature_error": feature_error},
                "steps": steps_info, "label_warnings": list(lab.warnings)}
        return Reconstruction(images=images.detach().float().cpu(), labels=y.cpu(), label_strategy=lab.strategy,
                              history=history, iterations=done, seconds=time.perf_counter() - start,
                              stopped_early=stopped, matching="block gradients, from a closed-form anchor", info=info)

    def _plan(self, anchor: int) -> list[tuple[int, int]]:
        """(from, to) stage ranges: ``hop`` blocks at a time down to ``image_depth``, then the image."""
        plan, k = [], anchor
        while k > self.config.image_depth:
            lo = max(k - self.config.hop, self.config.image_depth)
            plan.append((k, lo))
            k = lo
        return [*plan, (k, 0)]

    @staticmethod
    def _split(iterations: int, steps: int) -> list[int]:
        """60% of the steps to the intermediate ranges (evenly), 40% to the image (all when there is none).

        >>> LayerwiseAttack._split(5000, 2), LayerwiseAttack._split(10, 3), LayerwiseAttack._split(1, 2)
        ([3000, 2000], [3, 3, 4], [0, 1])
        """
        if steps == 1:
            return [iterations]
        image = max(1, round(0.4 * iterations))
        each = (iterations - image) // (steps - 1)
        return [each] * (steps - 1) + [iterations - each * (steps - 1)]

    @staticmethod
    def _stage_name(k: int, count: int) -> str:
        return "image" if k == 0 else f"block {k} input" if k < count else "features"

    @staticmethod
    def _output_gradient(top: list[nn.Module], head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        """The loss's gradient at ``h``, the input of the ``top`` stages (one backward pass)."""
        x = h.detach().clone().requires_grad_(True)
        out = x
        for s in top:
            out = s(out)
        (g,) = torch.autograd.grad(F.cross_entropy(head(out), labels), x)
        return g.detach()

    @staticmethod
    def _fit_scale(h: torch.Tensor, top: list[nn.Module], pool: Callable[[torch.Tensor], torch.Tensor],
                   features: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """The sign and scale of ``h`` whose forward pass gives the recovered last-layer features."""

        def error(x: torch.Tensor) -> float:
            with torch.no_grad():
                out = x
                for s in top:
                    out = s(out)
                return float((pool(out) - features).norm() / features.norm().clamp_min(1e-30))

        a, b, n = SCALE_GRID
        best = (math.inf, 1.0)
        for sign in (1.0, -1.0):
            for ls in np.linspace(a, b, int(n)):
                e = error(sign * math.exp(ls) * h)
                if e < best[0]:
                    best = (e, sign * math.exp(ls))
        # golden-section refinement of log|scale| within one grid step
        sign, step = math.copysign(1.0, best[1]), (b - a) / (n - 1)
        lo_, hi_ = math.log(abs(best[1])) - step, math.log(abs(best[1])) + step
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(30):
            m1, m2 = hi_ - ratio * (hi_ - lo_), lo_ + ratio * (hi_ - lo_)
            if error(sign * math.exp(m1) * h) < error(sign * math.exp(m2) * h):
                hi_ = m2
            else:
                lo_ = m1
        scale = sign * math.exp((lo_ + hi_) / 2)
        e = error(scale * h)
        if e > best[0]:
            e, scale = best
        return scale * h, scale, e


__all__ = ["AnchorRecovery", "LayerwiseAttack", "LayerwiseConfig", "anchor_candidates", "conv_input_from_gradient",
           "resnet_stages", "stage_input_shapes", "Stages"]
