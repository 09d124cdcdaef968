"""The per-step balancing pass on FSDP2-sharded pairs: r x r Grams and A factors communicated, never B.

With B (out, r) sharded by rows (FSDP2's Shard(0)), G_B = B^T B is the sum of the ranks' local
Grams B_k^T B_k and the new B is local, B'_k = B_k X (projection.gram_transforms). A (r, in) takes
one of FSDP2's two layouts:

  by columns (Shard(1), `fully_shard(..., shard_placement_fn=lora_shard_placement(model, mesh))`)
      G_A = sum_k A_k A_k^T too, and A'_k = Y A_k: a pass all-reduces two r x r Grams per pair
      and nothing else;
  by rows (Shard(0), FSDP2's default: the r rows of A split over the ranks)
      every rank gathers the whole A (r x in, the smaller half of most adapters), computes G_A
      itself, and forms its own rows of A' = Y A, A'_k = Y[rows_k] A.

Pairs of one shape, dtype and layout are stacked as in one process (balora.stacked), so a pass
dispatches a number of ops that depends on the number of shapes, not of pairs: one all_gather for
the A factors by rows, one all_reduce for the partial Grams, the r x r maths (on a CUDA device where
stacked.maths_on_device says so, else on the host after one device-to-host copy), one batched product per factor and block, and one foreach copy into the shards. Every other
pair (other meshes or placements, conv factors, fp16 factors, pairs the Gram path cannot do
accurately, zero or rank-deficient products, non-finite factors) is gathered whole and balanced as
in one process (balora.distributed.gather_pairs), with the same policies. Every decision is made
from values that are identical on all ranks (all-reduced or gathered), so all ranks take the same
path for every pair.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from balora.distributed import (CommStats, all_gather_flat, all_reduce_flat, chunk_rows, fsdp_placement, gather_pairs,
                                is_dtensor, last_comm, local_storage, record_comm)
from balora.linalg import compute_dtype, full_fp32_matmuls
from balora.pairs import FactorPair
from balora.stacked import Block, as_dtype, gram_maps, stack_into, use_stacks
from balora.workspace import buffer as _buffer


def lora_shard_placement(model: nn.Module, mesh=None) -> Callable[[nn.Parameter], object]:
    """A `shard_placement_fn` for fully_shard: LoRA A factors (r, in) by columns, the rest as FSDP2 does.

        fully_shard(block, mesh=mesh, shard_placement_fn=balora.lora_shard_placement(model, mesh))

    Call it on the model before sharding it (it finds the factors by walking the PEFT layers).
    Balancing then communicates only r x r Grams, where FSDP2's default layout also gathers the
    A factors whole (see this module). FSDP2 splits dims other than 0 only evenly, so an A whose
    `in` does not divide by the number of shards keeps FSDP2's rows. mesh: the one given to
    fully_shard (its last dim shards, as in HSDP); default: every rank of the default process group.
    """
    from torch.distributed.tensor import Shard

    from balora.adapters.live import _walk_pairs

    if mesh is not None:
        shards = mesh.size(mesh.ndim - 1)
    else:
        shards = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # The walk without gathering: called once per block, a gathering walk fetched every factor already sharded
    # (setup traffic quadratic in the blocks); a DTensor's shape is the global one.
    by_columns = {id(p.extra["params"][0]) for p in _walk_pairs(model, None)
                  if "params" in p.extra and p.extra["params"][0].ndim == 2 and p.extra["params"][0].shape[1] % shards == 0}
    return lambda param: Shard(1) if id(param) in by_columns else None


def balance_step(pairs: list[FactorPair], policy):
    """balance_and_write for pairs that may hold FSDP2 shards (call on every rank, same pairs).

    Pairs with no sharded factor go straight to balance_and_write. Nothing is written before
    the policies have been checked on every pair (a BalanceError leaves every factor as it was).
    Matmuls run at full fp32 precision throughout (linalg.full_fp32_matmuls), outside autograd.
    """
    with full_fp32_matmuls(), torch.no_grad():
        return _balance_step(pairs, policy)


def _balance_step(pairs: list[FactorPair], policy):
    from balora.balance import balance_and_write

    if not any(is_dtensor(t) for p in pairs for t in p.extra.get("params", ())):
        return balance_and_write(pairs, policy)
    layouts = {i: layout for i, p in enumerate(pairs) if (layout := _layout(p)) is not None}
    local = list(layouts)
    # By equality, not identity: fully_shard without mesh= makes a new, equal DeviceMesh for every call.
    meshes = {pairs[i].extra["params"][0].device_mesh for i in local}
    if policy.check or not local or len(meshes) > 1:  # the check measures whole products; one mesh, one collective
        return balance_and_write(_gather_unskipped(pairs), policy)
    t0 = time.perf_counter()
    blocks = _shard_blocks([pairs[i] for i in local], [layouts[i] for i in local])
    stats = CommStats()
    _gather_A_by_rows(blocks, stats)
    first = pairs[local[0]].extra["params"][0]
    mesh, mesh_dim = first.device_mesh, fsdp_placement(first)[0]  # the dim whose ranks hold one factor's pieces
    gram_maps(blocks, policy.method, reduce=lambda grams: _sum_over_ranks(grams, blocks, mesh, mesh_dim, stats))
    done = {local[b.members[g]] for b in blocks for g, ok in enumerate(b.accurate) if ok}
    rest = _gather_unskipped([p for i, p in enumerate(pairs) if i not in done])
    record_comm(stats + last_comm())  # the pass's collectives together
    # Raises per the policies before anything is written; the Gram-path pairs are written after it.
    summary = balance_and_write(rest, policy)
    _write_shards(blocks)
    summary.balanced += len(done)
    summary.seconds = time.perf_counter() - t0
    return summary


def _gather_unskipped(pairs: list[FactorPair]) -> list[FactorPair]:
    """gather_pairs for the pairs to balance; skipped ones (unsupported, or frozen under a training
    hook) are only listed in the summary, so their factors are not gathered on every pass."""
    todo = [i for i, p in enumerate(pairs) if not p.skip_reason]
    out = list(pairs)
    for i, p in zip(todo, gather_pairs([pairs[i] for i in todo])):
        out[i] = p
    return out


def _layout(p: FactorPair) -> str | None:
    """"columns" or "rows" (how A is sharded) for a pair the Gram path can do on its shards: 2-D
    factors on one mesh, FSDP (1-D) or HSDP (2-D, replicated over dim 0: every replica group does
    the same), B by rows, r <= min(in, out); else None (gathered whole). fp16 factors are gathered
    too: whether their balanced pair fits fp16 would need every rank's new shard."""
    params = p.extra.get("params", ())
    if p.skip_reason or len(params) != 2 or not all(is_dtensor(t) and t.ndim == 2 for t in params):
        return None
    A_p, B_p = params
    how_A, how_B = fsdp_placement(A_p), fsdp_placement(B_p)
    if (torch.float16 in (A_p.dtype, B_p.dtype) or A_p.device_mesh != B_p.device_mesh or how_A is None
            or how_B is None or how_B[1].dim != 0 or A_p.shape[0] > min(A_p.shape[1], B_p.shape[0])):
        return None
    return {1: "columns", 0: "rows"}.get(how_A[1].dim)


