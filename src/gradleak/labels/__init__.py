"""Label recovery from an update (CI-Net Algorithm 1, line 3): the attacker's y*.

Each strategy is a pure function of the update, the server's model and public metadata (the
batch size); none sees the private batch. ``recover_labels(server, update, strategy="auto")``
picks the best strategy whose assumptions hold and records every fallback as a warning.

Strategies (``LABEL_STRATEGIES``): ``idlg`` (batch of one, Zhao et al. 2020), ``yin`` (unique
labels, Yin et al. 2021), ``llg`` (counts by heuristic, Wainakh et al. 2022), ``ilrg`` (exact counts
with repeats, Ma et al. 2023), ``bias-count`` (counts from a random-image prior) and ``auto``.
"""

from gradleak.labels.last_layer import (
           LABEL_STRATEGIES,
           LabelResult,
           LastLayer,
           counts_to_labels,
           label_accuracy,
           last_layer,
)
from gradleak.labels.recover import AUTO_ORDER, recover_labels

__all__ = ["AUTO_ORDER", "LABEL_STRATEGIES", "LabelResult", "LastLayer", "counts_to_labels", "label_accuracy",
           "last_layer", "recover_labels"]
