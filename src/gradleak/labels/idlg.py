"""iDLG: the label of a single sample from the sign of the last layer's gradient.

For one sample, ``dL/db = p - onehot(y)``: the entry of the true class is ``p_y - 1 < 0`` and every
other entry is ``p_c > 0`` (Zhao et al. 2020, Eq. 3-5). Without a bias the same holds for the row
sums of ``dL/dW = (p - onehot(y)) z^T`` when the features ``z`` are non-negative (ReLU/sigmoid).

References:
    Zhao, Mopuri and Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv:2001.02610, 2020.
"""

from __future__ import annotations

from gradleak.errors import UpdateError
from gradleak.labels.last_layer import LABEL_STRATEGIES, LabelResult, LastLayer, last_layer, make_result, require_batch
from gradleak.types import ClientUpdate, ServerState


@LABEL_STRATEGIES.register("idlg")
def idlg(server: ServerState, update: ClientUpdate, *, layer: LastLayer | None = None) -> LabelResult:
    """Recover the label of a batch of one (iDLG).

    Assumptions: ``num_samples == 1``; the model ends in an ``nn.Linear``; the loss is softmax
    cross-entropy with a hard label; with a bias nothing else is needed (any activation, a gradient
    or a delta of any number of steps: every step has the same sign pattern); without a bias the
    last layer's inputs must be non-negative. Exactly one class must carry a negative gradient;
    anything else means a larger batch than declared or a modified update, and raises.

    Args:
        server: the model the update was computed on.
        update: the client's update.
        layer: the result of :func:`~gradleak.labels.last_layer.last_layer`, when already computed.

    Returns:
        A :class:`~gradleak.labels.LabelResult` with one label.

    Raises:
        UpdateError: ``num_samples != 1``, or not exactly one negative entry.
        UnsupportedModelError: no final ``nn.Linear``, or no bias and possibly negative features.

    Example:
        >>> import torch
        >>> from gradleak.models import build_model
        >>> from gradleak.threat import fedsgd_update
        >>> from gradleak.types import ModelSpec
        >>> spec = ModelSpec(name="lenet")
        >>> server = ServerState.from_spec(build_model(spec), spec)
        >>> update = fedsgd_update(server, torch.rand(1, 3, 32, 32), torch.tensor([7]))
        >>> idlg(server, update).labels.tolist()
        [7]
    """
    require_batch("idlg", update, exactly=1)
    layer = layer or last_layer(server, update)
    if layer.grad_bias is not None:
        signal, what = layer.grad_bias, "bias-gradient entry"
    else:
        layer.require_nonnegative_features("idlg")
        signal, what = layer.grad_weight.sum(dim=1), "weight-gradient row sum"
    negative = (signal < 0).nonzero().view(-1)
    if negative.numel() != 1:
        raise UpdateError(
            f"label strategy 'idlg': expected exactly one negative {what} for a batch of one, got "
            f"{negative.numel()} (the batch is larger than num_samples says, or the update was modified)")
    return make_result(negative.view(1), "idlg", layer, info={"signal": what})
