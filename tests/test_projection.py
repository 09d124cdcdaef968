"""balora.projection: balanced pairs keep the product and are balanced (checked on the formed
float64 products by numpy), the nearest gauge is the closest balanced pair, and the flags
for zero, rank-deficient and non-finite pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balora.projection import balanced_factors, product_rel_error

METHODS = ("nearest", "svd")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _distance(A0, B0, A1, B1):
    """Frobenius distance between pairs: sqrt(||A1 - A0||^2 + ||B1 - B0||^2), float64, (G,)."""
    d2 = (A1.double() - A0.double()).square().sum((-2, -1)) + (B1.double() - B0.double()).square().sum((-2, -1))
    return d2.sqrt()


def _balanced_pair(G, r, n_in, n_out, seed):
    """A balanced pair built in float64 from scratch: B = U S^1/2 O, A = O^T S^1/2 V^T."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(G, n_out, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(G, n_in, r, generator=g, dtype=torch.float64))
    O, _ = torch.linalg.qr(torch.randn(G, r, r, generator=g, dtype=torch.float64))
    S = torch.rand(G, r, generator=g, dtype=torch.float64) * 3 + 0.5
    return O.mT @ (S.sqrt()[..., None] * V.mT), U @ (S.sqrt()[..., None] * O)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r,n_in,n_out", [(4, 24, 16), (1, 5, 9), (8, 8, 30)])
