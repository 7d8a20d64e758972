"""Layer-wise inversion: a deep block's inputs read off its weight gradient, then block by block down.

The attacks that match the whole network's gradient fail on a ResNet whose client runs BatchNorm in
train mode (docs/attacks.md: the untrained ResNet-18-ReLU at batch 1, mean layer cosine 0.33 at 5%
pixel noise): through 17 normalised layers the gradient decorrelates from the update within a few
percent of the image. One block's gradient, with what is above it held fixed, does not: the same
victim's per-block matching loss grows smoothly and linearly with noise in the block's input. This
attack therefore never differentiates through more than a few blocks at once.

1. **The anchor, in closed form.** A convolution's weight gradient is
   ``grad_W = sum_n sum_p delta_n(p) patch_n(p)^T`` over the N images' P output positions each: a
   (C_out, C_in k k) matrix of rank at most N P, whose row space holds every input patch. Where
   N P < C_out (ResNet-18's third and fourth stages at 32 px: 64 and 16 positions, 256 and 512
   channels) the rank is visible, and each image's input ``h_n`` solves the linear system "every
   patch of ``h`` lies in that row space"; a train-mode BatchNorm after the convolution centres
   ``delta`` over the positions, so it is the patches less their mean that lie there (rank N P - 1).
   :func:`conv_input_from_gradient` finds the system's null space (LOBPCG): at batch 1 the input up
   to its scale, at batch N the span of the N inputs, to float precision (tests). Of the blocks whose
   first convolution qualifies (stride 1: a stride-2 convolution's patches overlap too little to fix
   the input), the lowest is the anchor.
2. **The images apart** (batch N): after a ReLU each input is nonnegative with zeros in its own
   places, so the N inputs are the edges of the cone of nonnegative members of the span
   (:func:`separate_nonnegative`, linear programs).
3. **Their scales and labels**, from the last layer: each assignment of the inputs to the recovered
   labels (images of one label interchangeable) and each image's scale are fitted until the anchor's
   forward pass reproduces the update's last-layer gradient (a grid over one common scale, then
   L-BFGS over each image's); at batch 1 the two signs are the candidates.
4. **Down, a few blocks at a time.** With a block range's output known (the anchor, then each step's
   result), the gradient at that output follows by one backward pass from the top; the range's
   input is found by matching its parameters' gradient (each tensor's cosine) and its output (each
   image's cosine): ``hop`` blocks an intermediate step, ``image_depth`` blocks for the last one,
   whose input is the image.

Measured (docs/attacks.md): the untrained CIFAR ResNet-18-ReLU, BatchNorm in train mode, batch 1 and
4, where CI-Net and IG read 0.03-0.13 whatever their levers. The largest batch it reads is
:func:`largest_batch` (ResNet-18 at 32 px in train mode: 32, through block 8; batch > 1 only after a
ReLU: the inputs of smooth activations are all positive and do not separate this way). The update
must be one client's FedSGD gradient or one-step delta, undefended enough to keep the rank gap (a
defense's noise fills it: then the anchor is a least-squares fit, marked ``exact: false``).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
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
from gradleak.attacks.threat_model import Knowledge
from gradleak.config import check_ranges
from gradleak.errors import ConfigError, UnsupportedModelError, UpdateError
from gradleak.functional.gradients import total_variation
from gradleak.types import ClientUpdate, Reconstruction, ServerState

SCALE_GRID = (-8.0, 8.0, 33)
"""The anchor's scale search: one ``log(scale)`` for every image on this grid (start, stop, points), then
each image's refined."""

