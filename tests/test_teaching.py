"""balora.teaching against independent computations: float64 numpy, finite differences,
torch autograd and the closed forms of DESIGN.md section 1."""

import math

import numpy as np
import pytest
import torch

from balora import teaching

# --- scalar case -------------------------------------------------------------------------


def fd_hessian(f, x, h=1e-4):
    """Central finite-difference Hessian of a scalar function of a float64 vector."""
    n = len(x)
    H = np.zeros((n, n))
    E = np.eye(n) * h
    for i in range(n):
        for j in range(n):
            H[i, j] = (f(x + E[i] + E[j]) - f(x + E[i] - E[j]) - f(x - E[i] + E[j]) + f(x - E[i] - E[j])) / (4 * h * h)
    return H


@pytest.mark.parametrize("a", [0.3, 1.0, 2.5, -1.7])
def test_valley_curvature_is_the_hessian_eigenvalue_across_the_valley(a):
    y = 1.3
    b, curv = teaching.valley_curvature(a, y)
    assert a * b == pytest.approx(y)
    H = fd_hessian(lambda x: 0.5 * (x[0] * x[1] - y) ** 2, np.array([a, float(b)]))
    eig = np.linalg.eigvalsh(H)
    assert eig[0] == pytest.approx(0.0, abs=1e-5)  # along the valley
    assert eig[1] == pytest.approx(float(curv), rel=1e-5)  # across it: a^2 + b^2


def test_scalar_hessian_off_the_valley_matches_finite_differences():
    a, b, y = 0.7, -1.9, 0.4
    H = fd_hessian(lambda x: 0.5 * (x[0] * x[1] - y) ** 2, np.array([a, b]))
    np.testing.assert_allclose(teaching.scalar_hessian(a, b, y), H, atol=1e-6)


def test_loss_grid_orientation():
    a, b, Z = teaching.scalar_loss_grid(y=1.0, lim=2.0, n=41)
    i, j = 7, 30
    assert Z[i, j] == pytest.approx(0.5 * (a[j] * b[i] - 1.0) ** 2)


def test_curvature_at_minimiser_from_the_imbalance():
    # The valley point with b^2 - a^2 = d, solved independently: b^2 = (d + sqrt(d^2 + 4y^2)) / 2.
    y, d = 1.0, 3.0
    b2 = (d + math.sqrt(d * d + 4 * y * y)) / 2
    a = y / math.sqrt(b2)
    _, curv = teaching.valley_curvature(a, y)
    assert teaching.curvature_at_minimiser(d, y) == pytest.approx(float(curv))


def test_valley_point_with_imbalance():
    a, b = teaching.valley_point_with_imbalance(3.0, 1.5)
    assert a * b == pytest.approx(1.5) and b * b - a * a == pytest.approx(3.0)
    # Gradient descent with a small step from a start with that imbalance ends there.
    a0 = 0.1
    b0 = math.sqrt(3.0 + a0 * a0)
    p = teaching.scalar_gd(a0, b0, 1.5, lr=0.005, steps=4000)
    assert p.a[-1] == pytest.approx(a, rel=2e-2) and p.b[-1] == pytest.approx(b, rel=2e-2)


def test_scalar_gd_scales_the_imbalance_exactly_by_one_minus_lr2_res2():
    y, lr = 1.0, 0.3
    p = teaching.scalar_gd(0.2, 1.7, y, lr, steps=10)
    for t in range(10):
        res = p.a[t] * p.b[t] - y
        assert p.imbalance[t + 1] == pytest.approx(p.imbalance[t] * (1 - lr * lr * res * res), rel=1e-12)


