"""The maths behind the dashboard's Learn page: small, exact, fast. No plotting, no streamlit.

Four pictures of one fact: a LoRA product B A is unchanged by (B T, T^-1 A) for any
invertible r x r T, and the factorisations it leaves to choose from are not equally easy.

1. Scalar case f(a, b) = 1/2 (ab - y)^2: a valley of minimisers ab = y whose curvature
   across the valley, a^2 + b^2, is smallest at the balanced point |a| = |b|.
2. Conservation: gradient descent keeps D = B^T B - A A^T (b^2 - a^2 in the scalar case)
   constant up to O(lr^2) per step; Adam does not; balancing sets it to zero.
3. r = 2 invariance: (B T, T^-1 A) has the same dW but a different imbalance and a
   different Hessian condition number.
4. Why the gauge matters for Adam: balancing with the "svd" versus the "nearest" gauge,
   under torch Adam and under sign descent.

PEFT naming throughout: A = lora_A.weight (r, in), B = lora_B.weight (out, r), dW = B A.
(The paper writes W0 + A B: its A is PEFT's B.) Every function runs in well under 0.3 s
at its default sizes on two CPU cores, because the page recomputes on every widget change.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from balora.imbalance import imbalance as imbalance_norm
from balora.imbalance import rel_imbalance
from balora.projection import balanced_factors

# Iterates beyond this size count as diverged; stopping there keeps the plots finite.
DIVERGED_ABS = 1e3

_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 1


@contextmanager
def one_thread():
    """Run torch on one thread inside the block, then restore the previous setting.

    The problems here are a few hundred numbers; extra threads only add synchronisation, and
    on a busy machine each OpenMP barrier can cost milliseconds (measured: 20x slower loops
    with 2 threads than with 1 on a loaded 2-core box). The counter makes nested and
    concurrent uses (several dashboard sessions) restore the setting only once, at the end.
    """
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_depth += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0:
                torch.set_num_threads(_threads_saved)

# ---------------------------------------------------------------------------------------
# 1. The scalar case f(a, b) = 1/2 (ab - y)^2
# ---------------------------------------------------------------------------------------


def scalar_loss(a, b, y: float = 1.0):
    """f(a, b) = 1/2 (ab - y)^2, elementwise over numpy arrays or floats."""
    return 0.5 * (np.multiply(a, b) - y) ** 2


def scalar_loss_grid(y: float = 1.0, lim: float = 2.5, n: int = 161):
    """Loss on an n x n grid over [-lim, lim]^2.

    Returns a (n,), b (n,) and Z (n, n) with Z[i, j] = f(a[j], b[i]): rows follow b, as a
    contour plot with x = a and y = b expects.
    """
    a = np.linspace(-lim, lim, n)
    b = np.linspace(-lim, lim, n)
    return a, b, scalar_loss(a[None, :], b[:, None], y)  # (n, n)


def scalar_hessian(a: float, b: float, y: float = 1.0) -> np.ndarray:
    """Hessian of f at (a, b), (2, 2): [[b^2, 2ab - y], [2ab - y, a^2]]."""
    off = 2 * a * b - y
    return np.array([[b * b, off], [off, a * a]])


def valley_curvature(a, y: float = 1.0):
    """Along the valley ab = y: the partner b = y / a and the curvature across the valley.

    On the valley the Hessian is [[b^2, ab], [ab, a^2]] = (b, a)^T (b, a): one zero
    eigenvalue (along the valley) and one equal to a^2 + b^2 (across it). Gradient descent
    can settle at a point only if lr < 2 / (a^2 + b^2).
    """
    a = np.asarray(a, dtype=float)
    b = y / a
    return b, a * a + b * b


def curvature_at_minimiser(d: float, y: float = 1.0) -> float:
    """Curvature a^2 + b^2 at the valley point with imbalance b^2 - a^2 = d.

    (a^2 + b^2)^2 = (b^2 - a^2)^2 + 4 (ab)^2, so it is sqrt(d^2 + 4 y^2): gradient flow keeps
    d, so the start's imbalance fixes how sharp the minimiser it reaches is.
    """
    return math.sqrt(d * d + 4 * y * y)


def valley_point_with_imbalance(d: float, y: float = 1.0) -> tuple[float, float]:
    """The point (a, b), a > 0, of the valley ab = y with b^2 - a^2 = d: where gradient flow
    from a start with that imbalance ends. b^2 solves b^4 - d b^2 - y^2 = 0."""
    b2 = (d + math.sqrt(d * d + 4 * y * y)) / 2
    return abs(y) / math.sqrt(b2), math.copysign(math.sqrt(b2), y)


@dataclass
class ScalarPath:
    """Gradient descent on f(a, b) from one start."""

    a: np.ndarray  # (steps + 1,) iterates; nan after divergence
    b: np.ndarray  # (steps + 1,)
    loss: np.ndarray  # (steps + 1,)
    imbalance: np.ndarray  # (steps + 1,) b^2 - a^2
    diverged: bool


def scalar_gd(a0: float, b0: float, y: float = 1.0, lr: float = 0.1, steps: int = 60) -> ScalarPath:
    """Plain gradient descent on f: a <- a - lr (ab - y) b, b <- b - lr (ab - y) a, in float64."""
    a = np.full(steps + 1, np.nan)
    b = np.full(steps + 1, np.nan)
    a[0], b[0] = a0, b0
    diverged = False
    for t in range(steps):
        res = a[t] * b[t] - y
        a[t + 1] = a[t] - lr * res * b[t]
        b[t + 1] = b[t] - lr * res * a[t]
        if max(abs(a[t + 1]), abs(b[t + 1])) > DIVERGED_ABS:
            diverged = True
            break
    return ScalarPath(a=a, b=b, loss=scalar_loss(a, b, y), imbalance=b * b - a * a, diverged=diverged)


# ---------------------------------------------------------------------------------------
# 2. Conservation of D = B^T B - A A^T on a small matrix problem
# ---------------------------------------------------------------------------------------

CONSERVATION_OPTIMIZERS = ("gd", "adam", "gd+balancing")
STARTS = ("balanced", "unbalanced", "peft")


def lowrank_target(n_out: int = 8, n_in: int = 8, sigma=(3.0, 1.0), seed: int = 0) -> torch.Tensor:
    """Y = U diag(sigma) V^T (n_out, n_in) with random orthonormal U, V: an exact rank-len(sigma) target."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    U, _ = torch.linalg.qr(torch.randn(n_out, k, generator=g, dtype=torch.float64))  # (out, k)
    V, _ = torch.linalg.qr(torch.randn(n_in, k, generator=g, dtype=torch.float64))  # (in, k)
    return (U * torch.tensor(sigma, dtype=torch.float64)) @ V.T  # (out, in)


