"""Yin et al. (GradInversion): unique labels of a batch from the last layer's weight gradient.

Row c of ``N * dL/dW`` is ``sum_i (p_ic - y_ic) z_i``. With non-negative features ``z_i``
(ReLU/sigmoid before the last layer) the row of a class absent from the batch is a sum of
non-negative vectors, while the row of a present class subtracts that sample's features and
usually has negative entries, and in any case a smaller minimum. Yin et al. (2021, Sec. 3.2, "batch label restoration") take the
N classes whose rows have the most negative minimum:

    y_hat = argsort_c( min_m dL/dW[c, m] )[:N].

References:
    Yin, Mallya, Vahdat, Alvarez, Kautz and Molchanov, "See through Gradients: Image Batch
    Recovery via GradInversion", CVPR 2021.
"""

from __future__ import annotations

from gradleak.errors import UpdateError
from gradleak.labels.last_layer import LABEL_STRATEGIES, LabelResult, LastLayer, last_layer, make_result, require_batch
from gradleak.types import ClientUpdate, ServerState


@LABEL_STRATEGIES.register("yin")
def yin(server: ServerState, update: ClientUpdate, *, layer: LastLayer | None = None) -> LabelResult:
    """Recover N unique labels (Yin et al. 2021).

    Assumptions: every label in the batch is different (so N <= C, checked); the last layer's
    inputs are non-negative (checked on probe images); one gradient or a delta (signs suffice, so
    ``local_lr`` is not needed). Then no absent class has a negative weight-gradient entry, so more
    than N such classes mean a larger batch than declared or a modified update, and raise. Fewer
    than N happen with unique labels too (a present class whose features the other samples'
    softmax terms outweigh): the remaining labels are Yin's rule, the classes with the smallest
    row minimum, and a warning says so, since with repeated labels they are wrong.

    Args:
        server: the model the update was computed on.
        update: the client's update; ``num_samples`` is N.
        layer: the result of :func:`~gradleak.labels.last_layer.last_layer`, when already computed.

    Returns:
        A :class:`~gradleak.labels.LabelResult` with N distinct labels.

    Raises:
        UpdateError: N > C, or more than N classes with a negative entry.
        UnsupportedModelError: no final ``nn.Linear``, or possibly negative features.
    """
    layer = layer or last_layer(server, update)
    n = require_batch("yin", update, at_most=layer.num_classes)
    layer.require_nonnegative_features("yin")
    row_min = layer.grad_weight.min(dim=1).values
    negative = int((row_min < 0).sum())
    if negative > n:
        raise UpdateError(
            f"label strategy 'yin': expected at most {n} classes with a negative weight-gradient entry, got "
            f"{negative}: the batch is larger than num_samples says, or the update was modified")
    notes: list[str] = []
    if negative < n:
        notes.append(f"yin: only {negative} of {n} classes show a negative weight-gradient entry; the other "
                     f"{n - negative} labels are the classes with the smallest row minimum (Yin's rule), wrong if "
                     f"the batch repeats labels (use 'ilrg' or 'llg' then)")
    labels = row_min.argsort()[:n]
    return make_result(labels, "yin", layer, warnings=notes, info={"negative_rows": negative})
