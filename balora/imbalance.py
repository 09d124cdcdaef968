"""Imbalance, spectra and conditioning of LoRA factor pairs. Pure tensor maths.

PEFT convention throughout: A = lora_A.weight (r, in), B = lora_B.weight (out, r),
dW = s * B @ A with s the layer's scaling. Every function takes a batch: A (G, r, in),
B (G, out, r), s (G,) or a float, so modules of one shape are measured by one call.
(The paper writes W0 + A B with its A of shape (out, r): its A is PEFT's B.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balora.linalg import thin_r

# Singular values below this fraction of the largest count as zero when reporting rank.
RANK_RTOL = 1e-5


def imbalance_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """D = B^T B - A A^T, (G, r, r)."""
    return B.mT @ B - A @ A.mT


def imbalance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B^T B - A A^T||_F, (G,)."""
    return torch.linalg.matrix_norm(imbalance_matrix(A, B))


def rel_imbalance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B^T B - A A^T||_F / (||B^T B||_F + ||A A^T||_F), in [0, 1]; 0 when both are zero.

    1 means one factor is zero (PEFT's B = 0 init), 0 means balanced.
    """
    BtB, AAt = B.mT @ B, A @ A.mT
    num = torch.linalg.matrix_norm(BtB - AAt)
    den = torch.linalg.matrix_norm(BtB) + torch.linalg.matrix_norm(AAt)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))


def product_core(A: torch.Tensor, B: torch.Tensor):
    """The triangular factors of both factors' thin QR and the small core of their product.

    B = Q_B R_B, A^T = Q_A R_A, so B A = Q_B (R_B R_A^T) Q_A^T and the singular values
    of B A are those of the core R_B R_A^T (kB, kA), with kB = min(out, r), kA = min(in, r).
    Q_A, Q_B are never formed: the spectra need only R. Returns (R_A (G, kA, r), R_B (G, kB, r), core).
    """
    R_B = thin_r(B)
    R_A = thin_r(A.mT)
    return R_A, R_B, R_B @ R_A.mT


def _pad_to(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last dim with zeros up to r: a factor with fewer than r rows or columns has
    exactly zero singular values in the missing places."""
    if x.shape[-1] >= r:
        return x
    return torch.nn.functional.pad(x, (0, r - x.shape[-1]))


def singular_values(A: torch.Tensor, B: torch.Tensor, scaling=1.0):
    """Singular values (descending, each (G, r)) of A, of B and of dW = s B A,
    computed from the factors without forming dW: O((in + out) r^2) per pair."""
    r = A.shape[-2]
    R_A, R_B, core = product_core(A, B)
    sigma_A = _pad_to(torch.linalg.svdvals(R_A), r)
    sigma_B = _pad_to(torch.linalg.svdvals(R_B), r)
    s = torch.as_tensor(scaling, dtype=core.dtype, device=core.device).abs()
    # One s per pair over the batch dims (or one float for all), broadcast along the r values.
    sigma = _pad_to(torch.linalg.svdvals(core), r) * s[..., None]
    return sigma_A, sigma_B, sigma


def condition_number(sigma: torch.Tensor) -> torch.Tensor:
    """sigma_max / sigma_min over the last dim; inf where sigma_min is 0, nan where all are 0."""
    smax, smin = sigma[..., 0], sigma[..., -1]
    return torch.where(smax > 0, smax / smin, torch.full_like(smax, float("nan")))


def numerical_rank(sigma: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """Number of singular values above rtol * sigma_max, (G,) int64."""
    return (sigma > rtol * sigma[..., :1]).sum(-1)


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank exp(H(p)), p = sigma / sum(sigma) (Roy & Vetterli, 2007).
    Between 1 and r for a nonzero spectrum; 0 for an all-zero one."""
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(sigma.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(sigma.dtype).tiny))).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))


@dataclass
class FactorStats:
    """Per-pair diagnostics for a batch of G pairs; every field has leading dim G."""

    norm_A: torch.Tensor  # (G,) Frobenius
    norm_B: torch.Tensor  # (G,)
    imbalance: torch.Tensor  # (G,) ||B^T B - A A^T||_F
    rel_imbalance: torch.Tensor  # (G,) in [0, 1]
    sigma_A: torch.Tensor  # (G, r) descending
    sigma_B: torch.Tensor  # (G, r)
    sigma: torch.Tensor  # (G, r) singular values of dW = s B A
    cond_A: torch.Tensor  # (G,)
    cond_B: torch.Tensor  # (G,)
    cond_dW: torch.Tensor  # (G,) over the r directions of dW (inf when rank < r)
    eff_rank: torch.Tensor  # (G,) entropy effective rank of dW
    rank: torch.Tensor  # (G,) numerical rank of dW


def factor_stats(A: torch.Tensor, B: torch.Tensor, scaling=1.0) -> FactorStats:
    """All diagnostics for a batch of pairs. A (G, r, in), B (G, out, r), scaling (G,) or float.

    Computed in fp32 at least: bf16/fp16 factors are upcast because the decompositions
    are not accurate (or not implemented) in half precision.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)
    A, B = A.to(dtype), B.to(dtype)
    sigma_A, sigma_B, sigma = singular_values(A, B, scaling)
    return FactorStats(
        norm_A=torch.linalg.matrix_norm(A),
        norm_B=torch.linalg.matrix_norm(B),
        imbalance=imbalance(A, B),
        rel_imbalance=rel_imbalance(A, B),
        sigma_A=sigma_A,
        sigma_B=sigma_B,
        sigma=sigma,
        cond_A=condition_number(sigma_A),
        cond_B=condition_number(sigma_B),
        cond_dW=condition_number(sigma),
        eff_rank=effective_rank(sigma),
        rank=numerical_rank(sigma),
    )