def start_factors(start: str, n_out: int = 8, n_in: int = 8, r: int = 2, seed: int = 0):
    """A starting pair A (r, in), B (out, r) in float64.

    "balanced": a small random pair projected onto B^T B = A A^T.
    "unbalanced": A of norm ~1, B ten times smaller, same kind of product.
    "peft": PEFT's LoRA init, A ~ U(-1/sqrt(in), 1/sqrt(in)) and B = 0 (rel_imbalance 1).
    """
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}; use one of {', '.join(STARTS)}")
    g = torch.Generator().manual_seed(seed + 1000)
    if start == "peft":
        A = (torch.rand(r, n_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(n_in)  # (r, in)
        return A, torch.zeros(n_out, r, dtype=torch.float64)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)  # (r, in)
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64) / math.sqrt(n_out)  # (out, r)
    if start == "unbalanced":
        return 1.5 * A, 0.15 * B
    p = balanced_factors(0.5 * A[None], 0.5 * B[None], method="nearest")
    return p.A[0], p.B[0]


def factor_loss_grads(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor):
    """L = 1/2 ||B A - Y||_F^2 and its gradients dL/dA = B^T R (r, in), dL/dB = R A^T (out, r)."""
    R = B @ A - Y  # (out, in)
    return 0.5 * float((R * R).sum()), B.T @ R, R @ A.T


@dataclass
class FactorPath:
    """One optimisation run of a factor pair, recorded at every step 0..steps."""

    loss: np.ndarray  # (steps + 1,)
    imbalance: np.ndarray  # (steps + 1,) ||B^T B - A A^T||_F
    rel_imbalance: np.ndarray  # (steps + 1,) in [0, 1]
    A: torch.Tensor  # (r, in) final factors
    B: torch.Tensor  # (out, r)


