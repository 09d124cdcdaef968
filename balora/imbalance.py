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


def check_pair_shapes(A: torch.Tensor, B: torch.Tensor, batched: bool = False) -> None:
    """ValueError naming A and B unless A is (..., r, in) and B (..., out, r) with the same batch dims
    and r (exactly (G, r, in) and (G, out, r) when `batched`): one unbatched pair, or the factors
    swapped, otherwise failed deep inside with a broadcasting message that names neither."""
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):  # numpy arrays failed on .dim / .abs
        raise TypeError(f"A and B must be torch tensors; got {type(A).__name__} and {type(B).__name__} "
                        "(torch.from_numpy converts numpy arrays)")
    dims = ("(G, r, in)", "(G, out, r)") if batched else ("(..., r, in)", "(..., out, r)")
    ok = A.dim() == B.dim() and A.dim() == 3 if batched else A.dim() == B.dim() and A.dim() >= 2
    if not (ok and A.shape[:-2] == B.shape[:-2] and A.shape[-2] == B.shape[-1]):
        raise ValueError(f"A must be {dims[0]} and B {dims[1]} with the same leading dims and r (A = lora_A.weight, "
                         f"B = lora_B.weight, PEFT's order); got A {tuple(A.shape)}, B {tuple(B.shape)}"
                         + (" (one pair: pass A[None], B[None])" if batched and A.dim() == 2 else ""))


def imbalance_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """D = B^T B - A A^T, (G, r, r), in the factors' dtype (see `imbalance` for a scale-safe norm)."""
    return B.mT @ B - A @ A.mT


# float64 factors whose largest entry is outside this range are divided by it before their Gram
# is formed (its entries, ~n * max^2, must stay inside float64). Every other float dtype's range
# squared fits in float64, so fp32/bf16/fp16 factors are only upcast: one pass, no division.
_F64_AS_IS = (1e-140, 1e140)