MAX_ASSIGNMENTS = 120
"""At batch N the separated inputs are tried in every assignment to the labels' slots up to this many;
beyond it, the one the recovered last-layer features say."""


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
        deep_anchor: at a batch too large for the batch-1 anchor (ResNet-18 in train mode: above 4),
            anchor at a deeper block (block 8, up to 32). Off by default: the block inputs come back
            exact, but the descent from block 8 across the stride-2 block 7 is lost (block 6's input
            at cosine 0.62 at batch 1; batch 8 mean SSIM 0.069, docs/attacks.md).
        log_every: report progress every this many steps.
    """

    label_strategy: str = "auto"
    iterations: int = 5000
    lr: float = 0.05
    hop: int = 2
    image_depth: int = 4
    rank_tol: float = 1e-4
    tv: float = 0.2
    deep_anchor: bool = False
    log_every: int = 25

    def __post_init__(self) -> None:
        check_ranges("LayerwiseConfig", self, iterations=(1, None), lr=(0, None, "open"), hop=(1, None),
                     image_depth=(1, None), rank_tol=(0, 1, "open"), tv=(0, None), log_every=(1, None))


@dataclass
class AnchorRecovery:
    """A convolution's input, recovered from its weight gradient (:func:`conv_input_from_gradient`).

    Args:
        input: (N, C, H, W), each unit root-mean-square: at batch 1 the input, sign and scale
            undetermined; at batch N an orthonormal basis (up to that scale) of the span of the N
            images' inputs, which :func:`separate_nonnegative` splits into the images.
        rank: the gradient's numerical rank.
        positions: the convolution's output positions, all N images' together.
        eigenvalues: the N-th and (N+1)-th smallest eigenvalues of the system's normal operator, relative
            to its largest: the first is 0 (to rounding) when the span is determined, the second
            measures how well.
        exact: the gradient's rank is below its channels and its positions' count plus one, and the
            system's null space is N-dimensional (the (N+1)-th eigenvalue over 1e6 times the N-th).
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
                             images: int = 1, rank_tol: float = 1e-4, seed: int = 0) -> AnchorRecovery:
    """The input of ``conv`` from its weight gradient alone: at batch 1 up to scale and sign, at batch N
    the span of the N images' inputs.

    Every patch of every image lies in the gradient's row space, less its own image's mean patch where
    a train-mode BatchNorm centres the gradient over the batch's positions (an image's mean patch is
    the batch's centred patches' mean over that image, which lies there too). So each image's input,
    and every combination of them, solves "the patches of ``x``, less their mean, lie in the row
    space": the N-dimensional null space of a linear system in one image's unknowns.

    Args:
        conv: the convolution (its kernel, stride, padding and dilation).
        grad: its weight's gradient (C_out, C_in, k, k), the sum over the batch.
        input_shape: (C_in, H, W) of one image's input.
        images: the batch size N.
        rank_tol: relative threshold of the gradient's singular values.
        seed: the solver's start.

    Raises:
        UnsupportedModelError: a grouped convolution, or one whose N images' output positions, less one,
            are not fewer than its output channels and its patch size (the gradient's row space then
            says nothing).
    """
    c, h, w = input_shape
    if conv.groups != 1:
        raise UnsupportedModelError(f"layerwise anchor: expected an ungrouped convolution, got groups={conv.groups}")
    if isinstance(conv.padding, str):
        raise UnsupportedModelError(f"layerwise anchor: expected numeric padding, got padding={conv.padding!r}")
    if images < 1:
        raise UnsupportedModelError(f"layerwise anchor: expected at least 1 image, got {images}")
    kernel, dilation, padding, stride = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    g = grad.detach().reshape(grad.shape[0], -1).double().cpu()
    with torch.no_grad():
        out_hw = conv(torch.zeros(1, c, h, w, dtype=conv.weight.dtype, device=conv.weight.device)).shape[-2:]
    positions = images * int(out_hw[0] * out_hw[1])
    if positions - 1 >= min(g.shape) or (images == 1 and positions >= min(g.shape)):
        batch = "" if images == 1 else f"{images} images' "
        raise UnsupportedModelError(f"layerwise anchor: expected fewer {batch}output positions than output channels "
                                    f"and than the patch size (C_in k k), got {positions} positions, {g.shape[0]} "
                                    f"channels and patches of {g.shape[1]}")
    s = torch.linalg.svdvals(g)
    rank = int((s > rank_tol * s[0]).sum()) if float(s[0]) > 0 else 0
    gap = rank <= positions and rank < min(g.shape)
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
    start = np.random.default_rng(seed).standard_normal((n, images + 2))
    with warnings.catch_warnings():  # a tolerance short of 1e-10 shows in the eigenvalues and `exact`
        warnings.simplefilter("ignore", UserWarning)
        vals, vecs = lobpcg(op, start, largest=False, tol=1e-10, maxiter=500 + 250 * images)
    order = np.argsort(vals)
    vals, vecs = vals[order], vecs[:, order]
    top = float(np.abs(normal(np.random.default_rng(seed + 1).standard_normal((n, 1)))).max()) or 1.0
    scale = max(float(vals[-1]), top, 1e-300)
    eig = (max(float(vals[images - 1]), 0.0) / scale, max(float(vals[images]), 0.0) / scale)
    x = torch.from_numpy(vecs[:, :images].T.copy()).view(images, c, h, w)
    x = x / x.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-300).view(-1, 1, 1, 1)
    return AnchorRecovery(x.float(), rank, positions, eig, bool(gap and eig[1] > 1e6 * eig[0]))


