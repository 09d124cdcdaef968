"""The per-step balancing pass on FSDP2-sharded pairs, communicating only r x r Grams where it can.

With B (out, r) sharded by rows (FSDP2's default, Shard(0)) and A (r, in) sharded by columns
(Shard(1): `fully_shard(..., shard_placement_fn=lora_shard_placement(model))`), both Grams are
sums of the ranks' local Grams, G_A = sum_k A_k A_k^T and G_B = sum_k B_k^T B_k, and the
balanced factors are local products, A'_k = Y A_k and B'_k = B_k X (projection.gram_transforms).
A pass then all-reduces two r x r matrices per pair, in one collective for all of them, and each
rank does the tall products on its own shard only. Every other pair (A sharded by rows, conv
factors, pairs the Gram path cannot do accurately, zero or rank-deficient products, non-finite
factors) is gathered whole and balanced as in one process (balora.distributed.gather_pairs),
with the same policies. Every decision is made from all-reduced values, so all ranks take the
same path for every pair.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from balora.distributed import CommStats, gather_pairs, is_dtensor, last_comm, local_storage, record_comm
from balora.linalg import compute_dtype, full_fp32_matmuls
from balora.pairs import FactorPair
from balora.projection import gram_transforms
from balora.stacked import gram_limits, to_device_at_once


def lora_shard_placement(model: nn.Module) -> Callable[[nn.Parameter], object]:
    """A `shard_placement_fn` for fully_shard: LoRA A factors (r, in) by columns, the rest as FSDP2 does.

        fully_shard(block, mesh=mesh, shard_placement_fn=balora.lora_shard_placement(model))

    Call it on the model before sharding it (it finds the factors by walking the PEFT layers).
    Balancing then communicates r x r Grams instead of whole factors (see this module).
    """
    from torch.distributed.tensor import Shard

    from balora.adapters.live import iter_lora_pairs

    by_columns = {id(p.extra["params"][0]) for p in iter_lora_pairs(model)
                  if "params" in p.extra and p.extra["params"][0].ndim == 2}
    return lambda param: Shard(1) if id(param) in by_columns else None


def balance_step(pairs: list[FactorPair], policy):
    """balance_and_write for pairs that may hold FSDP2 shards (call on every rank, same pairs).

    Pairs with no sharded factor go straight to balance_and_write. Nothing is written before
    the policies have been checked on every pair (a BalanceError leaves every factor as it was).
    Matmuls run at full fp32 precision throughout (linalg.full_fp32_matmuls).
    """
    with full_fp32_matmuls():
        return _balance_step(pairs, policy)


def _balance_step(pairs: list[FactorPair], policy):
    from balora.balance import balance_and_write

    if not any(is_dtensor(t) for p in pairs for t in p.extra.get("params", ())):
        return balance_and_write(pairs, policy)
    local = [i for i, p in enumerate(pairs) if _gram_local(p)]
    if policy.check or not local:  # the check measures whole products: gather everything
        return balance_and_write(gather_pairs(pairs), policy)
    t0 = time.perf_counter()
    maps = _gram_maps([pairs[i] for i in local], policy.method)
    reduced = last_comm()
    done = {i for i, m in zip(local, maps) if m is not None}
    rest = gather_pairs([p for i, p in enumerate(pairs) if i not in done])
    record_comm(reduced + last_comm())  # the pass's all_reduce and gather together
    # Raises per the policies before anything is written; the Gram-path pairs are written after it.
    summary = balance_and_write(rest, policy)
    for i, m in zip(local, maps):
        if m is not None:
            _write_local(pairs[i], *m)
    summary.balanced += len(done)
    summary.seconds = time.perf_counter() - t0
    return summary


def _gram_local(p: FactorPair) -> bool:
    """A by columns and B by rows on one 1-D mesh: both Grams are sums of local Grams."""
    from torch.distributed.tensor import Shard

    params = p.extra.get("params", ())
    if p.skip_reason or len(params) != 2 or not all(is_dtensor(t) and t.ndim == 2 for t in params):
        return False
    A_p, B_p = params
    return (A_p.device_mesh == B_p.device_mesh and A_p.device_mesh.ndim == 1
            and tuple(A_p.placements) == (Shard(1),) and tuple(B_p.placements) == (Shard(0),)
            and A_p.shape[0] <= min(A_p.shape[1], B_p.shape[0]))


def _compute_dtype(p: FactorPair) -> torch.dtype:
    A_p, B_p = p.extra["params"]
    return compute_dtype(A_p.dtype, B_p.dtype)


def _gram_maps(pairs: list[FactorPair], method: str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """(X, Y) per pair, or None where the Gram path is not accurate; one all_reduce for all Grams."""
    mesh = pairs[0].extra["params"][0].device_mesh
    if any(p.extra["params"][0].device_mesh != mesh for p in pairs):  # one all_reduce needs one mesh
        record_comm(CommStats())
        return [None] * len(pairs)
    grams = []
    for p in pairs:
        A_p, B_p = p.extra["params"]
        dtype = _compute_dtype(p)
        A, B = local_storage(A_p).to(dtype), local_storage(B_p).to(dtype)  # (r, in_k), (out_k, r)
        grams.append(torch.stack([A @ A.mT, B.mT @ B]).reshape(-1))  # this rank's part of G_A, G_B
    sizes = [g.numel() for g in grams]
    buf = torch.cat([g.to(torch.float64) for g in grams])  # the sum in float64 adds no rounding of note
    dist.all_reduce(buf, group=mesh.get_group())
    record_comm(CommStats(collectives=1, bytes_reduced=buf.numel() * buf.element_size()))
    device = buf.device
    buf = buf.cpu()  # the r x r maths on the host, as in one process: one read of the device per pass
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
    by_rank: dict[int, list[int]] = {}
    for k, p in enumerate(pairs):
        by_rank.setdefault(p.r, []).append(k)
    parts = buf.split(sizes)
    for r, ks in by_rank.items():
        G = torch.stack([parts[k].reshape(2, r, r) for k in ks])  # (n, 2, r, r)
        dtypes = [_compute_dtype(pairs[k]) for k in ks]
        limits = [gram_limits(*(t.dtype for t in pairs[k].extra["params"]), device) for k in ks]
        u, tol, floor = torch.tensor(limits, dtype=torch.float64).unbind(-1)
        try:
            t = gram_transforms(G[:, 0], G[:, 1], method, u, tol, floor)
        except torch.linalg.LinAlgError:  # the gathered path redoes these and names the module
            continue
        for g, (k, ct, ok) in enumerate(zip(ks, dtypes, t.accurate.tolist())):
            if ok:  # in the compute dtype already on the host (MPS has no float64)
                out[k] = (t.X[g].to(ct), t.Y[g].to(ct))
    return _to_device(out, device)


def _to_device(maps: list[tuple[torch.Tensor, torch.Tensor] | None], device: torch.device):
    """The host's X, Y on the shards' device, all in one copy (stacked.to_device_at_once)."""
    found = [t for m in maps if m is not None for t in m]
    if device.type == "cpu" or not found:
        return maps
    sent = iter(to_device_at_once(found, device))
    return [None if m is None else (next(sent), next(sent)) for m in maps]


def _write_local(p: FactorPair, X: torch.Tensor, Y: torch.Tensor) -> None:
    """A'_k = Y A_k, B'_k = B_k X on this rank's shards, written in the factors' own dtype."""
    A_p, B_p = p.extra["params"]
    dtype = _compute_dtype(p)
    with torch.no_grad():
        A, B = local_storage(A_p), local_storage(B_p)
        A.copy_(Y.to(dtype) @ A.to(dtype))
        B.copy_(B.to(dtype) @ X.to(dtype))
