"""The Gram path (projection.gram_transforms, used first by balance_pairs): the same balanced
pair as the QR path where it says it is accurate, a refusal where it would not be, and
balance_pairs falling back to the QR path for exactly those pairs. Checked against float64
numpy on the formed products."""

from __future__ import annotations

import math

import pytest
import torch

import balora.balance
from balora.balance import balance_pairs
from balora.linalg import matmul_unit_roundoff
from balora.pairs import FactorPair
from balora.projection import GRAM_TOL, balanced_factors, gram_transforms

METHODS = ("nearest", "svd")


def _factor(n, r, cond, gen):
    """(n, r) float64 with singular values log-spaced from 1 down to 1/cond, random singular vectors."""
    Q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    W, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    return (Q * torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)) @ W.mT


def _grams(A, B):
    return (A @ A.mT)[None], (B.mT @ B)[None]


@pytest.mark.parametrize("method", METHODS)
def test_same_pair_as_the_qr_path(method):
    """In float64 the Gram path and the QR path compute the same balanced pair."""
    gen = torch.Generator().manual_seed(0)
    A = torch.stack([_factor(40, 4, 5.0, gen).mT * 3 for _ in range(3)])  # (3, 4, 40)
    B = torch.stack([_factor(30, 4, 20.0, gen) / 3 for _ in range(3)])  # (3, 30, 4)
    t = gram_transforms(A @ A.mT, B.mT @ B, method)
    assert t.accurate.all()
    qr = balanced_factors(A, B, method)
    torch.testing.assert_close(t.Y @ A, qr.A, rtol=0, atol=1e-10)
    torch.testing.assert_close(B @ t.X, qr.B, rtol=0, atol=1e-10)
    torch.testing.assert_close(t.S, qr.S, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_accepted_pairs_are_balanced_in_fp32(np_product_error, np_rel_imbalance, method):
    """Over factors of every conditioning from 1 to 1e4, ranks 1 to 32, scales 1e-2 to 1e2:
    wherever the Gram path says it is accurate, the fp32 result is balanced to 1e-5 and keeps
    the product; where it says not, the error estimate was above the tolerance."""
    gen = torch.Generator().manual_seed(1)
    accepted = refused = 0
    for trial in range(60):
        r = (1, 4, 8, 16, 32)[trial % 5]
        c_A, c_B = 10 ** (4 * torch.rand(2, generator=gen, dtype=torch.float64)).numpy()
        scale = float(10 ** (4 * torch.rand(1, generator=gen) - 2))
        A = (_factor(300, r, c_A, gen).mT * scale).float()  # (r, 300)
        B = (_factor(200, r, c_B, gen) / scale).float()  # (200, r)
        t = gram_transforms(*_grams(A, B), method, matmul_unit_roundoff(torch.float32))
        if not bool(t.accurate[0]):
            refused += 1
            continue
        accepted += 1
        A1, B1 = t.Y[0].float() @ A, B @ t.X[0].float()
        assert np_rel_imbalance(A1, B1) < 1e-5, (r, c_A, c_B, scale)
        assert np_product_error(A, B, A1, B1) < 1e-5, (r, c_A, c_B, scale)
    assert accepted >= 10 and refused >= 10  # both branches were exercised


def test_ill_conditioned_singular_zero_and_nonfinite_are_refused():
    gen = torch.Generator().manual_seed(2)
    A_ok = _factor(50, 4, 2.0, gen).mT.float()
    B_ok = _factor(60, 4, 2.0, gen).float()
    cases = {
        "well conditioned": (A_ok, B_ok),
        "cond 1e4": (_factor(50, 4, 1e4, gen).mT.float(), B_ok),
        "rank-deficient B": (A_ok, torch.cat([B_ok[:, :3], B_ok[:, :1]], dim=1)),
        "B = 0": (A_ok, torch.zeros_like(B_ok)),
        "NaN in A": (A_ok.clone().index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor(float("nan"))), B_ok),
        "Inf in B": (A_ok, B_ok.clone().index_put_((torch.tensor(5), torch.tensor(1)), torch.tensor(float("inf")))),
    }
    G_A = torch.stack([A @ A.mT for A, _ in cases.values()])
    G_B = torch.stack([B.mT @ B for _, B in cases.values()])
    t = gram_transforms(G_A, G_B, "nearest", matmul_unit_roundoff(torch.float32))
    got = dict(zip(cases, t.accurate.tolist()))
    assert got == {name: name == "well conditioned" for name in cases}


