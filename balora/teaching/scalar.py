"""1. The scalar case f(a, b) = 1/2 (ab - y)^2: the valley ab = y and its curvature a^2 + b^2."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from balora.teaching.threads import DIVERGED_ABS


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
