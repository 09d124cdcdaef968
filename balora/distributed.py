"""LoRA factors sharded by FSDP2 (`fully_shard`: parameters are DTensors): gather, balance whole, write the shard back.

LoRA factors are small next to the frozen base model, so every rank gathers every factor,
runs the same deterministic balancing on the whole matrices, and writes back only its own
shard. No rank's result is ever sent anywhere: replicas stay consistent because every rank
computes from identical inputs, and each element of a sharded factor lives on one rank only.

Communication: FSDP2 shards a factor along dim 0 in torch.chunk pieces (dim 1 for the A factors
of balora.lora_shard_placement), over a 1-D mesh or over the shard dim of an HSDP mesh, so all
factors of one mesh, dtype and sharded dim are gathered by one `all_gather` of a flat buffer (each
factor padded to ceil(n / world) rows or columns), one collective instead of one per factor. Any
other layout falls back to `DTensor.full_tensor()` per factor.
`last_comm()` says what the latest pass moved. The per-step passes (the hooks, and
balance_ without its check) go through balora.sharded_step, which gathers only the A factors
sharded by rows and all-reduces r x r Grams for the rest; what it cannot do that way comes here.

FSDP1 (`FullyShardedDataParallel`, flat parameters) and DeepSpeed (an engine, its optimizers, ZeRO-3
parameters) are refused.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, replace

import torch
from torch import nn

from balora.pairs import FactorPair

FSDP2_HINT = "shard with FSDP2 (torch.distributed.fsdp.fully_shard), which balora balances"


@dataclass
class CommStats:
    """What one pass moved, seen from this rank."""

    collectives: int = 0  # all_gather / full_tensor / all_reduce calls
    bytes_received: int = 0  # gathered payload this rank received from the others (padding included)
    bytes_sent: int = 0  # gathered payload this rank contributed (its local shards, padded)
    bytes_reduced: int = 0  # size of the all-reduced buffer (r x r Grams; balora.sharded_step)

    def __add__(self, other: "CommStats") -> "CommStats":
        return CommStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


_LAST = CommStats()


def last_comm() -> CommStats:
    """CommStats of the latest pass over sharded factors in this process (zeros if none yet)."""
    return replace(_LAST)


def record_comm(stats: CommStats) -> None:
    global _LAST
    _LAST = stats


_DTENSOR: type | tuple | None = None  # DTensor once looked up; () when torch has no distributed


def is_dtensor(t: torch.Tensor) -> bool:
    """FSDP2 / tensor-parallel parameters are DTensors (a Parameter subclass may wrap one)."""
    global _DTENSOR
    if _DTENSOR is None:  # imported on first use, then kept: the per-step cache check calls this per factor
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = ()
        _DTENSOR = DTensor
    return isinstance(t, _DTENSOR)


def local_storage(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding t's data on this rank: its local shard for a DTensor, t itself otherwise."""
    if not is_dtensor(t):
        return t
    # The attribute to_local() returns, read without to_local()'s autograd call (tens of us each):
    # the per-step cache check reads it for every factor.
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


