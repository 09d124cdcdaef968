"""Balance many factor pairs at once, safely: batched by shape, validated before anything is written."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from balora.imbalance import rel_imbalance
from balora.pairs import FactorPair, batch_groups, stack_padded
from balora.linalg import matmul_unit_roundoff
from balora.policy import NONFINITE_POLICIES, RANK_DEFICIENT_POLICIES, BalancePolicy, as_policy  # noqa: F401
from balora.projection import GRAM_TOL, balanced_factors, gram_transforms, product_rel_error


class BalanceError(RuntimeError):
    """A pair could not be balanced and the policy says to stop; nothing was written."""


@dataclass
class BalanceSummary:
    """What one balancing pass did."""

    balanced: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # "module[adapter]" -> why it was left alone
    rank_deficient: dict[str, int] = field(default_factory=dict)  # "module[adapter]" -> rank of B A (< r)
    max_rel_error: float = float("nan")  # max ||B'A' - BA|| / ||BA|| after casting back; nan if not checked
    max_rel_imbalance: float = float("nan")  # max rel_imbalance of the written pairs; nan if not checked
    seconds: float = 0.0
    qr_path: int = 0  # pairs the fast Gram path could not do accurately, done by the QR path instead

    def __str__(self) -> str:
        parts = [f"balanced {self.balanced} LoRA pair(s) in {self.seconds * 1e3:.1f} ms"]
        if not math.isnan(self.max_rel_error):
            parts.append(f"max relative change of dW {self.max_rel_error:.2e}")
            parts.append(f"max rel_imbalance after {self.max_rel_imbalance:.2e}")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}")
        text = ", ".join(parts)
        for name, why in self.skipped.items():
            text += f"\n  skipped {name}: {why}"
        return text


def balance_pairs(
    pairs: list[FactorPair],
    method: str | BalancePolicy = "nearest",
    on_rank_deficient: str = "skip",
    on_nonfinite: str = "raise",
    check: bool = True,
) -> tuple[Mapping[int, tuple[torch.Tensor, torch.Tensor]], BalanceSummary]:
    """Balanced factors for `pairs`, without writing them anywhere.

    method: a gauge name, with the three options after it, or a BalancePolicy (already
    validated where the user gave it; the other arguments are then ignored).
    Returns ({index into pairs: (A', B') in each factor's own dtype}, summary). With
    check=False the new factors are formed from the current A, B as the mapping is read:
    write each one as it comes and drop it (the fast way), and read the mapping before
    anything else changes the factors; reading a key twice computes it twice. Pairs that
    are left alone (zero product, rank-deficient under "skip", non-finite under "skip",
    unsupported) are absent from the dict and listed in summary.skipped with the reason.
    Raises BalanceError, naming the modules, before anything is returned when a policy
    says "raise".
    """
    policy = as_policy(method, on_rank_deficient, on_nonfinite, check)
    method, on_rank_deficient, on_nonfinite, check = (
        policy.method, policy.on_rank_deficient, policy.on_nonfinite, policy.check)

    t0 = time.perf_counter()
    summary = BalanceSummary()
    nonfinite, deficient_errors = [], []

    candidates, positions = [], []  # positions[k]: index in `pairs` of candidates[k]
    for i, p in enumerate(pairs):
        if p.skip_reason:
            summary.skipped[p.name] = p.skip_reason
        elif p.r > min(p.in_features, p.out_features):
            summary.skipped[p.name] = (
                f"r={p.r} exceeds min(in={p.in_features}, out={p.out_features}): the product cannot have rank r"
            )
        else:
            candidates.append(p)
            positions.append(i)

    outcomes = _gram_outcomes(candidates, method)  # None where the Gram path was not accurate enough
    redo = [k for k, o in enumerate(outcomes) if o is None]
    summary.qr_path = len(redo)
    for idx in batch_groups([candidates[k] for k in redo]):
        ks = [redo[j] for j in idx]
        for k, o in zip(ks, _qr_outcomes([candidates[k] for k in ks], method)):
            outcomes[k] = o

    used = []
    for k, (p, o) in enumerate(zip(candidates, outcomes)):
        if not o.finite:
            nonfinite.append(p.name)
            summary.skipped[p.name] = "non-finite values in A or B"
        elif o.zero:
            summary.skipped[p.name] = "zero product B A (e.g. PEFT's B = 0 init): left as is so training can start"
        elif o.rank < p.r:
            summary.rank_deficient[p.name] = o.rank
            if on_rank_deficient == "raise":
                deficient_errors.append(f"{p.name} (rank {o.rank} < r={p.r})")
            if on_rank_deficient == "balance":
                used.append(k)
            else:
                summary.skipped[p.name] = (
                    f"rank-deficient product (rank {o.rank} < r={p.r}): balancing would leave "
                    f"{p.r - o.rank} dead direction(s) whose gradients are zero forever"
                )
        else:
            used.append(k)

    if nonfinite and on_nonfinite == "raise":
        raise BalanceError(
            f"non-finite values (NaN/Inf) in LoRA factors of {', '.join(nonfinite)}; nothing was balanced. "
            "Fix the training run (lower the learning rate, check the loss) or pass on_nonfinite='skip'."
        )
    if deficient_errors:
        raise BalanceError(
            f"rank-deficient LoRA products: {', '.join(deficient_errors)}; nothing was balanced. "
            "Pass on_rank_deficient='skip' to leave them alone or 'balance' to balance them anyway."
        )
    summary.balanced = len(used)
    if not check:
        # Formed one at a time as the caller iterates: a caller that writes each pair as it
        # comes never holds a second copy of the adapter (and stays in cache doing it).
        out = _Lazy({positions[k]: outcomes[k].new_factors for k in used})
    else:
        out = {positions[k]: outcomes[k].new_factors() for k in used}
        errors, imbalances = [], []
        for k in used:
            A0, B0 = candidates[k].A[None], candidates[k].B[None]
            A1, B1 = (t[None] for t in out[positions[k]])
            errors.append(product_rel_error(A0, B0, A1, B1))
            imbalances.append(rel_imbalance(A1.float(), B1.float()))
        if used:
            summary.max_rel_error = float(torch.cat(errors).max())
            summary.max_rel_imbalance = float(torch.cat(imbalances).max())
    summary.seconds = time.perf_counter() - t0
    return out, summary


class _Lazy(Mapping):
    """{index: (A', B')} whose values are computed on each access."""

    def __init__(self, thunks: dict[int, Callable[[], tuple[torch.Tensor, torch.Tensor]]]):
        self._thunks = thunks

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._thunks[i]()

    def __contains__(self, i: object) -> bool:  # Mapping's default would compute the value
        return i in self._thunks

    def __iter__(self):
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)


@dataclass
class _Outcome:
    """What balancing one pair gave; the new factors are formed only if they will be used."""

    finite: bool
    zero: bool
    rank: int
    new_factors: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (A', B') in the factors' dtypes


def _compute_dtype(p: FactorPair) -> torch.dtype:
    return torch.promote_types(torch.promote_types(p.A.dtype, p.B.dtype), torch.float32)


def _gram_outcomes(pairs: list[FactorPair], method: str) -> list[_Outcome | None]:
    """The Gram path (projection.gram_transforms) for every pair; None where it is not accurate.

    One r x r Gram per factor, the r x r maths batched over all pairs of one rank, then one
    (n, r) @ (r, r) product per factor, formed lazily: no stacking of the tall factors.
    """
    outcomes: list[_Outcome | None] = [None] * len(pairs)
    by_key: dict[tuple, list[int]] = {}
    for k, p in enumerate(pairs):
        by_key.setdefault((p.r, _compute_dtype(p), p.A.device), []).append(k)
    for (_, dtype, _), ks in by_key.items():
        # Upcast once (a no-op for fp32 factors); the apply step below reuses it.
        factors = [(_as(pairs[k].A, dtype), _as(pairs[k].B, dtype)) for k in ks]
        G_A = torch.stack([A @ A.mT for A, _ in factors])  # (G, r, r)
        G_B = torch.stack([B.mT @ B for _, B in factors])  # (G, r, r)
        # Rounding the new factors to bf16/fp16 costs more than the Gram path's error.
        tol = max(GRAM_TOL, 0.1 * max(torch.finfo(pairs[k].A.dtype).eps for k in ks))
        try:
            t = gram_transforms(G_A, G_B, method, matmul_unit_roundoff(dtype), tol)
        except RuntimeError:  # a failed decomposition: the QR path redoes them and names the module
            continue
        accurate = t.accurate.tolist()
        X, Y = t.X.to(dtype), t.Y.to(dtype)
        for g, k in enumerate(ks):
            if accurate[g]:
                (A, B), p = factors[g], pairs[k]
                outcomes[k] = _Outcome(True, False, p.r, _applier(Y[g], A, B, X[g], p.A.dtype, p.B.dtype))
    return outcomes


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to costs microseconds even as a no-op; hundreds of pairs every step add up.
    return t if t.dtype == dtype else t.to(dtype)


def _applier(Y, A, B, X, A_dtype, B_dtype):
    return lambda: (_as(Y @ A, A_dtype), _as(B @ X, B_dtype))  # A' (r, in), B' (out, r)


def _qr_outcomes(group: list[FactorPair], method: str) -> list[_Outcome]:
    """The QR path (projection.balanced_factors) for pairs of one rank, batched and zero-padded."""
    A, B = stack_padded(group)  # (G, r, in_max), (G, out_max, r); zero padding is exact
    proj = _project(group, A, B, method)
    # One host transfer per flag instead of one per pair: per-pair .item() calls were
    # most of the cost of balancing small models every step.
    finite, zero, rank = proj.finite.tolist(), proj.zero.tolist(), proj.rank.tolist()
    A_new, B_new = proj.A.to(A.dtype), proj.B.to(B.dtype)  # back to the factors' own dtype
    return [
        _Outcome(finite[g], zero[g], rank[g], _slicer(A_new[g], B_new[g], p.in_features, p.out_features))
        for g, p in enumerate(group)
    ]


def _slicer(A, B, n_in, n_out):
    return lambda: (A[:, :n_in], B[:n_out, :])


def _project(group: list[FactorPair], A: torch.Tensor, B: torch.Tensor, method: str):
    """Batched projection; if the batched decomposition fails, find and name the module."""
    try:
        return balanced_factors(A, B, method)
    except RuntimeError as batched_error:  # torch.linalg.LinAlgError is a RuntimeError
        for g, p in enumerate(group):
            try:
                balanced_factors(A[g : g + 1], B[g : g + 1], method)
            except RuntimeError as e:
                raise BalanceError(f"{p.name}: the balancing decomposition failed ({e}); nothing was balanced") from e
        raise BalanceError(f"batched balancing failed ({batched_error}); nothing was balanced") from batched_error


def balance_(
    model: nn.Module,
    adapter: str | None = None,
    method: str | BalancePolicy = "nearest",
    *,
    on_rank_deficient: str = "skip",
    on_nonfinite: str = "raise",
    check: bool = True,
) -> BalanceSummary:
    """Balance every LoRA pair of a PEFT model in place; dW (hence the model) is unchanged.

    adapter: one adapter name, or None for all adapters.
    method: "nearest" (the balanced pair closest to the current one; keeps Adam's state
        meaningful) or "svd" (the paper's gauge).
    on_rank_deficient: "skip" (default; leaves the pair alone and reports it), "balance"
        (balance anyway; its dead directions are reported) or "raise".
    on_nonfinite: "raise" (default; nothing is written) or "skip".
    check: also measure the change of dW and the balance reached (costs a few r x r
        products per pair in float64; the training callback turns it off).
    """
    from balora.adapters.live import model_pairs

    policy = as_policy(method, on_rank_deficient, on_nonfinite, check)  # before walking the model
    return balance_and_write(model_pairs(model, adapter), policy)


def balance_and_write(
    pairs: list[FactorPair],
    method: str | BalancePolicy = "nearest",
    on_rank_deficient: str = "skip",
    on_nonfinite: str = "raise",
    check: bool = True,
) -> BalanceSummary:
    """balance_pairs, then each balanced pair written back through `pair.write` as it is formed."""
    t0 = time.perf_counter()
    new, summary = balance_pairs(pairs, method, on_rank_deficient, on_nonfinite, check)
    for i, (A, B) in new.items():  # formed here, one pair at a time, when check=False
        pairs[i].write(A, B)
    summary.seconds = time.perf_counter() - t0  # with the writes, which balance_pairs cannot see
    return summary
