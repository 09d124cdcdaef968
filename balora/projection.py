"""The BaLoRA projection: replace (A, B) by a balanced pair with the same product. Pure maths.

Balanced means B^T B = A A^T. With thin QR B = Q_B R_B, A^T = Q_A R_A and the SVD
U S V^T of the r x r core R_B R_A^T, the balanced pairs with product B A are

    B' = Q_B U S^{1/2} O,    A' = O^T S^{1/2} V^T Q_A^T,    O any orthogonal r x r.

Two gauges (choices of O):
  "svd"      O = I, the paper's choice. Its gauge (order, signs and rotations of the r
             directions) is whatever the SVD returns and can jump between steps.
  "nearest"  the balanced pair closest to the current (A, B) in Frobenius norm:
             O = polar(S^{1/2} (U^T R_B + V^T R_A)), the orthogonal Procrustes solution
             of min ||B' O - B||^2 + ||O^T A' - A||^2. The gauge then moves continuously,
             so Adam's per-coordinate moments keep referring to the same directions.

Everything is batched over a leading group dim G (modules of one shape): two thin QRs,
one r x r SVD (two for "nearest") and two (n, r) @ (r, r) products per group.

`gram_transforms` is the fast path for well-conditioned factors: from the r x r Gram
matrices alone it returns X, Y with B' = B X, A' = Y A (R_B, R_A from Cholesky of
B^T B and A A^T, so Q_B = B R_B^-1 and Q_A^T = R_A^-T A are never formed). That is one
read of each factor for the Grams and one (n, r) @ (r, r) product to write, instead of
CholeskyQR2's four passes; the price is accuracy eps * cond^2 instead of eps * cond, so
each pair carries an error estimate and the caller falls back to `balanced_factors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from balora.imbalance import RANK_RTOL, check_pair_shapes
from balora.linalg import all_finite, compute_dtype, polar_orthogonal, thin_qr_factored, triu_inverse
from balora.policy import METHODS, check_method  # noqa: F401 (METHODS re-exported: the gauges' names)


@dataclass
class Projection:
    """Balanced factors for G pairs, with what a caller needs to decide whether to use them."""

    A: torch.Tensor  # (G, r, in) balanced, in the compute dtype
    B: torch.Tensor  # (G, out, r)
    S: torch.Tensor  # (G, r) singular values of the unscaled product B A, descending
    rank: torch.Tensor  # (G,) numerical rank of B A
    zero: torch.Tensor  # (G,) bool: B A == 0 to rounding (PEFT init); projecting would kill training
    finite: torch.Tensor  # (G,) bool: inputs and outputs all finite


def balanced_factors(
    A: torch.Tensor, B: torch.Tensor, method: str = "nearest", rank_rtol: float = RANK_RTOL
) -> Projection:
    """Balanced pairs with the same products. A (G, r, in), B (G, out, r), r <= min(in, out).

    Computes in the wider of the two dtypes, fp32 at least (bf16/fp16 upcast: QR and SVD need it);
    the caller casts back.
    Pairs whose product is zero or non-finite come back unchanged and flagged.
    """
    check_method(method)
    check_pair_shapes(A, B, batched=True)
    r, n_in, n_out = A.shape[-2], A.shape[-1], B.shape[-2]
    if r > min(n_in, n_out):
        raise ValueError(f"rank r={r} exceeds min(in={n_in}, out={n_out}): the product is rank-deficient by shape")
    dtype = compute_dtype(A.dtype, B.dtype)  # both: fp32 A with float64 B must not round B to fp32
    A0, B0 = A.to(dtype), B.to(dtype)

    finite_in = all_finite(A0) & all_finite(B0)  # (G,)
    # Zero out non-finite pairs so one bad module cannot poison the batched decompositions.
    # (Checked first: balancing every step should not pay two full copies for a rare case.)
    all_ok = bool(finite_in.all())
    A_safe = A0 if all_ok else torch.where(finite_in[:, None, None], A0, torch.zeros_like(A0))
    B_safe = B0 if all_ok else torch.where(finite_in[:, None, None], B0, torch.zeros_like(B0))

    # Q_B = Q1_B @ T_B and Q_A = Q1_A @ T_A, never formed: see thin_qr_factored.
    Q1_B, T_B, R_B = thin_qr_factored(B_safe)  # (G, out, r), (G, r, r), (G, r, r)
    Q1_A, T_A, R_A = thin_qr_factored(A_safe.mT)  # (G, in, r), (G, r, r), (G, r, r)
    S, left, right = _svd_split(R_B @ R_A.mT)  # B' = Q_B @ left, A' = right @ Q_A^T
    if method == "nearest":
        # B'^T B = S^1/2 U^T R_B and A' A^T = S^1/2 V^T R_A: the Procrustes target is r x r.
        O = polar_orthogonal(left.mT @ R_B + right @ R_A)
        left, right = left @ O, O.mT @ right
    B_new = Q1_B @ (T_B @ left)  # (G, out, r)
    A_new = (right @ T_A.mT) @ Q1_A.mT  # (G, r, in)

    zero = _zero_products(S, R_B, R_A, n_in + n_out)
    rank = (S > rank_rtol * S[:, :1]).sum(-1)
    keep = zero | ~finite_in
    if bool(keep.any()):
        A_new = torch.where(keep[:, None, None], A0, A_new)
        B_new = torch.where(keep[:, None, None], B0, B_new)
    # thin_qr_factored gives finite Q1, T for finite input, so checking the r x r factors is enough.
    finite = finite_in & all_finite(left) & all_finite(right)
    return Projection(A=A_new, B=B_new, S=S, rank=rank, zero=zero, finite=finite)


def _zero_products(S: torch.Tensor, R_B: torch.Tensor, R_A: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) bool: B A is zero, or no larger than the rounding of computing it. PEFT's orthogonal init gives
    nonzero A and B (rank r/2 each) whose product is 0 in real arithmetic and ~u |B| |A| in fp32: balancing
    that noise shrank both factors to its square root (0.8 -> 3e-4), a saddle training hardly leaves.
    R_B, R_A: the thin QRs' R factors (as large as B and A); n = in + out. On this path that noise was at
    most 31 u max|R_B| max|R_A| (r = 2 to 256, n = 8 to 15,104, 40 draws of the small shapes);
    4 u (8 + r + sqrt(n)) is 4x above it or more, and below the product one Adam step at lr 1e-5 makes
    from such an init (~3e3 u); a smaller one is left alone as zero until steps make it larger."""
    u = torch.finfo(S.dtype).eps / 2
    tol = 4 * u * (8 + S.shape[-1] + math.sqrt(n))
    big_B, big_A = R_B.abs().amax((-2, -1)), R_A.abs().amax((-2, -1))
    # B A = sum_j b_j a_j (R's columns: B's columns, A's rows); a rounding zero is those terms cancelling.
    # |B| |A| alone is no scale for that: B's largest column can meet A's smallest row. An fp32 pair with
    # B's columns (1e-6, 1e3) and A's rows (1, 1e-6) has an exact product of 1e-3, which 1e3 called zero,
    # leaving its 1e6 imbalance unbalanced. So the scale is also at most 16 sum_j |b_j| |a_j| (the
    # orthogonal init's noise stayed under 0.18 tol of it, r = 2 to 256, 40 draws of the small shapes).
    col_B = torch.linalg.vector_norm(R_B / big_B[:, None, None], dim=-2)  # (G, r), scaled: no overflow
    col_A = torch.linalg.vector_norm(R_A / big_A[:, None, None], dim=-2)
    terms = (16 * (col_B * col_A).sum(-1)).clamp(max=1)  # (G,): that scale over |B| |A|
    # Divided, never multiplied: factors at any finite scale neither overflow nor underflow here (0/0 is
    # NaN, False, and then S == 0 says it).
    return (S[:, 0] == 0) | (S[:, 0] / big_B <= tol * big_A * terms)


