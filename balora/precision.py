"""What storing LoRA factors in fp16 or bf16 does to them and to dW. Pure tensor maths.

An imbalanced pair keeps its small factor near the bottom of the dtype's range: with a typical
pair's B scaled by 1e-5 and A by 1e5 (same dW), all of B lies below fp16's smallest normal
(6.1e-5) and storing the pair in fp16 changes dW by 17%, while the balanced pair with the same
dW sits in the middle of the range and changes by 3e-4 (benchmarks/bench_precision.py). Every function takes a batch: A (G, r, in), B (G, out, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balora.linalg import all_finite, compute_dtype, full_fp32_matmuls, matmul_unit_roundoff

# The storage dtypes reported, by the short name used in report columns.
HALF_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What `balora balance --dtype` (balance_file(dtype=...)) can write, by torch's name.
STORAGE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A STORAGE_DTYPES name or dtype -> the torch dtype (None stays None); ValueError otherwise."""
    if dtype is None or dtype in STORAGE_DTYPES.values():
        return dtype  # type: ignore[return-value]
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unknown storage dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")


def cast_overflow(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Keys of `after`, a cast of `before`, with an infinity where `before` was finite: values beyond
    the new dtype's range (fp16: 65504), such as a large modules_to_save weight cast by --dtype."""
    return [k for k, t in after.items() if t.is_floating_point() and bool((before[k].isfinite() & ~t.isfinite()).any())]


@dataclass
class CastRisk:
    """What casting G pairs to one dtype does; every field is (G,) float64."""

    underflow: torch.Tensor  # fraction of entries of A and B, nonzero, below the dtype's smallest normal
    overflow: torch.Tensor  # fraction of entries of A and B that become +-inf
    dW_error: torch.Tensor  # ||B~ A~ - B A||_F / ||B A||_F with ~ the cast; inf if the cast overflows


# Factors whose largest entry lies in this range are used as they are: their r x r products stay
# far inside fp32's range (entries below n * 1e24), and skipping the division saves a pass over
# each tall factor. Outside it (or for float64 factors beyond it) both are divided by their max.
_AS_IS_RANGE = (1e-12, 1e12)


@dataclass
class _Prepared:
    """The factors in the compute dtype, scaled for safe products, and what every cast reuses."""

    A: torch.Tensor  # (G, r, in) in the compute dtype
    B: torch.Tensor  # (G, out, r)
    An: torch.Tensor  # A / sa
    Bn: torch.Tensor  # B / sb
    sa: torch.Tensor | None  # (G,) divisor, None when A is used as it is
    sb: torch.Tensor | None
    G_B: torch.Tensor  # (G, r, r) Bn^T Bn, float64
    ref2: torch.Tensor  # (G,) ||Bn An||_F^2, float64


def _prepare(A: torch.Tensor, B: torch.Tensor) -> _Prepared:
    ct = compute_dtype(A.dtype, B.dtype)
    A, B = (X if X.dtype == ct else X.to(ct) for X in (A, B))
    lo, hi = _AS_IS_RANGE
    scaled = []
    for X in (A, B):
        m = X.abs().amax(dim=(-2, -1))  # (G,) max |entry|, exact
        if bool(((m > 0) & ((m < lo) | (m > hi))).any()):
            s = torch.where(m > 0, m, torch.ones_like(m))
            scaled.append((X / s[..., None, None], s))
        else:
            scaled.append((X, None))
    (An, sa), (Bn, sb) = scaled
    # Grams in float64: ref2 = tr(G_B G_A) cancels where ||B A|| << ||B|| ||A||, and fp32 Grams'
    # rounding (~1e-7 ||B||^2 ||A||^2) then swamped it (an inf or a 100x too small error).
    A64, B64 = An.double(), Bn.double()
    G_A, G_B = A64 @ A64.mT, B64.mT @ B64
    return _Prepared(A, B, An, Bn, sa, sb, G_B, (G_B * G_A.mT).sum((-2, -1)))


def _cast_error(p: _Prepared, A_c: torch.Tensor, B_c: torch.Tensor, finite: torch.Tensor | None) -> torch.Tensor:
    """||B_c A_c - B A||_F / ||B A||_F from three traces of r x r products (see cast_dw_error).

    Accumulated in the compute dtype (fp32 for fp32/bf16/fp16 factors) and summed in float64:
    the terms are of the size of the error itself (no cancellation of large terms), so fp32
    resolves it far below the ~1e-4 a half-precision cast causes, at half float64's traffic.
    The denominator ||B A||^2 is not: it comes from _prepare's float64 Grams.
    """
    dA = A_c.to(p.A.dtype) - p.A  # exact (Sterbenz) where the cast kept the value's binade
    dB = B_c.to(p.B.dtype) - p.B
    if p.sa is not None:
        dA = dA / p.sa[..., None, None]
    if p.sb is not None:
        dB = dB / p.sb[..., None, None]
    Acn = p.An + dA  # the cast A, scaled like An

    def tr(X, Y):  # sum(X * Y^T) = tr(X Y) for (G, r, r), in float64
        return (X.double() * Y.double().mT).sum((-2, -1))

    # B_c A_c - B A = dB A_c + B dA: ||dB A_c||^2 + ||B dA||^2 + 2 <dB A_c, B dA>.
    err2 = tr(dB.mT @ dB, Acn @ Acn.mT) + tr(p.G_B, dA @ dA.mT) + 2 * tr(dB.mT @ p.Bn, dA @ Acn.mT)
    err2 = err2.clamp_min(0)
    tiny = torch.finfo(torch.float64).tiny
    rel = torch.where(p.ref2 > 0, (err2 / p.ref2.clamp_min(tiny)).sqrt(), torch.where(err2 > 0, torch.inf, 0.0))
    return rel if finite is None else torch.where(finite, rel, torch.inf)


def storage_risk(A: torch.Tensor, B: torch.Tensor, dtypes=tuple(HALF_DTYPES.values())) -> dict[torch.dtype, CastRisk]:
    """What storing finite A (G, r, in), B (G, out, r) in each of `dtypes` does: {dtype: CastRisk}.

    Underflow: nonzero entries smaller in magnitude than finfo(dtype).tiny, the smallest normal
    number (below it the dtype keeps fewer significant bits, and below half its smallest
    subnormal nothing). Overflow: finite entries that the cast turns into +-inf.
    dW error: see `cast_dw_error`. What does not depend on the dtype is computed once.
    """
    p = _prepare(A, B)
    total = max(A.shape[-2] * A.shape[-1] + B.shape[-2] * B.shape[-1], 1)
    magA, magB = p.A.abs(), p.B.abs()
    biggest = torch.maximum(magA.amax((-2, -1)), magB.amax((-2, -1)))  # (G,)
    # count_nonzero, not bool .sum(): the latter first copies the mask to int64 (~10x slower on CPU).
    count = lambda mask: torch.count_nonzero(mask, dim=(-2, -1))  # noqa: E731
    zeros = count(magA == 0) + count(magB == 0)
    out = {}
    for dtype in dtypes:
        A_c, B_c = A.to(dtype), B.to(dtype)
        under = count(magA < torch.finfo(dtype).tiny) + count(magB < torch.finfo(dtype).tiny) - zeros
        finite = None
        over = torch.zeros_like(zeros)
        if bool((biggest >= torch.finfo(dtype).max).any()):  # only then can the cast give inf
            over = count(torch.isinf(A_c)) + count(torch.isinf(B_c))
            finite = over == 0
        error = _cast_error(p, A_c, B_c, finite)
        out[dtype] = CastRisk(under.to(torch.float64) / total, over.to(torch.float64) / total, error)
    return out


def cast_dw_error(A: torch.Tensor, B: torch.Tensor, A_c: torch.Tensor, B_c: torch.Tensor) -> torch.Tensor:
    """||B_c A_c - B A||_F / ||B A||_F, (G,) float64, without forming either product.

    B_c A_c - B A = dB A_c + B dA with dA = A_c - A, dB = B_c - B; its squared norm is three
    traces of r x r products (<X Y, Z W> = tr((X^T Z)(W Y^T))), so nothing of size out x in
    is formed and the small difference is never recovered by subtracting two large products.
    Factors far from 1 are divided by their largest entry first, so any finite scale works.
    0 when both products are zero; inf when the cast overflowed or only the cast product is nonzero.
    """
    finite = all_finite(A_c) & all_finite(B_c)
    return _cast_error(_prepare(A, B), A_c, B_c, finite)


@full_fp32_matmuls()  # its Grams and products, as a balancing pass's
def balanced_for_storage(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced pair (nearest gauge, what `balora balance` writes) of G pairs, in the factors'
    compute dtype (fp32 for fp32/bf16/fp16 factors).

    As balance_pairs does: the Gram path (r x r maps from the float64 Grams, one product per
    factor) where its error estimate accepts it, the QR path (float64) for the others. Both
    factors are first divided by one common scale c = max(max|A|, max|B|) when they are far from
    1: the balanced pair of (A/c, B/c) is the balanced pair of (A, B) divided by c, in the same
    gauge, and its Grams cannot overflow; that is done in float64, where the smaller factor divided
    by c cannot underflow (1e-30 / 1e30 does in fp32). Zero products come back unchanged.
    """
    from balora.projection import gram_transforms, subnormal_floor

    ct = compute_dtype(A.dtype, B.dtype)
    A, B = (X if X.dtype == ct else X.to(ct) for X in (A, B))
    c = torch.maximum(A.abs().amax(dim=(-2, -1)), B.abs().amax(dim=(-2, -1)))  # (G,)
    c = torch.where(c > 0, c, torch.ones_like(c))
    lo, hi = _AS_IS_RANGE
    scale = bool(((c < lo) | (c > hi)).any())
    An, Bn = (A.double() / c.double()[..., None, None], B.double() / c.double()[..., None, None]) if scale else (A, B)
    wt = An.dtype  # the working dtype: float64 when scaled
    r, n_in, n_out = A.shape[-2], A.shape[-1], B.shape[-2]
    A_new, B_new = An.clone(), Bn.clone()
    todo = torch.ones(A.shape[0], dtype=torch.bool, device=A.device)
    if r <= min(n_in, n_out):  # otherwise the Grams are singular by shape
        t = gram_transforms((An @ An.mT).double(), (Bn.mT @ Bn).double(), "nearest", matmul_unit_roundoff(wt, A.device),
                            floor=subnormal_floor(wt))  # formed in wt, then upcast
        ok = t.accurate.to(A.device)
        A_new[ok] = t.Y[ok].to(wt) @ An[ok]  # A' = Y A (r, in)
        B_new[ok] = Bn[ok] @ t.X[ok].to(wt)  # B' = B X (out, r)
        todo = ~ok
    if bool(todo.any()):
        A_new[todo], B_new[todo] = _qr_balanced(An[todo], Bn[todo])
    if scale:
        c = c.double()[..., None, None]
        return (A_new * c).to(ct), (B_new * c).to(ct)
    return A_new, B_new


def _qr_balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """projection.balanced_factors in float64, zero-padded up to r when r > min(in, out) (exact:
    padded rows and columns stay zero), back in the factors' dtype."""
    from balora.projection import balanced_factors, pad_to_rank

    n_in, n_out = A.shape[-1], B.shape[-2]
    proj = balanced_factors(*pad_to_rank(A.double(), B.double()), "nearest")
    return proj.A[..., :n_in].to(A.dtype), proj.B[..., :n_out, :].to(B.dtype)
