"""balora.linalg: thin QR (CholeskyQR2 with a Householder fallback) and the polar factor,
checked against float64 identities (Q^T Q = I, Q R = X) and numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balora.linalg import polar_orthogonal, thin_qr

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def _qr_errors(X, Q, R):
    """(||Q^T Q - I||_F, ||Q R - X||_F / ||X||_F) per batch entry, in float64."""
    X, Q, R = X.double(), Q.double(), R.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    orth = torch.linalg.matrix_norm(Q.mT @ Q - eye)
    scale = torch.linalg.matrix_norm(X).clamp_min(1e-300)
    return orth, torch.linalg.matrix_norm(Q @ R - X) / torch.where(scale > 1e-300, scale, torch.ones_like(scale))


def _assert_accurate(X, Q, R, dtype):
    n, r = X.shape[-2], X.shape[-1]
    k = min(n, r)
    assert Q.shape == (*X.shape[:-2], n, k) and R.shape == (*X.shape[:-2], k, r)
    assert Q.dtype == dtype and R.dtype == dtype
    orth, res = _qr_errors(X, Q, R)
    # Householder reaches a few eps per column here (measured 2-6 eps * r for these sizes);
    # 4 eps * r is what a stable QR must reach, and a CholeskyQR2 run on too ill-conditioned
    # an input misses it by orders of magnitude.
    tol = 4 * EPS[dtype] * r
    assert float(orth.max()) < tol, f"Q not orthonormal: {orth.tolist()} (tol {tol:.1e})"
    assert float(res.max()) < tol, f"Q R != X: {res.tolist()} (tol {tol:.1e})"


@pytest.fixture
def count_householder(monkeypatch):
    """Counts the matrices sent to torch.linalg.qr (the fallback), still computing them."""
    calls = []
    real_qr = torch.linalg.qr

    def spy(X, mode="reduced"):
        calls.append(X.shape[0] if X.ndim == 3 else 1)
        return real_qr(X, mode=mode)

    monkeypatch.setattr(torch.linalg, "qr", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_well_conditioned_batch(dtype, make_conditioned, count_householder):
    X = torch.stack([make_conditioned(40, 6, 50.0, dtype, seed=s) for s in range(5)])  # (5, 40, 6)
    count_householder.clear()  # building X used torch.linalg.qr too
    Q, R = thin_qr(X)
    _assert_accurate(X, Q, R, dtype)
    assert torch.equal(R, R.triu()), "R must be upper triangular"
    assert sum(count_householder) == 0, "well-conditioned input should not need the fallback"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extra_batch_dims(dtype, make_factors):
    A, _ = make_factors((2, 3), r=5, n_in=30, dtype=dtype)
    Q, R = thin_qr(A.mT)  # (2, 3, 30, 5)
    _assert_accurate(A.mT, Q, R, dtype)
    for i in range(2):
        for j in range(3):
            Qi, Ri = thin_qr(A.mT[i, j][None])
            torch.testing.assert_close(Q[i, j], Qi[0])
            torch.testing.assert_close(R[i, j], Ri[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cond_1e5_falls_back_and_stays_accurate(dtype, make_conditioned, count_householder):
    # cond 1e5 is past CholeskyQR2's range in fp32 (cond^2 > 1/eps) and past the 1e3 margin in fp64.
    X = torch.stack([make_conditioned(64, 8, 1e5, dtype, seed=s) for s in range(6)])
    count_householder.clear()  # building X used torch.linalg.qr too
    Q, R = thin_qr(X)
    _assert_accurate(X, Q, R, dtype)
    assert sum(count_householder) == 6, "every ill-conditioned entry must go to Householder"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r,t", [(8, 5.0), (12, 8.0), (16, 3.0)])
def test_ill_conditioned_with_unit_diagonal(dtype, r, t):
    """X = Q0 (I + t triu(1)): cond from 5e5 to 1e11 but diag(R) all ones, so a condition
    estimate from diag(R) alone sees a perfectly conditioned matrix. Q must stay orthonormal."""
    g = torch.Generator().manual_seed(r)
    Q0, _ = torch.linalg.qr(torch.randn(128, r, generator=g, dtype=torch.float64))
    R0 = torch.eye(r, dtype=torch.float64) + t * torch.ones(r, r, dtype=torch.float64).triu(1)
    X64 = Q0 @ R0
    assert np.linalg.cond(X64.numpy()) > 1e5
    X = X64.to(dtype)[None]
    Q, R = thin_qr(X)
    _assert_accurate(X, Q, R, dtype)


def test_mixed_batch_entries_are_independent(make_conditioned):
    good = make_conditioned(50, 6, 10.0, torch.float32, seed=1)
    bad = make_conditioned(50, 6, 1e6, torch.float32, seed=2)
    X = torch.stack([good, bad, good * 3])
    Q, R = thin_qr(X)
    _assert_accurate(X, Q, R, torch.float32)
    Qg, Rg = thin_qr(good[None])
    torch.testing.assert_close(Q[0], Qg[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(R[0], Rg[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient(dtype):
    g = torch.Generator().manual_seed(3)
    X = (torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64))
    X = torch.stack([X, X[:, [0, 0, 1, 1, 2]]]).to(dtype)  # rank 2 and rank 2 with repeated columns
    Q, R = thin_qr(X)
    _assert_accurate(X, Q, R, dtype)
    # The rank survives in R: its singular values are those of X.
    sv_R = np.linalg.svd(R.double().numpy(), compute_uv=False)
    sv_X = np.linalg.svd(X.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(sv_R, sv_X, atol=100 * EPS[dtype] * float(sv_X.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_input(dtype):
    X = torch.zeros(2, 20, 4, dtype=dtype)
    Q, R = thin_qr(X)
    assert torch.all(R == 0)
    orth, _ = _qr_errors(X, Q, R)
    assert float(orth.max()) < 100 * EPS[dtype]
    assert torch.isfinite(Q).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_input(dtype, make_factors):
    # n < r: an adapter with r larger than a layer's fan-in.
    A, _ = make_factors(3, r=9, n_in=5, dtype=dtype)
    X = A.mT  # (3, 5, 9)
    Q, R = thin_qr(X)
    assert Q.shape == (3, 5, 5) and R.shape == (3, 5, 9)
    _assert_accurate(X, Q, R, dtype)


def test_empty_batch():
    Q, R = thin_qr(torch.zeros(0, 10, 3))
    assert Q.shape == (0, 10, 3) and R.shape == (0, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_orthogonal_matches_numpy_and_maximises_trace(dtype):
    g = torch.Generator().manual_seed(5)
    M = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    O = polar_orthogonal(M.to(dtype)).double()
    eye = torch.eye(6, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(O.mT @ O - eye).max()) < 100 * EPS[dtype]
    U, _, Vh = np.linalg.svd(M.numpy())
    np.testing.assert_allclose(O.numpy(), U @ Vh, atol=1e3 * EPS[dtype])
    # Procrustes: <O, M> is at least as large as for any other orthogonal matrix.
    best = (O * M).sum((-2, -1))
    for s in range(20):
        P, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
        assert torch.all(best >= (P * M).sum((-2, -1)) - 1e-5)
