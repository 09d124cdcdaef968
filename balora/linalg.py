"""Batched thin QR for tall-skinny factors, the one decomposition everything else needs.

LoRA factors are tall and skinny: `B` is (out, r) and `A^T` is (in, r) with r << in, out.
Householder QR (`torch.linalg.qr`) on such matrices is dominated by BLAS-2 panel work and
on CPU costs about as much as an AdamW step over the same parameters. CholeskyQR2 does the
same job with two Gram matrices and two triangular solves, all BLAS-3, and is as accurate
as Householder while cond(X) stays below about eps^-1/2 (~3e3 in fp32). Entries that are
worse conditioned, rank-deficient or wider than tall fall back to Householder.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager

import torch

# CholeskyQR2 is backward stable for cond(X) < ~eps^-1/2; stay well inside that.
_CHOLQR_MAX_COND = 1e3
# The second pass orthogonalises Q1 = X R1^-1 to O(eps * cond(Q1)^2). ||Q1^T Q1 - I||_F <= 0.5
# bounds cond(Q1)^2 by 3, so passing this test guarantees an orthonormal Q whatever X was.
_CHOLQR_MAX_Q1_DEFECT = 0.5


def thin_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a batch of matrices.

    X: (..., n, r). Returns Q (..., n, k), R (..., k, r) with k = min(n, r), X = Q R,
    Q with orthonormal columns. Computed in X's dtype; callers pass fp32 or fp64.
    """
    n, r = X.shape[-2], X.shape[-1]
    if n < r or X.numel() == 0:
        return torch.linalg.qr(X, mode="reduced")
    batch_shape = X.shape[:-2]
    Q1, T, R = thin_qr_factored(X.reshape(-1, n, r))
    return (Q1 @ T).reshape(*batch_shape, n, r), R.reshape(*batch_shape, r, r)


def thin_r(X: torch.Tensor) -> torch.Tensor:
    """R (..., k, r) of the thin QR of X (..., n, r), k = min(n, r), without forming Q."""
    n, r = X.shape[-2], X.shape[-1]
    if n < r or X.numel() == 0:
        return torch.linalg.qr(X, mode="r")[1]
    _, _, R = thin_qr_factored(X.reshape(-1, n, r))
    return R.reshape(*X.shape[:-2], r, r)