@pytest.mark.parametrize("scale", [1e-22, 1e20])
def test_factors_whose_grams_underflow_or_overflow_are_still_balanced(np_product_error, np_rel_imbalance, scale):
    """fp32 Grams of factors with entries ~1e-22 underflow to zero and of ~1e20 overflow: the
    pair is neither taken for a zero product nor left alone, but balanced by the QR path."""
    gen = torch.Generator().manual_seed(7)
    A = (_factor(40, 4, 3.0, gen).mT * scale).float()
    B = (_factor(30, 4, 3.0, gen) * 2).float()
    new, summary = balance_pairs([FactorPair("m", "default", "linear", A, B, 1.0)], "nearest")
    assert summary.balanced == 1 and summary.qr_path == 1 and not summary.skipped
    A1, B1 = new[0]
    assert np_rel_imbalance(A1, B1) < 1e-5 and np_product_error(A, B, A1, B1) < 1e-5


@pytest.mark.parametrize("scale", [1e-22, 1e-21, 1e-20])
def test_grams_in_the_subnormal_range_go_to_the_qr_path(np_product_error, np_rel_imbalance, scale):
    """fp32 factors of ~1e-21 have Grams of ~1e-41: not zero, but rounded to fp32's subnormal
    spacing, so the Gram path's relative error estimate does not hold (it left rel_imbalance
    4e-3 at 1e-22). Such pairs must be refused and balanced as accurately as any other."""
    gen = torch.Generator().manual_seed(0)
    A = (torch.randn(4, 64, generator=gen, dtype=torch.float64) * scale).float()  # (r, in)
    B = (torch.randn(48, 4, generator=gen, dtype=torch.float64) * scale * 3).float()  # (out, r)
    G_A, G_B = A @ A.mT, B.mT @ B
    assert 0 < float(G_A.abs().max()) < torch.finfo(torch.float32).tiny * 1e8
    assert not gram_transforms(G_A[None], G_B[None], "nearest").accurate.item()
    new, summary = balance_pairs([FactorPair("m", "default", "linear", A, B, 1.0)], "nearest")
    assert summary.balanced == 1 and summary.qr_path == 1
    A1, B1 = new[0]
    assert np_rel_imbalance(A1, B1) < GRAM_TOL and np_product_error(A, B, A1, B1) < 1e-6


def test_tolerance_is_respected():
    gen = torch.Generator().manual_seed(3)
    A, B = _factor(80, 8, 30.0, gen).mT.float(), _factor(70, 8, 30.0, gen).float()
    strict = gram_transforms(*_grams(A, B), "nearest", matmul_unit_roundoff(torch.float32), tol=1e-9)
    loose = gram_transforms(*_grams(A, B), "nearest", matmul_unit_roundoff(torch.float32), tol=1e-2)
    assert not bool(strict.accurate[0]) and bool(loose.accurate[0])


def test_reduced_precision_matmuls_raise_the_unit_roundoff():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert matmul_unit_roundoff(torch.float32) == 2.0**-24
        torch.set_float32_matmul_precision("medium")
        assert matmul_unit_roundoff(torch.float32) == 2.0**-8
        assert matmul_unit_roundoff(torch.float64) == 2.0**-53
    finally:
        torch.set_float32_matmul_precision(before)