def test_product_kept_and_balanced(np_product_error, np_rel_imbalance, method, dtype, r, n_in, n_out, make_factors):
    A, B = make_factors(5, r=r, n_in=n_in, n_out=n_out, dtype=dtype, seed=r)
    proj = balanced_factors(A, B, method)
    assert proj.A.shape == A.shape and proj.B.shape == B.shape and proj.A.dtype == dtype
    assert proj.finite.all() and not proj.zero.any() and torch.all(proj.rank == r)
    # product_rel_error expands ||P1 - P0||^2 in float64, so it resolves down to sqrt(eps64) ~ 1.5e-8.
    assert float(product_rel_error(A, B, proj.A, proj.B).max()) < max(TOL[dtype], 1e-7)
    for g in range(5):
        assert np_product_error(A[g], B[g], proj.A[g], proj.B[g]) < TOL[dtype]
        assert np_rel_imbalance(proj.A[g], proj.B[g]) < TOL[dtype]
        assert np_rel_imbalance(A[g], B[g]) > 0.5  # the inputs really were imbalanced
        # S: singular values of the unscaled product, from numpy on the formed product.
        sv = np.linalg.svd(B[g].double().numpy() @ A[g].double().numpy(), compute_uv=False)[:r]
        np.testing.assert_allclose(proj.S[g].double().numpy(), sv, rtol=0, atol=TOL[dtype] * sv[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_is_the_closest_balanced_pair(dtype, make_factors):
    A, B = make_factors(6, r=5, n_in=20, n_out=14, dtype=dtype, seed=21)
    near = balanced_factors(A, B, "nearest")
    svd = balanced_factors(A, B, "svd")
    d_near, d_svd = _distance(A, B, near.A, near.B), _distance(A, B, svd.A, svd.B)
    assert torch.all(d_near <= d_svd * (1 + 1e-6))
    # Every balanced pair with this product is (O^T A_svd, B_svd O) for an orthogonal O:
    # none of a few hundred random ones may come closer than the nearest gauge.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        O, _ = torch.linalg.qr(torch.randn(6, 5, 5, generator=g, dtype=torch.float64))
        O = O.to(dtype)
        d = _distance(A, B, O.mT @ svd.A, svd.B @ O)
        assert torch.all(d_near <= d * (1 + 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_balanced_input_nearest_keeps_it_svd_rotates_it(np_product_error, dtype):
    A64, B64 = _balanced_pair(4, r=4, n_in=18, n_out=12, seed=2)
    A, B = A64.to(dtype), B64.to(dtype)
    scale = torch.sqrt(torch.linalg.matrix_norm(A64) ** 2 + torch.linalg.matrix_norm(B64) ** 2)
    near = balanced_factors(A, B, "nearest")
    svd = balanced_factors(A, B, "svd")
    assert torch.all(_distance(A64, B64, near.A, near.B) < 10 * TOL[dtype] * scale)
    # The svd gauge ignores where the pair was: a random gauge O is lost.
    assert torch.all(_distance(A64, B64, svd.A, svd.B) > 0.1 * scale)
    for g in range(4):
        assert np_product_error(A[g], B[g], svd.A[g], svd.B[g]) < TOL[dtype]


def test_nearest_is_idempotent_and_gauge_equivariant(make_factors):
    A, B = make_factors(3, r=4, n_in=15, n_out=11, dtype=torch.float64, seed=5)
    once = balanced_factors(A, B, "nearest")
    twice = balanced_factors(once.A, once.B, "nearest")
    torch.testing.assert_close(twice.A, once.A, rtol=0, atol=1e-12)
    torch.testing.assert_close(twice.B, once.B, rtol=0, atol=1e-12)
    # Rotating the input by an orthogonal gauge rotates the answer the same way.
    O, _ = torch.linalg.qr(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rot = balanced_factors(O.mT @ A, B @ O, "nearest")
    torch.testing.assert_close(rot.A, O.mT @ once.A, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.B, once.B @ O, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_zero_product_returned_unchanged(method, make_factors):
    A, B = make_factors(3, r=4, n_in=12, n_out=10, seed=8)
    B[0] = 0  # PEFT Linear init
    A[2] = 0  # PEFT Embedding init
    proj = balanced_factors(A, B, method)
    assert proj.zero.tolist() == [True, False, True]
    assert proj.finite.all()
    assert proj.rank.tolist() == [0, 4, 0]
    for g in (0, 2):
        assert torch.equal(proj.A[g], A[g]) and torch.equal(proj.B[g], B[g])
    assert float(product_rel_error(A[1:2], B[1:2], proj.A[1:2], proj.B[1:2])) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_flagged_and_isolated(method, make_factors):
    A, B = make_factors(4, r=3, n_in=9, n_out=7, seed=13)
    clean = balanced_factors(A, B, method)
    A_bad, B_bad = A.clone(), B.clone()
    A_bad[1, 0, 2] = float("nan")
    B_bad[3, 4, 1] = float("inf")
    proj = balanced_factors(A_bad, B_bad, method)
    assert proj.finite.tolist() == [True, False, True, False]
    for g in (1, 3):  # handed back exactly as they came, NaN and Inf included
        assert torch.equal(torch.nan_to_num(proj.A[g], 7.0), torch.nan_to_num(A_bad[g], 7.0))
        assert torch.equal(torch.nan_to_num(proj.B[g], 7.0), torch.nan_to_num(B_bad[g], 7.0))
    for g in (0, 2):  # untouched by their neighbours
        assert torch.isfinite(proj.A[g]).all() and torch.isfinite(proj.B[g]).all()
        torch.testing.assert_close(proj.A[g], clean.A[g], rtol=0, atol=1e-6)
        torch.testing.assert_close(proj.B[g], clean.B[g], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_item(method, make_factors, make_conditioned):
    A, B = make_factors(5, r=4, n_in=16, n_out=12, seed=17)
    A[3] = make_conditioned(16, 4, 1e5, seed=3).mT * 2  # sends one entry to the QR fallback
    batched = balanced_factors(A, B, method)
    for g in range(5):
        one = balanced_factors(A[g : g + 1], B[g : g + 1], method)
        scale = float(torch.linalg.matrix_norm(batched.A[g]) + torch.linalg.matrix_norm(batched.B[g]))
        torch.testing.assert_close(batched.A[g], one.A[0], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(batched.B[g], one.B[0], rtol=0, atol=1e-5 * scale)
        assert int(batched.rank[g]) == int(one.rank[0])


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_product(np_product_error, np_rel_imbalance, method, make_factors):
    A, B = make_factors(2, r=5, n_in=14, n_out=10, seed=19)
    g = torch.Generator().manual_seed(4)
    B[1] = torch.randn(10, 2, generator=g) @ torch.randn(2, 5, generator=g)  # rank(B A) = 2
    proj = balanced_factors(A, B, method)
    assert proj.rank.tolist() == [5, 2]
    assert not proj.zero.any() and proj.finite.all()
    assert np_product_error(A[1], B[1], proj.A[1], proj.B[1]) < 1e-5
    assert np_rel_imbalance(proj.A[1], proj.B[1]) < 1e-5
    # The balanced pair of a rank-2 product has r - 2 = 3 dead directions: A' and B' have rank 2
    # (the nearest gauge rotates them, so they are a subspace rather than zero rows).
    for M in (proj.A[1], proj.B[1]):
        sv = np.linalg.svd(M.double().numpy(), compute_uv=False)
        assert int((sv < 1e-3 * sv[0]).sum()) == 3


def test_half_precision_inputs_are_computed_in_fp32(np_rel_imbalance, make_factors):
    A, B = make_factors(3, r=4, n_in=12, n_out=10, dtype=torch.bfloat16, seed=23)
    proj = balanced_factors(A, B, "nearest")
    assert proj.A.dtype == torch.float32 and proj.B.dtype == torch.float32
    # Against the exact bf16 inputs, the fp32 result keeps the product to fp32 accuracy.
    assert float(product_rel_error(A, B, proj.A, proj.B).max()) < 1e-5
    for g in range(3):
        assert np_rel_imbalance(proj.A[g], proj.B[g]) < 1e-5


def test_argument_errors(make_factors):
    A, B = make_factors(2, r=6, n_in=4, n_out=10)
    with pytest.raises(ValueError, match="exceeds min"):
        balanced_factors(A, B)
    A, B = make_factors(2)
    with pytest.raises(ValueError, match="unknown balancing method"):
        balanced_factors(A, B, "polar")


def test_product_rel_error_vs_numpy(np_product_error, make_factors):
    A0, B0 = make_factors(3, r=4, n_in=12, n_out=10, dtype=torch.float64, seed=29)
    A1, B1 = make_factors(3, r=4, n_in=12, n_out=10, dtype=torch.float64, seed=30)
    A1 = A0 + 1e-3 * A1
    err = product_rel_error(A0, B0, A1, B1)
    for g in range(3):
        np.testing.assert_allclose(float(err[g]), np_product_error(A0[g], B0[g], A1[g], B1[g]), rtol=1e-9)
    # Tiny changes are resolved, not cancelled to zero, even from fp32 inputs.
    A32, B32 = A0.float(), B0.float()
    A32b = A32.clone()
    A32b[:, 0, 0] += 1e-4
    got = product_rel_error(A32, B32, A32b, B32)
    for g in range(3):
        np.testing.assert_allclose(float(got[g]), np_product_error(A32[g], B32[g], A32b[g], B32[g]), rtol=1e-6)
    zero = torch.zeros_like(A0)
    assert torch.all(product_rel_error(zero, B0, zero, B0) == 0), "0/0 counts as unchanged"
    np.testing.assert_allclose(product_rel_error(zero, B0, A1, B1).numpy(),
                               [np.linalg.norm(B1[g].numpy() @ A1[g].numpy()) for g in range(3)], rtol=1e-9)


@pytest.mark.parametrize("scale", [1e80, 1e-90])
def test_product_rel_error_at_the_edges_of_float64(np_product_error, make_factors, scale):
    """Its r x r traces square the products' size: factors of 1e80 overflowed to NaN (a pass's
    summary then said max_rel_error nan) and of 1e-90 underflowed to 0 for a 100% change."""
    A, B = make_factors(2, r=4, n_in=12, n_out=10, dtype=torch.float64, seed=31)
    A_new = A + 0.5 * torch.flip(A, dims=(-1,))
    err = product_rel_error(A * scale, B * scale, A_new * scale, B * scale)
    for g in range(2):  # the ratio does not depend on the scale: the reference is taken at scale 1
        np.testing.assert_allclose(float(err[g]), np_product_error(A[g], B[g], A_new[g], B[g]), rtol=1e-9)


def test_factors_of_the_wrong_shape_are_refused_naming_the_argument(make_factors):
    # One unbatched pair, or A and B swapped, used to fail deep inside with a broadcasting message
    # ("size of tensor a (4) must match ... (10)") that names neither argument.
    from balora import gram_transforms, rel_imbalance

    A, B = make_factors((3,), r=4, n_in=12, n_out=10)
    cases = [(A[0], B[0]), (B, A), (A, B[:2]), (A, B[..., :3])]
    for a, b in cases:
        with pytest.raises(ValueError, match=r"A must be \(G, r, in\) and B \(G, out, r\)"):
            balanced_factors(a, b)
    for a, b in cases[1:]:
        with pytest.raises(ValueError, match=r"A must be \(\.\.\., r, in\) and B \(\.\.\., out, r\)"):
            rel_imbalance(a, b)
    with pytest.raises(ValueError, match=r"G_A and G_B must be \(G, r, r\)"):
        gram_transforms(A[0] @ A[0].mT, B[0].mT @ B[0])
    with pytest.raises(ValueError, match=r"G_A and G_B must be \(G, r, r\)"):
        gram_transforms(A @ A.mT, B @ B.mT)
    for fn in (rel_imbalance, balanced_factors):  # numpy arrays failed with "'numpy.ndarray' has no attribute"
        with pytest.raises(TypeError, match="A and B must be torch tensors; got ndarray and ndarray"):
            fn(A.numpy(), B.numpy())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_dtypes_are_computed_in_the_wider_one(np_product_error, np_rel_imbalance, method, make_factors):
    """A in fp32 and B in float64 were balanced in fp32 (A's dtype alone chose the compute dtype), B's
    float64 values rounded to fp32 first, while the same pair with the dtypes swapped got float64."""
    A, B = make_factors(2, r=4, n_in=30, n_out=20, dtype=torch.float64, seed=41)
    for A_in, B_in in ((A.float(), B), (A, B.float())):
        proj = balanced_factors(A_in, B_in, method)
        assert proj.A.dtype == proj.B.dtype == torch.float64
        for g in range(2):
            assert np_product_error(A_in[g], B_in[g], proj.A[g], proj.B[g]) < TOL[torch.float64]
            assert np_rel_imbalance(proj.A[g], proj.B[g]) < TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_real_product_of_crossed_factors_is_balanced_not_taken_for_zero(dtype):
    # B's large column meets A's small row and B's small column A's large row: |B| |A| = 1e3, yet the
    # product is 1e-3 exactly, computed to 7 digits in fp32 (no cancellation). Against |B| |A| it looked
    # like rounding, so the pair, imbalanced 1e6-fold, was left as a "zero product".
    g = torch.Generator().manual_seed(0)
    Q_out = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0][:, :2]
    Q_in = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0][:, :2]
    B = (Q_out * torch.tensor([1e-6, 1e3], dtype=torch.float64)).to(dtype)  # (8, 2)
    A = (torch.tensor([[1.0], [1e-6]], dtype=torch.float64) * Q_in.T).to(dtype)  # (2, 8)
    W = B.double() @ A.double()  # the stored factors' product, in float64 apart from balora
    assert float(torch.linalg.matrix_norm(W, ord=2)) == pytest.approx(1e-3, rel=1e-2)
    p = balanced_factors(A[None], B[None])
    assert not bool(p.zero[0])
    A2, B2 = p.A[0].double(), p.B[0].double()
    assert float(torch.linalg.norm(B2 @ A2 - W) / torch.linalg.norm(W)) < 1e-5
    # balanced: B^T B = A A^T, so both factors carry sqrt(1e-3) each, not 1e3 and 1
    assert torch.allclose(B2.T @ B2, A2 @ A2.T, atol=1e-9)
    assert float(torch.linalg.norm(B2)) == pytest.approx(1e-3 ** 0.5, rel=1e-2)
