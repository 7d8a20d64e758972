"""Pure tensor operations shared by attacks, label recovery and defenses."""

from gradleak.functional.gradients import (
    GRADIENT_DISTANCES,
    cosine_distance,
    gradient_distance,
    l2_distance,
    layer_cosine_distance,
    model_gradients,
    total_variation,
)

__all__ = ["GRADIENT_DISTANCES", "cosine_distance", "gradient_distance", "l2_distance", "layer_cosine_distance",
           "model_gradients", "total_variation"]
