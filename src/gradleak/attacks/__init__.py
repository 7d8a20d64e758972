"""Gradient-inversion attacks behind one interface.

    attack = gradleak.attacks.create("cinet", {"iterations": 700})
    rec = attack.reconstruct(server_state, update)
"""

from gradleak.attacks.analytic import AnalyticAttack, AnalyticConfig
from gradleak.attacks.base import ATTACKS, Attack, Progress, available, create, supports_adaptive, target_gradients
from gradleak.attacks.cinet import CINetAttack, CINetConfig
from gradleak.attacks.gias import GIASAttack, GIASConfig
from gradleak.attacks.imprint import ImprintAttack, ImprintConfig, SparseImprintAttack
from gradleak.attacks.layerwise import LayerwiseAttack, LayerwiseConfig
from gradleak.attacks.optimization import (
    DLGAttack,
    DLGConfig,
    IDLGAttack,
    IGConfig,
    InvertingGradientsAttack,
    OptimizationAttack,
    OptimizationConfig,
)
from gradleak.attacks.trap import TrapAttack, TrapConfig

__all__ = ["ATTACKS", "AnalyticAttack", "AnalyticConfig", "Attack", "CINetAttack", "CINetConfig", "DLGAttack",
           "DLGConfig", "GIASAttack", "GIASConfig", "IDLGAttack", "ImprintAttack", "ImprintConfig", "IGConfig", "InvertingGradientsAttack", "LayerwiseAttack", "LayerwiseConfig", "OptimizationAttack",
           "OptimizationConfig", "Progress", "SparseImprintAttack", "TrapAttack", "TrapConfig", "available", "create", "supports_adaptive", "target_gradients"]