def separate_nonnegative(basis: torch.Tensor, *, tol: float = 1e-8, seed: int = 0,
                         trials: int | None = None) -> torch.Tensor:
    """The N nonnegative inputs whose span ``basis`` holds, as the extreme rays of the cone of its
    nonnegative members.

    A block's input after a ReLU is nonnegative with many zeros, each image's in other places: within
    the span of N such inputs the nonnegative members form a cone whose N edges are the inputs
    themselves (a combination with two images' weight nonzero and one negative goes below zero
    somewhere). Each linear program "minimise a random linear objective over the nonnegative
    members of unit sum" ends on an edge; random objectives find all N.

    Args:
        basis: (N, ...) a basis of the span (:func:`conv_input_from_gradient`).
        tol: how far below zero a member's entries may go (the basis's rounding).
        seed: the random objectives'.
        trials: linear programs at most (default 10 N + 10).

    Returns:
        (M, ...) the edges found, each unit root-mean-square, M <= N; fewer than N when the inputs are
        not separable this way (an activation that is not a ReLU: every combination stays positive).

    Example:
        >>> a, b = torch.tensor([1.0, 0, 2, 0]), torch.tensor([0.0, 3, 1, 1])
        >>> rays = separate_nonnegative(torch.stack([a + b, a - b]))
        >>> sorted(round(float(F.cosine_similarity(r, a, dim=0)), 4) for r in rays)  # b, a
        [0.2697, 1.0]
    """
    from scipy.optimize import linprog

    n = basis.shape[0]
    q = np.linalg.qr(basis.detach().double().cpu().reshape(n, -1).numpy().T)[0]  # (D, N), orthonormal columns
    rng = np.random.default_rng(seed)
    found: list[np.ndarray] = []
    for _ in range(trials or 10 * n + 10):
        res = linprog(rng.standard_normal(q.shape[0]) @ q, A_ub=-q, b_ub=np.full(q.shape[0], tol),
                      A_eq=q.sum(0, keepdims=True), b_eq=[1.0], bounds=[(None, None)] * n, method="highs")
        if res.status != 0:
            continue
        ray = q @ res.x
        ray = ray / np.linalg.norm(ray)
        if all(abs(float(ray @ other)) < 1 - 1e-6 for other in found):
            found.append(ray)
            if len(found) == n:
                break
    if not found:
        return basis.new_zeros((0, *basis.shape[1:]))
    rays = torch.from_numpy(np.stack(found)).view(len(found), *basis.shape[1:])
    return (rays / rays.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (basis.dim() - 1)))).to(basis.dtype)


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


def _anchor_blocks(model: nn.Module, input_shape: tuple[int, int, int],
                   bn_mode: str) -> list[tuple[int, tuple[int, int, int], int]]:
    """(stage index, its input shape, the largest batch it anchors) of every block whose first
    convolution has stride 1 and a kernel larger than 1 (one walk: the batch size enters only the
    count). A batch of N qualifies where its output positions N P, less one in train mode (whose
    BatchNorm centres them), are fewer than the convolution's output channels and its patch size L:
    N <= (L + centred - 1) // P; at batch > 1 only after a ReLU."""
    stages = resnet_stages(model).stages
    centred = 1 if bn_mode == "train" else 0
    found = []
    for k, (stage, shape) in enumerate(zip(stages, stage_input_shapes(model, input_shape))):
        conv = _first_conv(stage)
        if k > 0 and conv is not None and conv.stride in (1, (1, 1)) and conv.kernel_size != (1, 1):
            with torch.no_grad():
                out = conv(torch.zeros((1, *shape), dtype=conv.weight.dtype, device=conv.weight.device))
            most = (min(out.shape[1], conv.weight[0].numel()) + centred - 1) // (out.shape[-1] * out.shape[-2])
            found.append((k, shape, most if _nonnegative(stages[k - 1]) else min(most, 1)))
    return found


