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
    """D = B^T B - A A^T, (G, r, r), in the factors' dtype (see `imbalance` for a scale-safe norm)."""
    return B.mT @ B - A @ A.mT


def normalized(X: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """X (..., m, n) in `dtype` divided by its largest |entry|, and that scale (..., float64).

    Factors may hold entries anywhere from 1e-30 to 1e30 (a diverging run, a badly stored
    adapter): their Grams would under- or overflow even in float64 near the ends of that range,
    and in fp32 already at 1e20. Every quantity below is formed from the normalized factors
    (entries <= 1) and rescaled at the end. A zero factor keeps scale 0 and entries 0.
    """
    scale = X.abs().amax(dim=(-2, -1)).to(torch.float64)  # exact: every float fits in float64
    return X.to(dtype) / torch.where(scale > 0, scale, 1.0).to(dtype)[..., None, None], scale


def _grams(A: torch.Tensor, B: torch.Tensor):
    """Normalized Grams G_A = An An^T, G_B = Bn^T Bn (float64) and the scales a, b."""
    An, a = normalized(A)
    Bn, b = normalized(B)
    return An @ An.mT, Bn.mT @ Bn, a, b


def _imbalance_from_grams(G_A, G_B, a, b):
    """(||b^2 G_B - a^2 G_A||_F, rel_imbalance) without squaring a or b on their own scale.

    With m = max(a, b) both terms are formed at scale m^2 = 1 first; the norm is rescaled
    last (inf only when the true value exceeds float64). rel_imbalance is scale-free.
    """
    m = torch.maximum(a, b)
    m_safe = torch.where(m > 0, m, 1.0)
    wA, wB = ((a / m_safe) ** 2)[..., None, None], ((b / m_safe) ** 2)[..., None, None]
    num = torch.linalg.matrix_norm(wB * G_B - wA * G_A)
    den = torch.linalg.matrix_norm(wB * G_B) + torch.linalg.matrix_norm(wA * G_A)
    rel = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return num * m * m, rel


def imbalance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B^T B - A A^T||_F, (G,) float64, accurate for factors at any finite scale."""
    return _imbalance_from_grams(*_grams(A, B))[0]


def rel_imbalance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B^T B - A A^T||_F / (||B^T B||_F + ||A A^T||_F), in [0, 1], (G,) float64; 0 when both are zero.

    1 means one factor is zero (PEFT's B = 0 init), 0 means balanced. Scale-free, so it is
    finite for any finite factors.
    """
    return _imbalance_from_grams(*_grams(A, B))[1]


def product_core(A: torch.Tensor, B: torch.Tensor):
    """The triangular factors of both factors' thin QR and the small core of their product.

    B = Q_B R_B, A^T = Q_A R_A, so B A = Q_B (R_B R_A^T) Q_A^T and the singular values
    of B A are those of the core R_B R_A^T (kB, kA), with kB = min(out, r), kA = min(in, r).
    Q_A, Q_B are never formed: the spectra need only R. Returns (R_A (G, kA, r), R_B (G, kB, r), core).
    Computed in the factors' dtype: pass normalized factors (see `normalized`) for any scale.
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


def _normalized_spectra(An: torch.Tensor, Bn: torch.Tensor):
    """Singular values of An, Bn and An Bn's product (each (G, r), float64), and the Grams from R."""
    r = An.shape[-2]
    R_A, R_B, core = product_core(An, Bn)
    sv = [_pad_to(torch.linalg.svdvals(M), r) for M in (R_A, R_B, core)]
    # A A^T = R_A^T R_A and B^T B = R_B^T R_B: the Grams cost r x r products once R is known.
    return sv, R_A.mT @ R_A, R_B.mT @ R_B


def singular_values(A: torch.Tensor, B: torch.Tensor, scaling=1.0):
    """Singular values (descending, each (G, r), float64) of A, of B and of dW = s B A,
    computed from the factors without forming dW: O((in + out) r^2) per pair, at any scale."""
    An, a = normalized(A)
    Bn, b = normalized(B)
    (sA, sB, sC), _, _ = _normalized_spectra(An, Bn)
    s = torch.as_tensor(scaling, dtype=torch.float64, device=sC.device).abs()
    # One s per pair over the batch dims (or one float for all), broadcast along the r values.
    return sA * a[..., None], sB * b[..., None], sC * (a * b * s)[..., None]


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

    Computed in float64 from factors normalized to entries <= 1 (see `normalized`), so any
    finite factors give finite scale-free values (rel_imbalance, cond, eff_rank, rank); a
    scaled value (norm, imbalance, sigma) is inf only where the true value exceeds float64.
    """
    An, a = normalized(A)
    Bn, b = normalized(B)
    (sA, sB, sC), G_A, G_B = _normalized_spectra(An, Bn)
    imb, rel = _imbalance_from_grams(G_A, G_B, a, b)
    s = torch.as_tensor(scaling, dtype=torch.float64, device=sC.device).abs()
    return FactorStats(
        norm_A=torch.linalg.matrix_norm(An) * a,
        norm_B=torch.linalg.matrix_norm(Bn) * b,
        imbalance=imb,
        rel_imbalance=rel,
        sigma_A=sA * a[..., None],
        sigma_B=sB * b[..., None],
        sigma=sC * (a * b * s)[..., None],
        # Ratios and shapes of spectra are taken before rescaling: they cannot overflow.
        cond_A=condition_number(sA),
        cond_B=condition_number(sB),
        cond_dW=condition_number(sC),
        eff_rank=effective_rank(sC),
        rank=numerical_rank(sC),
    )
