"""The imprint attack: images read off a malicious model's bins, in closed form (Robbing the Fed).

Given a FedSGD gradient (or a FedAvg delta, of one or several local steps) of a model that starts
with an imprint block
(:mod:`gradleak.threat.malicious`), bin ``i``'s share of the update is the difference of
consecutive rows of the block's weight and bias gradients; an image alone in its bin is their
ratio. Bins whose ratio is not an image (outside [0, 1], or whose statistic falls outside the bin:
two or more images mixed) are dropped; the rest, largest bias share first, are the reconstruction,
padded with grey when fewer than the batch are found. No iteration, no prior, no labels needed.
Its one reported "loss" is the share of the bins' bias gradient that the kept images do not
explain (0: every image of the update was read off a bin of its own).

A threat model beyond the honest-but-curious server: the server modified the model it sent (SoK
threat model F, active manipulation of the model).

References:
    Fowl, Geiping, Czaja, Goldblum, Goldstein, "Robbing the Fed", ICLR 2022, Section 3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from gradleak.attacks.base import ATTACKS, Attack, Progress, ProgressCallback
from gradleak.attacks.threat_model import Knowledge
from gradleak.config import check_ranges
from gradleak.errors import GradleakError, UpdateError
from gradleak.threat.malicious import find_imprint, find_sparse_imprint, imprint_model
from gradleak.types import ClientUpdate, Reconstruction, ServerState


@dataclass(frozen=True)
class ImprintConfig:
    """Settings of the imprint attack.

    Args:
        tolerance: a bin is empty when its bias share is below this fraction of the largest.
        margin: how far outside [0, 1] a recovered pixel may lie (rounding) before the bin is
            dropped as a mixture.
        label_strategy: how labels are recovered from the victim's part of the update.
    """

    tolerance: float = 1e-6
    margin: float = 1e-3
    label_strategy: str = "auto"

    def __post_init__(self) -> None:
        check_ranges("ImprintConfig", self, tolerance=(0, 1), margin=(0, 1))


class BlockAttack(Attack):
    """A closed-form attack on the block a malicious server put in front of the victim.

    A subclass names its block (:meth:`find_block`, ``block_name``, ``needs``) and reads images off
    the block's encoder gradients (:meth:`recover`); the checks, the gradients, the labels and the
    reconstruction are the same for every such block (:func:`block_gradients`, :func:`closed_form`).
    """

    knowledge = Knowledge(labels="recovered", sok="F", active_manipulation=True)
    iterative = False
    resumable = False
    uses_labels = False
    block_name: ClassVar[str] = "a malicious block"
    needs: ClassVar[str] = "needs a model with a malicious block"
    matching: ClassVar[str] = "closed form"

    @staticmethod
    def find_block(model: torch.nn.Module) -> torch.nn.Module | None:
        raise NotImplementedError

    def recover(self, block: Any, gw: torch.Tensor, gb: torch.Tensor, n: int,
                shape: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``n`` images (float64, padded with grey) and what was found, from the encoder's gradients."""
        raise NotImplementedError

    @classmethod
    def applicability(cls, server: ServerState, config: Any, *, local_steps: int = 1) -> str | None:
        return cls.needs if cls.find_block(server.model) is None else None

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        start = time.perf_counter()
        self.check(server, update)
        block = self.find_block(server.model)
        if block is None:
            raise UpdateError(f"{self.name} attack: expected an update of a model with {self.block_name}, got one "
                              f"without ({self.needs})")
        gw, gb = block_gradients(server, update, block)
        images, info = self.recover(block, gw, gb, update.num_samples, server.input_shape)
        return closed_form(self, server, update, labels, images, info, callback=callback, start=start,
                           matching=self.matching)


