"""Balance many factor pairs at once, safely: batched by shape, validated before anything is written."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from balora.imbalance import rel_imbalance
from balora.pairs import FactorPair, batch_groups, stack_padded
from balora.projection import METHODS, balanced_factors, product_rel_error

RANK_DEFICIENT_POLICIES = ("skip", "balance", "raise")
NONFINITE_POLICIES = ("raise", "skip")


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
    method: str = "nearest",
    on_rank_deficient: str = "skip",
    on_nonfinite: str = "raise",
    check: bool = True,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], BalanceSummary]:
    """Balanced factors for `pairs`, without writing them anywhere.

    Returns ({index into pairs: (A', B') in each factor's own dtype}, summary). Pairs that
    are left alone (zero product, rank-deficient under "skip", non-finite under "skip",
    unsupported) are absent from the dict and listed in summary.skipped with the reason.
    Raises BalanceError, naming the modules, before anything is returned when a policy
    says "raise".
    """
    if method not in METHODS:
        raise ValueError(f"unknown balancing method {method!r}; use one of {', '.join(METHODS)}")
    if on_rank_deficient not in RANK_DEFICIENT_POLICIES:
        raise ValueError(f"on_rank_deficient must be one of {RANK_DEFICIENT_POLICIES}, got {on_rank_deficient!r}")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")

    t0 = time.perf_counter()
    summary = BalanceSummary()
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    errors, imbalances, nonfinite, deficient_errors = [], [], [], []

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

    for idx in batch_groups(candidates):
        group = [candidates[j] for j in idx]
        A, B = stack_padded(group)  # (G, r, in_max), (G, out_max, r); zero padding is exact
        proj = _project(group, A, B, method)
        # One host transfer per flag instead of one per pair: per-pair .item() calls were
        # most of the cost of balancing small models every step.
        finite, zero, rank = proj.finite.tolist(), proj.zero.tolist(), proj.rank.tolist()
        use = []
        for g, p in enumerate(group):
            if not finite[g]:
                nonfinite.append(p.name)
                summary.skipped[p.name] = "non-finite values in A or B"
            elif zero[g]:
                summary.skipped[p.name] = "zero product B A (e.g. PEFT's B = 0 init): left as is so training can start"
            elif rank[g] < p.r:
                summary.rank_deficient[p.name] = rank[g]
                if on_rank_deficient == "raise":
                    deficient_errors.append(f"{p.name} (rank {rank[g]} < r={p.r})")
                if on_rank_deficient == "balance":
                    use.append(g)
                else:
                    summary.skipped[p.name] = (
                        f"rank-deficient product (rank {rank[g]} < r={p.r}): balancing would leave "
                        f"{p.r - rank[g]} dead direction(s) whose gradients are zero forever"
                    )
            else:
                use.append(g)
        if not use:
            continue
        A_new = proj.A.to(A.dtype)  # back to the factors' own dtype
        B_new = proj.B.to(B.dtype)
        if check:
            sel = torch.tensor(use, device=A.device)
            errors.append(product_rel_error(A[sel], B[sel], A_new[sel], B_new[sel]))
            imbalances.append(rel_imbalance(A_new[sel].float(), B_new[sel].float()))
        for g in use:
            p = group[g]
            out[positions[idx[g]]] = (A_new[g, :, : p.in_features], B_new[g, : p.out_features, :])

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
    summary.balanced = len(out)
    if check and errors:
        summary.max_rel_error = float(torch.cat(errors).max())
        summary.max_rel_imbalance = float(torch.cat(imbalances).max())
    summary.seconds = time.perf_counter() - t0
    return out, summary


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
    method: str = "nearest",
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
    from balora.adapters.live import iter_lora_pairs

    pairs = iter_lora_pairs(model, adapter)
    if adapter is not None and not pairs:
        raise ValueError(f"no LoRA layers with adapter {adapter!r} in {type(model).__name__}")
    new, summary = balance_pairs(pairs, method, on_rank_deficient, on_nonfinite, check)
    for i, (A, B) in new.items():
        pairs[i].write(A, B)
    return summary
