"""Server-side aggregation: the server (or an eavesdropper on it) sees the average of K client updates.

The aggregate of K FedSGD gradients, weighted by the clients' sample counts, is exactly the
gradient of the mean loss over all ``K * N`` samples (when no layer couples samples, i.e. without
train-mode BatchNorm), which is why the CI-Net paper treats an aggregate as one large batch and
not as a privacy guarantee (Zhang et al. 2023, appendix C.3). For FedAvg deltas the aggregate is
FedAvg's server step (McMahan et al. 2017, Algorithm 1: ``sum_k n_k / n * delta_k``).

References:
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (sample-weighted averaging).
    Zhang et al., "Generative Gradient Inversion via Over-Parameterized Networks in Federated
    Learning", ICCV 2023, appendix C.3 (aggregates as large batches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from gradleak.errors import ConfigError, UpdateError
from gradleak.functional import model_gradients
from gradleak.threat.fedavg import schedule_of, simulate_local_delta
from gradleak.threat.fedsgd import check_batch, fedsgd_update
from gradleak.types import ClientUpdate, ServerState

Weighting = Literal["samples", "uniform"]
ClientFn = Callable[[ServerState, torch.Tensor, torch.Tensor], ClientUpdate]


class DefenseLike(Protocol):
    """Anything with the defense signature (see :class:`gradleak.defenses.Defense`)."""

    def __call__(self, update: ClientUpdate, *, generator: torch.Generator) -> ClientUpdate: ...


def _common(values: Sequence[Any]) -> Any:
    """The value every client shares, or ``None`` when they differ."""
    return values[0] if all(v == values[0] for v in values) else None


def aggregate_updates(updates: Sequence[ClientUpdate], *, weighting: Weighting = "samples") -> ClientUpdate:
    """Average K client updates into what the server sees.

    With ``weighting="samples"`` (default, FedAvg's rule) client k's weight is ``n_k / sum_j n_j``;
    with ``"uniform"`` every client weighs ``1 / K``. Both agree when clients hold equal amounts
    of data.

    Args:
        updates: K >= 1 updates of one kind (all gradients or all deltas), over the same parameters,
            from the ``fedsgd`` or ``fedavg`` protocol (aggregates of aggregates are refused).
        weighting: ``"samples"`` or ``"uniform"``.

    Returns:
        A ``ClientUpdate`` with ``protocol="aggregate"``, the clients' kind, ``num_samples`` the
        total N, ``num_clients`` K. ``local_steps`` is the largest client's count (so a one-step
        check stays conservative), ``local_lr`` and ``local_batch_size`` the common value or
        ``None`` when clients differ; ``defenses`` lists every defense any client applied, in
        first-seen order. Shared BatchNorm statistics are not aggregated (a secure aggregate hides
        them per client). ``metadata["clients"]`` holds each client's header (without tensors) and
        its weight, in order, so that :func:`simulate_update` can replay each client. When every
        client ran DP-SGD, ``metadata["privacy"]`` holds the weakest client's (epsilon, delta): an
        average is post-processing, so each client's own guarantee still holds, and no better one.

    Raises:
        ConfigError: an unknown weighting, or no updates.
        UpdateError: updates of different kinds, protocols or parameter shapes, or an aggregate
            among the inputs.
    """
    if weighting not in ("samples", "uniform"):
        raise ConfigError(f"aggregate weighting: expected 'samples' or 'uniform', got {weighting!r}")
    if len(updates) == 0:
        raise ConfigError("aggregate: expected at least one client update, got none")
    first = updates[0]
    shapes = {n: tuple(t.shape) for n, t in first.tensors.items()}
    for k, u in enumerate(updates):
        if u.protocol == "aggregate":
            raise UpdateError(f"aggregate: expected client updates (fedsgd or fedavg), got an aggregate at position {k}")
        if u.kind != first.kind or u.protocol != first.protocol:
            raise UpdateError(f"aggregate: expected every update to be a {first.protocol} {first.kind}, got a "
                              f"{u.protocol} {u.kind} at position {k}")
        got = {n: tuple(t.shape) for n, t in u.tensors.items()}
        if got != shapes or list(got) != list(shapes):
            raise UpdateError(f"aggregate: expected the parameters of update 0, got different names or shapes "
                              f"at position {k}")
    total = sum(int(u.num_samples) for u in updates)
    if weighting == "samples":
        weights = [int(u.num_samples) / total for u in updates]
    else:
        weights = [1.0 / len(updates)] * len(updates)
    tensors = {}
    for name in shapes:
        acc = torch.zeros_like(first.tensors[name])
        for w, u in zip(weights, updates):
            acc = acc + w * u.tensors[name].to(acc.device)
        tensors[name] = acc
    defenses: list[str] = []
    for u in updates:
        defenses.extend(d for d in u.defenses if d not in defenses)
    clients = []
    for w, u in zip(weights, updates):
        header = u.meta_dict()
        header.pop("parameters")
        header.pop("buffers")
        clients.append({**header, "weight": w})
    metadata: dict[str, Any] = {"weighting": weighting, "client_protocol": first.protocol, "clients": clients}
    privacy = [u.metadata.get("privacy") for u in updates]
    if all(isinstance(p, dict) for p in privacy):
        # averaging is post-processing: each client keeps its own guarantee; report the weakest one
        eps = [p.get("epsilon") for p in privacy]  # type: ignore[union-attr]
        worst = None if any(e is None for e in eps) else max(eps)
        metadata["privacy"] = {"epsilon": worst, "delta": max(p["delta"] for p in privacy),  # type: ignore[index]
                               "accountant": "rdp", "scope": "per client (the weakest client's guarantee)"}
    return ClientUpdate(
        tensors=tensors,
        kind=first.kind,
        num_samples=total,
        protocol="aggregate",
        local_steps=max(int(u.local_steps) for u in updates),
        local_lr=_common([u.local_lr for u in updates]),
        local_batch_size=_common([u.local_batch_size for u in updates]),
        num_clients=sum(int(u.num_clients) for u in updates),
        defenses=tuple(defenses),
        metadata=metadata,
    )


def simulate_clients(
    server: ServerState,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_clients: int,
    client: ClientFn = fedsgd_update,
    defense: DefenseLike | None = None,
    generator: torch.Generator | None = None,
    weighting: Weighting = "samples",
) -> ClientUpdate:
    """Simulate K clients, each holding its own share of ``images``, and return their aggregate.

    The batch is cut into K contiguous shares whose sizes differ by at most one (client k holds
    ``images[start_k:stop_k]``); each client computes ``client(server, share, share_labels)``, then
    ``defense(update, generator=generator)`` when a defense is given, and the server averages them
    with :func:`aggregate_updates`.

    Args:
        server: the global model (not modified).
        images: all clients' data, shape (K*N, C, H, W), range [0, 1].
        labels: shape (K*N,).
        num_clients: K, between 1 and the number of images.
        client: the client protocol, e.g. ``fedsgd_update`` or
            ``functools.partial(fedavg_update, local_steps=5, lr=0.1, batch_size=4)``.
        defense: a transform applied by every client to its own update (e.g. from
            :func:`gradleak.defenses.parse_defense`).
        generator: randomness of the defense; required when ``defense`` is given.
        weighting: see :func:`aggregate_updates`.

    Returns:
        The aggregate update (``protocol="aggregate"``, ``num_clients=K``).

    Raises:
        ConfigError: K outside ``[1, N]``, or a defense without a generator.
        DataError: the batch does not fit the model.
    """
    check_batch(server, images, labels)
    n = int(images.shape[0])
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or not 1 <= num_clients <= n:
        raise ConfigError(f"num_clients: expected an integer in [1, {n}] (the number of images), got {num_clients!r}")
    if defense is not None and generator is None:
        raise ConfigError("simulate_clients: expected a torch.Generator for the defense, got None")
    updates = []
    for share_x, share_y in zip(torch.tensor_split(images, num_clients), torch.tensor_split(labels, num_clients)):
        update = client(server, share_x, share_y)
        if defense is not None:
            update = defense(update, generator=generator)  # type: ignore[arg-type]
        updates.append(update)
    return aggregate_updates(updates, weighting=weighting)


def client_updates(update: ClientUpdate) -> list[ClientUpdate]:
    """An aggregate's clients as the server knows them: each recorded header, with the aggregate's tensors.

    The tensors are the aggregate's (no client's own tensors reach the server); the header holds
    the client's protocol, sample count, local hyperparameters and recorded defenses.

    Raises:
        UpdateError: ``update`` is not an aggregate, or its per-client metadata is missing or
            does not sum to its ``num_samples``.
    """
    clients = update.metadata.get("clients")
    if update.protocol != "aggregate":
        raise UpdateError(f"client updates: expected an aggregate, got a {update.protocol} update")
    if (not isinstance(clients, list) or not clients or not all(isinstance(c, dict) for c in clients)
            or sum(int(c.get("num_samples", 0)) for c in clients) != update.num_samples):
        raise UpdateError("simulate: expected an aggregate with per-client metadata ('clients') summing to "
                          f"{update.num_samples} samples, got {clients!r:.80}")
    try:
        return [ClientUpdate(tensors=update.tensors, kind=c["kind"], num_samples=int(c["num_samples"]),
                             protocol=c["protocol"], local_steps=int(c["local_steps"]), local_lr=c["local_lr"],
                             local_batch_size=c["local_batch_size"], defenses=tuple(c.get("defenses", ())),
                             metadata=c.get("metadata", {})) for c in clients]
    except KeyError as e:
        raise UpdateError(f"aggregate client header: expected the field {e}, got a header without it") from None


def simulate_update(
    update: ClientUpdate,
    *,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    create_graph: bool = True,
    client: Callable[[ClientUpdate, torch.Tensor, torch.Tensor], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """What ``update``'s protocol would produce from candidate ``(images, labels)``, differentiably.

    This is the forward model of a gradient-matching attack under any protocol: a FedSGD gradient
    (:func:`gradleak.functional.model_gradients`), a FedAvg delta replaying the recorded local
    steps (:func:`simulate_local_delta` with :func:`schedule_of`), or an aggregate, where the
    candidates are cut into the clients' recorded sample counts, in order, each client is replayed,
    and the results are combined with the recorded weights. Defenses are not simulated.

    Args:
        update: the observed update (its metadata drives the simulation).
        model: the global model (used in its current train/eval mode; not modified).
        images: candidates, shape (update.num_samples, C, H, W).
        labels: class indices (N,) or probability vectors (N, C).
        create_graph: keep the graph so the result can be differentiated w.r.t. ``images``.
        client: replaces the simulation of each single client's update (the adaptive attacker
            passes one that also simulates the client's recorded defense); an aggregate's clients
            get their own header, recorded defenses included.

    Returns:
        One tensor per trainable parameter, comparable with ``update.gradients()``.

    Raises:
        UpdateError: the candidate count differs from ``update.num_samples``, or an aggregate
            lacks its per-client metadata.
    """
    if int(images.shape[0]) != update.num_samples:
        raise UpdateError(f"simulate: expected {update.num_samples} candidate images (the update's num_samples), "
                          f"got {int(images.shape[0])}")
    if update.protocol == "aggregate":
        parts = client_updates(update)
        total: list[torch.Tensor] | None = None
        start = 0
        for c, part in zip(update.metadata["clients"], parts):
            stop = start + int(c["num_samples"])
            out = simulate_update(part, model=model, images=images[start:stop], labels=labels[start:stop],
                                  create_graph=create_graph, client=client)
            weighted = [float(c["weight"]) * t for t in out]
            total = weighted if total is None else [a + b for a, b in zip(total, weighted)]
            start = stop
        return total  # type: ignore[return-value]
    if client is not None:
        return client(update, images, labels)
    if update.kind == "gradient":
        grads = model_gradients(model, images, labels, create_graph=create_graph)
        return grads if create_graph else [g.detach() for g in grads]
    if update.local_lr is None:
        raise UpdateError("simulate: expected a FedAvg delta with its local_lr, got local_lr=None")
    return simulate_local_delta(model, images, labels, local_steps=update.local_steps, lr=float(update.local_lr),
                                batch_size=int(update.local_batch_size or update.num_samples),
                                create_graph=create_graph, schedule=schedule_of(update))