def pad_to_rank(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (G, r, in) and B (G, out, r) with A's columns and B's rows zero-padded up to r where in or
    out < r (a product rank-deficient by shape), so their thin QRs exist. Zero padding is exact:
    the padded columns and rows stay zero, and slicing [:in] / [:out] afterwards drops them."""
    r = A.shape[-2]
    A = torch.nn.functional.pad(A, (0, max(r - A.shape[-1], 0)))  # (G, r, max(in, r))
    B = torch.nn.functional.pad(B, (0, 0, 0, max(r - B.shape[-2], 0)))  # (G, max(out, r), r)
    return A, B


def _svd_split(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """core (G, r, r) = U S V^T -> S (G, r), left = U S^1/2, right = S^1/2 V^T: the svd gauge's balanced split."""
    U, S, Vh = torch.linalg.svd(core)
    sqrt_S = S.sqrt()
    return S, U * sqrt_S[:, None, :], sqrt_S[:, :, None] * Vh


@dataclass
class Transforms:
    """r x r maps from the Gram matrices: B' = B @ X, A' = Y @ A, for G pairs."""

    X: torch.Tensor  # (G, r, r)
    Y: torch.Tensor  # (G, r, r)
    S: torch.Tensor  # (G, r) singular values of B A, descending
    accurate: torch.Tensor  # (G,) bool: X, Y are usable (estimated balance error <= tol)


# Accept the Gram path when its estimated relative balance error is below this (or below a
# tenth of the factors' own rounding, for bf16/fp16). Measured errors were at most ~15x the
# estimate (r = 4, where the BLAS accumulates the Gram least accurately), so this keeps the
# usual test of "balanced", rel_imbalance < 1e-5 in fp32, with a margin. One known exception:
# factors whose entries all have one magnitude, as B has right after Adam's first step from B = 0
# (every entry +-lr). Their fp32 sums round the same way term after term, so the Gram's error grows
# with the length (~250 u over 4096 rows, ~280x the estimate) and such pairs were left at
# rel_imbalance up to 2.4e-5 (the QR path, in fp32 too, 1.0e-5). Only float64 Grams would avoid it.
GRAM_TOL = 5e-7


def subnormal_floor(dtype: torch.dtype) -> float:
    """Smallest Gram norm the Gram path trusts. Grams near their dtype's subnormal range were
    rounded in absolute, not relative, terms (fp32 factors of ~1e-21 square to ~1e-42), which its
    error estimate does not describe; above tiny / u that absolute error is below u^2 relative.
    Pairs below go to the QR path, which upcasts tiny factors."""
    return torch.finfo(dtype).tiny / (torch.finfo(dtype).eps / 2)


def gram_transforms(G_A: torch.Tensor, G_B: torch.Tensor, method: str = "nearest",
                    unit_roundoff: float | torch.Tensor | None = None, tol: float | torch.Tensor = GRAM_TOL,
                    floor: float | torch.Tensor | None = None,
                    settled: float | torch.Tensor | None = None) -> Transforms:
    """Balancing maps from G_A = A A^T and G_B = B^T B (G, r, r), computed in float64.

    Same balanced pairs as `balanced_factors`, from the r x r Grams alone: with R_A from
    Cholesky (G_A = R_A^T R_A, so A^T = Q_A R_A) and the core R_B R_A^T = U S V^T (see
    _nearest_maps and _svd_maps for how each gauge gets there), B' = B X and A' = Y A.
    unit_roundoff: of the matmul that formed the Grams (default: their dtype's); a float, or (G,)
    per pair, like `tol`. floor: the smallest Gram norm trusted (subnormal_floor of the dtype the
    Grams were formed in; default: their dtype's), a float or (G,): pass it when the Grams were
    upcast after forming them.
    A Gram rounded by E moves the balanced pair's Gram by Y E Y^T (resp. X^T E X), so
    u (||Y Y^T|| ||G_A|| + ||X^T X|| ||G_B||) / (2 ||S||) estimates the rel_imbalance the
    result will have (||.||_inf >= ||.||_2 for the r x r products, Frobenius for the rest);
    pairs above `tol`, zero, singular or non-finite Grams, and numerically rank-deficient products
    (S_r <= RANK_RTOL S_1) come back with accurate = False for the QR path to redo.
    settled: a float or (G,): pairs already balanced to within it (rel_imbalance from the Grams;
    for "svd" also Grams diagonal to within it) get X = Y = I exactly and accurate = True, so
    writing them back changes no bit. Pass the storage dtype's unit roundoff: for bf16/fp16
    factors a new balanced pair differs from such a pair by less than its own rounding, and
    writing it would only re-round the factors (pass after pass, dW would random-walk).
    """
    check_method(method)
    if not (G_A.dim() == 3 and G_A.shape == G_B.shape and G_A.shape[-1] == G_A.shape[-2]):
        raise ValueError(f"G_A and G_B must be (G, r, r): A A^T and B^T B of a batch; got G_A {tuple(G_A.shape)}, "
                         f"G_B {tuple(G_B.shape)}")
    u = torch.finfo(G_A.dtype).eps / 2 if unit_roundoff is None else unit_roundoff
    floor = subnormal_floor(G_A.dtype) if floor is None else floor
    G_A, G_B = G_A.to(torch.float64), G_B.to(torch.float64)
    eye = torch.eye(G_A.shape[-1], dtype=torch.float64, device=G_A.device)
    # (G,); NaN if non-finite. A zero Gram may be a zero factor or an underflow: either way
    # the QR path (which tells them apart) gets the pair.
    norm_A, norm_B = torch.linalg.matrix_norm(G_A), torch.linalg.matrix_norm(G_B)
    R_A, info_A = torch.linalg.cholesky_ex(G_A, upper=True)  # G_A = R_A^T R_A: A^T = Q_A R_A
    ok = (info_A == 0) & torch.isfinite(norm_A) & torch.isfinite(norm_B)
    # Singular or non-finite entries get identity factors so they cannot poison the batch.
    R_A = torch.where(ok[:, None, None], R_A, eye)
    if method == "svd":
        X, Y, S, eig_cond, ok_B = _svd_maps(R_A, G_B, eye)
        ok = ok & ok_B
    else:
        X, Y, S, eig_cond = _nearest_maps(R_A, torch.where(ok[:, None, None], G_B, eye), eye)
    gain_A = _inf_norm(Y @ Y.mT)
    gain_B = _inf_norm(X.mT @ X)
    est = u * (gain_A * norm_A + gain_B * norm_B) / (2 * torch.linalg.vector_norm(S, dim=-1)) + eig_cond
    usable = ok & (norm_A > floor) & (norm_B > floor)
    # A numerically rank-deficient pair goes to the QR path, which rules on it (rank report, the
    # policy): the caller counts accepted pairs as full rank, and the svd gauge's estimate (no
    # eigen-conditioning term) accepted float64 pairs with S_r / S_1 down to ~1e-9.
    full_rank = S[:, -1] > RANK_RTOL * S[:, 0]
    accurate = usable & full_rank & (est <= tol) & all_finite(X) & all_finite(Y)  # NaN fails <=
    if settled is not None:
        keep = usable & full_rank & _settled(G_A, G_B, norm_A + norm_B, method, settled)
        X, Y = torch.where(keep[:, None, None], eye, X), torch.where(keep[:, None, None], eye, Y)
        accurate = accurate | keep
    return Transforms(X=X, Y=Y, S=S, accurate=accurate)


def _settled(G_A: torch.Tensor, G_B: torch.Tensor, norm_sum: torch.Tensor, method: str,
             settled: float | torch.Tensor) -> torch.Tensor:
    """(G,) bool: rel_imbalance ||G_B - G_A||_F / (||G_A||_F + ||G_B||_F) <= settled, and for "svd"
    the off-diagonal part of G_A + G_B at most `settled` of the same sum (the paper's gauge is
    balanced with diagonal Grams). NaN compares False."""
    rel = torch.linalg.matrix_norm(G_B - G_A) / norm_sum
    if method == "svd":
        G = G_A + G_B
        rel = torch.maximum(rel, torch.linalg.matrix_norm(G - torch.diag_embed(G.diagonal(dim1=-2, dim2=-1))) / norm_sum)
    return rel <= settled


def _inf_norm(M: torch.Tensor) -> torch.Tensor:
    """||M||_inf (the largest row sum of |M|) of a batch (G, r, r): matrix_norm(ord=inf) computes
    the same through a vector-norm path that costs ~150 us here instead of ~12."""
    return M.abs().sum(-1).amax(-1)


def _svd_maps(R_A: torch.Tensor, G_B: torch.Tensor, eye: torch.Tensor):
    """The paper's gauge is whatever the SVD of the core returns: keep the SVD. With G_B = R_B^T R_B
    (B = Q_B R_B), B' = Q_B U S^1/2 = B R_B^-1 U S^1/2 and A' = S^1/2 V^T Q_A^T = S^1/2 V^T R_A^-T A.
    Returns X, Y, S (descending), the eigen-conditioning term of the estimate (none) and where
    G_B's Cholesky succeeded."""
    R_B, info_B = torch.linalg.cholesky_ex(G_B, upper=True)
    ok_B = info_B == 0
    R_B = torch.where(ok_B[:, None, None], R_B, eye)
    S, left, right = _svd_split(R_B @ R_A.mT)  # B' = Q_B @ left, A' = right @ Q_A^T
    X = triu_inverse(R_B) @ left  # (G, r, r)
    Y = right @ triu_inverse(R_A).mT  # (G, r, r)
    return X, Y, S, torch.zeros_like(S[:, 0]), ok_B


def _nearest_maps(R_A: torch.Tensor, G_B: torch.Tensor, eye: torch.Tensor):
    """The nearest pair does not depend on the SVD's gauge, so one r x r eigh does (cheaper than an
    SVD on CPU), and only A's Cholesky: the core's right singular vectors and values come from
    core^T core = R_A G_B R_A^T = V S^2 V^T, then (U S^1/2 = core V S^-1/2)

        B' = B R_B^-1 U S^1/2 O = B R_A^T V S^-1/2 O,    A' = O^T S^1/2 V^T R_A^-T A,

    and the Procrustes target of balanced_factors, S^1/2 U^T R_B + S^1/2 V^T R_A, is
    M = S^-1/2 V^T R_A G_B + S^1/2 V^T R_A, with O = polar(M) (see _polar).
    The eigh squares a condition number; in float64 that is harmless until cond ~ 1e4, and the
    returned eigen-conditioning term of the error estimate says when it is not.
    Returns X, Y, S (G, r) descending, that term (G,)."""
    tiny = torch.finfo(torch.float64).tiny
    RG = R_A @ G_B  # (G, r, r)
    lam, V = torch.linalg.eigh(RG @ R_A.mT)  # ascending: the order does not matter to the nearest pair
    lam = lam.clamp_min(0)
    S = lam.sqrt()
    half = S.sqrt()[:, :, None]  # (G, r, 1): S^1/2 as a row scaling
    inv_half = 1 / half.clamp_min(tiny)
    Vt = V.mT
    Z = Vt @ R_A  # V^T R_A
    O, polar_err = _polar(inv_half * (Vt @ RG) + half * Z, eye)
    X = (Z.mT * inv_half.mT) @ O  # R_A^T V S^-1/2 O
    Y = O.mT @ (half * Vt) @ triu_inverse(R_A).mT  # O^T S^1/2 V^T R_A^-T
    eig_cond = torch.finfo(torch.float64).eps / 2 * lam[:, -1] / lam[:, 0] + polar_err  # inf when singular
    return X, Y, S.flip(-1), eig_cond


# Fixed-point steps of _polar's square root: enough for a pair one optimizer step away from
# balanced (a relative change of ~1e-3 per step off-diagonal takes 4 to reach float64 rounding).
POLAR_STEPS = 4
# _polar keeps the iteration's O where ||O O^T - I||_F is at most this, or at most r u cond(H), the
# accuracy any backward-stable polar reaches (the eigh route's own estimate, u cond(H)^2, is far
# looser: accepting up to it let a float64 pair's dW move by 1e-8 where the eigh kept 1e-12).
# The rest go through the eigh. Converged defects on the 1B-like benchmark were 2e-15 to 5e-15.
POLAR_DEFECT = 1e-13


def _polar(M: torch.Tensor, eye: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """O = polar(M) for M (G, r, r) in float64, and its share of the error estimate (G,).

    M = H O with H = (M M^T)^1/2, so O = H^-1 M. In the V basis of _nearest_maps, with
    W = V^T R_A, M = S^1/2 (S W^-T + W) and M M^T = S^1/2 (S (W W^T)^-1 S + 2 S + W W^T) S^1/2.
    For a balanced pair W W^T = S, so M M^T = 4 S^2 is diagonal; a pair imbalanced only by a
    scale (G_B = c^2 G_A) gives (c + 2 + 1/c) S^2, diagonal too. Only the rotational part of an
    imbalance puts anything off the diagonal, and one optimizer step after a balancing pass that
    is small. So H is found from its diagonal: with K = M M^T = diag(k) + E and H = diag(d) + F,
    d = k^1/2, H^2 = K reads (d_i + d_j) F_ij = (E - F^2)_ij, a fixed point reached in a few
    batched r x r products from F = 0 (each step multiplies the error by ~|F| / d). That costs
    about a third of an eigh of M^T M here.
    The result is checked, not trusted: ||O O^T - I||_F is measured, and a pair whose iteration did
    not settle to rounding (far from balanced: the first steps after PEFT's init, a large learning
    rate) is redone by the eigh route, M (M^T M)^-1/2, whose error bound grows as eps * cond(M)^2.
    """
    u = torch.finfo(torch.float64).eps / 2
    K = M @ M.mT  # (G, r, r)
    k = K.diagonal(dim1=-2, dim2=-1)  # (G, r)
    d = k.sqrt()
    E = K - torch.diag_embed(k)
    D = d[:, :, None] + d[:, None, :]  # (G, r, r): d_i + d_j
    F = E / D
    for _ in range(POLAR_STEPS - 1):
        F = (E - F @ F) / D
    L, _ = torch.linalg.cholesky_ex(F + torch.diag_embed(d))  # H is SPD: a failed factorisation leaves NaN or
    O = torch.cholesky_solve(M, L)  # garbage in O, which the check below refuses
    defect = torch.linalg.matrix_norm(O @ O.mT - eye)  # NaN fails every comparison
    ratio = k.amax(-1) / k.amin(-1)  # cond(M M^T) = cond(H)^2 (k spans M M^T's eigenvalues when H ~ diag)
    eig_err = u * ratio  # the eigh route's estimate
    bound = (M.shape[-1] * u * ratio.sqrt()).clamp_min(POLAR_DEFECT)
    redo = (~(defect <= bound)).nonzero()[:, 0]  # NaN anywhere: redone
    err = torch.maximum(defect, eig_err)
    if len(redo):  # on a GPU nonzero() waits for the device: a sync where stacked.maths_on_device runs the maps
        O_e, err_e = _polar_by_eigh(M[redo], eye)
        O, err = O.index_copy(0, redo, O_e), err.index_copy(0, redo, err_e)
    return O, err


def _polar_by_eigh(M: torch.Tensor, eye: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """polar(M) = M (M^T M)^-1/2 from one eigh, and its error estimate eps/2 * cond(M^T M) (G,)."""
    tiny = torch.finfo(torch.float64).tiny
    # A (nearly) singular core makes M^T M overflow: an identity there keeps the eigh from failing
    # for the whole batch; the pair is refused anyway (its error term or gains are infinite).
    MtM = M.mT @ M
    MtM = torch.where(all_finite(MtM)[:, None, None], MtM, eye)
    mu, W = torch.linalg.eigh(MtM)
    O = M @ (W / mu.clamp_min(tiny).sqrt()[:, None, :]) @ W.mT
    return O, torch.finfo(torch.float64).eps / 2 * mu[:, -1] / mu[:, 0]


def product_rel_error(A0: torch.Tensor, B0: torch.Tensor, A1: torch.Tensor, B1: torch.Tensor) -> torch.Tensor:
    """||B1 A1 - B0 A0||_F / ||B0 A0||_F for G pairs, (G,), without forming either product.

    Uses ||X Y||^2 = tr((X^T X)(Y Y^T)) and <B1 A1, B0 A0> = tr((B1^T B0)(A0 A1^T)), all r x r,
    accumulated in float64 so the subtraction does not cancel the answer away. 0/0 -> 0. The
    subtraction still limits what it can resolve: values below ~1e-8 (more where the product itself
    nearly cancels) read as noise or 0, so it tells "kept to ~1e-8" from "changed", no finer.
    """
    A0, B0, A1, B1 = (t.to(torch.float64) for t in (A0, B0, A1, B1))
    # The ratio does not change when every A is divided by one number and every B by another: by
    # their largest entries, so that factors near float64's range do not overflow to NaN.
    tiny = torch.finfo(torch.float64).tiny
    a = torch.maximum(A0.abs().amax(dim=(-2, -1)), A1.abs().amax(dim=(-2, -1))).clamp_min(tiny)  # (G,)
    b = torch.maximum(B0.abs().amax(dim=(-2, -1)), B1.abs().amax(dim=(-2, -1))).clamp_min(tiny)
    A0, A1 = A0 / a[:, None, None], A1 / a[:, None, None]
    B0, B1 = B0 / b[:, None, None], B1 / b[:, None, None]

    def inner(Bx, Ax, By, Ay):
        return ((Bx.mT @ By) * (Ay @ Ax.mT).mT).sum((-2, -1))

    old = inner(B0, A0, B0, A0)
    err2 = (inner(B1, A1, B1, A1) + old - 2 * inner(B1, A1, B0, A0)).clamp_min(0)
    return torch.where(old > 0, (err2 / old.clamp_min(1e-300)).sqrt(), err2.sqrt() * a * b)  # absolute when BA = 0
