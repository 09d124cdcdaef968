"""The synthetic task, and the losses of stored runs against an independent float64 numpy re-implementation."""

import re

import numpy as np
import pytest
import torch

from balora.errors import InputError
from balora.runner import compare
from balora.tasks import get_task
from balora.tasks.synthetic import DEFAULTS, problem_tensors

TINY = {"in_features": 7, "out_features": 6, "rank": 2}


def cfg(**kw):
    c = {**DEFAULTS, "dtype": "float64", **TINY}
    c.update(kw)
    return c


def factors(model):
    layer = model.base_model.model.layers[0]
    return (layer.lora_A["default"].weight.detach().double().numpy().copy(),
            layer.lora_B["default"].weight.detach().double().numpy().copy())


def test_build_is_deterministic_and_trains_only_lora():
    task = get_task("synthetic")
    p1 = task.build(cfg(), 3, 2.0, torch.device("cpu"))
    p2 = task.build(cfg(), 3, 2.0, torch.device("cpu"))
    p3 = task.build(cfg(), 4, 2.0, torch.device("cpu"))
    A1, B1 = factors(p1.model)
    A2, _ = factors(p2.model)
    A3, _ = factors(p3.model)
    assert np.array_equal(A1, A2) and not np.allclose(A1, A3)
    assert A1.shape == (2, 7) and B1.shape == (6, 2) and not B1.any()  # PEFT init: B = 0
    trainable = [n for n, p in p1.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(n for n, _ in p1.model.named_parameters() if "lora_" in n)
    W1, _ = problem_tensors(cfg(), 3)
    W3, _ = problem_tensors(cfg(), 4)
    assert not np.allclose(W1[0], W3[0])


def test_build_leaves_the_callers_rng_as_it_was():
    """The task's random draws (the frozen layers' own init, PEFT's A) come from forked or private generators:
    a user's torch.manual_seed before balora.compare still decides what they draw after it."""
    torch.manual_seed(123)
    expected = torch.rand(5)  # the caller's next draws, without the build in between
    torch.manual_seed(123)
    get_task("synthetic").build(cfg(depth=2), 0, 2.0, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_initial_and_best_loss_match_numpy():
    c = cfg()
    problem = get_task("synthetic").build(c, 1, 2.0, torch.device("cpu"))
    (W0,), T = problem_tensors(c, 1)
    W0, T = W0.numpy(), T.numpy()
    X = next(problem.batches())
    assert problem.loss(problem.model, X).item() == pytest.approx(0.5 * np.sum((W0 - T) ** 2), rel=1e-12)

    # Eckart-Young: the truncated SVD of T - W0 attains best_loss, and no random rank-r update beats it
    U, S, Vt = np.linalg.svd(T - W0)
    dW = (U[:, :2] * S[:2]) @ Vt[:2]
    assert 0.5 * np.sum((W0 + dW - T) ** 2) == pytest.approx(problem.best_loss, rel=1e-10)
    rng = np.random.default_rng(0)
    Bs, As = U[:, :2] * np.sqrt(S[:2]), np.sqrt(S[:2])[:, None] * Vt[:2]
    for _ in range(200):  # rank-2 candidates near the optimum
        cand = (Bs + 0.05 * rng.standard_normal((6, 2))) @ (As + 0.05 * rng.standard_normal((2, 7)))
        assert 0.5 * np.sum((W0 + cand - T) ** 2) >= problem.best_loss
    assert problem.best_loss < problem.target_loss < 0.5 * np.sum((W0 - T) ** 2)


def test_depth_two_reachable_target():
    c = cfg(depth=2, target="reachable")
    problem = get_task("synthetic").build(c, 0, 2.0, torch.device("cpu"))
    (W1, W2), T = problem_tensors(c, 0)
    assert problem.best_loss == 0.0
    X = next(problem.batches())
    expected = 0.5 * np.sum((W2.numpy() @ W1.numpy() - T.numpy()) ** 2)
    assert problem.loss(problem.model, X).item() == pytest.approx(expected, rel=1e-12)
    assert np.linalg.matrix_rank(T.numpy() - W2.numpy() @ W1.numpy()) > 2  # not a trivial target


# ------------------------------------------------------------- independent re-implementation


def np_loss_grads(W0, T, A, B, s):
    R = W0 + s * B @ A - T  # (out, in)
    return 0.5 * np.sum(R**2), s * B.T @ R, s * R @ A.T  # loss, dL/dA (r, in), dL/dB (out, r)


def np_balanced(A, B, gauge):
    """Balanced pair with product B A from numpy's full SVD (not the library's QR-core route)."""
    r = A.shape[0]
    U, S, Vt = np.linalg.svd(B @ A)
    Bs, As = U[:, :r] * np.sqrt(S[:r]), np.sqrt(S[:r])[:, None] * Vt[:r]
    if gauge == "svd":
        return As, Bs
    # nearest: the orthogonal O minimising ||Bs O - B||^2 + ||O^T As - A||^2 (Procrustes)
    P, _, Qt = np.linalg.svd(Bs.T @ B + As @ A.T)
    O = P @ Qt
    return O.T @ As, Bs @ O


def np_run(W0, T, A, B, s, optimizer, lr, steps, gauge=None):
    losses = []
    params = [A, B]
    m = [np.zeros_like(A), np.zeros_like(B)]
    v = [np.zeros_like(A), np.zeros_like(B)]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        loss, gA, gB = np_loss_grads(W0, T, params[0], params[1], s)
        losses.append(loss)
        new = []
        for i, (p, g) in enumerate(zip(params, (gA, gB))):
            if optimizer == "sgd":
                new.append(p - lr * g)
            elif optimizer == "sign":
                new.append(p - lr * np.sign(g))
            else:
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
                new.append(p - lr * mhat / (np.sqrt(vhat) + eps))
        params = new
        if gauge is not None and np.any(params[1]):
            params = list(np_balanced(params[0], params[1], gauge))
    return np.array(losses)


@pytest.mark.parametrize(
    "optimizer,lr,arms",
    [("adam", 0.05, "lora,balora"), ("sgd", 0.2, "lora,balora,balora-svd"), ("sign", 0.01, "lora,balora")],
)
def test_stored_losses_match_independent_recomputation(tmp_path, optimizer, lr, arms):
    steps, seeds, alpha = 25, [0, 5], 3.0
    run = compare("synthetic", arms=arms, steps=steps, seeds=seeds, optimizer=optimizer, lr=lr, alpha=alpha,
                  rank=2, device="cpu", out=tmp_path / "run", quiet=True, dtype="float64", layers_every=0,
                  spectra_every=0, in_features=7, out_features=6)
    assert run.status == "completed"
    c = cfg()
    gauges = {"lora": None, "balora": "nearest", "balora-svd": "svd"}
    for seed in seeds:
        (W0,), T = problem_tensors(c, seed)
        A0, B0 = factors(get_task("synthetic").build(c, seed, alpha, torch.device("cpu")).model)
        best = 0.5 * np.sum(np.linalg.svd(T.numpy() - W0.numpy(), compute_uv=False)[2:] ** 2)
        for arm in arms.split(","):
            expected = np_run(W0.numpy(), T.numpy(), A0, B0, alpha / 2, optimizer, lr, steps, gauges[arm])
            got = run.steps[(run.steps["arm"] == arm) & (run.steps["seed"] == seed)].sort_values("step")
            assert list(got["step"]) == list(range(1, steps + 1))
            np.testing.assert_allclose(got["loss"].to_numpy(), expected, rtol=1e-7, err_msg=f"{arm} seed {seed}")
            np.testing.assert_allclose(got["excess_loss"].to_numpy(), expected - best, rtol=1e-6, atol=1e-9)
    # the comparison is not vacuous: balancing changed the trajectory
    lora = run.steps[run.steps["arm"] == "lora"]["loss"].to_numpy()
    bal = run.steps[run.steps["arm"] == "balora"]["loss"].to_numpy()
    assert np.abs(lora - bal).max() > 1e-6


def test_float32_run_tracks_float64_recomputation(tmp_path):
    run = compare("synthetic", arms="lora", steps=40, seeds=1, optimizer="adam", lr=0.03, device="cpu",
                  out=tmp_path / "run", quiet=True, layers_every=0, spectra_every=0)
    c = {**DEFAULTS, "dtype": "float64", "rank": 4}
    (W0,), T = problem_tensors(c, 0)
    A0, B0 = factors(get_task("synthetic").build(c, 0, 4.0, torch.device("cpu")).model)
    expected = np_run(W0.numpy(), T.numpy(), A0, B0, 1.0, "adam", 0.03, 40)
    np.testing.assert_allclose(run.steps.sort_values("step")["loss"].to_numpy(), expected, rtol=1e-4)


# ------------------------------------------------------------- init_scale


def test_init_scale_multiplies_A_init_exactly_and_keeps_B_zero():
    task = get_task("synthetic")
    A1, B1 = factors(task.build(cfg(), 2, 2.0, torch.device("cpu")).model)
    A10, B10 = factors(task.build(cfg(init_scale=10), 2, 2.0, torch.device("cpu")).model)
    assert np.array_equal(A10, 10 * A1) and not B1.any() and not B10.any()
    assert np.abs(A1).max() <= 1 / np.sqrt(7)  # PEFT's kaiming-uniform bound 1/sqrt(in), untouched at scale 1
    An, _ = factors(task.build({k: v for k, v in cfg().items() if k != "init_scale"}, 2, 2.0,
                               torch.device("cpu")).model)
    assert np.array_equal(An, A1)  # a stored config from before the option: PEFT's init


def test_init_scale_1_is_bit_identical_to_the_default(tmp_path):
    kw = dict(arms="lora,balora", steps=15, seeds=[1], optimizer="sgd", lr=0.2, device="cpu", quiet=True,
              layers_every=0, spectra_every=0)
    default = compare("synthetic", out=tmp_path / "default", **kw).steps
    one = compare("synthetic", out=tmp_path / "one", init_scale=1, **kw).steps
    cols = ["arm", "step", "loss"]
    assert default[cols].equals(one[cols])
    ten = compare("synthetic", out=tmp_path / "ten", init_scale=10, **kw).steps  # same problem, larger A
    first = {name: d[d["arm"] == "lora"].set_index("step")["loss"] for name, d in (("default", default), ("ten", ten))}
    assert first["ten"][1] == first["default"][1] and first["ten"][2] != first["default"][2]


@pytest.mark.parametrize("bad", [0, -1.0, "big", float("inf"), float("nan")])
def test_init_scale_must_be_positive(bad):
    with pytest.raises(InputError, match="init_scale"):
        get_task("synthetic").build(cfg(init_scale=bad), 0, 2.0, torch.device("cpu"))


@pytest.mark.parametrize("dtype,std", [("float32", 1e40), ("bfloat16", 1e40), ("float32", 1e-300),
                                       ("float64", 1e-300), ("float64", 1e300)])
def test_a_std_whose_problem_does_not_fit_the_dtype_is_refused(dtype, std):
    # entries past the dtype's range became inf when the weights were rounded to it: the first build failed as
    # "_LinAlgError: linalg.svd: ... non-finite values (rerun with --debug)"; entries below its smallest
    # number (or losses that underflow float64) became 0: a problem of zeros, "completed" at loss 0 in one step
    W0s, T = problem_tensors(cfg(std=std), 0)
    rounded = W0s[0].to(getattr(torch, dtype)).double()
    initial = 0.5 * float(((rounded - T) ** 2).sum())  # independent: what the trained problem starts at
    assert not (rounded.isfinite().all() and np.isfinite(initial) and initial > 0)
    with pytest.raises(InputError, match=re.escape(f"--set std={std}: the problem does not fit {dtype}")) as e:
        get_task("synthetic").build(cfg(std=std, dtype=dtype), 0, 2.0, torch.device("cpu"))
    assert "\n" not in str(e.value)
    get_task("synthetic").build(cfg(std=1e10, dtype=dtype), 0, 2.0, torch.device("cpu"))  # a std that fits


def test_sgd_conserves_the_large_initial_imbalance():
    """Plain SGD on B A: D = B^T B - A A^T changes by lr^2 (gB^T gB - gA gA^T) per step (the first-order
    terms cancel), so with B = 0 it stays -A0 A0^T up to O(lr^2): a large A init stays imbalanced."""
    c = cfg(rank=2, init_scale=10, alpha=2.0)
    problem = get_task("synthetic").build(c, 0, 2.0, torch.device("cpu"))  # s = alpha / r = 1
    layer = problem.model.base_model.model.layers[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A0 = A.detach().clone()
    D0 = -A0 @ A0.T
    lr = 1e-2  # lr * ||A0||^2 ~ 0.6: stable
    opt = torch.optim.SGD([A, B], lr=lr)
    X = next(problem.batches())
    excess0 = problem.loss(problem.model, X).item() - problem.best_loss
    bound = 0.0
    for _ in range(100):
        opt.zero_grad()
        problem.loss(problem.model, X).backward()
        gA, gB = A.grad.detach(), B.grad.detach()
        D_before = B.detach().T @ B.detach() - A.detach() @ A.detach().T
        step_change = lr**2 * (gB.T @ gB - gA @ gA.T)
        opt.step()
        D = B.detach().T @ B.detach() - A.detach() @ A.detach().T
        torch.testing.assert_close(D - D_before, step_change, rtol=1e-6, atol=1e-10)  # the exact one-step law
        bound += float(torch.linalg.matrix_norm(step_change))
    assert float(torch.linalg.matrix_norm(B.detach())) > 0.2  # B grew from 0 ...
    drift = float(torch.linalg.matrix_norm(D - D0))
    assert drift <= bound + 1e-9 and drift < 1e-3 * float(torch.linalg.matrix_norm(D0))  # ... and D barely moved
    # B fits fast within A0's row space while A hardly turns: plain LoRA trains, then stalls far from the optimum
    excess = problem.loss(problem.model, X).item() - problem.best_loss
    assert 0.5 * excess0 < excess < 0.8 * excess0


# ------------------------------------------------------------- the paper's preset (init=paper, shared problem, depth 2)


def paper_cfg(**kw):
    return cfg(init="paper", **kw)


def all_A(model):
    return [m.lora_A["default"].weight.detach().double().numpy() for m in model.base_model.model.layers]


def test_paper_init_entries_are_standard_normal():
    big = dict(in_features=300, out_features=200, rank=20)  # 60,000 entries in W0 and T, 6,000 in A
    c = paper_cfg(**big)
    (W0,), T = problem_tensors(c, 0)
    problem = get_task("synthetic").build(c, 0, 20.0, torch.device("cpu"))
    (A,) = all_A(problem.model)
    B = problem.model.base_model.model.layers[0].lora_B["default"].weight
    for x, n in ((W0.numpy(), 60_000), (T.numpy(), 60_000), (A, 6_000)):
        assert x.size == n
        assert abs(x.mean()) < 5 / np.sqrt(n) and abs(x.std() - 1) < 5 / np.sqrt(2 * n)  # N(0, 1), not 1/fan_in
    assert not B.detach().any()  # B = 0
    assert problem.model.base_model.model.layers[0].scaling["default"] == 1.0  # alpha = r: scaling 1
    # std and init_scale scale the paper's entries as they scale PEFT's
    (W0s,), _ = problem_tensors(paper_cfg(std=3.0, **big), 0)
    np.testing.assert_allclose(W0s.numpy(), 3 * W0.numpy(), rtol=1e-12)
    (A2,) = all_A(get_task("synthetic").build(paper_cfg(init_scale=2.0, **big), 0, 20.0, torch.device("cpu")).model)
    np.testing.assert_allclose(A2, 2 * A, rtol=1e-6)
    # PEFT's init keeps its scale: W0 entries ~ 1/sqrt(fan_in)
    (Wp,), _ = problem_tensors(cfg(**big), 0)
    assert abs(Wp.numpy().std() * np.sqrt(300) - 1) < 0.02


def test_paper_problem_is_shared_across_seeds_and_only_the_lora_init_changes():
    task = get_task("synthetic")
    p0, p1 = (task.build(paper_cfg(), s, 2.0, torch.device("cpu")) for s in (0, 5))
    (W0a,), Ta = problem_tensors(paper_cfg(), 0)
    (W0b,), Tb = problem_tensors(paper_cfg(), 5)
    assert torch.equal(W0a, W0b) and torch.equal(Ta, Tb) and p0.best_loss == p1.best_loss
    assert not np.allclose(all_A(p0.model)[0], all_A(p1.model)[0])
    assert p0.info["shared_problem"] is True and p0.info["init"] == "paper"
    # the shared problem is drawn from problem_seed; the LoRA init is not a copy of the problem's stream
    (W0c,), _ = problem_tensors(paper_cfg(problem_seed=3), 0)
    assert not torch.equal(W0a, W0c)
    assert not np.allclose(all_A(p0.model)[0], W0a.numpy().ravel()[: 2 * 7].reshape(2, 7))
    # shared_problem=false under init=paper, and "auto" under init=peft: a new problem per seed
    (W0d,), _ = problem_tensors(paper_cfg(shared_problem=False), 5)
    (W0e,), _ = problem_tensors(cfg(), 5)
    assert not torch.equal(W0a, W0d) and not torch.equal(problem_tensors(cfg(), 0)[0][0], W0e)
    # shared under PEFT's init: same problem, PEFT's own A per seed
    (W0f,), _ = problem_tensors(cfg(shared_problem=True), 5)
    assert torch.equal(problem_tensors(cfg(shared_problem=True), 0)[0][0], W0f)


def test_depth_two_paper_reference_loss():
    c = paper_cfg(depth=2)
    problem = get_task("synthetic").build(c, 0, 2.0, torch.device("cpu"))
    (W1, W2), T = (w.numpy() for w in problem_tensors(c, 0)[0]), problem_tensors(c, 0)[1].numpy()
    assert W1.shape == (6, 7) and W2.shape == (6, 6)  # in 7 -> hidden 6 -> out 6
    S = np.linalg.svd(T - W2 @ W1, compute_uv=False)
    assert problem.best_loss == pytest.approx(0.5 * np.sum(S[2 * 2:] ** 2), rel=1e-12)  # i > L r, L = 2, r = 2
    X = next(problem.batches())
    assert problem.loss(problem.model, X).item() == pytest.approx(0.5 * np.sum((W2 @ W1 - T) ** 2), rel=1e-12)
    # a lower bound: the stack changes its product by rank <= 2 r at most, so no point of it goes below
    rng = np.random.default_rng(0)
    for _ in range(200):
        B1, A1, B2, A2 = (rng.standard_normal(s) for s in ((6, 2), (2, 7), (6, 2), (2, 6)))
        loss = 0.5 * np.sum(((W2 + B2 @ A2) @ (W1 + B1 @ A1) - T) ** 2)
        assert loss >= problem.best_loss
    assert problem.info["depth"] == 2 and "paper's reference" in problem.info["best_loss"]


def test_paper_options_are_recorded_in_the_run(tmp_path):
    run = compare("synthetic", arms="lora,balora-svd", steps=3, seeds=2, optimizer="sign", lr="lin:0.01:0.02:2",
                  device="cpu", out=tmp_path / "run", quiet=True, layers_every=0, spectra_every=0, select="seed",
                  init="paper", depth=2, **TINY)
    assert run.config["task_options"]["init"] == "paper" and run.config["task_options"]["depth"] == 2
    assert run.config["problem"]["shared_problem"] is True and run.config["select"] == "seed"
    assert "--set init=paper" in run.config["command_reconstructed"]
    s = run.summary
    assert s.groupby("seed")["best_loss"].nunique().eq(1).all() and s["best_loss"].nunique() == 1  # one problem
    first = run.steps[run.steps["step"] == 1].groupby("seed")["loss"].first()
    assert first.nunique() == 1  # B = 0: the first loss is the shared problem's, whatever the LoRA init
    assert (s["final_excess_loss"] > 0).all()


@pytest.mark.parametrize("key,bad", [("init", "kaiming"), ("shared_problem", "sometimes"), ("problem_seed", -1),
                                     ("problem_seed", 2**64)])  # past what torch's generator takes
def test_paper_options_are_checked(key, bad):
    with pytest.raises(InputError, match=f"--set {key}"):
        get_task("synthetic").build(cfg(**{key: bad}), 0, 2.0, torch.device("cpu"))


def test_bfloat16_problem_is_the_rounded_one_and_its_loss_is_summed_in_fp32():
    """In bf16 the frozen weights are rounded: the reference loss is that problem's (numpy, float64,
    Eckart-Young on the rounded W0), and the loss at init (B = 0, output W0 on the identity input,
    exact in bf16) matches it in fp32, where a bf16 target and sum were 1e-3 off."""
    p = get_task("synthetic").build(cfg(dtype="bfloat16", in_features=40, out_features=30, rank=3), 2, 6.0,
                                    torch.device("cpu"))
    W0s, T = problem_tensors(cfg(in_features=40, out_features=30, rank=3), 2)
    W0 = W0s[0].to(torch.bfloat16).double().numpy()  # one layer
    R = T.numpy() - W0
    sigma = np.linalg.svd(R, compute_uv=False)
    assert p.best_loss == pytest.approx(0.5 * (sigma[3:] ** 2).sum(), rel=1e-12)
    initial = float(p.loss(p.model, next(p.batches())))
    assert initial == pytest.approx(0.5 * (R**2).sum(), rel=1e-6)


def test_a_deep_stack_that_overflows_the_dtype_is_not_told_to_move_std_nearer_1():
    # init=paper, 30 layers of 20 x 20 N(0, 1) entries: the product's entries are ~sqrt(20)^30 (1e19), its loss
    # past float32's range, at the default std=1. The refusal said "use a std nearer 1" to a std of 1.
    big = dict(init="paper", depth=30, in_features=20, out_features=20, rank=4)
    W0s, T = problem_tensors(cfg(**big), 0)
    W = torch.eye(20, dtype=torch.float64)
    for w in W0s:
        W = w @ W
    assert 0.5 * float(((W - T) ** 2).sum()) > torch.finfo(torch.float32).max  # independent: fp32 cannot hold it
    with pytest.raises(InputError, match=re.escape("--set std=1.0: the problem does not fit float32")) as e:
        get_task("synthetic").build(cfg(**big, dtype="float32"), 0, 2.0, torch.device("cpu"))
    assert "nearer 1" not in str(e.value) and "fewer layers (--set depth) or a std below 1" in str(e.value)
