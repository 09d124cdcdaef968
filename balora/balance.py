"""Balance many factor pairs at once, safely: batched by shape, validated before anything is written."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn

from balora.imbalance import rel_imbalance
from balora.linalg import all_finite, compute_dtype, full_fp32_matmuls
from balora.pairs import FactorPair, batch_groups, stack_padded
from balora.policy import BalancePolicy, as_policy
from balora.projection import balanced_factors, pad_to_rank, product_rel_error
from balora.stack_writes import write_all
from balora.stacked import Block, gram_maps, stack_blocks


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
    *,
    stack: bool | None = None,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], BalanceSummary]:
    """Balanced factors for `pairs`, without writing them anywhere.

    method: a gauge name, with the three options after it, or a BalancePolicy (already
    validated where the user gave it; the other arguments are then ignored).
    Returns ({index into pairs: (A', B') in each factor's own dtype}, summary). Pairs that
    are left alone (zero product, rank-deficient under "skip", non-finite under "skip",
    unsupported) are absent from the dict and listed in summary.skipped with the reason.
    Raises BalanceError, naming the modules, before anything is returned when a policy
    says "raise".

    Pairs of one shape are balanced together (balora.stacked): a pass dispatches a number
    of ops that depends on the number of distinct shapes, not of pairs, and reads the device
    once (the Gram path's accuracy flags); pairs the Gram path refuses are redone by the QR
    path, which costs a few more ops and syncs in the passes that need it. Matmuls run at full fp32
    precision whatever training set (linalg.full_fp32_matmuls). stack: None (stacked
    on GPUs and multi-threaded CPUs, pair by pair on a one-thread CPU, where that is faster:
    balora.stacked.use_stacks), True or False to choose.
    """
    # a path or a state dict iterates into strings: "'str' object has no attribute 'skip_reason'" from inside
    if isinstance(pairs, (nn.Module, torch.Tensor, str, bytes, dict)) or not hasattr(pairs, "__iter__"):
        live = " (a model is balanced in place by balora.balance_(model))" if isinstance(pairs, nn.Module) else ""
        raise TypeError(f"balance_pairs: expects a list of FactorPair; got {type(pairs).__name__}{live}")
    with full_fp32_matmuls():
        new, summary, _ = _balance(pairs, as_policy(method, on_rank_deficient, on_nonfinite, check), False, stack)
        return {i: f() if callable(f) else f for i, f in new.items()}, summary


def _balance(pairs: list[FactorPair], policy: BalancePolicy, reuse: bool, stack: bool | None):
    """balance_pairs, with {index: (A', B') or a function forming them}, and the blocks to write
    whole. reuse=True (the caller writes the results at once): new factors from the Gram path are
    views into this thread's workspace, or formed one at a time, in the compute dtype (writing
    casts); parameters are re-homed into stacks (balora.param_stacks), and without `check` a
    block of them all balanced on the Gram path is returned in the list (formed and copied stack
    by stack by write_all), its pairs left out of the dict."""
    t0 = time.perf_counter()
    summary = BalanceSummary()
    candidates, positions = [], []  # positions[k]: index in `pairs` of candidates[k]
    for i, p in enumerate(pairs):
        if p.skip_reason:
            summary.skipped[p.name] = p.skip_reason
        else:
            candidates.append(p)
            positions.append(i)

    blocks = stack_blocks(candidates, stack, rehome_params=reuse)
    gram_maps(blocks, policy.method)
    for b in blocks:  # r > min(in, out): singular Grams by shape; the QR path, padded to r, does these
        if b.shape_A[0] > min(b.shape_A[1], b.shape_B[0]):
            b.accurate = [False] * len(b.members)
    # reuse without check: blocks of re-homed parameters all on the Gram path are formed at write time
    outcomes = _gram_outcomes(candidates, blocks, reuse, lazy=reuse and not policy.check)  # None: not accurate enough
    redo = [k for k, o in enumerate(outcomes) if o is None]
    summary.qr_path = len(redo)
    for idx in batch_groups([candidates[k] for k in redo]):
        ks = [redo[j] for j in idx]
        for k, o in zip(ks, _qr_outcomes([candidates[k] for k in ks], policy.method)):
            outcomes[k] = o

    used = _apply_policy(candidates, outcomes, policy, summary)
    summary.balanced = len(used)
    out = {positions[k]: outcomes[k].formed for k in used}
    if policy.check and used:
        _measure(candidates, outcomes, used, blocks, summary)
    used_set = set(used)
    whole = [b for b in blocks if b.whole and all(k in used_set for k in b.members)]
    for b in whole:
        for k in b.members:
            del out[positions[k]]
    summary.seconds = time.perf_counter() - t0
    return out, summary, whole


@dataclass
class _Outcome:
    """What balancing one pair gave; QR-path factors are sliced out of their padded batch only if used."""

    finite: bool
    zero: bool
    rank: int
    formed: tuple[torch.Tensor, torch.Tensor] | Callable  # (A', B'), or what forms them (QR path: a slice)
    block: int | None = None  # (index of its Block, position in it) when the Gram path did it
    slot: int = 0
    overflow: bool = False  # finite factors whose balanced pair exceeds their dtype (fp16): never written

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.formed() if callable(self.formed) else self.formed


def _gram_outcomes(pairs: list[FactorPair], blocks: list[Block], reuse: bool, lazy: bool) -> list[_Outcome | None]:
    """Outcomes of the Gram path, None for the pairs it refused. New factors are formed for a
    whole block at once (one product per factor), then handed out as views; lazy=True: blocks of
    re-homed parameters that are all on the Gram path are marked `whole` and formed when written."""
    outcomes: list[_Outcome | None] = [None] * len(pairs)
    for b_i, b in enumerate(blocks):
        if not any(b.accurate):
            continue
        if lazy and b.homes is not None and all(b.accurate) and _fp16_limit(b) is None:
            b.whole = True  # every member is used unless a policy raises (then nothing is written)
            for g, k in enumerate(b.members):
                outcomes[k] = _Outcome(True, False, pairs[k].r, partial(b.apply_member, g), b_i, g)
            continue
        if not b.stacked:  # formed one pair at a time when read (measured per pair too: no block)
            for g, k in enumerate(b.members):
                if b.accurate[g]:
                    outcomes[k] = _Outcome(True, False, pairs[k].r, partial(b.apply_one, g, not reuse))
            continue
        A_new, B_new = b.apply(reuse)  # (G, r, in), (G, out, r)
        fits = _fits(b, A_new, B_new)
        if not reuse:  # handed to the caller: in the factors' own dtypes
            A_new, B_new = A_new.to(b.A_dtype), B_new.to(b.B_dtype)
        for g, (k, A, B) in enumerate(zip(b.members, A_new.unbind(0), B_new.unbind(0))):
            if b.accurate[g] and fits[g]:
                outcomes[k] = _Outcome(True, False, pairs[k].r, (A, B), b_i, g)
    return outcomes


def _fits(b: Block, A_new: torch.Tensor, B_new: torch.Tensor) -> list[bool]:
    """Per member: the new factors fit the factors' own dtype. Only fp16 (max 65504) can fail for a
    finite fp32 result; such pairs go to the QR path, which flags them instead of writing inf."""
    limit = _fp16_limit(b)
    if limit is None:  # fp32, bf16, fp64: no op on the per-step path
        return [True] * len(b.members)
    big = torch.maximum(A_new.abs().amax((-2, -1)), B_new.abs().amax((-2, -1)))  # (G,)
    return (big <= limit).tolist()


def _fp16_limit(b: Block) -> float | None:
    """The largest value the factors' dtype holds where a finite fp32 result can exceed it (fp16), else None."""
    limit = min(torch.finfo(b.A_dtype).max, torch.finfo(b.B_dtype).max)
    return None if limit >= torch.finfo(torch.float32).max / 2 else limit


def _apply_policy(candidates: list[FactorPair], outcomes: list[_Outcome], policy: BalancePolicy,
                  summary: BalanceSummary) -> list[int]:
    """Indices of the candidates to write; the others are recorded in summary. Raises BalanceError
    (before anything is written) when a policy says "raise"."""
    used, nonfinite, deficient_errors, overflow = [], [], [], []
    for k, (p, o) in enumerate(zip(candidates, outcomes)):
        if o.overflow:
            overflow.append(p.name)
            summary.skipped[p.name] = "its balanced factors exceed the range of the factors' dtype: left as is"
        elif not o.finite:
            nonfinite.append(p.name)
            summary.skipped[p.name] = "non-finite values in A or B"
        elif o.zero:
            summary.skipped[p.name] = "zero product B A (e.g. PEFT's init: B = 0, or A = 0 for an Embedding): left as is so training can start"
        elif o.rank < p.r:
            summary.rank_deficient[p.name] = o.rank
            if policy.on_rank_deficient == "raise":
                deficient_errors.append(f"{p.name} (rank {o.rank} < r={p.r})")
            if policy.on_rank_deficient == "balance":
                used.append(k)
            else:
                summary.skipped[p.name] = (
                    f"rank-deficient product (rank {o.rank} < r={p.r}): balancing would leave "
                    f"{p.r - o.rank} dead direction(s) whose gradients are zero forever"
                )
        else:
            used.append(k)
    if nonfinite and policy.on_nonfinite == "raise":
        raise BalanceError(
            f"non-finite values (NaN/Inf) in LoRA factors of {', '.join(nonfinite)}; nothing was balanced. "
            "Fix the training run (lower the learning rate, check the loss) or pass on_nonfinite='skip'."
        )
    if overflow and policy.on_nonfinite == "raise":
        raise BalanceError(
            f"the balanced factors of {', '.join(overflow)} would exceed the range of their dtype (|dW| too "
            "large for a balanced pair in fp16); nothing was balanced. Keep these factors in fp32 or pass "
            "on_nonfinite='skip'."
        )
    if deficient_errors:
        raise BalanceError(
            f"rank-deficient LoRA products: {', '.join(deficient_errors)}; nothing was balanced. "
            "Pass on_rank_deficient='skip' to leave them alone or 'balance' to balance them anyway."
        )
    return used


def _measure(candidates: list[FactorPair], outcomes: list[_Outcome], used: list[int], blocks: list[Block],
             summary: BalanceSummary) -> None:
    """summary.max_rel_error and max_rel_imbalance of the new factors as they will be written:
    batched per block for the Gram path, per pair for the (rare) QR path."""
    errors, imbalances = [], []
    in_block: dict[int, list[int]] = {}
    for k in used:
        o = outcomes[k]
        if o.block is None:
            A0, B0 = candidates[k].A[None], candidates[k].B[None]
            # Pair by pair (a one-thread CPU) the factors come in the compute dtype: measure them as written.
            A1, B1 = (t[None].to(t0.dtype) for t, t0 in zip(o.factors, (A0, B0)))
            errors.append(product_rel_error(A0, B0, A1, B1))
            imbalances.append(_rel_imbalance(A1, B1))
        else:
            in_block.setdefault(o.block, []).append(o.slot)
    for b_i, slots in in_block.items():
        b = blocks[b_i]
        sel = torch.tensor(slots, device=b.A.device)
        A1 = torch.stack([outcomes[b.members[g]].factors[0] for g in slots]).to(b.A_dtype)  # (n, r, in), as written
        B1 = torch.stack([outcomes[b.members[g]].factors[1] for g in slots]).to(b.B_dtype)  # (n, out, r)
        errors.append(product_rel_error(b.A[sel], b.B[sel], A1, B1))
        imbalances.append(_rel_imbalance(A1, B1))
    summary.max_rel_error = float(torch.cat([e.cpu() for e in errors]).max())
    summary.max_rel_imbalance = float(torch.cat([e.cpu() for e in imbalances]).max())


def _rel_imbalance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """rel_imbalance of factors as written, measured in their compute dtype (float64 stays float64)."""
    ct = compute_dtype(A.dtype, B.dtype)
    return rel_imbalance(A.to(ct), B.to(ct))


# Factors whose largest entry lies outside [1 / this, this] are balanced in float64 after dividing
# by it (fp32 Grams and the Procrustes target of entries ~1e15 reach ~1e30, fp32's max is 3e38).
_SAFE_SCALE = 1e15


def _qr_outcomes(group: list[FactorPair], method: str) -> list[_Outcome]:
    """The QR path (projection.balanced_factors) for pairs of one rank, batched and zero-padded."""
    A, B = stack_padded(group)  # (G, r, in_max), (G, out_max, r); zero padding is exact
    A, B = pad_to_rank(A, B)  # r > min(in, out): padded up to r too; _unpad drops the padding again
    # Entries far from 1 (a diverging run, an adapter stored at 1e20): the projection's Grams and the
    # nearest gauge's Procrustes target would leave fp32's range. Balance (A/c, B/c) in float64, c the
    # pair's largest entry: its balanced pair is the one of (A, B) divided by c, in the same gauge.
    c = torch.maximum(A.abs().amax((-2, -1)), B.abs().amax((-2, -1))).double()  # (G,)
    if bool(((c > _SAFE_SCALE) | ((c > 0) & (c < 1 / _SAFE_SCALE))).any()):
        c = torch.where(c > 0, c, torch.ones_like(c))[:, None, None]
        proj = _project(group, A.double() / c, B.double() / c, method)
        proj.A, proj.B = proj.A * c, proj.B * c
    else:
        proj = _project(group, A, B, method)
    A_new, B_new = proj.A.to(A.dtype), proj.B.to(B.dtype)  # back to the factors' own dtype
    # A balanced pair beyond the factors' dtype (inf after the cast) is never written.
    overflow = proj.finite & ~(all_finite(A_new) & all_finite(B_new))
    # One host transfer for all flags of the batch, not one per pair and flag.
    flags = torch.stack([proj.finite.long(), proj.zero.long(), proj.rank.long(), overflow.long()]).tolist()
    return [
        _Outcome(bool(flags[0][g]), bool(flags[1][g]), flags[2][g], partial(_unpad, A_new, B_new, g, p),
                 overflow=bool(flags[3][g]))
        for g, p in enumerate(group)
    ]


def _unpad(A_new: torch.Tensor, B_new: torch.Tensor, g: int, p: FactorPair) -> tuple[torch.Tensor, torch.Tensor]:
    return A_new[g, :, : p.in_features], B_new[g, : p.out_features, :]


def _project(group: list[FactorPair], A: torch.Tensor, B: torch.Tensor, method: str):
    """Batched projection; if the batched decomposition fails, find and name the module."""
    try:
        return balanced_factors(A, B, method)
    except torch.linalg.LinAlgError as batched_error:  # anything else (out of memory, a bug) propagates
        for g, p in enumerate(group):
            try:
                balanced_factors(A[g : g + 1], B[g : g + 1], method)
            except torch.linalg.LinAlgError as e:
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

    The model's pairs are found once and kept while the model lives (balora.adapters.pair_cache,
    which re-walks after any change it can see: new adapters, replaced modules or parameters,
    `model.to(...)`); after adding LoRA layers by hand under an existing adapter name, call
    `balora.adapters.pair_cache.forget(model)`.
    Under FSDP2 call it on every rank (it runs collectives): unchecked, it balances the shards in
    place from r x r Grams (balora.sharded_step); checked, it gathers every factor whole.
    """
    from balora.adapters.live import require_model
    from balora.adapters.pair_cache import cached_model_pairs
    from balora.distributed import reshard_fsdp2
    from balora.sharded_step import balance_step

    require_model("balance_", model)
    policy = as_policy(method, on_rank_deficient, on_nonfinite, check)  # before walking the model
    reshard_fsdp2(model)  # FSDP2 after an eval forward: balance the shards the optimizer steps, not temporary copies
    # FSDP2: balance_step gathers what it needs (everything when checking); else balance_and_write
    pairs = cached_model_pairs(model, adapter, gather=False)
    if _inference_params(pairs):  # (inference_mode(False) is not a no-op: it turns grad mode on)
        with torch.inference_mode():
            return balance_step(pairs, policy)
    return balance_step(pairs, policy)


def _inference_params(pairs: list[FactorPair]) -> bool:
    """Whether the pass must run under torch.inference_mode(): already in it, or some factor is an
    inference tensor (a model built or loaded inside that mode). Outside the mode torch writes such a
    tensor in place and only then raises, at the version bump: the first pair's A was rewritten and
    its B not. Such a model cannot train; inside the mode its writes are allowed (and nothing is
    re-homed, balora.param_stacks)."""
    return torch.is_inference_mode_enabled() or any(
        t.is_inference() for p in pairs for t in p.extra.get("params", ()))


def balance_and_write(
    pairs: list[FactorPair],
    method: str | BalancePolicy = "nearest",
    on_rank_deficient: str = "skip",
    on_nonfinite: str = "raise",
    check: bool = True,
    *,
    stack: bool | None = None,
) -> BalanceSummary:
    """balance_pairs, then the balanced pairs written back: into the parameters' own stacks, or
    with one foreach copy into the parameters, for live pairs (ParamWriter) when stacked;
    `pair.write` for the others."""
    t0 = time.perf_counter()
    with full_fp32_matmuls():
        new, summary, whole = _balance(pairs, as_policy(method, on_rank_deficient, on_nonfinite, check), True, stack)
        write_all(pairs, new, whole)
    summary.seconds = time.perf_counter() - t0  # with the writes, which balance_pairs cannot see
    return summary
