"""The client side of federated learning: what a client computes and uploads, and its files."""

from gradleak.threat.aggregate import aggregate_updates, client_updates, simulate_clients, simulate_update
from gradleak.threat.fedavg import fedavg_update, local_schedule, schedule_of, simulate_local_delta
from gradleak.threat.fedsgd import fedsgd_update
from gradleak.threat.io import (
    load_model_state,
    load_truth,
    load_update,
    load_victim,
    save_model_state,
    save_truth,
    save_update,
)

__all__ = [
    "aggregate_updates",
    "fedavg_update",
    "fedsgd_update",
    "load_model_state",
    "load_truth",
    "load_update",
    "load_victim",
    "local_schedule",
    "save_model_state",
    "save_truth",
    "save_update",
    "schedule_of",
    "simulate_clients",
    "simulate_local_delta",
    "simulate_update",
    "client_updates",
]