@ATTACKS.register("imprint")
class ImprintAttack(BlockAttack):
    """Closed-form recovery of the images alone in an imprint block's bins.

    Example:
        >>> import gradleak
        >>> gradleak.attacks.create("imprint").config.tolerance
        1e-06
    """

    name = "imprint"
    Config = ImprintConfig
    block_name = "an imprint block"
    needs = "needs a model with an imprint block (a malicious server: --threat malicious)"
    matching = "imprint bins (closed form)"
    find_block = staticmethod(find_imprint)

    @classmethod
    def malicious_model(cls, server: ServerState, size: int, *, batch_size: int,
                        public: torch.Tensor | None = None) -> ServerState:
        return imprint_model(server, size)  # its bins cut an assumed brightness distribution: no images needed

    def recover(self, block: Any, gw: torch.Tensor, gb: torch.Tensor, n: int,
                shape: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Every bin's ratio, the plausible ones kept (largest bias share first), padded with grey to ``n``."""
        k = gb.shape[0]
        if block.sparse:  # each unit is its own bin's
            dw, db = gw, gb
        else:  # unit i fires for every bin from i up: bin i is unit i less unit i + 1
            dw = gw - torch.cat([gw[1:], torch.zeros_like(gw[:1])])
            db = gb - torch.cat([gb[1:], torch.zeros_like(gb[:1])])
        c = block.thresholds().double()
        upper = torch.cat([c[1:], torch.tensor([float("inf")], dtype=c.dtype)])
        w = block.encoder.weight[0].detach().double() / block.gain
        floor = self.config.tolerance * float(db.abs().max().clamp_min(1e-300))
        found, shares = [], []
        mixed = 0
        for i in range(k):
            if abs(float(db[i])) <= floor:
                continue
            x = dw[i] / db[i]
            h = float(x @ w)
            m = self.config.margin
            if float(x.min()) < -m or float(x.max()) > 1 + m or not c[i] - 1e-9 < h <= upper[i] + 1e-9:
                mixed += 1
                continue
            found.append(x.clamp(0, 1))
            shares.append(abs(float(db[i])))
        order = sorted(range(len(found)), key=lambda j: -shares[j])[:n]
        images = [found[j].view(*shape) for j in order]
        images += [torch.full(shape, 0.5, dtype=torch.float64)] * (n - len(images))
        total = float(db.abs().sum().clamp_min(1e-300))
        info = {"bins": k, "bins_hit": int((db.abs() > floor).sum()), "images_found": len(found),
                "bins_mixed": mixed, "padded": max(0, n - len(found)),
                "unexplained": 1.0 - sum(shares[j] for j in order) / total}
        return torch.stack(images), info


@ATTACKS.register("sparse-imprint")
class SparseImprintAttack(ImprintAttack):
    """The imprint attack on the sparse block: every bin holds its own image, also over several local
    steps (the ratio of a unit's weight and bias changes, without differences of bins).

    Example:
        >>> import gradleak
        >>> gradleak.attacks.create("sparse-imprint").name
        'sparse-imprint'
    """

    name = "sparse-imprint"
    block_name = "a sparse imprint block"
    needs = ("needs a model with a sparse imprint block (a malicious server: --threat malicious, or gradleak "
             "simulate --imprint-bins K --sparse)")
    matching = "sparse imprint bins (closed form)"
    find_block = staticmethod(find_sparse_imprint)

    @classmethod
    def malicious_model(cls, server: ServerState, size: int, *, batch_size: int,
                        public: torch.Tensor | None = None) -> ServerState:
        return imprint_model(server, size, sparse=True)


def block_gradients(server: ServerState, update: ClientUpdate, block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of a malicious block's encoder (weight, bias) in float64, from a gradient or a delta.

    A FedAvg delta is -lr times the sum of the local steps' gradients: an image alone in a unit adds
    g_s x to the unit's weight row and g_s to its bias at every step s, so the ratio is x whatever
    the steps' g_s (exact for one step; for several, as long as the block's rows move too little to
    change which units an image fires: the small rate of local SGD and the block's small gain).
    """
    tensors = update.gradients() if update.kind == "gradient" else [-t for t in update.gradients()]
    grads = dict(zip([n for n, p in server.model.named_parameters() if p.requires_grad], tensors))
    prefix = next(n for n, m in server.model.named_children() if m is block)
    return grads[f"{prefix}.encoder.weight"].double(), grads[f"{prefix}.encoder.bias"].double()


def closed_form(attack: Attack, server: ServerState, update: ClientUpdate, labels: torch.Tensor | None,
                images: torch.Tensor, info: dict[str, Any], *, callback: ProgressCallback | None, start: float,
                matching: str) -> Reconstruction:
    """The reconstruction of a closed-form attack: its images, labels recovered from the victim's part
    of the update (or none, said in the notes), and its one reported "loss", ``info["unexplained"]``."""
    try:
        lab = attack.resolve_labels(server, update, labels, attack.config.label_strategy)
        y, strategy, notes = lab.labels, lab.strategy, list(lab.warnings)
    except GradleakError as e:
        y, strategy, notes = torch.zeros(update.num_samples, dtype=torch.long), "none", [f"labels: {e}"]
    unexplained = float(info["unexplained"])
    if callback is not None:
        callback(Progress(iteration=1, total=1, loss=unexplained, images=images.float()))
    return Reconstruction(images=images.float(), labels=y.cpu(), label_strategy=strategy,
                          history={"iteration": [1], "loss": [unexplained]}, iterations=1,
                          seconds=time.perf_counter() - start, matching=matching,
                          info={**info, "label_warnings": notes})


__all__ = ["BlockAttack", "ImprintAttack", "ImprintConfig", "SparseImprintAttack", "block_gradients", "closed_form"]
