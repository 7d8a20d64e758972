"""Defenses: pure, composable transforms of a client update, registered by kebab-case name.

Registered: ``none``, ``noise`` (Gaussian, sigma), ``laplace`` (scale), ``clip`` (max_norm),
``prune`` (top-k, sparsity), ``quantize`` (bits), ``sign`` and the client-side ``dpsgd``
(noise_multiplier, max_grad_norm, delta, dataset_size, rounds). Build them from strings with
:func:`parse_defense` / :func:`parse_defenses`, chain them with :func:`compose`, and apply them on
the client with :func:`defended_update` (needed for ``dpsgd``).
"""

from gradleak.defenses.base import DEFENSES, ComposeDefense, Defense, IdentityDefense, compose, declare_defense
from gradleak.defenses.client import defended_update
from gradleak.defenses.clip import NormClipDefense, global_norm
from gradleak.defenses.dpsgd import DPSGDDefense, clipped_sum, dpsgd_update, per_sample_gradients, rdp_epsilon
from gradleak.defenses.noise import GaussianNoiseDefense, LaplaceNoiseDefense
from gradleak.defenses.parse import parse_defense, parse_defenses, recorded_defense, split_defenses
from gradleak.defenses.prune import TopKPruneDefense, kept_entries
from gradleak.defenses.quantize import QuantizeDefense, SignDefense, quantization_scale


def available() -> list[str]:
    """Names of the registered defenses."""
    return DEFENSES.available()


__all__ = [
    "DEFENSES",
    "ComposeDefense",
    "DPSGDDefense",
    "Defense",
    "GaussianNoiseDefense",
    "IdentityDefense",
    "LaplaceNoiseDefense",
    "NormClipDefense",
    "QuantizeDefense",
    "SignDefense",
    "TopKPruneDefense",
    "available",
    "clipped_sum",
    "compose",
    "declare_defense",
    "defended_update",
    "dpsgd_update",
    "global_norm",
    "kept_entries",
    "parse_defense",
    "parse_defenses",
    "per_sample_gradients",
    "quantization_scale",
    "rdp_epsilon",
    "recorded_defense",
    "split_defenses",
]
