"""Closed-form inversion of a 1-layer softmax network (CI-Net, Proposition 1).

For a single linear layer ``a = W x + b`` followed by softmax cross-entropy averaged over a batch of
N images, Zhang et al. (ICCV 2023, appendix A, Proposition 1, Eq. 5) show

    N * grad_W = P_hat^T x,        N * grad_b = P_hat^T 1,

with ``x`` the (N, D) flattened images and ``P_hat`` the (N, C) matrix of softmax probabilities
minus one-hot labels (PyTorch stores W as (C, D), hence the transposes against the paper's Eq. 5).
Stacking the two, ``G = N [grad_W | grad_b] = P_hat^T [x | 1]``. Given ``P_hat``, the images follow
as ``[x | 1] = pinv(P_hat^T) G``; ``P_hat`` itself depends on ``x`` through the logits. This module
alternates the two steps, as the proposition suggests, and then polishes the fixed point with
Levenberg-Marquardt steps on the same equations (the plain alternation oscillates when two images
share a label, because their rows of ``P_hat`` then differ only through their small softmax
differences).

Uniqueness: ``P_hat``'s rows sum to zero, so ``rank(P_hat) <= C - 1``. The images are determined
exactly when ``P_hat^T`` has full column rank N, i.e. N <= C - 1 and the images are in general
position (``G`` then has rank N). Otherwise every ``x + v u^T`` with ``P_hat^T v = 0`` explains the
update as well, and the attack says so in ``Reconstruction.info`` and with a warning.

The solve is reduced to the row space of ``G``: ``[x | 1] = A B`` with B the top right singular
vectors of G, so the unknown is the small (N, r) matrix A and the cost does not grow with D.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.attacks.base import ATTACKS, Attack, Progress, ProgressCallback, target_gradients
from gradleak.attacks.threat_model import Knowledge
from gradleak.errors import ConfigError, UnsupportedModelError
from gradleak.types import ClientUpdate, Reconstruction, ServerState

logger = logging.getLogger(__name__)

# Above this many unknowns (N * rank) the dense Levenberg-Marquardt system is skipped.
_MAX_LM_UNKNOWNS = 4096
# Relative size of the seeded perturbation of the starting point (see _Solver.start).
_SYMMETRY_BREAK = 0.1
# Records a step's residual and the current solution; returns True when asked to stop.
_Log = Callable[[float, torch.Tensor], bool]


@dataclass(frozen=True)
class AnalyticConfig:
    """Settings of the analytic (Proposition 1) attack.

    Args:
        label_strategy: how labels are recovered from the update (``gradleak.labels``).
        alternations: at most this many fixed-point steps ``x = pinv(P_hat^T) G`` (stopped early
            when the residual stops falling).
        refine_steps: at most this many Levenberg-Marquardt steps on the same equations.
        tol: stop when the relative residual ``||P_hat^T [x|1] - G|| / ||G||`` falls below this.
        restarts: at most this many solves from differently perturbed starts, stopping at the
            first that converges; the one with the lowest residual is kept (never ground truth).
        rank_tol: singular values below ``rank_tol`` times the largest count as zero when
            deciding the rank of ``G`` (float32 updates carry ~1e-7 relative noise); ``P_hat``'s
            rank, known only to second order at the solution, uses ``sqrt(rank_tol)``.
    """

    label_strategy: str = "auto"
    alternations: int = 20
    refine_steps: int = 300
    tol: float = 1e-10
    rank_tol: float = 1e-6
    restarts: int = 4

    def __post_init__(self) -> None:
        if self.alternations < 0 or self.refine_steps < 0 or self.restarts < 1:
            raise ConfigError(f"analytic: expected alternations >= 0, refine_steps >= 0 and restarts >= 1, got "
                              f"{self.alternations}, {self.refine_steps} and {self.restarts}")
        if not (0 < self.tol < 1 and 0 < self.rank_tol < 1):
            raise ConfigError(f"analytic: expected 0 < tol < 1 and 0 < rank_tol < 1, got {self.tol} and "
                              f"{self.rank_tol}")


def single_linear(server: ServerState) -> tuple[nn.Linear, int, int]:
    """The model's only linear layer and the positions of its weight and bias among the parameters.

    Raises:
        UnsupportedModelError: the model is not one ``nn.Linear`` with bias on the flattened
            image (optionally wrapped with ``nn.Flatten``/``nn.Identity``), or it does not
            compute ``linear(x.flatten(1))``.
    """
    model = server.model
    leaves = [m for m in model.modules() if not list(m.children())]
    linears = [m for m in leaves if isinstance(m, nn.Linear)]
    others = sorted({type(m).__name__ for m in leaves if not isinstance(m, (nn.Linear, nn.Flatten, nn.Identity))})
    if len(linears) != 1 or others:
        found = f"{len(linears)} linear layer(s)" + (f" and {', '.join(others)}" if others else "")
        raise UnsupportedModelError(f"analytic attack: expected a 1-layer softmax model (Flatten + one "
                                    f"nn.Linear, the 'linear' victim), got {found}")
    lin = linears[0]
    if lin.bias is None:
        raise UnsupportedModelError("analytic attack: expected the linear layer to have a bias, got bias=None")
    d = math.prod(server.input_shape)
    if lin.in_features != d or lin.out_features != server.num_classes:
        raise UnsupportedModelError(f"analytic attack: expected nn.Linear({d}, {server.num_classes}), got "
                                    f"nn.Linear({lin.in_features}, {lin.out_features})")
    params = [p for p in model.parameters() if p.requires_grad]
    idx = {id(p): i for i, p in enumerate(params)}
    if id(lin.weight) not in idx or id(lin.bias) not in idx or len(params) != 2:
        raise UnsupportedModelError("analytic attack: expected exactly the layer's weight and bias to be trainable")
    probe = torch.rand((2,) + tuple(server.input_shape), generator=torch.Generator().manual_seed(0))
    probe = probe.to(lin.weight.device, lin.weight.dtype)
    with torch.no_grad():
        if not torch.allclose(model(probe), lin(probe.flatten(1)), rtol=1e-4, atol=1e-5):
            raise UnsupportedModelError("analytic attack: expected the model to compute linear(x.flatten(1)), "
                                        "its forward does something else")
    return lin, idx[id(lin.weight)], idx[id(lin.bias)]


def _jacobian(a: torch.Tensor, k: torch.Tensor, s: torch.Tensor, p: torch.Tensor, bl: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``[vec(P(AK)^T A), A bl]`` w.r.t. ``vec(A)``, with softmax rows ``s`` and ``p = s - y``."""
    n, r = a.shape
    c = k.shape[1]
    # d p[n, c] / d a[n, j] = s[n, c] * (k[j, c] - <s[n], k[j]>)
    m = s[:, :, None] * (k.T[None, :, :] - (s @ k.T)[:, None, :])  # (n, c, j)
    eye_r = torch.eye(r, dtype=a.dtype, device=a.device)
    j1 = torch.einsum("nc,jq->cqnj", p, eye_r) + torch.einsum("ncj,nq->cqnj", m, a)
    eye_n = torch.eye(n, dtype=a.dtype, device=a.device)
    j2 = torch.einsum("mn,j->mnj", eye_n, bl)
    return torch.cat([j1.reshape(c * r, n * r), j2.reshape(n, n * r)])


