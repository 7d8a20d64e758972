"""FedAvg: the client runs S local SGD steps (or E epochs) and uploads the weight difference.

The update is ``delta = theta_S - theta_0`` where ``theta_{s+1} = theta_s - lr * grad L_{B_s}(theta_s)``
and ``L_{B_s}`` is the mean cross-entropy over mini-batch ``B_s`` of the client's N samples
(McMahan et al. 2017, Algorithm 1, ``ClientUpdate``). The mini-batch order is a deterministic
function of ``(N, batch_size, steps, shuffle_seed)`` (:func:`local_schedule`) and is written into
the update's metadata, so an attacker can replay the same local steps on its candidate images
(:func:`simulate_local_delta`), as Inverting Gradients does for multi-step updates (Geiping et al.
2020, Section 6).

References:
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (FedAvg).
    Geiping et al., "Inverting Gradients - How easy is it to break privacy in federated learning?",
    NeurIPS 2020, Section 6 (inverting multi-step local updates by unrolling the local SGD steps).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradleak.errors import ConfigError
from gradleak.threat import batchnorm
from gradleak.threat.fedsgd import check_batch
from gradleak.types import ClientUpdate, ServerState

Schedule = list[list[int]]


def local_schedule(
    num_samples: int,
    *,
    batch_size: int,
    local_steps: int | None = None,
    epochs: int | None = None,
    shuffle_seed: int | None = 0,
) -> Schedule:
    """The mini-batch order of local training: one list of sample indices per local step.

    Each epoch visits every sample once, in the order of a permutation drawn from a CPU
    ``torch.Generator`` seeded with ``shuffle_seed + epoch`` (identity order when ``shuffle_seed`` is
    ``None``), cut into consecutive mini-batches of ``batch_size``; the last mini-batch of an epoch
    holds the remainder, as a ``DataLoader`` with ``drop_last=False`` does. With ``local_steps`` the
    epochs repeat until that many steps are taken (the last epoch may be cut short).

    Args:
        num_samples: the client's number of samples N.
        batch_size: local mini-batch size B (a B larger than N gives full-batch steps).
        local_steps: number of local steps S; exactly one of ``local_steps`` and ``epochs``.
        epochs: number of local epochs E (``ceil(N / B)`` steps each).
        shuffle_seed: seed of the per-epoch permutations; ``None`` keeps the data order.

    Returns:
        ``S`` lists of indices in ``[0, N)``.

    Raises:
        ConfigError: both or neither of ``local_steps``/``epochs``, or a non-positive value.

    Example:
        >>> local_schedule(5, batch_size=2, local_steps=4, shuffle_seed=None)
        [[0, 1], [2, 3], [4], [0, 1]]
    """
    if (local_steps is None) == (epochs is None):
        raise ConfigError(f"local training: expected exactly one of local_steps and epochs, got "
                          f"local_steps={local_steps}, epochs={epochs}")
    for what, value in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("local_steps", local_steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"local training {what}: expected a positive integer, got {value!r}")
    per_epoch = math.ceil(num_samples / batch_size)
    total = local_steps if local_steps is not None else per_epoch * int(epochs)  # type: ignore[arg-type]
    schedule: Schedule = []
    epoch = 0
    while len(schedule) < total:
        if shuffle_seed is None:
            order = list(range(num_samples))
        else:
            g = torch.Generator().manual_seed(int(shuffle_seed) + epoch)
            order = torch.randperm(num_samples, generator=g).tolist()
        for start in range(0, num_samples, batch_size):
            if len(schedule) == total:
                break
            schedule.append(order[start:start + batch_size])
        epoch += 1
    return schedule


def _check_local(lr: float, schedule: Sequence[Sequence[int]], num_samples: int) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"local learning rate: expected a positive finite number, got {lr!r}")
    if len(schedule) == 0:
        raise ConfigError("local schedule: expected at least one mini-batch, got none")
    for step, batch in enumerate(schedule):
        if len(batch) == 0 or min(batch) < 0 or max(batch) >= num_samples:
            raise ConfigError(f"local schedule step {step}: expected non-empty indices in [0, {num_samples}), "
                              f"got {list(batch)[:8]}")


def fedavg_update(
    server: ServerState,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    local_steps: int | None = None,
    epochs: int | None = None,
    lr: float,
    batch_size: int,
    shuffle_seed: int | None = 0,
    share_bn_stats: bool = False,
) -> ClientUpdate:
    """The FedAvg update of a client holding ``(images, labels)``: ``theta_S - theta_0``.

    Local training is plain SGD (no momentum, no weight decay) on the mean cross-entropy of each
    mini-batch, on a copy of the server model in ``server.bn_mode``; the server model is not
    modified. Only trainable parameters are in the update's tensors; the BatchNorm running
    statistics, which the copy updates in train mode, are uploaded only with ``share_bn_stats``.

    Args:
        server: the global model and its public metadata.
        images: the client's data, shape (N, C, H, W), range [0, 1].
        labels: its labels, shape (N,), int64 in [0, C).
        local_steps: number of local SGD steps S (exactly one of ``local_steps`` and ``epochs``).
        epochs: number of local epochs E.
        lr: local learning rate.
        batch_size: local mini-batch size B.
        shuffle_seed: seed of the mini-batch order (:func:`local_schedule`); ``None`` keeps the
            data order.
        share_bn_stats: also upload the change of the BatchNorm running statistics, as a client
            that sends its whole ``state_dict`` does (:attr:`ClientUpdate.buffers`).

    Returns:
        A ``ClientUpdate`` with ``kind="delta"``, ``protocol="fedavg"``, ``num_samples=N``, the
        local hyperparameters in its fields, and ``metadata`` holding ``num_samples``,
        ``local_steps``, ``local_lr``, ``local_batch_size``, ``epochs``, ``shuffle_seed`` and
        ``schedule`` (the mini-batch order as lists of indices).

    Raises:
        DataError: the batch does not fit the model.
        ConfigError: invalid local hyperparameters.

    Example:
        >>> from gradleak.models import build_model
        >>> from gradleak.types import ModelSpec
        >>> spec = ModelSpec("linear", image_size=8)
        >>> server = ServerState.from_spec(build_model(spec), spec)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> u = fedavg_update(server, x, y, local_steps=3, lr=0.1, batch_size=2)
        >>> u.kind, u.protocol, u.local_steps, u.metadata["schedule"]
        ('delta', 'fedavg', 3, [[0, 1], [3, 2], [1, 3]])
    """
    check_batch(server, images, labels)
    n = int(images.shape[0])
    schedule = local_schedule(n, batch_size=batch_size, local_steps=local_steps, epochs=epochs,
                              shuffle_seed=shuffle_seed)
    _check_local(lr, schedule, n)
    model = copy.deepcopy(server.model)
    model.train(server.bn_mode == "train")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=float(lr), momentum=0.0, weight_decay=0.0)
    stats_before = batchnorm.snapshot(model)
    for batch in schedule:
        index = torch.as_tensor(batch, device=images.device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[index]), labels[index])
        loss.backward()
        optimizer.step()
    tensors = {name: (p.detach() - b).clone() for (name, p), b in zip(named, before)}
    shared = batchnorm.changes(model, stats_before) if share_bn_stats else {}
    metadata = {
        "num_samples": n,
        "local_steps": len(schedule),
        "local_lr": float(lr),
        "local_batch_size": int(batch_size),
        "epochs": epochs,
        "shuffle_seed": shuffle_seed,
        "schedule": [list(b) for b in schedule],
    }
    return ClientUpdate(tensors=tensors, kind="delta", num_samples=n, protocol="fedavg",
                        local_steps=len(schedule), local_lr=float(lr), local_batch_size=int(batch_size),
                        metadata=metadata, buffers=shared)


def simulate_local_delta(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    local_steps: int,
    lr: float,
    batch_size: int,
    create_graph: bool = True,
    shuffle_seed: int | None = 0,
    schedule: Sequence[Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    """Differentiable replay of FedAvg's local training: ``theta_S - theta_0`` as a function of the images.

    The parameters are plain tensors threaded through ``torch.func.functional_call``, so with
    ``create_graph=True`` the result can be backpropagated to ``images`` (and to soft ``labels``)
    through all S steps; the model's own parameters and buffers are never modified (BatchNorm
    buffers are cloned). The model's train/eval mode is used as it is.

    Given the same schedule (by default the one :func:`local_schedule` derives from ``local_steps``,
    ``batch_size`` and ``shuffle_seed``, which matches :func:`fedavg_update` called with
    ``local_steps``; pass ``schedule=update.metadata["schedule"]`` for an update made from ``epochs``),
    the result equals :func:`fedavg_update`'s tensors up to float rounding.

    Args:
        model: the global model as the server sent it.
        images: candidate images, shape (N, C, H, W).
        labels: class indices (N,) or probability vectors (N, C).
        local_steps: number of local steps S.
        lr: local learning rate.
        batch_size: local mini-batch size B.
        create_graph: keep the graph of every step (needed to differentiate w.r.t. ``images``);
            ``False`` returns a detached result at a fraction of the memory.
        shuffle_seed: seed of the mini-batch order, as in :func:`fedavg_update`.
        schedule: an explicit mini-batch order (lists of indices); overrides ``shuffle_seed`` and
            must have ``local_steps`` entries.

    Returns:
        One tensor per trainable parameter, in ``named_parameters`` order.

    Raises:
        ConfigError: invalid hyperparameters, or a schedule that does not fit.
    """
    n = int(images.shape[0])
    if schedule is None:
        schedule = local_schedule(n, batch_size=batch_size, local_steps=local_steps, shuffle_seed=shuffle_seed)
    elif len(schedule) != local_steps:
        raise ConfigError(f"local schedule: expected {local_steps} mini-batches (local_steps), got {len(schedule)}")
    _check_local(lr, schedule, n)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    start = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    current = {name: t.clone().requires_grad_(True) for name, t in start.items()}
    for batch in schedule:
        index = torch.as_tensor(list(batch), device=images.device)
        logits = functional_call(model, ({**frozen, **current}, buffers), (images[index],))
        loss = F.cross_entropy(logits, labels[index])
        raw = torch.autograd.grad(loss, [current[k] for k in trainable], create_graph=create_graph, allow_unused=True)
        # a parameter the forward pass does not use gets no gradient; SGD leaves it where it is
        grads = [torch.zeros_like(current[k]) if g is None else g for k, g in zip(trainable, raw)]
        if create_graph:
            current = {k: current[k] - lr * g for k, g in zip(trainable, grads)}
        else:
            current = {k: (current[k] - lr * g).detach().requires_grad_(True) for k, g in zip(trainable, grads)}
    delta = [current[k] - start[k] for k in trainable]
    return delta if create_graph else [d.detach() for d in delta]


def schedule_of(update: ClientUpdate) -> Schedule:
    """The mini-batch order behind a FedAvg ``update``: its recorded schedule, else the one its
    ``shuffle_seed`` (default 0), ``local_steps`` and ``local_batch_size`` imply.

    Raises:
        ConfigError: the update is not a FedAvg delta, or lacks its batch size.
    """
    if update.protocol != "fedavg" or update.kind != "delta":
        raise ConfigError(f"schedule: expected a FedAvg delta, got protocol {update.protocol!r}, kind {update.kind!r}")
    recorded = update.metadata.get("schedule")
    if recorded is not None:
        return [list(map(int, b)) for b in recorded]
    if update.local_batch_size is None:
        raise ConfigError("schedule: expected the update to record local_batch_size or a schedule, got neither")
    if "shuffle_seed" not in update.metadata and int(update.local_batch_size) < update.num_samples:
        warnings.warn("FedAvg delta: it records neither its mini-batch schedule nor its shuffle seed; the local "
                      "steps are replayed in the order of shuffle seed 0, an assumption (a wrong order weakens "
                      "the attack)", UserWarning, stacklevel=2)
    return local_schedule(update.num_samples, batch_size=int(update.local_batch_size),
                          local_steps=update.local_steps, shuffle_seed=update.metadata.get("shuffle_seed", 0))
