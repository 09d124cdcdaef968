"""The per-step pass in a constant number of ops: pairs of one shape stacked, one r x r solve per rank, one write.

On a GPU every dispatched op is a kernel launch (microseconds of host time, whatever its size)
and every device-to-host read stalls the pipeline, so a pass that costs a few ops per LoRA
module grows with the model even when its arithmetic is negligible. Here the ops per pass
depend on the number of distinct factor shapes (a handful in a transformer), not on the
number of modules:

  stack_blocks   pairs of one shape, dtype and device -> one (G, r, in) and one (G, out, r)
                 stack each, in the compute dtype: the parameters' own storage when the pass
                 writes them (balora.param_stacks re-homes them there once; bf16 is upcast with
                 one copy), else a copy (one foreach copy, which also upcasts bf16)
  gram_maps      one batched Gram per factor and block; the r x r maths (projection's
                 Gram path) for all blocks of one rank and device in one call, in float64:
                 on a CUDA device where the Grams are, when the rank and the number of pairs
                 say it pays (maths_on_device), else on the CPU, where small batched eigh/SVD never
                 synchronise; host-bound Grams travel in one device-to-host copy per device,
                 and the accuracy flags are read once per group, so choosing the QR fallback
                 costs no further sync
  Block.apply    one batched (r, r) product per factor and block
  write_all      (balora.stack_writes) one product and one copy per re-homed stack whose pairs
                 were all balanced (on the CPU, one of each per piece), and one
                 torch._foreach_copy_ into the parameters of the other ParamWriter pairs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from balora.linalg import compute_dtype, matmul_unit_roundoff
from balora.pairs import FactorPair, group_by_shape
from balora.param_stacks import can_rehome, rehome, stack_of
from balora.projection import GRAM_TOL, gram_transforms, subnormal_floor
from balora.stack_writes import ParamWriter
from balora.workspace import HOST, buffer as _buffer


@dataclass
class Block:
    """Pairs of one exact shape, dtype and device: stacked (a copy, in the compute dtype), or, on
    the CPU by default, kept as the pairs' own factors (see use_stacks)."""

    members: list[int]  # indices into the list given to stack_blocks
    A: torch.Tensor | None  # (G, r, in) when stacked
    B: torch.Tensor | None  # (G, out, r)
    A_dtype: torch.dtype  # the factors' own dtypes, to give the new factors back in
    B_dtype: torch.dtype
    X: torch.Tensor | None = None  # (G, r, r) on the factors' device: B' = B X
    Y: torch.Tensor | None = None  # (G, r, r): A' = Y A
    accurate: list[bool] = field(default_factory=list)  # per member: the Gram path's X, Y are usable
    factors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # unstacked: (A, B) per member
    homes: tuple[torch.Tensor, torch.Tensor] | None = None  # (G, r, in), (G, out, r): the parameters' own stacks
    whole: bool = False  # written stack by stack at write time (write_all), not member by member
    adapter: str = ""  # the members' adapter name (stack_blocks): blocks of one shape differ by it

    @property
    def stacked(self) -> bool:
        return self.A is not None

    @property
    def shape_A(self) -> tuple[int, ...]:
        """(r, in) of every member."""
        return tuple(self.A.shape[1:]) if self.stacked else tuple(self.factors[0][0].shape)

    @property
    def shape_B(self) -> tuple[int, ...]:
        """(out, r) of every member."""
        return tuple(self.B.shape[1:]) if self.stacked else tuple(self.factors[0][1].shape)

    @property
    def r(self) -> int:
        return self.shape_A[0]

    @property
    def device(self) -> torch.device:
        return self.A.device if self.stacked else self.factors[0][0].device

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.A_dtype, self.B_dtype)

    @property
    def key(self) -> tuple:
        """What tells this block from any other of the pass (for its workspace buffers)."""
        return _block_key(len(self.members), self.shape_A, self.shape_B, self.A_dtype, self.B_dtype, self.adapter)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """G_A = A A^T and G_B = B^T B of every member, (G, r, r) each."""
        if self.stacked:
            return torch.bmm(self.A, self.A.mT), torch.bmm(self.B.mT, self.B)
        return torch.stack([A @ A.mT for A, _ in self.factors]), torch.stack([B.mT @ B for _, B in self.factors])

    def apply_one(self, g: int, cast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A' (r, in), B' (out, r) of one member of an unstacked block, in the compute dtype, or
        in the factors' own dtypes with cast=True."""
        A, B = self.factors[g]
        A_new, B_new = self.Y[g] @ A, B @ self.X[g]
        return (as_dtype(A_new, self.A_dtype), as_dtype(B_new, self.B_dtype)) if cast else (A_new, B_new)

    def apply(self, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A' (G, r, in), B' (G, out, r) in the compute dtype. reuse=True: into this thread's
        workspace, overwritten by the next pass (for results written at once)."""
        return self.new_A(reuse), self.new_B(reuse)

    def new_A(self, reuse: bool = True) -> torch.Tensor:
        """A' = Y A (G, r, in), one batched product."""
        out = _buffer(("A'", self.key), tuple(self.A.shape), self.A.dtype, self.A.device, reuse)
        return torch.bmm(self.Y, self.A, out=out)

    def new_B(self, reuse: bool = True) -> torch.Tensor:
        """B' = B X (G, out, r), one batched product."""
        out = _buffer(("B'", self.key), tuple(self.B.shape), self.B.dtype, self.B.device, reuse)
        return torch.bmm(self.B, self.X, out=out)

    def apply_member(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A' (r, in), B' (out, r) of member g of a stacked block, in the compute dtype (read before
        the block is written: a whole block's stacks are its parameters)."""
        return self.Y[g] @ self.A[g], self.B[g] @ self.X[g]


def _block_key(n: int, shape_A, shape_B, A_dtype: torch.dtype, B_dtype: torch.dtype, adapter: str = "") -> tuple:
    return n, tuple(shape_A), tuple(shape_B), A_dtype, B_dtype, adapter


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: t itself, with no op dispatched, when it is already."""
    return t if t.dtype == dtype else t.to(dtype)


def use_stacks(device: torch.device, A_dtype: torch.dtype, B_dtype: torch.dtype, stack: bool | None) -> bool:
    """Whether a block is stacked. stack=None: yes on a GPU, and on a CPU running torch with more
    than one thread, where the few large batched products use every thread; not on a one-thread
    CPU, where an op costs microseconds of host time rather than a kernel launch and forming and
    writing one pair at a time keeps it in cache, while stacking copies every factor once more.
    Measured on a 2-core CPU (docs/BENCHMARKS.md): stacked 0.98-1.04x an AdamW step with 2
    threads against 1.29-1.39x pair by pair; with 1 thread 1.32x against 1.16x. fp16 blocks are
    always stacked: their overflow check needs every new factor before anything is written."""
    if torch.float16 in (A_dtype, B_dtype):
        return True
    if stack is not None:
        return stack
    return device.type != "cpu" or torch.get_num_threads() > 1


def stack_blocks(pairs: list[FactorPair], stack: bool | None = None, rehome_params: bool = False) -> list[Block]:
    """One Block per exact shape, dtype and device, members in the order of `pairs`. The stacks
    are internal (never handed out), so on the CPU they live in this thread's workspace.
    rehome_params=True (the pass writes its results at once): stacked blocks of parameters read
    the parameters' own stacks (balora.param_stacks), re-homing them there on the first pass."""
    blocks = []
    shared: set[int] | None = None  # found when a block is first re-homed
    # By adapter too, so that a re-homed stack holds one adapter's parameters: torch.save writes a view's
    # whole storage, and saving one adapter (PEFT's save_pretrained with safe_serialization=False, torch.save
    # of its state dict) wrote the other adapters' factors too.
    for members in group_by_shape(pairs, by_adapter=True).values():
        first = pairs[members[0]]
        dtype = compute_dtype(first.A.dtype, first.B.dtype)
        if not use_stacks(first.A.device, first.A.dtype, first.B.dtype, stack):
            factors = [(as_dtype(pairs[k].A, dtype), as_dtype(pairs[k].B, dtype)) for k in members]  # upcast once
            blocks.append(Block(members, None, None, first.A.dtype, first.B.dtype, factors=factors,
                                adapter=first.adapter))
            continue
        role = _block_key(len(members), first.A.shape, first.B.shape, first.A.dtype, first.B.dtype, first.adapter)
        params = _params(pairs, members) if rehome_params else None
        homes = None if params is None else _homes(params, first, len(members))
        if params is not None and homes is None:
            shared = _shared_storage(pairs) if shared is None else shared
            homes = _rehomed(pairs, members, params, shared)
        if homes is None:
            A = stack_into(("A", role), [pairs[k].A for k in members], dtype)
            B = stack_into(("B", role), [pairs[k].B for k in members], dtype)
        else:  # bf16 parameters: one upcast copy of each stack
            A, B = (h if h.dtype == dtype else _buffer((name, role), tuple(h.shape), dtype, h.device, True).copy_(h)
                    for name, h in (("A", homes[0]), ("B", homes[1])))
        blocks.append(Block(members, A, B, first.A.dtype, first.B.dtype, homes=homes, adapter=first.adapter))
    return blocks


def _shared_storage(pairs: list[FactorPair]) -> set[int]:
    """data_ptrs of parameters that appear in more than one place of the pass, or are tied to a pair the
    pass skips for it (extra["tied"], balora.adapters.pair_cache): tied weights."""
    seen, shared = set(), set()
    for p in pairs:
        if isinstance(p.write, ParamWriter):
            for t in p.write.params:
                ptr = t.data_ptr()
                (shared if ptr in seen or p.extra.get("tied") else seen).add(ptr)
    return shared


def _params(pairs: list[FactorPair], members: list[int]) -> list[list[torch.Tensor]] | None:
    """[A parameters, B parameters] of the members, or None unless every write is a ParamWriter."""
    writers = [pairs[k].write for k in members]
    if not all(isinstance(w, ParamWriter) for w in writers):
        return None
    return [[w.params[0] for w in writers], [w.params[1] for w in writers]]


def _as_blocks(stacks: list[torch.Tensor], first: FactorPair, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacks as (G, r, in), (G, out, r): conv parameters (G, r, in, *k) viewed flat."""
    return tuple(s if s.shape[1:] == shape else s.view(n, *shape) for s, shape in zip(stacks, (first.A.shape, first.B.shape)))


def _homes(params: list[list[torch.Tensor]], first: FactorPair, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stacks of [A parameters, B parameters] (n each) as (n, r, in), (n, out, r) when they are
    re-homed already, else None."""
    stacks = [stack_of(ps) for ps in params]
    if stacks[0] is None or stacks[1] is None:
        return None
    return _as_blocks(stacks, first, n)


def _rehomed(pairs: list[FactorPair], members: list[int], params: list[list[torch.Tensor]],
             shared: set[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Re-home the members' parameters (balora.param_stacks) where they may be, point the pairs at
    their new storage, and return the stacks as _homes does; None where they may not be."""
    if not all(can_rehome(ps, shared) for ps in params):
        return None
    views = _as_blocks([rehome(ps) for ps in params], pairs[members[0]], len(members))
    for g, k in enumerate(members):  # the pairs viewed the parameters' old storage
        pairs[k].A, pairs[k].B = views[0][g], views[1][g]
    return views


def stack_into(role: tuple, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.stack into `dtype`, in this thread's workspace buffer for `role`: one pass over the
    factors, one dispatched op for all of them."""
    out = _buffer(role, (len(tensors), *tensors[0].shape), dtype, tensors[0].device, reuse=True)
    if tensors[0].dtype == dtype:
        return torch.stack(tensors, out=out)
    torch._foreach_copy_(list(out.unbind(0)), tensors)  # upcasts bf16/fp16 on the way
    return out


# cuSOLVER's batched Jacobi eigh and SVD take matrices up to 32 x 32 in one launch; above that torch
# solves the batch one matrix at a time. On an H200 (2026-11-29, 196 pairs, float64, the copy and the
# flags' read included) the r x r maths took 4.4 ms on the GPU against 20 ms on its 16-core host at
# r = 16 (nearest; svd 2.9 against 17.5 ms), but 298 ms against 167 ms at r = 64.
DEVICE_MATHS_MAX_R = 32
# On the GPU the maths cost about the same few milliseconds of launches whatever their size; on the
# host they grow with the pairs and the rank. Whole passes side by side on that H200 (r = 8, 16, 32;
# 7 to 112 pairs; docs/BENCHMARKS.md): the GPU was faster from pairs x r of 448-896 for nearest and
# 224-448 for svd, and at most 1.6 ms slower below.
DEVICE_MATHS_MIN_WORK = 512


def maths_on_device(device: torch.device, r: int, pairs: int) -> bool:
    """Whether the r x r maths of `pairs` rank-r pairs whose Grams are on `device` run there rather
    than on the host: on CUDA, up to rank DEVICE_MATHS_MAX_R, when pairs x r >= DEVICE_MATHS_MIN_WORK.
    There the pass makes a few syncs instead of one (nearest: the eigh's error check and _polar's
    check of its iteration; svd: two inside torch's SVD; then the flags' read), but only the first
    waits for the step's queued kernels; host maths that take longer leave the GPU idle. Not on MPS
    (no float64) or other devices, whose batched solvers are unmeasured. Depends only on shapes:
    every FSDP2 rank decides alike."""
    return device.type == "cuda" and r <= DEVICE_MATHS_MAX_R and pairs * r >= DEVICE_MATHS_MIN_WORK


def gram_maps(blocks: list[Block], method: str,
              reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> None:
    """Fill every block's X, Y and accurate flags from the Gram path (projection.gram_transforms).

    reduce: called on the Grams [G_A, G_B of block 0, G_A, G_B of block 1, ...] before the r x r
    maths, returning them (or their replacements) in that order: balora.sharded_step sums the
    ranks' partial Grams there. Blocks whose r x r maths raised (a failed decomposition) get
    accurate = False throughout, so the QR path redoes them and names the module.
    """
    grams = []
    for b in blocks:
        grams += b.grams()  # G_A = A A^T, G_B = B^T B: (G, r, r)
    if reduce is not None:
        grams = reduce(grams)
    # (rank, device) -> blocks whose Grams are on their factors' device, None for the rest (after
    # `reduce`, which may have moved them: FSDP2's CPU offload). Then (rank, where its maths run):
    # the device, or None for the host, where each rank's maths of all devices are one call.
    placed: dict[tuple[int, torch.device | None], list[int]] = {}
    for i, b in enumerate(blocks):
        at = grams[2 * i].device
        placed.setdefault((b.r, at if at == b.device else None), []).append(i)
    groups: dict[tuple[int, torch.device | None], list[int]] = {}
    for (r, at), idx in placed.items():
        on = at is not None and maths_on_device(at, r, sum(len(blocks[i].members) for i in idx))
        groups.setdefault((r, at if on else None), []).extend(idx)
    sent = [j for (_, at), idx in groups.items() if at is None for i in idx for j in (2 * i, 2 * i + 1)]
    for j, t in zip(sent, _to_host([grams[j] for j in sent])):  # a sync per device (none on CPU)
        grams[j] = t
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for (_, at), idx in groups.items():
        sizes = [len(blocks[i].members) for i in idx]
        # Per member, expanded in Python (repeat_interleave on a multi-threaded CPU cost ~0.7 ms per call).
        limits = [gram_limits(blocks[i].A_dtype, blocks[i].B_dtype, blocks[i].device) for i in idx]
        per_member = _per_member(limits, sizes)
        u, tol, floor, settled = (per_member if at is None else to_device_at_once([per_member], at)[0]).unbind(-1)
        if all(lim[3] == -math.inf for lim in limits):  # full-precision factors: nothing to check
            settled = None
        try:
            t = gram_transforms(torch.cat([grams[2 * i] for i in idx]), torch.cat([grams[2 * i + 1] for i in idx]),
                                method, u, tol, floor, settled)
        except torch.linalg.LinAlgError:  # anything else is a bug and propagates
            for i in idx:
                blocks[i].accurate = [False] * len(blocks[i].members)
            continue
        accurate = t.accurate.tolist()  # a host tensor: no sync; on a device, the group's last
        for i, X, Y, start, n in zip(idx, t.X.split(sizes), t.Y.split(sizes), _starts(sizes), sizes):
            maps[i] = (X, Y)
            blocks[i].accurate = accurate[start : start + n]
    _maps_to_devices(blocks, maps, {i for (_, at), idx in groups.items() if at is not None for i in idx})


def gram_tol(A_dtype: torch.dtype, B_dtype: torch.dtype) -> float:
    """The Gram path's tolerance for factors of these dtypes: GRAM_TOL, or a tenth of their own
    rounding where that is larger (rounding new factors to bf16/fp16 costs more than the path's error)."""
    return max(GRAM_TOL, 0.1 * max(torch.finfo(A_dtype).eps, torch.finfo(B_dtype).eps))


def gram_limits(A_dtype: torch.dtype, B_dtype: torch.dtype, device: torch.device) -> tuple[float, float, float, float]:
    """What gram_transforms needs to judge a pair of factors of these dtypes whose Grams were formed
    on `device` in their compute dtype: the unit roundoff of that matmul, the tolerance (gram_tol),
    the subnormal floor of the compute dtype (the Grams' own, even when they reach the r x r
    maths upcast to float64: a GPU's, FSDP2's all-reduced ones, blocks of two dtypes joined), and
    `settled`: for factors stored narrower than they are computed in (bf16, fp16), the unit
    roundoff of the coarser one, below which a pair is left as it is; -inf (never) otherwise,
    where a pass re-rounds at the compute precision only."""
    ct = compute_dtype(A_dtype, B_dtype)
    coarse = max(torch.finfo(A_dtype).eps, torch.finfo(B_dtype).eps) / 2
    settled = coarse if coarse > torch.finfo(ct).eps / 2 else -math.inf
    return matmul_unit_roundoff(ct, device), gram_tol(A_dtype, B_dtype), subnormal_floor(ct), settled


def _per_member(values: list[tuple[float, ...]], sizes: list[int]) -> torch.Tensor:
    """(sum(sizes), k) float64: values[i] (k numbers) repeated sizes[i] times."""
    return torch.tensor([v for v, n in zip(values, sizes) for _ in range(n)], dtype=torch.float64)


def _starts(sizes: list[int]) -> list[int]:
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU: as they are when already there, else one copy per device."""
    out = list(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device != HOST:
            by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(HOST).to(torch.float64)  # the sync; float64 on the host (MPS has none)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def _maps_to_devices(blocks: list[Block], maps: dict[int, tuple[torch.Tensor, torch.Tensor]], there: set[int]) -> None:
    """X, Y of each block onto its factors' device, in their compute dtype; one pinned,
    non-blocking copy per device for maps computed on the host, so the host never waits for the
    device here."""
    by_device: dict[torch.device, list[int]] = {}
    for i, b in enumerate(blocks):
        if i not in maps:
            continue
        if b.device == HOST or i in there:  # `there`: blocks whose maps were computed on their factors' device
            b.X, b.Y = (as_dtype(t, b.compute_dtype) for t in maps[i])
        else:
            by_device.setdefault(b.device, []).append(i)
    for device, idx in by_device.items():  # sent in the compute dtype (MPS has no float64)
        sent = to_device_at_once([as_dtype(t, blocks[i].compute_dtype) for i in idx for t in maps[i]], device)
        for i, X, Y in zip(idx, sent[0::2], sent[1::2]):
            blocks[i].X, blocks[i].Y = as_dtype(X, blocks[i].compute_dtype), as_dtype(Y, blocks[i].compute_dtype)


def to_device_at_once(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on `device` (in their promoted dtype) through one pinned, non-blocking copy: the
    host never waits for the device here, where a blocking copy from pageable memory would wait once
    per tensor."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