@one_thread()
def conservation_path(
    optimizer: str,
    start: str = "unbalanced",
    lr: float = 0.05,
    steps: int = 120,
    seed: int = 0,
    n: int = 8,
    r: int = 2,
) -> FactorPath:
    """Fit B A to an exact rank-r n x n target from one start with one optimizer.

    optimizer: "gd" (conserves D up to O(lr^2) per step), "adam" (torch Adam: does not),
    "gd+balancing" (gradient descent, then the "nearest" projection after every step: D = 0
    from the first step whose product is nonzero).
    """
    if optimizer not in CONSERVATION_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(CONSERVATION_OPTIMIZERS)}")
    Y = lowrank_target(n, n, sigma=tuple(np.linspace(3.0, 1.0, r)), seed=seed)  # s1 / sr = 3 for any r
    A, B = start_factors(start, n, n, r, seed)
    A, B = A.clone(), B.clone()
    adam = None
    if optimizer == "adam":
        A.requires_grad_(True)
        B.requires_grad_(True)
        adam = torch.optim.Adam([A, B], lr=lr)
    losses, imbs, rels = [], [], []
    for t in range(steps + 1):
        with torch.no_grad():
            loss, gA, gB = factor_loss_grads(A, B, Y)
            losses.append(loss)
            imbs.append(float(imbalance_norm(A[None], B[None])[0]))
            rels.append(float(rel_imbalance(A[None], B[None])[0]))
            if t == steps or not math.isfinite(loss) or loss > 1e12:
                break
            if adam is not None:
                A.grad, B.grad = gA, gB
                adam.step()
                continue
            A -= lr * gA
            B -= lr * gB
            if optimizer == "gd+balancing":
                p = balanced_factors(A[None], B[None], method="nearest")  # zero products come back unchanged
                A.copy_(p.A[0])
                B.copy_(p.B[0])
    return FactorPath(_padded(losses, steps), _padded(imbs, steps), _padded(rels, steps), A.detach(), B.detach())


def _padded(values: list, steps: int) -> np.ndarray:
    """(steps + 1,) array; a diverged run stops early and is padded with nan so every curve has the same length."""
    return np.array(values + [np.nan] * (steps + 1 - len(values)))


def gd_imbalance_change(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor, lr: float) -> torch.Tensor:
    """Exact change of D over one gradient-descent step on 1/2 ||B A - Y||^2, (r, r).

    With R = B A - Y the step is A' = A - lr B^T R, B' = B - lr R A^T; the O(lr) terms of
    B'^T B' and A' A'^T are equal and cancel, leaving lr^2 (A R^T R A^T - B^T R R^T B).
    """
    R = B @ A - Y  # (out, in)
    return lr * lr * (A @ R.T @ R @ A.T - B.T @ R @ R.T @ B)


# ---------------------------------------------------------------------------------------
# 3. The r = 2 invariance: (B T, T^-1 A)
# ---------------------------------------------------------------------------------------


def transform_2x2(angle: float = 0.0, shear: float = 0.0, log_scale: float = 0.0) -> torch.Tensor:
    """T = e^log_scale R(angle) [[1, shear], [0, 1]], (2, 2) float64; invertible for every input.

    R(angle) alone leaves the imbalance unchanged (orthogonal T); shear and scale change it.
    """
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    shr = torch.tensor([[1.0, shear], [0.0, 1.0]], dtype=torch.float64)
    return math.exp(log_scale) * rot @ shr


def balanced_pair(Y: torch.Tensor, r: int):
    """The balanced rank-r factorisation of Y from its SVD: B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T."""
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root  # A (r, in), B (out, r)