def _converged(tol: float) -> float:
    """Relative residual below which a solve counts as converged (float32 updates floor near 1e-7)."""
    return max(100 * tol, 1e-5)


class _Solver:
    """The equations of Proposition 1 reduced to the row space of G: unknown A with [x | 1] = A B.

    Residual: ``[vec(P(A K)^T A - US) / ||US||, (A b_last - 1) / sqrt(N)]`` with ``G ~ US B``,
    ``K = B [W | b]^T`` (logits are ``A K``) and ``b_last`` the last column of B.
    """

    def __init__(self, us: torch.Tensor, k: torch.Tensor, bl: torch.Tensor, onehot: torch.Tensor) -> None:
        self.us, self.k, self.bl, self.onehot = us, k, bl, onehot
        self.n, self.c = onehot.shape
        self.r = us.shape[1]
        self.scale = float(torch.linalg.norm(us)) or 1.0

    def residual(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.softmax(a @ self.k, dim=-1)
        p = s - self.onehot
        res = torch.cat([((p.T @ a - self.us) / self.scale).reshape(-1), (a @ self.bl - 1) / math.sqrt(self.n)])
        return res, s, p

    def cost(self, a: torch.Tensor) -> float:
        return float(self.residual(a)[0].square().sum())

    def start(self, rng: torch.Generator) -> torch.Tensor:
        """x from uniform softmax outputs, P_hat = 1/C - Y, plus a small seeded perturbation.

        Images sharing a label have identical rows in this P_hat, and every later step preserves
        that symmetry; the perturbation breaks it so that they can separate.
        """
        p0 = torch.full((self.n, self.c), 1.0 / self.c, dtype=self.us.dtype, device=self.us.device) - self.onehot
        a = torch.linalg.pinv(p0.T) @ self.us
        noise = torch.randn(a.shape, generator=rng, dtype=a.dtype).to(a.device)
        return a + _SYMMETRY_BREAK * (a.norm() / math.sqrt(a.numel())) * noise

    def alternate(self, a: torch.Tensor, steps: int, tol: float, log: _Log) -> torch.Tensor:
        """Proposition 1's fixed point: P_hat from the current x, then x = pinv(P_hat^T) G, while it helps."""
        res, _, p = self.residual(a)
        cost = float(res.square().sum())
        stop = log(math.sqrt(cost), a)
        for _ in range(steps):
            if math.sqrt(cost) < tol or stop:
                break
            cand = torch.linalg.pinv(p.T) @ self.us
            cres, _, cp = self.residual(cand)
            ccost = float(cres.square().sum())
            if not ccost < cost:
                break
            a, p, cost = cand, cp, ccost
            stop = log(math.sqrt(cost), a)
        return a

    def refine(self, a: torch.Tensor, steps: int, tol: float, log: _Log) -> torch.Tensor:
        """Levenberg-Marquardt on the same residual, with the analytic Jacobian."""
        res, s, p = self.residual(a)
        cost = float(res.square().sum())
        lam, stop = 1e-3, False
        for _ in range(steps):
            if math.sqrt(cost) < tol or stop:
                break
            jac = _jacobian(a, self.k, s, p, self.bl)
            jac[: self.c * self.r] /= self.scale
            jac[self.c * self.r:] /= math.sqrt(self.n)
            jtj, jtr = jac.T @ jac, jac.T @ res
            # Levenberg damping scaled to the system (Marquardt's diagonal scaling stalls on the
            # near-flat directions that same-label pairs create).
            damp = torch.eye(jtj.shape[0], dtype=a.dtype, device=a.device) * float(torch.diag(jtj).max())
            while lam <= 1e12:
                cand = a + torch.linalg.solve(jtj + lam * damp, -jtr).view_as(a)
                cres, cs, cp = self.residual(cand)
                ccost = float(cres.square().sum())
                if ccost < cost:
                    a, res, s, p, cost = cand, cres, cs, cp, ccost
                    lam = max(lam / 10, 1e-12)
                    break
                lam *= 10
            else:
                break
            stop = log(math.sqrt(cost), a)
        return a


@dataclass
class LayerSolution:
    """A solve of Proposition 1's equations for one softmax layer (:func:`solve_softmax_layer`)."""

    x_aug: torch.Tensor
    """(N, D + 1): the layer's inputs with the bias column (ideally all ones)."""
    softmax: torch.Tensor
    p_hat: torch.Tensor
    rank: int
    """The numerical rank of ``G``."""
    attempts: int
    notes: list[str]


def solve_softmax_layer(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, onehot: torch.Tensor,
                        cfg: AnalyticConfig, *, rng: torch.Generator,
                        log: _Log | None = None) -> LayerSolution:
    """Solve ``G = P_hat^T [x | 1]`` for the inputs ``x`` of a linear layer followed by softmax cross-entropy.

    Args:
        g: ``N [grad_W | grad_b]``, shape (C, D + 1), float64.
        weight: the layer's weight (C, D); ``bias``: its bias (C,).
        onehot: the labels, (N, C) one-hot, float64.
        cfg: the solve's settings (alternations, refine steps, tolerances, restarts).
        rng: seeds the starts' perturbations.
        log: called with each step's residual and current ``[x | 1]``; returns True to stop.

    The layer may be a whole 1-layer model (the images) or a deep model's last layer (its input
    features, :mod:`gradleak.attacks.features`): the equations are the same.
    """
    dt, dev = g.dtype, g.device
    n = onehot.shape[0]
    wa = torch.cat([weight.to(dev, dt), bias.to(dev, dt)[:, None]], 1)
    u, sv, vh = torch.linalg.svd(g, full_matrices=False)
    rank_g = int((sv > cfg.rank_tol * sv[0]).sum()) if sv[0] > 0 else 0
    r = max(1, min(n, rank_g))
    us, basis = u[:, :r] * sv[:r], vh[:r]  # G ~ us @ basis
    solver = _Solver(us, basis @ wa.T, basis[:, -1], onehot)
    notes: list[str] = []
    step_log: _Log = (lambda value, a: False) if log is None else (lambda value, a: log(value, a @ basis))
    if n * r > _MAX_LM_UNKNOWNS and cfg.refine_steps:
        notes.append(f"Levenberg-Marquardt skipped: {n * r} unknowns exceed {_MAX_LM_UNKNOWNS}")
    best_cost, a, attempts = math.inf, torch.empty(0), 0
    stopped = False

    def logged(value: float, cand: torch.Tensor) -> bool:
        nonlocal stopped
        stopped = stopped or step_log(value, cand)
        return stopped

    for attempts in range(1, cfg.restarts + 1):
        cand = solver.alternate(solver.start(rng), cfg.alternations, cfg.tol, logged)
        if n * r <= _MAX_LM_UNKNOWNS and not stopped:
            cand = solver.refine(cand, cfg.refine_steps, cfg.tol, logged)
        cost = solver.cost(cand)
        if attempts == 1 or cost < best_cost:
            best_cost, a = cost, cand
        if math.sqrt(best_cost) < _converged(cfg.tol) or stopped:  # converged: no start can do better
            break
    _, s, p = solver.residual(a)
    return LayerSolution(x_aug=a @ basis, softmax=s, p_hat=p, rank=rank_g, attempts=attempts, notes=notes)



@ATTACKS.register("analytic")
class AnalyticAttack(Attack):
    """Exact reconstruction for 1-layer softmax models from ``N grad_W = P_hat^T x`` (Proposition 1).

    Not iterative in the sense of the optimisation attacks: it takes well under a second on CPU,
    so ``run_dir``/``resume`` are accepted for interface parity and nothing is checkpointed.

    Example:
        >>> import gradleak
        >>> attack = gradleak.attacks.create("analytic")
        >>> attack.config.refine_steps
        300

    References:
        Zhang, Guo, Wang, Liu. Generative Gradient Inversion via Over-Parameterized Networks in
        Federated Learning. ICCV 2023. Appendix A, Proposition 1 (Eq. 5).
        Phong et al. Privacy-Preserving Deep Learning via Additively Homomorphic Encryption, 2017
        (the single-sample case x = grad_W[k] / grad_b[k]).
    """

    name = "analytic"
    Config = AnalyticConfig
    knowledge = Knowledge(sok="B")
    iterative = False
    resumable = False
    presets = {
        # Proposition 1 as stated: alternate P_hat and x = N grad_W pinv(P_hat) only.
        "paper": {"alternations": 200, "refine_steps": 0},
        # Alternation followed by Levenberg-Marquardt on the same equations (default).
        "refined": {},  # the defaults: 20 alternations, then 300 Levenberg-Marquardt steps
    }

    @classmethod
    def applicability(cls, server: ServerState, config: Any, *, local_steps: int = 1) -> str | None:
        if local_steps > 1:
            return f"needs a gradient or a one-step delta, not {local_steps} local steps"
        try:
            single_linear(server)
        except UnsupportedModelError:
            return "needs a one-layer softmax victim (Flatten + one nn.Linear with bias)"
        return None

    def reconstruct(self, server: ServerState, update: ClientUpdate, *, labels: torch.Tensor | None = None,
                    callback: ProgressCallback | None = None, run_dir: str | Path | None = None,
                    resume: bool = False) -> Reconstruction:
        cfg = self.config
        self.check(server, update)
        start_time = time.perf_counter()
        lin, wi, bi = single_linear(server)
        lab = self.resolve_labels(server, update, labels, cfg.label_strategy)
        y, label_strategy, notes = lab.labels, lab.strategy, lab.warnings
        n, c = update.num_samples, server.num_classes
        grads = target_gradients(update)
        dt = torch.float64
        g = n * torch.cat([grads[wi].to(self.device, dt), grads[bi].to(self.device, dt)[:, None]], 1)  # (C, D+1)
        onehot = F.one_hot(y.to(self.device), c).to(dt)
        history: dict[str, list[float]] = {"iteration": [], "loss": []}
        total = cfg.restarts * (cfg.alternations + cfg.refine_steps)
        stopped = False

        def log(value: float, x_aug: torch.Tensor) -> bool:
            nonlocal stopped
            history["iteration"].append(len(history["iteration"]))
            history["loss"].append(value)
            if callback is not None and not stopped:
                progress = Progress(len(history["iteration"]), total, value, self._images(x_aug, server))
                stopped = bool(callback(progress))
            return stopped

        sol = solve_softmax_layer(g, lin.weight.detach(), lin.bias.detach(), onehot, cfg,
                                  rng=torch.Generator().manual_seed(self.seed), log=log)
        notes.extend(sol.notes)
        x_aug, s, p, rank_g, attempts = sol.x_aug, sol.softmax, sol.p_hat, sol.rank, sol.attempts
        info = self._diagnose(x_aug, s, p, g, grads[bi].to(self.device, dt), onehot, rank_g, n, c)
        info.update({"attack": self.name, "config": asdict(cfg), "label_notes": notes, "label_info": lab.info,
                     "attempts": attempts})
        return Reconstruction(images=self._images(x_aug, server).cpu(), labels=y.cpu(),
                              label_strategy=label_strategy, history=history, iterations=len(history["loss"]),
                              seconds=time.perf_counter() - start_time,
                              stopped_early="stopped by the callback" if stopped else None, matching="gradient",
                              info=info)

    @staticmethod
    def _images(x_aug: torch.Tensor, server: ServerState) -> torch.Tensor:
        return x_aug[:, :-1].reshape((-1,) + tuple(server.input_shape)).clamp(0, 1).float()

    def _diagnose(self, x_aug: torch.Tensor, s: torch.Tensor, p: torch.Tensor, g: torch.Tensor,
                  grad_b: torch.Tensor, onehot: torch.Tensor, rank_g: int, n: int, c: int) -> dict[str, Any]:
        """Residuals, ranks and the uniqueness verdict; warns when the solution is not unique."""
        cfg = self.config
        residual = float(torch.linalg.norm(p.T @ x_aug - g) / torch.linalg.norm(g).clamp_min(1e-300))
        # Images that share a row of P_hat (duplicates with one label) are told apart only to second
        # order: separating them by d changes the update by O(|d|^2), so a solve against a float32
        # update leaves them about sqrt(noise) apart. P_hat's rank is judged at that precision.
        p_sv = torch.linalg.svdvals(p)
        rank_p = int((p_sv > math.sqrt(cfg.rank_tol) * p_sv[0]).sum()) if p_sv[0] > 0 else 0
        implied_counts = s.sum(0) - n * grad_b  # N grad_b = sum_i p_i - counts (Proposition 1, bias row)
        label_gap = float((implied_counts - onehot.sum(0)).abs().max())
        x = x_aug[:, :-1]
        reasons, remarks = [], []
        if n > c - 1:
            reasons.append(f"N = {n} > C - 1 = {c - 1}: rank(P_hat) <= C - 1 < N, so N grad_W = P_hat^T x has "
                           f"a {n - rank_p}-dimensional family of solutions")
        elif rank_p < n:
            reasons.append(f"P_hat has numerical rank {rank_p} < N = {n} at the solution: some images cannot be told "
                           f"apart (e.g. duplicates with one label)")
        if rank_g < min(n, c - 1):
            remarks.append(f"[grad_W | grad_b] has numerical rank {rank_g} < N = {n}: the images are linearly "
                           f"dependent (e.g. duplicates); they are recovered in that span")
        converged = residual < _converged(cfg.tol)
        info = {
            "unique": not reasons,
            "uniqueness": (reasons or [f"N = {n} <= C - 1 = {c - 1} and P_hat has full rank N: exact up to the "
                                       f"order of the images"]) + remarks,
            "converged": converged,
            "relative_residual": residual,
            "rank_update": rank_g,
            "rank_p_hat": rank_p,
            "p_hat_condition": float(p_sv[0] / p_sv[-1].clamp_min(1e-300)),
            "bias_column_error": float((x_aug[:, -1] - 1).abs().max()),
            "label_count_gap": label_gap,
            "out_of_range_fraction": float(((x < 0) | (x > 1)).double().mean()),
        }
        if reasons:
            msg = "analytic attack: the reconstruction is not unique: " + "; ".join(reasons)
            logger.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)
        if not converged:
            msg = f"analytic attack: did not converge (relative residual {residual:.2e})"
            if label_gap > 0.5:
                msg += f"; the recovered labels disagree with the bias gradient by up to {label_gap:.2f} counts"
            logger.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)
        return info
