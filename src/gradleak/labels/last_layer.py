"""What every label strategy shares: the result type, the registry, and the last layer's gradient.

All strategies in :mod:`gradleak.labels` read the same two tensors: the gradient of the mean
cross-entropy with respect to the weight ``W`` (C x M) and the bias ``b`` (C) of the model's final
linear layer. For one sample ``i`` with features ``z_i`` (the layer's input) and softmax output
``p_i``,

    dL_i/db = p_i - onehot(y_i),        dL_i/dW = (p_i - onehot(y_i)) z_i^T,

so for a batch of N the update holds ``grad_b = (1/N) sum_i (p_i - y_i)`` and
``grad_W = (1/N) sum_i (p_i - y_i) z_i^T`` (Zhao et al. 2020, Eq. 3-5; Ma et al. 2023, Eq. 2-3).
:func:`last_layer` finds that layer, checks that the update fits it, and brings a FedAvg weight
difference back to gradient scale.

Update kinds (:class:`~gradleak.types.ClientUpdate`):

* ``kind="gradient"``: used as it is.
* ``kind="delta"`` with one local step and its ``local_lr``: ``grad = -delta / lr``, exact.
* ``kind="delta"`` with S > 1 local steps and ``local_lr``: ``-delta / (lr * S)`` is the mean
  gradient along the local trajectory. Its label part (``-onehot`` terms) is still exactly
  ``-counts / N`` when the steps cover whole epochs (every sample seen equally often); the softmax
  part is averaged over S slightly different models. Signs and ratios hold approximately, so
  strategies run and record a warning.
* ``kind="delta"`` without ``local_lr``: only signs and ratios are known; strategies that need the
  gradient's scale (``ilrg``, ``bias-count``) raise :class:`~gradleak.errors.UpdateError`.

References:
    Zhao et al., "iDLG: Improved Deep Leakage from Gradients", arXiv:2001.02610, 2020.
    Ma et al., "Instance-wise Batch Label Restoration via Gradients in Federated Learning",
    ICLR 2023.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradleak.defenses import QuantizeDefense, quantization_scale, recorded_defense
from gradleak.errors import UnsupportedModelError, UpdateError
from gradleak.labels.support import complete_support
from gradleak.registry import Registry
from gradleak.types import ClientUpdate, ServerState


@dataclass(frozen=True)
class LabelResult:
    """Recovered labels and how they were obtained.

    Args:
        labels: recovered labels sorted by class (a batch's order cannot be recovered from a sum
            over the batch), int64, shape (N,).
        strategy: the strategy that produced them (for ``auto``: the one it chose).
        warnings: caveats recorded on the way (fallbacks, approximations, low confidence).
        info: strategy-specific diagnostics, JSON-serialisable (e.g. iLRG's real-valued counts).
    """

    labels: torch.Tensor
    strategy: str
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def counts(self, num_classes: int) -> torch.Tensor:
        """Recovered number of samples per class, shape (num_classes,)."""
        return torch.bincount(self.labels.long(), minlength=num_classes)


LABEL_STRATEGIES: Registry[Callable[..., LabelResult]] = Registry("label strategy")


@dataclass(frozen=True)
class LastLayer:
    """The final linear layer of the server's model and its gradient in the update.

    Args:
        weight_name: the weight's name in the update, e.g. ``"fc.weight"``.
        bias_name: the bias's name, or ``None`` when the layer has no bias.
        weight: the server's weight W, float64 on the CPU, shape (C, M); for a multi-step delta
            with ``local_lr``, the weight at the middle of the local trajectory,
            ``W + delta_W * (S - 1) / (2 S)``, where the mean gradient is best approximated.
        bias: the server's bias b (likewise), float64 on the CPU, shape (C,), or ``None``.
        grad_weight: the update's gradient of W at gradient scale (see :func:`last_layer`),
            float64 on the CPU, shape (C, M).
        grad_bias: the same for b, shape (C,), or ``None``.
        num_samples: the batch size N the update declares.
        scale_known: ``False`` for a delta without ``local_lr``: only signs and ratios are known.
        nonnegative_features: whether the layer's input was non-negative on random probe images
            (ReLU/sigmoid features); iDLG-by-weight, Yin and LLG rely on it.
        notes: caveats about the update every strategy should pass on as warnings.
        bias_sum_slack: how far from zero the bias gradient's sum may be moved by a recorded
            defense that only rounds it (``quantize:b``: ``C * step / 2``, each entry within half a
            step of the true one), in gradient scale; 0 otherwise.
        pruned: the update records top-k pruning (``prune:s``): its zeros are entries the defense
            removed, which :meth:`for_counts` fills back.
    """

    weight_name: str
    bias_name: str | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor | None
    num_samples: int
    scale_known: bool
    nonnegative_features: bool
    notes: tuple[str, ...] = ()
    bias_sum_slack: float = 0.0
    pruned: bool = False

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @functools.cached_property
    def _filled(self) -> LastLayer:
        grad_weight, grad_bias, filled = complete_support(self.grad_weight, self.grad_bias)
        if not filled:
            return self
        note = (f"the update records pruning: {filled} zeroed entries of the last layer's gradient were filled "
                f"back (rank-one fit, column sums zero, each within the smallest kept magnitude) before counting")
        return dataclasses.replace(self, grad_weight=grad_weight, grad_bias=grad_bias, pruned=False,
                                   notes=(*self.notes, note))

    def for_counts(self) -> LastLayer:
        """The layer count strategies (``ilrg``, ``bias-count``) read: pruned entries filled back.

        After a recorded ``prune`` the zeroed entries of the gradient are filled by
        :func:`~gradleak.labels.support.complete_support` (computed once per layer, a note added);
        otherwise the layer itself.
        """
        return self._filled if self.pruned else self

    def require_bias(self, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The bias and its gradient; raises when the layer has none."""
        if self.bias is None or self.grad_bias is None:
            raise UnsupportedModelError(
                f"label strategy '{strategy}': expected the last linear layer to have a bias, got one without")
        return self.bias, self.grad_bias

    def require_scale(self, strategy: str) -> None:
        """Raise unless the gradient's scale is known (needed for counts)."""
        if not self.scale_known:
            raise UpdateError(
                f"label strategy '{strategy}': expected a gradient or a delta with its local_lr (to undo "
                f"the step's scale), got a delta without local_lr")

    def require_nonnegative_features(self, strategy: str) -> None:
        """Raise unless the last layer's inputs are non-negative (ReLU/sigmoid features)."""
        if not self.nonnegative_features:
            raise UnsupportedModelError(
                f"label strategy '{strategy}': expected non-negative inputs to the last linear layer "
                f"(ReLU or sigmoid features), got negative values on probe images")


def _output_linear(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, nn.Linear, bool]:
    """The ``nn.Linear`` whose output is the model's output, found by one probe forward pass.

    The probe runs on two random images with every module in eval mode (so BatchNorm statistics
    and dropout are untouched) and no gradient; the modules' train/eval flags are restored.

    Returns:
        The layer's name, the layer, and whether its input was non-negative on the probe.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        last = [type(m).__name__ for m in model.modules() if not list(m.children())]
        raise UnsupportedModelError(
            f"label recovery: expected the model to end in an nn.Linear layer (logits), got no nn.Linear "
            f"at all (last module: {last[-1] if last else 'none'})")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[name] = (inputs[0].detach(), output.detach())
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in linears]
    modes = [(m, m.training) for m in model.modules()]
    try:
        param = next(model.parameters(), None)
        g = torch.Generator().manual_seed(0)
        probe = torch.rand((2, *input_shape), generator=g)
        if param is not None:
            probe = probe.to(device=param.device, dtype=param.dtype)
        model.eval()
        with torch.no_grad():
            out = model(probe)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            f"label recovery: expected the model to return a logits tensor, got {type(out).__name__}")
    for name, m in reversed(linears):
        if name in seen and seen[name][1].shape == out.shape and torch.equal(seen[name][1], out):
            return name, m, bool((seen[name][0] >= 0).all())
    raise UnsupportedModelError(
        f"label recovery: expected the model's output to be the output of its last nn.Linear layer, got an "
        f"output computed after it (last nn.Linear: '{linears[-1][0]}')")


def last_layer(server: ServerState, update: ClientUpdate) -> LastLayer:
    """Find the final linear layer and its gradient in ``update``, at gradient scale.

    Args:
        server: the model the update was computed on.
        update: the client's update.

    Returns:
        A :class:`LastLayer`.

    Raises:
        UnsupportedModelError: the model's output is not the output of an ``nn.Linear`` with
            ``server.num_classes`` outputs.
        UpdateError: the update lacks the layer's tensors, their shapes differ from the
            parameters', or they are not finite.
    """
    name, layer, nonneg = _output_linear(server.model, tuple(server.input_shape))
    if layer.out_features != server.num_classes:
        raise UnsupportedModelError(
            f"label recovery: expected the last linear layer to have {server.num_classes} outputs "
            f"(the server's num_classes), got {layer.out_features}")
    prefix = f"{name}." if name else ""
    w_name = prefix + "weight"
    b_name = prefix + "bias" if layer.bias is not None else None
    for n, p in ((w_name, layer.weight), (b_name, layer.bias)):
        if n is None or p is None:
            continue
        if n not in update.tensors:
            raise UpdateError(f"label recovery: expected the update to hold '{n}' (the last linear layer), "
                              f"got {len(update.tensors)} tensors without it")
        t = update.tensors[n]
        if tuple(t.shape) != tuple(p.shape):
            raise UpdateError(
                f"label recovery: update tensor '{n}': expected shape {tuple(p.shape)}, got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise UpdateError(f"label recovery: update tensor '{n}': expected finite values, got NaN/Inf")
    factor, scale_known, notes = _gradient_factor(update)
    gw = update.tensors[w_name].detach().double().cpu() * factor
    gb = update.tensors[b_name].detach().double().cpu() * factor if b_name else None
    weight = layer.weight.detach().double().cpu()
    bias = layer.bias.detach().double().cpu() if layer.bias is not None else None
    steps = int(update.local_steps)
    if update.kind == "delta" and scale_known and steps > 1:
        # the gradients of steps 0..S-1 were taken along theta_0 -> theta_0 + delta; their mean is
        # closest to the gradient at the trajectory's middle, theta_0 + delta * (S - 1) / (2 S)
        mid = (steps - 1) / (2 * steps)
        weight = weight + mid * update.tensors[w_name].detach().double().cpu()
        if bias is not None and b_name is not None:
            bias = bias + mid * update.tensors[b_name].detach().double().cpu()
    return LastLayer(
        weight_name=w_name, bias_name=b_name, weight=weight, bias=bias,
        grad_weight=gw, grad_bias=gb, num_samples=int(update.num_samples),
        scale_known=scale_known, nonnegative_features=nonneg, notes=tuple(notes),
        bias_sum_slack=_rounding_slack(update, gb), pruned="prune" in update.defenses)


def _rounding_slack(update: ClientUpdate, grad_bias: torch.Tensor | None) -> float:
    """The sum's bound under the coarsest ``quantize`` the update records (0 if none, or a bad record).

    ``quantize:b`` rounds each tensor to multiples of its :func:`~gradleak.defenses.quantization_scale`,
    and the largest entry is kept exactly, so the step is known from the bias gradient itself.
    """
    if grad_bias is None or "quantize" not in update.defenses:
        return 0.0
    try:
        parts = recorded_defense(update).parts()
    except UpdateError:  # an update file is untrusted: a malformed record gives no bound
        return 0.0
    bits = [p.bits for p in parts if isinstance(p, QuantizeDefense)]
    return grad_bias.numel() * float(quantization_scale(grad_bias, min(bits))) / 2 if bits else 0.0


def _gradient_factor(update: ClientUpdate) -> tuple[float, bool, list[str]]:
    """Factor turning the update's tensors into a mean gradient, whether it is exact, and caveats."""
    notes: list[str] = []
    if update.defenses:
        notes.append(f"the update passed through defenses ({', '.join(update.defenses)}); label recovery "
                     f"assumes an unmodified gradient, so the labels may be wrong")
    if update.kind == "gradient":
        return 1.0, True, notes
    steps = max(int(update.local_steps), 1)
    if not update.local_lr:
        notes.append("delta without local_lr: only the signs and ratios of the gradient are known")
        return -1.0, False, notes
    if steps > 1:
        notes.append(f"multi-step delta ({steps} local steps): -delta/(lr*steps) is the mean gradient along "
                     f"the local trajectory; label counts are approximate")
    return -1.0 / (float(update.local_lr) * steps), True, notes


def check_softmax_bias(strategy: str, grad_bias: torch.Tensor, *, rtol: float = 1e-3, slack: float = 0.0) -> None:
    """Raise unless the bias gradient sums to zero over classes, as softmax cross-entropy's does.

    Each sample contributes ``p_i - y_i``, whose entries sum to 0. A sum far from 0 means another
    loss, soft labels that do not sum to one, or a defense (noise, pruning, quantization) changed
    the update.

    ``slack`` widens the bound by what a recorded rounding may move the sum
    (:attr:`LastLayer.bias_sum_slack`).

    Raises:
        UpdateError: ``|sum(grad_b)| > rtol * sum(|grad_b|) + slack``.
    """
    total = float(grad_bias.sum())
    mass = float(grad_bias.abs().sum())
    if mass == 0.0:
        raise UpdateError(f"label strategy '{strategy}': expected a non-zero bias gradient, got all zeros")
    if abs(total) > rtol * mass + slack:
        within = f" or within the recorded quantization's bound {slack:.3g}" if slack else ""
        raise UpdateError(
            f"label strategy '{strategy}': expected the bias gradient to sum to 0 over classes{within} (softmax "
            f"cross-entropy, unmodified update), got sum {total:.3g} ({abs(total) / mass:.1%} of its mass)")


def counting_layer(strategy: str, layer: LastLayer) -> tuple[LastLayer, torch.Tensor]:
    """The layer and bias gradient a count strategy (``ilrg``, ``bias-count``) solves with, checked.

    Requires a bias and the gradient's scale, fills a pruned update's zeroed entries back
    (:meth:`LastLayer.for_counts`) and checks that the bias gradient sums to zero within a recorded
    rounding's bound (:func:`check_softmax_bias`).

    Raises:
        UnsupportedModelError: no bias.
        UpdateError: a delta without ``local_lr``, or a bias gradient that does not sum to zero.
    """
    layer.require_bias(strategy)
    layer.require_scale(strategy)
    layer = layer.for_counts()
    _, grad_b = layer.require_bias(strategy)
    check_softmax_bias(strategy, grad_b, slack=layer.bias_sum_slack)
    return layer, grad_b


def require_batch(strategy: str, update: ClientUpdate, *, exactly: int | None = None,
                  at_most: int | None = None) -> int:
    """The update's batch size N, checked against the strategy's range."""
    n = int(update.num_samples)
    if exactly is not None and n != exactly:
        raise UpdateError(f"label strategy '{strategy}': expected a batch of {exactly}, got num_samples={n}")
    if at_most is not None and n > at_most:
        raise UpdateError(f"label strategy '{strategy}': expected at most {at_most} samples, got num_samples={n}")
    return n


def counts_to_labels(counts: torch.Tensor, n: int) -> torch.Tensor:
    """Round non-negative real per-class counts to integers summing to ``n``, as sorted labels.

    Largest-remainder rounding: floor every count, then give the missing units to the classes
    with the largest remainders (or take surplus units from the smallest remainders).

    Args:
        counts: real counts per class, shape (C,); negative values count as 0.
        n: the batch size the integer counts must sum to (>= 0).

    Returns:
        Labels sorted by class, int64, shape (n,).

    Raises:
        UpdateError: ``counts`` is not a finite 1-D tensor, or ``n`` is negative.

    Example:
        >>> counts_to_labels(torch.tensor([1.6, 0.2, 1.2]), 3).tolist()
        [0, 0, 2]
    """
    counts = torch.as_tensor(counts).detach().double().cpu()
    if counts.ndim != 1 or counts.numel() == 0 or not torch.isfinite(counts).all():
        raise UpdateError(f"label counts: expected a finite 1-D tensor, got shape {tuple(counts.shape)}")
    if int(n) < 0:
        raise UpdateError(f"label counts: expected a non-negative batch size, got {n}")
    counts = counts.clamp_min(0)
    base = counts.floor()
    rem = counts - base
    rest = int(n) - int(base.sum().item())
    c = counts.numel()
    while rest > 0:  # more than C missing units only when the counts are far off
        take = min(rest, c)
        base[torch.argsort(rem, descending=True, stable=True)[:take]] += 1
        rem = torch.zeros_like(rem)
        rest -= take
    order = torch.argsort(rem, stable=True).tolist()
    while rest < 0:
        changed = False
        for i in order:
            if rest == 0:
                break
            if base[i] > 0:
                base[i] -= 1
                rest += 1
                changed = True
        if not changed:
            break
    return torch.repeat_interleave(torch.arange(c), base.long())


def label_accuracy(recovered: torch.Tensor, truth: torch.Tensor) -> float:
    """Multiset overlap of recovered and true labels divided by the true batch size.

    Order does not matter: ``[0, 0, 1]`` against ``[1, 0, 2]`` scores 2/3.

    Args:
        recovered: recovered labels, shape (N',).
        truth: true labels, shape (N,).

    Returns:
        A number in [0, 1]; 1.0 for an empty truth.

    Raises:
        UpdateError: negative labels.

    Example:
        >>> label_accuracy(torch.tensor([0, 0, 1]), torch.tensor([1, 0, 2]))
        0.6666666666666666
    """
    recovered = torch.as_tensor(recovered).long().view(-1).cpu()
    truth = torch.as_tensor(truth).long().view(-1).cpu()
    if truth.numel() == 0:
        return 1.0
    if (recovered.numel() and int(recovered.min()) < 0) or int(truth.min()) < 0:
        raise UpdateError("label accuracy: expected non-negative class indices, got a negative label")
    c = int(max(recovered.max().item() if recovered.numel() else 0, truth.max().item())) + 1
    a = torch.bincount(recovered, minlength=c)
    b = torch.bincount(truth, minlength=c)
    return float(torch.minimum(a, b).sum().item() / truth.numel())


def make_result(labels: torch.Tensor, strategy: str, layer: LastLayer, *, warnings: list[str] | None = None,
                info: dict[str, Any] | None = None) -> LabelResult:
    """A :class:`LabelResult` with sorted labels and the layer's caveats first among the warnings."""
    notes = list(layer.notes) + list(warnings or [])
    return LabelResult(labels=torch.sort(labels.long().cpu()).values, strategy=strategy, warnings=notes,
                       info=dict(info or {}))
