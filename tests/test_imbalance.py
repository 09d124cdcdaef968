"""balora.imbalance against float64 numpy on the formed matrices: imbalance, rel_imbalance,
singular values of A, B and dW = s B A (balora never forms dW; numpy does), condition numbers,
effective and numerical rank, for batches, r > min(in, out) and zero factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balora.imbalance import (
    RANK_RTOL,
    condition_number,
    effective_rank,
    factor_stats,
    imbalance,
    imbalance_matrix,
    numerical_rank,
    rel_imbalance,
    singular_values,
)

# Relative accuracy expected of each compute dtype, as a fraction of the largest value compared.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _padded_svd(M, r):
    """Singular values of M (float64 numpy), descending, zero-padded or cut to length r."""
    sv = np.linalg.svd(M, compute_uv=False)
    out = np.zeros(r)
    out[: min(r, sv.size)] = sv[:r]
    return out


def _np_reference(A, B, s):
    """Every diagnostic of one pair from the formed float64 matrices."""
    r = A.shape[0]
    BtB, AAt = B.T @ B, A @ A.T
    imb = np.linalg.norm(BtB - AAt)
    den = np.linalg.norm(BtB) + np.linalg.norm(AAt)
    dW = s * B @ A
    sigma = _padded_svd(dW, r)
    p = sigma / sigma.sum() if sigma.sum() > 0 else sigma
    nz = p[p > 0]
    return {
        "imbalance": imb,
        "rel_imbalance": imb / den if den > 0 else 0.0,
        "sigma": sigma,
        "sigma_A": _padded_svd(A, r),
        "sigma_B": _padded_svd(B, r),
        "eff_rank": float(np.exp(-(nz * np.log(nz)).sum())) if sigma.sum() > 0 else 0.0,
        "rank": int(np.linalg.matrix_rank(dW, tol=RANK_RTOL * sigma[0])) if sigma[0] > 0 else 0,
        "norm_A": np.linalg.norm(A),
        "norm_B": np.linalg.norm(B),
    }


def _items(A, B):
    """Iterate (index, A_i, B_i) over all batch dims, as float64 numpy."""
    batch = A.shape[:-2]
    for idx in np.ndindex(*batch):
        yield idx, A[idx].double().numpy(), B[idx].double().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(3,), (2, 3)])
def test_imbalance_vs_numpy(dtype, batch, make_factors):
    A, B = make_factors(batch, r=4, n_in=12, n_out=10, dtype=dtype)
    imb, rel, D = imbalance(A, B), rel_imbalance(A, B), imbalance_matrix(A, B)
    assert imb.shape == batch and rel.shape == batch and D.shape == (*batch, 4, 4)
    for idx, a, b in _items(A, B):
        ref = _np_reference(a, b, 1.0)
        np.testing.assert_allclose(D[idx].double().numpy(), b.T @ b - a @ a.T, rtol=0,
                                   atol=RTOL[dtype] * np.abs(b.T @ b - a @ a.T).max())
        np.testing.assert_allclose(float(imb[idx]), ref["imbalance"], rtol=RTOL[dtype])
        np.testing.assert_allclose(float(rel[idx]), ref["rel_imbalance"], rtol=RTOL[dtype])
        assert 0 < float(rel[idx]) < 1


def test_package_imbalance_is_the_function_once_its_module_is_imported(make_factors):
    # `balora.imbalance` names a public function and the module defining it; importing the module
    # (this file does, as does anything that measures) bound the module on the package, and
    # `balora.imbalance(A, B)` raised "'module' object is not callable".
    import balora
    import balora.imbalance  # noqa: F401  (what any report or balancing pass does first)

    A, B = make_factors((3,), r=4, n_in=12, n_out=10, dtype=torch.float64)
    for idx, a, b in _items(A, B):
        np.testing.assert_allclose(float(balora.imbalance(A, B)[idx]), _np_reference(a, b, 1.0)["imbalance"],
                                   rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "r,n_in,n_out",
    [(4, 12, 10), (1, 7, 5), (6, 4, 10), (6, 10, 4), (8, 3, 2)],  # the last three have r > min(in, out)
)
def test_singular_values_vs_formed_product(dtype, r, n_in, n_out, make_factors):
    A, B = make_factors(3, r=r, n_in=n_in, n_out=n_out, dtype=dtype, seed=r + n_in)
    scaling = torch.tensor([0.5, -2.0, 16.0], dtype=torch.float64)  # a negative s flips signs, not sigma
    sA, sB, s = singular_values(A, B, scaling)
    assert sA.shape == sB.shape == s.shape == (3, r)
    for (g,), a, b in _items(A, B):
        ref = _np_reference(a, b, float(scaling[g]))
        for got, want in ((s[g], ref["sigma"]), (sA[g], ref["sigma_A"]), (sB[g], ref["sigma_B"])):
            np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=RTOL[dtype] * want.max())
        if r > min(n_in, n_out):
            assert torch.all(s[g, min(n_in, n_out):] == 0), "missing directions must be exact zeros"
    if r > min(n_in, n_out):
        st = factor_stats(A, B, scaling)
        assert torch.isinf(st.cond_dW).all() and torch.all(st.rank == min(n_in, n_out))
        assert torch.all(st.eff_rank <= min(n_in, n_out) + 1e-4)


def test_singular_values_scalar_and_batch_dims(make_factors):
    A, B = make_factors((2, 3), r=3, n_in=9, n_out=7, dtype=torch.float64)
    _, _, s_float = singular_values(A, B, 3.0)
    scaling = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(2, 3)
    _, _, s_tensor = singular_values(A, B, scaling)
    assert s_float.shape == s_tensor.shape == (2, 3, 3)
    for idx, a, b in _items(A, B):
        np.testing.assert_allclose(s_float[idx].numpy(), _padded_svd(3.0 * b @ a, 3), rtol=1e-12)
        np.testing.assert_allclose(s_tensor[idx].numpy(), _padded_svd(float(scaling[idx]) * b @ a, 3), rtol=1e-12)
    # One unbatched pair keeps its shape: (r,) like its factors' spectra.
    sA, sB, s = singular_values(A[0, 0], B[0, 0], 3.0)
    assert sA.shape == sB.shape == s.shape == (3,)
    torch.testing.assert_close(s, s_float[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_stats_vs_numpy(dtype, make_factors):
    A, B = make_factors(4, r=5, n_in=16, n_out=11, dtype=dtype, seed=3)
    # Entry 2: a rank-2 product (B has rank 2), entry 3: a rank-1 product.
    g = torch.Generator().manual_seed(9)
    B[2] = (torch.randn(11, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g,
                                                                              dtype=torch.float64)).to(dtype)
    A[3] = (torch.randn(5, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 16, generator=g,
                                                                             dtype=torch.float64)).to(dtype)
    scaling = torch.tensor([2.0, 0.25, 1.0, 8.0], dtype=torch.float64)
    st = factor_stats(A, B, scaling)
    for (i,), a, b in _items(A, B):
        ref = _np_reference(a, b, float(scaling[i]))
        tol = RTOL[dtype]
        for name in ("imbalance", "rel_imbalance", "norm_A", "norm_B", "eff_rank"):
            np.testing.assert_allclose(float(getattr(st, name)[i]), ref[name], rtol=tol * 10, err_msg=name)
        np.testing.assert_allclose(st.sigma[i].double().numpy(), ref["sigma"], rtol=0, atol=tol * ref["sigma"][0])
        assert int(st.rank[i]) == ref["rank"]
        for cond, M, full_rank in ((st.cond_A, a, i != 3), (st.cond_B, b, i != 2), (st.cond_dW, b @ a, i < 2)):
            if full_rank:
                sv = _padded_svd(M, 5)
                np.testing.assert_allclose(float(cond[i]), sv[0] / sv[-1], rtol=tol * 100)
            else:
                # The last singular value is rounding noise: cond is huge or inf, never a modest number.
                assert float(cond[i]) > 1e4
    assert [int(x) for x in st.rank] == [5, 5, 2, 1]
    assert float(st.eff_rank[3]) == pytest.approx(1.0, abs=10 * RTOL[dtype])


def test_zero_factors():
    A = torch.zeros(3, 4, 12)
    B = torch.zeros(3, 10, 4)
    A[1] = torch.randn(4, 12)  # PEFT's Linear init: A random, B = 0
    B[2] = torch.randn(10, 4)  # PEFT's Embedding init: A = 0, B random
    st = factor_stats(A, B, 2.0)
    assert st.imbalance[0] == 0 and st.rel_imbalance[0] == 0, "0/0 is reported as balanced, not NaN"
    assert st.rel_imbalance[1] == 1 and st.rel_imbalance[2] == 1, "one zero factor is the worst case, exactly 1"
    assert torch.all(st.sigma == 0)
    assert torch.all(st.rank == 0) and torch.all(st.eff_rank == 0)
    assert torch.isnan(st.cond_dW).all(), "cond of a zero product is undefined"
    assert torch.isnan(st.cond_A[0]) and torch.isfinite(st.cond_A[1]) and torch.isnan(st.cond_B[1])
    for t in (st.imbalance, st.rel_imbalance, st.sigma, st.sigma_A, st.sigma_B, st.norm_A, st.norm_B):
        assert torch.isfinite(t).all()


def test_invariances(make_factors):
    A, B = make_factors(2, r=4, n_in=9, n_out=8, dtype=torch.float64, seed=4)
    g = torch.Generator().manual_seed(11)
    O, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    T = torch.randn(4, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
    _, _, s0 = singular_values(A, B, 1.0)
    # Orthogonal T: D -> O^T D O, so ||D|| and rel_imbalance are unchanged.
    torch.testing.assert_close(imbalance(O.mT @ A, B @ O), imbalance(A, B))
    torch.testing.assert_close(rel_imbalance(O.mT @ A, B @ O), rel_imbalance(A, B))
    # General T: same product, same spectrum of dW, different imbalance.
    A_t, B_t = torch.linalg.solve(T, A), B @ T
    torch.testing.assert_close(singular_values(A_t, B_t, 1.0)[2], s0)
    assert torch.all((imbalance(A_t, B_t) - imbalance(A, B)).abs() > 1e-3 * imbalance(A, B))


def test_half_precision_is_upcast(make_factors):
    A, B = make_factors(2, r=4, n_in=12, n_out=10, dtype=torch.bfloat16)
    st = factor_stats(A, B, 2.0)
    ref = factor_stats(A.float(), B.float(), 2.0)
    assert st.sigma.dtype == torch.float64  # diagnostics accumulate in float64
    for name in ("imbalance", "rel_imbalance", "sigma", "sigma_A", "sigma_B", "cond_dW", "eff_rank", "rank"):
        torch.testing.assert_close(getattr(st, name), getattr(ref, name), msg=name)


def test_scalar_helpers():
    sigma = torch.tensor([[3.0, 3.0, 3.0], [5.0, 0.0, 0.0], [4.0, 2.0, 1.0], [0.0, 0.0, 0.0],
                          [1.0, 1e-3, 1e-7]])
    assert effective_rank(sigma)[0] == pytest.approx(3.0)
    assert effective_rank(sigma)[1] == pytest.approx(1.0)
    p = np.array([4.0, 2.0, 1.0]) / 7
    assert effective_rank(sigma)[2] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert effective_rank(sigma)[3] == 0
    cond = condition_number(sigma)
    assert cond[0] == 1 and torch.isinf(cond[1]) and cond[2] == 4 and torch.isnan(cond[3])
    assert numerical_rank(sigma).tolist() == [3, 1, 3, 0, 2]
    assert numerical_rank(sigma, rtol=1e-2).tolist() == [3, 1, 3, 0, 1]