def anchor_candidates(model: nn.Module, input_shape: tuple[int, int, int], *, images: int = 1,
                      bn_mode: str = "train") -> list[tuple[int, tuple[int, int, int]]]:
    """(stage index, its input shape) of every block whose first convolution's input the rank argument
    determines at batch ``images``: stride 1, a kernel larger than 1, its N images' output positions
    (less one in train mode, whose BatchNorm centres them) fewer than its output channels and than its
    patch size."""
    return [(k, shape) for k, shape, most in _anchor_blocks(model, input_shape, bn_mode) if images <= most]


def _nonnegative(stage: nn.Module) -> bool:
    """The stage's output is a ReLU's (what :func:`separate_nonnegative` needs at batch > 1)."""
    last = getattr(stage, "act2", None) or next((m for m in reversed(list(stage.modules()))
                                                 if not isinstance(m, nn.Sequential)), None)
    return isinstance(last, (nn.ReLU, nn.ReLU6))


def _readable(server: ServerState, deep: bool) -> list[tuple[int, tuple[int, int, int], int]]:
    """:func:`_anchor_blocks` that anchor batch 1, and without ``deep`` only the lowest (the batch-1 anchor)."""
    blocks = [b for b in _anchor_blocks(server.model, server.input_shape, server.bn_mode) if b[2] >= 1]
    return blocks if deep else blocks[:1]