def factor_hessian(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Hessian of L(A, B) = 1/2 ||B A - Y||_F^2 in the parameters (vec A, vec B), row-major.

    Explicit formula, square in r (in + out). Its quadratic form is
    ||dB A + B dA||^2 + 2 <B A - Y, dB dA>: the Gauss-Newton part J^T J with
    J = [kron(B, I_in), kron(I_out, A^T)] and a cross term that vanishes at an exact fit.
    """
    r, n_in = A.shape
    n_out = B.shape[0]
    A, B = A.contiguous(), B.contiguous()  # torch.kron views its inputs and needs plain strides
    J = torch.cat(
        [torch.kron(B, torch.eye(n_in, dtype=A.dtype)), torch.kron(torch.eye(n_out, dtype=A.dtype), A.T.contiguous())], dim=1
    )  # (out*in, r*in + out*r)
    H = J.T @ J
    R = B @ A - Y  # (out, in)
    # d^2 L / dA[k, j] dB[i, l] = delta_kl R[i, j]
    cross = torch.einsum("kl,ij->kjil", torch.eye(r, dtype=A.dtype), R).reshape(r * n_in, n_out * r)
    H[: r * n_in, r * n_in :] += cross
    H[r * n_in :, : r * n_in] += cross.T
    return H


def hessian_condition(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor):
    """Eigenvalues of the Hessian (ascending) and its condition number without the gauge directions.

    The r^2 smallest-magnitude eigenvalues belong to the invariance (moving along (B T, T^-1 A)
    does not change the loss) and are dropped; the condition number is max / min of the rest.
    """
    r = A.shape[0]
    eig = torch.linalg.eigvalsh(factor_hessian(A, B, Y))  # (p,) ascending
    kept = eig[eig.abs().argsort()[r * r :]]
    lo = kept.abs().min()
    cond = float(kept.abs().max() / lo) if lo > 0 else math.inf
    return eig, cond


@dataclass
class InvarianceExample:
    """One point (B T, T^-1 A) on the manifold of factorisations of a rank-2 target."""

    T: torch.Tensor  # (2, 2)
    A: torch.Tensor  # (2, in) = T^-1 A0
    B: torch.Tensor  # (out, 2) = B0 T
    dW: torch.Tensor  # (out, in) = B A
    dW_change: float  # max |B A - B0 A0|: rounding error only
    imbalance: float  # ||B^T B - A A^T||_F
    rel_imbalance: float
    eigenvalues: torch.Tensor  # (r (in + out),) ascending, including the r^2 gauge zeros
    cond: float  # without the r^2 gauge directions
    cond_balanced: float  # at T = I: 2 s1 / s2


INVARIANCE_SIGMA = (3.0, 1.0)  # s1 / s2 = 3, so the balanced condition number is 6


@one_thread()
def invariance_example(
    angle: float = 0.0, shear: float = 0.0, log_scale: float = 0.0, n: int = 6, seed: int = 0
) -> InvarianceExample:
    """Start at the balanced factorisation of an exact rank-2 n x n target and apply T."""
    Y = lowrank_target(n, n, sigma=INVARIANCE_SIGMA, seed=seed)
    A0, B0 = balanced_pair(Y, 2)
    T = transform_2x2(angle, shear, log_scale)
    B = B0 @ T  # (out, 2)
    A = torch.linalg.solve(T, A0)  # (2, in) = T^-1 A0, without forming the inverse
    dW = B @ A
    eig, cond = hessian_condition(A, B, Y)
    _, cond0 = hessian_condition(A0, B0, Y)
    return InvarianceExample(
        T=T,
        A=A,
        B=B,
        dW=dW,
        dW_change=float((dW - B0 @ A0).abs().max()),
        imbalance=float(imbalance_norm(A[None], B[None])[0]),
        rel_imbalance=float(rel_imbalance(A[None], B[None])[0]),
        eigenvalues=eig,
        cond=cond,
        cond_balanced=cond0,
    )


@one_thread()
def condition_vs_scale(angle: float = 0.0, shear: float = 0.0, log_scales=None, n: int = 6, seed: int = 0):
    """Sweep the scale of T at fixed angle and shear: (log_scales (k,), cond (k,), rel_imbalance (k,))."""
    if log_scales is None:
        log_scales = np.linspace(-1.5, 1.5, 31)
    conds, rels = [], []
    for ls in log_scales:
        ex = invariance_example(angle, shear, float(ls), n=n, seed=seed)
        conds.append(ex.cond)
        rels.append(ex.rel_imbalance)
    return np.asarray(log_scales, dtype=float), np.array(conds), np.array(rels)


def predicted_scaled_condition(log_scale: float, s1: float = INVARIANCE_SIGMA[0], sr: float = INVARIANCE_SIGMA[-1]):
    """(c^4 + 1) s1 / sr for B c, A / c with c >= 1 (and c -> 1/c below 1, by symmetry)."""
    c4 = math.exp(4 * abs(log_scale))
    return (c4 + 1) * s1 / sr


# ---------------------------------------------------------------------------------------
# 4. Why the gauge matters for Adam
# ---------------------------------------------------------------------------------------

GAUGE_OPTIMIZERS = ("adam", "sign")
GAUGE_ARMS = ("lora", "svd", "nearest")


@dataclass
class GaugeTask:
    """G independent copies of one toy task: a frozen random layer W0 and a random target W*.

    Inputs X are random, so the loss mean((W0 + B A) X - W* X)^2 weighs directions by X X^T.
    """

    W0: torch.Tensor  # (G, out, in) frozen
    W_target: torch.Tensor  # (G, out, in)
    X: torch.Tensor  # (G, in, n) inputs
    A0: torch.Tensor  # (G, r, in) PEFT init
    B0: torch.Tensor  # (G, out, r) zeros
    best_loss: torch.Tensor  # (G,) smallest loss any rank-r B A can reach


@one_thread()
def gauge_task(seeds: int = 4, d: int = 20, r: int = 4, n: int = 100, seed: int = 0) -> GaugeTask:
    """The toy task of DESIGN.md section 2 (frozen random d x d layer, LoRA rank r, B = 0), batched over seeds."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(seeds, d, d, generator=g) / math.sqrt(d)  # (G, out, in)
    W_target = torch.randn(seeds, d, d, generator=g) / math.sqrt(d)  # (G, out, in)
    X = torch.randn(seeds, d, n, generator=g)  # (G, in, n)
    A0 = (torch.rand(seeds, r, d, generator=g) * 2 - 1) / math.sqrt(d)  # (G, r, in): PEFT's kaiming-uniform bound
    B0 = torch.zeros(seeds, d, r)  # (G, out, r)
    return GaugeTask(W0, W_target, X, A0, B0, best_rank_loss(W_target - W0, X, r))


def best_rank_loss(E: torch.Tensor, X: torch.Tensor, r: int) -> torch.Tensor:
    """min over rank-r M of mean((M - E) X)^2, (G,). E (G, out, in), X (G, in, n).

    mean((M - E) X)^2 = ||(M - E) L||_F^2 / out with C = X X^T / n = L L^T, so the best M L is
    the best rank-r approximation of E L (Eckart-Young) and the loss is its tail energy / out.
    """
    E, X = E.double(), X.double()
    C = X @ X.mT / X.shape[-1]  # (G, in, in)
    L = torch.linalg.cholesky(C)
    s = torch.linalg.svdvals(E @ L)  # (G, min(out, in))
    return (s[:, r:] ** 2).sum(-1).float() / E.shape[-2]


def gauge_loss(task: GaugeTask, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-seed MSE of the adapted layer, (G,)."""
    err = (task.W0 + B @ A - task.W_target) @ task.X  # (G, out, n)
    return err.pow(2).mean((-2, -1))


@dataclass
class GaugeRun:
    """One arm on all seeds; median over seeds is what the page plots."""

    excess_loss: np.ndarray  # (G, steps + 1) loss minus the best rank-r loss
    rel_imbalance: np.ndarray  # (G, steps + 1)
    displacement: np.ndarray  # (G, steps) ||(A, B) after projection - before||_F; 0 for LoRA


@one_thread()
def gauge_run(
    optimizer: str = "adam", arm: str = "nearest", lr: float = 0.03, steps: int = 100, task: GaugeTask | None = None
) -> GaugeRun:
    """Train one arm (plain LoRA, or balancing after every step with the "svd" or "nearest" gauge).

    optimizer "adam" is torch.optim.Adam; "sign" is sign descent, p <- p - lr sign(grad), the
    synthetic stand-in for Adam in the paper. Both act per coordinate, so running the seeds
    as one batched tensor is the same as running them one by one.
    """
    if optimizer not in GAUGE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(GAUGE_OPTIMIZERS)}")
    if arm not in GAUGE_ARMS:
        raise ValueError(f"unknown arm {arm!r}; use one of {', '.join(GAUGE_ARMS)}")
    task = task if task is not None else gauge_task()
    A = task.A0.clone().requires_grad_(True)
    B = task.B0.clone().requires_grad_(True)
    adam = torch.optim.Adam([A, B], lr=lr) if optimizer == "adam" else None
    G = A.shape[0]
    losses = torch.full((steps + 1, G), float("nan"))
    rels = torch.full((steps + 1, G), float("nan"))
    moved = torch.zeros(steps, G)
    for t in range(steps + 1):
        loss = gauge_loss(task, A, B)  # (G,)
        losses[t] = loss.detach()
        rels[t] = rel_imbalance(A.detach(), B.detach())
        if t == steps or not bool(torch.isfinite(loss).all()):
            break
        # Summing per-seed losses gives each seed exactly its own gradient.
        gA, gB = torch.autograd.grad(loss.sum(), (A, B))
        with torch.no_grad():
            if adam is not None:
                A.grad, B.grad = gA, gB
                adam.step()
            else:
                A -= lr * gA.sign()
                B -= lr * gB.sign()
            if arm != "lora":
                p = balanced_factors(A, B, method=arm)
                moved[t] = ((p.A - A).pow(2).sum((-2, -1)) + (p.B - B).pow(2).sum((-2, -1))).sqrt()
                A.copy_(p.A)
                B.copy_(p.B)
    excess = (losses - task.best_loss[None]).T.numpy()  # (G, steps + 1)
    return GaugeRun(excess_loss=excess, rel_imbalance=rels.T.numpy(), displacement=moved.T.numpy())