def test_scalar_gd_conserves_the_imbalance_as_lr_goes_to_zero():
    # Same total time lr * steps: the drift of b^2 - a^2 is O(lr), so halving lr halves it.
    drift = []
    for lr in (0.02, 0.01, 0.005):
        p = teaching.scalar_gd(0.2, 1.7, 1.0, lr, steps=int(round(4.0 / lr)))
        drift.append(abs(p.imbalance[-1] - p.imbalance[0]))
    assert 1.7 < drift[0] / drift[1] < 2.3
    assert 1.7 < drift[1] / drift[2] < 2.3
    assert drift[2] < 1e-2 * abs(teaching.scalar_gd(0.2, 1.7, 1.0, 0.005, 0).imbalance[0])


@pytest.mark.parametrize("factor, grows", [(1.8, False), (2.2, True)])
def test_gd_settles_only_below_two_over_curvature(factor, grows):
    y, a = 1.0, 0.5
    b, curv = teaching.valley_curvature(a, y)
    direction = np.array([b, a]) / math.hypot(a, b)  # across the valley: the Hessian's top eigenvector
    eps = 1e-7
    p = teaching.scalar_gd(a + eps * direction[0], float(b) + eps * direction[1], y, factor / float(curv), steps=20)
    dist = math.hypot(p.a[-1] - a, p.b[-1] - float(b))
    # Linearised: the distance is multiplied by |1 - factor| per step (0.8 or 1.2 here).
    assert (dist > 10 * eps) == grows
    assert (dist < 0.1 * eps) == (not grows)


def test_scalar_gd_flags_divergence_and_stops():
    p = teaching.scalar_gd(0.05, 4.0, 1.0, 1.5, steps=100)
    assert p.diverged
    assert np.isnan(p.a[-1]) and np.isfinite(p.a[0])


# --- conservation ------------------------------------------------------------------------


def np_gd_step(A, B, Y, lr):
    R = B @ A - Y
    return A - lr * B.T @ R, B - lr * R @ A.T


def test_one_gd_step_changes_d_by_the_exact_lr2_term():
    rng = np.random.default_rng(0)
    A, B, Y = rng.normal(size=(2, 7)), rng.normal(size=(5, 2)), rng.normal(size=(5, 7))
    lr = 0.05
    A1, B1 = np_gd_step(A, B, Y, lr)
    change = (B1.T @ B1 - A1 @ A1.T) - (B.T @ B - A @ A.T)
    pred = teaching.gd_imbalance_change(*(torch.from_numpy(x) for x in (A, B, Y)), lr)
    np.testing.assert_allclose(pred.numpy(), change, atol=1e-12)
    assert np.abs(change).max() > 1e-4  # the check is not vacuous


def test_conservation_path_gd_matches_a_numpy_run():
    A0, B0 = (x.numpy() for x in teaching.start_factors("unbalanced"))
    Y = teaching.lowrank_target(8, 8, (3.0, 1.0)).numpy()
    A, B = A0.copy(), B0.copy()
    for _ in range(30):
        A, B = np_gd_step(A, B, Y, 0.05)
    path = teaching.conservation_path("gd", "unbalanced", lr=0.05, steps=30)
    np.testing.assert_allclose(path.A.numpy(), A, atol=1e-10)
    np.testing.assert_allclose(path.B.numpy(), B, atol=1e-10)
    assert path.loss[-1] == pytest.approx(0.5 * ((B @ A - Y) ** 2).sum(), rel=1e-9)
    assert path.imbalance[-1] == pytest.approx(np.linalg.norm(B.T @ B - A @ A.T), rel=1e-9)


def drift_of_d(path, start):
    A0, B0 = (x.numpy() for x in teaching.start_factors(start))
    A, B = path.A.numpy(), path.B.numpy()
    return np.linalg.norm((B.T @ B - A @ A.T) - (B0.T @ B0 - A0 @ A0.T))


def test_gd_drift_of_d_vanishes_linearly_in_lr_while_adam_moves_it():
    d_big = drift_of_d(teaching.conservation_path("gd", "unbalanced", lr=0.02, steps=150), "unbalanced")
    d_small = drift_of_d(teaching.conservation_path("gd", "unbalanced", lr=0.01, steps=300), "unbalanced")
    assert 1.7 < d_big / d_small < 2.3
    d_adam = drift_of_d(teaching.conservation_path("adam", "unbalanced", lr=0.02, steps=150), "unbalanced")
    assert d_adam > 20 * d_big


