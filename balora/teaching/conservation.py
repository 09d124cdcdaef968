"""2. Conservation of D = B^T B - A A^T on a small matrix problem: GD keeps it, Adam does not, balancing zeroes it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from balora.imbalance import imbalance as imbalance_norm
from balora.imbalance import rel_imbalance
from balora.projection import balanced_factors
from balora.teaching.threads import one_thread


CONSERVATION_OPTIMIZERS = ("gd", "adam", "gd+balancing")
STARTS = ("balanced", "unbalanced", "peft")


def lowrank_target(n_out: int = 8, n_in: int = 8, sigma=(3.0, 1.0), seed: int = 0) -> torch.Tensor:
    """Y = U diag(sigma) V^T (n_out, n_in) with random orthonormal U, V: an exact rank-len(sigma) target."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    U, _ = torch.linalg.qr(torch.randn(n_out, k, generator=g, dtype=torch.float64))  # (out, k)
    V, _ = torch.linalg.qr(torch.randn(n_in, k, generator=g, dtype=torch.float64))  # (in, k)
    return (U * torch.tensor(sigma, dtype=torch.float64)) @ V.T  # (out, in)


def start_factors(start: str, n_out: int = 8, n_in: int = 8, r: int = 2, seed: int = 0):
    """A starting pair A (r, in), B (out, r) in float64.

    "balanced": a small random pair projected onto B^T B = A A^T.
    "unbalanced": A with rows of norm ~1.4 (Frobenius ~2 at r = 2), B ten times smaller, same kind of product.
    "peft": PEFT's LoRA init, A ~ U(-1/sqrt(in), 1/sqrt(in)) and B = 0 (rel_imbalance 1).
    """
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}; use one of {', '.join(STARTS)}")
    g = torch.Generator().manual_seed(seed + 1000)
    if start == "peft":
        A = (torch.rand(r, n_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(n_in)  # (r, in)
        return A, torch.zeros(n_out, r, dtype=torch.float64)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)  # (r, in)
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64) / math.sqrt(n_out)  # (out, r)
    if start == "unbalanced":
        return 1.5 * A, 0.15 * B
    p = balanced_factors(0.5 * A[None], 0.5 * B[None], method="nearest")
    return p.A[0], p.B[0]


def factor_loss_grads(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor):
    """L = 1/2 ||B A - Y||_F^2 and its gradients dL/dA = B^T R (r, in), dL/dB = R A^T (out, r)."""
    R = B @ A - Y  # (out, in)
    return 0.5 * float((R * R).sum()), B.T @ R, R @ A.T


@dataclass
class FactorPath:
    """One optimisation run of a factor pair, recorded at every step 0..steps."""

    loss: np.ndarray  # (steps + 1,)
    imbalance: np.ndarray  # (steps + 1,) ||B^T B - A A^T||_F
    rel_imbalance: np.ndarray  # (steps + 1,) in [0, 1]
    A: torch.Tensor  # (r, in) final factors
    B: torch.Tensor  # (out, r)


@one_thread()
def conservation_path(
    optimizer: str,
    start: str = "unbalanced",
    lr: float = 0.05,
    steps: int = 120,
    seed: int = 0,
    n: int = 8,
    r: int = 2,
) -> FactorPath:
    """Fit B A to an exact rank-r n x n target from one start with one optimizer.

    optimizer: "gd" (conserves D up to O(lr^2) per step), "adam" (torch Adam: does not),
    "gd+balancing" (gradient descent, then the "nearest" projection after every step: D = 0
    from the first step whose product is nonzero).
    """
    if optimizer not in CONSERVATION_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(CONSERVATION_OPTIMIZERS)}")
    Y = lowrank_target(n, n, sigma=tuple(np.linspace(3.0, 1.0, r)), seed=seed)  # s1 / sr = 3 for any r
    A, B = start_factors(start, n, n, r, seed)
    A, B = A.clone(), B.clone()
    adam = None
    if optimizer == "adam":
        A.requires_grad_(True)
        B.requires_grad_(True)
        adam = torch.optim.Adam([A, B], lr=lr)
    losses, imbs, rels = [], [], []
    for t in range(steps + 1):
        with torch.no_grad():
            loss, gA, gB = factor_loss_grads(A, B, Y)
            losses.append(loss)
            imbs.append(float(imbalance_norm(A[None], B[None])[0]))
            rels.append(float(rel_imbalance(A[None], B[None])[0]))
            if t == steps or not math.isfinite(loss) or loss > 1e12:
                break
            if adam is not None:
                A.grad, B.grad = gA, gB
                adam.step()
                continue
            A -= lr * gA
            B -= lr * gB
            if optimizer == "gd+balancing":
                p = balanced_factors(A[None], B[None], method="nearest")  # zero products come back unchanged
                A.copy_(p.A[0])
                B.copy_(p.B[0])
    return FactorPath(_padded(losses, steps), _padded(imbs, steps), _padded(rels, steps), A.detach(), B.detach())


def _padded(values: list, steps: int) -> np.ndarray:
    """(steps + 1,) array; a diverged run stops early and is padded with nan so every curve has the same length."""
    return np.array(values + [np.nan] * (steps + 1 - len(values)))


def gd_imbalance_change(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor, lr: float) -> torch.Tensor:
    """Exact change of D over one gradient-descent step on 1/2 ||B A - Y||^2, (r, r).

    With R = B A - Y the step is A' = A - lr B^T R, B' = B - lr R A^T; the O(lr) terms of
    B'^T B' and A' A'^T are equal and cancel, leaving lr^2 (A R^T R A^T - B^T R R^T B).
    """
    R = B @ A - Y  # (out, in)
    return lr * lr * (A @ R.T @ R @ A.T - B.T @ R @ R.T @ B)
