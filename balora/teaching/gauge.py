"""4. Why the gauge matters for Adam: balancing in the svd vs the nearest gauge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from balora.imbalance import rel_imbalance
from balora.projection import balanced_factors
from balora.teaching.threads import one_thread

GAUGE_OPTIMIZERS = ("adam", "sign")
GAUGE_ARMS = ("lora", "svd", "nearest")

@dataclass
class GaugeTask:
    """G independent copies of one toy task: a frozen random layer W0 and a random target W*.

    Inputs X are random, so the loss mean((W0 + B A) X - W* X)^2 weighs directions by X X^T.
    """

    W0: torch.Tensor  # (G, out, in) frozen
    W_target: torch.Tensor  # (G, out, in)
    X: torch.Tensor  # (G, in, n) inputs
    A0: torch.Tensor  # (G, r, in) PEFT init
    B0: torch.Tensor  # (G, out, r) zeros
    best_loss: torch.Tensor  # (G,) smallest loss any rank-r B A can reach

@one_thread()
def gauge_task(seeds: int = 4, d: int = 20, r: int = 4, n: int = 100, seed: int = 0) -> GaugeTask:
    """The toy task of DESIGN.md section 2 (frozen random d x d layer, LoRA rank r, B = 0), batched over seeds."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(seeds, d, d, generator=g) / math.sqrt(d)  # (G, out, in)
    W_target = torch.randn(seeds, d, d, generator=g) / math.sqrt(d)  # (G, out, in)
    X = torch.randn(seeds, d, n, generator=g)  # (G, in, n)
    A0 = (torch.rand(seeds, r, d, generator=g) * 2 - 1) / math.sqrt(d)  # (G, r, in): PEFT's kaiming-uniform bound
    B0 = torch.zeros(seeds, d, r)  # (G, out, r)
    return GaugeTask(W0, W_target, X, A0, B0, best_rank_loss(W_target - W0, X, r))

def best_rank_loss(E: torch.Tensor, X: torch.Tensor, r: int) -> torch.Tensor:
    """min over rank-r M of mean((M - E) X)^2, (G,). E (G, out, in), X (G, in, n).

    mean((M - E) X)^2 = ||(M - E) L||_F^2 / out with C = X X^T / n = L L^T, so the best M L is
    the best rank-r approximation of E L (Eckart-Young) and the loss is its tail energy / out.
    """
    E, X = E.double(), X.double()
    C = X @ X.mT / X.shape[-1]  # (G, in, in)
    L = torch.linalg.cholesky(C)
    s = torch.linalg.svdvals(E @ L)  # (G, min(out, in))
    return (s[:, r:] ** 2).sum(-1).float() / E.shape[-2]

def gauge_loss(task: GaugeTask, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-seed MSE of the adapted layer, (G,)."""
    err = (task.W0 + B @ A - task.W_target) @ task.X  # (G, out, n)
    return err.pow(2).mean((-2, -1))

@dataclass
class GaugeRun:
    """One arm on all seeds; median over seeds is what the page plots."""

    excess_loss: np.ndarray  # (G, steps + 1) loss minus the best rank-r loss
    rel_imbalance: np.ndarray  # (G, steps + 1)
    displacement: np.ndarray  # (G, steps) ||(A, B) after projection - before||_F; 0 for LoRA

@one_thread()
def gauge_run(
    optimizer: str = "adam", arm: str = "nearest", lr: float = 0.03, steps: int = 100, task: GaugeTask | None = None
) -> GaugeRun:
    """Train one arm (plain LoRA, or balancing after every step with the "svd" or "nearest" gauge).

    optimizer "adam" is torch.optim.Adam; "sign" is sign descent, p <- p - lr sign(grad), the
    synthetic stand-in for Adam in the paper. Both act per coordinate, so running the seeds
    as one batched tensor is the same as running them one by one.
    """
    if optimizer not in GAUGE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(GAUGE_OPTIMIZERS)}")
    if arm not in GAUGE_ARMS:
        raise ValueError(f"unknown arm {arm!r}; use one of {', '.join(GAUGE_ARMS)}")
    task = task if task is not None else gauge_task()
    A = task.A0.clone().requires_grad_(True)
    B = task.B0.clone().requires_grad_(True)
    adam = torch.optim.Adam([A, B], lr=lr) if optimizer == "adam" else None
    G = A.shape[0]
    losses = torch.full((steps + 1, G), float("nan"))
    rels = torch.full((steps + 1, G), float("nan"))
    moved = torch.zeros(steps, G)
    for t in range(steps + 1):
        loss = gauge_loss(task, A, B)  # (G,)
        losses[t] = loss.detach()
        rels[t] = rel_imbalance(A.detach(), B.detach())
        if t == steps or not bool(torch.isfinite(loss).all()):
            break
        # Summing per-seed losses gives each seed exactly its own gradient.
        gA, gB = torch.autograd.grad(loss.sum(), (A, B))
        with torch.no_grad():
            if adam is not None:
                A.grad, B.grad = gA, gB
                adam.step()
            else:
                A -= lr * gA.sign()
                B -= lr * gB.sign()
            if arm != "lora":
                p = balanced_factors(A, B, method=arm)
                moved[t] = ((p.A - A).pow(2).sum((-2, -1)) + (p.B - B).pow(2).sum((-2, -1))).sqrt()
                A.copy_(p.A)
                B.copy_(p.B)
    excess = (losses - task.best_loss[None]).T.numpy()  # (G, steps + 1)
    return GaugeRun(excess_loss=excess, rel_imbalance=rels.T.numpy(), displacement=moved.T.numpy())