@pytest.mark.parametrize("start", teaching.STARTS)
def test_balancing_zeroes_d_from_the_first_step(start):
    path = teaching.conservation_path("gd+balancing", start, lr=0.05, steps=20)
    assert np.all(path.rel_imbalance[1:] < 1e-6)
    if start != "balanced":
        assert path.rel_imbalance[0] > 0.5


def test_peft_start_is_maximally_unbalanced():
    A, B = teaching.start_factors("peft")
    assert torch.count_nonzero(B) == 0
    assert teaching.conservation_path("gd", "peft", steps=0).rel_imbalance[0] == pytest.approx(1.0)


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="gd\\+balancing"):
        teaching.conservation_path("sgd")
    with pytest.raises(ValueError, match="nearest"):
        teaching.gauge_run("adam", "polar", steps=1)


# --- r = 2 invariance --------------------------------------------------------------------


def test_factor_hessian_matches_autograd_off_the_minimum():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64)
    Y = torch.randn(4, 5, generator=g, dtype=torch.float64)

    def loss(flat):
        a, b = flat[:10].reshape(2, 5), flat[10:].reshape(4, 2)
        return 0.5 * ((b @ a - Y) ** 2).sum()

    H_ref = torch.autograd.functional.hessian(loss, torch.cat([A.reshape(-1), B.reshape(-1)]))
    torch.testing.assert_close(teaching.factor_hessian(A, B, Y), H_ref, atol=1e-10, rtol=1e-10)


def exact_rank2(n_out, n_in, s, seed):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(n_out, 2)))
    V, _ = np.linalg.qr(rng.normal(size=(n_in, 2)))
    return U, np.array(s), V


@pytest.mark.parametrize("c", [1.0, 1.4, 0.6])
def test_condition_number_closed_form_balanced_and_rescaled(c):
    s1, s2 = 3.0, 0.5
    U, s, V = exact_rank2(7, 5, (s1, s2), seed=1)
    Y = torch.from_numpy(U @ np.diag(s) @ V.T)
    B = torch.from_numpy(U * np.sqrt(s)) * c  # (out, 2)
    A = torch.from_numpy(np.sqrt(s)[:, None] * V.T) / c  # (2, in)
    eig, cond = teaching.hessian_condition(A, B, Y)
    c4 = max(c, 1 / c) ** 4
    assert cond == pytest.approx((c4 + 1) * s1 / s2, rel=1e-8)  # 2 s1/s2 at c = 1
    mags = np.sort(np.abs(eig.numpy()))
    assert mags[3] < 1e-10 < 1e-3 < mags[4]  # exactly r^2 = 4 gauge zeros


def test_invariance_example_keeps_dw_and_matches_numpy():
    for angle, shear, ls in [(0.0, 0.0, 0.0), (0.7, 0.0, 0.0), (-2.0, 1.5, 0.8), (0.3, -0.9, -1.2)]:
        ex = teaching.invariance_example(angle, shear, ls)
        Y = teaching.lowrank_target(6, 6, teaching.INVARIANCE_SIGMA).numpy()
        np.testing.assert_allclose(ex.dW.numpy(), Y, atol=1e-12)  # exact rank-2 target: dW = Y at every T
        assert ex.dW_change < 1e-12
        A, B = ex.A.numpy(), ex.B.numpy()
        D = B.T @ B - A @ A.T
        assert ex.imbalance == pytest.approx(np.linalg.norm(D), abs=1e-12)
        rel = np.linalg.norm(D) / (np.linalg.norm(B.T @ B) + np.linalg.norm(A @ A.T))
        assert ex.rel_imbalance == pytest.approx(rel, abs=1e-12)
        assert ex.cond_balanced == pytest.approx(2 * 3.0 / 1.0)


