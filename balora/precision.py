"""What storing LoRA factors in fp16 or bf16 does to them and to dW. Pure tensor maths.

An imbalanced pair keeps its small factor near the bottom of the dtype's range: with
B scaled by 1e-4 and A by 1e4 (same dW), fp16's smallest normal (6.1e-5) swallows most of B
and the product changes by tens of percent, while the balanced pair with the same dW sits in
the middle of the range. Every function takes a batch: A (G, r, in), B (G, out, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balora.imbalance import normalized
from balora.linalg import all_finite

# The storage dtypes reported, by the short name used in report columns and on the command line.
HALF_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CastRisk:
    """What casting G pairs to one dtype does; every field is (G,) float64."""

    underflow: torch.Tensor  # fraction of entries of A and B, nonzero, below the dtype's smallest normal
    overflow: torch.Tensor  # fraction of entries of A and B that become +-inf
    dW_error: torch.Tensor  # ||B~ A~ - B A||_F / ||B A||_F with ~ the cast; inf if the cast overflows


def storage_risk(A: torch.Tensor, B: torch.Tensor, dtypes=tuple(HALF_DTYPES.values())) -> dict[torch.dtype, CastRisk]:
    """What storing A (G, r, in), B (G, out, r) in each of `dtypes` does: {dtype: CastRisk}.

    Underflow: nonzero entries smaller in magnitude than finfo(dtype).tiny, the smallest normal
    number (below it the dtype keeps fewer significant bits, and below half its smallest
    subnormal nothing). Overflow: finite entries that the cast turns into +-inf.
    dW error: see `cast_dw_error`. The factors are normalized once for all dtypes.
    """
    ct = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    total = max(A.shape[-2] * A.shape[-1] + B.shape[-2] * B.shape[-1], 1)
    magA, magB = A.abs(), B.abs()  # once: elementwise passes over the tall factors are most of the cost
    a, b = magA.amax((-2, -1)).to(torch.float64), magB.amax((-2, -1)).to(torch.float64)
    An = A.to(ct) / torch.where(a > 0, a, 1.0).to(ct)[..., None, None]
    Bn = B.to(ct) / torch.where(b > 0, b, 1.0).to(ct)[..., None, None]
    zeros = (magA == 0).sum((-2, -1)) + (magB == 0).sum((-2, -1))
    out = {}
    for dtype in dtypes:
        A_c, B_c = A.to(dtype), B.to(dtype)
        tiny = torch.finfo(dtype).tiny
        under = (magA < tiny).sum((-2, -1)) + (magB < tiny).sum((-2, -1)) - zeros
        over = (torch.isinf(A_c) & ~torch.isinf(A)).sum((-2, -1)) + (torch.isinf(B_c) & ~torch.isinf(B)).sum((-2, -1))
        error = _normalized_cast_error(An, Bn, a, b, A_c, B_c)
        out[dtype] = CastRisk(under.to(torch.float64) / total, over.to(torch.float64) / total, error)
    return out


def cast_dw_error(A: torch.Tensor, B: torch.Tensor, A_c: torch.Tensor, B_c: torch.Tensor) -> torch.Tensor:
    """||B_c A_c - B A||_F / ||B A||_F, (G,) float64, without forming either product.

    B_c A_c - B A = dB A_c + B dA with dA = A_c - A, dB = B_c - B; its squared norm is three
    traces of r x r products (<X Y, Z W> = tr((X^T Z)(W Y^T))), so nothing of size out x in
    is formed and the small difference is never recovered by subtracting two large products.
    Everything is divided by max|A| and max|B| first, so factors at any finite scale work.
    0 when both products are zero; inf when the cast overflowed or only the cast product is nonzero.
    """
    ct = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    An, a = normalized(A, ct)
    Bn, b = normalized(B, ct)
    return _normalized_cast_error(An, Bn, a, b, A_c, B_c)


def _normalized_cast_error(An, Bn, a, b, A_c, B_c) -> torch.Tensor:
    # The traces are accumulated in the factors' compute dtype (fp32 for fp32/bf16/fp16 factors):
    # with no cancellation of large terms, fp32 resolves relative errors far below the ~1e-4
    # that a half-precision cast causes, at half the cost of float64 over the tall factors.
    ct = An.dtype
    Acn = A_c.to(ct) / torch.where(a > 0, a, 1.0).to(ct)[..., None, None]
    Bcn = B_c.to(ct) / torch.where(b > 0, b, 1.0).to(ct)[..., None, None]
    dA, dB = Acn - An, Bcn - Bn

    def inner(X, Y, Z, W):  # <X Y, Z W>_F for X, Z (out, r) and Y, W (r, in), summed in float64
        return ((X.mT @ Z).double() * (W @ Y.mT).mT.double()).sum((-2, -1))

    err2 = (inner(dB, Acn, dB, Acn) + inner(Bn, dA, Bn, dA) + 2 * inner(dB, Acn, Bn, dA)).clamp_min(0)
    ref2 = inner(Bn, An, Bn, An)
    finite = all_finite(A_c) & all_finite(B_c)
    rel = torch.where(ref2 > 0, (err2 / ref2.clamp_min(torch.finfo(torch.float64).tiny)).sqrt(),
                      torch.where(err2 > 0, torch.inf, 0.0))
    return torch.where(finite, rel, torch.inf)


def cast_risk(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> CastRisk:
    """Underflow and overflow fractions and the relative change of dW when A, B are stored in `dtype`."""
    return storage_risk(A, B, (dtype,))[dtype]


def balanced_for_storage(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced pair (nearest gauge, what `balora balance` writes) of G pairs, computed in
    float64 and returned in the factors' compute dtype (fp32 for fp32/bf16/fp16 factors).

    Both factors are divided by one common scale c = max(max|A|, max|B|) first: the balanced
    pair of (A/c, B/c) is the balanced pair of (A, B) divided by c in the same gauge, and
    its Grams cannot overflow. r > min(in, out) is zero-padded up to r (exact: padded rows
    and columns stay zero). Zero products come back unchanged, as balancing leaves them.
    """
    from balora.projection import balanced_factors

    r, n_in, n_out = A.shape[-2], A.shape[-1], B.shape[-2]
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    c = torch.maximum(A64.abs().amax((-2, -1)), B64.abs().amax((-2, -1)))
    c = torch.where(c > 0, c, 1.0)[..., None, None]
    A_pad = torch.nn.functional.pad(A64 / c, (0, max(r - n_in, 0)))  # (G, r, max(in, r))
    B_pad = torch.nn.functional.pad(B64 / c, (0, 0, 0, max(r - n_out, 0)))  # (G, max(out, r), r)
    proj = balanced_factors(A_pad, B_pad, "nearest")
    # Back in the factors' compute dtype, as `balora balance` would write them before a cast.
    ct = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    return (proj.A[..., :n_in] * c).to(ct), (proj.B[..., :n_out, :] * c).to(ct)
