"""Score a reconstruction against the private batch: the ``metrics.json`` summary and per-image rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gradleak.labels import label_accuracy
from gradleak.metrics.image import fsim, lpips_available, lpips_vgg, psnr, ssim
from gradleak.metrics.pairing import pair_images


def _stats(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    return float(v.mean()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0


@dataclass(frozen=True)
class Score:
    """A scored reconstruction.

    Args:
        summary: mean and std of SSIM, PSNR, FSIM (and LPIPS when available), label accuracy,
            the pairing method and the number of images.
        per_image: one row per private image ``j``: its paired reconstruction and its scores.
        pairing: ``pairing[j]`` is the reconstruction paired with private image ``j``.
    """

    summary: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    pairing: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "per_image": self.per_image, "pairing": self.pairing}


def score_reconstruction(recon: torch.Tensor, truth: torch.Tensor, *, recon_labels: torch.Tensor | None = None,
                         truth_labels: torch.Tensor | None = None, pairing: str = "hungarian",
                         with_lpips: bool = True) -> Score:
    """Pair and score reconstructions.

    Args:
        recon: reconstructions (N, C, H, W) in [0, 1].
        truth: private images (N, C, H, W) in [0, 1].
        recon_labels: labels the attack used (multiset compared with ``truth_labels``).
        truth_labels: private labels.
        pairing: ``"hungarian"`` (one-to-one) or ``"greedy"``.
        with_lpips: compute LPIPS-VGG when its weights are available offline.

    Returns:
        A :class:`Score` (``to_dict()``: what ``metrics.json`` holds).
    """
    order = pair_images(recon, truth, method=pairing)
    paired = recon[order]
    values = {"ssim": ssim(paired, truth), "psnr": psnr(paired, truth), "fsim": fsim(paired, truth)}
    summary: dict[str, Any] = {"pairing": pairing, "n_images": int(truth.shape[0])}
    ok, why = lpips_available() if with_lpips else (False, "not requested")
    if ok:
        values["lpips"] = lpips_vgg(paired, truth)
    for k, v in values.items():
        summary[f"{k}_mean"], summary[f"{k}_std"] = _stats(v)
    if not ok:
        summary["lpips_mean"] = None
        summary["lpips_std"] = None
        summary["lpips_note"] = why
    summary["label_accuracy"] = (label_accuracy(recon_labels, truth_labels)
                                 if recon_labels is not None and truth_labels is not None else None)
    per_image = [{"truth": j, "reconstruction": int(order[j]), **{k: float(v[j]) for k, v in values.items()}}
                 for j in range(truth.shape[0])]
    return Score(summary=summary, per_image=per_image, pairing=order.tolist())