def reshard_fsdp2(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back in its sharded state (FSDPModule.reshard: local, no
    communication). After a forward that kept its parameters unsharded (reshard_after_forward=False,
    the root's default; an eval or generate under no_grad), the registered parameters are FSDP2's
    temporary whole copies: balanced factors written there would be dropped at the next reshard while
    the optimizer kept stepping the old shards. Only in a distributed run (else nothing to do, no walk)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:  # torch < 2.6 kept FSDP2 here
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:  # a torch without FSDP2
            return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# By class name: neither library needs to be installed to be recognised (nor imported to check).
_DEEPSPEED_ENGINES = ("DeepSpeedEngine", "PipelineEngine", "DeepSpeedHybridEngine")
DEEPSPEED_OPTIMIZERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "FP16_Optimizer",
                        "FP16_UnfusedOptimizer", "BF16_Optimizer", "ZeROOptimizer", "DeepSpeedOptimizerWrapper")
DEEPSPEED_WHY = ("DeepSpeed keeps fp32 master weights in its optimizer and copies them into the model after "
                 "each step, which would undo balancing")


def refuse_unsupported(name: str, module: nn.Module) -> None:
    """One-line refusal for FSDP1 and a DeepSpeed engine (`module` is a model's submodule `name`, ""
    for the root): FSDP1's flat parameters hide the factors' shapes between steps; see DEEPSPEED_WHY.
    Called on every module of a walk."""
    kind = type(module).__name__
    if kind == "FullyShardedDataParallel":
        raise RuntimeError(f"{name or kind}: FSDP1 (FullyShardedDataParallel) is not supported; {FSDP2_HINT}.")
    if kind in _DEEPSPEED_ENGINES:
        raise RuntimeError(f"{name or kind}: DeepSpeed ({kind}) is not supported: {DEEPSPEED_WHY}; {FSDP2_HINT}.")


def gather_pairs(pairs: list[FactorPair]) -> list[FactorPair]:
    """Pairs whose A/B are whole (gathered) 2-D factors and whose `write` stores this rank's shard.

    Pairs with no sharded factor are returned as they are, and so are skipped ones: nothing reads
    their factors, and those of a model built on the meta device (skipped until loaded) hold no data
    to gather. Every rank must call this with the same pairs in the same order (it runs
    collectives), which a walk of the same model gives.
    """
    sharded = [i for i, p in enumerate(pairs) if _sharded_params(p) and not p.skip_reason]
    if not sharded:
        record_comm(CommStats())  # a gather of nothing moves nothing
        return pairs
    params = [t for i in sharded for t in _sharded_params(pairs[i])]
    full = dict(zip(map(id, params), gather_full(params)))
    out = list(pairs)
    for i in sharded:
        p = pairs[i]
        A_p, B_p = p.extra["params"]
        # Conv factors (r, in, *k) / (out, r, 1, ..) become (r, in * prod(k)) / (out, r); others stay 2-D.
        A, B = (full[id(t)] if is_dtensor(t) else t.detach() for t in (A_p, B_p))
        # "views": the DTensors the pair was walked from, so a cache can tell when they went stale.
        extra = {**p.extra, "views": p.extra.get("views", (p.A, p.B))}
        out[i] = replace(p, A=A.reshape(A.shape[0], -1), B=B.reshape(B.shape[0], -1),
                         write=_shard_writer(A_p, B_p), extra=extra)
    return out


def _sharded_params(p: FactorPair) -> list[torch.Tensor]:
    return [t for t in p.extra.get("params", ()) if is_dtensor(t)]


def gather_full(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole tensor of every DTensor in `params` (detached), in order; records last_comm()."""
    stats = CommStats()
    result: list[torch.Tensor | None] = [None] * len(params)
    batches: dict[tuple, list[int]] = {}
    for i, t in enumerate(params):
        along = _gathered_along(t)
        if along is not None:
            # the mesh by equality: fully_shard without mesh= gives every call its own, equal DeviceMesh
            batches.setdefault((t.device_mesh, t.dtype, along), []).append(i)
        else:
            result[i] = t.detach().full_tensor()
            local = local_storage(t).numel() * t.element_size()
            stats.collectives += 1
            stats.bytes_received += t.numel() * t.element_size() - local
            stats.bytes_sent += local
    for (_, _, along), idx in batches.items():
        for i, whole in zip(idx, _all_gather_shards([params[i] for i in idx], stats, along)):
            result[i] = whole
    record_comm(stats)
    return result  # type: ignore[return-value]


def fsdp_placement(t) -> tuple[int, object] | None:
    """How FSDP2 splits the DTensor t: (the mesh dim it is sharded over, its Shard placement) on a
    1-D mesh (FSDP) or on a 2-D mesh replicated over dim 0 and sharded over dim 1 (HSDP); None for
    any other layout. Decided from the placements alone, which every rank sees the same, so all
    ranks take the same path into the same collectives."""
    from torch.distributed.tensor import Replicate, Shard

    placements, ndim = tuple(t.placements), t.device_mesh.ndim
    if ndim == 1 and isinstance(placements[0], Shard):
        return 0, placements[0]
    if ndim == 2 and placements[0] == Replicate() and isinstance(placements[1], Shard):
        return 1, placements[1]
    return None


def _row_sharded(t) -> bool:
    """FSDP2's default layout: Shard(0) on a 1-D mesh, or on an HSDP mesh's shard dim."""
    how = fsdp_placement(t)
    return how is not None and how[1].dim == 0


def _gathered_along(t) -> int | None:
    """The tensor dim along which gather_full batches t: 0 for row-sharded factors, 1 for 2-D
    factors sharded by columns (lora_shard_placement's A); None (full_tensor alone) otherwise."""
    how = fsdp_placement(t)
    if how is None or how[1].dim not in (0, 1) or (how[1].dim == 1 and t.ndim != 2):
        return None
    return how[1].dim


def chunk_rows(t, along: int = 0) -> tuple[int, int]:
    """(size, first index) of this rank's torch.chunk piece of t's dim `along`, which FSDP2 shards."""
    dim = fsdp_placement(t)[0]
    world, rank = t.device_mesh.size(dim), t.device_mesh.get_local_rank(dim)
    n = t.shape[along]
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    return min(chunk, n - start), start


def _all_gather_shards(ts: list, stats: CommStats, along: int) -> list[torch.Tensor]:
    """Whole tensors of DTensors of one mesh and dtype sharded along tensor dim `along` (0, or 1 for
    2-D factors: gathered as the rows of their transposes), by one all_gather over the mesh dim
    that shards them."""
    mesh, dim = ts[0].device_mesh, fsdp_placement(ts[0])[0]
    world = mesh.size(dim)
    shapes = [tuple(t.shape) if along == 0 else (t.shape[1], t.shape[0]) for t in ts]  # what is gathered by rows
    chunks = [math.ceil(shape[0] / world) for shape in shapes]
    sizes = [c * math.prod(shape[1:]) for c, shape in zip(chunks, shapes)]
    send = local_storage(ts[0]).new_zeros(sum(sizes))  # (L,): every factor's rows padded to its chunk
    offsets = [0]
    for t, size in zip(ts, sizes):
        local = local_storage(t).detach()
        local = local if along == 0 else local.mT
        if local.shape[0] != chunk_rows(t, along)[0]:  # Shard(d) is torch.chunk's split, for DTensor as for FSDP2
            raise RuntimeError(f"a factor of shape {tuple(t.shape)} sharded along dim {along} holds {local.shape[0]} "
                               f"of it on this rank, not torch.chunk's {chunk_rows(t, along)[0]}: cannot gather it")
        send[offsets[-1] : offsets[-1] + local.numel()] = local.reshape(-1)
        offsets.append(offsets[-1] + size)
    recv = all_gather_flat(send, mesh, stats, dim)
    # Rank j's piece of factor k sits in recv[j, offsets[k]:offsets[k+1]]; stacking the pieces
    # in rank order and dropping the padding rows gives the whole factor (or its transpose).
    wholes = [recv[:, offsets[k] : offsets[k + 1]].reshape(world * chunks[k], *shape[1:])[: shape[0]]
              for k, shape in enumerate(shapes)]
    return wholes if along == 0 else [w.mT.contiguous() for w in wholes]


def all_gather_flat(send: torch.Tensor, mesh, stats: CommStats, mesh_dim: int = 0) -> torch.Tensor:
    """Every rank's `send` (L,) of the same length, as rows of (world, L), by one all_gather over
    `mesh_dim` of `mesh`; counted in `stats`."""
    import torch.distributed as dist

    world = mesh.size(mesh_dim)
    home = send.device
    send = on_mesh_device(send, mesh)
    recv = send.new_empty(world, send.numel())
    dist.all_gather(list(recv.unbind(0)), send, group=mesh.get_group(mesh_dim))
    stats.collectives += 1
    stats.bytes_sent += send.numel() * send.element_size()
    stats.bytes_received += (world - 1) * send.numel() * send.element_size()
    return recv.to(home)


def all_reduce_flat(flat: torch.Tensor, mesh, stats: CommStats, mesh_dim: int = 0) -> torch.Tensor:
    """The sum of every rank's `flat` (L,) over `mesh_dim` of `mesh`, by one all_reduce, on flat's
    own device; counted in `stats`."""
    import torch.distributed as dist

    home = flat.device
    flat = on_mesh_device(flat, mesh)
    dist.all_reduce(flat, group=mesh.get_group(mesh_dim))
    stats.collectives += 1
    stats.bytes_reduced += flat.numel() * flat.element_size()
    return flat.to(home)


def on_mesh_device(t: torch.Tensor, mesh) -> torch.Tensor:
    """t where the mesh's collectives run: shards that FSDP2 keeps on the CPU (CPUOffloadPolicy)
    belong to a CUDA mesh, whose NCCL group takes only CUDA tensors. t itself when already there.
    (No GPU here: the moving branch is not exercised by the tests.)"""
    return t if t.device.type == mesh.device_type else t.to(mesh.device_type)


def _local_piece(whole: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of `whole` laid out like the DTensor `param`, without communication."""
    if _row_sharded(param):
        rows, start = chunk_rows(param)
        return whole[start : start + rows]
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank holds the same `whole` and keeps its own piece (no scatter).
    return distribute_tensor(whole.detach(), param.device_mesh, param.placements, src_data_rank=None).to_local()


def _shard_writer(A_p: torch.Tensor, B_p: torch.Tensor):
    """Write whole 2-D factors into the parameters: a DTensor keeps only this rank's shard."""

    def write(A: torch.Tensor, B: torch.Tensor) -> None:
        with torch.no_grad():
            for param, new in ((A_p, A), (B_p, B)):
                whole = new.reshape(param.shape)
                if is_dtensor(param):
                    local_storage(param).copy_(_local_piece(whole, param))  # copy_ casts to the shard's dtype
                else:
                    param.copy_(whole)

    return write
