"""``recover_labels``: the entry point, and ``auto``, the default strategy.

``auto`` tries the strategies in order of strength and uses the first whose assumptions hold;
every strategy it skips is recorded, with the reason, in ``LabelResult.warnings``. For an update
that records a defense the order is :data:`AUTO_ORDER_DEFENDED` (LLG before Yin), and after a
clipping defense bias-count is skipped and iLRG searches the update's unknown scale
(:data:`RESCALING`; after DP-SGD's noise both are skipped); after pruning both count on the
gradient with its zeroed entries filled back (:mod:`gradleak.labels.support`); without one:

1. ``idlg`` for a batch of one (exact);
2. ``ilrg`` (exact counts with repeats on untrained models; needs a bias, an unmodified softmax
   cross-entropy gradient and the gradient's scale). When iLRG reports low confidence (its
   real-valued counts are far from integers: the samples of a class do not share one softmax
   output, as in trained models), ``auto`` uses ``bias-count`` instead, which was the more
   accurate of the two in that regime on every victim of ``gradleak bench labels``
   (docs/labels.md), and records why;
3. ``yin`` for at most C samples (exact when its strict unique-label check passes; needs only
   signs, so it survives a missing ``local_lr`` or a bias-less layer);
4. ``llg`` (heuristic counts with repeats; needs only signs and ratios, tolerates noise);
5. ``bias-count`` (counts from a random-image prior).

References:
    Zhao et al. 2020 (iDLG); Ma et al., ICLR 2023 (iLRG); Yin et al., CVPR 2021; Wainakh et al.,
    PETS 2022 (LLG). See the strategy modules.
"""

from __future__ import annotations

import logging

from gradleak.errors import UnsupportedModelError, UpdateError
from gradleak.labels.bias_count import bias_count
from gradleak.labels.idlg import idlg
from gradleak.labels.ilrg import LOW_CONFIDENCE, ilrg
from gradleak.labels.last_layer import LABEL_STRATEGIES, LabelResult, LastLayer, last_layer
from gradleak.labels.llg import llg
from gradleak.labels.yin import yin
from gradleak.types import ClientUpdate, ServerState

logger = logging.getLogger(__name__)

AUTO_ORDER: tuple[str, ...] = ("idlg", "ilrg", "yin", "llg", "bias-count")
"""The order in which ``auto`` tries strategies (``idlg`` only for a batch of one)."""

AUTO_ORDER_DEFENDED: tuple[str, ...] = ("idlg", "ilrg", "llg", "yin", "bias-count")
"""``auto``'s order for an update that records a defense. Measured with ``gradleak bench labels
--defenses ...`` (docs/labels.md, "Labels under defenses": untrained LeNet and ResNet-18-sigmoid,
N = 8 and 32, prune, quantize, sign, noise, clip): iLRG refuses the defended updates whose bias
gradient no longer sums to zero (noise, sign), and then LLG, which needs only signs and ratios,
recovered 0.59-0.91 of the labels at N = 8 against Yin's 0.50-0.62. Quantized updates are checked
against the rounding's bound and pruned ones are filled back before counting
(:meth:`~gradleak.labels.last_layer.LastLayer.for_counts`), so iLRG or bias-count count those."""

RESCALING = frozenset({"clip", "dpsgd"})
"""Recorded defenses that rescale the update by a factor the server does not know (the norm before
clipping is private): bias-count's counts assume the gradient's own scale, so ``auto`` skips it, and
runs iLRG with ``scale="search"``, which finds the factor as the one that gives integer counts
(measured under ``clip:1``, docs/labels.md: iLRG at the wrong scale 0.53 / 0.72 at N = 8 / 32, LLG
0.91 / 0.67, iLRG with the scale searched 1.00 / 1.00). A low-confidence search falls through to
LLG. Under DP-SGD (per-sample clipping, then noise) iLRG is skipped too."""

SEARCH_SCALE = frozenset({"clip"})
"""The rescaling defenses after which iLRG searches the scale rather than being skipped."""

_STRATEGY_FUNCTIONS = {"idlg": idlg, "ilrg": ilrg, "yin": yin, "llg": llg, "bias-count": bias_count}


