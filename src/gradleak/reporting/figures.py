"""Figures of a run: the ground-truth/reconstruction grid and the loss/SSIM curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def subplots(rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes, without pyplot: no global backend is chosen or switched (a notebook
    keeps its own), and nothing stays open after ``fig.savefig``."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(rows, cols, **kwargs)


def _show(ax: Axes, img: torch.Tensor) -> None:
    arr = img.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_grid(path: str | Path, truth: torch.Tensor | None, recon: torch.Tensor, *, columns: int = 16,
              boxed: int = 4, row_labels: Sequence[str] = ("truth", "reconstruction")) -> None:
    """Ground truth row over reconstruction row (pairs aligned), wrapped every ``columns`` images.

    The first ``boxed`` pairs get a red frame, as in the paper's Figure 10.
    """
    n = recon.shape[0]
    cols = min(columns, n)
    chunks = (n + cols - 1) // cols
    rows_per = 2 if truth is not None else 1
    fig, axes = subplots(chunks * rows_per, cols, figsize=(cols * 0.9 + 1.2, chunks * rows_per * 0.95),
                             squeeze=False)
    for i in range(chunks * cols):
        chunk, col = divmod(i, cols)
        sources = [truth, recon] if truth is not None else [recon]
        for r, src in enumerate(sources):
            ax = axes[chunk * rows_per + r][col]
            if i >= n or src is None:
                ax.axis("off")
                continue
            _show(ax, src[i])
            if i < boxed:
                h, w = src.shape[-2:]
                ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="red", linewidth=2))
            if col == 0:
                ax.set_ylabel(row_labels[r] if truth is not None else row_labels[1], fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)


def save_curves(path: str | Path, history: dict[str, list[float]]) -> None:
    """Matching loss (log scale) and, when recorded, mean SSIM against the iteration."""
    has_ssim = bool(history.get("ssim"))
    fig, axes = subplots(1, 2 if has_ssim else 1, figsize=(9 if has_ssim else 4.5, 3.2), squeeze=False)
    ax = axes[0][0]
    if history.get("loss"):
        ax.semilogy(history["iteration"], history["loss"], color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient matching loss")
    ax.grid(alpha=0.3)
    if has_ssim:
        ax = axes[0][1]
        ax.plot(history["ssim_iteration"], history["ssim"], color="tab:green")
        ax.set_ylim(0, 1)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean SSIM (Hungarian pairing)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
