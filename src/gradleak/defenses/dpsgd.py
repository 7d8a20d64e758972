"""DP-SGD on the client: per-sample gradient clipping plus Gaussian noise, with its (epsilon, delta).

The client computes each sample's gradient g_i (Opacus' ``GradSampleModule`` on a copy of the
model), clips it to norm C, sums, adds N(0, (sigma*C)^2) noise and divides by the batch size N:

    g = (sum_i g_i * min(1, C / (||g_i|| + 1e-6)) + N(0, sigma^2 C^2 I)) / N

exactly as Opacus' ``DPOptimizer`` does (same clip factor, same ``torch.normal`` draws in parameter
order), and uploads g as a FedSGD gradient. The privacy spent is computed by Opacus' RDP accountant
(Mironov 2017) for ``rounds`` such steps at sampling rate ``q = N / dataset_size`` (1 when the
client uses all its data). Note that the accountant's amplification by subsampling assumes the
batch was Poisson-sampled at rate q; gradleak takes the batch it is given.

Per-sample gradients are undefined when BatchNorm in train mode couples the samples, so such
models are refused (Opacus refuses them too). BatchNorm in eval mode is accepted: Opacus refuses
any layer with buffers, so those models get their per-sample gradients from ``torch.func``.

References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1.
    Mironov, "Renyi Differential Privacy", CSF 2017.
    Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradleak.defenses.base import DEFENSES, Defense, check_generator, check_number, record
from gradleak.errors import ConfigError, UnsupportedModelError
from gradleak.threat.fedsgd import check_batch
from gradleak.types import ClientUpdate, ServerState

logger = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def rdp_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float | None:
    """Epsilon of ``steps`` subsampled-Gaussian steps by Opacus' RDP accountant (``None`` when sigma = 0).

    Raises:
        ImportError: Opacus is not installed.
    """
    if noise_multiplier == 0:
        return None
    RDPAccountant = _opacus().accountants.RDPAccountant
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta=delta))


def _opacus() -> Any:
    try:
        import opacus
        import opacus.accountants
        import opacus.grad_sample
    except ImportError as e:  # an optional import in spirit: only DP-SGD needs it
        raise ImportError("DP-SGD needs Opacus: pip install opacus==1.6.0") from e
    return opacus


def per_sample_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                         method: str = "auto", create_graph: bool = False) -> list[torch.Tensor]:
    """Each sample's gradient of its own cross-entropy, shape (N, *param.shape) per trainable parameter.

    ``method="opacus"`` uses Opacus' ``GradSampleModule`` on a deep copy of ``model`` (its hooks
    never touch ``model``); Opacus refuses layers with buffers, so for models with eval-mode
    BatchNorm ``"auto"`` falls back to ``"functorch"``: ``torch.func.vmap`` of ``torch.func.grad``
    over ``functional_call`` with the buffers held constant. The model's train/eval mode is used.
    ``create_graph=True`` keeps the result differentiable w.r.t. ``images`` (the adaptive attacker
    simulates DP-SGD's per-sample clipping on its candidates); it always uses ``torch.func``.
    ``labels`` are class indices (N,) or probability vectors (N, C).

    Raises:
        UnsupportedModelError: the model has BatchNorm in train mode.
        ConfigError: an unknown ``method``, or ``"opacus"`` for a model with buffers.
    """
    if method not in ("auto", "opacus", "functorch"):
        raise ConfigError(f"per-sample gradients method: expected 'auto', 'opacus' or 'functorch', got {method!r}")
    coupled = [name for name, m in model.named_modules() if isinstance(m, _BATCHNORMS) and m.training]
    if coupled:
        raise UnsupportedModelError(
            f"dpsgd: expected no BatchNorm in train mode (it couples the samples, so per-sample gradients are "
            f"undefined), got {len(coupled)} such layers (first: '{coupled[0]}'); use bn_mode='eval' or a model "
            "without BatchNorm")
    has_buffers = any(True for _ in model.buffers())
    if method == "opacus" and has_buffers:
        raise ConfigError("per-sample gradients method 'opacus': expected a model without buffers "
                          "(Opacus refuses them), got one with buffers; use method='functorch'")
    # Opacus only records activations of modules in training mode, so an eval-mode model
    # (``bn_mode="eval"``) goes through torch.func as well.
    if method == "opacus" and not model.training:
        raise ConfigError("per-sample gradients method 'opacus': expected a model in training mode "
                          "(Opacus ignores eval-mode modules), got eval mode; use method='functorch'")
    if create_graph and method == "opacus":
        raise ConfigError("per-sample gradients method 'opacus': expected create_graph=False (Opacus' hooks "
                          "are not differentiable), got True; use method='functorch'")
    if create_graph or method == "functorch" or (method == "auto" and (has_buffers or not model.training)):
        return _functorch_per_sample(model, images, labels, create_graph=create_graph)
    gsm_cls = _opacus().grad_sample.GradSampleModule
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.grad = None
    gsm = gsm_cls(work, batch_first=True, loss_reduction="sum", strict=True)
    with warnings.catch_warnings():
        # Opacus' hooks fire on module outputs because the images do not require grad: expected here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        loss = F.cross_entropy(gsm(images), labels, reduction="sum")
        loss.backward()
    grads = [p.grad_sample.detach().clone() for p in work.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    gsm.remove_hooks()
    return grads


def _functorch_per_sample(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                          create_graph: bool = False) -> list[torch.Tensor]:
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, ({**frozen, **params}, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(trainable, images, labels)
    return [grads[n] if create_graph else grads[n].detach() for n in trainable]


def clipped_sum(samples: list[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """``sum_i g_i * min(1, C / (||g_i|| + 1e-6))`` per parameter, ``||g_i||`` over all parameters.

    Opacus' ``DPOptimizer`` clip factor; differentiable when ``samples`` are (the adaptive attacker
    runs it on its candidates' per-sample gradients).

    Shape:
        samples: one (N, *param.shape) tensor per parameter; returns one param-shaped tensor each.
    """
    n = int(samples[0].shape[0])
    norms = torch.stack([g.reshape(n, -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", factor.to(g.dtype), g) for g in samples]


def dpsgd_update(
    server: ServerState,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    delta: float = 1e-5,
    dataset_size: int | None = None,
    rounds: int = 1,
) -> ClientUpdate:
    """The FedSGD update of a client that trains with DP-SGD (one clipped, noised gradient).

    Args:
        server: the global model (not modified) and its metadata; in ``bn_mode="eval"`` if the
            model has BatchNorm.
        images: the private batch, shape (N, C, H, W), range [0, 1].
        labels: shape (N,), int64.
        max_grad_norm: per-sample clipping bound C > 0.
        noise_multiplier: sigma >= 0; the noise's std is ``sigma * C`` on the sum of clipped gradients.
        generator: source of the noise (the device of the noise draw is the generator's).
        delta: the delta of the reported (epsilon, delta), in (0, 1).
        dataset_size: the client's dataset size, for the sampling rate ``N / dataset_size``; default N.
        rounds: how many such updates the accounting covers (e.g. FL rounds on the same data).

    Returns:
        A ``ClientUpdate`` (``kind="gradient"``, ``protocol="fedsgd"``, ``defenses=("dpsgd",)``) with
        ``metadata["privacy"] = {"epsilon", "delta", "accountant": "rdp", "sample_rate", "steps"}``
        (epsilon ``None`` when sigma is 0) and the parameters in ``metadata["defense_params"]``.

    Raises:
        ConfigError: a parameter out of range.
        DataError: the batch does not fit the model.
        UnsupportedModelError: BatchNorm in train mode.
    """
    defense = DPSGDDefense(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta,
                           dataset_size=dataset_size, rounds=rounds)
    return defense.client_update(server, images, labels, generator=generator)


@DEFENSES.register("dpsgd")
@dataclass(frozen=True)
class DPSGDDefense(Defense):
    """DP-SGD as a defense setting (``dpsgd:1.0`` is sigma = 1 with C = 1); see :func:`dpsgd_update`.

    It needs the private batch, so it is client-side: apply it with :meth:`client_update` or
    :func:`gradleak.defenses.defended_update`; calling it on a finished update raises.

    Args:
        noise_multiplier: sigma >= 0.
        max_grad_norm: per-sample clipping bound C > 0.
        delta: delta of the reported (epsilon, delta), in (0, 1).
        dataset_size: the client's dataset size (sampling rate N / dataset_size); default N.
        rounds: number of updates the accounting covers, >= 1.
    """

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    dataset_size: int | None = None
    rounds: int = 1
    name: ClassVar[str] = "dpsgd"
    client_side: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_number(self.name, "noise_multiplier", self.noise_multiplier, low=0.0)
        check_number(self.name, "max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_number(self.name, "delta", self.delta, low=0.0, high=1.0, low_open=True)
        check_number(self.name, "rounds", self.rounds, low=1, integer=True)
        if self.dataset_size is not None:
            check_number(self.name, "dataset_size", self.dataset_size, low=1, integer=True)

    def transform(self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise ConfigError(self._client_side_message())

    def __call__(self, update: ClientUpdate, *, generator: torch.Generator) -> ClientUpdate:
        raise ConfigError(self._client_side_message())

    def _client_side_message(self) -> str:
        return (f"defense '{self.spec()}': expected the client's private batch (per-sample clipping), got a "
                "finished update; use gradleak.defenses.defended_update(server, images, labels, defense=...) "
                "or dpsgd_update(...)")

    def client_update(self, server: ServerState, images: torch.Tensor, labels: torch.Tensor, *,
                      generator: torch.Generator) -> ClientUpdate:
        """Run one DP-SGD gradient computation on the private batch; see :func:`dpsgd_update`."""
        check_generator(generator)
        check_batch(server, images, labels)
        n = int(images.shape[0])
        if self.dataset_size is not None and self.dataset_size < n:
            raise ConfigError(f"defense 'dpsgd' dataset_size: expected at least the batch size {n}, "
                              f"got {self.dataset_size}")
        model = copy.deepcopy(server.model)
        model.train(server.bn_mode == "train")
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        samples = per_sample_gradients(model, images, labels)
        std = self.noise_multiplier * self.max_grad_norm
        tensors = {}
        for name, summed in zip(names, clipped_sum(samples, self.max_grad_norm)):
            if std > 0:
                noise = torch.normal(mean=0.0, std=std, size=summed.shape, generator=generator,
                                     device=generator.device).to(summed.device, summed.dtype)
                summed = summed + noise
            tensors[name] = summed / n
        sample_rate = n / self.dataset_size if self.dataset_size is not None else 1.0
        epsilon = rdp_epsilon(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate,
                              steps=self.rounds, delta=self.delta)
        logger.debug("dpsgd: N=%d sigma=%g C=%g epsilon=%s", n, self.noise_multiplier, self.max_grad_norm, epsilon)
        plain = ClientUpdate(tensors=tensors, kind="gradient", num_samples=n, protocol="fedsgd")
        privacy = {"epsilon": epsilon, "delta": self.delta, "accountant": "rdp", "sample_rate": sample_rate,
                   "steps": self.rounds}
        updated = record(plain, self, tensors, epsilon=epsilon, sample_rate=sample_rate)
        return updated.replace(metadata={**updated.metadata, "privacy": privacy})