def thin_qr_factored(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin QR with Q left as a product: X (G, n, r), n >= r -> Q1 (G, n, r), T (G, r, r),
    R (G, r, r) with Q = Q1 @ T orthonormal and X = Q R.

    Callers that only need Q @ M for a small M compute Q1 @ (T @ M): one pass over the tall
    matrix instead of two. T = R2^-1 of CholeskyQR2's second pass is within a factor sqrt(3)
    of orthogonal, so the reassociation costs no accuracy; T = I where Householder was used.
    """
    Q1, T, R, ok = _cholesky_qr2(X)
    if not bool(ok.all()):
        bad = (~ok).nonzero(as_tuple=True)[0]
        Qh, Rh = torch.linalg.qr(X[bad], mode="reduced")
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand(len(bad), -1, -1)
        Q1 = Q1.index_copy(0, bad, Qh)
        T = T.index_copy(0, bad, eye)
        R = R.index_copy(0, bad, Rh)
    return Q1, T, R


def _cholesky_qr2(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CholeskyQR2 on (G, n, r). Returns Q1, T, R (Q = Q1 @ T) and a (G,) mask of entries it got right."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    R1, info1 = torch.linalg.cholesky_ex(X.mT @ X, upper=True)  # (G, r, r)
    R1 = torch.where((info1 == 0)[:, None, None], R1, eye)
    R1_inv = triu_inverse(R1)
    # ||R||_F ||R^-1||_F bounds cond_2(X) = cond_2(R) from above (within a factor r): a real
    # estimate, unlike diag(R), which looks perfect for X = Q0 (I + t triu(1)) of any cond.
    cond = torch.linalg.matrix_norm(R1) * torch.linalg.matrix_norm(R1_inv)
    well_conditioned = (info1 == 0) & (cond <= _CHOLQR_MAX_COND)
    Q1 = X @ R1_inv  # (G, n, r)
    G2 = Q1.mT @ Q1  # (G, r, r)
    # Belt and braces: the second pass is only exact if Q1 is already nearly orthonormal.
    q1_close = torch.linalg.matrix_norm(G2 - eye) <= _CHOLQR_MAX_Q1_DEFECT
    R2, info2 = torch.linalg.cholesky_ex(G2, upper=True)
    ok = well_conditioned & q1_close & (info2 == 0)
    R2 = torch.where(ok[:, None, None], R2, eye)
    R2_inv = triu_inverse(R2)
    R = R2 @ R1
    # Q1 is finite when q1_close holds (a NaN fails the comparison), so Q = Q1 R2^-1 is finite
    # when the small R2^-1 is: no pass over the tall Q needed.
    ok = ok & torch.isfinite(R2_inv).flatten(1).all(-1) & torch.isfinite(R).flatten(1).all(-1)
    return Q1, R2_inv, R, ok


def triu_inverse(R: torch.Tensor) -> torch.Tensor:
    """Inverse of upper-triangular R (G, r, r).

    X @ R^-1 as a plain matmul instead of solve_triangular(R, X, left=False): on CPU the
    latter runs ~25x slower for tall X (G, n, r), and the guards above keep cond(R) <= 1e3,
    where forming the r x r inverse loses nothing measurable in fp32.
    """
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def polar_orthogonal(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor U V^T of M (..., r, r): the orthogonal matrix closest to M,
    and the maximiser of <O, M> over orthogonal O (orthogonal Procrustes)."""
    U, _, Vh = torch.linalg.svd(M)
    return U @ Vh


# Unit roundoff of an fp32 matmul under each of torch's fp32 matmul precisions.
_FP32_MATMUL_U = {"ieee": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}


def matmul_unit_roundoff(dtype: torch.dtype, device: torch.device | str | None = None) -> float:
    """Unit roundoff of a matmul in `dtype` as torch is set to run it on `device`'s kind (None: the
    coarser of the GPU's and the CPU's): fp32 matmuls run in TF32 or bf16 under
    torch.backends.fp32_precision = "tf32" (or a backend's own setting, as transformers' tf32=True
    makes) and under the older torch.set_float32_matmul_precision("high" / "medium")."""
    u = torch.finfo(dtype).eps / 2
    if dtype != torch.float32:
        return u
    return max(u, *(_FP32_MATMUL_U.get(p, u) for p in _fp32_matmul_precisions(device)))


def _fp32_matmul_precisions(device: torch.device | str | None) -> list[str]:
    """"ieee", "tf32" or "bf16" for the CUDA and/or CPU (oneDNN) matmul backends."""
    kind = None if device is None else torch.device(device).type
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: the legacy getters raise once this API was used
        backends = {"cuda": [torch.backends.cuda.matmul], "cpu": [torch.backends.mkldnn.matmul]}.get(
            kind, [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul])
        found = [b.fp32_precision if b.fp32_precision != "none" else torch.backends.fp32_precision for b in backends]
        return ["ieee" if p == "none" else p for p in found]
    legacy = {"highest": "ieee", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]
    if legacy == "ieee" and kind != "cpu" and torch.backends.cuda.matmul.allow_tf32:
        legacy = "tf32"
    return [legacy]


_FULL = threading.Lock()  # guards _full_depth and _full_saved across threads that balance at once
_full_depth = 0
_full_saved: tuple = ()


@contextmanager
def full_fp32_matmuls():
    """fp32 matmuls at full fp32 precision inside, whatever training set (TF32 or bf16 matmuls, as
    transformers' tf32=True does on a GPU), restored on exit. A balancing pass needs it: with TF32's
    11 bits its Grams cannot tell a balanced pair from its neighbours (the Gram path would refuse
    every pair) and its products would move dW by ~1e-3 every step. Its matmuls are a small share
    of a training step's, so the full precision costs little. Nested or concurrent uses (threads
    balancing at once) set it once and restore it when the last one leaves. torch.autocast is
    switched off inside too: a loop that runs optimizer.step() under it runs the training hooks
    under it, and bf16 Grams and products balanced only to ~3e-3 and moved dW by ~4e-3 every step."""
    global _full_depth, _full_saved
    with _FULL:
        if _full_depth == 0:
            _full_saved = _set_fp32_matmul_precision(None)
        _full_depth += 1
    try:
        with _no_autocast():
            yield
    finally:
        with _FULL:
            _full_depth -= 1
            if _full_depth == 0:
                _set_fp32_matmul_precision(_full_saved)


def _no_autocast() -> ExitStack:
    """torch.autocast off for every device type where it is on (its state is per thread); nothing
    entered where it is off, so a CPU-only torch never hears of "cuda"."""
    stack = ExitStack()
    for kind in _AUTOCAST_DEVICES:
        if _autocast_on(kind):
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_on(kind: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(kind))
    except TypeError:  # torch < 2.4: no device argument, one getter for the CPU and one for CUDA
        legacy = {"cpu": torch.is_autocast_cpu_enabled, "cuda": torch.is_autocast_enabled}.get(kind)
        return bool(legacy and legacy())
    except (RuntimeError, ValueError):  # a device type this torch build does not know
        return False


def _set_fp32_matmul_precision(saved: tuple | None) -> tuple:
    """Set full precision (saved=None) or put back what an earlier call returned; returns the
    settings it replaced, () when there was nothing to change (the default: fp32 matmuls already at
    full precision, and torch's settings are left exactly as they were). The per-backend settings
    on torch >= 2.9: while they differ from what the older API last set, reading that API
    (torch.get_float32_matmul_precision, allow_tf32) raises, in any thread, until they are put back."""
    if saved == ():
        return ()
    if hasattr(torch.backends, "fp32_precision"):
        backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        if saved is None and set(_fp32_matmul_precisions(None)) == {"ieee"}:
            return ()
        before = tuple(b.fp32_precision for b in backends)
        for b, p in zip(backends, saved or ("ieee", "ieee")):
            b.fp32_precision = p
        return before
    # torch < 2.9: allow_tf32 follows the precision (setting it True would make "medium" "high")
    before = torch.get_float32_matmul_precision()
    if saved is None and before == "highest":
        return ()
    torch.set_float32_matmul_precision(saved[0] if saved else "highest")
    return (before,)


def compute_dtype(A_dtype: torch.dtype, B_dtype: torch.dtype) -> torch.dtype:
    """The dtype a pair of factors is balanced and measured in: fp32 at least (decompositions and
    the Gram path's error estimate need it; bf16/fp16 factors are upcast)."""
    return torch.promote_types(torch.promote_types(A_dtype, B_dtype), torch.float32)


def all_finite(X: torch.Tensor) -> torch.Tensor:
    """(G,) True where X[g] has no NaN/Inf. One reduction pass (amax propagates NaN, and an
    Inf survives abs) instead of isfinite's four elementwise passes over X."""
    return torch.isfinite(X.abs().amax(dim=tuple(range(1, X.dim()))))