def largest_batch(server: ServerState, *, deep_anchor: bool = False) -> int:
    """The largest batch whose update :class:`LayerwiseAttack` reads: the batch-1 anchor block's
    convolution (with ``deep_anchor``, any block's) has fewer of its images' output positions than
    channels (ResNet-18 at 32 px in train mode: 4 through block 6; 32 through block 8), and at batch > 1
    a ReLU before it (:func:`separate_nonnegative`); 0 when none (not a ResNet, or no such block at
    batch 1)."""
    try:
        return max((most for _, _, most in _readable(server, deep_anchor)), default=0)
    except UnsupportedModelError:
        return 0


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

    @classmethod
    def max_images(cls, server: ServerState, config: Any = None) -> int | None:
        deep = config.get("deep_anchor", False) if isinstance(config, dict) else getattr(config, "deep_anchor", False)
        return largest_batch(server, deep_anchor=bool(deep))

    @classmethod
    def applicability(cls, server: ServerState, config: Any, *, local_steps: int = 1) -> str | None:
        if local_steps != 1:
            return "needs one client's gradient or one-step delta (it reads one step's weight gradients)"
        try:
            found = anchor_candidates(server.model, server.input_shape, bn_mode=server.bn_mode)
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
        if update.protocol == "aggregate":
            raise UpdateError("layerwise: expected one client's update, got an aggregate of several clients")
        if (update.local_steps or 1) != 1:
            raise UpdateError(f"layerwise: expected one client's gradient or one-step delta (it reads one step's "
                              f"weight gradients), got a delta of {update.local_steps} local steps")
        n = update.num_samples
        readable = _readable(server, cfg.deep_anchor)
        if not readable:
            raise UnsupportedModelError(f"layerwise: expected a block whose first convolution has fewer output positions "
                                        f"than channels (the anchor), got none at input {tuple(server.input_shape)}")
        found = [(k, shape) for k, shape, most in readable if n <= most]
        if not found:
            limit = max(most for _, _, most in readable)
            stages = resnet_stages(server.model).stages
            after_relu = any(_nonnegative(stages[k - 1]) for k, _, _ in readable)
            why = ("its anchor's span separates into the images only after a ReLU" if not after_relu else
                   "its anchor block's convolution must have fewer of the batch's output positions than channels"
                   + ("" if cfg.deep_anchor else "; deep_anchor=true reads more through a deeper block"))
            raise UpdateError(f"layerwise: expected an update of at most {limit} image{'s' * (limit > 1)} on this victim "
                              f"({why}), got {n}")
        victim = copy.deepcopy(server.model).to(self.device)
        victim.train(server.bn_mode == "train")
        parts = resnet_stages(victim)
        stages, head = parts.stages, parts.head
        params = [p for p in victim.parameters() if p.requires_grad]
        targets = {id(p): t.to(self.device, p.dtype) for p, t in zip(params, target_gradients(update))}
        lab = self.resolve_labels(server, update, labels, cfg.label_strategy)
        y = lab.labels.to(self.device)

        anchor, shape = found[0]
        shapes = stage_input_shapes(victim, server.input_shape)
        conv = _first_conv(stages[anchor])
        assert conv is not None
        rec = conv_input_from_gradient(conv, targets[id(conv.weight)], shape, images=n, rank_tol=cfg.rank_tol,
                                       seed=self.seed)
        basis = rec.input.to(self.device)
        separated = n
        if n == 1:
            candidates = [basis, -basis]
        else:
            rays = separate_nonnegative(basis, seed=self.seed).to(self.device)
            separated = rays.shape[0]
            if separated < n:  # complete with the span's directions the rays leave out (the fit then says how far off)
                q = torch.linalg.qr(torch.cat([rays, basis]).flatten(1).T.double())[0].T[:n].float()
                rays = torch.cat([rays, q[separated:].view(-1, *basis.shape[1:])])
            candidates = self._assignments(rays, y, stages[anchor:], parts, targets)
        h, scales, head_error = self._fit_scales(candidates, stages[anchor:], parts, y, targets)
        for _ in range(5 if n > 1 else 0):  # at the fitted scales the last layer may say another assignment
            order = _order_by_head(h, y, stages[anchor:], parts, targets)
            if order == list(range(n)):
                break
            again = self._fit_scales([h[order] / h[order].flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)],
                                     stages[anchor:], parts, y, targets)
            if again[2] >= head_error:
                break
            h, scales, head_error = again

        images = torch.full((n, *server.input_shape), 0.5, device=self.device)
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
            init = 0.5 * torch.randn((n, *shapes[lo]), generator=generator)
            z = init.to(self.device).requires_grad_(True)
            view: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid if is_image else (
                lambda t: F.softplus(t, beta=5))
            opt = torch.optim.Adam([z], lr=cfg.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(its, 1))
            loss_value = math.nan
            for it in range(its):
                x = view(z)
                out = _forward(stages[lo:hi], x)
                grads = torch.autograd.grad(out, block_params, grad_outputs=delta, create_graph=True)
                match = torch.stack([_cosine_gap(g, targets[id(p)]) for g, p in zip(grads, block_params)]).mean()
                loss = match + (1 - F.cosine_similarity(out.flatten(1), h.flatten(1), dim=1, eps=1e-30)).mean()
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
                           **rec.describe(), "separated": separated, "assignments_tried": len(candidates),
                           "scales": scales, "head_gradient_error": head_error},
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
        (g,) = torch.autograd.grad(F.cross_entropy(head(_forward(top, x)), labels), x)
        return g.detach()

    @staticmethod
    def _assignments(rays: torch.Tensor, labels: torch.Tensor, top: list[nn.Module], parts: Stages,
                     targets: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The rays in each order that gives the labels' slots a distinct assignment (images of one label
        are interchangeable); beyond ``MAX_ASSIGNMENTS``, the orders :func:`_order_by_head` gives at each
        common scale of ``SCALE_GRID``."""
        n = rays.shape[0]
        y = labels.tolist()
        count = math.factorial(n) // math.prod(math.factorial(y.count(c)) for c in set(y))
        if count <= MAX_ASSIGNMENTS:
            orders = [p for p in itertools.permutations(range(n))
                      if all(p[i] < p[j] for i in range(n) for j in range(i + 1, n) if y[i] == y[j])]
            return [rays[list(p)] for p in orders]
        a, b, points = SCALE_GRID
        found: dict[tuple[int, ...], torch.Tensor] = {}
        for ls in np.linspace(a, b, int(points)):
            order = _order_by_head(rays * math.exp(ls), labels, top, parts, targets)
            found.setdefault(tuple(order), rays[order])
        return list(found.values())

    @staticmethod
    def _fit_scales(candidates: list[torch.Tensor], top: list[nn.Module], parts: Stages, labels: torch.Tensor,
                    targets: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[float], float]:
        """The candidate (a sign at batch 1, an assignment of the rays to the labels' slots at batch N) and
        the per-image scales whose forward pass reproduces the update's last-layer gradient: a grid over
        one common scale for every candidate, then L-BFGS over each image's log-scale for the best three.

        Returns:
            the scaled anchor (N, C, H, W), its scales, and the last layer's relative gradient error.
        """
        head_params = [p for p in parts.fc.parameters() if p.requires_grad]

        def error(h: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                loss = F.cross_entropy(parts.head(_forward(top, h)), labels)
                grads = torch.autograd.grad(loss, head_params, create_graph=h.requires_grad)
            return torch.stack([(g - targets[id(p)]).norm() / targets[id(p)].norm().clamp_min(1e-30)
                                for g, p in zip(grads, head_params)]).mean()

        a, b, points = SCALE_GRID
        grid = []
        for k, cand in enumerate(candidates):
            for ls in np.linspace(a, b, int(points)):
                e = float(error(cand * math.exp(ls)).detach())
                grid.append((e if math.isfinite(e) else math.inf, k, float(ls)))
        grid.sort()
        best: tuple[float, torch.Tensor, list[float]] = (math.inf, candidates[0], [1.0] * candidates[0].shape[0])
        tried: set[int] = set()
        for _, k, ls0 in grid:
            if k in tried:
                continue
            tried.add(k)
            cand = candidates[k]
            shape = (-1, *([1] * (cand.dim() - 1)))

            def scaled(log_scale: torch.Tensor, cand: torch.Tensor = cand, shape: tuple[int, ...] = shape) -> torch.Tensor:
                return error(cand * log_scale.exp().view(shape))

            fitted = _refine_log_scales(scaled, torch.full((cand.shape[0],), ls0, device=cand.device)).exp()
            e = float(error(cand * fitted.view(shape)).detach())
            if e < best[0]:
                best = (e, cand * fitted.view(shape), fitted.tolist())
            if len(tried) == min(3, len(candidates)):
                break
        return best[1].detach(), best[2], best[0]


def _order_by_head(h: torch.Tensor, labels: torch.Tensor, top: list[nn.Module], parts: Stages,
                   targets: dict[int, torch.Tensor]) -> list[int]:
    """The rows of ``h`` (N block inputs) in the order of the labels' slots that the last layer's gradient
    says: with the mean cross-entropy, ``N grad_W = (P - Y)^T F``, so the one-hot labels solve
    ``Y^T = (P^T F - N grad_W) F^+`` (F: the N images' features, P: their probabilities, both from
    the forward pass of ``h``), exactly at the right scales; each slot of label c takes the rows that
    weigh most in row c (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        f = parts.pool(_forward(top, h)).double()
        p = parts.fc(f.to(h.dtype)).softmax(1).double()
        gw = targets[id(parts.fc.weight)].double()
        counts = (p.T @ f - h.shape[0] * gw) @ torch.linalg.pinv(f)  # (C, N): the labels' weight on each row
    cost = -counts[labels.to(counts.device)]  # (slot, row)
    _, order = linear_sum_assignment(np.nan_to_num(cost.cpu().numpy(), nan=0.0))
    return [int(i) for i in order]


def _refine_log_scales(error: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """L-BFGS (strong Wolfe) on ``error``'s argument from ``start``."""
    log_scale = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([log_scale], lr=1, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = error(log_scale)
        loss.backward()
        return loss

    opt.step(closure)
    return log_scale.detach()


def _forward(stages: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage(x)
    return x


__all__ = ["AnchorRecovery", "LayerwiseAttack", "LayerwiseConfig", "anchor_candidates", "conv_input_from_gradient",
           "largest_batch", "separate_nonnegative",
           "resnet_stages", "stage_input_shapes", "Stages"]