@LABEL_STRATEGIES.register("auto")
def auto(server: ServerState, update: ClientUpdate, *, layer: LastLayer | None = None) -> LabelResult:
    """The first strategy of :data:`AUTO_ORDER` whose assumptions hold, with a warning per skipped one.

    An ``ilrg`` result whose consistency score exceeds
    :data:`~gradleak.labels.ilrg.LOW_CONFIDENCE` is replaced by ``bias-count`` (if it applies),
    with a warning; iLRG's diagnostics stay in ``info["ilrg"]``.

    Args:
        server: the model the update was computed on.
        update: the client's update; ``num_samples`` is the batch size N.
        layer: the result of :func:`~gradleak.labels.last_layer.last_layer`, when already computed.

    Returns:
        The chosen strategy's :class:`~gradleak.labels.LabelResult`; ``strategy`` names the
        strategy used, ``info["skipped"]`` the ones skipped and why.

    Raises:
        UnsupportedModelError: no strategy applies (the reasons are in the message).
        UpdateError: the update does not fit the model's last layer.
    """
    layer = layer or last_layer(server, update)
    skipped: dict[str, str] = {}
    order = list(AUTO_ORDER_DEFENDED if update.defenses else AUTO_ORDER)
    rescaled = sorted(RESCALING & set(update.defenses))
    search_scale = bool(rescaled) and set(rescaled) <= SEARCH_SCALE
    if rescaled:
        for name in ("bias-count",) if search_scale else ("ilrg", "bias-count"):
            order.remove(name)
            skipped[name] = (f"the update records {', '.join(rescaled)}, which rescales it by an unknown factor; "
                             "its counts assume the gradient's own scale")
    order = [s for s in order if s != "idlg" or update.num_samples == 1]
    for name in order:
        options = {"scale": "search"} if name == "ilrg" and search_scale else {}
        try:
            result = _STRATEGY_FUNCTIONS[name](server, update, layer=layer, **options)
        except (UnsupportedModelError, UpdateError) as e:
            skipped[name] = str(e)
            logger.warning("label recovery: %s skipped: %s", name, e)
            continue
        low_confidence = name == "ilrg" and result.info["score"] > LOW_CONFIDENCE
        if low_confidence and search_scale:  # bias-count's scale is wrong here too: on to LLG
            skipped[name] = (f"low confidence with the update's scale searched (consistency score "
                             f"{result.info['score']:.2f} > {LOW_CONFIDENCE})")
            logger.warning("label recovery: ilrg skipped: %s", skipped[name])
            continue
        notes = [f"label recovery: {s} skipped: {why}" for s, why in skipped.items()]
        info = {**result.info, "requested": "auto", "skipped": skipped}
        if low_confidence:
            try:
                prior = bias_count(server, update, layer=layer)
            except (UnsupportedModelError, UpdateError) as e:  # same assumptions as ilrg: rare
                notes.append(f"label recovery: bias-count not applicable either ({e}); kept ilrg")
            else:
                notes += [w for w in result.warnings if w not in layer.notes]
                notes.append(f"label recovery: used bias-count instead of low-confidence ilrg "
                             f"(score {result.info['score']:.2f} > {LOW_CONFIDENCE})")
                info = {**prior.info, "requested": "auto", "skipped": skipped, "ilrg": result.info}
                logger.warning("label recovery: ilrg has low confidence; using bias-count")
                result = prior
        return LabelResult(labels=result.labels, strategy=result.strategy, warnings=notes + result.warnings,
                           info=info)
    raise UnsupportedModelError("label recovery: no strategy applies ("
                                + "; ".join(f"{s}: {why}" for s, why in skipped.items()) + ")")


def recover_labels(server: ServerState, update: ClientUpdate, *, strategy: str = "auto") -> LabelResult:
    """Recover the batch's labels from ``update``, using only the server's model and public metadata.

    Args:
        server: the model the update was computed on.
        update: the client's update; ``num_samples`` is the batch size N.
        strategy: a registered name (``LABEL_STRATEGIES.available()``: ``auto``, ``bias-count``,
            ``idlg``, ``ilrg``, ``llg``, ``yin``); ``auto`` picks the best one whose assumptions hold.

    Returns:
        A :class:`~gradleak.labels.LabelResult` whose labels are sorted by class, shape (N,).

    Raises:
        UnknownNameError: an unknown strategy.
        UnsupportedModelError: the model does not meet the strategy's assumptions.
        UpdateError: the update does not meet them (batch size, kind, modified gradient).

    Example:
        >>> import torch
        >>> from gradleak.models import build_model
        >>> from gradleak.threat import fedsgd_update
        >>> from gradleak.types import ModelSpec
        >>> spec = ModelSpec(name="lenet")
        >>> server = ServerState.from_spec(build_model(spec), spec)
        >>> y = torch.tensor([3, 3, 1, 7, 3, 1])
        >>> update = fedsgd_update(server, torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), y)
        >>> result = recover_labels(server, update)
        >>> result.strategy, result.labels.tolist()
        ('ilrg', [1, 1, 3, 3, 3, 7])
    """
    return LABEL_STRATEGIES.get(strategy)(server, update)
