"""What an attack matches: the victim's response to candidate images, in the update's own terms.

* FedSGD gradient: the gradient of the mean loss (CI-Net Alg. 1 line 7).
* FedAvg delta: the local training replayed on the candidates, step by step and differentiably
  (Geiping et al. 2020, Section 6), compared with the uploaded weight difference.
* Server aggregate: the candidates are cut into the clients' recorded sample counts and each
  client is replayed (CI-Net appendix C.3: an aggregate acts as one large batch). Recovered labels
  are sorted by class, so which client held which label is not known to the attacker; the
  replay assigns them in order.

When the update records a defense, the adaptive attacker (:mod:`gradleak.attacks.adaptive`, the
default) simulates it on the candidates too, and the matching loss becomes the noise's likelihood
where the defense adds noise; ``adaptive="off"`` is the unaware attacker.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradleak.attacks.adaptive import DefenseModel, check_adaptive, likelihood_distance, stopping_floor
from gradleak.errors import ConfigError, UpdateError
from gradleak.functional import gradient_distance, model_gradients
from gradleak.threat.aggregate import client_updates, simulate_update
from gradleak.types import ClientUpdate

Simulate = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class Matcher:
    """``simulate(images, labels)`` gives tensors comparable with ``target`` (both in parameter order);
    ``distance(loss, simulated)`` is the matching loss between them.

    Args:
        target: the uploaded tensors.
        simulate: the differentiable simulation of the client (and, adaptive, of its defense).
        mode: what is simulated, in words.
        adaptive: what the run records about the attacker's knowledge of the defense.
        likelihood: ``"l2"`` / ``"l1"``: the loss is the recorded noise's likelihood, not the
            attack's configured one.
        floor: the likelihood loss of the true batch (:func:`~gradleak.attacks.adaptive.noise_floor`);
            iterative attacks stop when they reach it.
    """

    target: list[torch.Tensor]
    simulate: Simulate
    mode: str
    adaptive: dict[str, Any] = field(default_factory=lambda: {"requested": "off", "active": False})
    likelihood: str | None = None
    floor: float | None = None
    centering: dict[str, Any] | None = None

    def at_floor(self, value: float) -> bool:
        """Whether a matching loss has reached the noise floor (the attack should stop: below it fits noise)."""
        return self.floor is not None and value <= self.floor

    def distance(self, loss: str, simulated: Sequence[torch.Tensor]) -> torch.Tensor:
        """The matching loss of ``simulated`` against the target (``loss`` unless a likelihood overrides it)."""
        if self.likelihood is not None:
            return likelihood_distance(self.likelihood, simulated, self.target)
        return gradient_distance(loss, simulated, self.target)

    def loss_name(self, loss: str) -> str:
        """The loss :meth:`distance` computes for an attack configured with ``loss``."""
        return f"likelihood-{self.likelihood}" if self.likelihood else loss


def build_matcher(update: ClientUpdate, victim: nn.Module, *, device: torch.device,
                  adaptive: str = "auto") -> Matcher:
    """The matching target and the differentiable simulation of the client for ``update``.

    Args:
        update: the uploaded update (its metadata drives the simulation).
        victim: the attacker's copy of the model, in the client's train/eval mode.
        device: where the target goes.
        adaptive: ``"auto"`` (simulate the recorded defense, if any), ``"on"`` (the same, and an
            update without a recorded defense is refused) or ``"off"`` (the unaware attacker).

    Raises:
        UpdateError: a delta whose local hyperparameters (lr, batch size) are not in the update, or a
            recorded defense that is unknown, lacks its parameters or does not fit the protocol.
        ConfigError: an unknown ``adaptive`` mode, or ``"on"`` for an update without a defense.
    """
    check_adaptive("matching", adaptive)
    if adaptive == "on" and not update.defenses:
        raise ConfigError("adaptive 'on': expected an update that records a defense, got one without; "
                          "use 'auto' to attack defended and undefended updates alike")
    params = [p for p in victim.parameters() if p.requires_grad]
    tensors = [t.to(device) for t in update.gradients()]
    if update.kind == "delta" and not update.local_lr:
        raise UpdateError("delta update: expected its local learning rate (local_lr) in the metadata, got none")
    if update.protocol == "aggregate":
        mode = f"aggregate of {update.num_clients} clients, each replayed"
    elif update.kind == "delta":
        mode = f"fedavg replay of {update.local_steps} local steps"
    else:
        mode = "gradient"
    if adaptive == "off" or not update.defenses:
        info = {"requested": adaptive, "active": False,
                "note": "the update records no defense" if not update.defenses else "unaware: defense ignored"}
        return Matcher(tensors, _plain(update, victim, params), mode, info)
    if update.protocol == "aggregate":
        simulate, likelihood, described = _adaptive_aggregate(update, victim)
    else:
        model = DefenseModel.of(update)
        if model.per_sample_clip is not None and (update.kind != "gradient" or update.protocol != "fedsgd"):
            raise UpdateError(f"update defense 'dpsgd': expected a FedSGD gradient (DP-SGD is one noisy gradient "
                              f"here), got a {update.protocol} {update.kind}")
        plain = _plain(update, victim, params)

        def simulate(images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
            raw = model.simulate(victim, images, labels, lambda: plain(images, labels))
            return model.apply(raw, tensors)

        likelihood, described = model.likelihood, model.describe()
        scale = model.noise_scale(update.num_samples)
        # None also where the noise drowns the signal: no stopping point, the attack runs its budget
        described["noise_floor"] = None if scale is None else stopping_floor(likelihood, scale, tensors)  # type: ignore[arg-type]
    info = {"requested": adaptive, "active": True, **described}
    return Matcher(tensors, simulate, f"{mode}, defense simulated ({described['defense']})", info, likelihood,
                   described.get("noise_floor"))


def noise_mean(simulate: Callable[[torch.Tensor], Sequence[torch.Tensor]], shape: Sequence[int], draws: int, *,
               seed: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """The mean of ``simulate(u)`` over ``draws`` batches ``u`` of uniform noise in [0, 1] of ``shape``.

    The noise comes from a CPU generator seeded by ``seed`` (the same draws on every device), moved to
    ``device``. What :func:`centered` subtracts, and what ``gradleak bench landscape --center`` measures
    against (:func:`gradleak.audit.landscape.gradient_landscape`).
    """
    generator = torch.Generator().manual_seed(seed)
    total: list[torch.Tensor] | None = None
    for _ in range(draws):
        noise = torch.rand(tuple(shape), generator=generator).to(device)
        sim = [t.detach() for t in simulate(noise)]
        total = sim if total is None else [a + b for a, b in zip(total, sim)]
    if total is None:
        raise ConfigError(f"noise_mean: expected at least one noise batch, got {draws}")
    return [t / draws for t in total]


def centered(matcher: Matcher, labels: torch.Tensor, shape: Sequence[int], draws: int, *, seed: int,
             victim: nn.Module) -> Matcher:
    """The matcher with the update's image-independent part taken out of both sides.

    ``center`` is the mean of ``draws`` simulated updates on batches of uniform noise in [0, 1]
    (``shape`` = (N, C, H, W), the recovered ``labels``, seeded by ``seed``): what the update would be
    whatever the images. It is subtracted from the target and from every simulation, so a cosine
    loss compares what the images change. On a victim whose update barely depends on the images
    (ResNet-18-sigmoid with BatchNorm in eval mode on untrained statistics: a mean layer cosine of
    0.9992 between the update and the gradient at pure noise) the plain cosine sees the images in
    its fourth digit; centred on 16 noise batches the same comparison reads 0.95 at 20% noise and
    0.12 at pure noise, the profile of the victims the attacks break (docs/attacks.md). A matcher
    whose loss is a noise likelihood (the defense-aware attacker against additive noise) is returned
    as it is, its ``centering`` saying so: that loss compares the two sides' difference, which a
    common centre leaves unchanged, and its noise floor is in units of the uncentred target. The
    victim's state (BatchNorm running statistics a train-mode draw moves) is put back afterwards.

    Raises:
        ConfigError: ``draws`` < 1, or labels that do not match the batch (an attack that optimises
            its labels jointly has none to centre with).
    """
    if draws < 1:
        raise ConfigError(f"center: expected the number of noise batches to average (>= 1), got {draws}")
    if labels.numel() != shape[0]:
        raise ConfigError(f"center: expected {shape[0]} labels to simulate the noise batches with (recovered or "
                          f"given), got {labels.numel()}; an attack that optimises its labels jointly cannot centre")
    if matcher.likelihood is not None:
        return dataclasses.replace(matcher, centering={
            "draws": 0, "seed": seed, "note": f"not applied: the likelihood-{matcher.likelihood} loss compares "
                                              "the two sides' difference, which a common centre leaves unchanged"})
    state = {k: v.detach().clone() for k, v in victim.state_dict().items()}
    device = matcher.target[0].device
    labels = labels.to(device)
    try:
        with torch.enable_grad():
            center = noise_mean(lambda noise: matcher.simulate(noise, labels), shape, draws, seed=seed,
                                device=device)
    finally:
        victim.load_state_dict(state)
    simulate = matcher.simulate

    def shifted(images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return [s - c for s, c in zip(simulate(images, labels), center)]

    share = math.sqrt(sum(float((t - c).pow(2).sum()) for t, c in zip(matcher.target, center))
                      / max(sum(float(t.pow(2).sum()) for t in matcher.target), 1e-30))
    info = {"draws": draws, "seed": seed, "residual": share,
            "note": "the mean update of noise batches subtracted from the target and every simulation"}
    return dataclasses.replace(matcher, target=[t - c for t, c in zip(matcher.target, center)], simulate=shifted,
                               mode=f"{matcher.mode}, centred on {draws} noise batches", centering=info)


def _plain(update: ClientUpdate, victim: nn.Module, params: Sequence[torch.Tensor]) -> Simulate:
    if update.kind == "gradient" and update.protocol == "fedsgd":
        return lambda images, labels: model_gradients(victim, images, labels, create_graph=True, params=params)
    return lambda images, labels: simulate_update(update, model=victim, images=images, labels=labels,
                                                  create_graph=True)


def _adaptive_aggregate(update: ClientUpdate, victim: nn.Module) -> tuple[Simulate, str | None, dict[str, Any]]:
    """Each client's recorded defense, simulated on its share before the clients are averaged."""
    models: dict[str, DefenseModel] = {}

    def model_of(part: ClientUpdate) -> DefenseModel:
        key = json.dumps([part.defenses, part.metadata.get("defense_params", [])], sort_keys=True, default=str)
        if key not in models:
            models[key] = DefenseModel.of(part)
        return models[key]

    parts = client_updates(update)
    for part in parts:  # every record is checked before the first step
        if model_of(part).per_sample_clip is not None and part.kind != "gradient":
            raise UpdateError(f"aggregate client defense 'dpsgd': expected a FedSGD gradient, got a {part.kind}")

    def client(part: ClientUpdate, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        model = model_of(part)
        raw = model.simulate(victim, images, labels, lambda: simulate_update(
            part, model=victim, images=images, labels=labels, create_graph=True))
        return model.apply(raw, None)  # one client's own upload is not visible in the aggregate

    likelihoods = {model_of(p).likelihood for p in parts} - {None}
    # an average of Laplace noises is no longer Laplace: anything but one client is matched as Gaussian
    likelihood = (likelihoods.pop() if len(parts) == 1 else "l2") if likelihoods else None
    specs = sorted({model_of(p).defense.spec() for p in parts})
    floor = None
    if likelihood is not None:
        weights = [float(c["weight"]) for c in update.metadata["clients"]]
        scales = [model_of(p).noise_scale(p.num_samples) or 0.0 for p in parts]
        if likelihood == "l1":  # one client: its Laplace scale, weighted
            scale = weights[0] * scales[0]
        else:  # the aggregate's noise sum_k w_k n_k has variance sum_k w_k^2 var_k (Laplace: var = 2 b^2)
            scale = math.sqrt(sum(w * w * s * s * (2.0 if model_of(p).likelihood == "l1" else 1.0)
                                  for w, s, p in zip(weights, scales, parts)))
        floor = stopping_floor(likelihood, scale, update.gradients())
    described = {"defense": " / ".join(specs), "per_client": True, "likelihood": likelihood, "noise_floor": floor}
    return (lambda images, labels: simulate_update(update, model=victim, images=images, labels=labels,
                                                   create_graph=True, client=client)), likelihood, described