class ShardBlock(Block):
    """Pairs of one global shape, dtype and layout on this rank: A (r, in_k) local columns, or
    (r, in) whole once gathered (layout "rows"); B (out_k, r) local rows. Stacked, (G, r, in_k) and
    (G, out_k, r), where balora.stacked.use_stacks says so (GPUs, multi-threaded CPUs), else kept
    pair by pair. Blocks are keyed by global shapes, so every rank makes the same blocks in the same
    order (uneven shards differ in their local shapes, never in which pairs go together)."""

    def __init__(self, members: list[int], pairs: list[FactorPair], layout: str):
        A_ps = [pairs[k].extra["params"][0] for k in members]
        B_ps = [pairs[k].extra["params"][1] for k in members]
        A_dtype, B_dtype = A_ps[0].dtype, B_ps[0].dtype
        dtype = compute_dtype(A_dtype, B_dtype)
        device = local_storage(A_ps[0]).device
        self.layout = layout
        self.A_params, self.B_params = A_ps, B_ps
        self.role = ("fsdp2", len(members), tuple(A_ps[0].shape), tuple(B_ps[0].shape), A_dtype, B_dtype, layout)
        A_locals = None if layout == "rows" else [local_storage(t) for t in A_ps]  # rows: set when gathered
        B_locals = [local_storage(t) for t in B_ps]
        self.pair_by_pair = not use_stacks(device, A_dtype, B_dtype, None)
        if not self.pair_by_pair:
            A = None if A_locals is None else stack_into(("A",) + self.role, A_locals, dtype)
            super().__init__(members, A, stack_into(("B",) + self.role, B_locals, dtype), A_dtype, B_dtype)
        else:  # a one-thread CPU: pair by pair, as balora.stacked does there (no stacking copies)
            A_each = [None] * len(members) if A_locals is None else [as_dtype(t, dtype) for t in A_locals]
            super().__init__(members, None, None, A_dtype, B_dtype,
                             factors=[(a, as_dtype(b, dtype)) for a, b in zip(A_each, B_locals)])

    def set_whole_A(self, A: torch.Tensor) -> None:
        """The gathered A factors (G, r, in), in the compute dtype (layout "rows")."""
        if self.pair_by_pair:
            self.factors = [(a, b) for a, (_, b) in zip(A.unbind(0), self.factors)]
        else:
            self.A = A

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, first row) of A this rank holds (layout "rows")."""
        return chunk_rows(self.A_params[0])


def _shard_blocks(pairs: list[FactorPair], layouts: list[str]) -> list[ShardBlock]:
    groups: dict[tuple, list[int]] = {}
    for k, (p, layout) in enumerate(zip(pairs, layouts)):
        A_p, B_p = p.extra["params"]
        key = (tuple(A_p.shape), tuple(B_p.shape), A_p.dtype, B_p.dtype, A_p.device, layout)
        groups.setdefault(key, []).append(k)
    return [ShardBlock(members, pairs, key[-1]) for key, members in groups.items()]


def _gather_A_by_rows(blocks: list[ShardBlock], stats: CommStats) -> None:
    """Set b.A (G, r, in), the whole A factors, for blocks of layout "rows": one all_gather per
    dtype, of each block's rows stacked and padded to torch.chunk's ceil(r / ranks)."""
    by_dtype: dict[torch.dtype, list[ShardBlock]] = {}
    for b in blocks:
        if b.layout == "rows":
            by_dtype.setdefault(b.A_dtype, []).append(b)
    for bs in by_dtype.values():
        mesh, dim = bs[0].A_params[0].device_mesh, fsdp_placement(bs[0].A_params[0])[0]
        world = mesh.size(dim)
        shapes = [(len(b.members), math.ceil(b.A_params[0].shape[0] / world), b.A_params[0].shape[1]) for b in bs]
        sizes = [math.prod(s) for s in shapes]
        send = local_storage(bs[0].A_params[0]).new_zeros(sum(sizes))  # padding rows stay zero
        offsets = [0]
        for b, shape, size in zip(bs, shapes, sizes):
            rows = b.rows[0]
            if any(local_storage(t).shape[0] != rows for t in b.A_params):  # Shard(0) is torch.chunk's split
                raise RuntimeError(f"a Shard(0) LoRA A of shape {tuple(b.A_params[0].shape)} does not hold torch.chunk's "
                                   f"{rows} rows on this rank: cannot gather it")
            piece = send[offsets[-1] : offsets[-1] + size].view(shape)[:, :rows]  # (G, rows, in)
            torch._foreach_copy_(list(piece.unbind(0)), [local_storage(t) for t in b.A_params])
            offsets.append(offsets[-1] + size)
        recv = all_gather_flat(send, mesh, stats, dim)  # (world, L)
        for b, (G, chunk, n_in), start, size in zip(bs, shapes, offsets, sizes):
            r = b.A_params[0].shape[0]
            # Rank j's rows of every member sit in recv[j, start:start + size] as (G, chunk, in).
            whole = recv[:, start : start + size].view(world, G, chunk, n_in).transpose(0, 1)  # (G, world, chunk, in)
            out = _buffer(("A",) + b.role, (G, r, n_in), b.compute_dtype, send.device, True)
            b.set_whole_A(out.copy_(whole.reshape(G, world * chunk, n_in)[:, :r]))  # upcasts bf16 on the way


def _sum_over_ranks(grams: list[torch.Tensor], blocks: list[ShardBlock], mesh, mesh_dim: int,
                    stats: CommStats) -> list[torch.Tensor]:
    """The Grams with every partial one (G_B always, G_A of layout "columns") summed over the ranks
    in float64, by one all_reduce; G_A of gathered A factors is whole already."""
    partial = [j for i, b in enumerate(blocks) for j in ((2 * i, 2 * i + 1) if b.layout == "columns" else (2 * i + 1,))]
    flat = torch.cat([grams[i].reshape(-1) for i in partial]).to(torch.float64)  # float64: the sum adds no rounding of note
    flat = all_reduce_flat(flat, mesh, stats, mesh_dim)
    out = list(grams)
    for i, part in zip(partial, flat.split([grams[i].numel() for i in partial])):
        out[i] = part.view(grams[i].shape)
    return out


def _write_shards(blocks: list[ShardBlock]) -> None:
    """A'_k = Y A_k (columns) or Y[rows_k] A (rows), and B'_k = B_k X, of every accurate pair into
    this rank's shards, cast to their dtype: stacked blocks with one product per factor and block
    and one foreach copy for all; pair-by-pair blocks one pair at a time, each written while in cache."""
    dst, src = [], []
    with torch.no_grad():
        for b in blocks:
            if not any(b.accurate):
                continue
            Y = b.Y
            if b.layout == "rows":
                rows, first = b.rows
                Y = Y[:, first : first + rows]  # (G, rows, r)
            if b.pair_by_pair:
                for g, (A, B) in enumerate(b.factors):
                    if b.accurate[g]:
                        local_storage(b.A_params[g]).copy_(Y[g] @ A)
                        local_storage(b.B_params[g]).copy_(B @ b.X[g])
                continue
            A_new = torch.bmm(Y, b.A)  # (G, r or rows, in_k or in)
            B_new = torch.bmm(b.B, b.X)  # (G, out_k, r)
            for g, (A_g, B_g) in enumerate(zip(A_new.unbind(0), B_new.unbind(0))):
                if b.accurate[g]:
                    dst += [local_storage(b.A_params[g]), local_storage(b.B_params[g])]
                    src += [A_g, B_g]
        if dst:
            torch._foreach_copy_(dst, src)