def _gram(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """X (G, n, r) finite -> (G_n = X^T X / s^2 (G, r, r) float64, s = max |X| (G,), X64, divided).

    The Gram is accumulated in float64 from the factor's own values, then divided by s^2, so
    any finite factor gives a Gram with entries of order 1 and its scale apart. X64 is X in
    float64, already divided by s when `divided` (float64 factors far from 1, see _F64_AS_IS).
    """
    scale = X.abs().amax(dim=(-2, -1)).to(torch.float64)  # (G,) exact (abs().amax: ~20x vector_norm(inf) on CPU)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    X64 = X.to(torch.float64)
    lo, hi = _F64_AS_IS
    if X.dtype == torch.float64 and bool(((scale > 0) & ((scale < lo) | (scale > hi))).any()):
        X64 = X64 / safe[:, None, None]
        return X64.mT @ X64, scale, X64, True
    return (X64.mT @ X64) / (safe * safe)[:, None, None], scale, X64, False


def _grams(A: torch.Tensor, B: torch.Tensor):
    """Normalized Grams G_A = A A^T / a^2, G_B = B^T B / b^2 (float64) and the scales a, b."""
    check_pair_shapes(A, B)
    G_A, a, _, _ = _gram(A.mT.reshape(-1, *A.shape[-1:-3:-1]))
    G_B, b, _, _ = _gram(B.reshape(-1, *B.shape[-2:]))
    batch = A.shape[:-2]
    return G_A.reshape(*batch, *G_A.shape[-2:]), G_B.reshape(*batch, *G_B.shape[-2:]), a.reshape(batch), b.reshape(batch)


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


# R comes from a Cholesky of the float64 Gram (one pass over the tall factor) when the factor is
# at most this ill-conditioned, and from a float64 thin QR (several passes) otherwise, or when
# the Gram is singular. The Gram route's relative error on the smallest singular value is about
# eps64 * cond^2: 1e-6 at this bound.
_GRAM_MAX_COND = 1e5


@dataclass
class _Factor:
    """One factor's normalized parts: X = s * X_n, X_n^T X_n = R^T R = G."""

    R: torch.Tensor  # (..., r, r); with n < r its last r - n rows are zero
    G: torch.Tensor  # (..., r, r) float64
    sv: torch.Tensor  # (..., r) singular values of X_n, descending
    scale: torch.Tensor  # (...,) max |X|


def _factor(X: torch.Tensor) -> _Factor:
    """X (..., n, r) finite, any float dtype -> its _Factor, everything in float64."""
    batch, (n, r) = X.shape[:-2], X.shape[-2:]
    G, scale, X64, divided = _gram(X.reshape(-1, n, r))
    R = torch.zeros_like(G)
    sv = torch.zeros(G.shape[:-1], dtype=G.dtype, device=G.device)
    todo = G.flatten(-2).abs().amax(-1) > 0  # a zero factor has R = 0, no decomposition needed
    if n >= r:
        L, info = torch.linalg.cholesky_ex(G, upper=True)
        L = torch.where((info == 0)[:, None, None], L, torch.eye(r, dtype=G.dtype, device=G.device))
        sv_L = torch.linalg.svdvals(L)  # identity for failed ones, never used
        ok = todo & (info == 0) & (sv_L[:, -1] * _GRAM_MAX_COND >= sv_L[:, 0])
        R = torch.where(ok[:, None, None], L, R)
        sv = torch.where(ok[:, None], sv_L, sv)
        todo = todo & ~ok
    if bool(todo.any()):
        Xn = X64[todo] if divided else X64[todo] / scale[todo][:, None, None]  # scale > 0 here
        R_qr = thin_r(Xn)  # (m, min(n, r), r)
        R[todo] = torch.nn.functional.pad(R_qr, (0, 0, 0, r - R_qr.shape[-2]))
        sv[todo] = torch.linalg.svdvals(R[todo])
    return _Factor(*(t.reshape(*batch, *t.shape[1:]) for t in (R, G, sv)), scale.reshape(batch))


def _spectra(A: torch.Tensor, B: torch.Tensor) -> tuple[_Factor, _Factor, torch.Tensor]:
    """Both factors' parts and the singular values of B_n A_n (..., r), float64, descending.
    dW is never formed: B A = Q_B (R_B R_A^T) Q_A^T, so its singular values are the core's."""
    fA, fB = _factor(A.mT), _factor(B)
    return fA, fB, torch.linalg.svdvals(fB.R @ fA.R.mT)


def singular_values(A: torch.Tensor, B: torch.Tensor, scaling=1.0):
    """Singular values (descending, each (G, r), float64) of A, of B and of dW = s B A,
    computed from the factors without forming dW: O((in + out) r^2) per pair, at any scale."""
    fA, fB, sC = _spectra(A, B)
    a, b = fA.scale, fB.scale
    s = torch.as_tensor(scaling, dtype=torch.float64, device=sC.device).abs()
    # One s per pair over the batch dims (or one float for all), broadcast along the r values.
    return fA.sv * a[..., None], fB.sv * b[..., None], sC * (a * b * s)[..., None]


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

    Grams accumulated in float64 and divided by each factor's largest entry squared, so any
    finite factors give finite scale-free values (rel_imbalance, cond, eff_rank, rank); a
    scaled value (norm, imbalance, sigma) is inf only where the true value exceeds float64.
    """
    fA, fB, sC = _spectra(A, B)
    a, b, sA, sB = fA.scale, fB.scale, fA.sv, fB.sv
    imb, rel = _imbalance_from_grams(fA.G, fB.G, a, b)
    s = torch.as_tensor(scaling, dtype=torch.float64, device=sC.device).abs()
    trace = lambda G: G.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731 ||X||_F^2 = tr(X^T X)
    return FactorStats(
        norm_A=trace(fA.G).sqrt() * a,
        norm_B=trace(fB.G).sqrt() * b,
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
