"""3. The r = 2 invariance (B T, T^-1 A): same dW, different imbalance and Hessian conditioning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from balora.imbalance import imbalance as imbalance_norm
from balora.imbalance import rel_imbalance
from balora.teaching.conservation import lowrank_target
from balora.teaching.threads import one_thread


def transform_2x2(angle: float = 0.0, shear: float = 0.0, log_scale: float = 0.0) -> torch.Tensor:
    """T = e^log_scale R(angle) [[1, shear], [0, 1]], (2, 2) float64; invertible for every input.

    R(angle) alone leaves the imbalance unchanged (orthogonal T); shear and scale change it.
    """
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    shr = torch.tensor([[1.0, shear], [0.0, 1.0]], dtype=torch.float64)
    return math.exp(log_scale) * rot @ shr


def balanced_pair(Y: torch.Tensor, r: int):
    """The balanced rank-r factorisation of Y from its SVD: B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T."""
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root  # A (r, in), B (out, r)


def factor_hessian(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Hessian of L(A, B) = 1/2 ||B A - Y||_F^2 in the parameters (vec A, vec B), row-major.

    Explicit formula, square in r (in + out). Its quadratic form is
    ||dB A + B dA||^2 + 2 <B A - Y, dB dA>: the Gauss-Newton part J^T J with
    J = [kron(B, I_in), kron(I_out, A^T)] and a cross term that vanishes at an exact fit.
    """
    r, n_in = A.shape
    n_out = B.shape[0]
    A, B = A.contiguous(), B.contiguous()  # torch.kron views its inputs and needs plain strides
    J = torch.cat(
        [torch.kron(B, torch.eye(n_in, dtype=A.dtype)), torch.kron(torch.eye(n_out, dtype=A.dtype), A.T.contiguous())], dim=1
    )  # (out*in, r*in + out*r)
    H = J.T @ J
    R = B @ A - Y  # (out, in)
    # d^2 L / dA[k, j] dB[i, l] = delta_kl R[i, j]
    cross = torch.einsum("kl,ij->kjil", torch.eye(r, dtype=A.dtype), R).reshape(r * n_in, n_out * r)
    H[: r * n_in, r * n_in :] += cross
    H[r * n_in :, : r * n_in] += cross.T
    return H


def hessian_condition(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor):
    """Eigenvalues of the Hessian (ascending) and its condition number without the gauge directions.

    The r^2 smallest-magnitude eigenvalues belong to the invariance (moving along (B T, T^-1 A)
    does not change the loss) and are dropped; the condition number is max / min of the rest.
    """
    r = A.shape[0]
    eig = torch.linalg.eigvalsh(factor_hessian(A, B, Y))  # (p,) ascending
    kept = eig[eig.abs().argsort()[r * r :]]
    lo = kept.abs().min()
    cond = float(kept.abs().max() / lo) if lo > 0 else math.inf
    return eig, cond


@dataclass
class InvarianceExample:
    """One point (B T, T^-1 A) on the manifold of factorisations of a rank-2 target."""

    T: torch.Tensor  # (2, 2)
    A: torch.Tensor  # (2, in) = T^-1 A0
    B: torch.Tensor  # (out, 2) = B0 T
    dW: torch.Tensor  # (out, in) = B A
    dW_change: float  # max |B A - B0 A0|: rounding error only
    imbalance: float  # ||B^T B - A A^T||_F
    rel_imbalance: float
    eigenvalues: torch.Tensor  # (r (in + out),) ascending, including the r^2 gauge zeros
    cond: float  # without the r^2 gauge directions
    cond_balanced: float  # at T = I: 2 s1 / s2


INVARIANCE_SIGMA = (3.0, 1.0)  # s1 / s2 = 3, so the balanced condition number is 6


@one_thread()
def invariance_example(
    angle: float = 0.0, shear: float = 0.0, log_scale: float = 0.0, n: int = 6, seed: int = 0
) -> InvarianceExample:
    """Start at the balanced factorisation of an exact rank-2 n x n target and apply T."""
    Y = lowrank_target(n, n, sigma=INVARIANCE_SIGMA, seed=seed)
    A0, B0 = balanced_pair(Y, 2)
    T = transform_2x2(angle, shear, log_scale)
    B = B0 @ T  # (out, 2)
    A = torch.linalg.solve(T, A0)  # (2, in) = T^-1 A0, without forming the inverse
    dW = B @ A
    eig, cond = hessian_condition(A, B, Y)
    _, cond0 = hessian_condition(A0, B0, Y)
    return InvarianceExample(
        T=T,
        A=A,
        B=B,
        dW=dW,
        dW_change=float((dW - B0 @ A0).abs().max()),
        imbalance=float(imbalance_norm(A[None], B[None])[0]),
        rel_imbalance=float(rel_imbalance(A[None], B[None])[0]),
        eigenvalues=eig,
        cond=cond,
        cond_balanced=cond0,
    )


@one_thread()
def condition_vs_scale(angle: float = 0.0, shear: float = 0.0, log_scales=None, n: int = 6, seed: int = 0):
    """Sweep the scale of T at fixed angle and shear: (log_scales (k,), cond (k,), rel_imbalance (k,))."""
    if log_scales is None:
        log_scales = np.linspace(-1.5, 1.5, 31)
    conds, rels = [], []
    for ls in log_scales:
        ex = invariance_example(angle, shear, float(ls), n=n, seed=seed)
        conds.append(ex.cond)
        rels.append(ex.rel_imbalance)
    return np.asarray(log_scales, dtype=float), np.array(conds), np.array(rels)


def predicted_scaled_condition(log_scale: float, s1: float = INVARIANCE_SIGMA[0], sr: float = INVARIANCE_SIGMA[-1]):
    """(c^4 + 1) s1 / sr for B c, A / c with c >= 1 (and c -> 1/c below 1, by symmetry)."""
    c4 = math.exp(4 * abs(log_scale))
    return (c4 + 1) * s1 / sr