def _pairs(specs, gen):
    """FactorPairs from (r, n_in, n_out, cond) specs, fp32, imbalanced by a factor 10 in scale."""
    out = []
    for i, (r, n_in, n_out, cond) in enumerate(specs):
        A = (_factor(n_in, r, cond, gen).mT * 10).float().contiguous()
        B = (_factor(n_out, r, 2.0, gen) / 10).float().contiguous()
        out.append(FactorPair(f"m{i}", "default", "linear", A, B, 1.0))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_balance_pairs_falls_back_to_qr_exactly_where_refused(np_product_error, np_rel_imbalance, method, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    specs = [(8, 64, 48, 2.0), (8, 64, 48, 3e3), (4, 30, 20, 1.5), (4, 30, 20, 5e3), (8, 100, 40, 4.0)]
    pairs = _pairs(specs, gen)
    redone = []
    real = balora.balance._qr_outcomes

    def spy(group, m):
        redone.extend(p.module for p in group)
        return real(group, m)

    monkeypatch.setattr(balora.balance, "_qr_outcomes", spy)
    new, summary = balance_pairs(pairs, method, check=True)
    assert sorted(redone) == ["m1", "m3"]  # the two ill-conditioned ones
    assert summary.balanced == len(pairs) and not summary.skipped
    for i, p in enumerate(pairs):
        A1, B1 = new[i]
        assert A1.shape == p.A.shape and B1.shape == p.B.shape and A1.dtype == torch.float32
        assert np_rel_imbalance(A1, B1) < 1e-5, p.module
        assert np_product_error(p.A, p.B, A1, B1) < 1e-5, p.module
    assert summary.max_rel_imbalance < 1e-5 and summary.max_rel_error < 1e-5


def test_unchecked_results_equal_checked_ones():
    """check=False only skips the measurement: the same factors, formed for a whole shape at once."""
    gen = torch.Generator().manual_seed(5)
    pairs = _pairs([(4, 30, 20, 2.0)] * 3 + [(8, 64, 48, 2.0)], gen)
    fast, summary_fast = balance_pairs(pairs, "nearest", check=False)
    checked, summary = balance_pairs(pairs, "nearest", check=True)
    assert sorted(fast) == sorted(checked) == [0, 1, 2, 3]
    assert summary_fast.qr_path == summary.qr_path == 0 and summary.max_rel_imbalance < 1e-5
    for i in fast:
        for a, b in zip(fast[i], checked[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_factors_use_a_tolerance_of_their_own_rounding(np_rel_imbalance):
    """bf16 results are rounded to 8 bits anyway, so the Gram path accepts pairs an fp32 run
    would redo, and the result is as balanced as rounding to bf16 allows."""
    gen = torch.Generator().manual_seed(6)
    A = (_factor(64, 8, 300.0, gen).mT * 4).to(torch.bfloat16)
    B = (_factor(48, 8, 300.0, gen) / 4).to(torch.bfloat16)
    t32 = gram_transforms(*_grams(A.float(), B.float()), "nearest", matmul_unit_roundoff(torch.float32))
    assert not bool(t32.accurate[0])  # refused at the fp32 tolerance ...
    pair = FactorPair("m", "default", "linear", A, B, 1.0)
    calls = []
    real = balora.balance._qr_outcomes
    balora_qr = lambda group, m: calls.append(1) or real(group, m)  # noqa: E731
    try:
        balora.balance._qr_outcomes = balora_qr
        new, _ = balance_pairs([pair], "nearest", check=False)
    finally:
        balora.balance._qr_outcomes = real
    assert not calls  # ... accepted at bf16's
    A1, B1 = new[0]
    assert A1.dtype == torch.bfloat16 and np_rel_imbalance(A1, B1) < 2e-2
    assert GRAM_TOL < 0.1 * torch.finfo(torch.bfloat16).eps


def _nearly_balanced(r, n_in, n_out, step, gen):
    """A (1, r, in), B (1, out, r) float64: a balanced pair (ill-conditioned product, cond 1e3),
    then every entry moved by `step` times its factor's typical entry (one optimizer step)."""
    A = _factor(n_in, r, 30.0, gen).mT[None] * 3
    B = _factor(n_out, r, 30.0, gen)[None] / 3
    qr = balanced_factors(A, B, "nearest")
    A, B = qr.A, qr.B
    A = A + step * A.abs().mean() * torch.randn(A.shape, generator=gen, dtype=torch.float64)
    B = B + step * B.abs().mean() * torch.randn(B.shape, generator=gen, dtype=torch.float64)
    return A, B


def _spy_eigh_polar(monkeypatch):
    """Record how many pairs _polar redid by its eigh route."""
    import balora.projection as projection

    redone = []
    real = projection._polar_by_eigh

    def spy(M, eye):
        redone.append(M.shape[0])
        return real(M, eye)

    monkeypatch.setattr(projection, "_polar_by_eigh", spy)
    return redone


@pytest.mark.parametrize("step", [0.0, 1e-6, 1e-4, 1e-3, 1e-2])
def test_nearest_polar_of_a_nearly_balanced_pair_needs_no_eigh(monkeypatch, step):
    """One optimizer step away from balanced (up to 1% of every entry), the nearest gauge's polar
    factor comes from the fixed-point square root alone, and it is the same balanced pair as the QR
    path's (SVD-based polar), in float64 to 1e-10."""
    gen = torch.Generator().manual_seed(11)
    pairs = [_nearly_balanced(r, 90, 70, step, gen) for r in (1, 4, 16, 16, 16)]
    redone = _spy_eigh_polar(monkeypatch)
    for A, B in pairs:
        t = gram_transforms(A @ A.mT, B.mT @ B, "nearest")
        assert t.accurate.all()
        qr = balanced_factors(A, B, "nearest")
        torch.testing.assert_close(t.Y @ A, qr.A, rtol=0, atol=1e-10 * float(qr.A.abs().max()))
        torch.testing.assert_close(B @ t.X, qr.B, rtol=0, atol=1e-10 * float(qr.B.abs().max()))
    assert redone == []


def test_pairs_far_from_balanced_have_their_polar_redone_by_eigh(monkeypatch):
    """PEFT's first steps (B tiny and unrelated to A) and arbitrary random pairs are too far from
    balanced for the fixed point in POLAR_STEPS steps: exactly those are redone by the eigh route,
    in one batch, and every pair still equals the QR path's."""
    gen = torch.Generator().manual_seed(12)
    near = [_nearly_balanced(8, 60, 50, 1e-3, gen) for _ in range(2)]
    far = [(_factor(60, 8, 5.0, gen).mT[None], _factor(50, 8, 20.0, gen)[None] * s) for s in (1e-4, 1.0, 30.0)]
    order = [near[0], far[0], near[1], far[1], far[2]]
    A = torch.cat([a for a, _ in order])
    B = torch.cat([b for _, b in order])
    redone = _spy_eigh_polar(monkeypatch)
    t = gram_transforms(A @ A.mT, B.mT @ B, "nearest")
    assert redone == [3]
    assert t.accurate.all()
    qr = balanced_factors(A, B, "nearest")
    for g in range(len(order)):
        torch.testing.assert_close(t.Y[g] @ A[g], qr.A[g], rtol=0, atol=1e-9 * float(qr.A[g].abs().max()))
        torch.testing.assert_close(B[g] @ t.X[g], qr.B[g], rtol=0, atol=1e-9 * float(qr.B[g].abs().max()))


def test_nearly_balanced_pairs_of_any_conditioning_are_balanced_in_fp32(np_product_error, np_rel_imbalance, monkeypatch):
    """The fixed-point polar on fp32 factors one step from balanced, products of cond 1 to 1e4,
    ranks 4 to 32: the Gram path accepts every pair, balanced to 1e-5 with its product kept,
    as the eigh route's were, and none needs the eigh."""
    gen = torch.Generator().manual_seed(13)
    redone = _spy_eigh_polar(monkeypatch)
    accepted = 0
    for trial in range(24):
        r = (4, 8, 16, 32)[trial % 4]
        cond = float(10 ** (4 * trial / 23))
        A = _factor(300, r, math.sqrt(cond), gen).mT[None]
        B = _factor(200, r, math.sqrt(cond), gen)[None]
        qr = balanced_factors(A, B, "nearest")
        step = 1e-3 * torch.randn(qr.A.shape, generator=gen, dtype=torch.float64)
        A1 = (qr.A * (1 + step)).float()[0]
        B1 = (qr.B * (1 - 1e-3 * torch.randn(qr.B.shape, generator=gen, dtype=torch.float64))).float()[0]
        t = gram_transforms(*_grams(A1, B1), "nearest", matmul_unit_roundoff(torch.float32))
        if not bool(t.accurate[0]):
            continue
        accepted += 1
        A2, B2 = t.Y[0].float() @ A1, B1 @ t.X[0].float()
        assert np_rel_imbalance(A2, B2) < 1e-5, (r, cond)
        assert np_product_error(A1, B1, A2, B2) < 1e-5, (r, cond)
    assert accepted == 24 and redone == []  # (with M's diagonal alone for H, 6 of 24 came back refused)


def test_grams_upcast_on_their_way_to_the_host_keep_their_own_subnormal_floor(np_product_error, np_rel_imbalance,
                                                                              monkeypatch):
    """A GPU's Grams reach the host as float64 (stacked._to_host), and FSDP2's are all-reduced in
    float64: the floor that sends fp32 Grams in fp32's subnormal range to the QR path must still be
    fp32's. Emulated here by upcasting on the CPU as the device path does; with float64's floor the
    pairs were accepted and left rel_imbalance up to 5e-2."""
    import balora.stacked as stacked

    monkeypatch.setattr(stacked, "_to_host", lambda ts: [t.to(torch.float64) for t in ts])
    gen = torch.Generator().manual_seed(14)
    pairs = [FactorPair(f"m{k}", "default", "linear", (torch.randn(8, 512, generator=gen) * s).float(),
                        (torch.randn(512, 8, generator=gen) * 1e-3).float(), 1.0)
             for k, s in enumerate([1e-21, 3e-22, 1e-22, 3e-23])]
    new, summary = balance_pairs(pairs, "nearest", check=False, stack=True)
    assert summary.qr_path == len(pairs) and summary.balanced == len(pairs)
    for i, p in enumerate(pairs):  # the QR path's fp32 accuracy (the Gram path's float64 floor left 2.5e-5 to 5e-2)
        assert np_rel_imbalance(*new[i]) < 1e-5 and np_product_error(p.A, p.B, *new[i]) < 1e-5


def test_an_unsettled_fixed_point_is_not_kept_for_an_ill_conditioned_float64_pair(monkeypatch):
    """A balanced float64 pair whose product has cond ~1e6, then A's rows rotated by exp(0.17 K):
    four fixed-point steps leave ||O O^T - I|| ~ 7e-8. That is below the eigh route's error bound
    (u cond(H)^2 ~ 1e-7), and keeping it moved dW by 1e-8. It must be redone (a backward-stable
    polar reaches ~u cond(H)), giving the eigh route's pair: dW kept to 1e-11."""
    import balora.projection as projection

    gen = torch.Generator().manual_seed(10622)
    A0 = _factor(12, 8, 1.27e6**0.5, gen).mT
    B0 = _factor(201, 8, 1.27e6**0.5, gen)
    p = balanced_factors(A0[None], B0[None], "nearest")
    K = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    A, B = torch.linalg.matrix_exp(0.172 * (K - K.mT) / 2) @ p.A[0], p.B[0]
    redone = _spy_eigh_polar(monkeypatch)
    t = gram_transforms((A @ A.mT)[None], (B.mT @ B)[None], "nearest")
    assert t.accurate.all() and redone == [1]
    A1, B1 = t.Y[0] @ A, B @ t.X[0]
    assert float(torch.linalg.matrix_norm(B1 @ A1 - B @ A) / torch.linalg.matrix_norm(B @ A)) < 1e-11
    monkeypatch.setattr(projection, "_polar", lambda M, eye: projection._polar_by_eigh(M, eye))
    ref = gram_transforms((A @ A.mT)[None], (B.mT @ B)[None], "nearest")
    torch.testing.assert_close(t.X, ref.X, rtol=0, atol=1e-12 * float(ref.X.abs().max()))


def test_settled_pairs_get_exact_identity_maps():
    """`settled`: a pair balanced to within it gets X = Y = I bit for bit (nothing to re-round);
    the svd gauge also asks for diagonal Grams, so a balanced pair with a rotated Gram is still
    moved there, and a pair above the threshold is balanced as usual."""
    gen = torch.Generator().manual_seed(7)
    balanced = balanced_factors(_factor(40, 4, 5.0, gen).mT[None], _factor(30, 4, 20.0, gen)[None], "nearest")
    A, B = balanced.A[0], balanced.B[0]  # balanced to ~1e-15, Grams not diagonal
    W, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    off = (A @ A.mT - torch.diag(torch.diagonal(A @ A.mT))).norm() / (A @ A.mT).norm()
    assert off > 1e-2  # the check below must be able to tell
    eye = torch.eye(4, dtype=torch.float64)
    for method, moved in (("nearest", False), ("svd", True)):
        t = gram_transforms(*_grams(A, B), method, settled=1e-6)
        assert t.accurate.item()
        assert torch.equal(t.X[0], eye) != moved and torch.equal(t.Y[0], eye) != moved, method
    svd_gauge = balanced_factors(A[None], B[None], "svd")  # diagonal Grams: settled for both gauges
    for method in METHODS:
        t = gram_transforms(*_grams(svd_gauge.A[0], svd_gauge.B[0]), method, settled=1e-6)
        assert torch.equal(t.X[0], eye) and torch.equal(t.Y[0], eye), method
    # Rotated by W and scaled 1.001 / 1/1.001: rel_imbalance ~2e-3, above 1e-6, so balanced again.
    A2, B2 = (W.mT @ A) / 1.001, (B @ W) * 1.001
    t = gram_transforms(*_grams(A2, B2), "nearest", settled=1e-6)
    assert t.accurate.item() and not torch.equal(t.X[0], eye)
    A3, B3 = t.Y[0] @ A2, B2 @ t.X[0]
    assert (B3.mT @ B3 - A3 @ A3.mT).norm() < 1e-12 * (A3 @ A3.mT).norm()
    # With a threshold of 1e-2, above its ~2e-3, the same pair counts as settled.
    assert torch.equal(gram_transforms(*_grams(A2, B2), "nearest", settled=1e-2).X[0], eye)


def test_a_settled_but_rank_deficient_pair_is_left_to_the_qr_path():
    """Identity maps would count the pair as balanced at full rank: the QR path must still see a
    numerically rank-deficient product (its rank report and the on_rank_deficient policy)."""
    from balora.imbalance import RANK_RTOL

    gen = torch.Generator().manual_seed(8)
    A, B = _factor(40, 4, 5.0, gen).mT, _factor(30, 4, 5.0, gen)
    A[-1] *= 1e-5  # the last direction of the product far below RANK_RTOL of the first
    B[:, -1] *= 1e-5
    bal = balanced_factors(A[None], B[None], "nearest")
    assert bal.S[0, -1] < RANK_RTOL * bal.S[0, 0]
    t = gram_transforms(*_grams(bal.A[0], bal.B[0]), "nearest", settled=1e-3)
    assert not torch.equal(t.X[0], torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rel", [3e-6, 1e-8])
def test_a_numerically_rank_deficient_float64_pair_is_ruled_on_by_its_rank(np_product_error, method, rel):
    """A float64 pair whose product's last singular value is below RANK_RTOL of the first is
    rank-deficient for balora: the default policy ("skip") leaves it alone and reports its rank,
    whatever the gauge. The svd gauge's Gram path has no eigen-conditioning term, so it accepted
    such pairs, counted them as full rank and balanced them."""
    import numpy as np

    from balora.imbalance import RANK_RTOL

    gen = torch.Generator().manual_seed(3)
    A, B = _factor(64, 8, 3.0, gen).mT.contiguous(), _factor(48, 8, 3.0, gen) / 10
    A[-1] *= rel
    sv = np.linalg.svd(B.numpy() @ A.numpy(), compute_uv=False)[:8]
    rank = int((sv > RANK_RTOL * sv[0]).sum())
    assert rank == 7
    assert not gram_transforms(*_grams(A, B), method).accurate.item()
    new, summary = balance_pairs([FactorPair("m", "default", "linear", A, B, 1.0)], method)
    assert new == {} and summary.rank_deficient == {"m[default]": rank}
    new, summary = balance_pairs([FactorPair("m", "default", "linear", A, B, 1.0)], method,
                                 on_rank_deficient="balance")
    assert summary.rank_deficient == {"m[default]": rank} and np_product_error(A, B, *new[0]) < 1e-12