def test_rotation_keeps_balance_and_conditioning_shear_and_scale_do_not():
    base = teaching.invariance_example()
    rot = teaching.invariance_example(angle=1.1)
    assert rot.rel_imbalance < 1e-12 and rot.cond == pytest.approx(base.cond, rel=1e-9)
    for kw in ({"shear": 1.0}, {"log_scale": 0.5}):
        ex = teaching.invariance_example(**kw)
        assert ex.rel_imbalance > 0.1 and ex.cond > 1.5 * base.cond


def test_predicted_scaled_condition_matches_the_sweep():
    log_scales, conds, rels = teaching.condition_vs_scale(log_scales=np.linspace(-1, 1, 5))
    pred = [teaching.predicted_scaled_condition(s) for s in log_scales]
    np.testing.assert_allclose(conds, pred, rtol=1e-8)
    assert rels[2] < 1e-12 and rels[0] > 0.5


def test_transform_determinant():
    T = teaching.transform_2x2(0.4, 2.0, 0.3)
    assert float(torch.linalg.det(T)) == pytest.approx(math.exp(0.6))


# --- gauge and Adam ----------------------------------------------------------------------


def test_best_rank_loss_is_the_tail_of_the_output_spectrum():
    # Reduced-rank regression, computed independently: the best rank-r M X is the truncated SVD of E X.
    task = teaching.gauge_task(seeds=2, d=12, r=3, n=40, seed=5)
    for g in range(2):
        E = (task.W_target[g] - task.W0[g]).double().numpy()
        X = task.X[g].double().numpy()
        s = np.linalg.svd(E @ X, compute_uv=False)
        assert float(task.best_loss[g]) == pytest.approx((s[3:] ** 2).sum() / (E.shape[0] * X.shape[1]), rel=1e-5)


def test_gauge_runs_never_beat_the_best_rank_loss_and_lora_never_projects():
    task = teaching.gauge_task(seeds=2)
    lora = teaching.gauge_run("adam", "lora", 0.03, steps=60, task=task)
    assert lora.excess_loss.shape == (2, 61)
    assert np.all(lora.excess_loss > -1e-4 * task.best_loss.numpy()[:, None])
    assert np.all(lora.displacement == 0)
    assert np.nanmedian(lora.excess_loss[:, -1]) < 0.1 * np.median(lora.excess_loss[:, 0])


def test_batched_seeds_equal_separate_runs():
    task = teaching.gauge_task(seeds=3)
    both = teaching.gauge_run("adam", "nearest", 0.03, steps=15, task=task)
    one = teaching.GaugeTask(*(getattr(task, f)[1:2] for f in ("W0", "W_target", "X", "A0", "B0", "best_loss")))
    alone = teaching.gauge_run("adam", "nearest", 0.03, steps=15, task=one)
    np.testing.assert_allclose(both.excess_loss[1], alone.excess_loss[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", teaching.GAUGE_OPTIMIZERS)
def test_nearest_gauge_moves_the_factors_no_more_than_svd(optimizer):
    # The first projection (after step 0) sees the same point in both arms, and nearest is
    # by definition the balanced pair closest to it.
    task = teaching.gauge_task(seeds=4)
    svd = teaching.gauge_run(optimizer, "svd", 0.03, steps=3, task=task)
    near = teaching.gauge_run(optimizer, "nearest", 0.03, steps=3, task=task)
    assert np.all(near.displacement[:, 0] <= svd.displacement[:, 0] + 1e-5)
    assert np.all(svd.displacement[:, 0] > 0.1)  # the svd gauge jumps far from where Adam put the factors
    assert np.all(near.rel_imbalance[:, 1:] < 1e-3) and np.all(svd.rel_imbalance[:, 1:] < 1e-3)
    assert np.all(near.rel_imbalance[:, 0] == 1)  # PEFT init, B = 0


def test_one_thread_restores_the_setting():
    before = torch.get_num_threads()
    with teaching.one_thread():
        with teaching.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
